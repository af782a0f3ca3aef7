"""Reconcile with Stripe's API, the source of truth that webhooks only hint at.

- ``gateway.py``: the one narrow interface to Stripe's API (the official ``stripe`` library)
- ``ratelimit.py``: the request budget shared by every caller (``STRIPE_RATE_LIMIT``)
- ``retry.py``: backoff with jitter for 429s, 5xx and network errors
- ``runs.py``: ``reconcile_runs`` rows: progress, the cursor ``--resume`` continues from, outcome
- ``reader.py``: a sync's pages read ahead (a thread, or a second process): JSON to snapshots
- (a page is applied by the apply engine, ``processing/engine.py`` ``apply_sync_page``; its drift)
- ``sync.py``: ``kamiyo sync`` and the runbook's ``sync_all_subscriptions``
- ``backfill.py``: ``kamiyo backfill``: undelivered events from the Events API into the inbox
- ``schedule.py``: the backfill on a timer, inside the worker
- ``verify.py``: the worker's customer look-ups and API-verified events (``STRIPE_VERIFY_EVENTS``)
"""
