"""Review of the core request path and the web channel: each test reproduces one defect found.

A real App on a temporary SQLite store behind the web channel's ASGI app; clients are told apart
by address (``httpx.ASGITransport(client=…)`` sets the peer), as in tests/adversarial.
"""

from __future__ import annotations

import asyncio
import gc
import io
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from bot.app import App
from bot.engines.instant import InstantEngine
from bot.limits import MemoryLimiter
from bot.settings import Settings
from plugins.web import CSRF_HEADER, USER_COOKIE, create_api

BASE = "http://testserver"


def photo() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (30, 90, 200)).save(buf, "PNG")
    return buf.getvalue()


async def make(tmp_path: Path, **web: Any) -> App:
    settings = Settings(
        _env_file=None,
        data_dir=tmp_path / "data",
        limits={"per_user_per_minute": 0},
        web={"votes_per_ip_per_minute": 0, "uploads_per_ip_per_minute": 0, **web},
    )
    return await App.create(settings, engine=InstantEngine())


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[App]:
    app = await make(tmp_path)
    try:
        yield app
    finally:
        await app.close()


def client(app: App, ip: str = "203.0.113.9") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=create_api(app), client=(ip, 40000))
    return httpx.AsyncClient(transport=transport, base_url=BASE)


async def told_joke(app: App) -> str:
    """A joke told on the web by some author (its public id)."""
    async with client(app, "198.51.100.7") as author:
        r = await author.post("/api/jokes", files={"image": ("p.png", photo(), "image/png")})
        assert r.status_code == 201, r.text
        return r.json()["id"]


# --------------------------------------------------------------------------- identities cost


async def test_a_refused_vote_does_not_mint_free_identities(tmp_path: Path) -> None:
    """A cookie-less vote was answered 403 "csrf" *with* a fresh identity cookie and its token,
    never charged to the network's new-session allowance: two requests per sybil vote, unbounded
    by ``new_sessions_per_ip_per_hour``."""
    app = await make(tmp_path, new_sessions_per_ip_per_hour=2)
    try:
        joke = await told_joke(app)
        accepted = 0
        for _ in range(6):
            async with client(app) as c:  # a fresh cookie jar each time
                first = await c.post(
                    f"/api/jokes/{joke}/rating", json={"value": 1}, headers={"Origin": BASE}
                )
                assert first.status_code == 403 and first.json()["error"] == "csrf"
                token = first.headers.get(CSRF_HEADER, "")
                second = await c.post(
                    f"/api/jokes/{joke}/rating",
                    json={"value": 1},
                    headers={"Origin": BASE, CSRF_HEADER: token},
                )
                accepted += second.status_code == 200
        assert accepted <= 2  # the network's allowance of new identities, not one per request
        ratings = await app.store.ratings_for((await app.service.get_joke_by_public_id(joke)).id)
        assert len(ratings) == accepted
    finally:
        await app.close()


async def test_an_oversize_upload_refused_unread_mints_no_free_identity(tmp_path: Path) -> None:
    """A declared-too-large upload is refused before anything is charged, yet it handed out a new
    identity cookie (and its CSRF token): identities for the price of a header."""
    app = await make(tmp_path, new_sessions_per_ip_per_hour=2)
    try:
        minted = 0
        for _ in range(5):
            async with client(app) as c:

                async def nothing() -> AsyncIterator[bytes]:
                    yield b""

                r = await c.post(
                    "/api/jokes",
                    content=nothing(),
                    headers={
                        "Content-Type": "multipart/form-data; boundary=b",
                        "Content-Length": str(100 * 1024 * 1024),
                    },
                )
                assert r.status_code == 413 and r.json()["error"] == "too_large"
                minted += USER_COOKIE in r.cookies
        assert minted <= 2
    finally:
        await app.close()


# --------------------------------------------------------------------------- hostile headers


async def test_non_ascii_csrf_token_is_a_403_not_a_500(app: App) -> None:
    """``hmac.compare_digest`` raises TypeError on non-ASCII str: the vote became a 500."""
    joke = await told_joke(app)
    async with client(app) as c:
        assert (await c.get("/api/session")).status_code == 200
        r = await c.post(
            f"/api/jokes/{joke}/rating",
            json={"value": 1},
            headers={b"Origin": BASE.encode(), CSRF_HEADER.encode(): "caf\xe9".encode("latin-1")},
        )
    assert r.status_code == 403 and r.json()["error"] == "csrf"


