"""Issue 21 B–I: the smaller holes of the web channel, each with its reproducer.

B odd digits in ids, C credentials in URL-shaped settings and logs, D unbounded /metrics labels,
E client disconnects logged as errors, F connections that never finish their headers, G the 413
lost in a connection reset, H Host allow-list / enumerable ids / file modes, I the CLI reading
without bound. F, G and H run against the real uvicorn server on a loopback port.
"""

from __future__ import annotations

import asyncio
import io
import logging
import socket
import stat
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from bot.app import App
from bot.cli_joke import validate
from bot.engines.instant import InstantEngine
from bot.logs import RedactingFilter
from bot.settings import Settings
from plugins.web import WebChannel, create_api

BASE = "http://testserver"


def photo() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 90, 200)).save(buf, "PNG")
    return buf.getvalue()


def settings_for(tmp_path: Path, **overrides: Any) -> Settings:
    return Settings(_env_file=None, data_dir=tmp_path / "data", **overrides)


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[App]:
    app = await App.create(settings_for(tmp_path), engine=InstantEngine())
    try:
        yield app
    finally:
        await app.close()


def client_for(app: App) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_api(app)), base_url=BASE)


async def served(tmp_path: Path, **web: Any) -> tuple[App, WebChannel]:
    settings = settings_for(tmp_path, web={"host": "127.0.0.1", "port": 0, **web})
    app = await App.create(settings, engine=InstantEngine())
    channel = WebChannel(app)
    await channel.start()
    return app, channel


async def shut(app: App, channel: WebChannel) -> None:
    await channel.stop()
    await app.close()


# --------------------------------------------------------------------------- B: ids


@pytest.mark.parametrize("raw", ["²", "⑦", "１", "٣", "1", "0", "-1", "1" * 40, "a b"])
async def test_odd_ids_are_404_never_500(app: App, raw: str) -> None:
    async with client_for(app) as client:
        await client.post("/api/jokes", files={"image": ("p.png", photo(), "image/png")})
        got = await client.get(f"/api/jokes/{raw}")
        token = (await client.get("/api/session")).json()["csrf_token"]
        voted = await client.post(
            f"/api/jokes/{raw}/rating",
            json={"value": 1},
            headers={"X-CSRF-Token": token, "Origin": BASE},
        )
    assert got.status_code == 404 and got.json()["error"] == "no_such_joke"
    assert voted.status_code == 404 and voted.json()["error"] == "no_such_joke"


async def test_jokes_cannot_be_enumerated_by_sequential_id(app: App) -> None:
    async with client_for(app) as client:
        told = await client.post("/api/jokes", files={"image": ("p.png", photo(), "image/png")})
        public_id = told.json()["id"]
        internal = (await app.service.get_joke_by_public_id(public_id)).id
        assert (await client.get(f"/api/jokes/{internal}")).status_code == 404
        assert (await client.get(f"/api/jokes/{public_id}")).status_code == 200
    # 96 random bits (secrets.token_urlsafe(12)), not the row number in any form
    assert len(public_id) == 16 and public_id != str(internal) and not public_id.isdigit()


# --------------------------------------------------------------------------- C: credentials


def test_config_show_masks_passwords_in_urls(tmp_path: Path) -> None:
    settings = settings_for(
        tmp_path,
        store={"url": "postgresql+asyncpg://oogiri:pg-s3cret@db:5432/oogiri"},
        limits={"backend": "redis://:redis-s3cret@cache:6379/0"},
        engine={"base_urls": ["http://user:engine-s3cret@gpu1:23333", "http://gpu2:23333"]},
    )
    shown = repr(settings.masked())
    for secret in ("pg-s3cret", "redis-s3cret", "engine-s3cret"):
        assert secret not in shown
    assert "postgresql+asyncpg://oogiri:**********@db:5432/oogiri" in shown
    assert "http://gpu2:23333" in shown  # URLs without credentials are untouched


def test_logs_mask_passwords_in_urls() -> None:
    record = logging.LogRecord(
        "x",
        logging.WARNING,
        __file__,
        1,
        "cannot reach %s",
        ("redis://:hunter22@cache:6379",),
        None,
    )
    RedactingFilter().filter(record)
    assert record.getMessage() == "cannot reach redis://:**********@cache:6379"


# --------------------------------------------------------------------------- D: /metrics


async def test_metrics_labels_come_from_a_fixed_set(app: App) -> None:
    async with client_for(app) as client:
        for i in range(300):
            await client.request(f"X{i}", f"/nowhere/{i}")
            await client.get(f"/static/nothing-{i}.js")
        text = (await client.get("/metrics")).text
    series = [line for line in text.splitlines() if line.startswith("oogiri_web_http_requests")]
    assert 'method="other",route="unmatched"' in text and 'route="/static"' in text
    assert not any("X1" in line or "nowhere" in line or "nothing-" in line for line in series)
    assert len(series) < 20, series


async def test_metrics_token(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, web={"metrics_token": "m-token-123456"})
    app = await App.create(settings, engine=InstantEngine())
    try:
        async with client_for(app) as client:
            anonymous = await client.get("/metrics")
            wrong = await client.get("/metrics", headers={"Authorization": "Bearer nope"})
            right = await client.get("/metrics", headers={"Authorization": "Bearer m-token-123456"})
    finally:
        await app.close()
    assert anonymous.status_code == 401 and wrong.status_code == 401
    assert right.status_code == 200 and "oogiri_web_http_requests" in right.text


