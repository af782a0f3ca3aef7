"""kill -9 while deliveries are in flight: every acknowledged event is durable and takes effect."""

from __future__ import annotations

import random
import re
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import httpx
import pytest

from e2e.harness import WEBHOOK_PATH, KamiyoServer, ServerFactory, wait_until
from kamiyo import synthetic
from support import signed

pytestmark = pytest.mark.slow

CUSTOMERS = 150  # two events each: 300 deliveries, plus some duplicates
DUPLICATES = 20
KILL_AFTER_ACKS = 100
CONCURRENCY = 16


def _history(count: int) -> tuple[list[dict], dict[str, tuple[str, str, str]]]:
    """Per customer: subscription created (pro), then the paid invoice naming the email."""
    events: list[dict] = []
    owners: dict[str, tuple[str, str, str]] = {}  # event id -> (customer, email, kind)
    now = int(time.time())
    for n in range(count):
        customer, sub_id = synthetic.new_id("cus"), synthetic.new_id("sub")
        email = f"crash{n}.{customer}@example.com"
        sub = synthetic.subscription(
            sub_id=sub_id, customer_id=customer, price_obj=synthetic.price("price_pro_monthly")
        )
        inv = synthetic.invoice(customer_id=customer, sub_id=sub_id, email=email)
        for kind, event in (
            ("subscription", synthetic.event("customer.subscription.created", sub, created=now - 1)),
            ("invoice", synthetic.event("invoice.payment_succeeded", inv, created=now)),
        ):
            events.append(event)
            owners[event["id"]] = (customer, email, kind)
    return events, owners


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_every_acknowledged_event_survives_kill_9_and_applies_after_restart(
    servers: ServerFactory, backend: str
) -> None:
    server = servers(backend)
    events, owners = _history(CUSTOMERS)
    rng = random.Random(1)
    deliveries = events + rng.sample(events, DUPLICATES)  # Stripe retries: same event, fresh signature
    rng.shuffle(deliveries)

    acked, statuses, transport_errors = _deliver_and_kill(server, deliveries)

    assert KILL_AFTER_ACKS <= len(acked) < len(events), "the kill must land while deliveries are in flight"
    assert transport_errors, "some deliveries should have failed against the killed server"
    assert set(statuses) == {200}, f"before the kill every answer is a 200, got {statuses}"

    # Durable before anything else runs: read the database of the dead server.
    stored = {row[0] for row in server.rows("SELECT stripe_event_id FROM webhook_events")}
    assert acked <= stored, f"{len(acked - stored)} acknowledged event(s) were lost"
    # The dead server's inbox writer process stores what it was sent, then exits by itself.
    writer = re.search(r"inbox writer process (\d+) started", server.log())
    assert writer is not None, "the server names its inbox writer process"
    wait_until(lambda: not _running(int(writer[1])), timeout=30, what="the orphaned inbox writer to exit")

    server.start()
    ids = list(acked)
    wait_until(
        lambda: all(server.event_status(event_id) == "applied" for event_id in ids),
        timeout=30,
        what="every acknowledged event to be applied after restart",
    )
    customers: dict[str, set[str]] = {}
    for event_id in acked:
        customer, _email, kind = owners[event_id]
        customers.setdefault(customer, set()).add(kind)
    emails = {owner[0]: owner[1] for owner in owners.values()}
    complete = [c for c, kinds in customers.items() if kinds == {"subscription", "invoice"}]
    assert complete, "some customer should have had both events acknowledged"
    for customer in complete:
        server.wait_for_user(emails[customer], ("pro", "active"), timeout=5)
    for customer, kinds in customers.items():
        if "invoice" in kinds:  # the invoice names the email: the user exists whatever else arrived
            assert server.user(emails[customer]) is not None


def _deliver_and_kill(server: KamiyoServer, deliveries: list[dict]) -> tuple[set[str], list[int], list[str]]:
    """POST concurrently; SIGKILL the server as the KILL_AFTER_ACKS-th acknowledgement arrives."""
    acked: set[str] = set()
    statuses: list[int] = []
    errors: list[str] = []
    deadline = time.monotonic() + 60
    with (
        httpx.Client(base_url=server.url, timeout=10) as client,
        ThreadPoolExecutor(max_workers=CONCURRENCY) as pool,
    ):

        def post(event: dict) -> tuple[str, int]:
            if time.monotonic() > deadline:
                raise TimeoutError("delivery budget exhausted")
            body, headers = signed(event)
            return event["id"], client.post(WEBHOOK_PATH, content=body, headers=headers).status_code

        futures = [pool.submit(post, event) for event in deliveries]
        for future in as_completed(futures):
            try:
                event_id, status = future.result()
            except (httpx.TransportError, TimeoutError) as exc:
                errors.append(exc.__class__.__name__)
                continue
            statuses.append(status)
            if 200 <= status < 300:
                acked.add(event_id)
                if len(acked) == KILL_AFTER_ACKS:
                    server.kill()
    return acked, sorted(set(statuses)), errors


def _running(pid: int) -> bool:
    """The process exists and is not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
