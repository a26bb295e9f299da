"""Persistence: SQLAlchemy 2 async over SQLite (default, WAL) or PostgreSQL; Alembic migrations.

Images are content-addressed files (sha256) under ``images_dir``; a joke row is a snapshot of what
the model saw (image hash, prompt, parameters, model version) so training needs no chat history.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    case,
    event,
    func,
    literal,
    select,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from bot.models import Joke, NormalizedImage, NotFound, OogiriError, Rating, StoreUnavailable

log = logging.getLogger(__name__)


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_public_id() -> str:
    """A joke's public id: 16 URL-safe characters, 96 random bits."""
    return secrets.token_urlsafe(12)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: DateTime(timezone=True),
        dict[str, Any]: JSON,
    }


MIGRATION_LOCK_ID = 0x006F6F6769726901  # "oogiri" + 1: the advisory lock held while migrating

# BigInteger keys autoincrement on PostgreSQL; SQLite needs plain INTEGER for rowid aliasing.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")


class ImageRow(Base):
    __tablename__ = "images"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    path: Mapped[str] = mapped_column(String(255))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(Integer)
    source_format: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class JokeRow(Base):
    __tablename__ = "jokes"
    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    image_sha256: Mapped[str] = mapped_column(ForeignKey("images.sha256"), index=True)
    channel: Mapped[str] = mapped_column(String(32))
    user_id: Mapped[str] = mapped_column(String(128), index=True)
    chat_id: Mapped[str | None] = mapped_column(String(128))
    prompt: Mapped[str] = mapped_column(Text)
    hint: Mapped[str | None] = mapped_column(Text)
    text: Mapped[str] = mapped_column(Text)
    model_version: Mapped[str] = mapped_column(String(128), index=True)
    engine: Mapped[str] = mapped_column(String(32))
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    latency_ms: Mapped[int] = mapped_column(Integer, default=0)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    # The id a public API shows (migration 0002_public_ids): random, so jokes cannot be
    # enumerated; the sequential ``id`` stays internal.
    public_id: Mapped[str | None] = mapped_column(String(32), unique=True, index=True)


class RatingRow(Base):
    __tablename__ = "ratings"
    __table_args__ = (UniqueConstraint("joke_id", "user_id", name="uq_rating_joke_user"),)
    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    joke_id: Mapped[int] = mapped_column(ForeignKey("jokes.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[str] = mapped_column(String(128))
    channel: Mapped[str] = mapped_column(String(32))
    value: Mapped[int] = mapped_column(SmallInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    # A keyed hash of the voter's network for votes from anonymous channels (migration
    # 0002_vote_networks): training can ask for several distinct networks behind a joke.
    network: Mapped[str | None] = mapped_column(String(64))


class RequestRow(Base):
    """Every outcome of ``JokeService.tell`` (success, rejection, engine error)."""

    __tablename__ = "requests"
    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    channel: Mapped[str] = mapped_column(String(32))
    user_id: Mapped[str] = mapped_column(String(128))
    chat_id: Mapped[str | None] = mapped_column(String(128))
    outcome: Mapped[str] = mapped_column(String(32), index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    joke_id: Mapped[int | None] = mapped_column(BigInteger)
    latency_ms: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class ModelVersionRow(Base):
    __tablename__ = "model_versions"
    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    version: Mapped[str] = mapped_column(String(128), unique=True)
    path: Mapped[str] = mapped_column(Text)
    parent: Mapped[str | None] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16), default="candidate")
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    data_card: Mapped[dict[str, Any]] = mapped_column(default=dict)
    config: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    promoted_at: Mapped[datetime | None] = mapped_column(nullable=True)


class TrainingRunRow(Base):
    __tablename__ = "training_runs"
    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    status: Mapped[str] = mapped_column(String(16), default="running")
    step: Mapped[str | None] = mapped_column(String(32))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
    model_version: Mapped[str | None] = mapped_column(String(128))
    log_path: Mapped[str | None] = mapped_column(Text)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text)


# --------------------------------------------------------------------------- live A/B tests
# (bot/ab.py, training/ab.py; migration 0002_ab_tests)


class AbTestRow(Base):
    """One live comparison of two model versions on real users' votes.

    ``kind`` "ab": ``control`` is the active model, ``candidate`` the one being tested on a small
    share. ``kind`` "watch" (after a promotion): ``control`` is the newly promoted model and
    ``candidate`` the previous one, kept on a small share so that a disappointment shows.
    ``status``: running, then promoted / rejected / timeout / stopped / failed ("ab") or
    confirmed / rolled_back / stopped ("watch").
    """

    __tablename__ = "ab_tests"
    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16), default="ab")
    control: Mapped[str] = mapped_column(String(128))
    candidate: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16), default="running", index=True)
    share: Mapped[float] = mapped_column(Float)
    rule: Mapped[dict[str, Any]] = mapped_column(default=dict)
    decision: Mapped[dict[str, Any]] = mapped_column(default=dict)
    reason: Mapped[str | None] = mapped_column(Text)
    run_id: Mapped[int | None] = mapped_column(BigInteger)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(nullable=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class AbTestBusy(RuntimeError):
    """Another live test is still running (one at a time)."""

    def __init__(self, test_id: int) -> None:
        super().__init__(f"A/B test #{test_id} is still running")
        self.test_id = test_id


@dataclass(frozen=True, slots=True)
class ArmCount:
    """Votes of one arm of a test as the decision counts them (capped per voter)."""

    arm: str  # "control" or "candidate"
    likes: int = 0
    votes: int = 0
    voters: int = 0
    raw_votes: int = 0  # before the per-voter cap
    jokes: int = 0
    # per-voter sums (likes_u², likes_u·votes_u, votes_u²) for the clustered variance of the rule
    sum_likes_sq: int = 0
    sum_likes_votes: int = 0
    sum_votes_sq: int = 0


# --------------------------------------------------------------------------- outbox, moderation
# (bot/outbox.py, bot/moderation.py; migration 0002_outbox_moderation)


class OutboxRow(Base):
    """A reply a channel owes a chat: written with its joke, gone only when delivered or expired.

    ``state``: pending → delivered | expired | dropped. One sender at a time: a sender *claims* a
    row (``claimed_by`` + ``lease_until``) with an UPDATE that only matches an unclaimed or lapsed
    row, so replicas never send the same reply twice while a lease holds.
    """

    __tablename__ = "outbox"
    __table_args__ = (
        Index("ix_outbox_due", "channel", "state", "next_attempt_at"),  # the worker's claim query
        Index("ix_outbox_chat", "channel", "chat_key", "state", "id"),  # order per chat
    )
    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    channel: Mapped[str] = mapped_column(String(32))
    chat_key: Mapped[str] = mapped_column(String(160))
    joke_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None] = mapped_column(nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)


