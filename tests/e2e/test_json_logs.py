"""LOG_FORMAT=json on a real ``kamiyo serve`` (its server and its inbox writer process share one
stderr): every line of the log is one JSON object of at most PIPE_BUF bytes, with the delivery's,
the rejection's, the applied event's and the user change's fields as keys, and no secret."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest

from e2e.harness import KamiyoServer, ServerFactory, wait_until
from kamiyo import synthetic
from support import SECRET

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

WRONG_SECRET = "whsec_wrong_0000000000000000000000"
PIPE_BUF = 4096
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
# Characters that end a line for some reader or drive a terminal: none may reach the log raw.
RAW = ("\r", "\x00", "\x1b", "\x7f", "\x85", "\u2028", "\u2029")


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def server(request: pytest.FixtureRequest, module_servers: ServerFactory) -> KamiyoServer:
    return module_servers(request.param, LOG_FORMAT="json")


def _records(server: KamiyoServer) -> list[dict[str, Any]]:
    """Every line of the log, parsed: each must be a whole JSON object of the service's shape."""
    raw = server.log_path.read_bytes()
    assert raw.endswith(b"\n")
    records = []
    for line in raw.decode("utf-8").split("\n")[:-1]:
        assert len(line.encode()) + 1 <= PIPE_BUF, line[:200]
        for char in RAW:
            assert char not in line, f"raw {char!r} in {line!r}"
        record = json.loads(line)
        assert isinstance(record, dict), line
        assert TIME.fullmatch(record["time"]), line
        assert record["level"] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"), line
        assert isinstance(record["logger"], str), line
        assert isinstance(record["message"], str), line
        records.append(record)
    return records


def _one(records: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    found = [r for r in records if all(r.get(key) == value for key, value in fields.items())]
    assert len(found) == 1, f"{len(found)} records with {fields}"
    return found[0]


def test_a_good_and_a_badly_signed_delivery_are_logged_as_json_with_their_fields(server: KamiyoServer) -> None:
    customer_id, email = synthetic.new_id("cus"), f"json-{time.time_ns()}@example.com"
    sub_id = synthetic.new_id("sub")
    sub = synthetic.subscription(sub_id=sub_id, customer_id=customer_id, price_obj=synthetic.price("price_pro_monthly"))
    invoice = synthetic.invoice(customer_id=customer_id, sub_id=sub_id, email=email)
    now = int(time.time())
    good = [
        synthetic.event("customer.subscription.created", sub, created=now - 1),
        synthetic.event("invoice.payment_succeeded", invoice, created=now),
    ]
    for event in good:
        assert server.deliver(event).status_code == 200
    bad = synthetic.event("customer.subscription.updated", sub)
    rejected = server.deliver(bad, secret=WRONG_SECRET)
    assert rejected.status_code == 400
    assert rejected.json()["reason"] == "invalid_signature"
    hostile = synthetic.event("customer.created", synthetic.customer(customer_id=customer_id, email=email))
    hostile["type"] = 'customer.created\n{"level":"CRITICAL"}\u2028\x1b[2K'
    assert server.deliver(hostile).status_code == 200

    server.wait_for_user(email, ("pro", "active"))
    server.wait_for_log('"reason":"invalid_signature"')
    server.wait_for_log('"event":"' + hostile["id"] + '"')
    for event in good:
        server.wait_for_log('"message":"webhook event applied event=' + event["id"])

    records = _records(server)
    for event in good:
        accepted = _one(records, logger="kamiyo.webhook", outcome="accepted", event=event["id"])
        assert (accepted["level"], accepted["type"]) == ("INFO", event["type"])
        assert accepted["message"] == f"webhook accepted event={event['id']} type={event['type']}"
        applied = _one(records, logger="kamiyo.worker", event=event["id"])
        assert applied["message"].startswith(f"webhook event applied event={event['id']} type={event['type']}")
        assert applied["type"] == event["type"]
    change = _one(records, logger="kamiyo.state", email=email)
    assert (change["tier_to"], change["status_to"]) == ("pro", "active")
    assert isinstance(change["user_id"], int)

    refused = _one(records, logger="kamiyo.webhook", reason="invalid_signature")
    assert refused["level"] == "WARNING"
    # The runbook greps these words: they stay in the message.
    assert "Webhook validation failed" in refused["message"]
    assert refused["message"].startswith("webhook rejected reason=invalid_signature: ")
    assert refused["error"] in refused["message"]
    assert not any(r.get("event") == bad["id"] for r in records)

    forged = _one(records, logger="kamiyo.webhook", event=hostile["id"])
    assert forged["type"] == 'customer.created\\n{"level":"CRITICAL"}\\u2028\\x1b[2K'
    assert not any(r["level"] == "CRITICAL" for r in records)

    # uvicorn's own lines are JSON too; no secret anywhere.
    assert any(r["logger"].startswith("uvicorn") for r in records)
    log = server.log()
    assert SECRET not in log
    assert WRONG_SECRET not in log


def test_a_command_logs_json_too(server: KamiyoServer) -> None:
    """``kamiyo replay`` (the CLI's own process) writes its lines as JSON with their fields."""
    sub = synthetic.subscription(
        sub_id=synthetic.new_id("sub"), customer_id=synthetic.new_id("cus"), price_obj=synthetic.price("price_basic")
    )
    event = synthetic.event("customer.subscription.created", sub)
    assert server.deliver(event).status_code == 200
    wait_until(lambda: server.event_status(event["id"]) == "applied", what="the event applied")
    result = server.cli("replay", event["id"], "--yes")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    records = [json.loads(line) for line in lines]
    replayed = _one(records, logger="kamiyo.operations", event=event["id"])
    assert (replayed["type"], replayed["status_from"], replayed["status_to"]) == (event["type"], "applied", "applied")
