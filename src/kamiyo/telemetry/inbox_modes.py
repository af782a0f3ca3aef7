"""Which of Stripe's modes the newest inbox events are in.

A service with neither ``STRIPE_MODE`` nor an API key takes events of both modes; the webhook
health check, the metrics and ``kamiyo doctor`` warn when test-mode and live-mode events both
arrive (a test endpoint and a live one pointed at one service, say). The question is asked of
the newest ``MODE_WINDOW`` events, read backwards along the primary key: the same cost whatever
the inbox's size, no index for every delivery to keep, and the warning ends once only one mode
arrives again.
"""

from __future__ import annotations

from sqlalchemy import Engine, select

from kamiyo.db.models import events_table
from kamiyo.domain.modes import event_mode

MODE_WINDOW = 2000
_events = events_table


def recent_modes(engine: Engine) -> frozenset[str]:
    """The modes (``live``, ``test``) of the newest ``MODE_WINDOW`` events; empty for an empty inbox."""
    newest = select(_events.c.livemode).order_by(_events.c.id.desc()).limit(MODE_WINDOW).subquery()
    with engine.connect().execution_options(readonly=True) as connection:
        found = connection.execute(select(newest.c.livemode).distinct()).scalars().all()
    return frozenset(event_mode(bool(livemode)) for livemode in found)
