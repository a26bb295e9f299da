"""Per-chat flow control for python-telegram-bot: Telegram's budgets, and a 429 stays in its chat.

Telegram documents (Bots FAQ, "My bot is hitting limits"): about one message a second into one
chat, at most 20 messages a minute into one group, about 30 messages a second in all. When a
chat is over its budget Telegram answers 429 with ``retry_after``. PTB's ``AIORateLimiter`` then
pauses *every* request of the bot; this limiter pauses only the chat that was refused:

* each chat has its own FIFO queue and its own window (1 per second private, 20 per minute group),
* then every chat's request takes a slot of the shared 30-per-second window,
* a ``RetryAfter`` marks only that chat blocked until the time Telegram named, retried in place up
  to ``max_retries`` times; after that the ``RetryAfter`` reaches the caller (the outbox keeps the
  reply and tries again later).

Requests that are not messages into a chat (getUpdates, getFile, answerCallbackQuery, …) and
``sendChatAction`` pass straight through: they are not what Telegram counts, and a vote's toast
must never wait behind a busy group.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from datetime import timedelta
from typing import Any

from telegram.error import RetryAfter
from telegram.ext import BaseRateLimiter

log = logging.getLogger(__name__)

#: Bot API methods that put (or change) a message in a chat: what the budgets count.
COUNTED_PREFIXES = ("send", "edit", "copy", "forward", "delete")
UNCOUNTED = frozenset({"sendChatAction"})
IDLE_PRUNE = 4096  # chats kept in memory before idle ones are forgotten


def retry_seconds(exc: RetryAfter) -> float:
    """``retry_after`` in seconds, without PTB's deprecation warning for the int form."""
    value = getattr(exc, "_retry_after", None)
    if value is None:
        value = exc.retry_after
    if isinstance(value, timedelta):
        return value.total_seconds()
    return float(value)


def is_group(chat_id: Any) -> bool:
    """Groups, supergroups and channels have negative ids (or an @username)."""
    if isinstance(chat_id, str):
        try:
            chat_id = int(chat_id)
        except ValueError:
            return True  # "@channelusername"
    return isinstance(chat_id, int) and chat_id < 0


class _Window:
    """At most ``limit`` events in any ``period`` seconds (a sliding log)."""

    __slots__ = ("events", "limit", "period")

    def __init__(self, limit: int, period: float) -> None:
        self.limit = max(1, limit)
        self.period = period
        self.events: deque[float] = deque()

    def wait(self, now: float) -> float:
        """Seconds until one more event fits (0: now)."""
        while self.events and self.events[0] <= now - self.period:
            self.events.popleft()
        if len(self.events) < self.limit:
            return 0.0
        return self.events[0] + self.period - now

    def take(self, now: float) -> None:
        self.events.append(now)


class _Chat:
    __slots__ = ("blocked_until", "last_used", "lock", "window")

    def __init__(self, window: _Window) -> None:
        self.lock = asyncio.Lock()  # FIFO: a chat's messages leave in the order they were sent
        self.window = window
        self.blocked_until = 0.0
        self.last_used = 0.0


def _budget(per_period: float, period: float) -> tuple[int, float]:
    """A fractional budget (0.5/s) as an integer count over a longer period (1 per 2 s)."""
    if per_period >= 1:
        return int(per_period), period
    return 1, period / per_period


class ChatFlowLimiter(BaseRateLimiter[int]):
    """PTB rate limiter with per-chat queues; see the module docstring."""

    def __init__(
        self,
        private_per_s: float = 1.0,
        group_per_minute: float = 20.0,
        global_per_s: float = 30.0,
        max_retries: int = 2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.private = _budget(private_per_s, 1.0)
        self.group = _budget(group_per_minute, 60.0)
        self.max_retries = max_retries
        self._global = _Window(*_budget(global_per_s, 1.0))
        self._global_lock = asyncio.Lock()
        self._chats: dict[str, _Chat] = {}
        self._now = clock
        self.flood_waits = 0  # 429s seen (tests, benchmarks)

    async def initialize(self) -> None:
        pass

    async def shutdown(self) -> None:
        self._chats.clear()

    def _chat(self, key: str, group: bool) -> _Chat:
        chat = self._chats.get(key)
        if chat is None:
            if len(self._chats) >= IDLE_PRUNE:
                self._prune()
            chat = _Chat(_Window(*(self.group if group else self.private)))
            self._chats[key] = chat
        return chat

    def _prune(self) -> None:
        now = self._now()
        for key, chat in list(self._chats.items()):
            if not chat.lock.locked() and chat.blocked_until < now and now - chat.last_used > 60:
                del self._chats[key]

    def blocked_for(self, chat_id: Any) -> float:
        """Seconds this chat is still blocked by a 429 (0: not blocked)."""
        chat = self._chats.get(str(chat_id))
        return max(0.0, chat.blocked_until - self._now()) if chat else 0.0

    async def _slot(self, chat: _Chat) -> None:
        """Wait for the chat's budget, a past ``retry_after`` and a global slot; take them."""
        while True:
            now = self._now()
            wait = max(chat.blocked_until - now, chat.window.wait(now))
            if wait <= 0:
                break
            await asyncio.sleep(wait)
        async with self._global_lock:
            while True:  # a timed wait: nothing else could signal that the window moved
                wait = self._global.wait(self._now())
                if wait <= 0:
                    break
                await asyncio.sleep(wait)
            now = self._now()
            self._global.take(now)
        chat.window.take(now)
        chat.last_used = now

    async def process_request(
        self,
        callback: Callable[..., Coroutine[Any, Any, bool | dict[str, Any] | list[dict[str, Any]]]],
        args: Any,
        kwargs: dict[str, Any],
        endpoint: str,
        data: dict[str, Any],
        rate_limit_args: int | None,
    ) -> bool | dict[str, Any] | list[dict[str, Any]]:
        chat_id = data.get("chat_id")
        counted = endpoint.startswith(COUNTED_PREFIXES) and endpoint not in UNCOUNTED
        if chat_id is None or not counted:
            return await callback(*args, **kwargs)
        chat = self._chat(str(chat_id), is_group(chat_id))
        retries = self.max_retries if rate_limit_args is None else rate_limit_args
        # The chat's lock is held through the retries, so a refused message is not overtaken by
        # the next one to the same chat; other chats never wait for it.
        async with chat.lock:
            attempt = 0
            while True:
                await self._slot(chat)
                try:
                    return await callback(*args, **kwargs)
                except RetryAfter as exc:
                    self.flood_waits += 1
                    delay = retry_seconds(exc) + 0.1
                    chat.blocked_until = max(chat.blocked_until, self._now() + delay)
                    if attempt >= retries:
                        raise
                    attempt += 1
                    log.info(
                        "telegram: flood control for chat %s, retrying in %.1f s", chat_id, delay
                    )
