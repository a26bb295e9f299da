"""Fixtures: a fake Bot API on 127.0.0.1 and a real PTB Application (the telegram channel) on it."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from fakebotapi import FakeBotAPI
from PIL import Image
from tgsupport import STEP_TIMEOUT_S, StartBot, make_settings

import plugins.moderation as moderation_plugin
import plugins.telegram as telegram_plugin
from bot.app import App
from bot.engines.instant import InstantEngine


@pytest.fixture
async def botapi() -> AsyncIterator[FakeBotAPI]:
    api = FakeBotAPI()
    await asyncio.wait_for(api.start(), STEP_TIMEOUT_S)
    yield api
    await asyncio.wait_for(api.stop(), STEP_TIMEOUT_S)


@pytest.fixture
async def start_bot(tmp_path: Path, botapi: FakeBotAPI) -> AsyncIterator[StartBot]:
    """``await start_bot(engine=…, only=[channels], **settings)`` → an App running the channel."""
    apps: list[App] = []

    async def start(engine: Any = None, only: list[str] | None = None, **overrides: Any) -> App:
        settings = make_settings(tmp_path / f"app{len(apps)}", botapi, **overrides)
        app = await asyncio.wait_for(
            App.create(
                settings,
                engine=engine or InstantEngine(),
                plugins=[telegram_plugin, moderation_plugin],
            ),
            STEP_TIMEOUT_S,
        )
        apps.append(app)
        await asyncio.wait_for(app.start_channels(only or ["telegram"]), STEP_TIMEOUT_S)
        return app

    yield start
    for app in reversed(apps):
        await asyncio.wait_for(app.close(), STEP_TIMEOUT_S)


def _encode(path: Path, fmt: str, size: tuple[int, int] | None = None) -> bytes:
    img = Image.open(path).convert("RGB")
    if size:
        img = img.resize(size)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="session")
def chelsea_jpeg(sample_dir: Path) -> bytes:
    return _encode(sample_dir / "chelsea.png", "JPEG")


@pytest.fixture(scope="session")
def coffee_png(sample_dir: Path) -> bytes:
    return (sample_dir / "coffee.png").read_bytes()


@pytest.fixture(scope="session")
def sticker_webp(sample_dir: Path) -> bytes:
    return _encode(sample_dir / "astronaut.png", "WEBP", (512, 512))


@pytest.fixture(params=["sqlite", "postgres"])
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database URL on each backend (PostgreSQL: the session's test database, emptied)."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'shared.sqlite3'}"
    from sqlalchemy.ext.asyncio import create_async_engine

    url = request.getfixturevalue("pg_database")
    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.exec_driver_sql("DROP SCHEMA public CASCADE")
        await conn.exec_driver_sql("CREATE SCHEMA public")
    await engine.dispose()
    return url
