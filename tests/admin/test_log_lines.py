"""What the admin API logs from a request cannot forge a log line (kamiyo/logs.py cleans each line)."""

from __future__ import annotations

import pytest

from admin.app_client import Console
from kamiyo.logs import configure_logging

FORGED = "2026-01-01T00:00:00+0000 INFO kamiyo.admin admin replay actor=api:alice"


def test_a_replay_type_holding_a_newline_stays_inside_its_own_line(
    console: Console, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("INFO")
    response = console.post(
        "/admin/api/replay", {"type": f"invoice.paid\n{FORGED}\u2028\x1b[2J", "dry_run": True, "reason": "test"}
    )
    assert response.status_code == 200, response.text
    lines = capsys.readouterr().err.splitlines()
    replay_lines = [line for line in lines if "admin replay" in line]
    assert len(replay_lines) == 1
    assert f"type=invoice.paid\\n{FORGED}\\u2028\\x1b[2J" in replay_lines[0]
    assert not any(line.startswith(FORGED) for line in lines)
