"""The operator console's two HTML pages: the console and the sign-in form.

Each is one document from ``admin_static/`` with its CSS (and, for the console, its JS) inline,
so that no asset comes from anywhere else. The Content-Security-Policy allows nothing by default
and the inline CSS and JS by their SHA-256 hashes alone: no other script or style can run, even
one injected into the page. The values put into a page (an operator's name, an error, the CSRF
token) are HTML-escaped. The routes that answer with them, and the headers every admin answer
carries, are in ``admin.py``.
"""

from __future__ import annotations

import base64
import hashlib
import html
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from string import Template

from starlette.responses import Response

_STATIC = Path(__file__).with_name("admin_static")
# What every page may load: nothing from elsewhere, only itself as a frame's parent or a form's target.
_BASE_POLICY = "default-src 'none'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"


@dataclass(frozen=True)
class _Document:
    template: Template
    fixed: dict[str, str]  # the inline CSS and JS: ours, inserted as they are
    csp: str


def csp_hash(source: str) -> str:
    """A CSP source expression allowing exactly ``source`` as an inline script or style."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


@cache
def _documents() -> dict[str, _Document]:
    """The console and sign-in pages, CSS and JS inline, each allowed by its hash alone."""
    css = (_STATIC / "console.css").read_text(encoding="utf-8")
    js = (_STATIC / "console.js").read_text(encoding="utf-8")
    return {
        "console": _Document(
            Template((_STATIC / "console.html").read_text(encoding="utf-8")),
            {"css": css, "js": js},
            f"{_BASE_POLICY}; style-src {csp_hash(css)}; script-src {csp_hash(js)}; connect-src 'self'",
        ),
        "login": _Document(
            Template((_STATIC / "login.html").read_text(encoding="utf-8")),
            {"css": css},
            f"{_BASE_POLICY}; style-src {csp_hash(css)}",
        ),
    }


def _page(name: str, status: int, headers: Mapping[str, str] | None, **values: str) -> Response:
    document = _documents()[name]
    body = document.template.substitute(document.fixed, **{k: html.escape(v) for k, v in values.items()})
    return Response(
        body,
        status_code=status,
        media_type="text/html; charset=utf-8",
        headers={"Content-Security-Policy": document.csp, **(headers or {})},
    )


def console_page(*, csrf: str, actor: str) -> Response:
    """The console, for a signed-in operator: ``actor`` as shown, ``csrf`` for its changes."""
    return _page("console", 200, None, csrf=csrf, actor=actor)


def login_page(status: int, headers: Mapping[str, str] | None = None, *, error: str = "") -> Response:
    """The sign-in form, with ``error`` above it (why the last attempt was refused), if any."""
    return _page("login", status, headers, error=error)
