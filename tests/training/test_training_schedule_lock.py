"""When to retrain, and never twice at once: the schedule, the SQLite file lock, the PostgreSQL
advisory lock (against the real server on 127.0.0.1:5432, in a database of its own)."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from trainhelp import add_joke, photo, vote

from bot.store import Store
from training.lock import (
    LockBusy,
    advisory_key,
    file_lock,
    pg_advisory_lock,
    sqlite_lock_path,
    training_lock,
)
from training.schedule import check_due
from training.settings import TrainingSettings

PG_URL = os.environ.get("OOGIRI_TEST_PG_TRAINING", "postgresql://postgres@127.0.0.1:5432/test")


def ts(**kw: Any) -> TrainingSettings:
    return TrainingSettings(**kw)


async def add_run(store: Store, status: str, started_at: datetime) -> int:
    run_id = await store.start_training_run()
    await store.update_training_run(run_id, status=status, started_at=started_at)
    return run_id


async def rate_n(store: Store, n: int) -> None:
    j = await add_joke(store, photo(0), "笑话")
    await vote(store, j.id, up=n)


# --------------------------------------------------------------------------- schedule


async def test_never_trained_is_due_by_period(tstore: Store) -> None:
    d = await check_due(tstore, ts(every_days=7, min_new_ratings=None))
    assert d.due and d.reasons == ["never trained"]


async def test_period(tstore: Store) -> None:
    now = datetime.now(UTC)
    await add_run(tstore, "succeeded", now - timedelta(days=3))
    s = ts(every_days=7, min_new_ratings=None)
    d = await check_due(tstore, s, now=now)
    assert not d.due and "< 7.0 days" in d.reasons[0]
    d = await check_due(tstore, s, now=now + timedelta(days=4, minutes=1))
    assert d.due and ">= 7.0 days" in d.reasons[0]


async def test_ratings_before_the_last_run_are_not_new(tstore: Store) -> None:
    t0 = datetime.now(UTC)
    await rate_n(tstore, 3)  # before the run: not new
    await add_run(tstore, "rejected", t0 + timedelta(seconds=30))
    d = await check_due(tstore, ts(every_days=None, min_new_ratings=2), now=t0 + timedelta(1))
    assert not d.due and d.new_ratings == 0 and d.reasons == ["0 new rating(s) < 2"]


async def test_new_ratings_after_a_run_make_it_due(tstore: Store) -> None:
    t0 = datetime.now(UTC)
    await add_run(tstore, "succeeded", t0 - timedelta(hours=1))
    await rate_n(tstore, 2)
    d = await check_due(tstore, ts(every_days=None, min_new_ratings=2), now=t0 + timedelta(1))
    assert d.due and d.new_ratings == 2 and d.reasons == ["2 new rating(s) >= 2"]


async def test_mode_any_or_all(tstore: Store) -> None:
    t0 = datetime.now(UTC)
    await add_run(tstore, "succeeded", t0 - timedelta(days=10))
    await rate_n(tstore, 1)
    now = t0 + timedelta(minutes=1)
    d_any = await check_due(tstore, ts(every_days=7, min_new_ratings=5), now=now)
    assert d_any.due and len(d_any.reasons) == 2
    d_all = await check_due(
        tstore, ts(every_days=7, min_new_ratings=5, schedule_mode="all"), now=now
    )
    assert not d_all.due
    none = await check_due(tstore, ts(every_days=None, min_new_ratings=None), now=now)
    assert not none.due and "no schedule" in none.reasons[0]


async def test_failed_runs_back_off_and_running_runs_block(tstore: Store) -> None:
    t0 = datetime.now(UTC)
    await add_run(tstore, "failed", t0 - timedelta(hours=1))
    s = ts(every_days=7, min_new_ratings=None, retry_failed_after_hours=6)
    d = await check_due(tstore, s, now=t0)
    assert not d.due and "failed 1.0 h ago; retrying after 6.0 h" in d.reasons[0]
    d = await check_due(tstore, s, now=t0 + timedelta(hours=6))
    assert d.due  # never completed → due once the back-off is over
    await add_run(tstore, "running", t0)
    d = await check_due(tstore, s, now=t0 + timedelta(hours=7))
    assert not d.due and "still running" in d.reasons[0]


# --------------------------------------------------------------------------- SQLite file lock


def test_sqlite_lock_path_is_beside_the_database(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'db' / 'x.sqlite3'}"
    assert sqlite_lock_path(url, tmp_path) == tmp_path / "db" / "x.sqlite3.training.lock"
    assert sqlite_lock_path("sqlite+aiosqlite:///:memory:", tmp_path) == (
        tmp_path / "oogiri-training.lock"
    )


async def test_file_lock_excludes_a_second_holder_until_released(tmp_path: Path) -> None:
    path = tmp_path / "t.lock"
    async with file_lock(path):
        assert "pid=" in path.read_text()
        with pytest.raises(LockBusy, match="another training run holds"):
            async with file_lock(path):
                pass
    async with file_lock(path):  # released
        pass


async def test_file_lock_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "t.lock"
    code = (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(path)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "time.sleep(30)\n"
    )
    proc = await asyncio.create_subprocess_exec(
        "python3", "-c", code, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        assert (await asyncio.wait_for(proc.stdout.readline(), 10)).strip() == b"locked"
        with pytest.raises(LockBusy):
            async with file_lock(path):
                pass
    finally:
        proc.kill()
        await proc.wait()
    async with file_lock(path):  # the kernel released the dead holder's lock
        pass


async def test_training_lock_uses_the_file_lock_for_sqlite(tstore: Store, tmp_path: Path) -> None:
    async with training_lock(tstore, tmp_path) as held:
        assert held.startswith("file lock") and held.endswith(".training.lock")
        with pytest.raises(LockBusy):
            async with training_lock(tstore, tmp_path):
                pass


# --------------------------------------------------------------------------- PostgreSQL lock


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """A database of this test's own, created and dropped around it."""
    import asyncpg

    try:
        admin = await asyncio.wait_for(asyncpg.connect(PG_URL), timeout=3)
    except Exception as exc:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL on 127.0.0.1:5432 is required in CI: {exc}")
        pytest.skip(f"no PostgreSQL: {exc}")
    name = f"oogiri_train_lock_{uuid.uuid4().hex[:10]}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        base = PG_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
        yield f"{base}/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.mark.postgres