class ModerationRow(Base):
    """One entry of the block list or the allow list (``list`` is "block" or "allow")."""

    __tablename__ = "moderation"
    __table_args__ = (UniqueConstraint("list", "subject", name="uq_moderation_list_subject"),)
    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    list: Mapped[str] = mapped_column(String(8))
    subject: Mapped[str] = mapped_column(String(160))
    note: Mapped[str | None] = mapped_column(Text)
    created_by: Mapped[str | None] = mapped_column(String(160))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class JokeRemovalRow(Base):
    """A joke an admin removed: never shown again, never exported for training."""

    __tablename__ = "joke_removals"
    joke_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    removed_by: Mapped[str | None] = mapped_column(String(160))
    reason: Mapped[str | None] = mapped_column(Text)
    removed_at: Mapped[datetime] = mapped_column(default=utcnow)


class ChatMoveRow(Base):
    """A chat that became another (a Telegram group upgraded to a supergroup; migration
    0002_chat_moves): votes pressed in ``new_chat`` count on jokes told in ``old_chat``. Both are
    chat ids as ``JokeRow.chat_id`` holds them (``tg:-123``)."""

    __tablename__ = "chat_moves"
    old_chat: Mapped[str] = mapped_column(String(128), primary_key=True)
    new_chat: Mapped[str] = mapped_column(String(128))
    moved_at: Mapped[datetime] = mapped_column(default=utcnow)


GROUP_COMMIT_MAX = 64  # jokes per SQLite transaction at most


@dataclass(slots=True)
class _PendingJoke:
    image: NormalizedImage
    path: Path
    values: dict[str, Any]
    request: dict[str, Any] | None
    delivery: dict[str, Any] | None = None  # an outbox row for the reply (see OutboxRow)


@dataclass(frozen=True, slots=True)
class VersionStats:
    model_version: str
    jokes: int
    up: int
    down: int

    @property
    def rated(self) -> int:
        return self.up + self.down

    @property
    def like_rate(self) -> float | None:
        return self.up / self.rated if self.rated else None


def _joke_from_row(row: JokeRow, up: int = 0, down: int = 0) -> Joke:
    return Joke(
        id=row.id,
        text=row.text,
        model_version=row.model_version,
        engine=row.engine,
        image_sha256=row.image_sha256,
        channel=row.channel,
        user_id=row.user_id,
        chat_id=row.chat_id,
        prompt=row.prompt,
        latency_ms=row.latency_ms,
        up=up,
        down=down,
        created_at=row.created_at,
        public_id=row.public_id,
    )


def _joke_from_values(joke_id: int, values: dict[str, Any]) -> Joke:
    row = JokeRow(id=joke_id, **values)
    for column in JokeRow.__table__.columns:  # scalar defaults the insert filled in
        default = column.default
        if getattr(row, column.key) is None and default is not None and default.is_scalar:
            setattr(row, column.key, default.arg)
    return _joke_from_row(row)


