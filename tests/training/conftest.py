"""Fixtures of the training tests: a migrated SQLite store and settings in a temp dir."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.settings import Settings
from bot.store import Store


@pytest.fixture
async def tstore(tmp_path: Path) -> AsyncIterator[Store]:
    store = Store(f"sqlite+aiosqlite:///{tmp_path / 'db' / 'oogiri.sqlite3'}", tmp_path / "images")
    await store.upgrade()
    yield store
    await store.close()


@pytest.fixture
def tsettings(tmp_path: Path) -> Settings:
    return Settings(
        _env_file=None,
        data_dir=tmp_path / "data",
        store={"url": f"sqlite+aiosqlite:///{tmp_path / 'db' / 'oogiri.sqlite3'}"},
        # the fixtures' data sets hold out 1-3 answers; test_training_gate covers the minimum
        training={"gate_min_heldout": 1},
        # the offline pipeline; the live A/B step has its own tests (test_ab_live.py)
        ab={"enabled": False},
    )
