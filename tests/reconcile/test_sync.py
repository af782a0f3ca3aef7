"""``sync_subscriptions`` against the local Stripe-compatible API, through the official library, on both databases."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from kamiyo import synthetic
from kamiyo.db.engine import make_engine
from kamiyo.db.migrate import upgrade
from kamiyo.domain.tiers import parse_price_tiers
from kamiyo.errors import KamiyoError, StripeApiError
from kamiyo.reconcile import runs
from kamiyo.reconcile.gateway import StripeApiGateway
from kamiyo.reconcile.ratelimit import RateBudget
from kamiyo.reconcile.reader import ProcessReader
from kamiyo.reconcile.sync import SyncListener, SyncScope, SyncSummary, _refresh_statistics_after, sync_subscriptions
from reconcile.harness import TEST_RETRY, Db, paying_customer, webhook_for
from stripe_api import API_KEY, FakeStripe, StripeApiServer
from support import PRICE_TIERS, commit_levels, make_settings


def sync(db: Db, gateway: StripeApiGateway, **options: object) -> SyncSummary:
    return sync_subscriptions(db.engine, gateway, db.settings.price_tiers, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("parallel", [False, True], ids=["read-in-thread", "read-in-process"])
def test_a_sync_fixes_every_kind_of_drift_and_says_why(
    db: Db, account: FakeStripe, gateway: StripeApiGateway, parallel: bool
) -> None:
    # 1: canceled in Stripe, but the webhook was lost: still active here.
    canceled = paying_customer(account, 1)
    db.deliver(webhook_for(canceled, "customer.subscription.created", created=1_700_000_100))
    db.deliver(synthetic.event("customer.created", account.customer("cus_00001"), created=1_700_000_100))
    db.drain()
    assert db.state("user1@example.com") == ("pro", "active")
    account.put_subscription({**canceled, "status": "canceled", "ended_at": 1_700_000_200})
    # 2: paid, but no webhook ever arrived: the user exists, still free.
    paying_customer(account, 2)
    db.add_user("user2@example.com")
    # 3: a hand edit of the users row (the runbook's Option 5), that Stripe does not back.
    paying_customer(account, 3, price="price_basic")
    db.deliver(synthetic.event("customer.created", account.customer("cus_00003"), created=1_700_000_100))
    db.deliver(webhook_for(account.subscription("sub_00003"), "customer.subscription.created", created=1_700_000_100))
    db.drain()
    db.set_user_state("user3@example.com", "enterprise", "active")
    # 4: in sync already.
    paying_customer(account, 4)
    db.deliver(synthetic.event("customer.created", account.customer("cus_00004"), created=1_700_000_100))
    db.deliver(webhook_for(account.subscription("sub_00004"), "customer.subscription.created", created=1_700_000_100))
    db.drain()

    drift = []

    class Collect(SyncListener):
        def on_drift(self, change: object) -> None:
            drift.append(change)

    summary = sync(db, gateway, listener=Collect(), parallel=parallel)

    assert db.state("user1@example.com") == ("free", "canceled")
    assert db.state("user2@example.com") == ("pro", "active")
    assert db.state("user3@example.com") == ("basic", "active")
    assert db.state("user4@example.com") == ("pro", "active")
    assert (summary.status, summary.seen, summary.changed, summary.skipped) == (runs.DONE, 4, 3, 0)
    by_email = {d.email: d for d in drift}
    assert set(by_email) == {"user1@example.com", "user2@example.com", "user3@example.com"}
    assert (by_email["user1@example.com"].before.tier, by_email["user1@example.com"].after.status) == (
        "pro",
        "canceled",
    )
    assert any(
        "sub_00001 was active (pro) here; Stripe has it canceled" in r for r in by_email["user1@example.com"].reasons
    )
    assert any("linked by email" in r for r in by_email["user2@example.com"].reasons)
    assert any("users row disagreed" in r for r in by_email["user3@example.com"].reasons)
    stored = db.subscription("sub_00001")
    assert stored is not None
    assert stored["version_event_id"] == f"sync:{summary.run_id}"
    run = runs.get_run(db.engine, summary.run_id)
    assert (run.status, run.seen, run.changed, run.cursor) == (runs.DONE, 4, 3, "sub_00001")


def test_a_dry_run_reports_the_same_drift_and_writes_nothing(
    db: Db, account: FakeStripe, gateway: StripeApiGateway
) -> None:
    for n in range(1, 151):  # two pages
        paying_customer(account, n)
    db.add_user("user7@example.com", "enterprise", "active")
    before = db.dump()

    dry = sync(db, gateway, dry_run=True)

    assert db.dump() == before
    assert dry.dry_run
    assert dry.status == runs.DONE
    assert (dry.seen, dry.changed, dry.linked) == (150, 150, 150)
    assert {(d.email, d.before.tier, d.after.tier) for d in dry.drift} >= {("user7@example.com", "enterprise", "pro")}
    real = sync(db, gateway)
    assert {(d.email, d.before, d.after) for d in real.drift} == {(d.email, d.before, d.after) for d in dry.drift}


def test_sync_lists_canceled_subscriptions_too(db: Db, account: FakeStripe, gateway: StripeApiGateway) -> None:
    """``status=all``: without it Stripe leaves canceled subscriptions out, and their users stay paid."""
    sub = paying_customer(account, 1)
    db.deliver(synthetic.event("customer.created", account.customer("cus_00001"), created=1_700_000_100))
    db.deliver(webhook_for(sub, "customer.subscription.created", created=1_700_000_100))
    db.drain()
    account.put_subscription({**sub, "status": "canceled"})

    sync(db, gateway)

    assert db.state("user1@example.com") == ("free", "canceled")
    assert all("status=all" in query for path, query in account.requests if path == "/v1/subscriptions")


@pytest.mark.parametrize("parallel", [False, True], ids=["read-in-thread", "read-in-process"])
def test_an_interrupted_sync_resumes_after_its_last_committed_page(
    db: Db, account: FakeStripe, stripe_api: StripeApiServer, parallel: bool
) -> None:
    for n in range(1, 251):  # three pages: 100, 100, 50
        paying_customer(account, n)
    gateway = StripeApiGateway(API_KEY, stripe_api.url, budget=RateBudget(10_000), retry=TEST_RETRY)
    # The third page's request fails through every retry (a 5xx outage).
    account.fail_next(500, TEST_RETRY.attempts, path_prefix="/v1/subscriptions", after=2)

    with pytest.raises(StripeApiError, match="still failing after 4 attempts: 500"):
        sync(db, gateway, parallel=parallel)
    failed = runs.resumable_sync(db.engine)
    assert failed is not None
    assert failed.status == runs.FAILED
    assert (failed.seen, failed.cursor) == (200, "sub_00051")  # newest first: 250..51 are done
    assert len(db.states()) == 200
    account.requests.clear()

    resumed = sync(db, gateway, resume=True, parallel=parallel)

    assert resumed.run_id == failed.id
    assert resumed.resumed_after == "sub_00051"
    listed = [query for path, query in account.requests if path == "/v1/subscriptions"]
    assert len(listed) == 1  # only the last page was listed again
    assert "starting_after=sub_00051" in listed[0]
    assert len(db.states()) == 250
    assert set(db.states().values()) == {("pro", "active")}
    assert runs.get_run(db.engine, failed.id).status == runs.DONE
    assert runs.resumable_sync(db.engine) is None
    with pytest.raises(KamiyoError, match="nothing to resume"):
        sync(db, gateway, resume=True)


def test_429_storms_and_500s_are_ridden_out_with_backoff(
    db: Db, account: FakeStripe, gateway: StripeApiGateway
) -> None:
    for n in range(1, 121):
        paying_customer(account, n)
    account.fail_next(429, 2)  # three failures, fewer than the 4 attempts: the first page gets through
    account.fail_next(500, 1)
    account.fail_next(429, 3, after=1)  # and so does the second

    summary = sync(db, gateway)

    assert (summary.status, summary.seen) == (runs.DONE, 120)
    assert account.pending_faults() == 0
    assert account.count_requests("/v1/subscriptions") == 2 + 6
    assert len(db.states()) == 120


def test_a_429_storm_that_outlasts_the_retries_fails_the_run_and_names_it(
    db: Db, account: FakeStripe, gateway: StripeApiGateway
) -> None:
    paying_customer(account, 1)
    account.fail_next(429, 50)

    with pytest.raises(StripeApiError, match=r"still failing after 4 attempts: 429 RateLimitError"):
        sync(db, gateway)

    assert account.count_requests("/v1/subscriptions") == TEST_RETRY.attempts
    run = runs.resumable_sync(db.engine)
    assert run is not None
    assert run.status == runs.FAILED
    assert "429" in (run.error or "")


def test_a_newer_webhook_snapshot_wins_over_the_sync_and_an_older_one_loses(
    db: Db, account: FakeStripe, gateway: StripeApiGateway
) -> None:
    sub = paying_customer(account, 1)
    db.deliver(synthetic.event("customer.created", account.customer("cus_00001"), created=1_700_000_100))
    future = int(time.time()) + 60
    # A webhook from after the API read (past_due) is already stored when the (older) read lands.
    db.deliver(webhook_for({**sub, "status": "past_due"}, "customer.subscription.updated", created=future))
    db.drain()

    summary = sync(db, gateway)

    assert summary.kept == 1
    assert db.state("user1@example.com") == ("pro", "past_due")
    # A webhook from before the read, delivered late, cannot undo what the read found.
    other = paying_customer(account, 2)
    sync(db, gateway)
    db.deliver(
        webhook_for({**other, "status": "unpaid"}, "customer.subscription.updated", created=int(time.time()) - 5)
    )
    db.drain()
    assert db.state("user2@example.com") == ("pro", "active")


def test_a_subscription_whose_price_maps_to_no_tier_is_skipped_and_reported(
    db: Db, account: FakeStripe, gateway: StripeApiGateway
) -> None:
    paying_customer(account, 1, price="price_unknown")
    paying_customer(account, 2)

    summary = sync(db, gateway)

    assert (summary.seen, summary.stored, summary.skipped) == (2, 1, 1)
    assert summary.problems[0].startswith("sub_00001: price price_unknown of sub_00001 maps to no tier")
    assert db.state("user2@example.com") == ("pro", "active")
    assert db.subscription("sub_00001") is None


def test_a_canceled_subscription_whose_price_maps_to_no_tier_is_stored_as_free(
    db: Db, account: FakeStripe, gateway: StripeApiGateway
) -> None:
    """It entitles to nothing, so its tier does not matter: no problem to report, the user's status follows it."""
    paying_customer(account, 1, status="canceled", price="price_retired")

    summary = sync(db, gateway)

    assert (summary.seen, summary.stored, summary.skipped, summary.problems) == (1, 1, 0, [])
    stored = db.subscription("sub_00001")
    assert stored is not None
    assert (stored["status"], stored["tier"]) == ("canceled", "free")
    assert db.state("user1@example.com") == ("free", "canceled")


