"""The stats page's live-test section in a real browser (Debian's chromium, Playwright), and the
JSON behind it (``GET /api/ab``): which model is winning, by how much, and how sure we are."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from browser_support import CHROMIUM_ARGS

from bot.app import App
from bot.engines.instant import InstantEngine
from bot.models import NormalizedImage
from bot.settings import Settings
from plugins.web import WebChannel
from training.ab import start_test

SCREENSHOT = Path("/tmp/oogiri-stats-ab.png")


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[App, WebChannel]]:
    settings = Settings(
        _env_file=None,
        data_dir=tmp_path / "data",
        web={"host": "127.0.0.1", "port": 0},
        # 40 requests per arm are too few to show failure rates within the default 2 points
        # (the failure guard's own tests run at the default; this one is about the page)
        ab={"min_votes": 30, "failure_margin": 0.5},
    )
    app = await App.create(settings, engine=InstantEngine())
    channel = app.channel_registry.get("web")(app)
    await channel.start()
    try:
        yield app, channel
    finally:
        await channel.stop()
        await app.close()


async def seed_test(app: App, tmp_path: Path) -> int:
    """v1 active, v2 under test: 40 votes each (40 networks), v2 liked far more: 'promote'."""
    store = app.store
    for version in ("v1", "v2"):
        folder = tmp_path / "models" / version
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        await store.add_model_version(version, str(folder))
    await store.set_model_status("v1", "active")
    test = await start_test(store, app.settings, "v2", "v1")
    image = NormalizedImage.of(b"\xff\xd8" + b"p" * 64 + b"\xff\xd9", 4, 3, "JPEG")
    for version, likes in (("v1", 8), ("v2", 36)):
        for i in range(40):
            joke = await store.add_joke(
                image, channel="web", user_id=f"web:asker{i}", chat_id=None, prompt="p",
                text="笑话", model_version=version, engine="instant", params={},
                request={"channel": "web", "user_id": f"web:asker{i}", "chat_id": None,
                         "latency_ms": 5},
            )  # fmt: skip
            # each web voter from a network of its own: under the default web_votes policy one
            # network is one voter (sybil cookies do not add up), which is not what this shows
            await store.rate(
                joke.id, f"web:voter-{version}-{i}", 1 if i < likes else -1, "web",
                network=f"net-{version}-{i}",
            )  # fmt: skip
    return test.id


async def test_api_ab_reports_arms_decision_and_series(
    served: tuple[App, WebChannel], tmp_path: Path
) -> None:
    app, channel = served
    async with httpx.AsyncClient(base_url=channel.url) as client:
        empty = (await client.get("/api/ab")).json()
        assert empty == {"running": None, "tests": [], "series": {}}
        test_id = await seed_test(app, tmp_path)
        doc = (await client.get("/api/ab")).json()
    running = doc["running"]
    assert running["id"] == test_id and running["status"] == "running"
    assert running["arms"]["control"]["votes"] == 40 and running["arms"]["candidate"]["likes"] == 36
    d = running["decision"]
    assert d["outcome"] == "promote" and d["candidate_rate"] == pytest.approx(36 / 40)
    assert d["candidate_interval"][0] < 36 / 40 < d["candidate_interval"][1]
    (v1,) = doc["series"]["v1"]
    assert (v1["likes"], v1["votes"]) == (8, 40) and v1["low"] < 0.2 < v1["high"]


@pytest.mark.browser
async def test_stats_page_shows_the_live_test(
    served: tuple[App, WebChannel], chromium: Path, tmp_path: Path
) -> None:
    from playwright.async_api import async_playwright, expect

    app, channel = served
    await seed_test(app, tmp_path)
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(locale="en-US", viewport={"width": 900, "height": 1200})
            problems: list[str] = []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda exc: problems.append(str(exc)))
            await page.goto(channel.url + "/stats")
            section = page.locator("#live-test")
            await expect(section).to_be_visible()
            await expect(section.locator("h2")).to_have_text("Live test")
            await expect(section.locator("tr[data-arm=control] td").nth(1)).to_have_text("v1")
            await expect(section.locator("tr[data-arm=candidate] td").nth(3)).to_have_text("90.0%")
            decision = section.locator(".ab-decision")
            await expect(decision).to_have_attribute("data-outcome", "promote")
            await expect(decision).to_contain_text("promote the candidate")
            # both arms drawn with their intervals, and each version's like-rate over time
            assert await section.locator("svg.ab-arms g.ab-arm").count() == 2
            assert await section.locator("svg.ab-series g.ab-point[data-version=v2]").count() == 1
            box = await section.locator("svg.ab-arms").bounding_box()
            assert box is not None and box["width"] > 300 and box["height"] > 50
            await page.screenshot(path=str(tmp_path / "stats-ab.png"), full_page=True)
            shutil.copyfile(tmp_path / "stats-ab.png", SCREENSHOT)
            assert (tmp_path / "stats-ab.png").stat().st_size > 10_000
            # in Chinese too
            zh = await browser.new_page(locale="zh-CN")
            await zh.goto(channel.url + "/stats")
            await expect(zh.locator("#live-test h2")).to_have_text("在线对比测试")
            assert problems == [], problems  # no CSP violation, no script error
        finally:
            await browser.close()


async def test_stats_page_without_a_test_says_so(served: tuple[App, WebChannel]) -> None:
    _, channel = served
    async with httpx.AsyncClient(base_url=channel.url) as client:
        page = (await client.get("/stats", headers={"Accept-Language": "en"})).text
    assert 'id="live-test"' in page and "No live test yet" in page


async def test_api_ab_follows_public_stats(tmp_path: Path) -> None:
    settings = Settings(
        _env_file=None,
        data_dir=tmp_path / "data",
        web={"host": "127.0.0.1", "port": 0, "public_stats": False},
    )
    app = await App.create(settings, engine=InstantEngine())
    channel = app.channel_registry.get("web")(app)
    await channel.start()
    try:
        async with httpx.AsyncClient(base_url=channel.url) as client:
            assert (await client.get("/api/ab")).status_code == 404
            assert (await client.get("/stats")).status_code == 404
    finally:
        await channel.stop()
        await app.close()
