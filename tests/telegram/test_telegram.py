"""The Telegram channel end to end: a real PTB Application against the fake Bot API.

Nothing from python-telegram-bot is mocked: every scenario goes through PTB's HTTP layer, its
updater (long polling) or the webhook route, its rate limiter and its handlers, to a fake Bot API
on 127.0.0.1 that records what the bot sent.
"""

from __future__ import annotations

import asyncio
import logging
import tomllib
import traceback
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from fakebotapi import BOT_ID, BOT_USERNAME, TOKEN, FakeBotAPI, keyboard_counts
from tgsupport import ADMIN_ID, StartBot, free_port, make_settings
from typer.testing import CliRunner

import plugins.telegram as tg
from bot import images
from bot.app import App
from bot.engines.instant import InstantEngine
from bot.models import ImageRejected
from bot.models import message as core_message
from plugins.telegram_texts import text as tg_text

GROUP = -1001234567890
HANDLE = f"@{BOT_USERNAME}"


def with_mention(before: str = "", after: str = " 猫") -> dict[str, Any]:
    """Caption kwargs that mention the bot (ASCII before the mention keeps offsets simple)."""
    return {
        "caption": f"{before}{HANDLE}{after}",
        "caption_entities": [{"type": "mention", "offset": len(before), "length": len(HANDLE)}],
    }


def replies_to(msg: dict[str, Any]):
    return lambda p: (p.get("reply_parameters") or {}).get("message_id") == msg["message_id"]


def bot_reply(api: FakeBotAPI, msg: dict[str, Any]) -> dict[str, Any]:
    """The message the bot sent in reply to ``msg``, as Telegram stores it."""
    for (chat_id, _), sent in api.messages.items():
        if (
            chat_id == msg["chat"]["id"]
            and sent["from"]["id"] == BOT_ID
            and sent.get("reply_to_message", {}).get("message_id") == msg["message_id"]
        ):
            return dict(sent)
    raise AssertionError(f"no reply to message {msg['message_id']}")


def joke_id_of(reply: dict[str, Any]) -> int:
    vote = tg.parse_vote(reply["reply_markup"]["inline_keyboard"][0][0]["callback_data"])
    assert vote is not None
    return vote[0]


async def settle(api: FakeBotAPI, update: dict[str, Any], extra_s: float = 0.4) -> None:
    """Let the bot fetch ``update`` and finish whatever it would do with it."""
    await api.wait_consumed(update["update_id"])
    await asyncio.sleep(extra_s)


async def ask_joke(api: FakeBotAPI, chat, user, **content) -> tuple[dict[str, Any], dict]:
    """Send a message, wait for the bot's reply; ``(message, reply params)``."""
    _, msg = api.push_message(chat, user, **content)
    (reply,) = await api.wait_for("sendMessage", replies_to(msg))
    return msg, reply


# --------------------------------------------------------------------------- private chats


async def test_photo_gets_joke_reply_with_keyboard(
    botapi: FakeBotAPI, start_bot: StartBot, chelsea_jpeg: bytes
) -> None:
    app = await start_bot()
    user = botapi.user(1001)
    chat = botapi.private_chat(user)
    msg, reply = await ask_joke(botapi, chat, user, photo=botapi.photo(chelsea_jpeg))

    assert reply["chat_id"] == chat["id"]
    assert reply["reply_parameters"]["allow_sending_without_reply"] is True
    assert keyboard_counts(reply["reply_markup"]) == ("👍 0", "👎 0")
    buttons = reply["reply_markup"]["inline_keyboard"][0]
    joke_id = joke_id_of(reply)
    assert buttons[0]["callback_data"] == f"v:{joke_id}:+1"
    assert buttons[1]["callback_data"] == f"v:{joke_id}:-1"

    joke = await app.service.get_joke(joke_id)
    assert reply["text"] == joke.text
    assert joke.channel == "telegram"
    assert (joke.user_id, joke.chat_id) == ("tg:1001", "tg:1001")

    # "typing…" came before the answer, and the full-size photo (not the thumbnail) was fetched
    calls = [c.method for c in botapi.calls_to(chat["id"])]
    assert calls.index("sendChatAction") < calls.index("sendMessage")
    assert botapi.sent("sendChatAction")[0]["action"] == "typing"
    (got,) = botapi.sent("getFile")
    assert got["file_id"] == msg["photo"][-1]["file_id"]
    assert len(botapi.sent("download")) == 1
    # polling start-up: webhook removed without dropping what Telegram holds; commands published
    (deleted,) = botapi.sent("deleteWebhook")
    assert not deleted.get("drop_pending_updates")
    assert set(botapi.commands) == {None, "zh"}
    assert [c["command"] for c in botapi.commands[None]] == ["joke", "help", "privacy"]


