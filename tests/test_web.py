"""The web channel through its ASGI app: a real App on a temporary SQLite store, real photos."""

from __future__ import annotations

import asyncio
import base64
import io
import re
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import skimage
from PIL import Image

from bot.app import App
from bot.engines.base import EngineHealth
from bot.engines.instant import InstantEngine
from bot.hookspecs import hookimpl
from bot.models import JokeRequest
from bot.plugins import collect, make_manager
from bot.settings import Settings
from plugins import web
from plugins.web import (
    CSRF_COOKIE,
    CSRF_HEADER,
    MULTIPART_SLACK,
    USER_COOKIE,
    WebChannel,
    create_api,
    pick_language,
)

SAMPLES = Path(skimage.__file__).parent / "data"
BASE = "http://testserver"


@pytest.fixture(scope="module")
def chelsea() -> bytes:
    return (SAMPLES / "chelsea.png").read_bytes()


@pytest.fixture(scope="module")
def coffee_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.open(SAMPLES / "coffee.png").convert("RGB").save(buf, "JPEG", quality=85)
    return buf.getvalue()


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    return Settings(_env_file=None, data_dir=tmp_path / "data", **overrides)


AppFactory = Callable[..., Any]


@pytest.fixture
async def make_app(tmp_path: Path) -> AsyncIterator[AppFactory]:
    apps: list[App] = []

    async def factory(
        engine: Any = None, plugins: tuple[object, ...] = (), **overrides: Any
    ) -> App:
        settings = make_settings(tmp_path, **overrides)
        app = await App.create(settings, engine=engine or InstantEngine(), plugins=plugins)
        apps.append(app)
        return app

    yield factory
    for app in apps:
        await app.close()


def client_for(app: App, **kwargs: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=create_api(app))
    return httpx.AsyncClient(transport=transport, base_url=BASE, **kwargs)


async def csrf_of(client: httpx.AsyncClient) -> str:
    """Open the page like a browser would and read the token from its meta tag."""
    page = await client.get("/")
    assert page.status_code == 200
    found = re.search(r'<meta name="csrf-token" content="([0-9a-f]+)">', page.text)
    assert found, page.text[:500]
    return found.group(1)


async def upload(
    client: httpx.AsyncClient,
    image: bytes,
    filename: str = "chelsea.png",
    content_type: str = "image/png",
    **kwargs: Any,
) -> httpx.Response:
    return await client.post(
        "/api/jokes", files={"image": (filename, image, content_type)}, **kwargs
    )


async def internal_id(app: App, public_id: str) -> int:
    """The store's sequential id behind a joke's public id."""
    return (await app.service.get_joke_by_public_id(public_id)).id


def tamper(cookie: str) -> str:
    """Change one character well inside the signature (the last one may be only padding bits)."""
    i = len(cookie) - 8
    return cookie[:i] + ("A" if cookie[i] != "A" else "B") + cookie[i + 1 :]


def use_cookie(client: httpx.AsyncClient, value: str) -> None:
    """Replace the identity cookie in the client's jar, as a tampering visitor would."""
    client.cookies.delete(USER_COOKIE)
    client.cookies.set(USER_COOKIE, value)


async def vote(
    client: httpx.AsyncClient, joke_id: str, value: Any, token: str | None, **headers: str
) -> httpx.Response:
    h = {"Origin": BASE, **headers}
    if token is not None:
        h[CSRF_HEADER] = token
    return await client.post(f"/api/jokes/{joke_id}/rating", json={"value": value}, headers=h)


# --------------------------------------------------------------------------- telling jokes


