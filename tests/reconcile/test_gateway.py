"""The Stripe gateway: the official library against the local API, retries, the rate budget, Stripe's clock."""

from __future__ import annotations

import inspect
import time

import pytest

from kamiyo.diagnosis.doctor import FAIL, OK, WEBHOOK_PATH, diagnose_stripe
from kamiyo.diagnosis.stripe_view import RUNBOOK_EVENTS, GatewayWebhookView
from kamiyo.errors import StripeApiError, StripeCursorGone
from kamiyo.reconcile.gateway import EventQuery, StripeApiGateway, StripeGateway, read_version_created
from kamiyo.reconcile.ratelimit import RateBudget
from kamiyo.reconcile.retry import RetryPolicy
from reconcile.harness import TEST_RETRY, paying_customer
from stripe_api import API_KEY, FakeStripe, InMemoryGateway, StripeApiServer


def recording_gateway(server: StripeApiServer, sleeps: list[float], **retry: float) -> StripeApiGateway:
    policy = RetryPolicy(**{"attempts": 4, "base_seconds": 0.01, "cap_seconds": 0.05, **retry})  # type: ignore[arg-type]
    return StripeApiGateway(API_KEY, server.url, budget=RateBudget(10_000), retry=policy, sleep=sleeps.append)


def test_both_gateways_answer_the_same_reads_the_same_way(account: FakeStripe, gateway: StripeApiGateway) -> None:
    for n in range(1, 4):
        paying_customer(account, n)
    in_memory: StripeGateway = InMemoryGateway(account)

    for each in (gateway, in_memory):
        page = each.list_subscriptions()
        assert [s["id"] for s in page.data] == ["sub_00003", "sub_00002", "sub_00001"]
        assert page.data[0]["customer"]["email"] == "user3@example.com"  # expanded
        assert not page.has_more
        fetched = each.retrieve_subscription("sub_00002")
        assert fetched is not None
        assert fetched.obj["customer"]["id"] == "cus_00002"
        assert each.retrieve_subscription("sub_missing") is None
        assert each.retrieve_customer("cus_missing") is None
        assert [c["id"] for c in each.list_customers(email="user1@example.com").data] == ["cus_00001"]
        with pytest.raises(StripeCursorGone):
            each.list_events(EventQuery(), ending_before="evt_not_in_stripe")


def test_the_in_memory_gateway_implements_every_call_of_the_interface() -> None:
    calls = {name for name, value in vars(StripeGateway).items() if callable(value) and not name.startswith("_")}

    assert "list_webhook_endpoints" in calls
    for name in calls:
        ours = getattr(StripeGateway, name)
        theirs = getattr(InMemoryGateway, name, None)
        assert theirs is not None, f"InMemoryGateway lacks {name}"
        assert inspect.signature(theirs).parameters.keys() == inspect.signature(ours).parameters.keys(), name


def test_both_gateways_list_webhook_endpoints_page_by_page_for_doctors_step_4(
    account: FakeStripe, gateway: StripeApiGateway
) -> None:
    for n in range(1, 102):  # two pages
        account.add_webhook_endpoint(f"https://old{n}.example.com/hook")
    account.add_webhook_endpoint(
        f"https://kamiyo.example.com{WEBHOOK_PATH}", status="disabled", enabled_events=RUNBOOK_EVENTS
    )
    in_memory = InMemoryGateway(account)

    for each in (gateway, in_memory):
        first = each.list_webhook_endpoints()
        assert (len(first.data), first.has_more) == (100, True)
        assert first.data[0]["status"] == "disabled"  # newest first
        second = each.list_webhook_endpoints(starting_after=str(first.data[-1]["id"]))
        assert ([e["url"] for e in second.data], second.has_more) == (
            ["https://old2.example.com/hook", "https://old1.example.com/hook"],
            False,
        )
        view = GatewayWebhookView(each)
        endpoints = view.webhook_endpoints()
        assert len(endpoints) == 102
        findings = diagnose_stripe(endpoints, view.undelivered_events(), configured=True)
        assert [(f.status, f.option, f.cause) for f in findings] == [(FAIL, 4, "endpoint_disabled"), (OK, None, None)]
    assert in_memory.calls.count("list_webhook_endpoints") == 4  # two pages read directly, two by the view