def test_a_sync_scoped_to_a_customer_or_an_email_touches_only_those(
    db: Db, account: FakeStripe, gateway: StripeApiGateway
) -> None:
    for n in range(1, 6):
        paying_customer(account, n)
    paying_customer(account, 6, email="User3@Example.com")  # Stripe's email filter is exact: both spellings

    by_customer = sync(db, gateway, scope=SyncScope(customer="cus_00002"))
    by_email = sync(db, gateway, scope=SyncScope(email="User3@Example.com"))

    assert by_customer.seen == 1
    assert by_email.seen == 2
    assert set(db.states()) == {"user2@example.com", "user3@example.com"}
    assert runs.get_run(db.engine, by_email.run_id).scope == "email=User3@Example.com"
    with pytest.raises(KamiyoError, match=r"no Stripe customer has the email nobody@example\.com"):
        sync(db, gateway, scope=SyncScope(email="nobody@example.com"))


def test_a_wrong_api_key_fails_with_a_message_that_does_not_contain_it(db: Db, stripe_api: StripeApiServer) -> None:
    wrong = "sk_test_not_the_right_key_987654321"
    gateway = StripeApiGateway(wrong, stripe_api.url, budget=RateBudget(100), retry=TEST_RETRY)

    with pytest.raises(StripeApiError) as caught:
        sync(db, gateway)

    assert "401" in str(caught.value)
    assert wrong not in str(caught.value)
    run = runs.latest_run(db.engine, "sync")
    assert run is not None
    assert run.status == runs.FAILED
    assert wrong not in (run.error or "")