async def test_image_document_gets_joke_and_caption_is_the_hint(
    botapi: FakeBotAPI, start_bot: StartBot, coffee_png: bytes
) -> None:
    app = await start_bot()
    user = botapi.user(1002)
    chat = botapi.private_chat(user)
    doc = botapi.document(coffee_png, "image/png", "coffee.png")
    _, reply = await ask_joke(botapi, chat, user, document=doc, caption="咖啡因")
    joke = await app.service.get_joke(joke_id_of(reply))
    assert joke.prompt.endswith("提示：咖啡因")
    assert keyboard_counts(reply["reply_markup"]) == ("👍 0", "👎 0")


async def test_static_sticker_gets_joke(
    botapi: FakeBotAPI, start_bot: StartBot, sticker_webp: bytes
) -> None:
    app = await start_bot()
    user = botapi.user(1003)
    chat = botapi.private_chat(user)
    _, reply = await ask_joke(botapi, chat, user, sticker=botapi.sticker(sticker_webp))
    joke = await app.service.get_joke(joke_id_of(reply))
    assert joke.text == reply["text"]
    assert await app.store.request_outcomes() == {"ok": 1}


async def test_typing_is_renewed_while_a_slow_joke_is_written(
    botapi: FakeBotAPI,
    start_bot: StartBot,
    chelsea_jpeg: bytes,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tg, "TYPING_EVERY_S", 0.1)
    await start_bot(engine=InstantEngine(delay_s=0.45))
    user = botapi.user(1006)
    chat = botapi.private_chat(user)
    await ask_joke(botapi, chat, user, photo=botapi.photo(chelsea_jpeg))
    assert len([c for c in botapi.calls_to(chat["id"]) if c.method == "sendChatAction"]) >= 3
    # in a group, one "typing…" is enough (the group's flood budget is small)
    group = botapi.group_chat(GROUP)
    await ask_joke(botapi, group, user, photo=botapi.photo(chelsea_jpeg), **with_mention())
    assert [c.method for c in botapi.calls_to(GROUP)].count("sendChatAction") == 1


async def test_animated_media_get_a_polite_send_me_a_picture(
    botapi: FakeBotAPI, start_bot: StartBot
) -> None:
    app = await start_bot()
    user = botapi.user(1004)
    chat = botapi.private_chat(user)
    contents = [
        {"sticker": botapi.sticker(b"tgs", animated=True)},
        {"sticker": botapi.sticker(b"webm", video=True)},
        {"video": botapi.media("video")},
        {"voice": botapi.media("voice")},
        {"video_note": botapi.media("video_note")},
        {"animation": botapi.media("animation"), "document": botapi.media("animation")},
        {"document": botapi.document(b"%PDF-1.4", "application/pdf", "paper.pdf")},
        {"text": "hello?"},
    ]
    msgs = [botapi.push_message(chat, user, **c)[1] for c in contents]
    for msg in msgs:
        (reply,) = await botapi.wait_for("sendMessage", replies_to(msg))
        assert reply["text"] == tg_text("send_picture", "en")
        assert "reply_markup" not in reply
    assert botapi.sent("getFile") == []  # nothing was downloaded
    assert await app.store.request_outcomes() == {}


async def test_text_reply_to_a_picture_in_private_uses_the_text_as_hint(
    botapi: FakeBotAPI, start_bot: StartBot, chelsea_jpeg: bytes
) -> None:
    app = await start_bot()
    user = botapi.user(1005)
    chat = botapi.private_chat(user)
    photo_msg = botapi.message(chat, user, photo=botapi.photo(chelsea_jpeg))
    _, reply = await ask_joke(botapi, chat, user, text="月曜日", reply_to=photo_msg)
    joke = await app.service.get_joke(joke_id_of(reply))
    assert joke.prompt.endswith("提示：月曜日")


# --------------------------------------------------------------------------- groups


async def test_group_stays_silent_unless_asked(
    botapi: FakeBotAPI, start_bot: StartBot, chelsea_jpeg: bytes
) -> None:
    app = await start_bot()
    group = botapi.group_chat(GROUP)
    alice, bob = botapi.user(2001, "Alice"), botapi.user(2002, "Bob")
    other_bot_cmd = "/joke@some_other_bot"
    noise = [
        {"photo": botapi.photo(chelsea_jpeg)},
        {"photo": botapi.photo(chelsea_jpeg), "caption": "look at this cat"},
        {
            "photo": botapi.photo(chelsea_jpeg),
            "caption": "@bob_the_human lol",
            "caption_entities": [{"type": "mention", "offset": 0, "length": 14}],
        },
        {
            "photo": botapi.photo(chelsea_jpeg),
            "caption": other_bot_cmd,
            "caption_entities": [
                {"type": "bot_command", "offset": 0, "length": len(other_bot_cmd)}
            ],
        },
        {"text": "hahaha"},
        {"video": botapi.media("video")},
        {"sticker": botapi.sticker(b"tgs", animated=True)},
    ]
    last = None
    for content in noise:
        last, photo_msg = botapi.push_message(group, alice, **content)
    # a reply to a picture that is not addressed to us, and a command for another bot
    botapi.push_message(group, bob, text="so cute", reply_to=photo_msg)
    last, _ = botapi.push_message(group, bob, text=other_bot_cmd, reply_to=photo_msg)
    assert last is not None
    await settle(botapi, last)
    assert botapi.calls_to(GROUP) == []
    assert botapi.sent("getFile") == []
    assert await app.store.request_outcomes() == {}


