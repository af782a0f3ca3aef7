"""The ``kamiyo`` command line, run as an operator runs it, against a real server and database."""

from __future__ import annotations

import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from e2e.harness import KamiyoServer, ServerFactory, free_port, kamiyo_command, wait_until
from kamiyo import synthetic
from support import PRICE_TIERS, SECRET

WRONG_SECRET = "whsec_wrong_0000000000000000000000"
FIRST_PRICE, FIRST_TIER = PRICE_TIERS.split(",")[0].split("=")  # what `kamiyo trigger` subscribes to


@pytest.fixture(scope="module")
def server(module_servers: ServerFactory) -> KamiyoServer:
    return module_servers("sqlite")


def _event_id(output: str) -> str:
    found = re.search(r"\b(evt_\w+)", output)
    assert found, output
    return found.group(1)


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


# -- help --------------------------------------------------------------------------------------


HELP_COMMANDS = [
    [],
    ["serve"],
    ["worker"],
    ["db"],
    ["db", "upgrade"],
    ["db", "current"],
    ["events"],
    ["events", "list"],
    ["events", "show"],
    ["replay"],
    ["trigger"],
    ["users"],
    ["users", "set-tier"],
    ["users", "clear-override"],
    ["users", "show"],
    ["users", "drift"],
    ["audit"],
    ["prune"],
    ["sync"],
    ["backfill"],
    ["doctor"],
    ["incident-report"],
    ["completion"],
]


def test_help_of_every_command_exits_0_with_usage(tmp_path: Path) -> None:
    """`kamiyo --help` and `kamiyo SUBCOMMAND --help`, for every subcommand (run side by side)."""

    def run(command: list[str]) -> tuple[list[str], subprocess.CompletedProcess[str]]:
        argv = [*kamiyo_command(), *command, "--help"]
        return command, subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, HELP_COMMANDS))
    for command, result in results:
        assert result.returncode == 0, (command, result.stderr)
        # Click writes "Usage:" where argparse wrote "usage:".
        assert result.stdout.lower().startswith("usage: kamiyo " + " ".join(command)), (command, result.stdout)


# -- trigger: the offline `stripe trigger` ----------------------------------------------------


@pytest.mark.slow
def test_trigger_payment_intent_succeeded_exits_0_and_the_event_is_stored(server: KamiyoServer) -> None:
    out = _ok(server.cli("trigger", "payment_intent.succeeded", "--url", server.webhook_url, "--secret", SECRET))
    assert " -> 200 " in out
    event_id = _event_id(out)
    assert server.stored_count(event_id) == 1
    wait_until(lambda: server.event_status(event_id) == "applied", what=f"{event_id} applied")
    # The runbook's verification: `docker logs kamiyo --tail=10 | grep webhook` shows the processing.
    # The server writes its lines on a thread of its own, right after the answer at the latest.
    server.wait_for_log("webhook accepted", event_id)
    wait_until(lambda: server.log_lines("webhook event applied", event_id), what="the applied log line")


def test_trigger_takes_the_services_base_url_as_doctor_does(server: KamiyoServer) -> None:
    base = server.webhook_url.removesuffix("/api/v1/payments/webhook")
    out = _ok(server.cli("trigger", "payment_intent.succeeded", "--url", base + "/", "--secret", SECRET))
    assert " -> 200 " in out
    assert server.stored_count(_event_id(out)) == 1


@pytest.mark.slow
def test_runbook_trigger_without_options_uses_port_and_secret_from_the_environment(server: KamiyoServer) -> None:
    """The runbook's bare `stripe trigger payment_intent.succeeded`: defaults reach the local endpoint."""
    out = _ok(server.cli("trigger", "payment_intent.succeeded"))
    assert server.stored_count(_event_id(out)) == 1


@pytest.mark.slow
def test_trigger_with_wrong_secret_exits_nonzero_and_stores_nothing(server: KamiyoServer) -> None:
    result = server.cli("trigger", "payment_intent.succeeded", "--url", server.webhook_url, "--secret", WRONG_SECRET)
    assert result.returncode != 0
    assert "-> 400" in result.stdout
    assert server.stored_count(_event_id(result.stdout)) == 0
    assert server.wait_for_log("webhook", "Webhook validation failed", "Invalid signature")