def test_statistics_are_refreshed_as_often_as_the_tables_can_have_grown_fourfold() -> None:
    assert [n for n in range(1, 300) if _refresh_statistics_after(n)] == [1, 4, 16, 64, 256]


def test_on_postgresql_a_sync_leaves_the_planner_statistics_of_what_it_filled(
    db: Db, account: FakeStripe, gateway: StripeApiGateway
) -> None:
    """A first sync fills empty tables faster than autovacuum analyzes them; the sync analyzes them
    itself (on SQLite there is nothing to do: its planner needs no statistics for these lookups)."""
    paying_customer(account, 1)
    sync(db, gateway)
    if db.engine.dialect.name != "postgresql":
        assert db.state("user1@example.com") == ("pro", "active")
        return
    with db.engine.connect() as connection:
        analyzed = connection.exec_driver_sql(
            "SELECT relname FROM pg_stat_user_tables WHERE last_analyze IS NOT NULL"
            " AND relname IN ('stripe_customers', 'stripe_subscriptions', 'users')"
        )
        assert sorted(row[0] for row in analyzed) == ["stripe_customers", "stripe_subscriptions", "users"]


def test_the_reader_process_continues_after_the_pages_read_while_it_started(
    account: FakeStripe, gateway: StripeApiGateway, caplog: pytest.LogCaptureFixture
) -> None:
    # While the child process starts, the first pages are read here; the child then reads the
    # rest from the cursor after them: every subscription once, in the list's order.
    for n in range(1, 501):  # five pages
        paying_customer(account, n)
    expected = [s["id"] for s in account.subscriptions()]  # the list's order
    seen: list[str] = []
    caplog.set_level("DEBUG", logger="kamiyo.reconcile")
    pages = ProcessReader(gateway, parse_price_tiers(PRICE_TIERS), "sync:1", None)
    try:
        for page in pages:
            seen.extend(item.snapshot.id for item in page.items)
            assert page.last_id == seen[-1]
            if len(seen) == 200:  # pages read here until now; the child takes over within the list
                assert pages._ready.wait(60)
    finally:
        pages.close()
    assert seen == expected
    handoffs = [r.getMessage() for r in caplog.records if "reader process ready" in r.getMessage()]
    assert len(handoffs) == 1, handoffs
    assert " after 0 pages" not in handoffs[0], handoffs  # (a child ready at once would read them all)


def test_a_sync_commits_its_pages_at_normal_and_its_run_at_the_configured_level(
    tmp_path: Path, account: FakeStripe, gateway: StripeApiGateway
) -> None:
    """SQLite: a page can be read from Stripe again (and the run's cursor moves with it), so its
    commit does not wait for the disk; the run's own rows and its audit entry do (FULL)."""
    for n in range(1, 4):
        paying_customer(account, n)
    settings = make_settings(f"sqlite:///{tmp_path / 'sync.db'}")
    engine = make_engine(settings)
    try:
        upgrade(engine)
        levels = commit_levels(engine)
        summary = sync_subscriptions(engine, gateway, settings.price_tiers)
    finally:
        engine.dispose()
    assert (summary.status, summary.seen, summary.changed) == (runs.DONE, 3, 3)
    normal, full = 1, 2
    page = levels.index(normal)
    assert levels.count(normal) == 1  # one page of 3
    assert page > 0  # the run opened before it
    assert len(levels) > page + 1  # and finished and audited after it
    assert set(levels[:page] + levels[page + 1 :]) == {full}