async def test_group_answers_mention_joke_command_and_replies_to_the_bot(
    botapi: FakeBotAPI, start_bot: StartBot, chelsea_jpeg: bytes, coffee_png: bytes
) -> None:
    app = await start_bot()
    group = botapi.group_chat(GROUP)
    alice, bob = botapi.user(2001, "Alice"), botapi.user(2002, "Bob")

    # 1. a mention in the caption: joke, with the rest of the caption as hint
    msg, reply = await ask_joke(
        botapi, group, alice, photo=botapi.photo(chelsea_jpeg), **with_mention("hey ")
    )
    joke = await app.service.get_joke(joke_id_of(reply))
    assert joke.prompt.endswith("提示：hey 猫")
    assert joke.chat_id == f"tg:{GROUP}" and joke.user_id == "tg:2001"

    # 2. /joke in reply to someone's picture: the joke answers the asker
    photo_msg = botapi.message(group, alice, photo=botapi.photo(coffee_png))
    _, reply2 = await ask_joke(botapi, group, bob, text="/joke", reply_to=photo_msg)
    assert (await app.service.get_joke(joke_id_of(reply2))).user_id == "tg:2002"

    # 3. /joke@this_bot and a plain mention in reply to a picture work too
    await ask_joke(botapi, group, bob, text=f"/joke@{BOT_USERNAME}", reply_to=photo_msg)
    await ask_joke(
        botapi,
        group,
        bob,
        text=f"{HANDLE} again",
        entities=[{"type": "mention", "offset": 0, "length": len(HANDLE)}],
        reply_to=photo_msg,
    )

    # 4. a picture sent in reply to the bot's joke
    joke_msg = bot_reply(botapi, msg)
    await ask_joke(botapi, group, alice, photo=botapi.photo(chelsea_jpeg), reply_to=joke_msg)

    # 5. /joke as a picture's caption
    await ask_joke(
        botapi,
        group,
        alice,
        photo=botapi.photo(coffee_png),
        caption="/joke",
        caption_entities=[{"type": "bot_command", "offset": 0, "length": 5}],
    )

    # 6. /joke with nothing to look at: a hint, not a joke; a mention on a video: no joke either
    _, hint = await ask_joke(botapi, group, bob, text="/joke")
    assert hint["text"] == tg_text("group_usage", "en")
    _, hint = await ask_joke(botapi, group, bob, video=botapi.media("video"), **with_mention())
    assert hint["text"] == tg_text("send_picture", "en")
    assert await app.store.request_outcomes() == {"ok": 6}


# --------------------------------------------------------------------------- votes


async def press(
    api: FakeBotAPI, user: dict[str, Any], message: dict[str, Any] | None, data: str
) -> dict[str, Any]:
    query_id = api.push_callback(user, message, data)
    (answer,) = await api.wait_for(
        "answerCallbackQuery", lambda p: p["callback_query_id"] == query_id
    )
    return answer


async def joke_in_group(
    botapi: FakeBotAPI, user: dict[str, Any], jpeg: bytes
) -> tuple[int, dict[str, Any]]:
    """A photo in the group, mentioning the bot: the joke's id and the bot's joke message."""
    msg, reply = await ask_joke(
        botapi, botapi.group_chat(GROUP), user, photo=botapi.photo(jpeg), **with_mention()
    )
    return joke_id_of(reply), bot_reply(botapi, msg)


async def test_vote_change_vote_and_counts_update_in_place(
    botapi: FakeBotAPI, start_bot: StartBot, chelsea_jpeg: bytes
) -> None:
    app = await start_bot()
    alice, bob = botapi.user(3001, "Alice"), botapi.user(3002, "Bob")
    joke_id, joke_msg = await joke_in_group(botapi, alice, chelsea_jpeg)
    up, down = f"v:{joke_id}:+1", f"v:{joke_id}:-1"

    def counts(*labels: str):
        return lambda p: (
            p["message_id"] == joke_msg["message_id"]
            and keyboard_counts(p["reply_markup"]) == labels
        )

    answer = await press(botapi, alice, joke_msg, up)
    assert answer["text"] == tg_text("vote_up", "en") and not answer.get("show_alert")
    await botapi.wait_for("editMessageReplyMarkup", counts("👍 1", "👎 0"))

    answer = await press(botapi, alice, joke_msg, down)  # a second press changes the vote
    assert answer["text"] == tg_text("vote_changed_down", "en")
    await botapi.wait_for("editMessageReplyMarkup", counts("👍 0", "👎 1"))

    answer = await press(botapi, alice, joke_msg, down)  # same again: nothing changes
    assert answer["text"] == tg_text("vote_same", "en")

    await press(botapi, bob, joke_msg, up)
    await botapi.wait_for("editMessageReplyMarkup", counts("👍 1", "👎 1"))

    assert await app.store.ratings_for(joke_id) == [("tg:3001", -1), ("tg:3002", 1)]
    # every query was answered exactly once (a second answer would have been a 400)
    assert all(c.status == 200 for c in botapi.calls if c.method == "answerCallbackQuery")
    assert botapi.messages[(GROUP, joke_msg["message_id"])]["reply_markup"] == (
        tg.vote_keyboard(joke_id, 1, 1).to_dict()
    )


