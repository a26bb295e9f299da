"""Shared fixtures: settings in a temp dir, stores on SQLite and PostgreSQL, real sample images."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import hypothesis
import pytest
from browser_support import CHROMIUM, CHROMIUM_ARGS
from PIL import Image

from bot.settings import Settings
from bot.store import Store

PG_ADMIN_URL = os.environ.get("OOGIRI_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


REDIS_URL = os.environ.get("OOGIRI_TEST_REDIS", "redis://127.0.0.1:6379/15")


def _listening(url: str, default_port: int) -> bool:
    """A TCP connect within 0.3 s: enough to say "found" without slowing every run down."""
    parts = urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or default_port), 0.3
        ):
            return True
    except OSError:
        return False


def _compose_found() -> bool:
    plugin = Path(os.environ.get("DOCKER_CONFIG", Path.home() / ".docker")) / "cli-plugins"
    if (plugin / "docker-compose").is_file() or shutil.which("docker-compose"):
        return True
    docker = shutil.which("docker")
    if docker is None:
        return False
    try:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def optional_services() -> dict[str, bool]:
    """What the optional tests need, found or not (tests needing a missing one skip; CI fails)."""
    return {
        "PostgreSQL": _listening(PG_ADMIN_URL, 5432),
        "initdb (throwaway PostgreSQL)": bool(
            list(Path("/usr/lib/postgresql").glob("*/bin/initdb")) or shutil.which("initdb")
        ),
        "Redis": _listening(REDIS_URL, 6379),
        "Chromium": CHROMIUM.exists(),
        "Compose plugin": _compose_found(),
    }


def pytest_report_header(config: pytest.Config) -> str:
    found = optional_services()
    listed = ", ".join(f"{name} {'yes' if ok else 'NO'}" for name, ok in found.items())
    hint = (
        "" if all(found.values()) else " — tests needing a missing one skip (.ci/run installs all)"
    )
    return f"optional services: {listed}{hint}"


# Repeatable runs: Hypothesis draws the same examples every time and keeps no example database
# (.hypothesis/) that would make a second run differ from the first. HYPOTHESIS_PROFILE=default
# brings back random exploration.
hypothesis.settings.register_profile("repeatable", derandomize=True, database=None)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


def _children(pid: int) -> list[tuple[int, str]]:
    """Live child processes of ``pid`` (Linux /proc), with their command lines."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, UnicodeDecodeError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append((int(stat.parent.name), cmdline.strip()))
    return found


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A server a test started and left running keeps its port and data dir: the next run would
    not start from the same state. Say so (and fail in CI)."""
    leftover = [(pid, cmd) for pid, cmd in _children(os.getpid()) if cmd]
    if not leftover:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.ensure_newline()
        for pid, cmd in leftover:
            reporter.write_line(f"left running by the tests: pid {pid}: {cmd[:160]}", yellow=True)
    if os.environ.get("CI") and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def skimage_data_dir() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data"


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return skimage_data_dir()


@pytest.fixture(scope="session")
def chelsea_png(sample_dir: Path) -> bytes:
    return (sample_dir / "chelsea.png").read_bytes()


@pytest.fixture(scope="session")
def photo_jpegs(sample_dir: Path) -> list[bytes]:
    """A few real photos as JPEG bytes (what phones send)."""
    out = []
    for name in ("chelsea.png", "astronaut.png", "coffee.png", "rocket.jpg"):
        img = Image.open(sample_dir / name).convert("RGB")
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


@pytest.fixture
def chromium() -> Path:
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is required in CI (apt-get install chromium)")
        pytest.skip(f"{CHROMIUM} is not installed")
    return CHROMIUM


@pytest.fixture
async def page(chromium: Path) -> AsyncIterator[Any]:
    """A phone's browser page; console errors (a CSP violation shows up there) and page errors
    are collected in ``page.problems``."""
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        context = await browser.new_context(
            viewport={"width": 390, "height": 844},
            device_scale_factor=2,
            is_mobile=True,
            has_touch=True,
            locale="en-US",
        )
        p: Any = await context.new_page()
        p.problems = []
        p.on("console", lambda msg: p.problems.append(msg.text) if msg.type == "error" else None)
        p.on("pageerror", lambda exc: p.problems.append(str(exc)))
        try:
            yield p
        finally:
            await browser.close()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(_env_file=None, data_dir=tmp_path / "data")


def _run(coro_fn, *args):
    """Run a coroutine to completion from sync code, even inside a running loop."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro_fn(*args)).result()


async def _pg_available() -> bool:
    import asyncpg

    try:
        conn = await asyncio.wait_for(asyncpg.connect(PG_ADMIN_URL), timeout=3)
    except Exception:
        return False
    await conn.close()
    return True


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session; dropped afterwards."""
    import asyncpg

    if not _run(_pg_available):
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL on 127.0.0.1:5432 is required in CI")
        pytest.skip("no PostgreSQL on 127.0.0.1:5432")
    name = f"oogiri_test_{uuid.uuid4().hex[:10]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(PG_ADMIN_URL)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    _run(admin, f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}".replace("postgresql://", "postgresql+asyncpg://", 1)
    _run(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _reset_pg(url: str) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.exec_driver_sql("DROP SCHEMA public CASCADE")
        await conn.exec_driver_sql("CREATE SCHEMA public")
    await engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """A migrated, empty store on each backend."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'test.sqlite3'}"
    else:
        url = request.getfixturevalue("pg_database")
        await _reset_pg(url)
    s = Store(url, tmp_path / "images")
    await s.upgrade()
    yield s
    await s.close()
