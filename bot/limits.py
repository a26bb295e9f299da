"""Rate limits: per process (memory) or shared by every replica (Redis)."""

from __future__ import annotations

import math
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Protocol


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

    async def hit(self, key: str, limit: int, window_s: float) -> float | None:
        if limit <= 0:
            return None
        now = self._now()
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
        wait_us = int(await self._script(keys=[self._prefix + key], args=[limit, window_us, event]))
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