async def test_upload_returns_a_joke(make_app: AppFactory, chelsea: bytes) -> None:
    app = await make_app()
    async with client_for(app) as client:
        await csrf_of(client)
        r = await upload(client, chelsea, data={"hint": "Monday"}, headers={"Origin": BASE})
    assert r.status_code == 201, r.text
    body = r.json()
    assert set(body) == {"id", "text", "model_version", "up", "down", "demo"}
    assert body["demo"] is False
    # The public id is random, not the sequential one (jokes cannot be enumerated).
    assert re.fullmatch(r"[A-Za-z0-9_-]{16}", body["id"])
    assert body["model_version"] == "instant-0"
    assert body["text"] and (body["up"], body["down"]) == (0, 0)
    assert r.headers["location"] == f"/api/jokes/{body['id']}"
    stored = await app.service.get_joke_by_public_id(body["id"])
    assert stored.channel == "web" and stored.user_id.startswith("web:")
    assert stored.text == body["text"]
    assert "Monday" in stored.prompt


async def test_upload_without_page_visit_gets_identity(make_app: AppFactory, chelsea: bytes):
    app = await make_app()
    async with client_for(app) as client:
        r = await upload(client, chelsea)
        assert r.status_code == 201
        assert USER_COOKIE in r.cookies
        # The token for the new identity comes back, so a script can vote right away.
        token = r.headers[CSRF_HEADER]
        v = await vote(client, r.json()["id"], 1, token)
    assert v.status_code == 200, v.text


async def test_get_joke(make_app: AppFactory, chelsea: bytes) -> None:
    app = await make_app()
    async with client_for(app) as client:
        joke = (await upload(client, chelsea)).json()
        got = await client.get(f"/api/jokes/{joke['id']}")
        assert got.status_code == 200
        assert got.json() == joke
        for missing in ("999999", "abc", "-1", "1" * 40):
            r = await client.get(f"/api/jokes/{missing}")
            assert r.status_code == 404, missing
            assert r.json()["error"] == "no_such_joke"


async def test_jokes_of_other_channels_stay_private(make_app: AppFactory, chelsea: bytes):
    app = await make_app()
    telegram = await app.service.tell(
        JokeRequest(image_bytes=chelsea, channel="telegram", user_id="tg:1", chat_id="tg:-100")
    )
    async with client_for(app) as client:
        token = await csrf_of(client)
        assert (await client.get(f"/api/jokes/{telegram.id}")).status_code == 404
        assert (await vote(client, telegram.id, 1, token)).status_code == 404
    assert await app.store.ratings_for(telegram.id) == []


async def test_bad_image_is_400_with_message(make_app: AppFactory) -> None:
    app = await make_app()
    async with client_for(app) as client:
        r = await upload(
            client, b"this is not a picture at all" * 10, "x.png", headers={"Accept-Language": "en"}
        )
        assert r.status_code == 400
        assert r.json()["error"] == "not_image"
        assert "picture" in r.json()["message"]
        zh = await upload(
            client, b"GIF89a broken", "x.gif", headers={"Accept-Language": "zh-CN,zh;q=0.9"}
        )
        assert zh.status_code == 400
        assert re.search(r"[\u4e00-\u9fff]", zh.json()["message"])
        empty = await upload(client, b"", "empty.png")
        assert empty.status_code == 400 and empty.json()["error"] == "empty"


async def test_message_language_follows_accept_language(make_app: AppFactory) -> None:
    app = await make_app()
    async with client_for(app) as client:
        en = await upload(client, b"nope" * 100, headers={"Accept-Language": "en-GB,en;q=0.8"})
        zh = await upload(client, b"nope" * 100, headers={"Accept-Language": "zh-TW"})
    assert (
        en.json()["message"] == "That doesn't look like a picture. Send a JPEG, PNG, WebP, "
        "GIF, BMP or TIFF."
    )
    assert zh.json()["message"].startswith("这看起来不是图片")


async def test_missing_image_field_and_wrong_content_type(make_app: AppFactory) -> None:
    app = await make_app()
    async with client_for(app) as client:
        r = await client.post(
            "/api/jokes",
            files={"other": ("x.png", b"123", "image/png")},
            headers={"Accept-Language": "en"},
        )
        assert r.status_code == 400 and r.json()["error"] == "no_image"
        assert r.json()["message"] == "Choose a picture first."
        r = await client.post("/api/jokes", content=b"raw", headers={"Content-Type": "image/png"})
        assert r.status_code == 415
        r = await client.post(
            "/api/jokes",
            content=b"--x\r\nnot really multipart",
            headers={"Content-Type": "multipart/form-data; boundary=x"},
        )
        assert r.status_code == 400 and r.json()["error"] == "bad_form"


