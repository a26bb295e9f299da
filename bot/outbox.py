"""The durable outbox: replies a channel owes a chat, kept in the store until delivered.

A joke's reply row is written in the joke's own transaction (``JokeRequest.delivery``), already
claimed by the process that will send it at once. If that send fails (flood control after its
retries, a 5xx, the network, the process killed), the row stays ``pending`` and an
``OutboxWorker`` — in this replica or any other — delivers it later:

* in order per chat: only the oldest pending row of a chat may be sent;
* one sender per row across replicas: a sender *claims* a row with
  ``UPDATE … WHERE id = :id AND (claimed_by IS NULL OR lease_until < now)`` and sends only if that
  UPDATE changed the row (a claim lapses after ``lease_s``, e.g. when its holder was killed);
* until it is older than ``max_age_s``: then it is marked ``expired``, counted in the
  ``oogiri_outbox{event="expired"}`` metric and logged — never silently dropped;
* or until ``deliver`` has raised an unexpected exception (a bug; nothing a retry is known to fix)
  on its ``max_attempts``-th failed attempt (default 10): then it is *given up* — marked
  ``dropped``, its ``last_error`` starting "gave up after N failed attempts: …", counted as
  ``event="gave_up"`` and logged — so that one poison reply blocks its chat for minutes (10–17
  with the default backoff of 2 s doubling to 300 s, ±25 %), not until ``max_age_s``.

This module knows no platform: the channel hands in a ``deliver`` coroutine that raises
``RetryLater`` (try again after a delay) or ``Undeliverable`` (the chat is gone, the bot was
blocked: retrying cannot help; dropped at once). How a failure counts:

* ``RetryLater(reason, seconds)`` — the platform said when (Telegram's 429 ``retry_after``, which
  may legitimately be long and repeated): retried then, not counted;
* ``RetryLater(reason)`` without a delay (a 5xx, a time-out, the network: the platform is having a
  bad time, for every chat alike): retried with exponential backoff and never given up, so an
  outage loses no reply; only ``max_age_s`` bounds it;
* any other exception (a bug): retried with the same backoff, and given up at ``max_attempts``.

``attempts`` counts the failed attempts without a platform delay (the backoff's exponent), plus
one once delivered. What is logged or
stored as a failure's reason never contains the row's longer payload strings (``scrub``: a Discord
interaction token is one).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import traceback
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, exists, func, or_, select, update
from sqlalchemy.orm import aliased

from bot.metrics import Metrics
from bot.store import OutboxRow, Store, utcnow

log = logging.getLogger(__name__)

PENDING, DELIVERED, EXPIRED, DROPPED = "pending", "delivered", "expired", "dropped"
GAVE_UP = "gave_up"  # the metric event of a row dropped after ``max_attempts`` failed attempts
_SECRET_MIN_CHARS = 16  # payload strings at least this long are kept out of logs and last_error


class RetryLater(Exception):
    """The platform could not take the reply now; try again after ``seconds``."""

    def __init__(self, reason: str, seconds: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.seconds = seconds


class Undeliverable(Exception):
    """The reply can never be delivered (chat gone, bot blocked, token of a dead interaction)."""


@dataclass(frozen=True, slots=True)
class OutboxItem:
    id: int
    channel: str
    chat_key: str
    joke_id: int | None
    payload: dict[str, Any]
    attempts: int
    created_at: datetime


def _item(row: OutboxRow) -> OutboxItem:
    return OutboxItem(
        id=row.id,
        channel=row.channel,
        chat_key=row.chat_key,
        joke_id=row.joke_id,
        payload=dict(row.payload or {}),
        attempts=row.attempts,
        created_at=row.created_at,
    )


def scrub(text: str, payload: dict[str, Any]) -> str:
    """``text`` without the payload's longer strings (tokens, webhook URLs): what is logged or
    stored as a failure's reason. Short values (ids, language codes) stay readable."""
    for value in sorted(
        (v for v in payload.values() if isinstance(v, str) and len(v) >= _SECRET_MIN_CHARS),
        key=len,
        reverse=True,
    ):
        text = text.replace(value, "**********")
    return text


