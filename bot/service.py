"""JokeService: the one path every channel calls (validate → limit → hooks → engine → store)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict

import pluggy

from bot import images
from bot.engines.base import Engine
from bot.limits import Admission, Limiter
from bot.metrics import Metrics
from bot.models import (
    EngineBusy,
    EngineError,
    GenerationParams,
    Joke,
    JokeRequest,
    OogiriError,
    RateLimited,
    Rating,
    Rejected,
    StoreUnavailable,
    showable,
)
from bot.plugins import call_first, call_hook, notify
from bot.settings import Settings
from bot.store import Store, VersionStats

log = logging.getLogger(__name__)

#: A joke longer than this is cut: a server that ignores max_tokens must not fill the database
#: (and no chat shows more: Telegram's message limit is 4096 characters).
MAX_JOKE_CHARS = 4096


def clean_hint(hint: str | None) -> str | None:
    """The hint as stored: the user's text minus control characters; None when nothing is left."""
    if not hint:
        return None
    hint = showable(hint)
    return hint if hint.strip() else None


class JokeService:
    def __init__(
        self,
        settings: Settings,
        pm: pluggy.PluginManager,
        store: Store,
        engine: Engine,
        limiter: Limiter,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.pm = pm
        self.store = store
        self.engine = engine
        self.limiter = limiter
        self.metrics = metrics or Metrics()
        self._admission: dict[str, Admission] = {}

    def admission(self, engine_name: str) -> Admission:
        """The bounded queue in front of one engine (each engine, e.g. an A/B arm, has its own)."""
        if engine_name not in self._admission:
            limits = self.settings.limits
            rejected = self.metrics.admission_rejected
            gate = Admission(
                limits.max_concurrency,
                max_queue=limits.max_queue,
                max_wait_s=limits.queue_timeout_s,
                on_reject=lambda reason: rejected.labels(engine_name, reason).inc(),
            )
            self.metrics.queue_waiting.labels(engine_name).set_function(lambda: gate.waiting)
            self._admission[engine_name] = gate
        return self._admission[engine_name]

    def params(self) -> GenerationParams:
        e = self.settings.engine
        return GenerationParams(
            max_new_tokens=e.max_new_tokens,
            temperature=e.temperature,
            top_p=e.top_p,
            max_dynamic_patch=e.max_dynamic_patch,
        )

    async def tell(self, request: JokeRequest) -> Joke:
        """Answer one picture with a joke, or raise an ``OogiriError`` with a user message."""
        started = time.perf_counter()
        try:
            joke = await self._tell(request, started)
        except OogiriError as exc:
            outcome = exc.code
            if isinstance(exc, (EngineError, EngineBusy, StoreUnavailable)):
                # the user gets a short "try again"; the operator needs the why (the request
                # row keeps it too, but a log line is where a failing engine gets noticed)
                log.warning("%s answer failed (%s): %s", request.channel, outcome, exc)
            await self._record(request, outcome, started, reason=str(exc))
            raise
        except Exception as exc:
            log.exception("unexpected failure while telling a joke")
            await self._record(request, "error", started, reason=type(exc).__name__)
            raise EngineError(detail="internal error") from exc
        self._count(request, "ok", started)  # its request row was stored with the joke
        return joke

    async def _tell(self, request: JokeRequest, started: float) -> Joke:
        limits = self.settings.limits
        request.hint = clean_hint(request.hint)
        if request.hint and len(request.hint) > limits.max_hint_chars:
            raise Rejected(key="hint_too_long", limit=limits.max_hint_chars)
        if not request.admitted:
            await self._admit(request)  # a refusal here is recorded once, by tell()
        # refuse before decoding the picture when the queue is already full: busy costs nothing
        # (unless the engine may answer this picture without the GPU: it needs the picture)
        if not hasattr(self.engine, "answer_without_engine"):
            self.admission(self.engine.name).check()
        # A worker thread decodes; its share of the decode memory budget is awaited on the loop.
        request.image = await images.load_async(
            request.image_bytes,
            self.settings.images,
            filename=request.filename,
            content_type=request.content_type,
        )
        await call_hook(self.pm, "oogiri_before_joke", request=request)
        prompt = await call_first(self.pm, "oogiri_prompt", request=request, settings=self.settings)
        # a local, not request.prompt, so the type checker knows it is a str from here on
        prompt = request.prompt = prompt or self.default_prompt(request)
        params = self.params()

        engine = self.engine  # a swap mid-request must not change the engine under us
        # an engine that can answer now (a joke pool) skips the queue: no GPU work to wait for
        quick = getattr(engine, "answer_without_engine", None)
        generation = quick(request.image, prompt, params) if quick else None
        if generation is None:
            async with self.admission(engine.name).slot() as waited_s:
                self.metrics.queue_wait.labels(engine.name).observe(waited_s)
                with self.metrics.in_flight.track_inprogress():
                    generation = await engine.generate(request.image, prompt, params)

        joke = Joke(
            id=0,
            text=generation.text.strip(),
            model_version=generation.model,
            engine=engine.name,
            image_sha256=request.image.sha256,
            channel=request.channel,
            user_id=request.user_id,
            chat_id=request.chat_id,
            prompt=prompt,
            latency_ms=int(generation.latency_s * 1000),
        )
        for replacement in await call_hook(
            self.pm, "oogiri_after_joke", request=request, joke=joke
        ):
            if isinstance(replacement, str) and replacement.strip():
                joke.text = replacement.strip()
        # Whatever the engine or a plugin produced: storable, showable text of a sane length.
        joke.text = showable(joke.text)[:MAX_JOKE_CHARS].strip()
        if not joke.text:
            # never a blank joke: the person is told to try again (the HTTP engine has already
            # asked once more; engine.empty_answer_retries)
            raise EngineError(detail=f"{engine.name} gave no usable text ({generation.text!r:.80})")

        stored = await self.store.add_joke(
            request.image,
            delivery=request.delivery,
            request={
                "channel": request.channel,
                "user_id": request.user_id,
                "chat_id": request.chat_id,
                "latency_ms": int((time.perf_counter() - started) * 1000),
            },
            channel=joke.channel,
            user_id=joke.user_id,
            chat_id=joke.chat_id,
            prompt=joke.prompt,
            hint=request.hint,
            text=joke.text,
            model_version=joke.model_version,
            engine=joke.engine,
            params=asdict(params),
            latency_ms=joke.latency_ms,
            prompt_tokens=generation.usage.prompt_tokens,
            completion_tokens=generation.usage.completion_tokens,
        )
        self.metrics.engine_latency.labels(joke.model_version).observe(generation.latency_s)
        return stored

    def default_prompt(self, request: JokeRequest) -> str:
        if request.hint:
            # One line: a hint's own line breaks cannot start what looks like a new instruction.
            return f"{self.settings.prompt}\n提示：{' '.join(request.hint.split())}"
        return self.settings.prompt

    async def admit(self, request: JokeRequest) -> None:
        """Check the per-user/per-chat limits *before* a channel downloads the picture.

        Raises ``RateLimited`` (or ``Rejected`` from ``oogiri_admit`` implementations such as
        moderation). A request admitted here is not counted again by ``tell``: a flooder costs
        one counter hit per photo, not a download and a decode. A refusal is recorded (requests
        table and metrics) as ``tell`` records one: channels that admit first stay visible.
        """
        started = time.perf_counter()
        try:
            await self._admit(request)
        except OogiriError as exc:
            await self._record(request, exc.code, started, reason=str(exc))
            raise

    async def _admit(self, request: JokeRequest) -> None:
        await call_hook(self.pm, "oogiri_admit", request=request)
        await self._check_limits(request)
        request.admitted = True

    async def _check_limits(self, request: JokeRequest) -> None:
        limits = self.settings.limits
        wait = await self.limiter.hit(
            f"user:{request.channel}:{request.user_id}", limits.per_user_per_minute, 60.0
        )
        if wait is not None:
            raise RateLimited("rate_user", seconds=max(1, math.ceil(wait)))
        if request.chat_id is not None:
            wait = await self.limiter.hit(
                f"chat:{request.channel}:{request.chat_id}", limits.per_chat_per_minute, 60.0
            )
            if wait is not None:
                raise RateLimited("rate_chat", seconds=max(1, math.ceil(wait)))

    def _count(self, request: JokeRequest, outcome: str, started: float) -> float:
        elapsed = time.perf_counter() - started
        self.metrics.requests.labels(request.channel, outcome).inc()
        self.metrics.request_latency.labels(request.channel).observe(elapsed)
        return elapsed

    async def _record(
        self,
        request: JokeRequest,
        outcome: str,
        started: float,
        reason: str | None = None,
    ) -> None:
        """Record a failed request (a served one is stored together with its joke)."""
        elapsed = self._count(request, outcome, started)
        try:
            await self.store.record_request(
                channel=request.channel,
                user_id=request.user_id,
                chat_id=request.chat_id,
                outcome=outcome,
                reason=(reason or None) and reason[:500],
                latency_ms=int(elapsed * 1000),
            )
        except Exception:
            # Losing an audit row must never hide the real error from the user.
            log.warning("could not record request outcome %s", outcome, exc_info=True)

    async def rate(
        self,
        joke_id: int,
        user_id: str,
        value: int,
        channel: str,
        chat_id: str | None = None,
        network: str | None = None,
    ) -> Rating:
        """Record (or change) one user's vote; observers are told only after it is committed.

        ``network``: an anonymous channel's keyed hash of where the vote came from (training can
        require several distinct networks behind a joke rated only there).
        """
        rating = await self.store.rate(
            joke_id, user_id, value, channel, chat_id=chat_id, network=network
        )
        if rating.previous != value:  # the same vote again (a retry, a double click) is not new
            self.metrics.ratings.labels(channel, "up" if value > 0 else "down").inc()
        await notify(self.pm, "oogiri_on_rating", rating=rating)  # the vote is already stored
        return rating

    async def get_joke(self, joke_id: int) -> Joke:
        return await self.store.get_joke(joke_id)

    async def get_joke_by_public_id(self, public_id: str) -> Joke:
        """For public APIs, which never expose (or accept) the sequential id."""
        return await self.store.get_joke_by_public_id(public_id)

    async def stats(self) -> list[VersionStats]:
        """Jokes, 👍 and 👎 per model version (for /stats pages and admin commands)."""
        return await self.store.stats()

    async def check_store(self) -> None:
        """Raise unless the database answers (health checks)."""
        await self.store.ping()
