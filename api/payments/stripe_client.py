"""The runbook's recovery entry point, exactly as it is written there::

    docker exec kamiyo python -c "
    from api.payments.stripe_client import sync_all_subscriptions
    sync_all_subscriptions()
    "

It reads the settings like every kamiyo command (environment, then ``.env``), lists every
subscription from Stripe's API and converges each user's tier and status on it, printing the
drift report. It is ``kamiyo sync``; see ``kamiyo.reconcile.sync``.
"""

from __future__ import annotations

import sys

from kamiyo.reconcile.sync import SyncSummary

__all__ = ["sync_all_subscriptions"]
RUNBOOK_REASON = "sync_all_subscriptions() (the runbook's recovery line)"


def sync_all_subscriptions(
    *,
    dry_run: bool = False,
    customer: str | None = None,
    email: str | None = None,
    resume: bool = False,
    by: str | None = None,
    reason: str | None = None,
) -> SyncSummary:
    """Sync every subscription (or one customer's, or one email's) from Stripe's API; print what changed.

    Unless ``dry_run``, the run is recorded in the audit log (``kamiyo audit``) as done by the OS
    user, with ``by`` beside it as a claim when it names someone else, for ``reason`` (default:
    "sync_all_subscriptions()", the runbook's line).

    A setting, API or database failure prints one line naming it and exits with status 1
    (this runs from ``python -c``, where a traceback would only hide the message).
    """
    from kamiyo.cli.sync import run_sync
    from kamiyo.config import load_settings
    from kamiyo.errors import KamiyoError
    from kamiyo.logs import configure_logging

    try:
        settings = load_settings()
        configure_logging(settings.log_level, log_format=settings.log_format)
        return run_sync(
            settings,
            dry_run=dry_run,
            customer=customer,
            email=email,
            resume=resume,
            by=by,
            reason=reason or RUNBOOK_REASON,
        )
    except KamiyoError as exc:
        print(f"sync_all_subscriptions: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
