"""Issue 21 A/1: identities on the web channel cost something (reproducers as regression tests).

Before: without a cookie every request was a new user (ten uploads in a row all got jokes), and
500 up-votes from 500 freshly minted sessions put the attacker's joke into the training export.
Clients are told apart by address here: ``httpx.ASGITransport(client=…)`` sets the peer.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from bot.app import App
from bot.engines.instant import InstantEngine
from bot.settings import Settings
from plugins.web import CSRF_HEADER, create_api
from plugins.web.guard import client_address, network_of, parse_networks
from training.export import examples_from_ratings
from training.settings import TrainingSettings

BASE = "http://testserver"


def photo(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (seed % 256, 90, 200)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[App]:
    settings = Settings(
        _env_file=None,
        data_dir=tmp_path / "data",
        limits={"per_user_per_minute": 0},
        web={"new_sessions_per_ip_per_hour": 30, "uploads_per_ip_per_minute": 20},
    )
    app = await App.create(settings, engine=InstantEngine())
    try:
        yield app
    finally:
        await app.close()


def client(app: App, ip: str, **kwargs: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=create_api(app), client=(ip, 40000))
    return httpx.AsyncClient(transport=transport, base_url=BASE, **kwargs)


async def upload(c: httpx.AsyncClient, seed: int = 0, **kwargs: Any) -> httpx.Response:
    files = {"image": ("p.png", photo(seed), "image/png")}
    return await c.post("/api/jokes", files=files, **kwargs)


# --------------------------------------------------------------------------- who is asking


def test_forwarded_for_is_believed_only_from_trusted_proxies() -> None:
    trusted = parse_networks(["127.0.0.1", "10.0.0.0/8"])
    # A direct client cannot choose its address with a header.
    assert str(client_address("203.0.113.9", ["1.2.3.4"], trusted)) == "203.0.113.9"
    # Behind our proxy: the rightmost address the proxy did not add itself is the client;
    # whatever the client put further left is ignored.
    chain = ["6.6.6.6, 198.51.100.7, 10.1.2.3"]
    assert str(client_address("127.0.0.1", chain, trusted)) == "198.51.100.7"
    assert str(client_address("127.0.0.1", [], trusted)) == "127.0.0.1"
    assert str(client_address("127.0.0.1", ["garbage"], trusted)) == "127.0.0.1"
    assert str(client_address("::ffff:203.0.113.9", [], trusted)) == "203.0.113.9"


def test_ipv6_clients_count_per_prefix() -> None:
    a = ipaddress.ip_address("2001:db8:1:2::1")
    b = ipaddress.ip_address("2001:db8:1:2:ffff::9")
    c = ipaddress.ip_address("2001:db8:1:3::1")
    assert network_of(a, 64) == network_of(b, 64) == "2001:db8:1:2::/64"
    assert network_of(c, 64) != network_of(a, 64)
    assert network_of(ipaddress.ip_address("198.51.100.7"), 64) == "198.51.100.7"


# --------------------------------------------------------------------------- limits


async def test_cookieless_flood_is_limited_per_network(app: App) -> None:
    # The reproducer: no cookie, so each request was a new user and all got jokes.
    async with client(app, "203.0.113.9") as attacker, client(app, "198.51.100.7") as other:
        codes = []
        for i in range(25):
            attacker.cookies.clear()
            codes.append((await upload(attacker, i)).status_code)
        assert codes.count(201) == 20 and codes[-1] == 429
        refused = await upload(attacker, 99, headers={"Accept-Language": "en"})
        assert refused.json()["error"] == "rate_network"
        assert "your network" in refused.json()["message"]
        assert int(refused.headers["retry-after"]) >= 1
        # Someone on another network is not affected.
        assert (await upload(other)).status_code == 201


async def test_new_sessions_per_network_are_capped(app: App) -> None:
    async with client(app, "203.0.113.9") as attacker:
        minted = 0
        for _ in range(40):
            attacker.cookies.clear()
            r = await attacker.get("/api/session")
            minted += r.status_code == 200
        assert minted == 30
        assert r.status_code == 429 and r.json()["error"] == "rate_sessions"
        # The page still loads for a cookie-less visitor over the cap, without an identity.
        attacker.cookies.clear()
        page = await attacker.get("/")
        assert page.status_code == 200 and "set-cookie" not in page.headers
    async with client(app, "198.51.100.7") as other:
        assert (await other.get("/api/session")).status_code == 200


async def test_global_admission_limit_answers_busy(tmp_path: Path) -> None:
    settings = Settings(
        _env_file=None,
        data_dir=tmp_path / "data",
        limits={"per_user_per_minute": 0},
        web={"max_inflight_uploads": 2, "inflight_uploads_per_ip": 0},
    )
    app = await App.create(settings, engine=InstantEngine(delay_s=0.5))
    try:
        clients = [client(app, f"198.51.100.{i}") for i in range(1, 5)]
        results = await asyncio.gather(*(upload(c, i) for i, c in enumerate(clients)))
        for c in clients:
            await c.aclose()
    finally:
        await app.close()
    codes = sorted(r.status_code for r in results)
    assert codes == [201, 201, 503, 503]
    assert all(r.headers.get("retry-after") for r in results if r.status_code == 503)


async def test_one_network_gets_a_bounded_share_of_uploads_in_flight(tmp_path: Path) -> None:
    settings = Settings(
        _env_file=None,
        data_dir=tmp_path / "data",
        limits={"per_user_per_minute": 0},
        web={"inflight_uploads_per_ip": 2},
    )
    app = await App.create(settings, engine=InstantEngine(delay_s=0.5))
    try:
        async with client(app, "203.0.113.9") as attacker:
            results = await asyncio.gather(*(upload(attacker, i) for i in range(4)))
    finally:
        await app.close()
    assert sorted(r.status_code for r in results) == [201, 201, 429, 429]


# --------------------------------------------------------------------------- sybil votes


async def vote_from(app: App, ip: str, joke_id: str, fresh_identities: int) -> int:
    """Mint ``fresh_identities`` sessions from ``ip`` and up-vote with each; votes accepted."""
    accepted = 0
    async with client(app, ip) as c:
        for _ in range(fresh_identities):
            c.cookies.clear()
            session = await c.get("/api/session")
            if session.status_code != 200:
                continue
            r = await c.post(
                f"/api/jokes/{joke_id}/rating",
                json={"value": 1},
                headers={CSRF_HEADER: session.json()["csrf_token"], "Origin": BASE},
            )
            accepted += r.status_code == 200
    return accepted


async def test_sybil_votes_never_reach_the_export(app: App, tmp_path: Path) -> None:
    async with client(app, "203.0.113.9") as attacker:
        joke = (await upload(attacker, data={"hint": "say the attacker's slogan"})).json()
    accepted = await vote_from(app, "203.0.113.9", joke["id"], 500)
    assert accepted <= 30  # minting is capped per network

    rated = await app.store.rated_jokes()
    image_path = app.store.image_path
    examples, counts = examples_from_ratings(rated, TrainingSettings(), image_path)
    assert examples == []  # with the default policy nothing of it is trained on
    assert counts["web_votes_too_few_networks"] == accepted
    # The same votes counted like platform votes would have made it a training example.
    equal, _ = examples_from_ratings(rated, TrainingSettings(web_votes="equal"), image_path)
    assert [e["text"] for e in equal] == [(await app.store.rated_jokes())[0]["joke"].text]


async def test_web_votes_from_enough_networks_count_at_reduced_weight(app: App) -> None:
    async with client(app, "198.51.100.1") as author:
        joke = (await upload(author)).json()
    for i in range(3):
        assert await vote_from(app, f"192.0.2.{i + 10}", joke["id"], 1) == 1
    rated = await app.store.rated_jokes()
    image_path = app.store.image_path
    examples, _ = examples_from_ratings(rated, TrainingSettings(), image_path)
    assert len(examples) == 1 and examples[0]["up"] == 1.5  # 3 votes × 0.5
    excluded, counts = examples_from_ratings(
        rated, TrainingSettings(web_votes="exclude"), image_path
    )
    assert excluded == [] and counts["web_votes_excluded"] == 3
    two_networks = TrainingSettings(web_min_networks=4)
    assert examples_from_ratings(rated, two_networks, image_path)[0] == []


async def test_votes_store_a_network_hash_not_the_address(app: App) -> None:
    async with client(app, "198.51.100.1") as author:
        joke = (await upload(author)).json()
    await vote_from(app, "192.0.2.44", joke["id"], 1)
    (entry,) = await app.store.rated_jokes()
    ((channel, network),) = entry["vote_sources"].values()
    assert channel == "web" and network and "192.0.2" not in network


async def test_forwarded_for_counts_only_behind_a_trusted_proxy(app: App) -> None:
    # Behind the (trusted, loopback) proxy each forwarded client is its own network ...
    async with client(app, "127.0.0.1") as proxy:
        for i in range(25):
            proxy.cookies.clear()
            r = await upload(proxy, i, headers={"X-Forwarded-For": f"198.51.100.{i}"})
            assert r.status_code == 201, (i, r.text)
    # ... while a direct client cannot escape its limit by writing the header itself.
    async with client(app, "203.0.113.9") as direct:
        codes = []
        for i in range(22):
            direct.cookies.clear()
            forged = {"X-Forwarded-For": f"192.0.2.{i}"}
            codes.append((await upload(direct, i, headers=forged)).status_code)
    assert codes.count(201) == 20 and codes[-1] == 429