class Store:
    def __init__(self, url: str, images_dir: Path, echo: bool = False) -> None:
        self.url = url
        self.images_dir = Path(images_dir)
        self.is_sqlite = url.startswith("sqlite")
        kwargs: dict[str, Any] = {"echo": echo}
        if not self.is_sqlite:
            kwargs.update(pool_pre_ping=True, pool_size=10, max_overflow=20)
        self.engine: AsyncEngine = create_async_engine(url, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        images = ImageRow.__table__
        self._image_insert = self._insert(images).on_conflict_do_nothing(  # pyright: ignore[reportArgumentType]
            index_elements=["sha256"]
        )
        jokes = JokeRow.__table__
        self._joke_insert = jokes.insert().returning(  # pyright: ignore[reportAttributeAccessIssue]
            jokes.c.id, sort_by_parameter_order=True
        )
        self._request_insert = RequestRow.__table__.insert()  # pyright: ignore[reportAttributeAccessIssue]
        # SQLite has one writer at a time. A writer that waits for it inside SQLite (busy_timeout)
        # sleeps and polls while holding a pooled connection, and the holder keeps the lock across
        # event-loop round trips (one per statement): under load the lock idles between polls,
        # the pool runs dry ("QueuePool limit ... timed out") and unlucky writers give up after
        # busy_timeout ("database is locked"). So this process's writers queue here instead:
        # FIFO, without a connection, no timeout. (Other processes still meet busy_timeout.)
        self._write_lock: asyncio.Lock | None = asyncio.Lock() if self.is_sqlite else None
        self._pending_jokes: list[tuple[_PendingJoke, asyncio.Future[Joke]]] = []
        self._joke_flusher: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    async def upgrade(self, revision: str = "heads") -> None:
        """Bring the schema to ``revision`` with Alembic (creates the SQLite folder if needed)."""
        new_file: Path | None = None
        if self.is_sqlite:
            db_path = self.url.split("///", 1)[-1]
            if db_path and db_path != ":memory:":
                new_file = _prepare_sqlite_file(Path(db_path))
        from bot.migrations import run_upgrade

        async with self.engine.begin() as conn:
            if not self.is_sqlite:
                # Replicas starting together must not race each other through the migrations;
                # the transaction-scoped lock is released at commit.
                await conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_ID})")
            await conn.run_sync(run_upgrade, revision)
        if new_file is not None and new_file.exists():
            new_file.chmod(0o600)  # SQLite gives its -wal/-shm files the same mode

    async def ping(self) -> None:
        """Raise unless the database answers (``StoreUnavailable`` when it is down)."""
        async with self.session() as s:
            await s.execute(select(1))

    async def close(self) -> None:
        if self._joke_flusher is not None:  # let jokes already accepted reach the database
            await asyncio.gather(self._joke_flusher, return_exceptions=True)
        await self.engine.dispose()

    @asynccontextmanager
    async def session(self, write: bool = False) -> AsyncIterator[AsyncSession]:
        """One transaction; a database that is down or restarting raises ``StoreUnavailable``.

        ``write``: the transaction writes. On SQLite the writers of this process take turns on
        ``_write_lock`` before they check out a connection (see ``__init__``).
        """
        if write and self._write_lock is not None:
            async with self._write_lock:
                async with self._session() as session:
                    yield session
        else:
            async with self._session() as session:
                yield session

    @asynccontextmanager
    async def _session(self) -> AsyncIterator[AsyncSession]:
        try:
            async with self.sessions() as session, session.begin():
                yield session
        except (sa_exc.DBAPIError, sa_exc.TimeoutError, OSError) as exc:
            if not is_unavailable(exc):
                raise
            log.warning("store: database unavailable: %s", _one_line(exc))
            raise StoreUnavailable(detail=f"database unavailable: {type(exc).__name__}") from exc

    # ------------------------------------------------------------------ images

    def image_path(self, sha256: str) -> Path:
        return self.images_dir / sha256[:2] / f"{sha256}.jpg"

    async def save_image(self, image: NormalizedImage) -> Path:
        path = await self._write_image_file(image)
        async with self.session(write=True) as s:
            await self._insert_image(s, image, path)
        return path

    async def _write_image_file(self, image: NormalizedImage) -> Path:
        path = self.image_path(image.sha256)
        if not path.exists():
            try:
                await asyncio.to_thread(_atomic_write, path, image.jpeg)
            except OSError as exc:  # disk full, read-only, quota: nothing was left behind
                log.error("store: cannot write image %s: %s", image.sha256[:12], exc)
                raise StoreUnavailable(detail=f"cannot write image: {exc.strerror}") from exc
        return path

    async def _insert_image(self, s: AsyncSession, image: NormalizedImage, path: Path) -> None:
        conn = await s.connection()
        await conn.execute(
            self._image_insert,
            {
                "sha256": image.sha256,
                "path": str(path.relative_to(self.images_dir)),
                "width": image.width,
                "height": image.height,
                "size_bytes": len(image.jpeg),
                "source_format": image.source_format,
                "created_at": utcnow(),
            },
        )

    def read_image(self, sha256: str) -> bytes:
        return self.image_path(sha256).read_bytes()

    # ------------------------------------------------------------------ jokes

    async def add_joke(
        self,
        image: NormalizedImage,
        request: dict[str, Any] | None = None,
        delivery: dict[str, Any] | None = None,
        **fields: Any,
    ) -> Joke:
        """Store the image file, its row, the joke and (optionally) the request outcome at once.

        ``delivery``: the outbox row of the reply that will carry the joke (``OutboxRow``
        columns), written in the same transaction so that a crash right after cannot lose it.

        One transaction per served joke: either all of it is stored or none of it. On SQLite,
        jokes that arrive while a write is in progress are committed together (group commit):
        SQLite has one writer, and its per-transaction cost was the core's bottleneck.
        """
        path = await self._write_image_file(image)
        item = _PendingJoke(
            image, path, {"image_sha256": image.sha256, **fields}, request, delivery
        )
        item.values["created_at"] = utcnow()
        item.values.setdefault("public_id", new_public_id())
        if self._write_lock is None:
            async with self.session(write=True) as s:
                return (await self._insert_jokes(s, [item]))[0]
        future: asyncio.Future[Joke] = asyncio.get_running_loop().create_future()
        self._pending_jokes.append((item, future))
        if self._joke_flusher is None or self._joke_flusher.done():
            self._joke_flusher = asyncio.create_task(self._flush_jokes())
        return await asyncio.shield(future)

    async def _flush_jokes(self) -> None:
        while self._pending_jokes:
            batch = self._pending_jokes[:GROUP_COMMIT_MAX]
            del self._pending_jokes[: len(batch)]
            try:
                async with self.session(write=True) as s:
                    jokes = await self._insert_jokes(s, [item for item, _ in batch])
            except Exception:
                # One bad joke must not fail its neighbours: write each on its own.
                for item, future in batch:
                    try:
                        async with self.session(write=True) as s:
                            (joke,) = await self._insert_jokes(s, [item])
                    except Exception as exc:
                        if not future.done():
                            future.set_exception(exc)
                    else:
                        if not future.done():
                            future.set_result(joke)
            else:
                for (_, future), joke in zip(batch, jokes, strict=True):
                    if not future.done():
                        future.set_result(joke)

    async def _insert_jokes(self, s: AsyncSession, items: list[_PendingJoke]) -> list[Joke]:
        # Prepared Core statements, each executed once for the whole batch (executemany): this
        # is the hot write of every served joke; per-call ORM work and round trips dominated it.
        conn = await s.connection()
        now = utcnow()
        await conn.execute(
            self._image_insert,
            [
                {
                    "sha256": it.image.sha256,
                    "path": str(it.path.relative_to(self.images_dir)),
                    "width": it.image.width,
                    "height": it.image.height,
                    "size_bytes": len(it.image.jpeg),
                    "source_format": it.image.source_format,
                    "created_at": now,
                }
                for it in items
            ],
        )
        result = await conn.execute(self._joke_insert, [it.values for it in items])
        ids = [row[0] for row in result.all()]
        requests = [
            {
                "joke_id": joke_id,
                "outcome": "ok",
                "reason": None,
                "created_at": it.values["created_at"],
                **it.request,
            }
            for it, joke_id in zip(items, ids, strict=True)
            if it.request is not None
        ]
        if requests:
            await conn.execute(self._request_insert, requests)
        deliveries = [
            {"joke_id": joke_id, "created_at": it.values["created_at"], **it.delivery}
            for it, joke_id in zip(items, ids, strict=True)
            if it.delivery is not None
        ]
        if deliveries:
            await conn.execute(OutboxRow.__table__.insert(), deliveries)  # pyright: ignore[reportAttributeAccessIssue]
        return [
            _joke_from_values(joke_id, it.values) for it, joke_id in zip(items, ids, strict=True)
        ]

    async def get_joke(self, joke_id: int) -> Joke:
        async with self.session() as s:
            row = await s.get(JokeRow, joke_id)
            if row is None:
                raise NotFound()
            up, down = await self._counts(s, joke_id)
            return _joke_from_row(row, up, down)

    async def get_joke_by_public_id(self, public_id: str) -> Joke:
        """The joke a public API names (``Joke.public_id``); ``NotFound`` otherwise."""
        async with self.session() as s:
            row = await s.scalar(select(JokeRow).where(JokeRow.public_id == public_id))
            if row is None:
                raise NotFound()
            up, down = await self._counts(s, row.id)
            return _joke_from_row(row, up, down)

    async def record_request(self, **fields: Any) -> None:
        async with self.session(write=True) as s:
            s.add(RequestRow(**fields))

    async def request_outcomes(self) -> dict[str, int]:
        async with self.session() as s:
            rows = await s.execute(
                select(RequestRow.outcome, func.count()).group_by(RequestRow.outcome)
            )
            return {outcome: n for outcome, n in rows.all()}

    # ------------------------------------------------------------------ ratings

    async def rate(
        self,
        joke_id: int,
        user_id: str,
        value: int,
        channel: str,
        chat_id: str | None = None,
        network: str | None = None,
    ) -> Rating:
        """One vote per user per joke; a second vote replaces the first.

        With ``chat_id`` the joke must belong to that chat (or to a chat that became it, see
        ``move_chat``), so a forged button from another chat cannot vote on it. ``network``: a
        keyed hash of where an anonymous vote came from.
        """
        if value not in (1, -1):
            raise OogiriError("bad_vote")
        async with self.session(write=True) as s:
            # the joke's row lock (FOR NO KEY UPDATE) orders concurrent votes on it (PostgreSQL;
            # SQLite's writes are serial already): else two presses at once both read "no vote"
            joke = await s.get(JokeRow, joke_id, with_for_update={"key_share": True})
            if joke is None:
                raise NotFound()
            if chat_id is not None and joke.chat_id != chat_id:
                moved_to = joke.chat_id and await s.scalar(
                    select(ChatMoveRow.new_chat).where(ChatMoveRow.old_chat == joke.chat_id)
                )
                if moved_to != chat_id:
                    raise NotFound()
            previous = await s.scalar(
                select(RatingRow.value).where(
                    RatingRow.joke_id == joke_id, RatingRow.user_id == user_id
                )
            )
            now = utcnow()
            stmt = self._insert(RatingRow).values(
                joke_id=joke_id,
                user_id=user_id,
                channel=channel,
                value=value,
                created_at=now,
                updated_at=now,
                network=network,
            )
            stmt = stmt.on_conflict_do_update(
                index_elements=["joke_id", "user_id"],
                set_={"value": value, "updated_at": now, "network": network},
            )
            await s.execute(stmt)
            up, down = await self._counts(s, joke_id)
        return Rating(
            joke_id=joke_id,
            user_id=user_id,
            value=value,
            previous=previous,
            up=up,
            down=down,
            channel=channel,
        )

    async def move_chat(self, old_chat: str, new_chat: str) -> None:
        """Remember that chat ``old_chat`` became ``new_chat`` (idempotent)."""
        now = utcnow()
        stmt = self._insert(ChatMoveRow).values(old_chat=old_chat, new_chat=new_chat, moved_at=now)
        stmt = stmt.on_conflict_do_update(
            index_elements=["old_chat"], set_={"new_chat": new_chat, "moved_at": now}
        )
        async with self.session(write=True) as s:
            await s.execute(stmt)

    async def ratings_for(self, joke_id: int) -> list[tuple[str, int]]:
        async with self.session() as s:
            rows = await s.execute(
                select(RatingRow.user_id, RatingRow.value)
                .where(RatingRow.joke_id == joke_id)
                .order_by(RatingRow.id)
            )
            return [(u, v) for u, v in rows.all()]

    async def count_ratings(self, since: datetime | None = None) -> int:
        async with self.session() as s:
            q = select(func.count()).select_from(RatingRow)
            if since is not None:
                q = q.where(RatingRow.updated_at > since)
            return int(await s.scalar(q) or 0)

    async def _counts(self, s: AsyncSession, joke_id: int) -> tuple[int, int]:
        row = (
            await s.execute(
                select(
                    func.coalesce(func.sum(case((RatingRow.value > 0, 1), else_=0)), 0),
                    func.coalesce(func.sum(case((RatingRow.value < 0, 1), else_=0)), 0),
                ).where(RatingRow.joke_id == joke_id)
            )
        ).one()
        return int(row[0]), int(row[1])

    async def stats(self) -> list[VersionStats]:
        """Jokes, 👍 and 👎 per model version (each user's current vote counts once)."""
        up = func.coalesce(func.sum(case((RatingRow.value > 0, 1), else_=0)), 0)
        down = func.coalesce(func.sum(case((RatingRow.value < 0, 1), else_=0)), 0)
        async with self.session() as s:
            jokes = dict(
                (
                    await s.execute(
                        select(JokeRow.model_version, func.count()).group_by(JokeRow.model_version)
                    )
                ).all()
            )
            votes = {
                mv: (int(u), int(d))
                for mv, u, d in (
                    await s.execute(
                        select(JokeRow.model_version, up, down)
                        .join(RatingRow, RatingRow.joke_id == JokeRow.id)
                        .group_by(JokeRow.model_version)
                    )
                ).all()
            }
        return [VersionStats(mv, int(n), *votes.get(mv, (0, 0))) for mv, n in sorted(jokes.items())]

    async def rated_jokes(self) -> list[dict[str, Any]]:
        """Every joke that has at least one vote, with its vote list (for training export)."""
        async with self.session() as s:
            rows = (
                await s.execute(
                    select(
                        JokeRow,
                        RatingRow.user_id,
                        RatingRow.value,
                        RatingRow.channel,
                        RatingRow.network,
                    )
                    .join(RatingRow, RatingRow.joke_id == JokeRow.id)
                    .order_by(JokeRow.id, RatingRow.id)
                )
            ).all()
        out: dict[int, dict[str, Any]] = {}
        for joke, voter, value, vote_channel, network in rows:
            item = out.setdefault(
                joke.id,
                {
                    "joke": _joke_from_row(joke),
                    "params": joke.params,
                    "hint": joke.hint,
                    "votes": [],
                    "vote_sources": {},  # voter → (channel, network hash or None)
                },
            )
            item["votes"].append((voter, value))
            item["vote_sources"][voter] = (vote_channel, network)
        return list(out.values())

    # ------------------------------------------------------------------ model registry

    async def add_model_version(
        self,
        version: str,
        path: str,
        parent: str | None = None,
        status: str = "candidate",
        metrics: dict[str, Any] | None = None,
        data_card: dict[str, Any] | None = None,
        config: str | None = None,
    ) -> None:
        async with self.session(write=True) as s:
            s.add(
                ModelVersionRow(
                    version=version,
                    path=path,
                    parent=parent,
                    status=status,
                    metrics=metrics or {},
                    data_card=data_card or {},
                    config=config,
                )
            )

    async def model_versions(self) -> Sequence[ModelVersionRow]:
        async with self.session() as s:
            return (
                (await s.execute(select(ModelVersionRow).order_by(ModelVersionRow.id)))
                .scalars()
                .all()
            )

    async def get_model_version(self, version: str) -> ModelVersionRow | None:
        async with self.session() as s:
            return await s.scalar(select(ModelVersionRow).where(ModelVersionRow.version == version))

    async def active_model(self) -> ModelVersionRow | None:
        async with self.session() as s:
            return await s.scalar(
                select(ModelVersionRow).where(ModelVersionRow.status == "active").limit(1)
            )

    async def set_model_status(self, version: str, status: str, **fields: Any) -> None:
        async with self.session(write=True) as s:
            if status == "active":
                await s.execute(
                    update(ModelVersionRow)
                    .where(ModelVersionRow.status == "active")
                    .values(status="retired")
                )
                fields.setdefault("promoted_at", utcnow())
            result = await s.execute(
                update(ModelVersionRow)
                .where(ModelVersionRow.version == version)
                .values(status=status, **fields)
            )
            if result.rowcount == 0:  # pyright: ignore[reportAttributeAccessIssue]
                raise LookupError(f"no model version {version!r}")

    # ------------------------------------------------------------------ training runs

    async def start_training_run(self, log_path: str | None = None) -> int:
        async with self.session(write=True) as s:
            row = TrainingRunRow(log_path=log_path, status="running", started_at=utcnow())
            s.add(row)
            await s.flush()
            return row.id

    async def update_training_run(self, run_id: int, **fields: Any) -> None:
        async with self.session(write=True) as s:
            await s.execute(
                update(TrainingRunRow).where(TrainingRunRow.id == run_id).values(**fields)
            )

    async def training_runs(self) -> Sequence[TrainingRunRow]:
        async with self.session() as s:
            return (
                (await s.execute(select(TrainingRunRow).order_by(TrainingRunRow.id)))
                .scalars()
                .all()
            )

    # ------------------------------------------------------------------ live A/B tests

    async def start_ab_test(
        self,
        *,
        kind: str,
        control: str,
        candidate: str,
        share: float,
        rule: dict[str, Any],
        run_id: int | None = None,
    ) -> AbTestRow:
        """Record a new running test; ``AbTestBusy`` while another one runs (one at a time)."""
        async with self.session(write=True) as s:
            running = await s.scalar(
                select(AbTestRow.id).where(AbTestRow.status == "running").limit(1)
            )
            if running is not None:
                raise AbTestBusy(running)
            now = utcnow()
            row = AbTestRow(
                kind=kind,
                control=control,
                candidate=candidate,
                status="running",
                share=share,
                rule=rule,
                decision={},
                run_id=run_id,
                started_at=now,
                updated_at=now,
            )
            s.add(row)
            await s.flush()
            return row

    async def ab_tests(self, limit: int | None = None) -> Sequence[AbTestRow]:
        """Tests, newest first."""
        async with self.session() as s:
            q = select(AbTestRow).order_by(AbTestRow.id.desc())
            if limit is not None:
                q = q.limit(limit)
            return (await s.execute(q)).scalars().all()

    async def get_ab_test(self, test_id: int) -> AbTestRow | None:
        async with self.session() as s:
            return await s.get(AbTestRow, test_id)

    async def running_ab_test(self) -> AbTestRow | None:
        async with self.session() as s:
            return await s.scalar(
                select(AbTestRow)
                .where(AbTestRow.status == "running")
                .order_by(AbTestRow.id)
                .limit(1)
            )

    async def update_ab_test(self, test_id: int, **fields: Any) -> None:
        async with self.session(write=True) as s:
            await s.execute(
                update(AbTestRow)
                .where(AbTestRow.id == test_id)
                .values(updated_at=utcnow(), **fields)
            )

    async def end_ab_test(self, test_id: int, status: str, reason: str, **fields: Any) -> bool:
        """Mark a running test ended; False if it had already ended (someone else decided)."""
        now = utcnow()
        async with self.session(write=True) as s:
            result = await s.execute(
                update(AbTestRow)
                .where(AbTestRow.id == test_id, AbTestRow.status == "running")
                .values(status=status, reason=reason, ended_at=now, updated_at=now, **fields)
            )
            return bool(result.rowcount)  # pyright: ignore[reportAttributeAccessIssue]

    def _ab_window(self, test: AbTestRow) -> Any:
        cond = JokeRow.created_at >= test.started_at
        if test.ended_at is not None:
            cond = cond & (JokeRow.created_at <= test.ended_at)
        return cond

    async def ab_arm_counts(
        self, test: AbTestRow, cap: int | None, web_voter: str = "session"
    ) -> dict[str, ArmCount]:
        """Votes per arm for the jokes served during ``test``, counted in SQL.

        A vote is one (voter, joke) (a changed vote replaces the old one, so repeats never
        stack); each voter counts at most ``cap`` votes per arm, earliest first, so no one
        person decides a test. Jokes of the candidate's version are its arm; every other joke
        served during the test came from the active model (the control arm).

        ``web_voter`` says who the voter behind a web vote is (``bot.ab.web_voter`` maps
        ``training.web_votes`` onto it): "session" (the cookie, as any platform account),
        "network" (every session of one network is one voter: one vote per joke, one cap, one
        cluster of the rule's variance, so minted cookies add nothing) or "exclude".
        """
        if web_voter not in ("session", "network", "exclude"):
            raise ValueError(f"web_voter must be session, network or exclude, not {web_voter!r}")
        arm = case((JokeRow.model_version == test.candidate, "candidate"), else_="control")
        window = self._ab_window(test)
        is_web = RatingRow.channel == "web"
        voter: Any = RatingRow.user_id
        if web_voter == "network":  # votes from before networks were recorded: one unknown one
            network = literal("web-network:").concat(func.coalesce(RatingRow.network, "unknown"))
            voter = case((is_web, network), else_=RatingRow.user_id)
        rated = (
            select(
                arm.label("arm"),
                voter.label("voter"),
                case((RatingRow.value > 0, 1), else_=0).label("up"),
                RatingRow.created_at.label("at"),
                RatingRow.id.label("rid"),
                func.row_number()
                .over(
                    partition_by=(voter, RatingRow.joke_id),
                    order_by=(RatingRow.created_at, RatingRow.id),
                )
                .label("dup"),
            )
            .join(RatingRow, RatingRow.joke_id == JokeRow.id)
            .where(window)
        )
        if web_voter == "exclude":
            rated = rated.where(~is_web)
        rated_q = rated.subquery()
        rank = (
            func.row_number()
            .over(
                partition_by=(rated_q.c.arm, rated_q.c.voter),
                order_by=(rated_q.c.at, rated_q.c.rid),
            )
            .label("n")
        )
        votes = (
            select(rated_q.c.arm, rated_q.c.voter, rated_q.c.up, rank)
            .where(rated_q.c.dup == 1)  # one vote per (voter, joke): the earliest one
            .subquery()
        )
        per_voter = select(
            votes.c.arm,
            func.sum(votes.c.up).label("likes"),
            func.count().label("votes"),
        ).group_by(votes.c.arm, votes.c.voter)
        if cap is not None:
            per_voter = per_voter.where(votes.c.n <= cap)
        pv = per_voter.subquery()
        counted = select(
            pv.c.arm,
            func.coalesce(func.sum(pv.c.likes), 0),
            func.coalesce(func.sum(pv.c.votes), 0),
            func.count(),
            func.coalesce(func.sum(pv.c.likes * pv.c.likes), 0),
            func.coalesce(func.sum(pv.c.likes * pv.c.votes), 0),
            func.coalesce(func.sum(pv.c.votes * pv.c.votes), 0),
        ).group_by(pv.c.arm)
        raw = (  # every stored vote of the window, before any policy or cap
            select(arm.label("arm"), func.count())
            .join(RatingRow, RatingRow.joke_id == JokeRow.id)
            .where(window)
            .group_by(arm)
        )
        jokes = select(arm.label("arm"), func.count()).where(window).group_by(arm)
        async with self.session() as s:
            got = {row[0]: tuple(int(x) for x in row[1:]) for row in await s.execute(counted)}
            raw_n = {a: int(n) for a, n in (await s.execute(raw)).all()}
            joke_n = {a: int(n) for a, n in (await s.execute(jokes)).all()}
        out = {}
        for name in ("control", "candidate"):
            likes, voted, voters, s_ll, s_lv, s_vv = got.get(name, (0, 0, 0, 0, 0, 0))
            out[name] = ArmCount(
                name, likes, voted, voters, raw_n.get(name, 0), joke_n.get(name, 0),
                s_ll, s_lv, s_vv,
            )  # fmt: skip
        return out

    async def ab_request_counts(
        self, test: AbTestRow, failed: Sequence[str]
    ) -> tuple[dict[tuple[str, str, str], int], dict[tuple[str, str], int]]:
        """Answers per (arm, channel, user) and failed requests (``outcome`` in ``failed``) per
        (channel, user) during ``test``. A failed request has no joke and so no model version:
        ``bot.ab`` gives it to the arm the user was routed to (a hash, not SQL)."""
        arm = case((JokeRow.model_version == test.candidate, "candidate"), else_="control")
        answered = (
            select(arm, JokeRow.channel, JokeRow.user_id, func.count())
            .where(self._ab_window(test))
            .group_by(arm, JokeRow.channel, JokeRow.user_id)
        )
        cond = (RequestRow.created_at >= test.started_at) & RequestRow.outcome.in_(list(failed))
        if test.ended_at is not None:
            cond = cond & (RequestRow.created_at <= test.ended_at)
        failures = (
            select(RequestRow.channel, RequestRow.user_id, func.count())
            .where(cond)
            .group_by(RequestRow.channel, RequestRow.user_id)
        )
        async with self.session() as s:
            ok = {(a, c, u): int(n) for a, c, u, n in (await s.execute(answered)).all()}
            bad = {(c, u): int(n) for c, u, n in (await s.execute(failures)).all()}
        return ok, bad

    async def like_rate_series(
        self, since: datetime | None = None, bucket: str = "day"
    ) -> list[tuple[str, str, int, int]]:
        """(model_version, bucket start, likes, votes) per version and day (or hour) of the
        jokes' creation, oldest first; each user's current vote on a joke counts once."""
        if bucket not in ("day", "hour"):
            raise ValueError("bucket must be 'day' or 'hour'")
        if self.is_sqlite:
            fmt = "%Y-%m-%d" if bucket == "day" else "%Y-%m-%dT%H:00"
            key = func.strftime(fmt, JokeRow.created_at)
        else:
            fmt = "YYYY-MM-DD" if bucket == "day" else 'YYYY-MM-DD"T"HH24:00'
            key = func.to_char(func.timezone("UTC", JokeRow.created_at), fmt)
        key = key.label("bucket")
        q = (
            select(
                JokeRow.model_version,
                key,
                func.coalesce(func.sum(case((RatingRow.value > 0, 1), else_=0)), 0),
                func.count(),
            )
            .join(RatingRow, RatingRow.joke_id == JokeRow.id)
            .group_by(JokeRow.model_version, key)
            .order_by(key, JokeRow.model_version)
        )
        if since is not None:
            q = q.where(JokeRow.created_at >= since)
        async with self.session() as s:
            return [(mv, str(b), int(u), int(n)) for mv, b, u, n in (await s.execute(q)).all()]

    # ------------------------------------------------------------------ helpers

    def _insert(self, table: type[Base]) -> Any:
        return (sqlite.insert if self.is_sqlite else postgresql.insert)(table)