async def test_hint_too_long(make_app: AppFactory, chelsea: bytes) -> None:
    app = await make_app()
    async with client_for(app) as client:
        r = await upload(client, chelsea, data={"hint": "x" * 500})
    assert r.status_code == 400 and r.json()["error"] == "hint_too_long"


@pytest.mark.parametrize(
    ("limit", "noun"), [(1, "character"), (2, "characters"), (0, "characters")]
)
async def test_hint_too_long_counts_its_noun(
    make_app: AppFactory, chelsea: bytes, limit: int, noun: str
) -> None:
    app = await make_app(limits={"max_hint_chars": limit})
    async with client_for(app) as client:
        en = await upload(client, chelsea, data={"hint": "xyz"}, headers={"Accept-Language": "en"})
        zh = await upload(client, chelsea, data={"hint": "xyz"}, headers={"Accept-Language": "zh"})
    assert en.status_code == 400
    assert en.json()["message"] == f"The hint is too long (at most {limit} {noun})."
    assert zh.json()["message"] == f"提示太长了（最多 {limit} 个字）。"


class BodyProbe:
    """A request body that counts how much of it the server actually pulled."""

    def __init__(self, total: int, chunk: int = 64 * 1024) -> None:
        self.total = total
        self.chunk = chunk
        self.sent = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        boundary_head = (
            b'--b\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
            b"Content-Type: image/png\r\n\r\n"
        )
        self.sent += len(boundary_head)
        yield boundary_head
        while self.sent < self.total:
            piece = b"\0" * min(self.chunk, self.total - self.sent)
            self.sent += len(piece)
            yield piece


async def test_oversize_by_content_length_is_413_without_reading(make_app: AppFactory) -> None:
    app = await make_app()
    declared = 100 * 1024 * 1024
    probe = BodyProbe(declared)
    async with client_for(app) as client:
        r = await client.post(
            "/api/jokes",
            content=probe,
            headers={
                "Content-Type": "multipart/form-data; boundary=b",
                "Content-Length": str(declared),
                "Accept-Language": "en",
            },
        )
    assert r.status_code == 413
    assert r.json() == {"error": "too_large", "message": "That file is too big (limit 20 MB)."}
    assert probe.sent == 0  # not a single chunk was pulled
    assert await app.store.request_outcomes() == {}  # never reached the service


async def test_oversize_while_streaming_is_413(make_app: AppFactory) -> None:
    max_bytes = 256 * 1024
    app = await make_app(images={"max_bytes": max_bytes})
    probe = BodyProbe(50 * 1024 * 1024)
    async with client_for(app) as client:
        # No Content-Length: the body is sent chunked, so only counting can stop it.
        r = await client.post(
            "/api/jokes",
            content=probe,
            headers={"Content-Type": "multipart/form-data; boundary=b"},
        )
    assert r.status_code == 413 and r.json()["error"] == "too_large"
    assert probe.sent <= max_bytes + MULTIPART_SLACK + probe.chunk + 1024


async def test_file_just_over_the_limit_is_413_from_the_core(make_app: AppFactory) -> None:
    max_bytes = 64 * 1024
    app = await make_app(images={"max_bytes": max_bytes})
    async with client_for(app) as client:
        r = await upload(client, b"\x89PNG\r\n\x1a\n" + b"\0" * max_bytes)
    assert r.status_code == 413 and r.json()["error"] == "too_large"


