"""Reconcile with Stripe's API, the source of truth that webhooks only hint at (issue 3).

gateway.py    the one narrow interface to Stripe's API (official ``stripe`` library behind it)
ratelimit.py  the request budget shared by every caller (STRIPE_RATE_LIMIT)
retry.py      backoff with jitter for 429s, 5xx and network errors
runs.py       ``reconcile_runs`` rows: progress, the cursor ``--resume`` continues from, outcome
apply.py      one page of subscriptions applied as a set, by the rules of ``processing/store.py``
drift.py      what a sync changed for each user, and why
sync.py       ``kamiyo sync`` and the runbook's ``sync_all_subscriptions``
backfill.py   ``kamiyo backfill``: undelivered events from the Events API into the inbox
schedule.py   the backfill on a timer, inside the worker
verify.py     the worker's API-verified events (STRIPE_VERIFY_EVENTS) and customer look-ups
"""
