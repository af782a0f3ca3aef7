"""``kamiyo doctor`` and ``kamiyo incident-report``: diagnose the running service; document an incident."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

import click

from kamiyo.cli.invocation import OK, PROBLEM, ConfigurationProblem, json_option, load, with_settings
from kamiyo.cli.output import console, drawn, print_json
from kamiyo.errors import KamiyoError

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from kamiyo.config import Settings
    from kamiyo.diagnosis.doctor import Diagnosis


@click.command(
    short_help="diagnose the running service as the runbook does; name the option",
    help="Diagnose the running service as the runbook's Diagnosis Steps do, and name the recovery option. "
    "Exit 0 when healthy, 1 when something needs doing.",
)
@click.option("--url", help="the service's base URL (default: http://127.0.0.1:PORT)")
@json_option
@click.option("--apply-timeout", type=float, default=15.0, show_default=True, help="seconds to wait for the test event")
def doctor(url: str | None, as_json: bool, apply_timeout: float) -> int:
    try:
        settings = load()
    except ConfigurationProblem as exc:  # a malformed setting is exactly what doctor must report
        return _unconfigured(exc, url=url, as_json=as_json)
    from kamiyo.diagnosis.doctor import Doctor
    from kamiyo.diagnosis.stripe_view import stripe_view

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


def _unconfigured(error: KamiyoError, *, url: str | None, as_json: bool) -> int:
    """doctor when the settings themselves do not load: say which, and still probe the endpoint."""
    from kamiyo.config import Settings
    from kamiyo.diagnosis.doctor import FAIL, Doctor, Finding

    port = os.environ.get("PORT", "").strip()
    url = url or f"http://127.0.0.1:{port if port.isdigit() else 8000}"
    secret = "STRIPE_WEBHOOK_SECRET" in str(error)
    diagnosis = Doctor(Settings(), url=url, engine=None, db_error="settings do not load").run()
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


def _open_database(settings: Settings) -> tuple[Engine | None, str]:
    """An engine on the service's database, or why there is none. Never creates a SQLite file."""
    from pathlib import Path

    from sqlalchemy.engine import make_url

    from kamiyo.db.engine import make_engine

    url = make_url(settings.database_url)
    file = url.database if url.get_backend_name() == "sqlite" and url.database != ":memory:" else None
    if file and not Path(file).is_file():
        return None, f"SQLite database {file} does not exist"
    return make_engine(settings), ""


def _print(diagnosis: Diagnosis, as_json: bool) -> int:
    if as_json:
        print_json(diagnosis.to_json())
    elif drawn(sys.stdout):
        _draw(diagnosis)
    else:
        print(diagnosis.to_text())
    return OK if diagnosis.healthy else PROBLEM


_STYLES = {"ok": "green", "warn": "yellow", "fail": "bold red", "skipped": "dim"}


def _draw(diagnosis: Diagnosis) -> None:
    """``Diagnosis.to_text()``'s lines, each status and the verdict in its colour."""
    from rich.text import Text

    from kamiyo.diagnosis.doctor import FAIL

    out = console()
    text = diagnosis.to_text().split("\n")
    marks = {"[ok  ]": "ok", "[warn]": "warn", "[FAIL]": "fail", "[skip]": "skipped"}
    for line in text:
        styled = Text(line)
        mark = marks.get(line[:6])
        if mark:
            styled.stylize(_STYLES[mark], 0, 6)
        elif line.startswith("Verdict:"):
            verdict = diagnosis.verdict
            styled.stylize("bold red" if verdict is not None and verdict.status == FAIL else "bold green")
        out.print(styled, soft_wrap=True)


@click.command(
    name="incident-report",
    short_help="document failed webhooks and the recovery (from the database)",
    help="Document failed webhooks and the recovery, from the database: markdown, or JSON with --json "
    "(or --format json).",
)
@click.option("--since", required=True, help="2h, 1d (ago), 2026-11-27T10:00 (UTC) or Unix seconds")
@click.option("--until", default="now", show_default=True, help="end of the range")
@click.option(
    "--format", "fmt", type=click.Choice(("md", "json")), default="md", show_default=True, help="markdown or JSON"
)
@json_option
@with_settings
def incident_report_command(settings: Settings, since: str, until: str, fmt: str, as_json: bool) -> int:
    return incident_report(settings, since=since, until=until, fmt="json" if as_json else fmt)


def incident_report(settings: Settings, *, since: str, until: str, fmt: str) -> int:
    from datetime import UTC, datetime

    from kamiyo.diagnosis.incident_report import build_report, parse_time, to_json, to_markdown

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
    return OK
