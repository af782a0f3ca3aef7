"""Stripe events written by other projects, through the webhook endpoint and the worker.

``../shared/corpus/events`` beside the repository holds Stripe events recorded or hand-written by
eleven other projects (2012 to 2026 API versions, live and test mode mixed; its MANIFEST.md says
where each comes from). They are read from there, never copied into the repository. Each file's
bytes are posted unchanged, signed as Stripe signs them, to the real endpoint of an app on the
test's database, with no ``STRIPE_MODE``; then the worker applies the inbox.

None of them is malformed for this service, so every one is answered 200: an odd payload (an
``invoice.upcoming`` without an id, a charge without ``object``, an event without
``api_version``) is still a signed Stripe event with an id and a type, and Stripe must stop
retrying it. When the corpus is absent (a clone without ``../shared``) the tests skip, except
under ``CI=true``, where they fail.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import select

from appclient import AppClient
from integration.conftest import Harness
from kamiyo import synthetic
from kamiyo.config import Settings
from kamiyo.db.models import events_table
from kamiyo.domain.entitlement import ENTITLED_STATUSES
from kamiyo.domain.tiers import TierMap, parse_price_tiers
from kamiyo.processing.worker import Worker
from kamiyo.telemetry.metrics import WebhookMetrics
from kamiyo.web.app import create_app
from kamiyo.web.webhook import WEBHOOK_PATH
from support import in_ci, signed_headers

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "corpus" / "events"
SUBSCRIPTION_EVENT = "customer.subscription."
# The update Stripe applies from a subscription's pending_update: its items change with no other event.
PENDING_UPDATE = frozenset({"customer.subscription.pending_update_applied"})


@dataclass(frozen=True)
class CorpusEvent:
    name: str  # the file's name, which MANIFEST.md describes
    body: bytes  # the file's bytes, posted unchanged
    event: Mapping[str, Any]

    @property
    def is_subscription(self) -> bool:
        return str(self.event["type"]).startswith(SUBSCRIPTION_EVENT)


@pytest.fixture(scope="module")
def corpus() -> list[CorpusEvent]:
    if not CORPUS.is_dir():
        message = f"the Stripe event corpus is not at {CORPUS} (it lives beside the repository, in ../shared)"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    events = []
    for path in sorted(CORPUS.glob("*.json")):
        body = path.read_bytes()
        events.append(CorpusEvent(path.name, body, orjson.loads(body)))
    assert events, f"no events/*.json in {CORPUS}"
    return events


def _price_keys(obj: Mapping[str, Any]) -> Iterator[str]:
    """Every price or plan id a subscription object names, in every API version's place for it."""
    items = obj.get("items")
    data = items.get("data") if isinstance(items, dict) else None
    for item in data if isinstance(data, list) else []:
        price = item.get("price")
        if isinstance(price, str):
            yield price
        for priced in (price, item.get("plan")):
            if isinstance(priced, dict) and isinstance(priced.get("id"), str):
                yield priced["id"]
    plan = obj.get("plan")
    if isinstance(plan, dict) and isinstance(plan.get("id"), str):
        yield plan["id"]


def _corpus_price_tiers(corpus: list[CorpusEvent]) -> TierMap:
    """STRIPE_PRICE_TIERS mapping every price found on the corpus's subscriptions to ``pro``."""
    keys = {key for e in corpus if e.is_subscription for key in _price_keys(e.event["data"]["object"])}
    assert keys, "the corpus names no price"
    return parse_price_tiers(",".join(f"{key}=pro" for key in sorted(keys)))


def _post_all(harness: Harness, settings: Settings, corpus: list[CorpusEvent]) -> dict[str, tuple[int, Any]]:
    """Post every file through the endpoint of an app on the harness's database; file -> (status, answer)."""
    answers: dict[str, tuple[int, Any]] = {}
    app = create_app(settings, engine=harness.engine, run_worker=False, metrics=WebhookMetrics())
    with AppClient(app) as http:
        for e in corpus:
            answer = http.post(WEBHOOK_PATH, content=e.body, headers=signed_headers(e.body))
            answers[e.name] = (answer.status_code, orjson.loads(answer.content))
    return answers


def _drain(worker: Worker, rounds: int = 100) -> None:
    """Run the worker until it finds nothing to do; an exception escaping it fails the test."""
    for _ in range(rounds):
        if worker.run_once() == 0:
            return
    raise AssertionError(f"worker still busy after {rounds} rounds")


