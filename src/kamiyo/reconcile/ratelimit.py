"""The request budget: at most ``STRIPE_RATE_LIMIT`` requests per second to Stripe's API.

One budget per process is shared by every thread that calls the API (a sync's page fetcher,
the worker's verifications, the scheduled backfill), so together they stay under Stripe's limits
(about 100 requests/s live, 25/s in a sandbox).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class RateBudget:
    """A token bucket: ``rate`` requests per second, up to one second's worth in a burst.

    ``acquire`` reserves a slot and sleeps until it comes, so concurrent callers queue fairly
    instead of spinning.
    """

    def __init__(
        self,
        rate: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self._capacity = max(1.0, rate)
        self._tokens = self._capacity
        self._clock = clock
        self._sleep = sleep
        self._updated = clock()
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Wait for the next request slot; return the seconds waited."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self._capacity, self._tokens + (now - self._updated) * self.rate)
            self._updated = now
            self._tokens -= 1.0
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)
        return wait
