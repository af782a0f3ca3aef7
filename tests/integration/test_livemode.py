"""Stripe's other mode changes no user, whichever path an event takes (SQLite and PostgreSQL).

A live service (``STRIPE_MODE=live``, or a live key) answers a test-mode event 2xx, so that
Stripe stops retrying it, and stores it as ignored with the reason in its ``detail``: through the
webhook endpoint, the worker (an event stored before the mode was set), ``kamiyo replay`` and
``replay --dry-run``, and a backfill. With no mode, both are taken.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import orjson
import pytest

from appclient import AppClient
from e2e.harness import wait_until
from integration.conftest import Harness
from kamiyo import synthetic
from kamiyo.config import Settings
from kamiyo.domain.tiers import parse_price_tiers
from kamiyo.operations.replay import replay_events
from kamiyo.web.app import create_app
from kamiyo.web.webhook import WEBHOOK_PATH
from support import signed

PRO = synthetic.price("price_pro_monthly")
T = 1_700_000_000
TEST_MODE_IGNORED = "test-mode event ignored: this service takes live-mode events only (STRIPE_MODE)"


def _live(settings: Settings) -> Settings:
    return dataclasses.replace(settings, stripe_mode="live")


def _customer(livemode: bool, *, email: str = "live@example.com", customer_id: str = "cus_live") -> dict[str, Any]:
    obj = synthetic.customer(customer_id=customer_id, email=email, created=T)
    obj["livemode"] = livemode
    return synthetic.event("customer.created", obj, created=T, livemode=livemode)


def _subscription(livemode: bool, *, customer_id: str = "cus_live", at: int = T + 10) -> dict[str, Any]:
    obj = synthetic.subscription(sub_id="sub_live", customer_id=customer_id, status="active", price_obj=PRO, created=T)
    obj["livemode"] = livemode
    return synthetic.event("customer.subscription.created", obj, created=at, livemode=livemode)


def _ignored_for_mode(harness: Harness, event_id: str) -> tuple[str, str | None]:
    row = harness.event(event_id)
    return row["status"], row["detail"]


def test_the_worker_ignores_a_pending_event_of_the_other_mode(harness: Harness) -> None:
    """Stored before STRIPE_MODE was set: the live service's worker ignores it, with the mode as reason."""
    live = _live(harness.settings)
    harness.deliver(_customer(True))
    harness.drain(live)
    test_mode = _subscription(False)
    harness.deliver(test_mode)
    harness.drain(live)
    assert _ignored_for_mode(harness, test_mode["id"]) == ("ignored", TEST_MODE_IGNORED)
    assert harness.tier_status("live@example.com") == ("free", None)
    assert harness.subscription("sub_live") is None


def test_a_service_without_a_mode_applies_both(harness: Harness) -> None:
    harness.apply(_customer(True), _subscription(False))
    assert harness.tier_status("live@example.com") == ("pro", "active")


def test_a_live_event_applies_in_a_live_service(harness: Harness) -> None:
    live = _live(harness.settings)
    for event in (_customer(True), _subscription(True)):
        harness.deliver(event)
        harness.drain(live)
    assert harness.tier_status("live@example.com") == ("pro", "active")


@pytest.mark.parametrize("dry_run", [True, False])
def test_replay_ignores_an_event_of_the_other_mode_stored_before_the_mode_was_set(
    harness: Harness, dry_run: bool
) -> None:
    """It failed (no tier for its price) before STRIPE_MODE=live; replayed now, it changes no one."""
    harness.apply(_customer(True))
    gold = synthetic.subscription(
        sub_id="sub_live", customer_id="cus_live", status="active", price_obj=synthetic.price("price_gold"), created=T
    )
    parked = synthetic.event("customer.subscription.created", gold, created=T + 10)
    harness.apply(parked)
    assert harness.event(parked["id"])["status"] == "failed"
    mapped = dataclasses.replace(harness.settings, stripe_mode="live", price_tiers=parse_price_tiers("price_gold=pro"))

    [result] = replay_events(harness.engine, failed=True, dry_run=dry_run, actor="erin", reason=None, settings=mapped)

    assert (result.status_after, result.detail, result.changes) == ("ignored", TEST_MODE_IGNORED, [])
    assert harness.tier_status("live@example.com") == ("free", None)
    assert harness.subscription("sub_live") is None
    assert harness.event(parked["id"])["status"] == ("failed" if dry_run else "ignored")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_endpoint_answers_2xx_and_stores_the_other_modes_event_as_ignored(
    harness: Harness, shared_settings: Settings
) -> None:
    """Through ``kamiyo serve``'s writer process and worker: the test-mode event changes no user; a live one does."""
    live = _live(shared_settings)
    with AppClient(create_app(live, run_worker=True)) as http:

        def post(event: dict[str, Any]) -> dict[str, Any]:
            body, headers = signed(event)
            answer = http.post(WEBHOOK_PATH, content=body, headers=headers)
            assert answer.status_code == 200, answer.text
            return dict(orjson.loads(answer.content))

        post(_customer(True))
        wait_until(lambda: harness.tier_status("live@example.com") == ("free", None), what="the live user")
        test_mode = _subscription(False)
        assert post(test_mode) == {"received": True, "id": test_mode["id"], "duplicate": False}
        assert _ignored_for_mode(harness, test_mode["id"]) == ("ignored", TEST_MODE_IGNORED)
        live_event = _subscription(True, at=T + 20)
        post(live_event)
        wait_until(lambda: harness.event(live_event["id"])["status"] == "applied", what="the live event applied")
        time.sleep(0.2)  # the worker had every chance to take the ignored one too
    assert harness.tier_status("live@example.com") == ("pro", "active")
    assert harness.event(test_mode["id"])["status"] == "ignored"
    assert harness.event(test_mode["id"])["attempts"] == 0  # never claimed by the worker
