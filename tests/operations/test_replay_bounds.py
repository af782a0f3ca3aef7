"""Replay's bounds and its dry run on a snapshot (SQLite and PostgreSQL).

Every replay and dry run takes at most a limit of events (a default, a maximum, ``after`` to
continue). A dry run of many events leaves the database as it was, shows exactly what applying
then does, each event seeing what the ones before it would have done, and holds no lock that a
delivery, a worker or an operator would wait for.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Engine, select

from integration.conftest import Harness
from kamiyo import synthetic
from kamiyo.db.models import Base
from kamiyo.domain.outcomes import Outcome
from kamiyo.domain.tiers import parse_price_tiers
from kamiyo.errors import KamiyoError
from kamiyo.operations.overrides import set_override
from kamiyo.operations.replay import ReplayResult, count_selected, replay_events
from kamiyo.processing import worker as worker_module
from support import PRICE_TIERS

GOLD = synthetic.price("price_legacy_gold")  # maps to no tier: its events fail
PRICES = [synthetic.price("price_pro_monthly"), synthetic.price("price_basic"), GOLD]
T = 1_700_000_000


def _dump(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, in a stable order."""
    with engine.connect() as connection:
        return {
            table.name: sorted(tuple(map(repr, row)) for row in connection.execute(select(table)))
            for table in Base.metadata.sorted_tables
        }


def _parked(ops: Harness, n: int) -> list[str]:
    """``n`` events parked as failed (their price maps to no tier), oldest first."""
    events = []
    for i in range(n):
        sub = synthetic.subscription(sub_id=f"sub_p{i}", customer_id=f"cus_p{i}", price_obj=GOLD, created=T)
        events.append(synthetic.event("customer.subscription.created", sub, created=T + i))
    ops.apply(*events)
    assert ops.statuses(e["id"] for e in events) == ["failed"] * n
    return [str(e["id"]) for e in events]


# -- bounds ------------------------------------------------------------------------------------


def test_a_replay_takes_the_default_limit_at_most_the_maximum_and_continues_after(ops: Harness) -> None:
    ids = _parked(ops, 7)
    settings = dataclasses.replace(ops.settings, replay_default_limit=3, replay_max_limit=5)

    def replayed(**kwargs: Any) -> list[str]:
        results = replay_events(ops.engine, failed=True, actor="erin", reason=None, settings=settings, **kwargs)
        return [r.event_id for r in results]

    assert replayed(dry_run=True) == ids[:3]
    assert replayed(dry_run=True, limit=5) == ids[:5]
    assert replayed(dry_run=True, after=ids[2]) == ids[3:6]
    assert replayed(after=ids[5]) == ids[6:]  # applied: still failing, but audited
    assert count_selected(ops.engine, failed=True) == 7
    assert count_selected(ops.engine, failed=True, after=ids[4]) == 2
    for too_many in (6, 0, -1):
        with pytest.raises(KamiyoError, match=r"limit must be from 1 to 5 \(REPLAY_MAX_LIMIT\)"):
            replayed(limit=too_many)
    with pytest.raises(KamiyoError, match="no event evt_nowhere in the inbox"):
        replayed(after="evt_nowhere")


def test_the_admin_api_without_a_limit_gets_the_default(ops: Harness) -> None:
    """``replay_events`` called without ``limit`` (the admin API today) is bounded all the same."""
    _parked(ops, 4)
    settings = dataclasses.replace(ops.settings, replay_default_limit=2)
    results = replay_events(ops.engine, failed=True, dry_run=True, actor="erin", reason=None, settings=settings)
    assert len(results) == 2


# -- the dry run shows what applying does --------------------------------------------------------


