"""Stripe's webhook signature scheme, checked against every configured secret.

``Stripe-Signature: t=<unix seconds>,v1=<hex>[,v1=<hex>...][,v0=<hex>]``. The expected
signature is HMAC-SHA256(secret, f"{t}." + raw body). Any ``v1`` matching any secret passes
(Stripe sends one ``v1`` per active secret while a rolled secret is still valid); every other
scheme is ignored. Comparison is constant-time; candidates that are not 64 hex digits cannot
match and are dropped first, so a non-ASCII header never reaches ``hmac.compare_digest``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence

from kamiyo.errors import SignatureError

_HEX64 = re.compile(r"[0-9a-f]{64}")
_MAX_HEADER = 8192


def sign(body: bytes, secret: str, timestamp: int) -> str:
    """The ``v1`` signature Stripe computes for ``body`` at ``timestamp``."""
    return hmac.new(secret.encode(), b"%d." % timestamp + body, hashlib.sha256).hexdigest()


def signature_header(body: bytes, secret: str, timestamp: int) -> str:
    """A ``Stripe-Signature`` header value as Stripe sends it."""
    return f"t={timestamp},v1={sign(body, secret, timestamp)}"


def verify_signature(header: str | None, body: bytes, secrets: Sequence[str], *, tolerance: int, now: float) -> int:
    """Check ``header`` for ``body``; return the signed timestamp or raise SignatureError.

    The signature is checked before the timestamp, so a ``timestamp`` rejection always means
    a genuine signature with a clock that disagrees (skew, or a replay of an old delivery).
    """
    if not header or not header.strip():
        raise SignatureError("missing signature: no Stripe-Signature header", reason="missing_signature")
    if len(header) > _MAX_HEADER:
        raise SignatureError("malformed Stripe-Signature header: too long", reason="malformed")

    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            raise SignatureError("malformed Stripe-Signature header: expected t=...,v1=...", reason="malformed")
        if key == "t":
            if not value.isascii() or not value.isdigit() or len(value) > 12:
                raise SignatureError("malformed Stripe-Signature header: t is not a Unix timestamp", reason="malformed")
            timestamp = int(value)
        elif key == "v1" and _HEX64.fullmatch(value):
            candidates.append(value)
    if timestamp is None:
        raise SignatureError("malformed Stripe-Signature header: no timestamp (t=...)", reason="malformed")
    if not candidates:
        raise SignatureError("malformed Stripe-Signature header: no v1 signature", reason="malformed")

    signed = b"%d." % timestamp + body
    matched = False
    for secret in secrets:
        expected = hmac.digest(secret.encode(), signed, "sha256").hex()  # OpenSSL's one-shot HMAC
        for candidate in candidates:
            # No early exit: the time taken does not depend on which candidate matched.
            matched |= hmac.compare_digest(expected, candidate)
    if not matched:
        raise SignatureError("Invalid signature: no v1 signature matches a configured secret")

    age = now - timestamp
    if abs(age) > tolerance:
        when = f"signed {int(age)} s ago" if age > 0 else f"signed {int(-age)} s in the future"
        raise SignatureError(
            f"timestamp outside the tolerance: {when}, tolerance {tolerance} s (clock skew, or a replayed delivery)",
            reason="timestamp",
        )
    return timestamp


# `kamiyo doctor`'s unsigned ping is no delivery, so it stays out of the failure counts. It proves
# where it comes from with this header: an HMAC keyed by the webhook secret over a fresh timestamp,
# in a message no Stripe signature can have (Stripe signs "<t>." followed by a JSON body), so that
# only a holder of the secret can mark a request, and only for the signature tolerance.
PROBE_HEADER = "kamiyo-probe"
_PROBE_MESSAGE = b"kamiyo-probe:%d"


def probe_header(secret: str, timestamp: int) -> str:
    """The ``Kamiyo-Probe`` header value that marks doctor's ping, made at ``timestamp``."""
    digest = hmac.digest(secret.encode(), _PROBE_MESSAGE % timestamp, "sha256").hex()
    return f"t={timestamp},v1={digest}"


def is_probe(header: str | None, secrets: Sequence[str], *, tolerance: int, now: float) -> bool:
    """True when ``header`` is a ``probe_header`` made with one of ``secrets`` within ``tolerance``
    seconds of ``now``. Compared in constant time; a malformed header is simply not a probe."""
    if not header or len(header) > 200:
        return False
    fields = dict(part.strip().partition("=")[::2] for part in header.split(","))
    stamp, candidate = fields.get("t", ""), fields.get("v1", "")
    if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 12) or not _HEX64.fullmatch(candidate):
        return False
    timestamp = int(stamp)
    if abs(now - timestamp) > tolerance:
        return False
    matched = False
    for secret in secrets:
        expected = hmac.digest(secret.encode(), _PROBE_MESSAGE % timestamp, "sha256").hex()
        matched |= hmac.compare_digest(expected, candidate)
    return matched
