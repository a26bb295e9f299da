"""Rate limits: per process (memory) or shared by every replica (Redis)."""

from __future__ import annotations

import math
import time
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


class RedisLimiter:
    """Fixed window per key in Redis, so a limit holds across replicas."""

    def __init__(self, url: str, prefix: str = "oogiri:rl:") -> None:
        from redis.asyncio import Redis

        self._redis = Redis.from_url(url)
        self._prefix = prefix

    async def hit(self, key: str, limit: int, window_s: float) -> float | None:
        if limit <= 0:
            return None
        window = max(1, math.ceil(window_s))
        bucket = int(time.time() // window)
        name = f"{self._prefix}{key}:{bucket}"
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.incr(name)
            pipe.expire(name, window + 1)
            count, _ = await pipe.execute()
        if int(count) > limit:
            return (bucket + 1) * window - time.time()
        return None

    async def close(self) -> None:
        await self._redis.aclose()


def make_limiter(backend: str) -> Limiter:
    if backend == "memory":
        return MemoryLimiter()
    if backend.startswith(("redis://", "rediss://", "unix://")):
        return RedisLimiter(backend)
    raise ValueError(f"unknown limits.backend {backend!r}: use 'memory' or a redis:// URL")
