"""The errors kamiyo raises on purpose, as one small tree.

    KamiyoError
    ├── ConfigError                  a setting is missing or malformed (fails at start)
    ├── WebhookRejected              a delivery we refuse; carries the HTTP status and a reason code
    │   ├── SignatureError           missing / malformed header, no matching v1, stale timestamp
    │   ├── PayloadError             the signed body is not a JSON Stripe event
    │   └── PayloadTooLarge          body over the configured limit
    ├── ApplyError                   an event cannot be applied yet; it is retried, then parked
    │   └── UnmappedPrice            a price that no tier is configured for
    └── StripeApiError               Stripe's API refused a request, or kept failing through the retries
        └── StripeCursorGone         a list cursor names an object Stripe no longer has (30-day events)

Only the web edge turns these into HTTP status codes; the CLI turns them into exit codes.
"""

from __future__ import annotations


class KamiyoError(Exception):
    """Base of every error kamiyo raises deliberately."""


class ConfigError(KamiyoError):
    """A setting is missing or malformed. The message names the variable."""


class WebhookRejected(KamiyoError):
    """A webhook delivery that is refused. ``reason`` is a stable, greppable code."""

    status_code = 400
    reason = "rejected"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class SignatureError(WebhookRejected):
    """The ``Stripe-Signature`` header is missing, malformed, stale or matches no secret."""

    reason = "invalid_signature"


class PayloadError(WebhookRejected):
    """The body passed the signature check but is not a JSON Stripe event."""

    reason = "payload"


class PayloadTooLarge(WebhookRejected):
    """The body is larger than ``WEBHOOK_MAX_BODY_BYTES``."""

    status_code = 413
    reason = "too_large"


class ApplyError(KamiyoError):
    """An event that cannot be applied now. The worker retries it with backoff, then parks it."""


class UnmappedPrice(ApplyError):
    """A subscription's price maps to no tier (neither ``STRIPE_PRICE_TIERS`` nor ``metadata.tier``)."""


class StripeApiError(KamiyoError):
    """A Stripe API request failed for good: refused (bad key, missing permission, bad request), or
    still failing (429, 5xx, network) after every retry. The message never contains the API key."""


class StripeCursorGone(StripeApiError):
    """``ending_before`` / ``starting_after`` names an object Stripe does not have (an event past its
    30-day retention, say)."""