@pytest.mark.slow
def test_trigger_against_a_closed_port_exits_nonzero(server: KamiyoServer) -> None:
    url = f"http://127.0.0.1:{free_port()}/api/v1/payments/webhook"
    result = server.cli("trigger", "payment_intent.succeeded", "--url", url, "--secret", SECRET)
    assert result.returncode != 0
    assert "cannot reach" in result.stderr


@pytest.mark.slow
def test_trigger_of_an_unknown_type_exits_nonzero_naming_the_supported_ones(server: KamiyoServer) -> None:
    result = server.cli("trigger", "charge.refunded", "--url", server.webhook_url)
    assert result.returncode != 0
    assert "customer.subscription.created" in result.stderr


@pytest.mark.slow
def test_trigger_subscription_then_invoice_for_one_customer_lands_the_tier(server: KamiyoServer) -> None:
    """`trigger customer.subscription.created` + `invoice.payment_succeeded`, same --customer and --email."""
    customer = synthetic.new_id("cus")
    email = f"Cli.{customer}@Example.com"
    for event_type in ("customer.subscription.created", "invoice.payment_succeeded"):
        _ok(server.cli("trigger", event_type, "--customer", customer, "--email", email, "--url", server.webhook_url))
    server.wait_for_user(email, (FIRST_TIER, "active"))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_trigger_builds_events_in_the_services_stripe_mode(servers: ServerFactory) -> None:
    """A live service (STRIPE_MODE=live): the triggered events are live-mode ones, and it applies them."""
    server = servers("sqlite", STRIPE_MODE="live")
    customer = synthetic.new_id("cus")
    email = f"live.{customer}@example.com"
    for event_type in ("customer.subscription.created", "invoice.payment_succeeded"):
        _ok(server.cli("trigger", event_type, "--customer", customer, "--email", email))
    server.wait_for_user(email, (FIRST_TIER, "active"))
    assert server.rows("SELECT DISTINCT livemode, status FROM webhook_events") == [(True, "applied")]


# -- events and replay -------------------------------------------------------------------------


@pytest.mark.slow
def test_events_list_shows_stored_events_and_filters_by_status_and_type(server: KamiyoServer) -> None:
    event_id = _event_id(_ok(server.cli("trigger", "customer.created", "--url", server.webhook_url)))
    wait_until(lambda: server.event_status(event_id) == "applied", what=f"{event_id} applied")
    listing = _ok(server.cli("events", "list"))
    assert listing.splitlines()[0].split() == ["received", "status", "tries", "event", "type"]
    line = next(line for line in listing.splitlines() if event_id in line)
    assert "applied" in line
    assert "customer.created" in line
    assert event_id in _ok(server.cli("events", "list", "--status", "applied", "--type", "customer.created"))
    assert event_id not in _ok(server.cli("events", "list", "--status", "failed", "--type", "customer.created"))


@pytest.mark.slow
def test_events_show_prints_status_and_payload_of_one_event(server: KamiyoServer) -> None:
    event_id = _event_id(_ok(server.cli("trigger", "invoice.payment_failed", "--url", server.webhook_url)))
    shown = _ok(server.cli("events", "show", event_id))
    assert re.search(rf"stripe_event_id: {event_id}$", shown, re.MULTILINE)
    assert re.search(r"type: invoice.payment_failed$", shown, re.MULTILINE)
    assert '"object": "invoice"' in shown  # the payload, pretty-printed


@pytest.mark.slow
@pytest.mark.parametrize("command", [["events", "show"], ["replay"]])
def test_events_show_and_replay_of_an_unknown_event_exit_nonzero(server: KamiyoServer, command: list[str]) -> None:
    result = server.cli(*command, "evt_never_received")
    assert result.returncode != 0
    assert "no event evt_never_received" in result.stderr


