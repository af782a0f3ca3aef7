"""One greppable line per event worth telling: ``time level logger message``."""

from __future__ import annotations

import logging
import sys


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s", "%Y-%m-%dT%H:%M:%S%z"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # stripe: a line per API request at INFO, and whole response bodies (customers' emails) at DEBUG.
    for noisy in ("uvicorn.access", "alembic.runtime.plugins", "stripe"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