async def test_rate_limited_after_the_per_user_limit(make_app: AppFactory, chelsea: bytes):
    app = await make_app(limits={"per_user_per_minute": 2})
    async with client_for(app) as client:
        await csrf_of(client)
        for _ in range(2):
            assert (await upload(client, chelsea)).status_code == 201
        r = await upload(client, chelsea, headers={"Accept-Language": "en"})
        assert r.status_code == 429
        assert r.json()["error"] == "rate_user"
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert "try again in" in r.json()["message"]
    # Another visitor (another cookie) is not held back by the first one.
    async with client_for(app) as other:
        assert (await upload(other, chelsea)).status_code == 201


async def test_engine_failure_is_503(make_app: AppFactory, chelsea: bytes) -> None:
    app = await make_app(engine=InstantEngine(fail=True))
    async with client_for(app) as client:
        r = await upload(client, chelsea, headers={"Accept-Language": "en"})
        assert r.status_code == 503
        assert r.json()["error"] == "engine_error"
        assert r.json()["message"].startswith("The joke engine is not answering")
        assert "retry-after" in r.headers
        health = await client.get("/healthz")
    assert health.status_code == 503
    assert health.json()["engine"]["ok"] is False
    assert health.json()["database"]["ok"] is True


# --------------------------------------------------------------------------- votes


async def test_rate_and_change_the_vote(make_app: AppFactory, chelsea: bytes) -> None:
    app = await make_app()
    async with client_for(app) as client:
        token = await csrf_of(client)
        joke = (await upload(client, chelsea)).json()
        up = await vote(client, joke["id"], 1, token)
        assert up.status_code == 200, up.text
        assert up.json() == {"id": joke["id"], "up": 1, "down": 0, "vote": 1, "previous": None}
        down = await vote(client, joke["id"], -1, token)
        assert down.json() == {"id": joke["id"], "up": 0, "down": 1, "vote": -1, "previous": 1}
        again = await vote(client, joke["id"], -1, token)
        assert again.json()["down"] == 1
        got = (await client.get(f"/api/jokes/{joke['id']}")).json()
        assert (got["up"], got["down"]) == (0, 1)
    ratings = await app.store.ratings_for(await internal_id(app, joke["id"]))
    assert len(ratings) == 1
    user, value = ratings[0]
    assert value == -1 and user.startswith("web:")


async def test_two_visitors_vote_separately(make_app: AppFactory, chelsea: bytes) -> None:
    app = await make_app()
    async with client_for(app) as alice, client_for(app) as bob:
        a_token, b_token = await csrf_of(alice), await csrf_of(bob)
        assert a_token != b_token
        joke = (await upload(alice, chelsea)).json()
        await vote(alice, joke["id"], 1, a_token)
        r = await vote(bob, joke["id"], 1, b_token)
        assert (r.json()["up"], r.json()["down"]) == (2, 0)
        # Bob cannot use Alice's token.
        assert (await vote(bob, joke["id"], -1, a_token)).status_code == 403
    ratings = await app.store.ratings_for(await internal_id(app, joke["id"]))
    assert sorted(v for _, v in ratings) == [1, 1]


async def test_bad_votes(make_app: AppFactory, chelsea: bytes) -> None:
    app = await make_app()
    async with client_for(app) as client:
        token = await csrf_of(client)
        joke = (await upload(client, chelsea)).json()
        for value in (0, 2, "1", True, None):
            r = await vote(client, joke["id"], value, token)
            assert r.status_code == 400, value
            assert r.json()["error"] == "bad_vote"
        r = await client.post(
            f"/api/jokes/{joke['id']}/rating",
            content=b"{not json",
            headers={"Content-Type": "application/json", CSRF_HEADER: token},
        )
        assert r.status_code == 400
        assert (await vote(client, 424242, 1, token)).status_code == 404
    assert await app.store.ratings_for(await internal_id(app, joke["id"])) == []


