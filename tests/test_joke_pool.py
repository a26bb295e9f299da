"""plugins/joke_pool: repeated pictures answered from their pool, with variety per user."""

from __future__ import annotations

import asyncio
import itertools
import random
from pathlib import Path

from bot.app import App
from bot.engines.base import EngineHealth
from bot.models import EngineBusy, Generation, GenerationParams, JokeRequest, NormalizedImage, Usage
from bot.plugins import make_manager
from bot.settings import Settings
from plugins import joke_pool
from plugins.joke_pool import POOL_USER, JokePool, PoolSettings

PARAMS = GenerationParams(max_new_tokens=16, max_dynamic_patch=1)


class Counting:
    """An engine whose every joke is new: joke N is 'joke N about <sha prefix>'."""

    name = "counting"

    def __init__(self) -> None:
        self.calls = 0
        self._n = itertools.count(1)

    async def generate(self, image, prompt, params) -> Generation:
        self.calls += 1
        return Generation(
            f"joke {next(self._n)} about {image.sha256[:6]}", "v1", Usage(100, 16), 0.5
        )

    async def health(self) -> EngineHealth:
        return EngineHealth(ok=True, detail="counting")

    async def close(self) -> None:
        pass


def picture(tag: str) -> NormalizedImage:
    return NormalizedImage(
        jpeg=b"x", width=8, height=8, sha256=(tag * 64)[:64], source_format="JPEG"
    )


async def ask(pool: JokePool, user: str, pic: NormalizedImage, prompt: str = "p") -> Generation:
    token = POOL_USER.set(user)
    try:
        return await pool.generate(pic, prompt, PARAMS)
    finally:
        POOL_USER.reset(token)


async def test_a_viral_picture_is_answered_from_its_pool() -> None:
    inner = Counting()
    pool = JokePool(inner, PoolSettings(min_jokes=3, max_jokes=8), rng=random.Random(1))
    meme = picture("a")
    first = [await ask(pool, f"u{i}", meme) for i in range(3)]
    assert inner.calls == 3  # the pool fills from real requests
    later = [await ask(pool, f"v{i}", meme) for i in range(20)]
    assert inner.calls == 3 and pool.hits == 20
    assert {g.text for g in later} <= {g.text for g in first}
    assert all(g.latency_s == 0 and g.usage == Usage() for g in later)  # no engine work claimed


async def test_one_user_never_gets_the_same_joke_twice_for_a_picture() -> None:
    inner = Counting()
    pool = JokePool(inner, PoolSettings(min_jokes=2, max_jokes=4), rng=random.Random(2))
    meme = picture("b")
    for i in range(2):
        await ask(pool, f"seed{i}", meme)
    mine = [(await ask(pool, "alice", meme)).text for _ in range(10)]
    assert len(set(mine)) == 10  # past the pool's jokes alice gets new ones from the engine
    assert inner.calls == 2 + 10 - 2


async def test_pictures_prompts_and_reuse_limits_are_kept_apart() -> None:
    inner = Counting()
    pool = JokePool(inner, PoolSettings(min_jokes=1, max_jokes=1, max_reuse=3))
    a, b = picture("c"), picture("d")
    ja = await ask(pool, "u1", a)
    jb = await ask(pool, "u2", b)
    assert "about cccccc" in ja.text and "about dddddd" in jb.text
    assert (await ask(pool, "u3", a, prompt="another")).text != ja.text  # another prompt
    assert (await ask(pool, "u4", a)).text == ja.text
    assert (await ask(pool, "u5", a)).text == ja.text  # shown 3 times now
    assert (await ask(pool, "u6", a)).text != ja.text  # worn out: a new joke replaces it


async def test_least_recently_used_pictures_leave_first() -> None:
    now = [0.0]
    pool = JokePool(Counting(), PoolSettings(min_jokes=1, max_pictures=2, ttl_s=10), lambda: now[0])
    for tag in "efg":
        await ask(pool, "u", picture(tag))
    assert len(pool._pictures) == 2
    jh = await ask(pool, "u1", picture("h"))
    now[0] = 11.0  # past the TTL: the old jokes are gone
    assert (await ask(pool, "u2", picture("h"))).text != jh.text


async def test_through_the_service_with_the_plugin(tmp_path: Path, chelsea_png: bytes) -> None:
    pm = make_manager([], extra=[joke_pool])  # registers the plugin's settings section
    settings = Settings(
        _env_file=None,
        data_dir=tmp_path,
        plugins=[],
        pool={"enabled": True, "min_jokes": 2},
        limits={"per_user_per_minute": 0, "per_chat_per_minute": 0},
    )
    inner = Counting()
    app = await App.create(settings, pm=pm, engine=inner)
    try:
        assert isinstance(app.service.engine, JokePool)
        texts = [
            (
                await app.service.tell(JokeRequest(image_bytes=chelsea_png, channel="t", user_id=u))
            ).text
            for u in ("a", "b", "c", "d", "a")
        ]
        assert inner.calls == 2  # a and b filled the pool; c, d and a again were served from it
        assert texts[4] != texts[0]  # a's second joke is not a's first
        metrics = app.metrics.render().decode()
        assert 'oogiri_joke_pool_answers{source="pool"} 3.0' in metrics
        assert 'oogiri_joke_pool_answers{source="engine"} 2.0' in metrics
    finally:
        await app.close()


class Slow(Counting):
    async def generate(self, image, prompt, params) -> Generation:
        await asyncio.sleep(0.3)
        return await super().generate(image, prompt, params)


async def test_a_pooled_answer_skips_a_full_queue(
    tmp_path: Path, chelsea_png: bytes, sample_dir: Path
) -> None:
    """Under overload the viral picture is still answered at once; other pictures get busy."""
    pm = make_manager([], extra=[joke_pool])
    settings = Settings(
        _env_file=None,
        data_dir=tmp_path,
        plugins=[],
        pool={"enabled": True, "min_jokes": 1},
        limits={
            "per_user_per_minute": 0,
            "per_chat_per_minute": 0,
            "max_concurrency": 1,
            "max_queue": 1,
            "queue_timeout_s": 30,
        },
    )
    coffee_png = (sample_dir / "coffee.png").read_bytes()
    app = await App.create(settings, pm=pm, engine=Slow())
    try:
        meme = JokeRequest(image_bytes=chelsea_png, channel="t", user_id="first")
        await app.service.tell(meme)  # the pool now holds one joke for the meme
        others = [
            asyncio.create_task(
                app.service.tell(JokeRequest(image_bytes=coffee_png, channel="t", user_id=f"o{i}"))
            )
            for i in range(3)
        ]
        await asyncio.sleep(0.05)  # one running, one waiting, the third told busy
        t0 = asyncio.get_running_loop().time()
        joke = await app.service.tell(
            JokeRequest(image_bytes=chelsea_png, channel="t", user_id="second")
        )
        assert asyncio.get_running_loop().time() - t0 < 0.25 and joke.text
        results = await asyncio.gather(*others, return_exceptions=True)
        assert sum(isinstance(r, EngineBusy) for r in results) == 1
    finally:
        await app.close()
