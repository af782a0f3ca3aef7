"""Who may use the operator console: admin tokens, session ids, CSRF tokens.

Pure functions of strings; ``web/admin.py`` feeds them the request's headers, and
``admin_sessions.py`` / ``admin_throttle.py`` keep what must be shared by every replica.

- Tokens: ``KAMIYO_ADMIN_TOKEN`` (shared, named ``shared``) and each operator's own from
  ``KAMIYO_ADMIN_TOKENS=name:token,...``. A request is proven to come from the *name* of the
  token it carries; the audit log records that name. A name the request merely states (the
  sign-in form's name field, ``X-Kamiyo-Actor``) is a claim, kept beside it.
- ``Authorization: Bearer TOKEN`` works on every admin route, and when present it alone decides:
  a wrong token is never rescued by a cookie. Any other scheme (a proxy's ``Basic``) is not ours
  and is ignored, so a valid session cookie still counts.
- The sign-in form trades a token for a session: the cookie holds ``v2.<random id>`` (256 bits);
  the database keeps only the id's SHA-256 and an HMAC of the id keyed by the operator's token,
  so rotating or removing that token ends its sessions, and signing out deletes the row.
- A cookie-authenticated request that changes something must also send the session's CSRF
  token (an HMAC keyed by the session id, embedded in the page) in ``X-CSRF-Token`` or a ``csrf``
  form field. SameSite=Strict already keeps the cookie off cross-site requests; this is the
  second wall. Bearer requests need none: a browser never adds that header by itself.

Every comparison of a secret value is constant-time (``hmac.compare_digest``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from kamiyo.config import SHARED_TOKEN_NAME, Settings

SESSION_COOKIE = "kamiyo_admin"
SESSION_SECONDS = 12 * 3600
CSRF_HEADER = "x-csrf-token"
ACTOR_HEADER = "x-kamiyo-actor"
_COOKIE = re.compile(r"v2\.[A-Za-z0-9_-]{43}")
_ACTOR_RE = re.compile(r"[^A-Za-z0-9 ._@+-]")
_ACTOR_MAX = 64
_MAX_CANDIDATE = 512  # longer than any token we accept: compared as a miss without hashing it


@dataclass(frozen=True)
class Operator:
    """An authenticated admin request: by bearer token or by session cookie."""

    via: str  # "bearer" | "session"
    name: str  # proven: the name of the token that signed in or sent the request
    claimed: str | None = None  # a name the request stated (sign-in form, X-Kamiyo-Actor): not proven
    csrf: str | None = None  # the session's CSRF token (None for bearer requests)
    session_hash: str | None = None  # the session's key in admin_sessions (None for bearer requests)

    @property
    def audit_name(self) -> str:
        """The audit log's actor: ``console:<name>`` or ``api:<name>``."""
        return f"{'console' if self.via == 'session' else 'api'}:{self.name}"


@dataclass(frozen=True)
class Refusal:
    """Why a request is refused: a short, greppable code (never any secret)."""

    reason: str  # missing | bad_scheme | bad_token | bad_session | expired_session


@dataclass(frozen=True)
class Bearer:
    """The token an ``Authorization: Bearer`` header carries."""

    token: str


def clean_actor(raw: str | None, default: str | None = None) -> str | None:
    """A name as given in the sign-in form or the actor header, made safe to log and store."""
    name = _ACTOR_RE.sub("", (raw or "").strip())[:_ACTOR_MAX].strip()
    return name or default


def read_authorization(header: str | None) -> Bearer | Refusal | None:
    """A Bearer header's token; a malformed Bearer header's refusal; None for no header or another scheme."""
    if header is None:
        return None
    scheme, _, credentials = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None  # not ours (a proxy's Basic, say): it neither proves nor refuses anything
    token = credentials.strip()
    return Bearer(token) if token else Refusal("bad_scheme")


class AdminTokens:
    """The configured admin tokens by name; finds a token's name in constant time."""

    def __init__(self, tokens: Iterable[tuple[str, str]]) -> None:
        self._tokens = {name: token.encode("ascii") for name, token in tokens}
        if not self._tokens:
            raise ValueError("AdminTokens needs at least one token")

    @classmethod
    def from_settings(cls, settings: Settings) -> AdminTokens:
        shared = [(SHARED_TOKEN_NAME, settings.admin_token)] if settings.admin_token else []
        return cls([*shared, *settings.admin_tokens])

    def secrets(self) -> list[bytes]:
        """Every token, for whoever must keep them out of an output."""
        return list(self._tokens.values())

    def match(self, candidate: str) -> str | None:
        """The name of the token ``candidate`` is, or None; every token is compared, whatever matches."""
        if len(candidate) > _MAX_CANDIDATE:
            return None
        given = candidate.encode("utf-8", "surrogateescape")
        found = None
        for name, token in self._tokens.items():
            if hmac.compare_digest(given, token):
                found = name
        return found

    def session_check(self, name: str, cookie: str) -> str | None:
        """What ``admin_sessions.token_check`` holds for a session of ``name``; None if the name has no token."""
        token = self._tokens.get(name)
        if token is None:
            return None
        return hmac.new(token, b"kamiyo-admin:session\x00" + cookie.encode(), hashlib.sha256).hexdigest()


def new_session_cookie() -> str:
    """A fresh session cookie value: a random id, unguessable (256 bits)."""
    return "v2." + base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")


def is_session_cookie(value: str) -> bool:
    return _COOKIE.fullmatch(value) is not None


def session_hash(cookie: str) -> str:
    """The key under which a session is stored: the cookie itself never is."""
    return hashlib.sha256(cookie.encode()).hexdigest()


def csrf_token(cookie: str) -> str:
    """The CSRF token that goes with one session: keyed by the session id, which only its browser holds."""
    digest = hmac.new(cookie.encode(), b"kamiyo-admin:csrf", hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def csrf_matches(cookie: str, candidate: str | None) -> bool:
    return candidate is not None and hmac.compare_digest(
        candidate.encode("utf-8", "surrogateescape"), csrf_token(cookie).encode()
    )