def replica_id() -> str:
    """Who claims rows: unique per process (host-pid-random), readable in the table."""
    host = os.uname().nodename[:24] if hasattr(os, "uname") else "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class Outbox:
    """One channel's view of the outbox table."""

    def __init__(
        self,
        store: Store,
        channel: str,
        *,
        owner: str | None = None,
        lease_s: float = 60.0,
        max_age_s: float = 24 * 3600.0,
        retry_base_s: float = 2.0,
        retry_max_s: float = 300.0,
        max_attempts: int = 10,
        metrics: Metrics | None = None,
    ) -> None:
        if lease_s <= 0 or max_age_s <= 0:
            raise ValueError("outbox lease_s and max_age_s must be positive")
        if max_attempts < 1:
            raise ValueError("outbox max_attempts must be at least 1")
        self.store = store
        self.channel = channel
        self.owner = owner or replica_id()
        self.lease_s = lease_s
        self.max_age_s = max_age_s
        self.retry_base_s = retry_base_s
        self.retry_max_s = retry_max_s
        self.max_attempts = max_attempts
        self.metrics = metrics

    def _count(self, event: str, n: int = 1) -> None:
        if self.metrics is not None and n:
            self.metrics.outbox.labels(self.channel, event).inc(n)

    # ------------------------------------------------------------------ writing

    def delivery(self, chat_key: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Column values for ``JokeRequest.delivery``: a row already claimed by this process."""
        now = utcnow()
        self._count("stored")
        return {
            "channel": self.channel,
            "chat_key": chat_key,
            "payload": payload,
            "state": PENDING,
            "attempts": 0,
            "next_attempt_at": now,
            "claimed_by": self.owner,
            "lease_until": now + timedelta(seconds=self.lease_s),
        }

    async def add(
        self, chat_key: str, payload: dict[str, Any], joke_id: int | None = None
    ) -> OutboxItem:
        """A reply not tied to a new joke (e.g. a follow-up): stored claimed by this process."""
        values = self.delivery(chat_key, payload)
        async with self.store.session(write=True) as s:
            row = OutboxRow(joke_id=joke_id, created_at=utcnow(), **values)
            s.add(row)
            await s.flush()
            return _item(row)

    async def for_joke(self, joke_id: int) -> OutboxItem | None:
        """The reply row written with ``joke_id`` (the newest, if there were several)."""
        async with self.store.session() as s:
            row = await s.scalar(
                select(OutboxRow)
                .where(OutboxRow.channel == self.channel, OutboxRow.joke_id == joke_id)
                .order_by(OutboxRow.id.desc())
                .limit(1)
            )
            return _item(row) if row is not None else None

    async def delivered_result(self, joke_id: int) -> dict[str, Any] | None:
        """What the platform answered when the joke was delivered (message ids), if it was."""
        async with self.store.session() as s:
            return await s.scalar(
                select(OutboxRow.result)
                .where(
                    OutboxRow.channel == self.channel,
                    OutboxRow.joke_id == joke_id,
                    OutboxRow.state == DELIVERED,
                )
                .order_by(OutboxRow.id.desc())
                .limit(1)
            )

    # ------------------------------------------------------------------ claiming

    async def is_head(self, item: OutboxItem) -> bool:
        """True when no older reply to the same chat is still pending (order per chat)."""
        async with self.store.session() as s:
            older = await s.scalar(
                select(func.count())
                .select_from(OutboxRow)
                .where(
                    OutboxRow.channel == self.channel,
                    OutboxRow.chat_key == item.chat_key,
                    OutboxRow.state == PENDING,
                    OutboxRow.id < item.id,
                )
            )
        return not older

    async def claim_due(self, limit: int = 32) -> list[OutboxItem]:
        """Claim up to ``limit`` due rows, each the oldest pending one of its chat."""
        now = utcnow()
        older = aliased(OutboxRow)
        free = or_(OutboxRow.claimed_by.is_(None), OutboxRow.lease_until < now)
        query = (
            select(OutboxRow.id)
            .where(
                OutboxRow.channel == self.channel,
                OutboxRow.state == PENDING,
                OutboxRow.next_attempt_at <= now,
                free,
                ~exists().where(
                    and_(
                        older.channel == OutboxRow.channel,
                        older.chat_key == OutboxRow.chat_key,
                        older.state == PENDING,
                        older.id < OutboxRow.id,
                    )
                ),
            )
            .order_by(OutboxRow.id)
            .limit(limit)
        )
        async with self.store.session() as s:
            ids = list((await s.scalars(query)).all())
        claimed: list[OutboxItem] = []
        for row_id in ids:
            item = await self._claim(row_id)
            if item is not None:
                claimed.append(item)
        return claimed

    async def _claim(self, row_id: int) -> OutboxItem | None:
        now = utcnow()
        async with self.store.session(write=True) as s:
            result = await s.execute(
                update(OutboxRow)
                .where(
                    OutboxRow.id == row_id,
                    OutboxRow.state == PENDING,
                    or_(OutboxRow.claimed_by.is_(None), OutboxRow.lease_until < now),
                )
                .values(claimed_by=self.owner, lease_until=now + timedelta(seconds=self.lease_s))
            )
            if result.rowcount != 1:  # pyright: ignore[reportAttributeAccessIssue]  # DML: a CursorResult
                return None  # another replica was faster
            row = await s.get(OutboxRow, row_id)
            return _item(row) if row is not None else None

    # ------------------------------------------------------------------ outcomes

    async def _finish(self, item_id: int, **values: Any) -> bool:
        async with self.store.session(write=True) as s:
            result = await s.execute(
                update(OutboxRow)
                .where(
                    OutboxRow.id == item_id,
                    OutboxRow.state == PENDING,
                    OutboxRow.claimed_by == self.owner,
                )
                .values(**values)
            )
            return result.rowcount == 1  # pyright: ignore[reportAttributeAccessIssue]  # DML: a CursorResult

    async def delivered(self, item: OutboxItem, result: dict[str, Any] | None = None) -> None:
        done = await self._finish(
            item.id,
            state=DELIVERED,
            result=result or {},
            finished_at=utcnow(),
            claimed_by=None,
            lease_until=None,
            attempts=item.attempts + 1,
        )
        if done:
            self._count("delivered")
        else:  # our lease lapsed and another sender took it: it may have been sent twice
            log.warning("outbox: reply %s was delivered after its claim lapsed", item.id)

    async def failed(
        self,
        item: OutboxItem,
        reason: str,
        seconds: float | None = None,
        *,
        may_give_up: bool = False,
    ) -> bool:
        """Give the row back, due again after ``seconds``; False if it was given up instead.

        ``seconds`` is the platform's own delay (a 429's ``retry_after``): respected, not counted.
        Without it the failure counts in ``attempts`` and the row is due after an exponential
        backoff. ``may_give_up`` (a bug, not a platform's bad time): at the ``max_attempts``-th
        failure the row is given up instead, so its chat moves on.
        """
        reason = scrub(reason, item.payload)
        attempts = item.attempts
        if seconds is None:
            attempts += 1
            if may_give_up and attempts >= self.max_attempts:
                await self._give_up(item, attempts, reason)
                return False
            seconds = min(self.retry_max_s, self.retry_base_s * 2 ** min(item.attempts, 16))
            seconds *= random.uniform(0.75, 1.25)
        await self._finish(
            item.id,
            attempts=attempts,
            next_attempt_at=utcnow() + timedelta(seconds=max(0.0, seconds)),
            claimed_by=None,
            lease_until=None,
            last_error=reason[:500],
        )
        self._count("retried")
        return True

    async def _give_up(self, item: OutboxItem, attempts: int, reason: str) -> None:
        """Drop a row that failed ``attempts`` times without a platform delay (a poison row)."""
        done = await self._finish(
            item.id,
            state=DROPPED,
            attempts=attempts,
            finished_at=utcnow(),
            claimed_by=None,
            lease_until=None,
            last_error=f"gave up after {attempts} failed attempts: {reason}"[:500],
        )
        if done:
            self._count(GAVE_UP)
            log.warning(
                "outbox: %s reply %s (joke %s) given up after %d failed attempts, its chat "
                "moves on: %s",
                self.channel,
                item.id,
                item.joke_id,
                attempts,
                reason[:200],
            )

    async def renew(self, item: OutboxItem) -> bool:
        """Extend this process's claim on a row it is still sending (a long flood-control wait
        must not let another replica send it too); False if the claim was lost."""
        now = utcnow()
        async with self.store.session(write=True) as s:
            result = await s.execute(
                update(OutboxRow)
                .where(
                    OutboxRow.id == item.id,
                    OutboxRow.state == PENDING,
                    OutboxRow.claimed_by == self.owner,
                )
                .values(lease_until=now + timedelta(seconds=self.lease_s))
            )
            return result.rowcount == 1  # pyright: ignore[reportAttributeAccessIssue]  # DML: a CursorResult

    async def release(self, item: OutboxItem) -> None:
        """Give the row back untouched (an older reply to the chat must go first)."""
        await self._finish(item.id, claimed_by=None, lease_until=None)

    async def drop(self, item: OutboxItem, reason: str) -> None:
        """The row can never be delivered (``Undeliverable``): dropped at once."""
        reason = scrub(reason, item.payload)
        done = await self._finish(
            item.id,
            state=DROPPED,
            finished_at=utcnow(),
            claimed_by=None,
            lease_until=None,
            last_error=reason[:500],
        )
        if done:
            self._count("dropped")
            log.warning(
                "outbox: %s reply %s (joke %s) cannot be delivered: %s",
                self.channel,
                item.id,
                item.joke_id,
                reason[:200],
            )

    async def expire(self) -> int:
        """Mark pending rows older than ``max_age_s`` (and not being sent) expired."""
        now = utcnow()
        cutoff = now - timedelta(seconds=self.max_age_s)
        where = and_(
            OutboxRow.channel == self.channel,
            OutboxRow.state == PENDING,
            OutboxRow.created_at < cutoff,
            or_(OutboxRow.claimed_by.is_(None), OutboxRow.lease_until < now),
        )
        async with self.store.session(write=True) as s:
            rows = (await s.execute(select(OutboxRow.id, OutboxRow.joke_id).where(where))).all()
            if not rows:
                return 0
            await s.execute(
                update(OutboxRow)
                .where(where, OutboxRow.id.in_([r[0] for r in rows]))
                .values(state=EXPIRED, finished_at=now, claimed_by=None, lease_until=None)
            )
        self._count("expired", len(rows))
        log.warning(
            "outbox: %d %s replies expired undelivered after %.0f s (jokes %s)",
            len(rows),
            self.channel,
            self.max_age_s,
            ", ".join(str(r[1]) for r in rows[:20]) + (" …" if len(rows) > 20 else ""),
        )
        return len(rows)

    async def counts(self) -> dict[str, int]:
        """Rows by state for this channel (operators, tests, the flood benchmark)."""
        async with self.store.session() as s:
            rows = await s.execute(
                select(OutboxRow.state, func.count())
                .where(OutboxRow.channel == self.channel)
                .group_by(OutboxRow.state)
            )
            return {state: int(n) for state, n in rows.all()}


Deliver = Callable[[OutboxItem], Awaitable[dict[str, Any] | None]]


class OutboxWorker:
    """Sends a channel's replies: at once for a new joke, and later for whatever is pending.

    ``send_now`` is the fast path right after a joke was stored; the background loop (``start``)
    picks up the rest — failed sends, rows of a killed replica whose lease lapsed, rows that had to
    wait for an older reply to the same chat — and expires what got too old.
    """

    def __init__(
        self,
        outbox: Outbox,
        deliver: Deliver,
        *,
        poll_s: float = 1.0,
        batch: int = 32,
        concurrency: int = 16,
    ) -> None:
        self.outbox = outbox
        self.deliver = deliver
        self.poll_s = poll_s
        self.batch = batch
        self._slots = asyncio.Semaphore(concurrency)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._waiting_chats: set[str] = set()  # chats with a reply queued behind another
        self._inflight: set[int] = set()  # rows this process is sending right now
        self._expired_at = 0.0
        self._last_delivered = 0  # of the last round (run_once)

    def _wait_behind(self, chat_key: str) -> None:
        """Remember that a reply of ``chat_key`` waits for the one being sent (bounded: a
        forgotten chat is picked up by the next poll instead of at once)."""
        if len(self._waiting_chats) > 10_000:
            self._waiting_chats.clear()
        self._waiting_chats.add(chat_key)

    async def send_now(self, item: OutboxItem) -> bool:
        """Deliver a freshly stored (and claimed) reply now if it is its chat's next one."""
        try:
            if not await self.outbox.is_head(item):
                await self.outbox.release(item)
                self._wait_behind(item.chat_key)
                return False
        except Exception:
            log.warning("outbox: could not check the order of reply %s", item.id, exc_info=True)
            return False  # still claimed: the lease lapses and the loop sends it
        return await self._attempt(item)

    async def _renew_while_sending(self, item: OutboxItem) -> None:
        while True:
            await asyncio.sleep(self.outbox.lease_s / 3)
            try:
                if not await self.outbox.renew(item):
                    return
            except Exception:  # the database is down: the send goes on, the lease may lapse
                log.debug("outbox: could not renew the claim on %s", item.id, exc_info=True)

    async def _attempt(self, item: OutboxItem) -> bool:
        if item.id in self._inflight:  # our own lease lapsed and the loop re-claimed it
            return False
        self._inflight.add(item.id)
        renewer = asyncio.create_task(self._renew_while_sending(item))
        try:
            return await self._attempt_claimed(item)
        finally:
            renewer.cancel()
            self._inflight.discard(item.id)

    async def _attempt_claimed(self, item: OutboxItem) -> bool:
        try:
            result = await self.deliver(item)
        except RetryLater as exc:
            await self._safe(self.outbox.failed(item, exc.reason, exc.seconds))
            self._wake.set()
            return False
        except Undeliverable as exc:
            await self._safe(self.outbox.drop(item, str(exc)))
            return False
        except Exception as exc:  # a bug or an unknown error: retried up to max_attempts times
            trace = "".join(traceback.format_exception(exc)).rstrip()
            log.warning(
                "outbox: sending reply %s failed (failure %d of at most %d):\n%s",
                item.id,
                item.attempts + 1,
                self.outbox.max_attempts,
                scrub(trace, item.payload),
            )
            failure = f"{type(exc).__name__}: {exc}"
            await self._safe(self.outbox.failed(item, failure, may_give_up=True))
            self._wake.set()
            return False
        await self._safe(self.outbox.delivered(item, result))
        if item.chat_key in self._waiting_chats:  # the chat's next reply is due now
            self._waiting_chats.discard(item.chat_key)
            self._wake.set()
        return True

    async def _safe(self, work: Awaitable[Any]) -> None:
        try:
            await work
        except Exception:  # the database is down: the lease lapses and the row is retried
            log.warning("outbox: could not record a delivery outcome", exc_info=True)

    async def run_once(self) -> int:
        """Expire, claim what is due, deliver it; returns how many rows were attempted."""
        loop = asyncio.get_running_loop()
        if loop.time() - self._expired_at >= self.poll_s:
            self._expired_at = loop.time()
            await self.outbox.expire()
        items = await self.outbox.claim_due(self.batch)
        for item in items:  # delivered by the loop: the chat's next row comes on the next round
            self._wait_behind(item.chat_key)

        async def one(item: OutboxItem) -> bool:
            async with self._slots:
                return await self._attempt(item)

        self._last_delivered = sum(await asyncio.gather(*(one(i) for i in items)))
        return len(items)

    def start(self) -> None:
        if self._task is None:
            self._stopping = False
            self._task = asyncio.create_task(self._loop(), name=f"outbox-{self.outbox.channel}")

    async def stop(self) -> None:
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            self._wake.set()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def wake(self) -> None:
        self._wake.set()

    async def _loop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                attempted = await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("outbox: a delivery round failed", exc_info=True)
                attempted = 0
            if attempted and self._last_delivered:
                continue
            if attempted:  # every send failed (a retry "after 0 s" is due at once): no spinning
                self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            except TimeoutError:
                pass