async def test_many_concurrent_votes_are_all_kept(
    botapi: FakeBotAPI, start_bot: StartBot, chelsea_jpeg: bytes
) -> None:
    app = await start_bot()
    joke_id, joke_msg = await joke_in_group(botapi, botapi.user(3100), chelsea_jpeg)
    voters = [botapi.user(3200 + i) for i in range(30)]
    ids = [
        botapi.push_callback(v, joke_msg, f"v:{joke_id}:{'+1' if i % 3 else '-1'}")
        for i, v in enumerate(voters)
    ]
    answers = await botapi.wait_for("answerCallbackQuery", count=len(ids), within=15)
    assert {a["callback_query_id"] for a in answers} == set(ids)
    await botapi.wait_for(
        "editMessageReplyMarkup",
        lambda p: keyboard_counts(p["reply_markup"]) == ("👍 20", "👎 10"),
        within=15,
    )
    assert len(await app.store.ratings_for(joke_id)) == 30
    # concurrent presses on one message coalesce into fewer edits
    assert len(botapi.sent("editMessageReplyMarkup")) < 30


async def test_near_simultaneous_up_and_down_end_consistent(
    botapi: FakeBotAPI, start_bot: StartBot, chelsea_jpeg: bytes
) -> None:
    """👍 and 👎 pressed at once by the same people: one vote each, and the counts shown match."""
    app = await start_bot()
    joke_id, joke_msg = await joke_in_group(botapi, botapi.user(3300), chelsea_jpeg)
    voters = [botapi.user(3400 + i) for i in range(8)]
    ids = []
    for v in voters:  # both buttons, no wait in between: the updates race in the bot
        ids.append(botapi.push_callback(v, joke_msg, f"v:{joke_id}:+1"))
        ids.append(botapi.push_callback(v, joke_msg, f"v:{joke_id}:-1"))
    answers = await botapi.wait_for("answerCallbackQuery", count=len(ids), within=15)
    assert sorted(a["callback_query_id"] for a in answers) == sorted(ids)  # each answered once
    ratings = await app.store.ratings_for(joke_id)
    assert sorted(u for u, _ in ratings) == sorted(f"tg:{v['id']}" for v in voters)
    up = sum(1 for _, vote in ratings if vote == 1)
    # the last edit of the message shows what the store holds, whichever press won each race
    await botapi.wait_for(
        "editMessageReplyMarkup",
        lambda p: keyboard_counts(p["reply_markup"]) == (f"👍 {up}", f"👎 {len(voters) - up}"),
        within=15,
    )
    await asyncio.sleep(0.5)  # no later edit may overwrite it with stale counts
    assert botapi.messages[(GROUP, joke_msg["message_id"])]["reply_markup"] == (
        tg.vote_keyboard(joke_id, up, len(voters) - up).to_dict()
    )


async def test_forged_and_stale_callbacks_are_refused_with_an_alert(
    botapi: FakeBotAPI, start_bot: StartBot, chelsea_jpeg: bytes
) -> None:
    app = await start_bot()
    alice, mallory = botapi.user(4001, "Alice"), botapi.user(4002, "Mallory")
    alice_chat, mallory_chat = botapi.private_chat(alice), botapi.private_chat(mallory)
    msg, reply = await ask_joke(botapi, alice_chat, alice, photo=botapi.photo(chelsea_jpeg))
    joke_id = joke_id_of(reply)
    joke_msg = bot_reply(botapi, msg)
    # Mallory's own joke message, in her chat, is where she tampers with the callback data.
    m_msg, m_reply = await ask_joke(botapi, mallory_chat, mallory, photo=botapi.photo(chelsea_jpeg))
    m_joke_msg = bot_reply(botapi, m_msg)

    forged = [
        (mallory, m_joke_msg, "garbage"),
        (mallory, m_joke_msg, ""),
        (mallory, m_joke_msg, f"v:{joke_id}:+2"),
        (mallory, m_joke_msg, f"v:{joke_id}:1"),
        (mallory, m_joke_msg, "v:0:+1"),
        (mallory, m_joke_msg, "v:abc:+1"),
        (mallory, m_joke_msg, "v:99999999:+1"),  # well-formed, but no such joke (stale)
        (mallory, m_joke_msg, f"v:{joke_id}:-1"),  # Alice's joke, pressed from Mallory's chat
        (mallory, None, f"v:{joke_id}:-1"),  # no message at all (inline)
        (mallory, m_joke_msg, "v:" + "9" * 80 + ":+1"),
    ]
    for user, message, data in forged:
        answer = await press(botapi, user, message, data)
        assert answer.get("show_alert") is True, data
        assert answer["text"] == tg_text("bad_button", "en")
    assert await app.store.ratings_for(joke_id) == []
    assert botapi.sent("editMessageReplyMarkup") == []

    # the bot is still fine, and the real buttons still work
    await press(botapi, alice, joke_msg, f"v:{joke_id}:+1")
    assert await app.store.ratings_for(joke_id) == [("tg:4001", 1)]
    m_joke_id = joke_id_of(m_reply)
    await press(botapi, mallory, m_joke_msg, f"v:{m_joke_id}:-1")
    assert await app.store.ratings_for(m_joke_id) == [("tg:4002", -1)]
    assert all(c.status == 200 for c in botapi.calls if c.method == "answerCallbackQuery")