#: SQLSTATE classes that mean "the server cannot serve now", not "this statement is wrong":
#: 08 connection exception, 53 insufficient resources (disk full, too many connections),
#: 57 operator intervention (shutting down, starting up), 58 system error (I/O).
_UNAVAILABLE_SQLSTATE_CLASSES = ("08", "53", "57", "58")


def is_unavailable(exc: BaseException) -> bool:
    """True for errors a retry later can fix: the database is down, restarting, locked or full."""
    if isinstance(exc, OSError | sa_exc.TimeoutError):  # refused, reset; pool exhausted
        return True
    if not isinstance(exc, sa_exc.DBAPIError):
        return False
    if exc.connection_invalidated or isinstance(
        exc, sa_exc.OperationalError | sa_exc.InterfaceError
    ):
        return True
    sqlstate = getattr(exc.orig, "sqlstate", None)
    return isinstance(sqlstate, str) and sqlstate[:2] in _UNAVAILABLE_SQLSTATE_CLASSES


def _one_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def _prepare_sqlite_file(path: Path) -> Path | None:
    """Create the database's folder 0700; the file itself when it is new (to make it 0600).

    Private by default: jokes, hints and user ids are nobody else's business."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    return None if path.exists() else path


def _atomic_write(path: Path, data: bytes) -> None:
    """Write then rename, so a crash or a full disk never leaves half an image behind.

    Folders are created 0700 and ``mkstemp`` files are 0600: uploads stay private."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


__all__ = [
    "AbTestBusy",
    "AbTestRow",
    "ArmCount",
    "Base",
    "ImageRow",
    "JokeRow",
    "ModelVersionRow",
    "RatingRow",
    "RequestRow",
    "Store",
    "TrainingRunRow",
    "VersionStats",
]