async def test_cross_site_form_post_is_refused(make_app: AppFactory, chelsea: bytes) -> None:
    app = await make_app()
    async with client_for(app) as client:
        token = await csrf_of(client)
        joke = (await upload(client, chelsea)).json()
        # What an attacker's page can make a browser send: a form post, cookies attached
        # (if SameSite were ignored), cross-site Origin, no custom header.
        form = await client.post(
            f"/api/jokes/{joke['id']}/rating",
            data={"value": "1"},
            headers={"Origin": "https://evil.example"},
        )
        assert form.status_code == 403 and form.json()["error"] == "cross_site"
        # The same from a browser that sends only a Referer.
        ref = await client.post(
            f"/api/jokes/{joke['id']}/rating",
            data={"value": "1"},
            headers={"Referer": "https://evil.example/page"},
        )
        assert ref.status_code == 403
        # Same-origin but a form body: refused (forms cannot send JSON without a preflight).
        same = await client.post(
            f"/api/jokes/{joke['id']}/rating",
            data={"value": "1"},
            headers={"Origin": BASE, CSRF_HEADER: token},
        )
        assert same.status_code == 415
        # JSON without the token, or with a wrong one, or with Origin "null": refused.
        assert (await vote(client, joke["id"], 1, None)).status_code == 403
        assert (await vote(client, joke["id"], 1, "0" * 64)).status_code == 403
        assert (await vote(client, joke["id"], 1, token, Origin="null")).status_code == 403
        # Spoofing the Host cannot be done by a cross-site form; a matching one passes.
        ok = await vote(client, joke["id"], 1, token, Referer=f"{BASE}/")
        assert ok.status_code == 200
        # A cross-site upload is refused too.
        up = await upload(client, chelsea, headers={"Origin": "https://evil.example"})
        assert up.status_code == 403
    assert len(await app.store.ratings_for(await internal_id(app, joke["id"]))) == 1


async def test_cookie_tampering_gives_a_new_identity(make_app: AppFactory, chelsea: bytes):
    app = await make_app()
    async with client_for(app) as client:
        token = await csrf_of(client)
        first = (await upload(client, chelsea)).json()
        original = client.cookies[USER_COOKIE]
        owner = (await app.service.get_joke_by_public_id(first["id"])).user_id

        # Claim another user id with the old signature; flip a bit of the signature; nonsense.
        _, _, signature = original.rpartition(".")
        claimed = base64.urlsafe_b64encode(b'"web:someone-else"').rstrip(b"=").decode()
        for forged in (f"{claimed}.{signature}", tamper(original), "garbage", ""):
            use_cookie(client, forged)
            r = await vote(client, first["id"], 1, token)
            assert r.status_code == 403 and r.json()["error"] == "csrf"
            assert r.cookies.get(USER_COOKIE) not in (None, forged, original)

        use_cookie(client, tamper(original))
        second = await upload(client, chelsea)
        assert second.status_code == 201
        new_cookie = second.cookies[USER_COOKIE]
        assert new_cookie != original
        use_cookie(client, new_cookie)
        new_owner = (await app.service.get_joke_by_public_id(second.json()["id"])).user_id
        assert new_owner != owner and new_owner.startswith("web:")
        # The new identity works with the token handed back.
        v = await vote(client, second.json()["id"], 1, second.headers[CSRF_HEADER])
        assert v.status_code == 200
    assert await app.store.ratings_for(await internal_id(app, first["id"])) == []


async def test_cookie_flags(make_app: AppFactory) -> None:
    app = await make_app()
    async with client_for(app) as client:
        r = await client.get("/")
    cookies = r.headers.get_list("set-cookie")
    ident = next(c for c in cookies if c.startswith(f"{USER_COOKIE}="))
    assert "HttpOnly" in ident and "SameSite=lax" in ident and "Path=/" in ident
    assert "Secure" not in ident
    csrf = next(c for c in cookies if c.startswith(f"{CSRF_COOKIE}="))
    assert "HttpOnly" not in csrf
    # A returning visitor is not given a new cookie.
    async with client_for(app) as client:
        await client.get("/")
        again = await client.get("/")
    assert not [c for c in again.headers.get_list("set-cookie") if c.startswith(USER_COOKIE)]


async def test_secure_cookies_when_configured(make_app: AppFactory) -> None:
    app = await make_app(web={"secure_cookies": True})
    async with client_for(app) as client:
        r = await client.get("/")
    assert all("Secure" in c for c in r.headers.get_list("set-cookie"))


