"""Joke pool: a viral picture is answered from jokes already made for it (issue 20's lever).

Why: a joke's GPU cost is the vision encoder + prefill + decode of one picture (~30 ms of H200
time at 6 tiles, docs/benchmarks.md), and nothing in LMDeploy 0.18 reuses it: prefix caching is
switched off for InternVL's path and ``n > 1`` is N independent generations. When the same meme
reaches the bot from many chats, the jokes made for the first senders can answer the next ones.

How: the plugin wraps the engine at start-up. For each (picture SHA-256, prompt, generation
parameters) it keeps up to ``max_jokes`` sampled jokes. Once a picture has ``min_jokes`` of them,
a request is answered from the pool with a joke *this user has not had for this picture* and
that has been shown fewer than ``max_reuse`` times; otherwise the engine makes a new joke, which
joins the pool. Variety stays: jokes are still sampled (temperature as configured), a user never
gets the same pooled joke twice for one picture, and the pool keeps growing to ``max_jokes``.
Pictures are kept least-recently-used first out (``max_pictures``) and for ``ttl_s``.

Off by default (``OOGIRI_POOL__ENABLED=true``). Known limit: a managed-engine swap installs the
new engine unwrapped (the pool stops until the next start), so a new model never answers with
the old one's jokes.
"""

from __future__ import annotations

import contextvars
import dataclasses
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, Field

from bot.hookspecs import hookimpl
from bot.models import Generation, GenerationParams, JokeRequest, NormalizedImage, Usage

#: "channel:user_id" of the request being answered (set in oogiri_before_joke).
POOL_USER: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "oogiri_pool_user", default=None
)


class PoolSettings(BaseModel):
    enabled: bool = Field(default=False, description="answer repeated pictures from their pool")
    min_jokes: int = Field(default=3, ge=1, description="jokes a picture needs before it is pooled")
    max_jokes: int = Field(default=8, ge=1, description="jokes kept per picture")
    max_reuse: int = Field(default=25, ge=1, description="times one joke may be shown")
    max_pictures: int = Field(default=2000, ge=1, description="pictures kept (LRU)")
    ttl_s: float = Field(default=3600.0, gt=0, description="a picture's pool lives this long")


@dataclass
class _Joke:
    generation: Generation
    shown_to: set[str] = field(default_factory=set)
    shown: int = 0


@dataclass
class _Picture:
    created: float
    jokes: list[_Joke] = field(default_factory=list)


class JokePool:
    """An Engine that answers from a per-picture pool before asking the engine it wraps."""

    def __init__(
        self,
        inner: Any,
        settings: PoolSettings,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.inner = inner
        self.settings = settings
        self.name = inner.name
        self._pictures: OrderedDict[tuple[Any, ...], _Picture] = OrderedDict()
        self._now = clock
        self._rng = rng or random.Random()
        self.hits = 0
        self.misses = 0

    def __getattr__(self, name: str) -> Any:  # health details, model, demo flags …
        return getattr(self.inner, name)

    def _entry(self, key: tuple[Any, ...]) -> _Picture:
        now = self._now()
        entry = self._pictures.get(key)
        if entry is None or now - entry.created > self.settings.ttl_s:
            entry = self._pictures[key] = _Picture(created=now)
        self._pictures.move_to_end(key)
        while len(self._pictures) > self.settings.max_pictures:
            self._pictures.popitem(last=False)
        return entry

    def answer_without_engine(
        self, image: NormalizedImage, prompt: str, params: GenerationParams
    ) -> Generation | None:
        """A pooled joke this user has not had for this picture, or None. JokeService asks
        before queueing for the engine: a pooled answer needs no GPU, so it never waits."""
        s = self.settings
        entry = self._entry(self._key(image, prompt, params))
        if len(entry.jokes) < s.min_jokes:
            return None
        user = self._user()
        fresh = [j for j in entry.jokes if user not in j.shown_to and j.shown < s.max_reuse]
        if not fresh:
            return None
        joke = self._rng.choice(fresh)
        joke.shown_to.add(user)
        joke.shown += 1
        self.hits += 1
        # no engine work: no latency, no tokens (the store's usage stays honest)
        return dataclasses.replace(joke.generation, latency_s=0.0, usage=Usage())

    def _key(self, image: NormalizedImage, prompt: str, params: GenerationParams) -> tuple:
        return (image.sha256, prompt, dataclasses.astuple(params))

    def _user(self) -> str:
        return POOL_USER.get() or f"anonymous:{self._rng.random()}"

    async def generate(
        self, image: NormalizedImage, prompt: str, params: GenerationParams
    ) -> Generation:
        pooled = self.answer_without_engine(image, prompt, params)
        if pooled is not None:
            return pooled
        s = self.settings
        user = self._user()
        entry = self._entry(self._key(image, prompt, params))
        self.misses += 1
        generation = await self.inner.generate(image, prompt, params)
        new = _Joke(generation, shown_to={user}, shown=1)
        if len(entry.jokes) < s.max_jokes:
            entry.jokes.append(new)
        else:  # full: the most shown joke makes room, so the pool keeps renewing
            worn = max(range(len(entry.jokes)), key=lambda i: entry.jokes[i].shown)
            entry.jokes[worn] = new
        return generation

    async def health(self) -> Any:
        return await self.inner.health()

    async def close(self) -> None:
        await self.inner.close()


@hookimpl
def oogiri_register_settings(register: Callable[[str, type[BaseModel]], None]) -> None:
    register("pool", PoolSettings)


@hookimpl
def oogiri_before_joke(request: JokeRequest) -> None:
    POOL_USER.set(f"{request.channel}:{request.user_id}")


@hookimpl
def oogiri_startup(app: Any) -> None:
    settings = getattr(app.settings, "pool", None)
    if isinstance(settings, PoolSettings) and settings.enabled:
        pool = JokePool(app.service.engine, settings)
        app.service.engine = pool
        from prometheus_client import Gauge

        answers = Gauge(
            "oogiri_joke_pool_answers",
            "Jokes answered from the joke pool or by the engine since start",
            ["source"],
            registry=app.metrics.registry,
        )
        answers.labels("pool").set_function(lambda: pool.hits)
        answers.labels("engine").set_function(lambda: pool.misses)
