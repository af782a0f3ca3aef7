"""The console's sessions, in the database so that every ``kamiyo serve`` replica shares them.

One row per signed-in browser (``admin_sessions``): the SHA-256 of the cookie's random id, the
name of the token that signed in, the name typed into the form (a claim), an HMAC of the id
keyed by that token, and the expiry. A session is valid while its row exists, it has not expired
and its token is still configured unchanged; signing out deletes the row. Times are Unix seconds.
"""

from __future__ import annotations

import hmac

from sqlalchemy import Engine, delete, insert, select

from kamiyo.db.models import admin_sessions_table
from kamiyo.web.admin_auth import (
    AdminTokens,
    Operator,
    Refusal,
    csrf_token,
    is_session_cookie,
    new_session_cookie,
    session_hash,
)

_sessions = admin_sessions_table
_PRUNE_BATCH = 100  # expired rows deleted at each sign-in, at most


class SessionStore:
    """Creates, reads and ends sessions of the operators ``tokens`` knows."""

    def __init__(self, engine: Engine, tokens: AdminTokens, *, seconds: int) -> None:
        self._engine = engine
        self._tokens = tokens
        self.seconds = seconds

    def create(self, name: str, claimed: str | None, now: float) -> str:
        """A new session of the token named ``name``; returns the cookie value (never stored)."""
        cookie = new_session_cookie()
        check = self._tokens.session_check(name, cookie)
        if check is None:
            raise ValueError(f"no admin token named {name!r}")
        issued = int(now)
        with self._engine.begin() as connection:
            expired = select(_sessions.c.id_hash).where(_sessions.c.expires_at < issued).limit(_PRUNE_BATCH)
            connection.execute(delete(_sessions).where(_sessions.c.id_hash.in_(expired.scalar_subquery())))
            connection.execute(
                insert(_sessions).values(
                    id_hash=session_hash(cookie),
                    operator=name,
                    claimed=claimed,
                    token_check=check,
                    created_at=issued,
                    expires_at=issued + self.seconds,
                )
            )
        return cookie

    def read(self, cookie: str, now: float) -> Operator | Refusal:
        """The operator of a session cookie, or why it is not (any more) valid."""
        if not is_session_cookie(cookie):
            return Refusal("bad_session")
        key = session_hash(cookie)
        with self._engine.connect().execution_options(readonly=True) as connection:
            row = connection.execute(select(_sessions).where(_sessions.c.id_hash == key)).first()
        if row is None:
            return Refusal("bad_session")  # never issued, signed out, or pruned
        if not row.created_at - 60 <= now < row.expires_at:
            return Refusal("expired_session")
        expected = self._tokens.session_check(row.operator, cookie)
        if expected is None or not hmac.compare_digest(expected, row.token_check):
            return Refusal("bad_session")  # the operator's token was rotated or removed
        return Operator("session", row.operator, row.claimed, csrf_token(cookie), key)

    def end(self, key: str) -> None:
        """Sign a session out: its cookie opens nothing from now on, on every replica."""
        with self._engine.begin() as connection:
            connection.execute(delete(_sessions).where(_sessions.c.id_hash == key))