# --------------------------------------------------------------------------- rejections


async def test_bad_image_gets_a_friendly_reply(botapi: FakeBotAPI, start_bot: StartBot) -> None:
    app = await start_bot()
    user = botapi.user(5001)
    chat = botapi.private_chat(user)
    junk = b"this is not a png at all, just text pretending"
    doc = botapi.document(junk, "image/png", "fake.png")
    _, reply = await ask_joke(botapi, chat, user, document=doc)
    with pytest.raises(ImageRejected) as rejected:
        images.load(junk, app.settings.images, filename="fake.png", content_type="image/png")
    assert reply["text"] == rejected.value.user_message("en")
    assert "reply_markup" not in reply
    assert await app.store.request_outcomes() == {"image_rejected": 1}


async def test_too_large_file_is_refused_before_download(
    botapi: FakeBotAPI, start_bot: StartBot
) -> None:
    await start_bot()
    user = botapi.user(5002)
    chat = botapi.private_chat(user)
    doc = botapi.document(b"x", "image/jpeg", "huge.jpg", size=30 * 1024 * 1024)
    _, reply = await ask_joke(botapi, chat, user, document=doc)
    assert reply["text"] == core_message("too_large", "en", limit_mb=20)
    assert botapi.sent("getFile") == []


async def test_engine_down_gets_a_friendly_reply(
    botapi: FakeBotAPI, start_bot: StartBot, chelsea_jpeg: bytes
) -> None:
    app = await start_bot(engine=InstantEngine(fail=True))
    en, zh = botapi.user(5101, language_code="en"), botapi.user(5102, language_code="zh-hans")
    _, reply = await ask_joke(botapi, botapi.private_chat(en), en, photo=botapi.photo(chelsea_jpeg))
    assert reply["text"] == core_message("engine_error", "en")
    assert "reply_markup" not in reply
    _, reply = await ask_joke(botapi, botapi.private_chat(zh), zh, photo=botapi.photo(chelsea_jpeg))
    assert reply["text"] == core_message("engine_error", "zh")
    assert await app.store.request_outcomes() == {"engine_error": 2}


async def test_rate_limited_user_gets_a_friendly_reply(
    botapi: FakeBotAPI, start_bot: StartBot, chelsea_jpeg: bytes
) -> None:
    await start_bot(limits={"per_user_per_minute": 1})
    user = botapi.user(5201)
    chat = botapi.private_chat(user)
    _, first = await ask_joke(botapi, chat, user, photo=botapi.photo(chelsea_jpeg))
    assert "reply_markup" in first
    _, second = await ask_joke(botapi, chat, user, photo=botapi.photo(chelsea_jpeg))
    assert second["text"].startswith("Slow down") and "reply_markup" not in second


@pytest.mark.filterwarnings("ignore::DeprecationWarning:telegram")
async def test_retry_after_is_honoured(
    botapi: FakeBotAPI, start_bot: StartBot, chelsea_jpeg: bytes
) -> None:
    await start_bot()
    botapi.fail("sendMessage", retry_after=1)
    user = botapi.user(5301)
    chat = botapi.private_chat(user)
    _, reply = await ask_joke(botapi, chat, user, photo=botapi.photo(chelsea_jpeg))
    tries = [c for c in botapi.calls if c.method == "sendMessage"]
    assert [c.status for c in tries] == [429, 200]
    assert tries[1].at - tries[0].at >= 1.0  # waited as told, then delivered the same joke
    assert tries[1].params["text"] == tries[0].params["text"] == reply["text"]
    # and the bot keeps working afterwards
    await ask_joke(botapi, chat, user, text="/help")


# --------------------------------------------------------------------------- commands


