"""The one scrubber for everything that leaves the process: logs, stored errors, health, metrics
labels, the console, the admin API and the CLI's output.

- ``scrub(text)`` replaces every value shaped like a credential, wherever it sits in a string
  (an event id included): webhook secrets (``whsec_``), Stripe's secret, restricted and
  ephemeral keys (``sk_``/``rk_``/``ek_``, live and test), client secrets
  (``pi_..._secret_...``), bearer tokens and ``Authorization`` values.
- ``redact(value)`` walks JSON-like data: a value under a key that names a credential, in any
  case or style (``client_secret``, ``apiKey``, ``session_token``, ``Authorization``,
  ``private_key``) becomes ``[redacted]``; every other string is scrubbed. Stripe's non-secret
  ``lookup_key`` and ``idempotency_key`` are kept.
- ``escape(text)`` shows every non-printable character as a visible escape (``\\n``,
  ``\\x1b``, ``\\x85``, ``\\u2028``), so that nothing an attacker sends can start a forged log
  line or drive a terminal.
- ``clean(text)`` is both, for a field that goes into a log line or onto a terminal.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

REDACTED = "[redacted]"
TOO_DEEP = "[nested too deep]"
MAX_DEPTH = 64  # deeper containers are not walked (and could not be printed as JSON anyway)

_SECRET_VALUE = re.compile(
    r"whsec_[A-Za-z0-9+/=_-]+"
    r"|(?:sk|rk|ek)_(?:live|test)_[A-Za-z0-9_]+"
    r"|(?:pi|seti|cs|src)_[A-Za-z0-9_]+?_secret_[A-Za-z0-9_]+"
    r"|(?P<keep>(?i:\bbearer[ \t]+|\bauthorization[\"']?[ \t]*[:=][ \t]*[\"']?(?:(?:basic|bearer|token)[ \t]+)?))"
    r"[^\s\"',;]{4,}"
)
# A key names a credential when one of its words is one of these, or two neighbouring words are.
_SECRET_WORDS = frozenset(
    {"secret", "secrets", "password", "passwd", "passphrase", "token", "tokens", "authorization", "apikey", "cookie"}
)
_SECRET_PAIRS = frozenset({("api", "key"), ("private", "key"), ("secret", "key"), ("access", "key")})
_WORD_BREAK = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|[^A-Za-z0-9]+")


def scrub(text: str) -> str:
    """``text`` with every credential-shaped value replaced by ``[redacted]``."""
    # Every match holds one of these markers: a text without any is returned as it is, without the
    # regex. Spelled out, not a loop over a tuple: this runs for every string of every log line.
    if not (
        "whsec_" in text
        or "_live_" in text
        or "_test_" in text
        or "_secret_" in text
        or "earer" in text
        or "EARER" in text
        or "uthorization" in text
        or "UTHORIZATION" in text
    ):
        return text
    return _SECRET_VALUE.sub(_replacement, text)


def _replacement(match: re.Match[str]) -> str:
    return (match.group("keep") or "") + REDACTED


_secret_keys: dict[str, bool] = {}


def is_secret_key(key: object) -> bool:
    """Whether a mapping key names a credential (``apiKey``, ``client_secret``, ``X-Auth-Token``...)."""
    name = str(key)
    known = _secret_keys.get(name)
    if known is None:
        words = [w.lower() for w in _WORD_BREAK.split(name) if w]
        known = any(w in _SECRET_WORDS for w in words) or any(
            pair in _SECRET_PAIRS for pair in itertools.pairwise(words)
        )
        if len(_secret_keys) < 10_000:
            _secret_keys[name] = known
    return known


def redact(value: Any, *, depth: int = 0) -> Any:
    """``value`` (JSON-like data) with credentials replaced, by key name and by value shape.

    Containers nested deeper than ``MAX_DEPTH`` are replaced by ``[nested too deep]``.
    """
    if isinstance(value, dict):
        if depth >= MAX_DEPTH:
            return TOO_DEEP
        return {
            key: REDACTED if is_secret_key(key) and item not in (None, "") else redact(item, depth=depth + 1)
            for key, item in value.items()
        }
    if isinstance(value, list):
        if depth >= MAX_DEPTH:
            return TOO_DEEP
        return [redact(item, depth=depth + 1) for item in value]
    if isinstance(value, str):
        return scrub(value)
    return value


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape(text: str) -> str:
    """``text`` with every non-printable character shown as an escape (``\\n``, ``\\x1b``, ``\\u2028``)."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _escape_char(char) for char in text)


def _escape_char(char: str) -> str:
    known = _ESCAPES.get(char)
    if known is not None:
        return known
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def clean(text: str) -> str:
    """A field for a log line or a terminal: credentials scrubbed, non-printables escaped."""
    return escape(scrub(text))