def _scenario(seed: int, customers: int = 6, emails: int = 5, events: int = 60) -> tuple[list[Any], list[Any]]:
    """Events before the replay (applied) and the replayed ones: customers linked and relinked by
    email and by client_reference_id, subscriptions moving between statuses and prices (one of
    them unmapped), events out of order."""
    rng = random.Random(seed)

    known = emails  # the replayed events also name emails no user has yet: users are created

    def email() -> str | None:
        return rng.choice([*(f"user{e}@example.com" for e in range(known)), None])

    def event(at: int) -> dict[str, Any]:
        c = rng.randrange(customers)
        customer = f"cus_{seed}_{c}"
        kind = rng.choice(["customer", "checkout", "invoice", "subscription", "subscription", "payment_intent"])
        if kind == "customer":
            obj = synthetic.customer(customer_id=customer, email=email(), created=at)
            return synthetic.event(rng.choice(["customer.created", "customer.updated"]), obj, created=at)
        if kind == "checkout":
            ref = rng.choice([None, f"USER{rng.randrange(known)}@Example.com", str(rng.randrange(1, 12))])
            obj = synthetic.checkout_session(
                customer_id=customer,
                sub_id=f"sub_{seed}_{c}",
                email=email() or "x@example.com",
                client_reference_id=ref,
            )
            return synthetic.event("checkout.session.completed", obj, created=at)
        if kind == "invoice":
            obj = synthetic.invoice(customer_id=customer, sub_id=f"sub_{seed}_{c}", email=email(), created=at)
            return synthetic.event("invoice.paid", obj, created=at)
        if kind == "payment_intent":
            obj = synthetic.payment_intent(customer_id=customer, email=email())
            return synthetic.event("payment_intent.succeeded", obj, created=at)
        # Now and then a subscription named under another customer than the one that holds it.
        sub = f"sub_{seed}_{rng.randrange(customers) if rng.random() < 0.15 else c}"
        status = rng.choice(["active", "active", "trialing", "past_due", "canceled", "unpaid"])
        obj = synthetic.subscription(
            sub_id=sub, customer_id=customer, status=status, price_obj=rng.choice(PRICES), created=T
        )
        kind = "customer.subscription.deleted" if status == "canceled" else "customer.subscription.updated"
        return synthetic.event(kind, obj, created=at)

    before = [event(T + rng.randrange(0, 1000)) for _ in range(events // 2)]
    known = 2 * emails
    replayed = [event(T + rng.randrange(0, 2000)) for _ in range(events)]
    return before, replayed


@pytest.mark.parametrize("seed", range(6))
def test_a_dry_run_changes_nothing_and_shows_exactly_what_applying_does(ops: Harness, seed: int) -> None:
    before, replayed = _scenario(seed)
    bystander = ops.add_user("bystander@example.com", "basic", "active")  # the newest user, unrelated
    ops.apply(*before)
    if seed % 2:  # an operator's override on someone the events touch
        with ops.engine.connect() as connection:
            emails = list(connection.execute(select(Base.metadata.tables["users"].c.email)).scalars())
        target = next(e for e in emails if e != "bystander@example.com")
        set_override(
            ops.engine,
            email=target,
            tier="pro",
            reason="t",
            expires_at=None,
            actor="erin",
            tiers=ops.settings.price_tiers,
        )
    cutoff = datetime.now(UTC)
    time.sleep(0.01)
    ops.deliver(*replayed)
    stored = _dump(ops.engine)

    shown = replay_events(ops.engine, since=cutoff, dry_run=True, actor="erin", reason=None, settings=ops.settings)
    assert _dump(ops.engine) == stored  # nothing changed, not even an id sequence's rows
    with ops.engine.connect() as connection:
        known = set(connection.execute(select(Base.metadata.tables["users"].c.id)).scalars())
    done = replay_events(ops.engine, since=cutoff, actor="erin", reason="seeded", settings=ops.settings)

    assert len(shown) == len(replayed)
    # A user the dry run would create has no id yet: it says "a new user" where applying names the id.
    assert [dataclasses.replace(r, dry_run=False) for r in shown] == [_without_new_ids(r, known) for r in done]
    assert any(r.changes for r in done)  # the scenario does change users
    assert bystander > 0


def _without_new_ids(result: ReplayResult, known: set[int]) -> ReplayResult:
    """``result`` as a dry run would show it: the users created by the replay without an id."""
    if result.outcome is None:
        return result

    def shown(user_id: int | None) -> int | None:
        return user_id if user_id in known else None

    outcome = dict(result.outcome)
    if "customer" in outcome:
        outcome["customer"] = {**outcome["customer"], "user_id": shown(outcome["customer"]["user_id"])}
    if "users" in outcome:
        outcome["users"] = [{**change, "user_id": shown(change["user_id"])} for change in outcome["users"]]
    return dataclasses.replace(result, outcome=outcome, detail=Outcome.from_json(outcome).describe())


def test_a_dry_run_after_a_price_is_mapped_shows_every_parked_event_applying(ops: Harness) -> None:
    _parked(ops, 30)
    mapped = dataclasses.replace(ops.settings, price_tiers=parse_price_tiers(PRICE_TIERS + ",price_legacy_gold=pro"))
    stored = _dump(ops.engine)
    shown = replay_events(ops.engine, failed=True, dry_run=True, actor="erin", reason=None, settings=mapped)
    assert {r.status_after for r in shown} == {"applied"}
    assert _dump(ops.engine) == stored


# -- the dry run holds no lock -------------------------------------------------------------------------


def _many_events(ops: Harness, n: int) -> datetime:
    """``n`` stored events of ``n // 2`` linked customers (a user each); returns the time before them."""
    cutoff = datetime.now(UTC)
    time.sleep(0.01)
    events: list[dict[str, Any]] = []
    for i in range(n // 2):
        customer = f"cus_many_{i}"
        events.append(
            synthetic.event(
                "customer.created", synthetic.customer(customer_id=customer, email=f"many{i}@example.com"), created=T
            )
        )
        sub = synthetic.subscription(sub_id=f"sub_many_{i}", customer_id=customer, price_obj=PRICES[0], created=T)
        events.append(synthetic.event("customer.subscription.created", sub, created=T + 1))
    ops.deliver(*events)
    return cutoff


@pytest.mark.timeout(300)
def test_writers_are_not_held_up_by_a_long_dry_run(ops: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A dry run over 3,000 events, its transaction kept open for seconds (each chunk's decisions
    made slowly); meanwhile deliveries are stored and an operator sets a user's override (a user
    the dry run changes), each within a moment."""
    cutoff = _many_events(ops, 3000)
    ops.add_user("many0@example.com")
    settings = dataclasses.replace(ops.settings, replay_max_limit=5000)
    decide = worker_module.apply_events

    def slowly(*args: Any, **kwargs: Any) -> Any:
        if not kwargs.get("write", True):
            time.sleep(0.1)  # asleep, without the GIL: only a lock the dry run held could stop a writer
        return decide(*args, **kwargs)

    monkeypatch.setattr(worker_module, "apply_events", slowly)
    took: list[float] = []
    finished = threading.Event()

    def dry_run() -> None:
        started = time.perf_counter()
        try:
            replay_events(
                ops.engine, since=cutoff, dry_run=True, actor="erin", reason=None, settings=settings, limit=3000
            )
        finally:
            took.append(time.perf_counter() - started)
            finished.set()

    thread = threading.Thread(target=dry_run, daemon=True)
    thread.start()
    time.sleep(0.3)  # the dry run has its snapshot by now
    waits: list[float] = []
    n = 0
    while not finished.is_set():
        started = time.perf_counter()
        if n % 2:
            ops.deliver(synthetic.event("customer.created", synthetic.customer(customer_id=f"cus_w{n}", email=None)))
        else:
            set_override(
                ops.engine,
                email="many0@example.com",
                tier="basic" if n % 4 else "pro",
                reason="while a dry run runs",
                expires_at=None,
                actor="erin",
                tiers=ops.settings.price_tiers,
            )
        waits.append(time.perf_counter() - started)
        n += 1
        time.sleep(0.02)
    thread.join(timeout=60)
    assert took[0] > 1.0, took  # long enough for the writers to have met it
    assert len(waits) >= 10, (took, waits)
    assert max(waits) < 0.5, (took, sorted(waits)[-5:])