async def test_help_privacy_languages_and_admin_stats(
    botapi: FakeBotAPI, start_bot: StartBot, chelsea_jpeg: bytes
) -> None:
    await start_bot()
    en, zh = botapi.user(6001, language_code="en-GB"), botapi.user(6002, language_code="zh-hans")
    admin = botapi.user(ADMIN_ID, language_code="en")
    en_chat, zh_chat = botapi.private_chat(en), botapi.private_chat(zh)
    admin_chat = botapi.private_chat(admin)

    _, reply = await ask_joke(botapi, en_chat, en, text="/start")
    assert reply["text"] == tg_text("help", "en")
    _, reply = await ask_joke(botapi, zh_chat, zh, text="/help")
    assert reply["text"] == tg_text("help", "zh")
    _, reply = await ask_joke(botapi, en_chat, en, text="/privacy")
    assert reply["text"] == tg_text("privacy", "en")
    _, reply = await ask_joke(botapi, zh_chat, zh, text="/whatever")  # unknown: help
    assert reply["text"] == tg_text("help", "zh")

    _, reply = await ask_joke(botapi, en_chat, en, text="/stats")
    assert reply["text"] == tg_text("admin_only", "en")
    _, reply = await ask_joke(botapi, admin_chat, admin, text="/stats")
    assert reply["text"] == tg_text("stats_empty", "en")

    msg, joke_reply = await ask_joke(botapi, en_chat, en, photo=botapi.photo(chelsea_jpeg))
    await press(botapi, en, bot_reply(botapi, msg), f"v:{joke_id_of(joke_reply)}:+1")
    _, reply = await ask_joke(botapi, admin_chat, admin, text="/stats")
    assert reply["text"].splitlines() == [
        tg_text("stats_header", "en"),
        "instant-0: 1 joke · 1 👍 · 0 👎 · 100%",
    ]


async def test_language_setting_overrides_the_users_language(
    botapi: FakeBotAPI, start_bot: StartBot
) -> None:
    await start_bot(telegram={"language": "zh"})
    user = botapi.user(6101, language_code="en")
    _, reply = await ask_joke(botapi, botapi.private_chat(user), user, text="/help")
    assert reply["text"] == tg_text("help", "zh")


# --------------------------------------------------------------------------- webhook mode


WEBHOOK_BASE = "https://bot.example.test"


async def test_webhook_rejects_wrong_secret_and_serves_right_one(
    botapi: FakeBotAPI, start_bot: StartBot, chelsea_jpeg: bytes
) -> None:
    port = free_port()
    app = await start_bot(
        telegram={"mode": "webhook", "webhook_url": WEBHOOK_BASE},
        web={"host": "127.0.0.1", "port": port},
    )
    (hook,) = botapi.sent("setWebhook")
    assert hook["url"] == f"{WEBHOOK_BASE}/telegram/webhook"
    assert hook["secret_token"] == tg.webhook_secret(app.settings)
    assert sorted(hook["allowed_updates"]) == ["callback_query", "message"]
    assert not hook.get("drop_pending_updates")

    local = f"http://127.0.0.1:{port}/telegram/webhook"
    user = botapi.user(7001)
    chat = botapi.private_chat(user)
    msg = botapi.message(chat, user, photo=botapi.photo(chelsea_jpeg))
    update = botapi.update(message=msg)
    assert await botapi.post_webhook(local, update, secret="wrong") == 403
    assert await botapi.post_webhook(local, update, secret=None) == 403
    assert await botapi.post_webhook(local, {"update_id": "x"}, hook["secret_token"]) == 400
    await asyncio.sleep(0.3)
    assert botapi.calls_to(chat["id"]) == []  # nothing was processed

    assert await botapi.post_webhook(local, update, secret=hook["secret_token"]) == 200
    (reply,) = await botapi.wait_for("sendMessage", replies_to(msg))
    assert keyboard_counts(reply["reply_markup"]) == ("👍 0", "👎 0")

    # votes come in through the webhook too
    vote = botapi.callback_update(user, bot_reply(botapi, msg), f"v:{joke_id_of(reply)}:+1")
    assert await botapi.post_webhook(local, vote, secret=hook["secret_token"]) == 200
    await botapi.wait_for("editMessageReplyMarkup")
    assert botapi.sent("getUpdates") == [] and botapi.sent("deleteWebhook") == []

    await app.close()  # stopping a replica never deletes the webhook the others rely on
    assert botapi.webhook["url"] == f"{WEBHOOK_BASE}/telegram/webhook"
    assert botapi.sent("deleteWebhook") == []


