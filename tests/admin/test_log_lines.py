"""What the admin API logs from a request cannot forge a log line (kamiyo/logs.py cleans each line)."""

from __future__ import annotations

import pytest

from admin.app_client import Console
from kamiyo.logs import configure_logging

FORGED = "2026-01-01T00:00:00+0000 INFO kamiyo.admin admin replay actor=api:alice"


def test_a_replay_type_holding_a_newline_is_refused_and_forges_no_line(
    console: Console, capsys: pytest.CaptureFixture[str]
) -> None:
    """An event type is letters, digits, '.', '_' and '-': a newline never reaches the log at all.

    That every log line is escaped whatever it holds is tested through a refused path, with the
    same formatter (test_admin_hostile.py, the 401 line)."""
    configure_logging("INFO")
    response = console.post(
        "/admin/api/replay", {"type": f"invoice.paid\n{FORGED}\u2028\x1b[2J", "dry_run": True, "reason": "test"}
    )
    assert response.status_code == 400, response.text
    assert "type must be an event type" in response.json()["error"]
    lines = capsys.readouterr().err.splitlines()
    assert not any(line.startswith(FORGED) for line in lines)
    assert not any("\x1b" in line or "\u2028" in line for line in lines)
