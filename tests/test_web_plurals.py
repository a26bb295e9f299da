"""Counts with a noun on the web pages: English says "1 vote" / "2 votes", Chinese has no plural.

The stats chart printed ``f"{n} {texts['votes']}"``, so one vote read "1 votes" (and a version
without votes but one joke "1 jokes").
"""

from __future__ import annotations

import html
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import skimage

from bot.app import App
from bot.engines.instant import InstantEngine
from bot.models import JokeRequest
from bot.settings import Settings
from plugins.web import create_api
from plugins.web.texts import counted

PHOTO = (Path(skimage.__file__).parent / "data" / "chelsea.png").read_bytes()


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[App]:
    settings = Settings(_env_file=None, data_dir=tmp_path / "data")
    made = await App.create(settings, engine=InstantEngine(model="v1"))
    try:
        yield made
    finally:
        await made.close()


async def stats_text(app: App, lang: str) -> str:
    """The stats page in ``lang``, tags dropped and entities decoded: what a reader sees."""
    transport = httpx.ASGITransport(app=create_api(app))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        page = await client.get(f"/stats?lang={lang}")
    assert page.status_code == 200
    return html.unescape(re.sub(r"<[^>]+>", " ", page.text))


async def joke_with_votes(app: App, votes: int) -> None:
    joke = await app.service.tell(JokeRequest(image_bytes=PHOTO, channel="web", user_id="web:a"))
    for voter in range(votes):
        await app.service.rate(joke.id, f"web:v{voter}", 1, "web")


@pytest.mark.parametrize(
    ("votes", "lang", "expected", "wrong"),
    [
        (1, "en", "100% · 1 vote", "1 votes"),
        (2, "en", "100% · 2 votes", "2 vote "),
        (1, "zh", "100% · 1 票", "votes"),
        (2, "zh", "100% · 2 票", "votes"),
    ],
)
async def test_stats_page_counts_votes_in_the_page_language(
    app: App, votes: int, lang: str, expected: str, wrong: str
) -> None:
    await joke_with_votes(app, votes)
    text = await stats_text(app, lang)
    assert expected in text
    assert wrong not in text


@pytest.mark.parametrize(
    ("jokes", "lang", "expected", "wrong"),
    [
        (1, "en", "no votes yet · 1 joke", "1 jokes"),
        (2, "en", "no votes yet · 2 jokes", "2 joke "),
        (1, "zh", "还没有投票 · 1 个梗", "jokes"),
        (2, "zh", "还没有投票 · 2 个梗", "jokes"),
    ],
)
async def test_stats_page_counts_unrated_jokes_in_the_page_language(
    app: App, jokes: int, lang: str, expected: str, wrong: str
) -> None:
    for _ in range(jokes):
        await joke_with_votes(app, 0)
    text = await stats_text(app, lang)
    assert expected in text
    assert wrong not in text


@pytest.mark.parametrize(
    ("n", "en", "zh"),
    [
        (0, "0 votes", "0 票"),
        (1, "1 vote", "1 票"),
        (2, "2 votes", "2 票"),
        (11, "11 votes", "11 票"),
    ],
)
def test_counted(n: int, en: str, zh: str) -> None:
    assert counted("votes", n, "en") == en
    assert counted("votes", n, "zh") == zh
