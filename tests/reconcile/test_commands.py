"""The runbook's ``python -c`` line, ``kamiyo sync`` and ``kamiyo backfill``, run as an operator runs them.

Real processes (the venv's interpreter) against the local Stripe-compatible API and a SQLite
file: the settings come from the environment, exactly as in the container.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from api.payments.stripe_client import RUNBOOK_REASON

from kamiyo import synthetic
from kamiyo.cli.sync import SyncPrinter
from kamiyo.config import Settings
from kamiyo.db.engine import make_engine
from kamiyo.db.migrate import upgrade
from kamiyo.operations.audit import default_actor
from kamiyo.reconcile.sync import SyncSummary
from reconcile.harness import paying_customer
from stripe_api import API_KEY, FakeStripe, StripeApiServer
from support import PRICE_TIERS, SECRET, make_settings, throwaway_postgres

REPO = Path(__file__).resolve().parents[2]
RUNBOOK_LINE = "from api.payments.stripe_client import sync_all_subscriptions; sync_all_subscriptions()"
KAMIYO = [str(Path(sys.executable).with_name("kamiyo"))]


@pytest.fixture
def database(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'kamiyo.db'}"
    engine = make_engine(make_settings(url))
    upgrade(engine)
    engine.dispose()
    return url


def environment(database: str, api: StripeApiServer, **extra: str) -> dict[str, str]:
    """The process environment with every kamiyo setting set here, none inherited."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STRIPE_", "WORKER_", "BACKFILL_", "KAMIYO_"))}
    env.update(
        DATABASE_URL=database,
        STRIPE_SECRET_KEY=API_KEY,
        STRIPE_API_BASE=api.url,
        STRIPE_WEBHOOK_SECRET=SECRET,
        STRIPE_PRICE_TIERS=PRICE_TIERS,
        LOG_LEVEL="INFO",
        METRICS_ENABLED="false",
    )
    env.update(extra)
    return env


def run(command: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False, stdin=subprocess.DEVNULL
    )


def users(database: str) -> dict[str, tuple[str, str | None]]:
    from sqlalchemy import select

    from kamiyo.db.models import users_table

    engine = make_engine(make_settings(database))
    with engine.connect() as connection:
        rows = connection.execute(
            select(users_table.c.email, users_table.c.subscription_tier, users_table.c.subscription_status)
        ).all()
    engine.dispose()
    return {row[0]: (row[1], row[2]) for row in rows}


def test_the_runbooks_python_line_syncs_every_subscription_from_the_repository_root(
    database: str, account: FakeStripe, stripe_api: StripeApiServer
) -> None:
    for n in range(1, 4):
        paying_customer(account, n)
    paying_customer(account, 4, status="canceled")

    result = run([sys.executable, "-c", RUNBOOK_LINE], environment(database, stripe_api, LOG_LEVEL="DEBUG"), REPO)

    assert result.returncode == 0, result.stderr
    assert "changed  user1@example.com  free/- -> pro/active" in result.stdout
    assert "4 subscriptions read, 4 applied" in result.stdout
    assert users(database) == {
        "user1@example.com": ("pro", "active"),
        "user2@example.com": ("pro", "active"),
        "user3@example.com": ("pro", "active"),
        "user4@example.com": ("free", "canceled"),
    }
    assert API_KEY not in result.stdout + result.stderr  # not even at DEBUG
    audit = run([*KAMIYO, "audit"], environment(database, stripe_api), REPO)
    assert audit.returncode == 0, audit.stderr
    assert f"sync             by {default_actor()}  on all subscriptions: {RUNBOOK_REASON}" in audit.stdout
    assert '"users_changed":4' in audit.stdout
    assert '"user1@example.com":{"tier":"free","status":null}' in audit.stdout  # before


def test_the_runbooks_python_line_names_a_missing_key_in_one_line(database: str, stripe_api: StripeApiServer) -> None:
    env = environment(database, stripe_api)
    del env["STRIPE_SECRET_KEY"]

    result = run([sys.executable, "-c", RUNBOOK_LINE], env, REPO)

    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "sync_all_subscriptions: STRIPE_SECRET_KEY is not set: reconciling needs read access to Stripe's API"
    )
    assert "Traceback" not in result.stderr


