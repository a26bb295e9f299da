"""Review of the upload page in a real browser: each test reproduces one defect a person hit.

Debian's chromium driven by Playwright against the real WebChannel (uvicorn) serving a real App,
as in tests/test_browser.py (its ``serve`` helper starts the app on a free port; ``page`` is the
same phone that records console errors in ``page.problems``).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from test_browser import SAMPLES, serve

from bot.app import App
from bot.engines.instant import InstantEngine
from plugins.web import WebChannel

pytestmark = pytest.mark.browser

#: The upload endpoint, whatever its query string.
UPLOADS = re.compile(r"/api/jokes(\?.*)?$")
#: Chromium's own line for an answer with an error status: expected where a test provokes one.
LOAD_FAILED = "Failed to load resource: the server responded with a status of"


def unexpected(problems: list[str]) -> list[str]:
    return [p for p in problems if not p.startswith(LOAD_FAILED)]


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[App, WebChannel]]:
    app, channel = await serve(tmp_path, InstantEngine())
    try:
        yield app, channel
    finally:
        await channel.stop()
        await app.close()


async def active_id(page: Any) -> str:
    return await page.evaluate("() => document.activeElement && document.activeElement.id")


async def test_keyboard_only_upload_and_vote_keep_the_focus(
    served: tuple[App, WebChannel],
    page: Any,
) -> None:
    """Tab/Space/Enter alone: pick a picture, ask, vote. Disabling the focused button while its
    request ran threw the focus back to <body>: the next Tab started over at the top."""
    from playwright.async_api import expect

    app, channel = served
    # listening before the page loads: the interception is switched on asynchronously
    chosen: asyncio.Queue[Any] = asyncio.Queue()
    page.on("filechooser", chosen.put_nowait)
    await page.goto(channel.url + "/")
    await page.keyboard.press("Tab")
    assert await active_id(page) == "file"
    # the (visually hidden) file input shows its focus on the drop zone
    outline = await page.evaluate("() => getComputedStyle(document.getElementById('drop')).outline")
    assert "none" not in outline and "0px" not in outline, outline
    await page.keyboard.press("Space")
    chooser = await asyncio.wait_for(chosen.get(), 10)
    await chooser.set_files(str(SAMPLES / "chelsea.png"))
    await page.keyboard.press("Tab")
    assert await active_id(page) == "hint"
    await page.keyboard.press("Tab")
    assert await active_id(page) == "submit"
    await page.keyboard.press("Enter")
    await expect(page.locator("#result")).to_be_visible()
    await expect(page.locator("#upload")).to_have_attribute("aria-busy", "false")
    assert await active_id(page) == "submit"

    await page.keyboard.press("Tab")
    assert await active_id(page) == "vote-up"
    outline = await page.evaluate("() => getComputedStyle(document.activeElement).outlineStyle")
    assert outline != "none"
    await page.keyboard.press("Space")
    await expect(page.locator("#vote-up")).to_have_attribute("aria-pressed", "true")
    await expect(page.locator("#vote-status")).not_to_be_empty()
    assert await active_id(page) == "vote-up"
    await page.keyboard.press("Tab")
    assert await active_id(page) == "vote-down"
    await page.keyboard.press("Enter")
    await expect(page.locator("#vote-down")).to_have_attribute("aria-pressed", "true")
    await expect(page.locator("#count-up")).to_have_text("0")
    assert await active_id(page) == "vote-down"
    joke = await app.service.get_joke_by_public_id(
        await page.locator("#result").get_attribute("data-joke-id")
    )
    assert await app.store.ratings_for(joke.id) == [(joke.user_id, -1)]
    assert page.problems == []


async def test_a_vote_clicked_twice_fast_counts_once(
    served: tuple[App, WebChannel],
    page: Any,
) -> None:
    """A double click (or Enter held down) while the vote is on its way sends one vote."""
    from playwright.async_api import expect

    _, channel = served
    await page.goto(channel.url + "/")
    await page.set_input_files("#file", str(SAMPLES / "coffee.png"))
    await page.click("#submit")
    await expect(page.locator("#result")).to_be_visible()
    sent: list[str] = []
    page.on("request", lambda r: sent.append(r.url) if "/rating" in r.url else None)
    await page.locator("#vote-up").dblclick()
    await expect(page.locator("#count-up")).to_have_text("1")
    await page.wait_for_timeout(300)
    assert len(sent) == 1, sent
    assert page.problems == []


async def test_the_page_language_is_the_language_of_its_answers(
    served: tuple[App, WebChannel],
    page: Any,
    tmp_path: Path,
) -> None:
    """/?lang=zh in an English browser: the page spoke Chinese, but the API calls did not carry
    the choice, so the error (and the joke itself) came back in the browser's language."""
    from playwright.async_api import expect

    _, channel = served
    bogus = tmp_path / "notes.png"
    bogus.write_bytes(b"these are my notes, not a picture\n" * 20)
    await page.goto(channel.url + "/?lang=zh")  # the browser asks for en-US
    await expect(page.locator("#submit")).to_have_text("讲个梗")
    await page.set_input_files("#file", str(bogus))
    await page.click("#submit")
    await expect(page.locator("#error")).to_contain_text("这看起来不是图片")
    assert unexpected(page.problems) == []


