"""Never two training runs at once, across processes and replicas.

- PostgreSQL store: a session-level advisory lock (``pg_try_advisory_lock``) held on a dedicated
  connection for the whole run. Every replica that shares the database sees it; if the holder
  dies, its connection closes and PostgreSQL releases the lock.
- SQLite store: an exclusive ``flock`` on a file beside the database (SQLite means one host; the
  kernel releases the lock when the holder dies).

Both are try-locks: a second run fails fast with ``LockBusy`` rather than queueing behind a
multi-hour training.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import text

LOCK_NAME = "oogiri-training"


class LockBusy(RuntimeError):
    """Another training run holds the lock."""


def advisory_key(name: str = LOCK_NAME) -> int:
    """A stable signed 64-bit key for ``pg_advisory_lock`` derived from ``name``."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def sqlite_lock_path(url: str, fallback_dir: Path) -> Path:
    """The lock file of a SQLite URL: ``<database>.training.lock`` (or in ``fallback_dir`` for an
    in-memory database)."""
    db = url.split("///", 1)[-1] if "///" in url else ""
    if not db or db == ":memory:" or db.startswith("file::memory:"):
        return Path(fallback_dir) / f"{LOCK_NAME}.lock"
    return Path(db).with_name(Path(db).name + ".training.lock")


@contextlib.asynccontextmanager
async def file_lock(path: Path) -> AsyncIterator[Path]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(path)
            raise LockBusy(f"another training run holds {path}{holder}") from None
        os.ftruncate(fd, 0)
        info = (
            f"pid={os.getpid()} host={socket.gethostname()} since={datetime.now(UTC).isoformat()}"
        )
        os.write(fd, info.encode() + b"\n")
        try:
            yield path
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _read_holder(path: Path) -> str:
    try:
        info = path.read_text().strip()
    except OSError:
        return ""
    return f" ({info})" if info else ""


@contextlib.asynccontextmanager
async def pg_advisory_lock(engine: Any, name: str = LOCK_NAME) -> AsyncIterator[int]:
    """Hold a PostgreSQL advisory lock on a dedicated pooled connection of ``engine``."""
    key = advisory_key(name)
    conn = await engine.connect()
    try:
        got = (await conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key})).scalar()
        await conn.commit()
        if not got:
            raise LockBusy(f"another training run holds the PostgreSQL advisory lock {name!r}")
        try:
            yield key
        finally:
            try:
                await conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                await conn.commit()
            except BaseException as exc:
                # A dead connection has already released the lock, and closing one that was
                # cancelled mid-unlock releases it: either way it must not go back to the pool.
                await asyncio.shield(conn.invalidate())
                if not isinstance(exc, Exception):
                    raise
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def training_lock(
    store: Any, fallback_dir: Path, name: str = LOCK_NAME
) -> AsyncIterator[str]:
    """The right lock for the store's database; yields a description of what is held."""
    if store.is_sqlite:
        async with file_lock(sqlite_lock_path(store.url, fallback_dir)) as path:
            yield f"file lock {path}"
    else:
        async with pg_advisory_lock(store.engine, name) as key:
            yield f"PostgreSQL advisory lock {key}"
