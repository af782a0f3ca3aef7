"""CachedAnswer: one computation per ttl, shared by callers that arrive meanwhile (web/cache.py)."""

from __future__ import annotations

import asyncio

from kamiyo.web.cache import CachedAnswer


def test_callers_within_the_ttl_share_one_computation_and_a_later_one_computes_again() -> None:
    clock = [0.0]
    runs: list[float] = []

    async def compute() -> int:
        runs.append(clock[0])
        await asyncio.sleep(0.01)
        return len(runs)

    async def scenario() -> list[int]:
        cached = CachedAnswer(compute, ttl=1.0, clock=lambda: clock[0])
        first = await asyncio.gather(*(cached.get() for _ in range(50)))
        clock[0] = 0.5
        second = await cached.get()
        clock[0] = 1.5
        third = await cached.get()
        return [*first, second, third]

    answers = asyncio.run(scenario())
    assert answers == [1] * 51 + [2]
    assert runs == [0.0, 1.5]


def test_an_error_reaches_every_waiting_caller_and_is_not_cached() -> None:
    calls = [0]

    async def compute() -> str:
        calls[0] += 1
        await asyncio.sleep(0.01)
        if calls[0] == 1:
            raise ConnectionError("database down")
        return "ok"

    async def scenario() -> tuple[list[object], str]:
        cached = CachedAnswer(compute, ttl=60.0)
        failed = await asyncio.gather(*(cached.get() for _ in range(5)), return_exceptions=True)
        return failed, await cached.get()

    failed, recovered = asyncio.run(scenario())
    assert all(isinstance(error, ConnectionError) for error in failed)
    assert recovered == "ok"
    assert calls == [2]


def test_a_zero_ttl_computes_for_every_caller() -> None:
    calls = [0]

    async def compute() -> int:
        calls[0] += 1
        return calls[0]

    async def scenario() -> list[int]:
        cached = CachedAnswer(compute, ttl=0.0)
        return [await cached.get() for _ in range(3)]

    assert asyncio.run(scenario()) == [1, 2, 3]


def test_the_answer_is_reused_until_the_ttl_has_passed() -> None:
    ttl = 1.0
    clock = [10.0]

    async def compute() -> float:
        return clock[0]

    async def scenario() -> list[float]:
        cached = CachedAnswer(compute, ttl=ttl, clock=lambda: clock[0])
        seen = [await cached.get()]
        clock[0] = 10.0 + ttl - 0.001
        seen.append(await cached.get())
        clock[0] = 10.0 + ttl
        seen.append(await cached.get())
        return seen

    assert asyncio.run(scenario()) == [10.0, 10.0, 11.0]
