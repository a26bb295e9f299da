"""The engine protocol every inference backend implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from bot.models import Generation, GenerationParams, NormalizedImage


@dataclass(frozen=True, slots=True)
class EngineHealth:
    ok: bool
    model: str
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    #: A demo engine (e.g. the random tiny model): channels tell users its jokes are noise.
    demo: bool = False


@runtime_checkable
class Engine(Protocol):
    """``generate`` raises ``EngineBusy`` (overloaded, breaker open) or ``EngineError`` (down)."""

    name: str

    async def generate(
        self, image: NormalizedImage, prompt: str, params: GenerationParams
    ) -> Generation: ...

    async def health(self) -> EngineHealth: ...

    async def close(self) -> None: ...
