"""Store behaviour on SQLite and PostgreSQL (the ``store`` fixture runs each test on both)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import inspect

from bot.models import NormalizedImage, NotFound, OogiriError
from bot.store import Store


def fake_image(seed: bytes = b"x") -> NormalizedImage:
    data = b"\xff\xd8" + seed * 100 + b"\xff\xd9"
    return NormalizedImage.of(data, 4, 3, "PNG")


async def add_joke(store: Store, chat: str | None = "c1", version: str = "v1", seed: bytes = b"x"):
    return await store.add_joke(
        fake_image(seed),
        channel="test",
        user_id="test:alice",
        chat_id=chat,
        prompt="讲个笑话",
        text="a joke",
        model_version=version,
        engine="instant",
        params={"max_new_tokens": 8},
    )


async def test_image_is_content_addressed_and_idempotent(store: Store) -> None:
    img = fake_image()
    p1 = await store.save_image(img)
    p2 = await store.save_image(img)
    assert p1 == p2 and p1.read_bytes() == img.jpeg
    assert p1.name == f"{img.sha256}.jpg"
    assert store.read_image(img.sha256) == img.jpeg
    assert not [p for p in p1.parent.iterdir() if p.name.startswith(".tmp")]


async def test_joke_snapshot_round_trip(store: Store) -> None:
    joke = await add_joke(store)
    got = await store.get_joke(joke.id)
    assert got.text == "a joke" and got.prompt == "讲个笑话" and got.model_version == "v1"
    assert (got.up, got.down) == (0, 0)
    with pytest.raises(NotFound):
        await store.get_joke(joke.id + 999)


async def test_one_vote_per_user_changeable(store: Store) -> None:
    joke = await add_joke(store)
    r1 = await store.rate(joke.id, "u1", 1, "test")
    assert (r1.up, r1.down, r1.previous) == (1, 0, None)
    r2 = await store.rate(joke.id, "u1", -1, "test")
    assert (r2.up, r2.down, r2.previous, r2.changed) == (0, 1, 1, True)
    r3 = await store.rate(joke.id, "u2", 1, "test")
    assert (r3.up, r3.down) == (1, 1)
    assert await store.ratings_for(joke.id) == [("u1", -1), ("u2", 1)]


async def test_concurrent_votes_by_one_user_leave_one_row(store: Store) -> None:
    joke = await add_joke(store)
    await asyncio.gather(*(store.rate(joke.id, "u1", v, "test") for v in (1, -1) * 5))
    assert len(await store.ratings_for(joke.id)) == 1


async def test_vote_refuses_other_chat_missing_joke_and_bad_value(store: Store) -> None:
    joke = await add_joke(store, chat="chat-a")
    with pytest.raises(NotFound):
        await store.rate(joke.id, "u1", 1, "test", chat_id="chat-b")
    with pytest.raises(NotFound):
        await store.rate(joke.id + 100, "u1", 1, "test")
    with pytest.raises(OogiriError):
        await store.rate(joke.id, "u1", 5, "test")
    assert await store.ratings_for(joke.id) == []


async def test_stats_per_model_version(store: Store) -> None:
    a = await add_joke(store, version="v1", seed=b"a")
    b = await add_joke(store, version="v1", seed=b"b")
    c = await add_joke(store, version="v2", seed=b"c")
    await store.rate(a.id, "u1", 1, "t")
    await store.rate(a.id, "u2", 1, "t")
    await store.rate(b.id, "u1", -1, "t")
    await store.rate(c.id, "u1", -1, "t")
    stats = {s.model_version: s for s in await store.stats()}
    assert (stats["v1"].jokes, stats["v1"].up, stats["v1"].down) == (2, 2, 1)
    assert stats["v1"].like_rate == pytest.approx(2 / 3)
    assert (stats["v2"].jokes, stats["v2"].like_rate) == (1, 0.0)


async def test_model_registry_single_active(store: Store) -> None:
    await store.add_model_version("m1", "/models/m1")
    await store.add_model_version("m2", "/models/m2", parent="m1")
    await store.set_model_status("m1", "active")
    await store.set_model_status("m2", "active")
    statuses = {m.version: m.status for m in await store.model_versions()}
    assert statuses == {"m1": "retired", "m2": "active"}
    assert (await store.active_model()).version == "m2"
    with pytest.raises(LookupError):
        await store.set_model_status("nope", "active")


async def test_training_runs_and_request_outcomes(store: Store) -> None:
    run_id = await store.start_training_run("/tmp/log")
    await store.update_training_run(run_id, status="failed", error="boom")
    (run,) = await store.training_runs()
    assert (run.status, run.error) == ("failed", "boom")
    await store.record_request(channel="web", user_id="u", outcome="ok")
    await store.record_request(channel="web", user_id="u", outcome="image_rejected")
    assert await store.request_outcomes() == {"ok": 1, "image_rejected": 1}


async def test_migration_upgrades_empty_database_to_models(store: Store) -> None:
    """The migration must produce exactly the tables and columns the ORM models declare."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from bot.store import Base

    def diff(sync_conn):
        ctx = MigrationContext.configure(sync_conn, opts={"compare_type": True})
        names = set(inspect(sync_conn).get_table_names())
        return compare_metadata(ctx, Base.metadata), names

    async with store.engine.connect() as conn:
        changes, tables = await conn.run_sync(diff)
    assert changes == []
    assert {"images", "jokes", "ratings", "requests", "model_versions", "training_runs"} <= tables


