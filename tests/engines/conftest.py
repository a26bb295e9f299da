"""Fixtures for the HTTP engine tests: loopback fake LMDeploy servers and real pictures."""

from __future__ import annotations

import hashlib
import io
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image

FAKES = Path(__file__).resolve().parents[1] / "fakes"
if str(FAKES) not in sys.path:
    sys.path.insert(0, str(FAKES))

from fake_lmdeploy import FakeLMDeploy  # noqa: E402

from bot.models import NormalizedImage  # noqa: E402
from bot.settings import EngineSettings  # noqa: E402


def jpeg_image(width: int, height: int, seed: int = 0) -> NormalizedImage:
    """A real JPEG (a gradient with a few shapes), as images.load would hand it to an engine."""
    img = Image.new("RGB", (width, height))
    px = img.load()
    step_x, step_y = max(1, width // 64), max(1, height // 64)
    for x in range(0, width, step_x):
        for y in range(0, height, step_y):
            px[x, y] = ((x * 255) // width, (y * 255) // height, (seed * 40) % 256)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    data = buf.getvalue()
    return NormalizedImage(
        jpeg=data,
        sha256=hashlib.sha256(data).hexdigest(),
        width=width,
        height=height,
        source_format="JPEG",
    )


@pytest.fixture
def image() -> NormalizedImage:
    return jpeg_image(800, 600)


@pytest.fixture
def fake_server() -> Iterator[Callable[..., FakeLMDeploy]]:
    """Start fake servers; at teardown stop them and check no non-data: URL ever reached one."""
    started: list[FakeLMDeploy] = []

    def start(**kwargs: object) -> FakeLMDeploy:
        fake = FakeLMDeploy(**kwargs).start()  # type: ignore[arg-type]
        started.append(fake)
        return fake

    yield start
    for fake in started:
        fake.stop()
    for fake in started:
        assert fake.violations == [], f"non-data: image URLs reached the server: {fake.violations}"


@pytest.fixture
def fake(fake_server: Callable[..., FakeLMDeploy]) -> FakeLMDeploy:
    return fake_server()


def engine_settings(*urls: str, **overrides: object) -> EngineSettings:
    values: dict[str, object] = {
        "name": "lmdeploy",
        "base_urls": list(urls),
        "retry_backoff_s": 0.0,
        "timeout_s": 5.0,
        "connect_timeout_s": 1.0,
    }
    values.update(overrides)
    return EngineSettings(**values)  # type: ignore[arg-type]
