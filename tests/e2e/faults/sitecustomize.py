"""Fault injection for test servers: SQLite's ``max_page_count`` on every connection they use.

Python imports ``sitecustomize`` at start from the first folder of ``sys.path`` that has one, so
a ``kamiyo serve`` (and its writer process) started with this folder on ``PYTHONPATH`` loads it;
nothing else does. ``max_page_count`` is a setting of each connection, not of the database
file, hence a hook in the server's own processes. With ``KAMIYO_TEST_MAX_PAGES_FILE`` set, each
connection taken from a pool reads the limit from that file (empty or absent: no limit): a
database that may not grow refuses new pages with SQLITE_FULL, as a full disk does, without
root and without filling a disk.
"""

from __future__ import annotations

import os
from typing import Any

_PATH = os.environ.get("KAMIYO_TEST_MAX_PAGES_FILE")
_UNLIMITED = 1073741823  # SQLite's default

if _PATH:
    from sqlalchemy import event
    from sqlalchemy.pool import Pool

    def _limit_pages(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        if type(dbapi_connection).__module__ != "sqlite3":
            return
        try:
            with open(_PATH, encoding="ascii") as limit:
                pages = int(limit.read().strip() or 0)
        except (OSError, ValueError):
            pages = 0
        dbapi_connection.execute(f"PRAGMA max_page_count={pages or _UNLIMITED}")

    event.listen(Pool, "checkout", _limit_pages)