def test_kamiyo_sync_dry_run_in_a_pipe_prints_plain_progress_and_the_drift_it_would_fix(
    database: str, account: FakeStripe, stripe_api: StripeApiServer, tmp_path: Path
) -> None:
    paying_customer(account, 1)

    result = run([*KAMIYO, "sync", "--dry-run"], environment(database, stripe_api), tmp_path)

    assert result.returncode == 0, result.stderr
    assert "would change  user1@example.com  free/- -> pro/active  because sub_00001 was missing here" in result.stdout
    assert "dry run: nothing was written" in result.stdout
    assert "sync: 1 subscriptions, 1 users to change" in result.stderr
    assert "\r" not in result.stderr
    assert "\x1b" not in result.stderr
    assert users(database) == {}
    audit = run([*KAMIYO, "audit"], environment(database, stripe_api), tmp_path)
    assert audit.stdout.strip() == "no manual actions recorded"  # a dry run writes nothing, not even that


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def any_database(request: pytest.FixtureRequest, database: str) -> Iterator[str]:
    """The SQLite file of ``database``, or a fresh migrated PostgreSQL database."""
    if request.param == "sqlite":
        yield database
        return
    with throwaway_postgres() as url:
        engine = make_engine(make_settings(url))
        upgrade(engine)
        engine.dispose()
        yield url


def test_kamiyo_sync_dry_run_json_prints_one_document_with_counts_changes_and_skips(
    any_database: str, account: FakeStripe, stripe_api: StripeApiServer, tmp_path: Path
) -> None:
    paying_customer(account, 1)
    paying_customer(account, 2, price="price_nobody_mapped")

    result = run([*KAMIYO, "sync", "--dry-run", "--json"], environment(any_database, stripe_api), tmp_path)

    assert result.returncode == 1, result.stderr  # a subscription could not be applied
    report = orjson.loads(result.stdout)
    assert (report["dry_run"], report["status"], report["error"]) == (True, "done", None)
    assert report["counts"] == {"seen": 2, "stored": 1, "kept": 0, "linked": 1, "changed": 1, "skipped": 1}
    assert report["changes"] == [
        {
            "email": "user1@example.com",
            "before": {"tier": "free", "status": None},
            "after": {"tier": "pro", "status": "active"},
            "reasons": ["sub_00001 was missing here; Stripe has it active (pro)", "customer cus_00001 linked by email"],
        }
    ]
    [skipped] = report["skipped"]
    assert skipped.startswith("sub_00002: price price_nobody_mapped of sub_00002 maps to no tier")
    assert users(any_database) == {}


def test_kamiyo_sync_exits_1_when_a_subscription_could_not_be_applied(
    database: str, account: FakeStripe, stripe_api: StripeApiServer, tmp_path: Path
) -> None:
    paying_customer(account, 1, price="price_nobody_mapped")

    result = run([*KAMIYO, "sync", "--yes"], environment(database, stripe_api), tmp_path)

    assert result.returncode == 1
    assert "skipped  sub_00001: price price_nobody_mapped of sub_00001 maps to no tier" in result.stdout


def test_kamiyo_backfill_stores_and_applies_the_undelivered_events(
    database: str, account: FakeStripe, stripe_api: StripeApiServer, tmp_path: Path
) -> None:
    sub = paying_customer(account, 1)
    now = int(time.time())
    account.add_event(
        synthetic.event("customer.created", account.customer("cus_00001"), created=now - 600), delivered=False
    )
    account.add_event(
        synthetic.event("customer.subscription.created", {**sub, "customer": "cus_00001"}, created=now - 500),
        delivered=False,
    )

    result = run([*KAMIYO, "backfill", "--since", "2h"], environment(database, stripe_api), tmp_path)

    assert result.returncode == 0, result.stderr
    assert "2 undelivered event(s) listed, 2 new stored in the inbox" in result.stdout
    assert "applied: the worker handled 2 event(s)" in result.stdout
    assert users(database) == {"user1@example.com": ("pro", "active")}
    audit = run([*KAMIYO, "audit", "--since", "1h"], environment(database, stripe_api), tmp_path)
    assert f"backfill         by {default_actor()}  on undelivered events" in audit.stdout
    assert '"start":"--since"' in audit.stdout
    assert '"stored":2' in audit.stdout


def test_the_first_kamiyo_backfill_needs_no_since_and_says_it_read_30_days(
    database: str, account: FakeStripe, stripe_api: StripeApiServer, tmp_path: Path
) -> None:
    sub = paying_customer(account, 1)
    account.add_event(
        synthetic.event(
            "customer.subscription.created", {**sub, "customer": "cus_00001"}, created=int(time.time()) - 9 * 86400
        ),
        delivered=False,
    )

    result = run([*KAMIYO, "backfill"], environment(database, stripe_api), tmp_path)

    assert result.returncode == 0, result.stderr
    assert "(the first backfill: all of Stripe's 30 days): 1 undelivered event(s) listed, 1 new" in result.stdout
    assert "first backfill: no earlier one to start from" in result.stdout
    assert "WARNING" not in result.stderr
    assert users(database) == {"user1@example.com": ("pro", "active")}