async def test_cookie_secret_is_created_once_with_0600(tmp_path: Path, chelsea: bytes) -> None:
    settings = make_settings(tmp_path)
    first = await App.create(settings, engine=InstantEngine())
    try:
        async with client_for(first) as client:
            await client.get("/")
            cookie = client.cookies[USER_COOKIE]
    finally:
        await first.close()
    secret_file = settings.data_dir / "web-cookie-secret"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert len(secret_file.read_text().strip()) >= 32
    # A restarted app (same data_dir) still recognises the visitor.
    second = await App.create(make_settings(tmp_path), engine=InstantEngine())
    try:
        async with client_for(second) as client:
            use_cookie(client, cookie)
            r = await client.get("/")
            assert not [c for c in r.headers.get_list("set-cookie") if USER_COOKIE in c]
    finally:
        await second.close()


async def test_configured_cookie_secret_is_used(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, web={"cookie_secret": "s3cret-from-settings-0123456789"})
    app = await App.create(settings, engine=InstantEngine())
    try:
        async with client_for(app) as client:
            await client.get("/")
        assert not (settings.data_dir / "web-cookie-secret").exists()
    finally:
        await app.close()


# --------------------------------------------------------------------------- pages


async def test_page_is_self_contained_and_localised(make_app: AppFactory) -> None:
    app = await make_app()
    async with client_for(app) as client:
        en = await client.get("/", headers={"Accept-Language": "en-US,en;q=0.9,zh;q=0.5"})
        zh = await client.get("/", headers={"Accept-Language": "zh-CN,zh;q=0.9,en;q=0.8"})
        js = await client.get("/static/app.js")
        css = await client.get("/static/style.css")
    assert en.status_code == 200 and en.headers["content-type"].startswith("text/html")
    assert '<html lang="en">' in en.text and "Tell me a joke" in en.text
    assert '<html lang="zh">' in zh.text and "讲个梗" in zh.text
    assert 'name="viewport"' in en.text
    assert 'type="file"' in en.text and 'accept="image/*"' in en.text
    # Nothing from elsewhere, no inline executable script.
    assert not re.search(r"(src|href)=\"(https?:)?//", en.text)
    scripts = re.findall(r"<script([^>]*)>", en.text)
    assert all("src=" in attrs or 'type="application/json"' in attrs for attrs in scripts)
    assert "script-src 'self'" in en.headers["content-security-policy"]
    assert "unsafe-inline" not in en.headers["content-security-policy"]
    assert en.headers["x-content-type-options"] == "nosniff"
    assert en.headers["cache-control"] == "no-store"
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert "X-CSRF-Token" in js.text
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    # the demo banner is there but hidden for a real engine
    assert re.search(r'id="demo-banner" role="note" hidden>', en.text)


async def test_static_assets_cache_and_404(make_app: AppFactory) -> None:
    app = await make_app()
    async with client_for(app) as client:
        js = await client.get("/static/app.js")
        cached = await client.get("/static/app.js", headers={"If-None-Match": js.headers["etag"]})
        assert cached.status_code == 304
        for name in ("index.html", "../web.py", "nope.js", "stats.html"):
            assert (await client.get(f"/static/{name}")).status_code == 404


class DemoEngine(InstantEngine):
    async def health(self) -> EngineHealth:
        return EngineHealth(ok=True, model=self.model, demo=True)


async def test_demo_banner(make_app: AppFactory) -> None:
    app = await make_app(engine=DemoEngine(model="tiny-demo"))
    async with client_for(app) as client:
        en = await client.get("/?lang=en")
        zh = await client.get("/?lang=zh")
        health = (await client.get("/healthz")).json()
    banner = re.search(
        r'<p class="banner demo" id="demo-banner" role="note" ?>([^<]+)</p>', en.text
    )
    assert banner, en.text
    assert "random noise" in banner.group(1) and "OOGIRI_ENGINE__MODEL" in banner.group(1)
    assert "随机噪声" in zh.text
    assert health["engine"]["demo"] is True