@pytest.mark.slow
def test_replay_by_id_applies_the_event_again(server: KamiyoServer) -> None:
    event_id = _event_id(_ok(server.cli("trigger", "customer.created", "--url", server.webhook_url)))

    def processed_at() -> object:
        return server.rows("SELECT processed_at FROM webhook_events WHERE stripe_event_id = :id", id=event_id)[0][0]

    first = wait_until(processed_at, what=f"{event_id} processed")
    assert "1 event(s) replayed: 1 applied" in _ok(server.cli("replay", event_id))
    wait_until(lambda: processed_at() not in (None, first), what=f"{event_id} applied again")
    assert server.event_status(event_id) == "applied"


@pytest.mark.slow
def test_replay_failed_applies_a_parked_event_once_the_price_is_configured(servers: ServerFactory) -> None:
    """An unmapped price parks the event as failed (naming the price); fix the config, `replay --failed`."""
    server = servers("sqlite")
    customer, sub_id = synthetic.new_id("cus"), synthetic.new_id("sub")
    email = f"parked.{customer}@example.com"
    sub = synthetic.subscription(sub_id=sub_id, customer_id=customer, price_obj=synthetic.price("price_legacy_gold"))
    parked = synthetic.event("customer.subscription.created", sub)
    invoice = synthetic.event(
        "invoice.payment_succeeded", synthetic.invoice(customer_id=customer, sub_id=sub_id, email=email)
    )
    for event in (parked, invoice):
        assert server.deliver(event).status_code == 200
    wait_until(lambda: server.event_status(parked["id"]) == "failed", what="the unmapped price to be parked")
    failed = _ok(server.cli("events", "list", "--status", "failed"))
    assert parked["id"] in failed
    assert "price_legacy_gold" in failed
    server.wait_for_user(email, ("free", None))

    server.restart(STRIPE_PRICE_TIERS=PRICE_TIERS + ",price_legacy_gold=enterprise")
    assert "1 event(s) replayed: 1 applied" in _ok(server.cli("replay", "--failed", "--yes"))
    server.wait_for_user(email, ("enterprise", "active"))
    assert server.event_status(parked["id"]) == "applied"
    assert "0 event(s) replayed" in _ok(server.cli("replay", "--failed"))


# -- configuration errors ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PORT", "abc"),
        ("PORT", "70000"),
        ("WEBHOOK_MAX_BODY_BYTES", "1MB"),
        ("STRIPE_PRICE_TIERS", "price_basic"),
        ("DATABASE_URL", "mysql://db/kamiyo"),
    ],
)
def test_malformed_setting_makes_serve_exit_nonzero_naming_it(tmp_path: Path, name: str, value: str) -> None:
    server = KamiyoServer(tmp_path, f"sqlite:///{tmp_path / 'kamiyo.db'}")
    result = server.cli("serve", timeout=30, **{name: value})
    assert result.returncode != 0
    assert name in result.stderr
    assert "Uvicorn running" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("value", [f" {SECRET}", f'"{SECRET}"', "sk_live_not_a_webhook_secret"], ids=str.strip)
def test_malformed_secret_makes_serve_exit_nonzero_without_echoing_it(tmp_path: Path, value: str) -> None:
    """A pasted secret with a stray space, newline or quotes fails at start; the message never shows it."""
    server = KamiyoServer(tmp_path, f"sqlite:///{tmp_path / 'kamiyo.db'}")
    result = server.cli("serve", timeout=30, STRIPE_WEBHOOK_SECRET=value)
    assert result.returncode != 0
    assert "STRIPE_WEBHOOK_SECRET" in result.stderr
    assert value.strip(' \n"').removeprefix("whsec_") not in result.stderr + result.stdout


@pytest.mark.slow
def test_serve_on_an_unmigrated_database_exits_nonzero_asking_for_db_upgrade(tmp_path: Path) -> None:
    server = KamiyoServer(tmp_path, f"sqlite:///{tmp_path / 'kamiyo.db'}")
    result = server.cli("serve", timeout=30)
    assert result.returncode != 0
    assert "kamiyo db upgrade" in result.stderr