async def test_sqlite_default_uses_wal(tmp_path: Path) -> None:
    s = Store(f"sqlite+aiosqlite:///{tmp_path / 'db' / 'x.sqlite3'}", tmp_path / "img")
    await s.upgrade()
    async with s.engine.connect() as conn:
        mode = (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar()
    await s.close()
    assert mode == "wal"


async def test_concurrent_upgrades_do_not_race(tmp_path: Path, pg_database: str) -> None:
    """Two replicas migrating the same empty PostgreSQL database at once both succeed."""
    from tests.conftest import _reset_pg

    await _reset_pg(pg_database)
    stores = [Store(pg_database, tmp_path / f"img{i}") for i in range(3)]
    try:
        await asyncio.gather(*(s.upgrade() for s in stores))
        async with stores[0].engine.connect() as conn:
            versions = {
                row[0]
                for row in await conn.exec_driver_sql("SELECT version_num FROM alembic_version")
            }
        # every branch of the schema (0001, then the independent 0002_* heads) exactly once
        from alembic.script import ScriptDirectory

        from bot.migrations import alembic_config

        assert versions == set(ScriptDirectory.from_config(alembic_config()).get_heads())
    finally:
        for s in stores:
            await s.close()


async def test_concurrent_jokes_commit_together_and_a_bad_one_fails_alone(store: Store) -> None:
    """SQLite groups concurrent joke writes into one transaction; results must still map 1:1."""

    def fields(i: int, text: str | None) -> dict:
        return dict(
            channel="test",
            user_id=f"u{i}",
            chat_id=None,
            prompt="p",
            text=text,
            model_version="v",
            engine="instant",
            params={},
        )

    good = [store.add_joke(fake_image(bytes([i])), **fields(i, f"joke {i}")) for i in range(20)]
    bad = store.add_joke(fake_image(b"bad"), **fields(99, None))  # NOT NULL violation
    results = await asyncio.gather(*good, bad, return_exceptions=True)
    jokes, failure = results[:-1], results[-1]
    assert isinstance(failure, Exception) and not isinstance(failure, AssertionError)
    assert len({j.id for j in jokes}) == 20
    for i, joke in enumerate(jokes):
        stored = await store.get_joke(joke.id)
        assert (stored.text, stored.user_id, joke.text) == (f"joke {i}", f"u{i}", f"joke {i}")
        assert stored.image_sha256 == fake_image(bytes([i])).sha256
