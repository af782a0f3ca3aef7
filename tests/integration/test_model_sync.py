"""Sync's pages and replay, judged by the reference model (tests/model.py) on either database.

Part of a history's subscription states reach the service as webhook events (any order, any
duplication), part only as sync pages: what Stripe's API would list at some moment between two
events, its customers expanded, read into items by sync's own reader and applied a page per
transaction, as ``kamiyo sync`` does. Whatever the interleaving, the state is the model's, and a
page applied again changes nothing. Replaying events (or a dry run of it, over any selection)
at any point of the history leaves the model's state too, the dry run writing nothing and
showing exactly what the replay that follows does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import select

import model
from integration.test_model_properties import _SETTINGS, _seed, _stored, _with_ids, deliveries, scenarios
from kamiyo import synthetic
from kamiyo.db.models import Base, events_table, users_table
from kamiyo.operations.replay import replay_events
from kamiyo.processing.engine import PageResult, apply_sync_page
from kamiyo.processing.worker import Worker
from kamiyo.reconcile.gateway import Page
from kamiyo.reconcile.reader import ReadPage, read_page
from operations.test_replay_bounds import _without_new_ids


@dataclass(frozen=True)
class SyncPage:
    """One page of a sync: as the API lists it, under the sync's label, and as the model takes it."""

    listed: Page
    label: str
    reads: list[model.Read]


@dataclass
class History:
    """The seeded users, the events that reach the webhook (in delivery order, duplicated), the
    pages of the syncs (in the order they were read), and the order in which they all arrive."""

    users: list[model.SeededUser]
    deliveries: list[dict[str, Any]]
    pages: list[SyncPage]
    arrivals: list[tuple[str, int]]  # ("event", i): deliveries[i] arrives; ("page", i): pages[i] is applied


def _address(event: Mapping[str, Any]) -> str | None:
    """The customer's address as an event of a linking type spells it, if it names one."""
    for dotted in model.LINK_TYPES.get(event["type"], ()):
        value: Any = event["data"]["object"]
        for part in dotted.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        if isinstance(value, str) and "@" in value:
            return value
    return None


def _customer_of(event: Mapping[str, Any]) -> str | None:
    obj = event["data"]["object"]
    return obj.get("id") if event["type"] in ("customer.created", "customer.updated") else obj.get("customer")


@st.composite
def histories(draw: st.DrawFn) -> History:
    """A scenario (test_model_properties.scenarios) whose events each reach the webhook or not, and
    now and then between two events a sync that lists some of the subscriptions Stripe then holds
    (each as its latest real change left it: a late snapshot after the end changes nothing), in
    pages of one to three, read at a second between the two events'."""
    scenario = draw(scenarios(one_address=draw(st.booleans(), label="one address")), label="scenario")
    events = scenario.events
    # Stripe knows a customer's address from the start, as any event naming it spells it.
    addresses: dict[str, str] = {}
    for event in events:
        customer, address = _customer_of(event), _address(event)
        if customer and address:
            addresses.setdefault(customer, address)
    held: dict[str, dict[str, Any]] = {}  # subscription id -> its object as Stripe holds it
    delivered: list[dict[str, Any]] = []
    pages: list[SyncPage] = []
    for position, event in enumerate(events):
        obj = event["data"]["object"]
        if event["type"] in model.SUBSCRIPTION_TYPES and (
            obj["id"] not in held or held[obj["id"]]["status"] not in model.TERMINAL
        ):
            held[obj["id"]] = obj
        if draw(st.booleans()):
            delivered.append(event)
        if not held or draw(st.integers(0, 3)) != 0:
            continue
        listed = draw(st.lists(st.sampled_from(sorted(held)), min_size=1, max_size=len(held), unique=True))
        later = events[position + 1]["created"] if position + 1 < len(events) else event["created"] + 2
        read_at = draw(st.integers(event["created"], later))
        label = f"sync:{len({p.label for p in pages}) + 1}"
        size = draw(st.integers(1, 3))
        for start in range(0, len(listed), size):
            data = []
            for sub_id in listed[start : start + size]:
                customer_id = held[sub_id]["customer"]
                expanded = synthetic.customer(customer_id=customer_id, email=addresses.get(customer_id), created=0)
                data.append({**held[sub_id], "customer": expanded})
            page = Page(data=data, has_more=start + size < len(listed), read_at=read_at)
            pages.append(SyncPage(page, label, [model.Read(obj, read_at, label) for obj in data]))
    schedule = draw(deliveries(delivered), label="deliveries")
    # Each page arrives after the ones read before it, anywhere among the deliveries.
    slots = sorted(draw(st.lists(st.integers(0, len(schedule)), min_size=len(pages), max_size=len(pages))))
    arrivals: list[tuple[str, int]] = []
    page_number = 0
    for position in range(len(schedule) + 1):
        while page_number < len(slots) and slots[page_number] == position:
            arrivals.append(("page", page_number))
            page_number += 1
        if position < len(schedule):
            arrivals.append(("event", position))
    return History(scenario.users, schedule, pages, arrivals)


