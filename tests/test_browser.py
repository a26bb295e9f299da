"""The upload page in a real browser: Debian's headless chromium driven by Playwright.

The real WebChannel (uvicorn) serves a real App on a free loopback port; the browser picks a photo,
gets a joke, votes 👍 then changes to 👎, and the store must hold exactly one vote of -1.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import skimage
from browser_support import CHROMIUM_ARGS

from bot.app import App
from bot.engines.base import EngineHealth
from bot.engines.instant import InstantEngine
from bot.models import JokeRequest
from bot.settings import Settings
from plugins.web import WebChannel

pytestmark = pytest.mark.browser

SAMPLES = Path(skimage.__file__).parent / "data"
LEAD_SCREENSHOT = Path("/tmp/oogiri-web.png")
#: Screenshots of the stats page and the demo card (phone and desktop), for a person to look at.
STATS_SHOTS = Path("/tmp")


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[App, WebChannel]]:
    settings = Settings(
        _env_file=None, data_dir=tmp_path / "data", web={"host": "127.0.0.1", "port": 0}
    )
    app = await App.create(settings, engine=InstantEngine())
    channel = app.channel_registry.get("web")(app)
    await channel.start()
    try:
        yield app, channel
    finally:
        await channel.stop()
        await app.close()


async def test_upload_vote_and_change_vote(
    served: tuple[App, WebChannel], page: Any, tmp_path: Path
) -> None:
    from playwright.async_api import expect

    app, channel = served
    await page.goto(channel.url + "/")
    await expect(page.locator("h1")).to_have_text("A joke for your picture")
    await expect(page.locator("#demo-banner")).to_be_hidden()

    await page.set_input_files("#file", str(SAMPLES / "chelsea.png"))
    await expect(page.locator("#preview")).to_be_visible()
    await expect(page.locator("#submit")).to_be_enabled()
    await page.click("#submit")

    result = page.locator("#result")
    await expect(result).to_be_visible()
    await expect(page.locator("#model-version")).to_have_text("instant-0")
    public_id = await result.get_attribute("data-joke-id")
    joke = await app.service.get_joke_by_public_id(public_id)
    joke_id = joke.id
    await expect(page.locator("#joke-text")).to_have_text(joke.text)

    await page.click("#vote-up")
    await expect(page.locator("#vote-up")).to_have_attribute("aria-pressed", "true")
    await expect(page.locator("#count-up")).to_have_text("1")
    assert await app.store.ratings_for(joke_id) == [(joke.user_id, 1)]

    await page.click("#vote-down")
    await expect(page.locator("#vote-down")).to_have_attribute("aria-pressed", "true")
    await expect(page.locator("#vote-up")).to_have_attribute("aria-pressed", "false")
    await expect(page.locator("#count-down")).to_have_text("1")
    await expect(page.locator("#count-up")).to_have_text("0")
    assert await app.store.ratings_for(joke_id) == [(joke.user_id, -1)]

    shot = tmp_path / "web.png"
    await page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    shutil.copyfile(shot, LEAD_SCREENSHOT)
    assert page.problems == []


async def test_rejection_is_shown(served: tuple[App, WebChannel], page: Any, tmp_path: Path):
    from playwright.async_api import expect

    app, channel = served
    bogus = tmp_path / "notes.png"
    bogus.write_bytes(b"these are my notes, not a picture\n" * 20)
    await page.goto(channel.url + "/")
    await page.set_input_files("#file", str(bogus))
    await page.click("#submit")
    error = page.locator("#error")
    await expect(error).to_be_visible()
    await expect(error).to_contain_text("doesn't look like a picture")
    await expect(page.locator("#result")).to_be_hidden()
    assert await app.store.request_outcomes() == {"image_rejected": 1}
    # Chromium logs the refused upload itself; nothing else (no script error, no CSP report).
    expected = "Failed to load resource: the server responded with a status of 400"
    assert [p for p in page.problems if not p.startswith(expected)] == []


# --------------------------------------------------------------------------- demo mode, /stats


class DemoEngine(InstantEngine):
    """An engine that declares itself a demo through its health (as the tiny random model does)."""

    async def health(self) -> EngineHealth:
        return EngineHealth(ok=True, model=self.model, demo=True)


async def serve(tmp_path: Path, engine: InstantEngine) -> tuple[App, WebChannel]:
    settings = Settings(
        _env_file=None, data_dir=tmp_path / "data", web={"host": "127.0.0.1", "port": 0}
    )
    app = await App.create(settings, engine=engine)
    channel = app.channel_registry.get("web")(app)
    await channel.start()
    return app, channel


async def test_demo_engine_marks_the_joke_card(page: Any, tmp_path: Path) -> None:
    from playwright.async_api import expect

    app, channel = await serve(tmp_path, DemoEngine(model="tiny-demo"))
    try:
        await page.goto(channel.url + "/")
        await expect(page.locator("#demo-banner")).to_be_visible()
        await page.set_input_files("#file", str(SAMPLES / "chelsea.png"))
        await page.click("#submit")
        await expect(page.locator("#result")).to_be_visible()
        await expect(page.locator("#demo-mark")).to_be_visible()
        await expect(page.locator("#demo-mark")).to_contain_text("random noise")
        await expect(page.locator("#result")).to_have_class(re.compile(r"\bis-demo\b"))
        await page.screenshot(path=str(STATS_SHOTS / "demo-card-phone.png"), full_page=True)
    finally:
        await channel.stop()
        await app.close()
    assert page.problems == []


async def stats_fixture(app: App) -> None:
    """Jokes and votes for three versions, one with a long name and one without votes."""
    engine = app.engine
    photo = (SAMPLES / "chelsea.png").read_bytes()
    versions = ("internvl2-1b-oogiri-2026-12-04-candidate-rc7", "internvl2-1b-base", "unrated-v3")
    for n, version in enumerate(versions):
        engine.model = version
        for k in range(3):
            joke = await app.service.tell(
                JokeRequest(image_bytes=photo, channel="web", user_id=f"web:u{n}{k}")
            )
            if version != "unrated-v3":
                for voter in range(k + n + 1):
                    value = 1 if (voter + n) % 3 else -1
                    await app.service.rate(joke.id, f"web:v{voter}", value, "web")


@pytest.mark.parametrize(
    ("name", "viewport", "mobile"),
    [
        ("phone", {"width": 390, "height": 844}, True),
        ("desktop", {"width": 1280, "height": 800}, False),
    ],
)
async def test_stats_page_is_readable_on_phone_and_desktop(
    chromium: Path, tmp_path: Path, name: str, viewport: dict[str, int], mobile: bool
) -> None:
    from playwright.async_api import async_playwright, expect

    app, channel = await serve(tmp_path, DemoEngine(model="tiny-demo"))
    try:
        await stats_fixture(app)
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
            context = await browser.new_context(
                viewport=viewport,
                device_scale_factor=2 if mobile else 1,
                is_mobile=mobile,
                has_touch=mobile,
                locale="en-US",
            )
            page = await context.new_page()
            await page.goto(channel.url + "/stats")
            await expect(page.locator("#demo-banner")).to_be_visible()
            await expect(page.locator("#demo-banner")).to_contain_text("random noise")
            geometry = await page.evaluate(
                """() => {
                  const box = (el) => el.getBoundingClientRect();
                  const labels = [...document.querySelectorAll('.chart text.label')];
                  const cells = [...document.querySelectorAll('table.stats td')];
                  return {
                    overflow: document.documentElement.scrollWidth - window.innerWidth,
                    labelHeights: labels.map((t) => box(t).height),
                    valueHeights: [...document.querySelectorAll('.chart text.value')]
                      .map((t) => box(t).height),
                    chartWidth: box(document.querySelector('.chart')).width,
                    cellRight: Math.max(...cells.map((c) => box(c).right)),
                    cellDisplay: getComputedStyle(cells[0]).display,
                  };
                }"""
            )
            shot = STATS_SHOTS / f"stats-{name}.png"
            await page.screenshot(path=str(shot), full_page=True)
            await browser.close()
    finally:
        await channel.stop()
        await app.close()
    assert geometry["overflow"] <= 0, geometry  # nothing scrolls sideways
    assert len(geometry["labelHeights"]) == 3
    # Text in the chart is at least as large as small body text, phone included.
    assert min(geometry["labelHeights"] + geometry["valueHeights"]) >= 12, geometry
    assert geometry["chartWidth"] >= viewport["width"] * 0.8 or geometry["chartWidth"] >= 500
    assert geometry["cellRight"] <= viewport["width"], geometry
    # On a phone the table wraps into one block per version; on a desktop it stays a table.
    assert geometry["cellDisplay"] == ("block" if mobile else "table-cell"), geometry
    assert shot.stat().st_size > 10_000
