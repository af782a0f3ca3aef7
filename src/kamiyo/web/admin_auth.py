"""Who may use the operator console: the admin token, the session cookie and its CSRF token.

Pure functions of strings and times; ``web/admin.py`` feeds them the request's headers.

- ``Authorization: Bearer TOKEN`` (``KAMIYO_ADMIN_TOKEN``) is accepted on every admin route.
  When the header is present it alone decides, so a wrong token is never rescued by a cookie.
- The sign-in form trades the token for a session cookie ``v1.<issued>.<actor>.<mac>``, where
  ``mac`` is an HMAC-SHA256 keyed by the admin token itself. Our own HMAC rather than
  Starlette's SessionMiddleware (itsdangerous): no second secret to configure and keep, no
  session machinery on the webhook routes, one dependency fewer, and rotating the token signs
  every session out at once. The cookie never holds the token.
- A cookie-authenticated request that changes something must also send the session's CSRF
  token (another HMAC, embedded in the page) in ``X-CSRF-Token`` or a ``csrf`` form field.
  SameSite=Strict already keeps the cookie off cross-site requests; this is the second wall.
  Bearer requests need none: a browser never adds that header by itself.

Every comparison of a secret value is constant-time (``hmac.compare_digest``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass

SESSION_COOKIE = "kamiyo_admin"
SESSION_SECONDS = 12 * 3600
CSRF_HEADER = "x-csrf-token"
ACTOR_HEADER = "x-kamiyo-actor"
DEFAULT_BEARER_ACTOR = "admin-api"
DEFAULT_SESSION_ACTOR = "console"
_ACTOR_RE = re.compile(r"[^A-Za-z0-9 ._@+-]")
_ACTOR_MAX = 64


@dataclass(frozen=True)
class Operator:
    """An authenticated admin request: by bearer token or by session cookie."""

    via: str  # "bearer" | "session"
    actor: str  # recorded in the audit log as console:<actor> or api:<actor>
    csrf: str | None = None  # the CSRF token of the session (None for bearer requests)

    @property
    def audit_name(self) -> str:
        return f"{'console' if self.via == 'session' else 'api'}:{self.actor}"


@dataclass(frozen=True)
class Refusal:
    """Why a request is refused: a short, greppable code (never any secret)."""

    reason: str  # missing | bad_scheme | bad_token | bad_session | expired_session


def clean_actor(raw: str | None, default: str) -> str:
    """An operator's name as given in the sign-in form or the actor header, made safe to log."""
    name = _ACTOR_RE.sub("", (raw or "").strip())[:_ACTOR_MAX].strip()
    return name or default


class AdminAuth:
    """Checks requests against one admin token."""

    def __init__(self, token: str, *, session_seconds: int = SESSION_SECONDS) -> None:
        self._token = token.encode("ascii")
        self.session_seconds = session_seconds

    def token_matches(self, candidate: str) -> bool:
        """Constant-time comparison with the admin token."""
        return hmac.compare_digest(candidate.encode("utf-8", "surrogateescape"), self._token)

    def _mac(self, purpose: str, message: str) -> str:
        digest = hmac.new(self._token, f"kamiyo-admin:{purpose}\x00{message}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def new_session(self, actor: str, now: float) -> str:
        """A signed session cookie value for ``actor``, issued at ``now``."""
        name = base64.urlsafe_b64encode(clean_actor(actor, DEFAULT_SESSION_ACTOR).encode()).decode().rstrip("=")
        body = f"v1.{int(now)}.{name}"
        return f"{body}.{self._mac('session', body)}"

    def csrf_token(self, session: str) -> str:
        """The CSRF token that goes with one session cookie value."""
        return self._mac("csrf", session)

    def csrf_matches(self, session: str, candidate: str | None) -> bool:
        return candidate is not None and hmac.compare_digest(candidate.encode(), self.csrf_token(session).encode())

    def read_session(self, cookie: str, now: float) -> Operator | Refusal:
        parts = cookie.split(".")
        if len(parts) != 4 or parts[0] != "v1" or not parts[1].isdigit():
            return Refusal("bad_session")
        body = ".".join(parts[:3])
        if not hmac.compare_digest(parts[3].encode(), self._mac("session", body).encode()):
            return Refusal("bad_session")
        issued = int(parts[1])
        if not issued - 60 <= now <= issued + self.session_seconds:
            return Refusal("expired_session")
        try:
            actor = base64.urlsafe_b64decode(parts[2] + "=" * (-len(parts[2]) % 4)).decode()
        except ValueError:
            return Refusal("bad_session")
        return Operator("session", clean_actor(actor, DEFAULT_SESSION_ACTOR), self.csrf_token(cookie))

    def authenticate(
        self, authorization: str | None, cookie: str | None, now: float, *, actor_header: str | None = None
    ) -> Operator | Refusal:
        """The operator behind a request's ``Authorization`` header or session cookie, or why not."""
        if authorization is not None:
            scheme, _, credentials = authorization.strip().partition(" ")
            if scheme.lower() != "bearer" or not credentials.strip():
                return Refusal("bad_scheme")
            if not self.token_matches(credentials.strip()):
                return Refusal("bad_token")
            return Operator("bearer", clean_actor(actor_header, DEFAULT_BEARER_ACTOR))
        if cookie:
            return self.read_session(cookie, now)
        return Refusal("missing")
