"""Pools of pre-signed Stripe deliveries, written as raw HTTP requests for ``replay.lua``.

A pool is two files: ``<name>.http`` (the requests back to back) and ``<name>.idx`` (each
request's length in bytes, one per line). Every request carries a distinct event id, except
one in twenty (5%), which re-delivers an earlier event with a fresh signature, as Stripe does
when it retries. Signatures are made when the pool is written, so a pool must be replayed
within the 300 s tolerance: write it just before its run.

Bodies come from kamiyo's own event factory (``kamiyo.synthetic``), in a mix of the types a
subscription endpoint receives. A few hundred distinct events serve as templates; each request
is a template with its own event id, so a pool of 300,000 requests is written in seconds.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from kamiyo import synthetic
from kamiyo.webhooks.signature import signature_header

WEBHOOK_PATH = "/api/v1/payments/webhook"
DUPLICATE_EVERY = 20  # one delivery in 20 re-delivers an earlier event: 5%
_DUPLICATE_WINDOW = 5000  # a retry re-delivers one of the last 5,000 distinct events
_TEMPLATES = 400
_PLACEHOLDER = "evt_bench_placeholder"

# (event type, weight): what the runbook's endpoint is subscribed to, roughly as often as it arrives.
EVENT_MIX = (
    ("customer.subscription.updated", 25),
    ("customer.subscription.created", 10),
    ("customer.subscription.deleted", 5),
    ("invoice.paid", 15),
    ("invoice.payment_succeeded", 15),
    ("invoice.payment_failed", 5),
    ("checkout.session.completed", 10),
    ("customer.created", 5),
    ("customer.updated", 5),
    ("payment_intent.succeeded", 5),
)
PRICES = ("price_basic", "price_pro_monthly", "price_ent_yearly")
PRICE_TIERS = "price_basic=basic,price_pro_monthly=pro,price_ent_yearly=enterprise"


@dataclass(frozen=True)
class Pool:
    """A written pool of requests, ready for ``replay.lua``."""

    requests: Path
    index: Path
    count: int
    distinct: int
    duplicates: int
    body_bytes: int
    signed_at: int

    @property
    def mean_body_bytes(self) -> float:
        return self.body_bytes / self.count if self.count else 0.0


def _templates(rng: random.Random) -> list[bytes]:
    """Serialized events of the mix, each with a placeholder id to be replaced per request."""
    types = [t for t, _w in EVENT_MIX]
    weights = [w for _t, w in EVENT_MIX]
    bodies = []
    for n in range(_TEMPLATES):
        event_type = rng.choices(types, weights)[0]
        price = synthetic.price(rng.choice(PRICES))
        api_version = synthetic.LEGACY_API_VERSION if n % 5 == 0 else synthetic.LATEST_API_VERSION
        event = synthetic.trigger_event(
            event_type, email=f"Bench.User{n}@Example.com", price_obj=price, api_version=api_version
        )
        event["id"] = _PLACEHOLDER
        bodies.append(orjson.dumps(event))
    return bodies


def _request(body: bytes, signature: str) -> bytes:
    """One delivery exactly as Stripe's webhook sender frames it (HTTP/1.1, keep-alive)."""
    head = (
        f"POST {WEBHOOK_PATH} HTTP/1.1\r\n"
        "Host: 127.0.0.1\r\n"
        "User-Agent: Stripe/1.0 (+https://stripe.com/docs/webhooks)\r\n"
        "Accept: */*; q=0.5, application/xml\r\n"
        "Cache-Control: no-cache\r\n"
        "Content-Type: application/json; charset=utf-8\r\n"
        f"Stripe-Signature: {signature}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "\r\n"
    )
    return head.encode() + body


def write_pool(directory: Path, name: str, count: int, *, secret: str, id_prefix: str, seed: int = 1) -> Pool:
    """Write ``count`` signed deliveries (5% duplicates) under ``directory``; return the pool.

    Event ids are ``evt_<id_prefix><n>``: give every run its own prefix, so that no two runs
    (and no warm-up and measured run) share an event.
    """
    rng = random.Random(seed)
    templates = _templates(rng)
    placeholder = _PLACEHOLDER.encode()
    requests_path = directory / f"{name}.http"
    index_path = directory / f"{name}.idx"
    signed_at = int(time.time())
    originals: list[bytes] = []  # the latest distinct bodies, which retries pick from
    distinct = duplicates = body_bytes = 0
    with requests_path.open("wb") as requests, index_path.open("w") as index:
        for n in range(count):
            if n % DUPLICATE_EVERY == DUPLICATE_EVERY - 1 and originals:
                body = originals[rng.randrange(max(0, len(originals) - _DUPLICATE_WINDOW), len(originals))]
                # A retry is signed again, later than the first delivery.
                timestamp = signed_at + 1
                duplicates += 1
            else:
                event_id = f"evt_{id_prefix}{distinct:09d}".encode()
                body = templates[n % len(templates)].replace(placeholder, event_id, 1)
                originals.append(body)
                distinct += 1
                timestamp = signed_at
                if len(originals) > 2 * _DUPLICATE_WINDOW:
                    del originals[:_DUPLICATE_WINDOW]
            raw = _request(body, signature_header(body, secret, timestamp))
            requests.write(raw)
            index.write(f"{len(raw)}\n")
            body_bytes += len(body)
    return Pool(requests_path, index_path, count, distinct, duplicates, body_bytes, signed_at)


def write_bodies(directory: Path, name: str, bodies: list[bytes], *, secret: str) -> Pool:
    """Write ``bodies`` as signed deliveries, in order, once each (no re-deliveries); return the pool."""
    requests_path = directory / f"{name}.http"
    index_path = directory / f"{name}.idx"
    signed_at = int(time.time())
    body_bytes = 0
    with requests_path.open("wb") as requests, index_path.open("w") as index:
        for body in bodies:
            raw = _request(body, signature_header(body, secret, signed_at))
            requests.write(raw)
            index.write(f"{len(raw)}\n")
            body_bytes += len(body)
    return Pool(requests_path, index_path, len(bodies), len(bodies), 0, body_bytes, signed_at)
