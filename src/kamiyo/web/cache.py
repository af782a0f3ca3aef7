"""An answer computed at most once per ``ttl`` for every caller: the public health endpoints and
``/metrics`` read the database, and anybody may ask for them as often as they like."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class CachedAnswer(Generic[T]):
    """``compute``'s answer, reused for ``ttl`` seconds. Callers that arrive while it is being
    computed wait for that one computation instead of starting their own; an error is not cached."""

    def __init__(
        self, compute: Callable[[], Awaitable[T]], *, ttl: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._compute = compute
        self._ttl = ttl
        self._clock = clock
        self._answer: tuple[float, T] | None = None
        self._running: asyncio.Future[T] | None = None

    async def get(self) -> T:
        if self._answer is not None and self._clock() - self._answer[0] < self._ttl:
            return self._answer[1]
        if self._running is not None:
            return await asyncio.shield(self._running)
        self._running = running = asyncio.get_running_loop().create_future()
        try:
            answer = await self._compute()
        except asyncio.CancelledError:
            running.cancel()
            raise
        except Exception as exc:
            running.set_exception(exc)
            running.exception()  # marked as retrieved: nobody else may be waiting
            raise
        else:
            self._answer = (self._clock(), answer)
            running.set_result(answer)
            return answer
        finally:
            self._running = None
