"""A poison row — a reply whose delivery fails every time, and not because the platform asked for a
delay — must not block its chat until ``max_age_s``: after a bounded number of failed attempts it
is given up (marked ``dropped`` with its reason, counted, logged without secrets) and the chat's
next reply goes. A platform's ``retry_after`` is legitimate and never counted against that bound.

On the real ``Store``, SQLite and PostgreSQL (the ``store`` fixture runs both).
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from bot.metrics import Metrics
from bot.outbox import Outbox, OutboxItem, OutboxWorker, RetryLater
from bot.store import OutboxRow, Store

TOKEN = "aW50ZXJhY3Rpb24tdG9rZW4tdGhhdC1tdXN0LW5ldmVyLWJlLWxvZ2dlZA"  # a Discord-like token


def events(metrics: Metrics) -> dict[str, float]:
    return {
        s.labels["event"]: s.value
        for m in metrics.outbox.collect()
        for s in m.samples
        if s.name.endswith("_total")
    }


async def row(store: Store, item_id: int) -> OutboxRow:
    async with store.session() as s:
        found = await s.scalar(select(OutboxRow).where(OutboxRow.id == item_id))
        assert found is not None
        return found


async def rounds_until(worker: OutboxWorker, done: Any, most: int = 60) -> int:
    """Run the worker's rounds until ``done()`` (a coroutine function) holds."""
    for n in range(most):
        if await done():
            return n
        await worker.run_once()
    raise AssertionError(f"not done after {most} rounds")


async def test_a_reply_failing_with_a_bug_every_time_no_longer_blocks_its_chat(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """Defaults but for the backoff (0 s: every round retries): the chat moves on, not after
    ``max_age_s`` (24 h)."""
    metrics = Metrics()
    box = Outbox(store, "test", owner="me", retry_base_s=0.0, metrics=metrics)
    poison = await box.add("chat-1", {"n": 1, "token": TOKEN})
    behind = await box.add("chat-1", {"n": 2})
    calls: dict[int, int] = {}
    sent: list[int] = []

    async def deliver(item: OutboxItem) -> dict[str, Any]:
        calls[item.id] = calls.get(item.id, 0) + 1
        if item.payload["n"] == 1:  # e.g. a KeyError in rendering, for this one row only
            raise RuntimeError(f"cannot render: https://example.invalid/webhooks/1/{TOKEN}")
        sent.append(item.payload["n"])
        return {"message_id": 9}

    worker = OutboxWorker(box, deliver, poll_s=0.05)
    assert await worker.send_now(poison) is False
    await box.release(behind)  # it waits behind the poison row, as send_now would leave it

    async def moved_on() -> bool:
        return sent == [2]

    await rounds_until(worker, moved_on)
    assert await box.counts() == {"dropped": 1, "delivered": 1}
    assert calls[poison.id] == box.max_attempts  # bounded, and not retried once given up
    gave_up = await row(store, poison.id)
    assert gave_up.last_error is not None
    assert gave_up.last_error.startswith(f"gave up after {box.max_attempts} failed attempts")
    assert "RuntimeError: cannot render" in gave_up.last_error
    assert gave_up.finished_at is not None and gave_up.claimed_by is None
    got = events(metrics)
    assert got["gave_up"] == 1 and got["delivered"] == 1
    assert got["retried"] == box.max_attempts - 1
    assert "given up after" in caplog.text and f"reply {poison.id}" in caplog.text
    assert TOKEN not in caplog.text and TOKEN not in gave_up.last_error  # never the secret


async def test_a_platform_outage_is_waited_out_never_given_up(store: Store) -> None:
    """``RetryLater`` without a delay (a 5xx, a time-out, the network) is the platform having a
    bad time for every chat: however many attempts it takes, the reply is sent once it is back."""
    box = Outbox(store, "test", owner="me", retry_base_s=0.0, max_attempts=3)
    first = await box.add("chat-1", {"n": 1})
    await box.release(await box.add("chat-1", {"n": 2}))
    outage = [RetryLater("HTTP 502: bad gateway")] * 8  # far more than max_attempts
    sent: list[int] = []

    async def deliver(item: OutboxItem) -> dict[str, Any]:
        if outage:
            raise outage.pop()
        sent.append(item.payload["n"])
        return {}

    worker = OutboxWorker(box, deliver, poll_s=0.05)
    await worker.send_now(first)

    async def both_sent() -> bool:
        return sent == [1, 2]

    assert await rounds_until(worker, both_sent) <= 20
    delivered = await row(store, first.id)
    assert delivered.state == "delivered" and delivered.attempts == 9  # 8 failures + the send


async def test_retry_after_from_the_platform_is_respected_never_counted(store: Store) -> None:
    """Telegram's 429 ``retry_after`` (legitimately long, and repeated) keeps the row: only
    ``max_age_s`` bounds it. It neither counts nor spends the budget of the other failures."""
    box = Outbox(store, "test", owner="me", retry_base_s=0.0, max_attempts=3)
    item = await box.add("chat-1", {})
    answers: list[Exception | None] = [RetryLater("flood control", 0.0)] * 10
    answers += [RetryLater("HTTP 502")] * 2  # counted for the backoff, never given up
    answers += [RetryLater("flood control", 0.0)] * 5 + [None]

    async def deliver(_item: OutboxItem) -> dict[str, Any]:
        answer = answers.pop(0)
        if answer is not None:
            raise answer
        return {"message_id": 1}

    worker = OutboxWorker(box, deliver, poll_s=0.05)
    await worker.send_now(item)

    async def delivered() -> bool:
        return await box.counts() == {"delivered": 1}

    await rounds_until(worker, delivered)
    assert answers == []
    assert (await row(store, item.id)).attempts == 3  # 2 counted failures + the delivery


async def test_a_long_retry_after_is_kept_and_not_due_before_it(store: Store) -> None:
    box = Outbox(store, "test", owner="me", max_attempts=1)
    item = await box.add("chat-1", {})
    assert await box.failed(item, "flood control: retry in 3600 s", 3600.0) is True
    assert await box.counts() == {"pending": 1}
    assert await box.claim_due() == []  # waits the hour out, then is retried


async def test_max_attempts_must_be_positive(store: Store) -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        Outbox(store, "test", max_attempts=0)