async def test_healthz_and_metrics(make_app: AppFactory, chelsea: bytes) -> None:
    app = await make_app()
    async with client_for(app) as client:
        health = await client.get("/healthz")
        await upload(client, chelsea)
        metrics = await client.get("/metrics")
    assert health.status_code == 200
    body = health.json()
    assert body["ok"] is True
    assert body["engine"] == {
        "ok": True,
        "model": "instant-0",
        "detail": "",
        "name": "instant",
        "demo": False,
    }
    assert body["database"]["ok"] is True
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'oogiri_requests_total{channel="web",outcome="ok"} 1.0' in text
    assert 'oogiri_web_http_requests_total{method="GET",route="/healthz",status="200"}' in text
    assert "oogiri_web_upload_bytes_bucket" in text


async def test_healthz_when_the_database_is_gone(make_app: AppFactory) -> None:
    app = await make_app()

    def broken(*_: Any, **__: Any) -> None:
        raise OSError("database is gone")

    app.store.session = broken  # type: ignore[method-assign]
    async with client_for(app) as client:
        r = await client.get("/healthz")
        live = await client.get("/livez")
    assert r.status_code == 503
    assert r.json()["database"]["ok"] is False and r.json()["engine"]["ok"] is True
    # Liveness stays green: a restart would not fix the database.
    assert live.status_code == 200 and live.json() == {"ok": True}


async def test_stats_page_and_json(make_app: AppFactory, chelsea: bytes, coffee_jpeg: bytes):
    app = await make_app(engine=InstantEngine(model="v<b>1</b>"))
    async with client_for(app) as client:
        token = await csrf_of(client)
        liked = (await upload(client, chelsea)).json()
        await upload(client, coffee_jpeg, "coffee.jpg", "image/jpeg")
        await vote(client, liked["id"], 1, token)
        page = await client.get("/stats", headers={"Accept-Language": "en"})
        data = await client.get("/api/stats")
    assert page.status_code == 200
    assert "v&lt;b&gt;1&lt;/b&gt;" in page.text and "v<b>1</b>" not in page.text
    assert "<svg" in page.text and 'class="bar"' in page.text and "100%" in page.text
    assert data.json() == {
        "versions": [
            {
                "model_version": "v<b>1</b>",
                "jokes": 2,
                "up": 1,
                "down": 0,
                "rated": 1,
                "like_rate": 1.0,
            }
        ]
    }


async def test_stats_can_be_private(make_app: AppFactory) -> None:
    app = await make_app(web={"public_stats": False})
    async with client_for(app) as client:
        assert (await client.get("/stats")).status_code == 404
        assert (await client.get("/api/stats")).status_code == 404
        assert 'href="/stats" hidden' in (await client.get("/")).text


async def test_empty_stats(make_app: AppFactory) -> None:
    app = await make_app()
    async with client_for(app) as client:
        page = await client.get("/stats?lang=en")
        data = await client.get("/api/stats")
    assert page.status_code == 200 and "No jokes yet." in page.text
    assert data.json() == {"versions": []}


# --------------------------------------------------------------------------- plugin contract


class HelloRoutes:
    @hookimpl
    def oogiri_web_routes(self, router: Any, app: App) -> None:
        @router.get("/hello")
        async def hello() -> dict[str, str]:
            return {"hello": app.settings.language}


async def test_other_plugins_add_routes(make_app: AppFactory) -> None:
    app = await make_app(plugins=(HelloRoutes(),))
    async with client_for(app) as client:
        r = await client.get("/hello")
    assert r.status_code == 200 and r.json() == {"hello": "zh"}
    assert r.headers["x-content-type-options"] == "nosniff"