def test_kamiyo_sync_that_writes_needs_yes_in_a_pipe_and_asks_on_a_terminal(
    database: str, account: FakeStripe, stripe_api: StripeApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kamiyo.cli import sync as reconcile
    from kamiyo.cli.confirm import NotConfirmed
    from kamiyo.config import load_settings

    paying_customer(account, 1)
    result = run([*KAMIYO, "sync"], environment(database, stripe_api), tmp_path)
    assert result.returncode == 2
    assert "about to sync every subscription from Stripe's API" in result.stderr
    assert "add --yes" in result.stderr
    assert users(database) == {}

    class Terminal:
        def isatty(self) -> bool:
            return True

        def readline(self) -> str:
            return "\n"  # just Enter: the default is no

    monkeypatch.setattr("sys.stdin", Terminal())
    settings = load_settings(environment(database, stripe_api), env_file=None)
    with pytest.raises(NotConfirmed) as refused:
        reconcile.sync(settings, customer="cus_00001", out=io.StringIO(), err=io.StringIO())
    assert refused.value.exit_code == 1
    assert users(database) == {}
    # The runbook's Python line (test above, stdin not a terminal) and a dry run never ask.
    assert run([*KAMIYO, "sync", "--dry-run"], environment(database, stripe_api), tmp_path).returncode == 0


def test_resume_cannot_be_combined_with_a_scope(database: str, stripe_api: StripeApiServer, tmp_path: Path) -> None:
    result = run([*KAMIYO, "sync", "--resume", "--email", "a@example.com"], environment(database, stripe_api), tmp_path)

    assert result.returncode == 2
    assert "not allowed with argument" in result.stderr


def test_on_a_terminal_the_progress_is_richs_bar_and_drift_lines_print_above_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    out, err = io.StringIO(), Terminal()
    with SyncPrinter(out, err, dry_run=False) as printer:
        printer.on_page(SyncSummary(run_id=1, dry_run=False, scope=None, seen=100, changed=0, seconds=0.5))
        printer.on_page(SyncSummary(run_id=1, dry_run=False, scope=None, seen=200, changed=3, seconds=1.0))
        printer.progress._bar.refresh()  # type: ignore[union-attr]  # draw now, not at rich's next tick
        printer.on_problem("sub_1: no tier")

    drawn = err.getvalue()
    assert "\x1b[" in drawn  # drawn in place by rich, on the terminal
    assert "200 subscriptions, 3 users changed, 200/s" in drawn
    assert "━" in drawn  # the bar
    assert out.getvalue() == "skipped  sub_1: no tier\n"  # the report stays on stdout (not a terminal)


def test_in_a_pipe_or_with_no_color_the_progress_is_plain_lines_without_escape_codes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for err, no_color in ((io.StringIO(), None), (Terminal(), "1")):
        if no_color:
            monkeypatch.setenv("NO_COLOR", no_color)
        out = io.StringIO()
        with SyncPrinter(out, err, dry_run=True) as printer:
            printer.on_page(SyncSummary(run_id=1, dry_run=True, scope=None, seen=100, changed=2, seconds=0.5))
            printer.on_page(SyncSummary(run_id=1, dry_run=True, scope=None, seen=200, changed=3, seconds=1.0))
        # The first page at once, the next only after five seconds.
        assert err.getvalue() == "sync: 100 subscriptions, 2 users to change, 200/s\n"


def test_settings_for_the_api_are_read_and_checked_by_name() -> None:
    from kamiyo.config import load_settings
    from kamiyo.errors import ConfigError

    on = load_settings({"STRIPE_SECRET_KEY": "rk_live_abc123", "STRIPE_VERIFY_EVENTS": "true"}, env_file=None)
    off = load_settings({}, env_file=None)
    assert (on.stripe_rate_limit, on.stripe_verify_events, on.backfill_interval_seconds) == (20.0, True, 600)
    assert (off.stripe_secret_key, off.backfill_interval_seconds) == (None, 0)
    assert isinstance(on, Settings)
    for name, value in [
        ("STRIPE_SECRET_KEY", "pk_live_publishable"),
        ("STRIPE_SECRET_KEY", "sk_live_has space"),
        ("STRIPE_API_BASE", "api.stripe.com"),
        ("STRIPE_RATE_LIMIT", "0"),
        ("STRIPE_VERIFY_EVENTS", "sometimes"),
        ("BACKFILL_INTERVAL_SECONDS", "-5"),
    ]:
        with pytest.raises(ConfigError, match=f"^{name}:") as caught:
            load_settings({name: value}, env_file=None)
        if name == "STRIPE_SECRET_KEY":
            assert value not in str(caught.value)
