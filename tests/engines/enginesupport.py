"""Helpers shared by the HTTP engine tests (a uniquely named module: test dirs share sys.path)."""

from __future__ import annotations

import io
import sys
from pathlib import Path

from PIL import Image

FAKES = Path(__file__).resolve().parents[1] / "fakes"
if str(FAKES) not in sys.path:
    sys.path.insert(0, str(FAKES))

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
    return NormalizedImage.of(data, width, height, "JPEG")


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