def test_registered_like_a_third_party_plugin(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    pm = make_manager(["web"])
    assert pm.get_plugin("web") is web
    registry = collect(pm, "oogiri_register_channels", "channel", settings)
    assert registry.names() == ["web"]
    assert registry.get("web") is WebChannel


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, "zh"),
        ("", "zh"),
        ("en", "en"),
        ("en-US,en;q=0.9", "en"),
        ("fr-FR,fr;q=0.9,en;q=0.5", "en"),
        ("fr,de", "zh"),
        ("zh-Hans-CN", "zh"),
        ("en;q=0.4,zh;q=0.6", "zh"),
        ("zh;q=0,en", "en"),
        ("en;q=bogus,zh", "zh"),
    ],
)
def test_pick_language(header: str | None, expected: str) -> None:
    assert pick_language(header, "zh") == expected


class AsyncRoutes:
    """A hook implementation may be async; its routes are added when the server starts."""

    @hookimpl
    async def oogiri_web_routes(self, router: Any, app: App) -> None:
        await asyncio.sleep(0)

        @router.post("/hook/ping")
        async def ping() -> dict[str, bool]:
            return {"pong": True}


async def test_channel_serves_and_stops(make_app: AppFactory, chelsea: bytes) -> None:
    app = await make_app(web={"host": "127.0.0.1", "port": 0}, plugins=(AsyncRoutes(),))
    channel = app.channel_registry.get("web")(app)
    await channel.start()
    url = channel.url
    try:
        assert channel.port != 0
        async with httpx.AsyncClient(base_url=channel.url) as client:
            assert (await client.get("/healthz")).status_code == 200
            r = await client.post(
                "/api/jokes", files={"image": ("chelsea.png", chelsea, "image/png")}
            )
            assert r.status_code == 201
            assert (await client.post("/hook/ping")).json() == {"pong": True}
        # A second server on the same port fails loudly instead of exiting the process.
        clash = WebChannel(app, host="127.0.0.1", port=channel.port)
        with pytest.raises(OSError):
            await clash.start()
    finally:
        await channel.stop()
    with pytest.raises(httpx.TransportError):
        async with httpx.AsyncClient(base_url=url) as client:
            await client.get("/healthz")


async def test_stop_lets_a_request_in_flight_finish(make_app: AppFactory, chelsea: bytes):
    app = await make_app(engine=InstantEngine(delay_s=0.5), web={"port": 0})
    channel = WebChannel(app)
    await channel.start()
    async with httpx.AsyncClient(base_url=channel.url) as client:
        pending = asyncio.create_task(
            client.post("/api/jokes", files={"image": ("c.png", chelsea, "image/png")})
        )
        await asyncio.sleep(0.2)  # the engine is busy with it now
        await channel.stop()
        response = await pending
    assert response.status_code == 201
    assert response.json()["model_version"] == "instant-0"


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"host": "bot.example"}, True),  # no Origin/Referer: curl, API clients
        ({"host": "bot.example", "origin": "https://bot.example"}, True),
        ({"host": "bot.example:443", "origin": "https://bot.example"}, True),
        ({"host": "127.0.0.1:8000", "origin": "http://127.0.0.1:8000"}, True),
        ({"host": "127.0.0.1:8000", "origin": "http://127.0.0.1:8001"}, False),
        ({"host": "bot.example", "origin": "https://evil.example"}, False),
        ({"host": "bot.example", "origin": "https://bot.example.evil.example"}, False),
        ({"host": "bot.example", "origin": "null"}, False),
        ({"host": "bot.example", "referer": "https://bot.example/some/page"}, True),
        ({"host": "bot.example", "referer": "https://evil.example/bot.example"}, False),
        ({"host": "bot.example", "referer": "/relative"}, False),
        # behind a proxy that rewrites Host but forwards the original one
        (
            {
                "host": "10.0.0.5:8000",
                "x-forwarded-host": "Bot.Example",
                "origin": "https://bot.example",
            },
            True,
        ),
    ],
)
def test_same_origin(headers: dict[str, str], expected: bool) -> None:
    from starlette.requests import Request

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/",
        "scheme": "http",
        "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
    }
    assert web.same_origin(Request(scope)) is expected