def _apply_page(harness: Any, page: ReadPage) -> PageResult:
    """One page in a transaction of its own, as sync applies it."""
    with harness.engine.connect() as connection, connection.begin():
        return apply_sync_page(connection, harness.settings.price_tiers, page.items, seen_at=page.read_at)


def _dump(harness: Any) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, in a stable order."""
    with harness.engine.connect() as connection:
        return {
            table.name: sorted(tuple(map(repr, row)) for row in connection.execute(select(table)))
            for table in Base.metadata.sorted_tables
        }


def _play(
    harness: Any, data: st.DataObject, history: History, seeded: list[model.SeededUser], *, replays: bool
) -> list[model.Read]:
    """Deliver the events and apply the pages in the history's order, the worker running now and then;
    a page now and then applied twice (the second time it must change nothing); with ``replays``,
    now and then a dry run and then the replay of some of the stored events. The model's reads."""
    batch_size = data.draw(st.integers(1, 5), label="WORKER_BATCH_SIZE")
    settings = dataclasses.replace(harness.settings, worker_batch_size=batch_size)
    worker = Worker(harness.engine, settings)
    reads: list[model.Read] = []
    for kind, index in history.arrivals:
        if kind == "event":
            harness.deliver(history.deliveries[index])
            # With replays the worker runs less often: a replay then takes pending events, which
            # change what the events after them see.
            if data.draw(st.integers(0, 3 if replays else 1), label="worker runs") == 0:
                worker.run_once()
        else:
            page = history.pages[index]
            # Read as sync's reader reads a listed page: snapshots versioned as of the read.
            read = read_page(page.listed, harness.settings.price_tiers, page.label)
            assert read.problems == []
            _apply_page(harness, read)
            reads.extend(page.reads)
            if data.draw(st.booleans(), label="page again"):
                before = _dump(harness)
                again = _apply_page(harness, read)
                assert (again.drift, again.stored) == ([], 0)
                assert _dump(harness) == before
        if replays and data.draw(st.integers(0, 3), label="replay now") == 0:
            _dry_run_then_replay(harness, data)
    harness.drain(settings)
    return reads


def _dry_run_then_replay(harness: Any, data: st.DataObject) -> None:
    """A dry run of a selection of the stored events writes nothing; the replay that follows does what it showed."""
    with harness.engine.connect() as connection:
        stored = connection.execute(
            select(events_table.c.stripe_event_id, events_table.c.type, events_table.c.received_at).order_by(
                events_table.c.id
            )
        ).all()
        known = set(connection.execute(select(users_table.c.id)).scalars())
    if not stored:
        return
    chosen = data.draw(st.sampled_from(stored), label="selected from")
    selection = data.draw(
        st.sampled_from(
            [
                {"event_id": chosen.stripe_event_id},
                {"event_type": chosen.type},
                {"since": chosen.received_at},
                {"since": stored[0].received_at},
            ]
        ),
        label="selection",
    )
    before = _dump(harness)
    shown = replay_events(
        harness.engine, dry_run=True, actor="hypothesis", reason=None, settings=harness.settings, **selection
    )
    assert _dump(harness) == before
    done = replay_events(harness.engine, actor="hypothesis", reason=None, settings=harness.settings, **selection)
    assert [dataclasses.replace(r, dry_run=False) for r in shown] == [_without_new_ids(r, known) for r in done]


def test_webhooks_and_sync_pages_leave_the_models_state(harness: Any) -> None:
    """Subscription states that reach the service as webhook events or as sync pages (read as sync
    reads them, a page per transaction), interleaved in any order, leave the model's state, every
    read a version like an event's; a page applied again changes nothing (no drift)."""

    @_SETTINGS
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        history = data.draw(histories(), label="history")
        harness.reset()
        seeded = _seed(harness, history.users)
        history.deliveries = _with_ids(history.deliveries, seeded)
        reads = _play(harness, data, history, seeded, replays=False)
        assert _stored(harness) == model.expected_state(seeded, history.deliveries, reads)

    check()


def test_replays_and_their_dry_runs_leave_the_models_state(harness: Any) -> None:
    """At any point of such a history, a dry run of a replay (one event, a type, or every event
    received since one) writes nothing and shows exactly what the replay that follows does; the
    history then ends in the model's state, and replaying every event again leaves it as it is."""

    @_SETTINGS
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        history = data.draw(histories(), label="history")
        harness.reset()
        seeded = _seed(harness, history.users)
        history.deliveries = _with_ids(history.deliveries, seeded)
        reads = _play(harness, data, history, seeded, replays=True)
        expected = model.expected_state(seeded, history.deliveries, reads)
        assert _stored(harness) == expected
        everything = datetime(2000, 1, 1, tzinfo=UTC)
        done = replay_events(
            harness.engine, since=everything, actor="hypothesis", reason=None, settings=harness.settings
        )
        assert len(done) == len(expected.outcomes)
        assert _stored(harness) == expected

    check()