async def test_pg_advisory_lock_across_replicas(pg_url: str, tmp_path: Path) -> None:
    a = Store(pg_url, tmp_path / "a")
    b = Store(pg_url, tmp_path / "b")  # another replica: its own engine and pool
    try:
        async with training_lock(a, tmp_path) as held:
            assert held == f"PostgreSQL advisory lock {advisory_key()}"
            with pytest.raises(LockBusy, match="advisory lock"):
                async with training_lock(b, tmp_path):
                    pass
        async with training_lock(b, tmp_path):  # released on exit
            with pytest.raises(LockBusy):
                async with pg_advisory_lock(a.engine):
                    pass
        # different names are different locks
        async with pg_advisory_lock(a.engine, "one"), pg_advisory_lock(b.engine, "two"):
            pass
    finally:
        await a.close()
        await b.close()


@pytest.mark.postgres
async def test_pg_lock_dies_with_its_holders_connection(pg_url: str, tmp_path: Path) -> None:
    from sqlalchemy import text

    a = Store(pg_url, tmp_path / "a")
    b = Store(pg_url, tmp_path / "b")
    try:
        with pytest.raises(Exception):  # noqa: B017 - the holder's connection is killed mid-run
            async with pg_advisory_lock(a.engine):
                async with b.engine.connect() as conn:
                    await conn.execute(
                        text(
                            "SELECT pg_terminate_backend(pid) FROM pg_locks "
                            "WHERE locktype = 'advisory' AND pid <> pg_backend_pid() AND "
                            "database = (SELECT oid FROM pg_database "
                            "WHERE datname = current_database())"
                        )
                    )
                    await conn.commit()
                await asyncio.sleep(0.2)
                raise RuntimeError("the run crashed")
        async with pg_advisory_lock(b.engine):  # the server released it with the connection
            pass
    finally:
        await a.close()
        await b.close()
