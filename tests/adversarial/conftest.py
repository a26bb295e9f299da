"""Fixtures of the hostile-input suite: an App on the instant engine that remembers its prompts,
the per-case reliability record (relreport.py), and the Telegram fake Bot API helpers."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
for extra in (HERE, HERE.parent / "telegram", HERE.parent / "faults"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from relreport import (  # noqa: E402,F401  (fixture and hooks of the reliability records)
    pytest_runtest_logreport,
    pytest_sessionfinish,
    reliability,
)

from bot.app import App  # noqa: E402
from bot.engines.instant import InstantEngine  # noqa: E402
from bot.models import Generation, GenerationParams, NormalizedImage  # noqa: E402
from bot.settings import Settings  # noqa: E402


class RecordingEngine(InstantEngine):
    """The instant engine, remembering every prompt and picture it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.prompts: list[str] = []
        self.images: list[NormalizedImage] = []

    async def generate(
        self, image: NormalizedImage, prompt: str, params: GenerationParams
    ) -> Generation:
        self.prompts.append(prompt)
        self.images.append(image)
        return await super().generate(image, prompt, params)


AppFactory = Callable[..., Any]


@pytest.fixture
async def make_app(tmp_path: Path) -> AsyncIterator[AppFactory]:
    apps: list[App] = []

    async def factory(engine: Any = None, **overrides: Any) -> App:
        settings = Settings(
            _env_file=None, data_dir=tmp_path / f"app{len(apps)}", plugins=[], **overrides
        )
        app = await App.create(settings, engine=engine or RecordingEngine())
        apps.append(app)
        return app

    yield factory
    for app in apps:
        await app.close()
