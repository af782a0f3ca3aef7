"""Sign-in throttling: wrong admin tokens per client address, shared by every ``kamiyo serve``.

A fixed window per address (``admin_sign_in_failures``): each wrong token, from the sign-in form
or a Bearer header, counts; once ``max_failures`` are counted in the current window, every token
from that address (right or wrong) is refused with 429 and ``Retry-After`` until the window
ends. The count is one upsert, atomic on both databases, so replicas never lose a failure.

The address is the connection's peer, or the client named in ``X-Forwarded-For`` when the peer
is a trusted proxy (uvicorn's ``forwarded_allow_ips``, the ``FORWARDED_ALLOW_IPS`` setting).
"""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy import Engine, case, delete, select
from sqlalchemy.dialects import postgresql, sqlite

from kamiyo.db.models import admin_sign_in_failures_table

_failures = admin_sign_in_failures_table
_PRUNE_BATCH = 100  # windows long over, deleted with each failure, at most
_MAX_CLIENT = 64


class SignInThrottle:
    """At most ``max_failures`` wrong tokens per client address in ``window_seconds``."""

    def __init__(self, engine: Engine, *, max_failures: int, window_seconds: int) -> None:
        self._engine = engine
        self.max_failures = max_failures
        self.window_seconds = window_seconds

    def retry_after(self, client: str, now: float) -> int | None:
        """Seconds until ``client`` may try a token again, or None when it may now."""
        with self._engine.connect().execution_options(readonly=True) as connection:
            row = connection.execute(
                select(_failures.c.window_start, _failures.c.failures).where(_failures.c.client == client[:_MAX_CLIENT])
            ).first()
        if row is None or row.failures < self.max_failures:
            return None
        ends = row.window_start + self.window_seconds
        return math.ceil(ends - now) if ends > now else None

    def failed(self, client: str, now: float) -> int:
        """Count one wrong token from ``client``; returns the failures counted in its window."""
        start = int(now)
        cutoff = start - self.window_seconds
        with self._engine.begin() as connection:
            dialect: Any = postgresql if connection.dialect.name == "postgresql" else sqlite
            stmt = dialect.insert(_failures).values(client=client[:_MAX_CLIENT], window_start=start, failures=1)
            over = _failures.c.window_start <= cutoff  # the stored window has ended: a new one starts
            stmt = stmt.on_conflict_do_update(
                index_elements=["client"],
                set_={
                    "window_start": case((over, start), else_=_failures.c.window_start),
                    "failures": case((over, 1), else_=_failures.c.failures + 1),
                },
            ).returning(_failures.c.failures)
            counted = int(connection.execute(stmt).scalar_one())
            old = select(_failures.c.client).where(_failures.c.window_start <= cutoff).limit(_PRUNE_BATCH)
            connection.execute(delete(_failures).where(_failures.c.client.in_(old.scalar_subquery())))
        return counted
