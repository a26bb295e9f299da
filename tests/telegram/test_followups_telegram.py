"""Follow-ups of a review of the Telegram channel: a group upgraded to a supergroup, admins'
errors in their language, over-long captions refused before the download.

A real python-telegram-bot Application talks HTTP to ``FakeBotAPI`` on 127.0.0.1; nothing from PTB
is mocked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fakebotapi import FakeBotAPI, keyboard_counts
from sqlalchemy import select
from tgsupport import (
    ADMIN_ID,
    FAST_OUTBOX,
    MENTION,
    StartBot,
    basic_group,
    bot_message,
    joke_id_of,
    jokes_in,
    wait_until,
)

from bot.app import App
from bot.models import message as core_message
from bot.moderation import moderation_for
from bot.outbox import Outbox
from plugins.telegram_texts import text as tg_text

OLD_GROUP = -4_000_123  # a basic group: small negative id
SUPERGROUP = -1_009_000_000_123  # what Telegram upgrades it to
# PTB itself warns when it builds a RetryAfter from an int (its v22.2 deprecation).
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:telegram")


async def outbox_counts(app: App) -> dict[str, int]:
    return await Outbox(app.store, "telegram").counts()


async def vote(api: FakeBotAPI, user: dict[str, Any], shown: dict[str, Any], data: str) -> str:
    """Press a button; the text of the answer (a toast, or an alert's text)."""
    query_id = api.push_callback(user, shown, data)
    (answer,) = await api.wait_for(
        "answerCallbackQuery", lambda p: p.get("callback_query_id") == query_id
    )
    return answer.get("text") or ""


async def moves_recorded(app: App) -> bool:
    from bot.store import ChatMoveRow

    async with app.store.session() as s:
        return (await s.scalar(select(ChatMoveRow.new_chat))) is not None


# --------------------------------------------------------------------------- 1. supergroups


async def test_a_joke_for_a_group_that_became_a_supergroup_is_sent_there_and_votable(
    botapi: FakeBotAPI, start_bot: StartBot, chelsea_jpeg: bytes
) -> None:
    """Telegram answers a send into an upgraded group with 400 and ``migrate_to_chat_id``. The
    reply used to be dropped as undeliverable; it belongs in the supergroup."""
    app = await start_bot(telegram=FAST_OUTBOX)
    group, member = basic_group(botapi, OLD_GROUP), botapi.user(8101)
    botapi.push_message(group, member, photo=botapi.photo(chelsea_jpeg), **MENTION)
    botapi.migrate_chat(OLD_GROUP, SUPERGROUP)  # upgraded while the joke was being written
    (joke,) = await botapi.wait_for(
        "sendMessage", lambda p: int(p["chat_id"]) == SUPERGROUP, within=10
    )
    assert keyboard_counts(joke["reply_markup"]) == ("👍 0", "👎 0")
    # the supergroup's message ids are its own: the old group's message is not quoted
    assert not (joke.get("reply_parameters") or {}).get("message_id")
    await wait_until(lambda: _is(outbox_counts(app), {"delivered": 1}))
    assert jokes_in(botapi, OLD_GROUP) == []

    # and its buttons work from the supergroup
    joke_id = joke_id_of(joke)
    shown = bot_message(botapi, SUPERGROUP, joke_id)
    assert await vote(botapi, member, shown, f"v:{joke_id}:+1") == tg_text("vote_up", "en")
    assert await app.store.ratings_for(joke_id) == [("tg:8101", 1)]


async def test_pending_replies_follow_the_group_to_its_supergroup_in_order(
    botapi: FakeBotAPI, start_bot: StartBot, chelsea_jpeg: bytes, coffee_png: bytes
) -> None:
    """Replies kept in the outbox (the first send failed, the second waits behind it) are
    retried after the upgrade; once the move is known the next one goes straight there."""
    app = await start_bot(telegram=FAST_OUTBOX)
    group, member = basic_group(botapi, OLD_GROUP), botapi.user(8201)
    botapi.fail_chat(OLD_GROUP, status=502)
    botapi.push_message(group, member, photo=botapi.photo(chelsea_jpeg), **MENTION)
    await wait_until(lambda: _failed_with(botapi, 502))
    botapi.push_message(group, member, photo=botapi.photo(coffee_png), **MENTION)
    await wait_until(lambda: _is(outbox_counts(app), {"pending": 2}))
    botapi.migrate_chat(OLD_GROUP, SUPERGROUP)
    jokes = await botapi.wait_for(
        "sendMessage", lambda p: int(p["chat_id"]) == SUPERGROUP, count=2, within=15
    )
    first, second = (joke_id_of(j) for j in jokes)
    assert first < second  # still in order
    await wait_until(lambda: _is(outbox_counts(app), {"delivered": 2}))
    refused = [c for c in botapi.calls if c.method == "sendMessage" and c.status == 400]
    assert len(refused) == 1


async def test_a_plain_reply_into_an_upgraded_group_reaches_the_supergroup(
    botapi: FakeBotAPI, start_bot: StartBot
) -> None:
    await start_bot()
    group, member = basic_group(botapi, OLD_GROUP), botapi.user(8301)
    botapi.migrate_chat(OLD_GROUP, SUPERGROUP)
    botapi.push_message(group, member, text="/help")  # sent just before the upgrade
    (answer,) = await botapi.wait_for(
        "sendMessage", lambda p: int(p["chat_id"]) == SUPERGROUP, within=10
    )
    assert answer["text"] == tg_text("help", "en")
    assert not (answer.get("reply_parameters") or {}).get("message_id")


async def test_votes_on_the_old_groups_jokes_keep_working_from_the_supergroup(
    botapi: FakeBotAPI,
    start_bot: StartBot,
    chelsea_jpeg: bytes,
    store_url: str,
    tmp_path: Path,
) -> None:
    """After the upgrade, pressing a button of a joke told in the old group arrives from the
    supergroup: it used to be refused, the joke being stored with the old chat id. Telegram's
    service messages (``migrate_to_chat_id`` in the old chat, ``migrate_from_chat_id`` in the new
    one) are remembered in the database: every replica, and a restarted one, accepts the vote."""
    shared = {"store": {"url": store_url}, "data_dir": tmp_path / "shared"}
    app = await start_bot(**shared)
    group, member = basic_group(botapi, OLD_GROUP), botapi.user(8401)
    botapi.push_message(group, member, photo=botapi.photo(chelsea_jpeg), **MENTION)
    (joke,) = await botapi.wait_for("sendMessage", lambda p: "reply_markup" in p, within=10)
    joke_id = joke_id_of(joke)
    assert int(joke["chat_id"]) == OLD_GROUP

    supergroup = botapi.migrate_chat(OLD_GROUP, SUPERGROUP)
    botapi.push_message(group, member, migrate_to_chat_id=SUPERGROUP)
    botapi.push_message(supergroup, member, migrate_from_chat_id=OLD_GROUP)
    await wait_until(lambda: moves_recorded(app))

    shown = {**bot_message(botapi, OLD_GROUP, joke_id), "chat": supergroup}
    assert await vote(botapi, member, shown, f"v:{joke_id}:+1") == tg_text("vote_up", "en")
    # a chat that has nothing to do with the old group still cannot vote on its jokes
    elsewhere = {**shown, "chat": botapi.group_chat(-1_009_777_000_001, "Elsewhere")}
    assert await vote(botapi, member, elsewhere, f"v:{joke_id}:-1") == tg_text("bad_button", "en")
    assert await app.store.ratings_for(joke_id) == [("tg:8401", 1)]

    await app.close()  # a replica that never saw the service messages
    await start_bot(**shared)
    other = botapi.user(8402)
    assert await vote(botapi, other, shown, f"v:{joke_id}:-1") == tg_text("vote_down", "en")


async def _is(counts: Any, expected: dict[str, int]) -> bool:
    return await counts == expected


async def _failed_with(api: FakeBotAPI, status: int) -> bool:
    return any(c.method == "sendMessage" and c.status == status for c in api.calls)


# --------------------------------------------------------------------------- 2. admin errors


@pytest.mark.parametrize(
    ("command", "key", "params"),
    [
        ("/block @alice", "mod_not_an_id", {"value": "@alice"}),
        ("/block telegram:bot:1", "mod_bad_subject", {"value": "telegram:bot:1"}),
        ("/unblock 5555", "mod_in_settings", {"subject": "telegram:user:5555"}),
    ],
)
async def test_an_admins_moderation_error_is_in_the_admins_language(
    botapi: FakeBotAPI, start_bot: StartBot, command: str, key: str, params: dict[str, str]
) -> None:
    """``/block @username`` used to answer "未更改：not a Telegram id: @username" — an English
    sentence inside the Chinese template."""
    app = await start_bot(moderation={"block": ["telegram:user:5555"]})
    admin = botapi.user(ADMIN_ID, language_code="zh-hans")
    chat = botapi.private_chat(admin)
    _, cmd = botapi.push_message(chat, admin, text=command)
    (answer,) = await botapi.wait_for(
        "sendMessage",
        lambda p: (p.get("reply_parameters") or {}).get("message_id") == cmd["message_id"],
    )
    assert answer["text"] == tg_text("mod_error", "zh", error=tg_text(key, "zh", **params))
    assert tg_text(key, "zh", **params) != tg_text(key, "en", **params)
    assert [e.subject for e in await moderation_for(app).entries()] == ["telegram:user:5555"]


# --------------------------------------------------------------------------- 3. long captions


async def test_a_caption_over_the_hint_limit_is_refused_before_the_download(
    botapi: FakeBotAPI, start_bot: StartBot, chelsea_jpeg: bytes
) -> None:
    await start_bot(limits={"max_hint_chars": 20})
    user = botapi.user(8501, language_code="zh-CN")
    chat = botapi.private_chat(user)
    _, msg = botapi.push_message(
        chat,
        user,
        photo=botapi.photo(chelsea_jpeg),
        caption="一只非常非常非常非常非常非常非常非常长的猫",
    )
    (answer,) = await botapi.wait_for(
        "sendMessage",
        lambda p: (p.get("reply_parameters") or {}).get("message_id") == msg["message_id"],
    )
    assert answer["text"] == core_message("hint_too_long", "zh", limit=20)
    assert "reply_markup" not in answer
    assert not [c for c in botapi.calls if c.method in ("getFile", "download")]
    # a caption within the limit still gets its joke
    _, fine = botapi.push_message(chat, user, photo=botapi.photo(chelsea_jpeg), caption="猫")
    (joke,) = await botapi.wait_for(
        "sendMessage",
        lambda p: (p.get("reply_parameters") or {}).get("message_id") == fine["message_id"],
    )
    assert "reply_markup" in joke
