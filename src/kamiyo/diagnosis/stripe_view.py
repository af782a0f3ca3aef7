"""The runbook's Step 4 without a browser: the webhook endpoint as Stripe sees it.

A narrow interface (``StripeWebhookView``) implemented over the reconcile gateway
(``reconcile/gateway.py``: the official ``stripe`` library, retries, the rate budget); tests point
it at a Stripe-compatible server on 127.0.0.1 through ``STRIPE_API_BASE``. Needs
``STRIPE_SECRET_KEY`` (a restricted key with read access to webhook endpoints and events is enough).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from kamiyo.config import Settings
from kamiyo.reconcile.gateway import EventQuery, StripeGateway, gateway_from_settings
from kamiyo.reconcile.retry import RetryPolicy

# The seven event types the runbook's Option 4 subscribes the endpoint to.
RUNBOOK_EVENTS = (
    "payment_intent.succeeded",
    "payment_intent.payment_failed",
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
    "invoice.payment_succeeded",
    "invoice.payment_failed",
)


@dataclass(frozen=True)
class EndpointView:
    """One webhook endpoint as Stripe reports it."""

    id: str
    url: str
    status: str  # enabled | disabled
    api_version: str | None
    enabled_events: tuple[str, ...]

    def missing_events(self) -> list[str]:
        """The runbook's event types this endpoint is not subscribed to (``*`` covers all)."""
        if "*" in self.enabled_events:
            return []
        return [event for event in RUNBOOK_EVENTS if event not in self.enabled_events]


@dataclass(frozen=True)
class UndeliveredCount:
    count: int
    capped: bool  # True when counting stopped at the cap: "at least"


class StripeWebhookView(Protocol):
    def webhook_endpoints(self) -> list[EndpointView]: ...

    def undelivered_events(self, *, cap: int = 1000) -> UndeliveredCount: ...


class GatewayWebhookView:
    """``StripeWebhookView`` over the reconcile gateway (one narrow interface to Stripe for all of kamiyo)."""

    def __init__(self, gateway: StripeGateway) -> None:
        self._gateway = gateway

    def webhook_endpoints(self) -> list[EndpointView]:
        endpoints: list[EndpointView] = []
        after: str | None = None
        while True:
            page = self._gateway.list_webhook_endpoints(starting_after=after)
            for e in page.data:
                endpoints.append(
                    EndpointView(
                        id=str(e.get("id")),
                        url=str(e.get("url")),
                        status=str(e.get("status")),
                        api_version=e.get("api_version"),
                        enabled_events=tuple(str(t) for t in e.get("enabled_events") or ()),
                    )
                )
            if not page.has_more or not page.data:
                return endpoints
            after = str(page.data[-1]["id"])

    def undelivered_events(self, *, cap: int = 1000) -> UndeliveredCount:
        """Events Stripe has not delivered to some endpoint (pending retries or failed), last 30 days."""
        count = 0
        after: str | None = None
        while True:
            page = self._gateway.list_events(EventQuery(delivery_success=False), starting_after=after)
            count += len(page.data)
            if count >= cap:
                return UndeliveredCount(count, True)
            if not page.has_more or not page.data:
                return UndeliveredCount(count, False)
            after = str(page.data[-1]["id"])


# Doctor is interactive: an unreachable API is a finding after a couple of tries, not a long wait.
_DOCTOR_RETRY = RetryPolicy(attempts=2, base_seconds=0.2, cap_seconds=1.0)


def stripe_view(settings: Settings) -> StripeWebhookView | None:
    """The real view when an API key is configured, else None."""
    gateway = gateway_from_settings(settings, retry=_DOCTOR_RETRY)
    return None if gateway is None else GatewayWebhookView(gateway)
