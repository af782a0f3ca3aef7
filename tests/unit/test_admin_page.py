"""The console's pages (web/admin_page.py): what the browser may run is exactly what they inline."""

from __future__ import annotations

import re

from kamiyo.web.admin_page import console_page, csp_hash, login_page


def _inline(tag: str, html: str) -> list[str]:
    return re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)


def _sources(csp: str, directive: str) -> set[str]:
    for part in csp.split(";"):
        name, *values = part.split()
        if name == directive:
            return set(values)
    return set()


def test_the_console_allows_its_one_inline_style_and_script_by_hash_and_nothing_else() -> None:
    page = console_page(csrf="c" * 43, actor="ann")
    html, csp = page.body.decode(), page.headers["content-security-policy"]
    (style,) = _inline("style", html)
    (script,) = _inline("script", html)
    assert _sources(csp, "default-src") == {"'none'"}
    assert _sources(csp, "style-src") == {csp_hash(style)}
    assert _sources(csp, "script-src") == {csp_hash(script)}
    assert "unsafe-inline" not in csp


def test_the_sign_in_page_allows_its_style_and_no_script() -> None:
    page = login_page(401, {"Cache-Control": "no-store"}, error="That token is not right.")
    html, csp = page.body.decode(), page.headers["content-security-policy"]
    (style,) = _inline("style", html)
    assert page.status_code == 401
    assert page.headers["cache-control"] == "no-store"
    assert _sources(csp, "style-src") == {csp_hash(style)}
    assert _sources(csp, "script-src") == set()  # default-src 'none' forbids any
    assert _inline("script", html) == []


def test_values_put_into_a_page_are_html_escaped() -> None:
    hostile = '<script>alert("x")</script>&'
    console = console_page(csrf=hostile, actor=hostile).body.decode()
    login = login_page(400, error=hostile).body.decode()
    for html in (console, login):
        assert hostile not in html
        assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;" in html
