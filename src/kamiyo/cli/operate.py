"""What ``kamiyo doctor`` and ``kamiyo incident-report`` do. Imported lazily by main."""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime
from pathlib import Path

import orjson
from sqlalchemy import Engine
from sqlalchemy.engine import make_url

from kamiyo.config import Settings
from kamiyo.db.engine import make_engine
from kamiyo.diagnosis.doctor import FAIL, Diagnosis, Doctor, Finding
from kamiyo.diagnosis.incident_report import build_report, parse_time, to_json, to_markdown
from kamiyo.diagnosis.stripe_view import stripe_view
from kamiyo.errors import KamiyoError


def _open_database(settings: Settings) -> tuple[Engine | None, str]:
    """An engine on the service's database, or why there is none. Never creates a SQLite file."""
    url = make_url(settings.database_url)
    file = url.database if url.get_backend_name() == "sqlite" and url.database != ":memory:" else None
    if file and not Path(file).is_file():
        return None, f"SQLite database {file} does not exist"
    return make_engine(settings), ""


def _print(diagnosis: Diagnosis, as_json: bool) -> int:
    if as_json:
        print(orjson.dumps(diagnosis.to_json(), option=orjson.OPT_INDENT_2).decode())
    else:
        print(diagnosis.to_text())
    return 0 if diagnosis.healthy else 1


def doctor(settings: Settings, *, url: str | None, as_json: bool, apply_timeout: float = 15.0) -> int:
    """Exit 0 when healthy, 1 when something needs doing."""
    url = url or f"http://127.0.0.1:{settings.port}"
    if not url.startswith(("http://", "https://")):
        raise KamiyoError(f"--url must be an http:// or https:// URL, got {url!r}")
    engine, db_error = _open_database(settings)
    try:
        diagnosis = Doctor(
            settings,
            url=url,
            engine=engine,
            stripe=stripe_view(settings),
            db_error=db_error,
            apply_timeout=apply_timeout,
        ).run()
    finally:
        if engine is not None:
            engine.dispose()
    return _print(diagnosis, as_json)


def doctor_unconfigured(error: KamiyoError, *, url: str | None, as_json: bool) -> int:
    """doctor when the settings themselves do not load: say which, and still probe the endpoint."""
    port = os.environ.get("PORT", "").strip()
    url = url or f"http://127.0.0.1:{port if port.isdigit() else 8000}"
    secret = "STRIPE_WEBHOOK_SECRET" in str(error)
    settings = Settings()
    diagnosis = Doctor(settings, url=url, engine=None, db_error="settings do not load").run()
    diagnosis.findings.insert(
        0,
        Finding(
            "Step 2: configuration" if secret else "Configuration",
            FAIL,
            f"this environment's settings do not load: {error}",
            "fix the value (no quotes or spaces around whsec_...), then restart" if secret else "fix the value",
            option=2 if secret else None,
            cause="config_invalid",
        ),
    )
    return _print(diagnosis, as_json)


def incident_report(settings: Settings, *, since: str, until: str, fmt: str) -> int:
    now = datetime.now(UTC)
    start, end = parse_time(since, now=now), parse_time(until, now=now)
    engine, db_error = _open_database(settings)
    if engine is None:
        raise KamiyoError(db_error)
    try:
        report = build_report(engine, start, end)
    finally:
        engine.dispose()
    sys.stdout.write((to_json(report) if fmt == "json" else to_markdown(report)) + "\n")
    return 0