async def test_an_answer_for_a_picture_replaced_meanwhile_is_not_shown(
    served: tuple[App, WebChannel],
    page: Any,
) -> None:
    """Ask about one picture, pick another while the first is pending: the first picture's joke
    appeared under the second picture as if it were about it."""
    from playwright.async_api import expect

    _, channel = served
    await page.goto(channel.url + "/")
    await page.set_input_files("#file", str(SAMPLES / "chelsea.png"))  # 451×300
    release = asyncio.Event()

    async def held(route: Any) -> None:
        await release.wait()
        await route.continue_()

    await page.route(UPLOADS, held)
    await page.click("#submit")
    await expect(page.locator("#status")).not_to_be_empty()
    await page.set_input_files("#file", str(SAMPLES / "astronaut.png"))  # 512×512
    await expect(page.locator("#file-name")).to_have_text("astronaut.png")
    release.set()
    await expect(page.locator("#upload")).to_have_attribute("aria-busy", "false")  # answered
    await expect(page.locator("#status")).to_be_empty()
    await expect(page.locator("#result")).to_be_hidden()
    await page.unroute(UPLOADS)
    await page.click("#submit")
    await expect(page.locator("#result")).to_be_visible()
    await expect(page.locator("#joke-text")).to_contain_text("512×512")
    assert page.problems == []


#: The vote endpoint of any joke, whatever its query string.
RATINGS = re.compile(r"/api/jokes/[^/?]+/rating(\?.*)?$")


async def test_a_late_vote_answer_does_not_change_the_newer_joke(
    served: tuple[App, WebChannel],
    page: Any,
) -> None:
    """Vote on one joke, get a joke for another picture before the vote is answered: the late
    answer wrote the first joke's counts (and 'your vote is saved', and the pressed button) onto
    the second joke's card."""
    from playwright.async_api import expect

    app, channel = served
    await page.goto(channel.url + "/")
    await page.set_input_files("#file", str(SAMPLES / "chelsea.png"))  # 451×300
    await page.click("#submit")
    await expect(page.locator("#joke-text")).to_contain_text("451×300")
    first = await page.locator("#result").get_attribute("data-joke-id")
    release = asyncio.Event()
    held: asyncio.Queue[str] = asyncio.Queue()

    async def hold_vote(route: Any) -> None:
        held.put_nowait(route.request.url)
        await release.wait()
        await route.continue_()

    await page.route(RATINGS, hold_vote)
    await page.click("#vote-up")
    assert f"/api/jokes/{first}/rating" in await asyncio.wait_for(held.get(), 10)

    await page.set_input_files("#file", str(SAMPLES / "astronaut.png"))  # 512×512
    await page.click("#submit")
    await expect(page.locator("#joke-text")).to_contain_text("512×512")
    second = await page.locator("#result").get_attribute("data-joke-id")
    assert second != first
    release.set()
    # the vote is answered (the buttons are released) ...
    await expect(page.locator("#vote-up")).to_have_attribute("aria-disabled", "false")
    # ... and it was stored for the first joke ...
    stored = await app.service.get_joke_by_public_id(first)
    assert [v for _, v in await app.store.ratings_for(stored.id)] == [1]
    # ... but the card shows the second joke, which nobody has voted on
    await expect(page.locator("#count-up")).to_have_text("0")
    await expect(page.locator("#count-down")).to_have_text("0")
    await expect(page.locator("#vote-up")).to_have_attribute("aria-pressed", "false")
    await expect(page.locator("#vote-status")).to_be_empty()
    await expect(page.locator("#error")).to_be_hidden()

    # and a vote on the second joke goes to the second joke
    await page.unroute(RATINGS)
    await page.click("#vote-down")
    await expect(page.locator("#count-down")).to_have_text("1")
    await expect(page.locator("#vote-down")).to_have_attribute("aria-pressed", "true")
    await expect(page.locator("#count-up")).to_have_text("0")
    shown = await app.service.get_joke_by_public_id(second)
    assert [v for _, v in await app.store.ratings_for(shown.id)] == [-1]
    assert page.problems == []


