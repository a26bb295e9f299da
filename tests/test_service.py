"""JokeService: the single request path, its limits and its bookkeeping."""

from __future__ import annotations

import asyncio

import pytest

from bot.app import App
from bot.engines.instant import InstantEngine
from bot.models import (
    EngineBusy,
    EngineError,
    ImageRejected,
    JokeRequest,
    NotFound,
    RateLimited,
    Rejected,
)
from bot.settings import Settings


def req(data: bytes, user: str = "alice", chat: str | None = None, **kw) -> JokeRequest:
    return JokeRequest(image_bytes=data, channel="test", user_id=f"test:{user}", chat_id=chat, **kw)


@pytest.fixture
async def app(settings: Settings):
    app = await App.create(settings, engine=InstantEngine())
    yield app
    await app.close()


async def test_tell_stores_image_joke_and_outcome(app: App, chelsea_png: bytes) -> None:
    joke = await app.service.tell(req(chelsea_png, chat="c1"))
    assert joke.id > 0 and joke.text and joke.model_version == "instant-0"
    assert joke.engine == "instant" and joke.prompt == app.settings.prompt
    stored = await app.store.get_joke(joke.id)
    assert stored.image_sha256 == joke.image_sha256 and stored.chat_id == "c1"
    # The stored image is exactly what the engine saw: the normalised JPEG.
    saved = app.store.read_image(joke.image_sha256)
    assert saved[:2] == b"\xff\xd8"
    assert await app.store.request_outcomes() == {"ok": 1}
    assert b'oogiri_requests_total{channel="test",outcome="ok"} 1.0' in app.metrics.render()


async def test_hint_reaches_prompt_and_long_hint_rejected(app: App, chelsea_png: bytes) -> None:
    joke = await app.service.tell(req(chelsea_png, hint="猫"))
    assert joke.prompt.endswith("提示：猫")
    with pytest.raises(Rejected) as info:
        await app.service.tell(req(chelsea_png, hint="x" * 1000))
    assert "200" in info.value.user_message("en")


async def test_bad_image_is_rejected_and_recorded(app: App) -> None:
    with pytest.raises(ImageRejected) as info:
        await app.service.tell(req(b"this is not a picture"))
    assert info.value.user_message("zh") and info.value.user_message("en")
    assert await app.store.request_outcomes() == {"image_rejected": 1}
    assert app.engine.calls == 0


async def test_per_user_and_per_chat_limits(settings: Settings, chelsea_png: bytes) -> None:
    settings.limits.per_user_per_minute = 2
    settings.limits.per_chat_per_minute = 3
    app = await App.create(settings, engine=InstantEngine())
    try:
        await app.service.tell(req(chelsea_png, "a", chat="g"))
        await app.service.tell(req(chelsea_png, "a", chat="g"))
        with pytest.raises(RateLimited) as info:
            await app.service.tell(req(chelsea_png, "a", chat="g"))
        assert info.value.key == "rate_user" and info.value.params["seconds"] >= 1
        await app.service.tell(req(chelsea_png, "b", chat="g"))
        with pytest.raises(RateLimited) as info:
            await app.service.tell(req(chelsea_png, "c", chat="g"))
        assert info.value.key == "rate_chat"
        await app.service.tell(req(chelsea_png, "c", chat="other"))
    finally:
        await app.close()


async def test_a_refusal_at_admission_is_recorded_once(
    settings: Settings, chelsea_png: bytes
) -> None:
    """Channels admit before downloading (Telegram, Discord): their refusals still count."""
    settings.limits.per_user_per_minute = 1
    app = await App.create(settings, engine=InstantEngine())
    try:
        first = req(b"", "a", chat="g")
        await app.service.admit(first)
        first.image_bytes = chelsea_png
        await app.service.tell(first)  # admitted already: not counted against the limit twice
        with pytest.raises(RateLimited):
            await app.service.admit(req(b"", "a", chat="g"))
        with pytest.raises(RateLimited):
            await app.service.tell(req(chelsea_png, "a", chat="g"))  # tell admits and records
        assert await app.store.request_outcomes() == {"ok": 1, "rate_limited": 2}
        assert b'outcome="rate_limited"} 2.0' in app.metrics.render()
    finally:
        await app.close()


async def test_concurrency_cap_answers_busy(settings: Settings, chelsea_png: bytes) -> None:
    settings.limits.max_concurrency = 1
    settings.limits.queue_timeout_s = 0.05
    app = await App.create(settings, engine=InstantEngine(delay_s=0.5))
    try:
        results = await asyncio.gather(
            app.service.tell(req(chelsea_png, "a")),
            app.service.tell(req(chelsea_png, "b")),
            return_exceptions=True,
        )
        assert sum(isinstance(r, EngineBusy) for r in results) == 1
        assert sum(not isinstance(r, Exception) for r in results) == 1
        assert (await app.store.request_outcomes()) == {"ok": 1, "busy": 1}
    finally:
        await app.close()


async def test_engine_failure_is_recorded(
    settings: Settings, chelsea_png: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    app = await App.create(settings, engine=InstantEngine(fail=True))
    try:
        with caplog.at_level("WARNING", logger="bot.service"):
            with pytest.raises(EngineError) as info:
                await app.service.tell(req(chelsea_png))
        assert "engine" in info.value.user_message("en").lower()
        assert await app.store.request_outcomes() == {"engine_error": 1}
        # the operator sees why (the user only gets "try again")
        [record] = [r for r in caplog.records if r.name == "bot.service"]
        assert record.levelname == "WARNING" and "engine_error" in record.getMessage()
        assert str(info.value) in record.getMessage()
    finally:
        await app.close()


async def test_rate_and_change_vote(app: App, chelsea_png: bytes) -> None:
    joke = await app.service.tell(req(chelsea_png, chat="c"))
    r = await app.service.rate(joke.id, "test:bob", 1, "test", chat_id="c")
    assert (r.up, r.down) == (1, 0)
    r = await app.service.rate(joke.id, "test:bob", -1, "test", chat_id="c")
    assert (r.up, r.down, r.previous) == (0, 1, 1)
    with pytest.raises(NotFound):
        await app.service.rate(joke.id, "test:bob", 1, "test", chat_id="someone-else")


async def test_swap_engine_routes_new_requests(app: App, chelsea_png: bytes) -> None:
    old = app.swap_engine(InstantEngine(model="v2"))
    assert old.model == "instant-0"
    joke = await app.service.tell(req(chelsea_png))
    assert joke.model_version == "v2"


class _Says(InstantEngine):
    """An engine whose answer is given: what a decoder or a plugin may hand the service."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    async def generate(self, image, prompt, params):  # type: ignore[no-untyped-def]
        gen = await super().generate(image, prompt, params)
        return type(gen)(text=self.text, model=gen.model, usage=gen.usage, latency_s=gen.latency_s)


async def test_broken_characters_never_reach_the_store_and_a_blank_joke_is_an_error(
    settings: Settings, chelsea_png: bytes
) -> None:
    app = await App.create(settings, engine=_Says("\ufffd\ufffd这只猫\ufffd看起\x00来 "))
    try:
        joke = await app.service.tell(req(chelsea_png))
        assert joke.text == "这只猫看起来"
        assert (await app.store.get_joke(joke.id)).text == "这只猫看起来"
        app.swap_engine(_Says(" \ufffd\x07 "))
        with pytest.raises(EngineError, match="no usable text"):
            await app.service.tell(req(chelsea_png, user="bob"))
        assert await app.store.request_outcomes() == {"ok": 1, "engine_error": 1}
    finally:
        await app.close()
