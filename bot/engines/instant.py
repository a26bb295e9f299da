"""An instant, deterministic engine for tests, benchmarks and demos without a model.

It never looks at pixels (so benchmarks measure the core, not the engine); its text is built from
the image's size and hash so that different pictures get different, reproducible answers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from bot.engines.base import EngineHealth
from bot.hookspecs import hookimpl
from bot.models import EngineError, Generation, GenerationParams, NormalizedImage, Usage

OPENERS = ("这张图告诉我们：", "Plot twist:", "科学家发现：", "Breaking news:")


class InstantEngine:
    name = "instant"

    def __init__(self, delay_s: float = 0.0, fail: bool = False, model: str = "instant-0") -> None:
        self.delay_s = delay_s
        self.fail = fail
        self.model = model
        self.calls = 0

    async def generate(
        self, image: NormalizedImage, prompt: str, params: GenerationParams
    ) -> Generation:
        start = time.perf_counter()
        self.calls += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail:
            raise EngineError(detail="instant engine set to fail")
        opener = OPENERS[int(image.sha256[:2], 16) % len(OPENERS)]
        text = f"{opener} {image.width}×{image.height} 的世界里，#{image.sha256[:6]} 才是主角。"
        words = text.split()
        return Generation(
            text=text[: max(8, params.max_new_tokens * 4)],
            model=self.model,
            usage=Usage(prompt_tokens=len(prompt), completion_tokens=len(words)),
            latency_s=time.perf_counter() - start,
        )

    async def health(self) -> EngineHealth:
        return EngineHealth(ok=not self.fail, model=self.model)

    async def close(self) -> None:
        return None


@hookimpl
def oogiri_register_engines(register: Callable[..., Any], settings: Any) -> None:
    register(
        "instant",
        lambda settings: InstantEngine(model=settings.engine.model_version or "instant-0"),
    )
