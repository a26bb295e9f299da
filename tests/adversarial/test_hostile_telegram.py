"""The table's rows marked ``telegram``, sent as a Telegram user would (document + caption) through
the real python-telegram-bot Application polling the fake Bot API on 127.0.0.1.

What this adds over the web run: the channel's own path (download through getFile, caption → hint,
the reply and its buttons) answers each hostile file with the same user message, in the user's
language, and keeps serving.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hostile_cases import CASES, Case, fmt_bytes
from relreport import Reliability
from sqlalchemy import select

pytest.importorskip("telegram")

from fakebotapi import FakeBotAPI
from tgsupport import STEP_TIMEOUT_S, make_settings

import plugins.telegram as telegram_plugin
from bot.app import App
from bot.engines.instant import InstantEngine
from bot.models import message
from bot.store import JokeRow

TELEGRAM_CASES = [c for c in CASES if c.telegram]


@pytest.fixture
async def tg_app(tmp_path: Path) -> AsyncIterator[tuple[FakeBotAPI, App]]:
    api = FakeBotAPI()
    await asyncio.wait_for(api.start(), STEP_TIMEOUT_S)
    settings = make_settings(tmp_path, api, limits={"per_user_per_minute": 0})
    app = await asyncio.wait_for(
        App.create(settings, engine=InstantEngine(), plugins=[telegram_plugin]), STEP_TIMEOUT_S
    )
    await asyncio.wait_for(app.start_channels(["telegram"]), STEP_TIMEOUT_S)
    try:
        yield api, app
    finally:
        await asyncio.wait_for(app.close(), STEP_TIMEOUT_S)
        await asyncio.wait_for(api.stop(), STEP_TIMEOUT_S)


async def ask(
    api: FakeBotAPI, user_id: int, data: bytes, name: str, mime: str, caption: str | None
) -> dict:
    user = api.user(user_id, language_code="en")
    chat = api.private_chat(user)
    content: dict = {"document": api.document(data, mime, name)}
    if caption is not None:
        content["caption"] = caption
    _, msg = api.push_message(chat, user, **content)
    (reply,) = await api.wait_for(
        "sendMessage",
        lambda p: (p.get("reply_parameters") or {}).get("message_id") == msg["message_id"],
        within=STEP_TIMEOUT_S,
    )
    return reply


@pytest.mark.parametrize("case", TELEGRAM_CASES, ids=[c.id for c in TELEGRAM_CASES])
async def test_hostile_file_over_telegram(
    case: Case, tg_app: tuple[FakeBotAPI, App], reliability: Reliability
) -> None:
    api, app = tg_app
    reliability.case(
        "hostile input (telegram)", case.id, case.kind, case.what,
        f"reply {case.key or 'joke + 👍/👎'}",
    )  # fmt: skip
    up = case.build()
    image = up.image
    assert image is not None and image.filename and image.content_type
    mime = image.content_type if image.content_type.startswith("image/") else "image/png"
    with reliability.measure(time_limit_s=case.time_limit_s):
        reply = await ask(api, 9100, image.data, image.filename, mime, up.hint)
    if case.key is not None:
        reliability.observe(f"reply {case.key}")
        assert reply["text"] == message(case.key, "en", **case.params)
        assert "reply_markup" not in reply
        async with app.store.session() as s:
            assert (await s.execute(select(JokeRow))).first() is None
    else:
        reliability.observe("reply joke + 👍/👎")
        assert reply["reply_markup"]["inline_keyboard"][0][0]["callback_data"].startswith("v:")
        async with app.store.session() as s:
            (row,) = (await s.execute(select(JokeRow))).scalars().all()
        assert row.hint == " ".join((up.hint or "").split())
        assert row.prompt == f"{app.settings.prompt}\n提示：{row.hint}"
    # the bot keeps serving the same user
    ok = await ask(api, 9100, fmt_bytes("PNG"), "ok.png", "image/png", None)
    assert "reply_markup" in ok
