"""Rate limits (per process, or shared by replicas through Redis) and admission control."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from bot.models import EngineBusy


class Limiter(Protocol):
    async def hit(self, key: str, limit: int, window_s: float) -> float | None:
        """Count one event; return seconds to wait if ``limit`` per ``window_s`` is exceeded."""
        ...

    async def close(self) -> None: ...


class MemoryLimiter:
    """Sliding-window log; exact, and fine for one process."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._events: dict[str, deque[float]] = {}
        self._now = clock
        self._longest_window = 0.0
        self._swept = float("-inf")

    def _sweep(self, now: float) -> None:
        """Forget keys with no event inside the longest window in use (every user, chat and
        network ever seen would otherwise stay for the life of the process)."""
        horizon = now - self._longest_window
        self._events = {k: e for k, e in self._events.items() if e and e[-1] > horizon}
        self._swept = now

    async def hit(self, key: str, limit: int, window_s: float) -> float | None:
        if limit <= 0:
            return None
        now = self._now()
        self._longest_window = max(self._longest_window, window_s)
        if now - self._swept >= self._longest_window:  # at most once per window: O(1) amortised
            self._sweep(now)
        events = self._events.setdefault(key, deque())
        while events and events[0] <= now - window_s:
            events.popleft()
        if len(events) >= limit:
            return max(0.0, events[0] + window_s - now)
        events.append(now)
        return None

    async def close(self) -> None:
        self._events.clear()


# One atomic step per hit: drop the events that left the window, count the rest, and record this
# one only if it fits. The clock is Redis's own (TIME), so replicas whose clocks differ still
# agree on the window. Returns -1 when allowed, else microseconds until the oldest event leaves.
_SLIDING_WINDOW = """
local now_t = redis.call('TIME')
local now = tonumber(now_t[1]) * 1000000 + tonumber(now_t[2])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return math.max(0, tonumber(oldest[2]) + window - now)
end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('PEXPIRE', KEYS[1], math.ceil(window / 1000) + 1000)
return -1
"""


class RedisLimiter:
    """The same sliding-window log as ``MemoryLimiter``, kept in Redis so that a limit holds
    across replicas. (A fixed window would let a user through 2× the limit within a second
    across a window boundary.)"""

    def __init__(self, url: str, prefix: str = "oogiri:rl:") -> None:
        from redis.asyncio import Redis

        self._redis = Redis.from_url(url)
        self._prefix = prefix
        self._script = self._redis.register_script(_SLIDING_WINDOW)

    async def hit(self, key: str, limit: int, window_s: float) -> float | None:
        if limit <= 0:
            return None
        window_us = max(1, math.ceil(window_s * 1_000_000))
        event = uuid.uuid4().hex  # members must be unique: two hits in one microsecond both count
        raw: Any = await self._script(keys=[self._prefix + key], args=[limit, window_us, event])
        wait_us = int(raw)
        if wait_us < 0:
            return None
        return wait_us / 1_000_000

    async def close(self) -> None:
        await self._redis.aclose()


def make_limiter(backend: str) -> Limiter:
    if backend == "memory":
        return MemoryLimiter()
    if backend.startswith(("redis://", "rediss://", "unix://")):
        return RedisLimiter(backend)
    raise ValueError(f"unknown limits.backend {backend!r}: use 'memory' or a redis:// URL")


class Admission:
    """Admission control in front of one engine: a bounded queue with a wait limit.

    At most ``slots`` engine calls run at once; at most ``max_queue`` requests wait for one
    (0: no bound); none waits longer than ``max_wait_s``. Over either bound the request is
    refused with ``EngineBusy`` at once (or at the wait limit), carrying a Retry-After estimate
    in ``params["seconds"]``: a fast "busy" beats a joke that arrives after the user left, and
    the refused work never reaches a GPU that is already behind.
    """

    def __init__(
        self,
        slots: int,
        max_queue: int = 0,
        max_wait_s: float = 20.0,
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        if slots < 1:
            raise ValueError("slots must be >= 1")
        self.slots = slots
        self.max_queue = max_queue
        self.max_wait_s = max_wait_s
        self.waiting = 0
        self.running = 0
        self._sem = asyncio.Semaphore(slots)
        self._on_reject = on_reject
        self._mean_s: float | None = None  # moving mean of one engine call's time

    def retry_after_s(self) -> int:
        """Seconds until the queue ahead has likely drained (at least 1)."""
        per_call = self._mean_s if self._mean_s is not None else 1.0
        return max(1, math.ceil(per_call * (self.waiting + 1) / self.slots))

    def _refuse(self, reason: str) -> EngineBusy:
        if self._on_reject is not None:
            self._on_reject(reason)
        return EngineBusy(
            detail=f"admission: {reason} ({self.waiting} waiting, {self.running} running)",
            seconds=self.retry_after_s(),
            reason=reason,
        )

    def check(self) -> None:
        """Raise ``EngineBusy`` now if a request arriving now would find the queue full."""
        # counted, not read off the semaphore: a request between "admitted" and "holding a slot"
        # is already in the queue (wait_for's task may not have run yet)
        if self.max_queue and self.waiting + self.running >= self.slots + self.max_queue:
            raise self._refuse("queue_full")

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[float]:
        """Hold one engine slot; yields the seconds spent waiting for it."""
        self.check()
        t0 = time.monotonic()
        self.waiting += 1
        try:
            await asyncio.wait_for(self._sem.acquire(), timeout=self.max_wait_s)
        except TimeoutError:
            raise self._refuse("wait_limit") from None
        finally:
            self.waiting -= 1
        started = time.monotonic()
        self.running += 1
        try:
            yield started - t0
        finally:
            self.running -= 1
            self._sem.release()
            took = time.monotonic() - started
            self._mean_s = took if self._mean_s is None else 0.9 * self._mean_s + 0.1 * took