async def test_webhook_through_the_web_channel_routes_and_replicas(
    botapi: FakeBotAPI, start_bot: StartBot, chelsea_jpeg: bytes, tmp_path: Path
) -> None:
    from fastapi import APIRouter, FastAPI

    overrides: dict[str, Any] = {
        "telegram": {
            "mode": "webhook",
            "webhook_url": f"{WEBHOOK_BASE}/tg/hook",
            "webhook_path": "/tg/hook",
            "webhook_secret": "s3cret-Value_1",
        },
        "channels": ["web", "telegram"],  # the web channel serves the route: no own server
    }
    settings = make_settings(tmp_path / "replica", botapi, **overrides)
    app = await App.create(settings, engine=InstantEngine(), plugins=[tg])
    try:
        router = APIRouter()
        app.pm.hook.oogiri_web_routes(router=router, app=app)  # what plugins/web.py calls
        api = FastAPI()
        api.include_router(router)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://web")
        user = botapi.user(7101)
        chat = botapi.private_chat(user)
        msg = botapi.message(chat, user, photo=botapi.photo(chelsea_jpeg))
        update = botapi.update(message=msg)
        headers = {tg.SECRET_HEADER: "s3cret-Value_1"}
        async with client:
            # before the channel runs, Telegram is told to come back later (nothing lost)
            assert (await client.post("/tg/hook", json=update, headers=headers)).status_code == 503
            await asyncio.wait_for(app.start_channels(["telegram"]), 15)
            assert len(botapi.sent("setWebhook")) == 1
            bad = {tg.SECRET_HEADER: "s3cret-Value_2"}
            assert (await client.post("/tg/hook", json=update, headers=bad)).status_code == 403
            assert (await client.post("/tg/hook", json=update, headers=headers)).status_code == 200
            await botapi.wait_for("sendMessage", replies_to(msg))

        # a second replica with the same settings finds the webhook set and leaves it alone
        replica = await start_bot(only=["telegram"], **overrides)
        assert isinstance(replica.state.get(tg.STATE_KEY), tg.TelegramChannel)
        assert len(botapi.sent("setWebhook")) == 1
        assert len(botapi.sent("getWebhookInfo")) == 2
    finally:
        await asyncio.wait_for(app.close(), 15)


async def test_webhook_served_by_the_real_web_channel(
    botapi: FakeBotAPI, tmp_path: Path, chelsea_jpeg: bytes
) -> None:
    web = pytest.importorskip("plugins.web")
    port = free_port()
    settings = make_settings(
        tmp_path,
        botapi,
        channels=["web", "telegram"],
        telegram={"mode": "webhook", "webhook_url": WEBHOOK_BASE},
        web={"host": "127.0.0.1", "port": port},
    )
    app = await App.create(settings, engine=InstantEngine(), plugins=[web, tg])
    try:
        await asyncio.wait_for(app.start_channels(), 15)
        (hook,) = botapi.sent("setWebhook")
        local = f"http://127.0.0.1:{port}/telegram/webhook"
        user = botapi.user(7201)
        msg = botapi.message(botapi.private_chat(user), user, photo=botapi.photo(chelsea_jpeg))
        update = botapi.update(message=msg)
        assert await botapi.post_webhook(local, update, secret="nope") == 403
        assert await botapi.post_webhook(local, update, secret=hook["secret_token"]) == 200
        await botapi.wait_for("sendMessage", replies_to(msg))
    finally:
        await asyncio.wait_for(app.close(), 15)


async def test_webhook_is_reset_when_telegram_saw_403(
    botapi: FakeBotAPI, start_bot: StartBot
) -> None:
    """A changed secret: Telegram's deliveries got 403, so a starting replica sets it again."""
    botapi.webhook = {
        "url": f"{WEBHOOK_BASE}/telegram/webhook",
        "secret_token": "old-secret",
        "allowed_updates": ["message", "callback_query"],
        "last_error_message": "Wrong response from the webhook: 403 Forbidden",
    }
    app = await start_bot(
        telegram={"mode": "webhook", "webhook_url": WEBHOOK_BASE},
        web={"host": "127.0.0.1", "port": free_port()},
    )
    (hook,) = botapi.sent("setWebhook")
    assert hook["secret_token"] == tg.webhook_secret(app.settings) != "old-secret"


# --------------------------------------------------------------------------- hygiene


