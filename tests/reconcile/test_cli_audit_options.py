"""``kamiyo sync`` and ``kamiyo backfill`` take ``--by`` and ``--reason`` for the audit log; ``--help`` says
where the first backfill starts."""

from __future__ import annotations

import os
import time
from pathlib import Path

from kamiyo import synthetic
from kamiyo.operations.audit import default_actor
from reconcile.harness import paying_customer
from reconcile.test_commands import KAMIYO, database, environment, run
from stripe_api import FakeStripe, StripeApiServer

__all__ = ["database"]  # the fixture, shared with test_commands


def test_kamiyo_sync_and_backfill_record_by_and_reason(
    database: str, account: FakeStripe, stripe_api: StripeApiServer, tmp_path: Path
) -> None:
    sub = paying_customer(account, 1)
    account.add_event(
        synthetic.event(
            "customer.subscription.created", {**sub, "customer": "cus_00001"}, created=int(time.time()) - 60
        ),
        delivered=False,
    )
    env = environment(database, stripe_api)

    synced = run([*KAMIYO, "sync", "--yes", "--by", "alice", "--reason", "INC-1 webhooks down"], env, tmp_path)
    backfilled = run([*KAMIYO, "backfill", "--since", "1h", "--by", "bob", "--reason", "INC-1 catch up"], env, tmp_path)
    audit = run([*KAMIYO, "audit"], env, tmp_path)

    assert synced.returncode == 0, synced.stderr
    assert backfilled.returncode == 0, backfilled.stderr
    # The OS user is the proven actor; --by is kept beside it as a claim.
    me = default_actor()
    assert f"sync             by {me} (claims to be alice)  on all subscriptions: INC-1 webhooks down" in audit.stdout
    assert f"backfill         by {me} (claims to be bob)  on undelivered events: INC-1 catch up" in audit.stdout


def test_backfill_help_says_where_the_first_backfill_starts(tmp_path: Path) -> None:
    result = run([*KAMIYO, "backfill", "--help"], dict(os.environ), tmp_path)

    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "the very first backfill, with no earlier one to start from, reads all of Stripe's 30 days" in text
    assert "--by" in text
    assert "--reason" in text
