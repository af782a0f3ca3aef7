"""API-verified state for the worker, when ``STRIPE_SECRET_KEY`` is set.

Before the worker claims a batch, ``EventVerifier.prepare`` looks at the subscription events it
is about to apply (a read, outside the batch's transaction: no lock is held while Stripe is
called) and:

- fetches each customer that is not linked to a user yet and links it by its email, so the
  subscription takes effect now instead of waiting for an event that names the email;
- with ``STRIPE_VERIFY_EVENTS=true``, fetches each subscription once, however many events of it
  wait (a burst is one fetch), and the worker applies the fetched state instead of the payload.
  The fetch is at least as new as every waiting event, so the order events arrive in can no
  longer matter.

Calls go through the process's rate budget. When the API fails, the worker applies the events as
delivered (the version keys keep that correct), after a short retry: the queue never stalls on
an API outage.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import orjson
from sqlalchemy import Engine, select

from kamiyo.config import Settings
from kamiyo.db.models import customers_table, events_table
from kamiyo.domain.links import normalize_email
from kamiyo.domain.outcomes import InboxStatus, Outcome
from kamiyo.domain.rules import SUBSCRIPTION_TYPES, StoredEvent
from kamiyo.domain.subscriptions import object_id
from kamiyo.errors import StripeApiError
from kamiyo.processing.engine import link_customer_now
from kamiyo.reconcile.gateway import Fetched, StripeGateway, gateway_from_settings, read_version_created
from kamiyo.reconcile.retry import WORKER_RETRY
from kamiyo.telemetry.metrics import PROBE_EVENT_PREFIX

log = logging.getLogger("kamiyo.reconcile")
VERIFIED_PREFIX = "verified:"
_events = events_table
_customers = customers_table


@dataclass(frozen=True)
class _Waiting:
    event_id: str
    subscription_id: str | None
    customer_id: str | None


class EventVerifier:
    """Prepares the worker's next batch with the API's view (see the module docstring)."""

    def __init__(self, gateway: StripeGateway, settings: Settings) -> None:
        self.gateway = gateway
        self.settings = settings
        self.verify_subscriptions = settings.stripe_verify_events
        self._fetched: dict[str, Fetched] = {}

    def prepare(self, engine: Engine, limit: int, now: float) -> None:
        """Fetch what the next ``limit`` pending events need; link customers whose email was unknown."""
        self._fetched = {}
        waiting = _waiting_subscription_events(engine, limit, now)
        if not waiting:
            return
        customers: dict[str, str | None] = {}  # customer id -> email, when a fetch told it
        read_at: dict[str, int] = {}
        try:
            if self.verify_subscriptions:
                for subscription_id in dict.fromkeys(w.subscription_id for w in waiting if w.subscription_id):
                    fetched = self.gateway.retrieve_subscription(subscription_id)
                    if fetched is None:
                        log.warning(
                            "verify: Stripe has no subscription %s; applying its events as delivered", subscription_id
                        )
                        continue
                    self._fetched[subscription_id] = fetched
                    customer = fetched.obj.get("customer")
                    if isinstance(customer, dict) and object_id(customer):
                        customers[str(object_id(customer))] = _email(customer)
                        read_at[str(object_id(customer))] = fetched.read_at
            wanted = {w.customer_id for w in waiting if w.customer_id} | set(customers)
            for customer_id in sorted(_unlinked(engine, wanted)):
                if customer_id not in customers:
                    found = self.gateway.retrieve_customer(customer_id)
                    if found is None:
                        continue
                    customers[customer_id] = _email(found.obj)
                    read_at[customer_id] = found.read_at
                email = customers.get(customer_id)
                if email:
                    self._link(engine, customer_id, email, read_at[customer_id])
        except StripeApiError as exc:
            log.warning("verify: Stripe's API failed (%s); applying the waiting events as delivered", exc)

    def verified(self, event: StoredEvent) -> StoredEvent:
        """``event`` with the fetched subscription in place of its payload, when one was fetched."""
        if event.type not in SUBSCRIPTION_TYPES:
            return event
        fetched = self._fetched.get(object_id(event.obj.get("id")) or "")
        if fetched is None:
            return event
        # The fetch came after the event was stored: it is at least as new as the event.
        created = max(read_version_created(fetched.read_at), event.created)
        return replace(event, obj=fetched.obj, created=created, event_id=(VERIFIED_PREFIX + event.event_id)[:255])

    def _link(self, engine: Engine, customer_id: str, email: str, seen_at: int) -> None:
        with engine.begin() as connection:
            outcome = link_customer_now(connection, self.settings.price_tiers, customer_id, email, seen_at)
        log.info("verify: looked up customer %s: %s", customer_id, Outcome(customer=outcome).describe())


def event_verifier(settings: Settings, gateway: StripeGateway | None = None) -> EventVerifier | None:
    """The worker's verifier when an API key (or a test's gateway) is there, else None."""
    gateway = gateway or gateway_from_settings(settings, retry=WORKER_RETRY)
    return EventVerifier(gateway, settings) if gateway is not None else None


def _waiting_subscription_events(engine: Engine, limit: int, now: float) -> list[_Waiting]:
    """The subscription events among the next ``limit`` the worker will claim."""
    with engine.connect().execution_options(readonly=True) as connection:
        rows = connection.execute(
            select(_events.c.stripe_event_id, _events.c.type, _events.c.object_id, _events.c.payload)
            .where(_events.c.status == InboxStatus.PENDING.value, _events.c.available_at <= now)
            .order_by(_events.c.id)
            .limit(limit)
        ).all()
    waiting = []
    for row in rows:
        # doctor's probe names a customer and subscription that exist nowhere but here
        if row.type not in SUBSCRIPTION_TYPES or row.stripe_event_id.startswith(PROBE_EVENT_PREFIX):
            continue
        waiting.append(_Waiting(row.stripe_event_id, row.object_id, _payload_customer(row.payload)))
    return waiting


def _payload_customer(payload: str) -> str | None:
    try:
        obj = orjson.loads(payload)["data"]["object"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    return object_id(obj.get("customer")) if isinstance(obj, dict) else None


def _unlinked(engine: Engine, customer_ids: Iterable[str]) -> set[str]:
    """Those of ``customer_ids`` not linked to a user (including those never seen)."""
    wanted = set(customer_ids)
    if not wanted:
        return set()
    with engine.connect().execution_options(readonly=True) as connection:
        linked = connection.execute(
            select(_customers.c.id).where(_customers.c.id.in_(wanted), _customers.c.user_id.is_not(None))
        ).scalars()
        return wanted - set(linked)


def _email(customer: dict[str, Any]) -> str | None:
    return None if customer.get("deleted") else normalize_email(customer.get("email"))
