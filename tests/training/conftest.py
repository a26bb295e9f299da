"""Fixtures of the training tests: a migrated SQLite store and settings in a temp dir, and a fake
Hugging Face Hub on loopback serving a tiny InternVL2 model and an Oogiri-GO-shaped data set."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from bot.settings import Settings
from bot.store import Store

HUB_FAKES = Path(__file__).resolve().parents[1] / "fakes"
if str(HUB_FAKES) not in sys.path:
    sys.path.insert(0, str(HUB_FAKES))
from fake_hub import FakeHub, make_oogiri_go  # noqa: E402  # pyright: ignore[reportMissingImports]
from trainhelp import DATA, MODEL, SECRET  # noqa: E402


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


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bot.engines.internvl.tinymodel import make_tiny_model

    return Path(make_tiny_model(tmp_path_factory.mktemp("src") / "tiny", layout="internvl2"))


@pytest.fixture(scope="module")
def oogo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    folder = tmp_path_factory.mktemp("oogiri-go")
    return folder, make_oogiri_go(folder)


@pytest.fixture
def fake_hub(
    tiny_model: Path,
    oogo: tuple[Path, dict[str, Any]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[FakeHub]:
    h = FakeHub()
    h.add_model(MODEL, tiny_model)
    h.add_dataset(DATA, oogo[0])
    h.add_model("acme/private", tiny_model, token=SECRET)
    h.start()
    monkeypatch.setenv("HF_ENDPOINT", h.url)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    yield h
    h.stop()