def _rows(harness: Harness) -> dict[str, Mapping[str, Any]]:
    """Stored event id -> its inbox row."""
    with harness.engine.connect() as connection:
        return {row["stripe_event_id"]: row for row in connection.execute(select(events_table)).mappings()}


def _assert_all_received(answers: dict[str, tuple[int, Any]], corpus: list[CorpusEvent]) -> None:
    expected = {e.name: (200, {"received": True, "id": e.event["id"], "duplicate": False}) for e in corpus}
    assert {name: a for name, a in answers.items() if a != expected[name]} == {}


def _entitles(e: CorpusEvent) -> bool:
    return e.event["data"]["object"].get("status") in ENTITLED_STATUSES


def test_with_its_prices_mapped_every_corpus_event_is_received_and_every_subscription_event_applies(
    harness: Harness, corpus: list[CorpusEvent]
) -> None:
    settings = dataclasses.replace(harness.settings, price_tiers=_corpus_price_tiers(corpus), stripe_mode=None)

    _assert_all_received(_post_all(harness, settings, corpus), corpus)
    worker = Worker(harness.engine, settings)
    _drain(worker)

    rows = _rows(harness)
    outcomes = {e.name: (rows[e.event["id"]]["status"], rows[e.event["id"]]["last_error"]) for e in corpus}
    assert {name: o for name, o in outcomes.items() if o[0] not in ("applied", "ignored")} == {}
    subscriptions = [e for e in corpus if e.is_subscription]
    assert len(subscriptions) >= 20  # the corpus's subscription events were found (28 when this was written)
    assert {e.name: outcomes[e.name] for e in subscriptions if outcomes[e.name][0] != "applied"} == {}

    # The worker that took all of them still applies what comes next.
    team = synthetic.price("price_after", tier="team")  # mapped by its metadata.tier
    after = synthetic.subscription(sub_id="sub_after", customer_id="cus_after", price_obj=team)
    harness.deliver(
        synthetic.event("customer.created", synthetic.customer(customer_id="cus_after", email="after@example.com")),
        synthetic.event("customer.subscription.created", after),
    )
    _drain(worker)
    assert harness.tier_status("after@example.com") == ("team", "active")


def test_with_no_price_mapped_only_entitling_subscriptions_are_parked_and_the_rest_applies(
    harness: Harness, corpus: list[CorpusEvent]
) -> None:
    """A subscription that entitles to nothing applies whatever its price, or with no items at all;
    one that entitles is parked (UnmappedPrice), waiting for its price to be mapped."""
    settings = dataclasses.replace(harness.settings, price_tiers=TierMap(), stripe_mode=None)

    _assert_all_received(_post_all(harness, settings, corpus), corpus)
    _drain(Worker(harness.engine, settings))

    rows = _rows(harness)
    outcomes = {e.name: (rows[e.event["id"]]["status"], rows[e.event["id"]]["last_error"]) for e in corpus}
    subscriptions = [e for e in corpus if e.is_subscription]
    entitling = {e.name for e in subscriptions if _entitles(e)}
    not_entitling = [e for e in subscriptions if not _entitles(e)]
    assert len(not_entitling) >= 5  # cancellations and a pause: the rule is exercised
    assert {name for name, (status, _) in outcomes.items() if status == "failed"} == entitling
    assert {name for name in entitling if not outcomes[name][1].startswith("UnmappedPrice: ")} == set()
    assert {e.name: outcomes[e.name] for e in not_entitling if outcomes[e.name][0] != "applied"} == {}
    assert {name: o for name, o in outcomes.items() if o[0] not in ("applied", "ignored", "failed")} == {}

    minimal_deleted = next(e for e in not_entitling if "items" not in e.event["data"]["object"])
    stored = harness.subscription(minimal_deleted.event["data"]["object"]["id"])
    assert stored is not None
    assert (stored["status"], stored["tier"]) == ("canceled", "free")


def test_a_pending_update_applied_event_applies(harness: Harness, corpus: list[CorpusEvent]) -> None:
    pending = [e for e in corpus if e.event["type"] in PENDING_UPDATE]
    assert pending
    settings = dataclasses.replace(harness.settings, price_tiers=_corpus_price_tiers(corpus), stripe_mode=None)

    _assert_all_received(_post_all(harness, settings, pending), pending)
    _drain(Worker(harness.engine, settings))

    rows = _rows(harness)
    assert {e.name: rows[e.event["id"]]["status"] for e in pending} == {e.name: "applied" for e in pending}
