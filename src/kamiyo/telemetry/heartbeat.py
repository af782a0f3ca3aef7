"""Worker heartbeats: a row per running worker, so health checks and doctor can tell one is alive."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from typing import Any

from sqlalchemy import Engine, delete
from sqlalchemy.dialects import postgresql, sqlite

from kamiyo.db.models import worker_heartbeats_table

log = logging.getLogger("kamiyo.worker")
_beats = worker_heartbeats_table
BEAT_SECONDS = 5.0
_FORGET_SECONDS = 24 * 3600.0


class Heartbeat:
    """Upserts this worker's row at most every ``BEAT_SECONDS``; never lets a database error out."""

    def __init__(self, engine: Engine, *, interval: float = BEAT_SECONDS) -> None:
        self._engine = engine
        self._interval = interval
        self.host = socket.gethostname()[:255]
        self.pid = os.getpid()
        self.worker_id = f"{self.host[:80]}:{self.pid}:{secrets.token_hex(4)}"
        self.started_at = time.time()
        self._last = 0.0

    def beat(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        if now - self._last < self._interval:
            return
        self._last = now
        row = {
            "worker_id": self.worker_id,
            "host": self.host,
            "pid": self.pid,
            "started_at": self.started_at,
            "seen_at": now,
        }
        try:
            with self._engine.begin() as connection:
                dialect: Any = postgresql if connection.dialect.name == "postgresql" else sqlite
                stmt = dialect.insert(_beats).values(row)
                connection.execute(stmt.on_conflict_do_update(index_elements=["worker_id"], set_={"seen_at": now}))
                # Rows of workers gone for a day tell nothing any more.
                connection.execute(delete(_beats).where(_beats.c.seen_at < now - _FORGET_SECONDS))
        except Exception as exc:  # noqa: BLE001 - a heartbeat must never stop the worker
            log.warning("worker heartbeat not recorded: %s", exc.__class__.__name__)

    def stop(self) -> None:
        """Remove this worker's row: it is no longer applying events."""
        try:
            with self._engine.begin() as connection:
                connection.execute(delete(_beats).where(_beats.c.worker_id == self.worker_id))
        except Exception as exc:  # noqa: BLE001 - best effort at shutdown; the row goes stale anyway
            log.warning("worker heartbeat not removed: %s", exc.__class__.__name__)