# --------------------------------------------------------------------------- E: disconnects


async def test_client_disconnect_is_info_not_error(
    app: App, caplog: pytest.LogCaptureFixture
) -> None:
    api = create_api(app)
    boundary = "b0undary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="p.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    messages = [
        {"type": "http.request", "body": head + photo()[:100], "more_body": True},
        {"type": "http.disconnect"},
    ]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/api/jokes",
        "raw_path": b"/api/jokes",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"testserver"),
            (b"content-type", f"multipart/form-data; boundary={boundary}".encode()),
        ],
        "client": ("198.51.100.7", 5000),
        "server": ("testserver", 80),
        "state": {},
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with caplog.at_level(logging.INFO):
        await api(scope, receive, send)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("client went away" in r.getMessage() for r in caplog.records)
    async with client_for(app) as client:
        metrics = (await client.get("/metrics")).text
    assert 'status="500"' not in metrics
    assert 'oogiri_web_refused_total{reason="client_disconnect"} 1.0' in metrics


# --------------------------------------------------------------------------- F: connections


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """True when the server closes the connection within ``seconds``."""
    sock.settimeout(seconds)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


async def test_slow_headers_are_cut_off(tmp_path: Path) -> None:
    app, channel = await served(tmp_path, header_timeout_s=1.0)
    try:
        sock = socket.create_connection(("127.0.0.1", channel.port))
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
        started = time.monotonic()
        closed = await asyncio.to_thread(_closed_within, sock, 10.0)
        elapsed = time.monotonic() - started
        sock.close()
        # An idle keep-alive connection after a complete request is closed as well.
        async with httpx.AsyncClient() as client:
            assert (await client.get(channel.url + "/livez")).status_code == 200
    finally:
        await shut(app, channel)
    assert closed and 0.5 < elapsed < 9.0  # 1 s timeout; slack for a loaded machine


async def test_connections_per_address_are_capped(tmp_path: Path) -> None:
    # No trusted proxies: loopback is an ordinary client here.
    app, channel = await served(tmp_path, max_connections_per_ip=3, trusted_proxies=[])
    try:
        held = [socket.create_connection(("127.0.0.1", channel.port)) for _ in range(3)]
        extra = socket.create_connection(("127.0.0.1", channel.port))
        refused = await asyncio.to_thread(_closed_within, extra, 2.0)
        kept = await asyncio.to_thread(_closed_within, held[0], 0.3)
        for sock in (*held, extra):
            sock.close()
        await asyncio.sleep(0.2)
        async with httpx.AsyncClient() as client:  # slots come back once closed
            assert (await client.get(channel.url + "/livez")).status_code == 200
    finally:
        await shut(app, channel)
    assert refused and not kept


# --------------------------------------------------------------------------- G: the 413 arrives


async def test_slightly_too_large_upload_gets_its_413_with_urllib(tmp_path: Path) -> None:
    max_bytes = 64 * 1024
    settings = settings_for(
        tmp_path, images={"max_bytes": max_bytes}, web={"host": "127.0.0.1", "port": 0}
    )
    app = await App.create(settings, engine=InstantEngine())
    channel = WebChannel(app)
    await channel.start()
    boundary = "xyz"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + b"\x89PNG"
        + b"\0" * (max_bytes + 200_000)
        + f"\r\n--{boundary}--\r\n".encode()
    )

    def post() -> tuple[int, str]:
        request = urllib.request.Request(
            channel.url + "/api/jokes",
            data=body,
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    try:
        status, text = await asyncio.to_thread(post)
    finally:
        await shut(app, channel)
    assert status == 413 and "too_large" in text


# --------------------------------------------------------------------------- H: hosts, files


async def test_foreign_host_is_refused(tmp_path: Path) -> None:
    app, channel = await served(tmp_path)
    try:
        async with httpx.AsyncClient() as client:
            ok = await client.get(channel.url + "/")
            rebound = await client.get(
                channel.url + "/",
                headers={"Host": "attacker.example", "Origin": "http://attacker.example"},
            )
            local = await client.get(channel.url + "/", headers={"Host": "localhost"})
    finally:
        await shut(app, channel)
    assert ok.status_code == 200 and local.status_code == 200
    assert rebound.status_code == 400


async def test_data_is_private_on_disk(tmp_path: Path) -> None:
    app = await App.create(settings_for(tmp_path), engine=InstantEngine())
    try:
        async with client_for(app) as client:
            told = await client.post("/api/jokes", files={"image": ("p.png", photo(), "image/png")})
        joke = await app.service.get_joke_by_public_id(told.json()["id"])
        image = app.store.image_path(joke.image_sha256)
    finally:
        await app.close()
    data_dir = tmp_path / "data"

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    assert mode(data_dir) == 0o700
    assert mode(data_dir / "oogiri.sqlite3") == 0o600
    assert mode(image) == 0o600 and mode(image.parent) == 0o700


# --------------------------------------------------------------------------- I: the CLI


def test_cli_refuses_dev_zero_without_reading_it_all(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    started = time.monotonic()
    (checked,) = validate([Path("/dev/zero")], settings, "en")
    assert checked.failure is not None and checked.failure.error == "too_large"
    assert time.monotonic() - started < 5
