"""When and how long to wait before asking Stripe's API again.

Stripe answers an overload with a plain 429, which the ``stripe`` library does not retry; a 5xx
or a broken connection is usually gone a moment later. Both are retried with exponential backoff
and jitter (so that many clients do not come back in step), up to a fixed number of attempts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` in all; before attempt n+1, wait between half and all of ``base * 2**(n-1)``, capped."""

    attempts: int = 8
    base_seconds: float = 0.5
    cap_seconds: float = 30.0

    def delay(self, failed_attempts: int, *, retry_after: float | None = None) -> float:
        """Seconds to wait after ``failed_attempts`` failures (at least Stripe's ``Retry-After``, if sent)."""
        ceiling = min(self.cap_seconds, self.base_seconds * 2 ** (failed_attempts - 1))
        wait = random.uniform(ceiling / 2, ceiling)
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.cap_seconds))
        return wait


# The worker must not stall the queue for long on an API outage: it falls back to the payload.
WORKER_RETRY = RetryPolicy(attempts=3, base_seconds=0.2, cap_seconds=2.0)