async def test_token_never_reaches_the_logs(
    botapi: FakeBotAPI,
    start_bot: StartBot,
    chelsea_jpeg: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    app = await start_bot()
    user = botapi.user(8001)
    msg, reply = await ask_joke(
        botapi, botapi.private_chat(user), user, photo=botapi.photo(chelsea_jpeg)
    )
    await press(botapi, user, bot_reply(botapi, msg), f"v:{joke_id_of(reply)}:+1")
    await app.close()
    logged = caplog.text
    assert "getUpdates" in logged or "Application" in logged  # PTB did log, at DEBUG even
    secret_part = TOKEN.split(":", 1)[1]
    assert TOKEN not in logged and secret_part not in logged
    assert logging.getLogger("httpx").getEffectiveLevel() >= logging.WARNING


async def test_rejected_token_is_not_echoed(
    botapi: FakeBotAPI, start_bot: StartBot, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "987654321:AAWrongTokenWrongTokenWrongToken_xyz123"
    with pytest.raises(RuntimeError, match="rejected the bot token") as info:
        await start_bot(telegram={"token": wrong})
    shown = "".join(traceback.format_exception(info.value))
    assert wrong not in shown and wrong.split(":")[1] not in caplog.text


def test_callback_data_and_helpers() -> None:
    assert tg.vote_data(12, 1) == "v:12:+1" and tg.vote_data(12, -1) == "v:12:-1"
    assert tg.parse_vote("v:12:+1") == (12, 1) and tg.parse_vote("v:12:-1") == (12, -1)
    for bad in (None, "", "v:12", "v:12:+1:x", "v:-3:+1", "v:012:+1", "v:1:0", "x:1:+1"):
        assert tg.parse_vote(bad) is None, bad
    assert len(tg.vote_data(10**18 - 1, -1).encode()) <= 64

    assert tg.clean_hint(f"/joke@{BOT_USERNAME} 猫 {HANDLE}", BOT_USERNAME) == "猫"
    assert tg.clean_hint(f"{HANDLE}", BOT_USERNAME) is None
    assert tg.clean_hint("/jokes are fun", BOT_USERNAME) == "/jokes are fun"


def test_settings_helpers(tmp_path: Path) -> None:
    from bot.settings import Settings

    s = Settings(_env_file=None, data_dir=tmp_path, telegram={"token": TOKEN})
    secret = tg.webhook_secret(s)
    assert secret == tg.webhook_secret(s) and TOKEN not in secret
    assert tg.SECRET_RE.fullmatch(secret)
    s.telegram.webhook_url = "https://x.example/"
    assert tg.webhook_target(s) == "https://x.example/telegram/webhook"
    s.telegram.webhook_url = "https://x.example/custom/path"
    assert tg.webhook_target(s) == "https://x.example/custom/path"
    s.telegram.base_url = "http://127.0.0.1:8081/bot"
    assert tg.file_base_url(s) == "http://127.0.0.1:8081/file/bot"
    assert tg.pick_language(s, "zh-TW") == "zh" and tg.pick_language(s, "de") == "en"
    assert tg.pick_language(s, None) == s.language
    with pytest.raises(RuntimeError, match="token"):
        tg.bot_token(Settings(_env_file=None, data_dir=tmp_path))
    bad = Settings(
        _env_file=None, data_dir=tmp_path, telegram={"token": TOKEN, "webhook_secret": "no spaces!"}
    )
    with pytest.raises(RuntimeError, match="webhook_secret"):
        tg.webhook_secret(bad)


def test_entry_point_is_declared() -> None:
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert pyproject["project"]["entry-points"]["oogiri"]["telegram"] == "plugins.telegram"


async def test_cli_manages_the_webhook(botapi: FakeBotAPI, tmp_path: Path) -> None:
    cli = typer.Typer()
    tg.oogiri_register_commands(cli=cli)
    env = {
        "OOGIRI_DATA_DIR": str(tmp_path),
        "OOGIRI_TELEGRAM__TOKEN": TOKEN,
        "OOGIRI_TELEGRAM__BASE_URL": botapi.base_url,
        "OOGIRI_TELEGRAM__WEBHOOK_URL": WEBHOOK_BASE,
    }

    def invoke(*args: str):
        return CliRunner().invoke(cli, ["telegram", *args], env=env)

    result = await asyncio.wait_for(asyncio.to_thread(invoke, "set-webhook"), 15)
    assert result.exit_code == 0, result.output
    assert botapi.webhook["url"] == f"{WEBHOOK_BASE}/telegram/webhook"
    result = await asyncio.wait_for(asyncio.to_thread(invoke, "webhook-info"), 15)
    assert f"{WEBHOOK_BASE}/telegram/webhook" in result.output
    assert TOKEN not in result.output
    result = await asyncio.wait_for(asyncio.to_thread(invoke, "delete-webhook"), 15)
    assert result.exit_code == 0 and botapi.webhook["url"] == ""


async def test_store_hiccup_while_refreshing_counts_sends_no_error_reply(
    botapi: FakeBotAPI, start_bot: StartBot, chelsea_jpeg: bytes
) -> None:
    from bot.models import StoreUnavailable

    app = await start_bot()
    alice = botapi.user(3001, "Alice")
    chat = botapi.private_chat(alice)  # the error handler replies in private chats only
    msg, reply = await ask_joke(botapi, chat, alice, photo=botapi.photo(chelsea_jpeg))
    joke_id = joke_id_of(reply)
    joke_msg = bot_reply(botapi, msg)
    sent_before = sum(c.method == "sendMessage" for c in botapi.calls)

    async def unavailable(joke_id: int):
        raise StoreUnavailable(detail="database unavailable: test")

    app.service.get_joke = unavailable  # the vote commits; only the count refresh fails
    answer = await press(botapi, alice, joke_msg, f"v:{joke_id}:+1")
    assert answer["text"] == tg_text("vote_up", "en") and not answer.get("show_alert")
    await asyncio.sleep(0.3)
    assert await app.store.ratings_for(joke_id) == [("tg:3001", 1)]
    assert sum(c.method == "sendMessage" for c in botapi.calls) == sent_before