@pytest.mark.parametrize(
    ("status", "content_type", "body", "expected"),
    [
        # uvicorn's own answer beyond limit_concurrency (web.max_connections)
        (503, "text/plain; charset=utf-8", "Service Unavailable", "Something went wrong"),
        # a reverse proxy whose upstream is down / whose body limit is lower than ours
        (502, "text/html", "<html><body><h1>502 Bad Gateway</h1></body></html>", "went wrong"),
        (413, "text/html", "<html><h1>413 Request Entity Too Large</h1></html>", "too big"),
    ],
)
async def test_an_error_answer_without_json_is_not_called_a_network_failure(
    served: tuple[App, WebChannel],
    page: Any,
    status: int,
    content_type: str,
    body: str,
    expected: str,
) -> None:
    """The server answered, but not with our JSON: the page said 'could not be reached; check
    the connection', sending the person to fix a connection that works."""
    from playwright.async_api import expect

    _, channel = served
    await page.goto(channel.url + "/")
    await page.route(
        UPLOADS,
        lambda route: route.fulfill(status=status, content_type=content_type, body=body),
    )
    await page.set_input_files("#file", str(SAMPLES / "chelsea.png"))
    await page.click("#submit")
    error = page.locator("#error")
    await expect(error).to_be_visible()
    await expect(error).to_contain_text(expected)
    await expect(error).not_to_contain_text("could not be reached")
    await expect(page.locator("#upload")).to_have_attribute("aria-busy", "false")
    await expect(page.locator("#submit")).to_be_enabled()
    assert unexpected(page.problems) == []


async def test_the_joke_is_announced_and_the_count_refresh_is_not(
    served: tuple[App, WebChannel],
    page: Any,
) -> None:
    """The joke's only live region was the result card, hidden until the first joke: a region
    that appears together with its content is not reliably read out. And the card being live
    made every 15 s count refresh (other people's votes) be read out."""
    from playwright.async_api import expect

    _, channel = served
    await page.goto(channel.url + "/")
    live_script = """() => [...document.querySelectorAll(
        '[aria-live]:not([aria-live=off]), [role=status], [role=alert], [role=log]')]
        .filter((el) => !el.closest('[hidden]')).map((el) => el.id)"""
    live_before = await page.evaluate(live_script)
    await page.set_input_files("#file", str(SAMPLES / "chelsea.png"))
    await page.click("#submit")
    await expect(page.locator("#result")).to_be_visible()
    joke = await page.locator("#joke-text").text_content()
    assert joke
    spoken = await page.evaluate(
        "(ids) => ids.map((id) => document.getElementById(id).textContent).join(' ')",
        live_before,
    )
    assert joke in spoken, (live_before, spoken)
    refreshed = await page.evaluate(
        "() => document.getElementById('count-up').closest("
        "'[aria-live]:not([aria-live=off]), [role=status], [role=alert]')"
        " === null"
    )
    assert refreshed, "the vote counts sit in a live region"
    # the vote buttons are named by what they mean, the count is part of the name
    await expect(page.get_by_role("button", name=re.compile(r"^Funny \d+$"))).to_have_id("vote-up")
    await expect(page.get_by_role("button", name=re.compile(r"^Not funny \d+$"))).to_have_id(
        "vote-down"
    )
    assert page.problems == []


async def test_stats_page_without_data_has_no_empty_card(
    served: tuple[App, WebChannel],
    page: Any,
) -> None:
    """No jokes yet: the chart's card was drawn empty (a blank framed box under the heading)."""
    from playwright.async_api import expect

    _, channel = served
    await page.goto(channel.url + "/stats")
    await expect(page.locator("table.stats")).to_contain_text("No jokes yet.")
    empty = await page.evaluate(
        """() => [...document.querySelectorAll('.card')]
            .filter((c) => !c.textContent.trim() && !c.querySelector('svg, img'))
            .map((c) => c.className)"""
    )
    assert empty == []
    assert await page.evaluate("document.documentElement.scrollWidth - innerWidth") <= 0
    assert page.problems == []


async def test_nothing_overflows_a_360px_phone(
    served: tuple[App, WebChannel],
    page: Any,
) -> None:
    """The smallest common phone width, with a long file name and a joke on screen."""
    from playwright.async_api import expect

    _, channel = served
    await page.set_viewport_size({"width": 360, "height": 740})
    for lang in ("en", "zh"):
        await page.goto(channel.url + f"/?lang={lang}")
        await page.set_input_files(
            "#file",
            files=[
                {
                    "name": "IMG_20240101_123456789_HDR_portrait_mode_very_long_name.png",
                    "mimeType": "image/png",
                    "buffer": (SAMPLES / "chelsea.png").read_bytes(),
                }
            ],
        )
        await page.click("#submit")
        await expect(page.locator("#result")).to_be_visible()
        overflow = await page.evaluate("document.documentElement.scrollWidth - innerWidth")
        assert overflow <= 0, (lang, overflow)
    assert page.problems == []