@pytest.mark.parametrize(
    "header", [{"Origin": "http://[::1"}, {"Referer": "http://[testserver/page"}]
)
async def test_malformed_origin_is_a_403_not_a_500(app: App, header: dict[str, str]) -> None:
    """``urlsplit`` raises ValueError on an unclosed IPv6 bracket: upload and vote became 500s."""
    joke = await told_joke(app)
    async with client(app) as c:
        token = (await c.get("/api/session")).json()["csrf_token"]
        up = await c.post(
            "/api/jokes", files={"image": ("p.png", photo(), "image/png")}, headers=header
        )
        vote = await c.post(
            f"/api/jokes/{joke}/rating", json={"value": 1}, headers={CSRF_HEADER: token, **header}
        )
    assert (up.status_code, up.json()["error"]) == (403, "cross_site")
    assert (vote.status_code, vote.json()["error"]) == (403, "cross_site")
    assert await app.store.ratings_for((await app.service.get_joke_by_public_id(joke)).id) == []


# --------------------------------------------------------------------------- votes


def ratings_metric(app: App, value: str) -> float:
    sample = app.metrics.registry.get_sample_value(
        "oogiri_ratings_total", {"channel": "web", "value": value}
    )
    return sample or 0.0


async def test_a_retried_vote_is_counted_once(app: App) -> None:
    """The same vote sent twice (a double click, a client retry) is one vote in the store but
    was two in ``oogiri_ratings``."""
    joke = await told_joke(app)
    async with client(app) as c:
        token = (await c.get("/api/session")).json()["csrf_token"]
        for _ in range(3):
            r = await c.post(
                f"/api/jokes/{joke}/rating",
                json={"value": 1},
                headers={"Origin": BASE, CSRF_HEADER: token},
            )
            assert r.status_code == 200 and r.json()["up"] == 1
        r = await c.post(
            f"/api/jokes/{joke}/rating",
            json={"value": -1},
            headers={"Origin": BASE, CSRF_HEADER: token},
        )
        assert r.json()["previous"] == 1 and (r.json()["up"], r.json()["down"]) == (0, 1)
    assert ratings_metric(app, "up") == 1
    assert ratings_metric(app, "down") == 1


# --------------------------------------------------------------------------- limiter memory


async def test_memory_limiter_forgets_keys_whose_window_has_passed() -> None:
    """Every key ever hit (each user, chat and network) stayed in the limiter forever: memory
    grew with every visitor for the life of the process."""
    now = [1000.0]
    limiter = MemoryLimiter(clock=lambda: now[0])
    gc.collect()
    tracemalloc.start()
    try:
        baseline, _ = tracemalloc.get_traced_memory()
        for i in range(20_000):
            assert await limiter.hit(f"user:web:web:{i}", 5, 60.0) is None
        now[0] += 30
        for _ in range(3):
            assert await limiter.hit("user:web:busy", 3, 60.0) is None
        grown, _ = tracemalloc.get_traced_memory()
        now[0] += 31  # the 20 000 keys' only events have left their window; "busy"'s have not
        assert await limiter.hit("user:web:busy", 3, 60.0) is not None  # still counted
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert grown - baseline > 5 * 1024 * 1024  # the measurement sees the keys at all
    assert held - baseline < 1024 * 1024
    now[0] += 30  # "busy"'s events leave the window: exactly the limit again
    for _ in range(3):
        assert await limiter.hit("user:web:busy", 3, 60.0) is None
    assert await limiter.hit("user:web:busy", 3, 60.0) is not None


# --------------------------------------------------------------------------- public health


async def test_healthz_does_not_show_a_password_from_an_engine_url(tmp_path: Path) -> None:
    """An unhealthy HTTP engine named its upstream URLs, credentials included, in the detail that
    the public /healthz answers with."""
    from bot.engines.openai_http import OpenAIHTTPEngine
    from bot.settings import EngineSettings
    from tests.faults.faultsupport import free_port

    secret = "hunter2-upstream-password"
    url = f"http://oogiri:{secret}@127.0.0.1:{free_port()}"  # nothing listens there
    settings = Settings(_env_file=None, data_dir=tmp_path / "data")
    engine = OpenAIHTTPEngine(EngineSettings(name="lmdeploy", base_urls=[url]))
    app = await App.create(settings, engine=engine)
    try:
        async with client(app) as c:
            r = await c.get("/healthz")
        assert r.status_code == 503
        assert "127.0.0.1" in r.json()["engine"]["detail"]  # the detail still says where
        assert secret not in r.text
    finally:
        await app.close()


# --------------------------------------------------------------------------- concurrent votes


async def test_concurrent_identical_votes_report_one_new_vote(store: Any) -> None:
    """Two presses of the same button at once: both transactions read "no vote yet" on
    PostgreSQL (read committed) and both reported ``previous=None``, so a retried vote counted
    twice in the metrics and plugins heard of two new votes. Only one of them is new."""
    from tests.test_store import add_joke

    joke = await add_joke(store)
    ratings = await asyncio.gather(*(store.rate(joke.id, "u1", 1, "test") for _ in range(12)))
    assert [r.previous for r in ratings].count(None) == 1
    assert (ratings[-1].up, ratings[-1].down) == (1, 0)