def test_a_read_is_dated_by_stripes_clock_not_ours(account: FakeStripe, gateway: StripeApiGateway) -> None:
    account.clock_offset = 3600.0  # Stripe's clock an hour ahead of this machine's
    paying_customer(account, 1)

    page = gateway.list_subscriptions()

    assert abs(page.read_at - (time.time() + 3600)) < 5
    assert read_version_created(page.read_at) == page.read_at - 1


def test_plain_429s_and_5xx_are_retried_with_growing_jittered_waits(
    account: FakeStripe, stripe_api: StripeApiServer
) -> None:
    sleeps: list[float] = []
    gateway = recording_gateway(stripe_api, sleeps, base_seconds=1.0, cap_seconds=3.0)
    account.fail_next(429, 2)
    account.fail_next(503, 1)

    gateway.list_subscriptions()

    assert len(sleeps) == 3
    assert 0.5 <= sleeps[0] <= 1.0
    assert 1.0 <= sleeps[1] <= 2.0
    assert 1.5 <= sleeps[2] <= 3.0  # capped


def test_a_retry_after_header_is_waited_out(account: FakeStripe, stripe_api: StripeApiServer) -> None:
    sleeps: list[float] = []
    gateway = recording_gateway(stripe_api, sleeps, cap_seconds=5.0)
    account.fail_next(429, 1, **{"Retry-After": "2"})

    gateway.list_subscriptions()

    assert sleeps[0] >= 2.0


def test_refusals_are_not_retried_and_never_show_the_key(account: FakeStripe, stripe_api: StripeApiServer) -> None:
    sleeps: list[float] = []
    wrong = StripeApiGateway(
        "rk_test_wrong_key_abcdef", stripe_api.url, budget=RateBudget(100), retry=TEST_RETRY, sleep=sleeps.append
    )
    with pytest.raises(StripeApiError) as refused:
        wrong.list_subscriptions()
    account.fail_next(403, 1)
    with pytest.raises(StripeApiError, match="lacks a permission"):
        recording_gateway(stripe_api, sleeps).list_subscriptions()

    assert "401" in str(refused.value)
    assert "rk_test_wrong_key_abcdef" not in str(refused.value)
    assert sleeps == []
    assert len(account.requests) == 2


def test_the_rate_budget_spaces_requests_to_the_configured_rate(
    account: FakeStripe, stripe_api: StripeApiServer
) -> None:
    paying_customer(account, 1)
    gateway = StripeApiGateway(API_KEY, stripe_api.url, budget=RateBudget(20), retry=TEST_RETRY)

    started = time.monotonic()
    for _ in range(30):
        gateway.retrieve_subscription("sub_00001")
    elapsed = time.monotonic() - started

    assert elapsed >= (30 - 20) / 20 * 0.9  # a second's burst, then 20/s


def test_the_budget_makes_callers_wait_their_turn() -> None:
    now = [0.0]
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        now[0] += seconds

    budget = RateBudget(10, clock=lambda: now[0], sleep=sleep)
    for _ in range(10):
        budget.acquire()
    assert waits == []  # the burst
    budget.acquire()
    budget.acquire()
    assert waits == pytest.approx([0.1, 0.1])
    now[0] += 5.0  # a quiet spell refills the bucket, up to one second's worth
    for _ in range(10):
        budget.acquire()
    assert waits == pytest.approx([0.1, 0.1])


def test_retry_delays_grow_then_stay_under_the_cap() -> None:
    policy = RetryPolicy(attempts=8, base_seconds=0.5, cap_seconds=4.0)
    for failures, (low, high) in enumerate([(0.25, 0.5), (0.5, 1.0), (1.0, 2.0), (2.0, 4.0), (2.0, 4.0)], start=1):
        for _ in range(20):
            assert low <= policy.delay(failures) <= high
    assert policy.delay(1, retry_after=3.0) >= 3.0
    assert policy.delay(1, retry_after=60.0) <= 4.0
