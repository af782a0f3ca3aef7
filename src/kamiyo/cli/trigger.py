"""``kamiyo trigger``: the offline ``stripe trigger``, a realistic event signed and posted."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import click

from kamiyo.cli.invocation import OK, PROBLEM, with_settings
from kamiyo.errors import KamiyoError

if TYPE_CHECKING:
    from kamiyo.config import Settings


@click.command(
    short_help="sign and post a realistic test event, like `stripe trigger`",
    help="Sign and post a realistic test event, like `stripe trigger`.",
)
@click.argument("event_type")
@click.option(
    "--url", help="the endpoint, or the service's base URL (default: http://127.0.0.1:PORT/api/v1/payments/webhook)"
)
@click.option("--secret", help="signing secret (default: the first in STRIPE_WEBHOOK_SECRET)")
@click.option("--email", default="trigger@example.com", show_default=True, help="customer email in the event")
@click.option("--customer", "customer_id", help="customer id to use (default: a new cus_test...)")
@click.option("--api-version", help="payload shape, e.g. 2024-06-20 or 2026-10-28.endive")
@with_settings
def trigger(
    settings: Settings,
    event_type: str,
    url: str | None,
    secret: str | None,
    email: str,
    customer_id: str | None,
    api_version: str | None,
) -> int:
    """EVENT_TYPE: e.g. payment_intent.succeeded, customer.subscription.created. Exit 1 unless
    the service acknowledges the event (2xx)."""
    import time
    import urllib.error
    import urllib.parse
    import urllib.request

    import orjson

    from kamiyo import synthetic
    from kamiyo.domain.modes import LIVE
    from kamiyo.web.webhook import WEBHOOK_PATH
    from kamiyo.webhooks.signature import signature_header

    secret = secret or (settings.webhook_secrets[0] if settings.webhook_secrets else None)
    if not secret:
        raise KamiyoError("no signing secret: pass --secret or set STRIPE_WEBHOOK_SECRET")
    url = url or f"http://127.0.0.1:{settings.port}{WEBHOOK_PATH}"
    if not url.startswith(("http://", "https://")):
        raise KamiyoError(f"--url must be an http:// or https:// URL, got {url!r}")
    if urllib.parse.urlsplit(url).path in ("", "/"):
        url = url.rstrip("/") + WEBHOOK_PATH  # the service's base URL, as doctor --url takes it
    try:
        event = synthetic.trigger_event(
            event_type,
            email=email,
            price_obj=_trigger_price(settings),
            customer_id=customer_id,
            api_version=api_version or synthetic.LATEST_API_VERSION,
            livemode=settings.stripe_mode == LIVE,  # the service's mode: an event it applies
        )
    except ValueError as exc:
        raise KamiyoError(str(exc)) from None
    body = orjson.dumps(event)
    request = urllib.request.Request(  # noqa: S310 - scheme checked above
        url,
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json; charset=utf-8",
            "Stripe-Signature": signature_header(body, secret, int(time.time())),
            "User-Agent": "kamiyo-trigger (Stripe/1.0 compatible)",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - scheme checked above
            status, answer = response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        status, answer = exc.code, exc.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as exc:
        print(f"trigger {event_type}: cannot reach {url}: {exc}", file=sys.stderr)
        return PROBLEM
    print(f"trigger {event_type} {event['id']} -> {status} {answer}")
    return OK if 200 <= status < 300 else PROBLEM


def _trigger_price(settings: Settings) -> dict[str, Any]:
    from kamiyo import synthetic

    for key, tier in settings.price_tiers.by_key.items():
        if key.startswith(("price_", "plan_")):
            return synthetic.price(key)
        return synthetic.price("price_trigger_" + tier, lookup_key=key)
    return synthetic.price("price_trigger_pro", tier="pro")
