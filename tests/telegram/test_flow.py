"""Telegram under its real limits: admission before work, per-chat flow control, the outbox,
anonymous senders, no no-op edits, moderation — a real PTB Application against the fake Bot API.

Failures are injected the way Telegram answers them (429 with ``retry_after`` for one chat, which
then stays refused until that time; 502) by ``FakeBotAPI.fail_chat``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from fakebotapi import BOT_ID, FakeBotAPI, keyboard_counts
from tgsupport import (
    ADMIN_ID,
    FAST_OUTBOX,
    MENTION,
    StartBot,
    jokes_in,
    replies_to,
    wait_until,
)

import plugins.telegram as tg
from bot.outbox import Outbox
from bot.store import Store

GROUP = -1001234567890
# PTB itself warns when it builds a RetryAfter from an int (its v22.2 deprecation).
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:telegram")


async def outbox_counts(app: Any) -> dict[str, int]:
    return await Outbox(app.store, "telegram").counts()


# --------------------------------------------------------------------------- admission


async def test_flooder_is_refused_before_any_download_and_warned_once(
    botapi: FakeBotAPI, start_bot: StartBot, chelsea_jpeg: bytes
) -> None:
    await start_bot(limits={"per_user_per_minute": 2})
    user = botapi.user(7001)
    chat = botapi.private_chat(user)
    last = None
    for _ in range(8):
        last, _ = botapi.push_message(chat, user, photo=botapi.photo(chelsea_jpeg))
    await botapi.wait_consumed(last["update_id"])
    await botapi.wait_for("sendMessage", lambda p: "reply_markup" in p, count=2)
    await asyncio.sleep(0.5)
    sent = botapi.sent("sendMessage")
    notices = [p for p in sent if p["text"].startswith("Slow down")]
    assert len(jokes_in(botapi, chat["id"])) == 2
    assert len(notices) == 1  # one notice per window, the other five refusals are silent
    assert len(botapi.sent("getFile")) == 2  # refused photos were never fetched
    assert len(botapi.sent("download")) == 2


# --------------------------------------------------------------------------- flow control


async def test_flood_control_in_one_chat_does_not_delay_another(
    botapi: FakeBotAPI, start_bot: StartBot, chelsea_jpeg: bytes
) -> None:
    await start_bot()
    a, b = botapi.user(7101), botapi.user(7102)
    chat_a, chat_b = botapi.private_chat(a), botapi.private_chat(b)
    botapi.fail_chat(chat_a["id"], retry_after=3)
    _, msg_a = botapi.push_message(chat_a, a, photo=botapi.photo(chelsea_jpeg))
    refused = next(
        c
        for c in await _calls(botapi, "sendMessage", 429)
        if int(c.params["chat_id"]) == chat_a["id"]
    )
    _, msg_b = botapi.push_message(chat_b, b, photo=botapi.photo(chelsea_jpeg))
    (reply_b,) = await botapi.wait_for("sendMessage", replies_to(msg_b))
    (reply_a,) = await botapi.wait_for("sendMessage", replies_to(msg_a), within=8)
    at = {
        int(c.params["chat_id"]): c.at
        for c in botapi.calls
        if c.method == "sendMessage" and c.status == 200
    }
    assert at[chat_b["id"]] < refused.at + 2.5  # B was not held up by A's 3 s block
    assert at[chat_a["id"]] >= refused.at + 3.0  # A waited as Telegram told it to
    assert reply_a["reply_markup"] and reply_b["reply_markup"]


async def _calls(api: FakeBotAPI, method: str, status: int, within: float = 5.0) -> list[Any]:
    async def found() -> bool:
        return any(c.method == method and c.status == status for c in api.calls)

    await wait_until(found, within)
    return [c for c in api.calls if c.method == method and c.status == status]


def test_limiter_budgets_and_group_detection() -> None:
    flow = tg.ChatFlowLimiter(private_per_s=1, group_per_minute=20, global_per_s=30)
    assert flow.private == (1, 1.0) and flow.group == (20, 60.0)
    assert tg.ChatFlowLimiter(private_per_s=0.5).private == (1, 2.0)
    from plugins.telegram_flow import is_group

    assert is_group(-100123) and is_group("@channel") and not is_group(42) and not is_group("42")


# --------------------------------------------------------------------------- the outbox


async def test_reply_refused_after_its_retries_is_kept_and_delivered_once(
    botapi: FakeBotAPI, start_bot: StartBot, chelsea_jpeg: bytes, store_url: str
) -> None:
    app = await start_bot(store={"url": store_url}, telegram={"flood_retries": 0, **FAST_OUTBOX})
    user = botapi.user(7201)
    chat = botapi.private_chat(user)
    botapi.fail_chat(chat["id"], retry_after=1)
    _, msg = botapi.push_message(chat, user, photo=botapi.photo(chelsea_jpeg))
    await _calls(botapi, "sendMessage", 429)
    assert (await outbox_counts(app)).get("pending") == 1  # kept, not dropped
    (reply,) = await botapi.wait_for("sendMessage", replies_to(msg), within=8)
    await wait_until(lambda: _is(outbox_counts(app), {"delivered": 1}))
    assert len(jokes_in(botapi, chat["id"])) == 1
    assert keyboard_counts(reply["reply_markup"]) == ("👍 0", "👎 0")


async def _is(counts: Any, expected: dict[str, int]) -> bool:
    return await counts == expected


async def test_5xx_is_retried_and_a_chats_replies_stay_in_order(
    botapi: FakeBotAPI, start_bot: StartBot, chelsea_jpeg: bytes, coffee_png: bytes
) -> None:
    app = await start_bot(telegram=FAST_OUTBOX)
    user = botapi.user(7301)
    chat = botapi.private_chat(user)
    botapi.fail_chat(chat["id"], status=502)
    _, first = botapi.push_message(chat, user, photo=botapi.photo(chelsea_jpeg))
    await _calls(botapi, "sendMessage", 502)
    _, second = botapi.push_message(chat, user, photo=botapi.photo(coffee_png))
    await botapi.wait_for("sendMessage", lambda p: "reply_markup" in p, count=2, within=10)
    order = [p["reply_parameters"]["message_id"] for p in jokes_in(botapi, chat["id"])]
    assert order == [first["message_id"], second["message_id"]]  # the second did not overtake
    await wait_until(lambda: _is(outbox_counts(app), {"delivered": 2}))


async def test_pending_reply_survives_a_restart(
    botapi: FakeBotAPI, start_bot: StartBot, chelsea_jpeg: bytes, store_url: str, tmp_path: Path
) -> None:
    shared = {"store": {"url": store_url}, "data_dir": tmp_path / "shared"}
    app = await start_bot(telegram=FAST_OUTBOX, **shared)
    user = botapi.user(7401)
    chat = botapi.private_chat(user)
    botapi.fail_chat(chat["id"], status=502, times=1000)  # Telegram is down for this chat
    _, msg = botapi.push_message(chat, user, photo=botapi.photo(chelsea_jpeg))
    await _calls(botapi, "sendMessage", 502)
    await app.close()
    store = Store(store_url, tmp_path / "images")
    try:
        assert await Outbox(store, "telegram").counts() == {"pending": 1}
    finally:
        await store.close()
    botapi.chat_failures.clear()  # Telegram is back
    await start_bot(telegram=FAST_OUTBOX, **shared)
    (reply,) = await botapi.wait_for("sendMessage", replies_to(msg), within=10)
    assert "reply_markup" in reply


async def test_a_reply_too_old_is_expired_counted_and_logged(
    botapi: FakeBotAPI,
    start_bot: StartBot,
    chelsea_jpeg: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = await start_bot(telegram={"outbox_max_age_s": 1.0, **FAST_OUTBOX})
    user = botapi.user(7501)
    chat = botapi.private_chat(user)
    botapi.fail_chat(chat["id"], status=502, times=1000)
    botapi.push_message(chat, user, photo=botapi.photo(chelsea_jpeg))
    await wait_until(lambda: _is(outbox_counts(app), {"expired": 1}), within=10)
    assert "expired undelivered" in caplog.text
    assert b'oogiri_outbox_total{channel="telegram",event="expired"} 1.0' in app.metrics.render()


# --------------------------------------------------------------------------- anonymous senders


async def test_anonymous_admins_and_channel_posts_get_jokes_keyed_on_the_sender_chat(
    botapi: FakeBotAPI, start_bot: StartBot, chelsea_jpeg: bytes
) -> None:
    app = await start_bot(limits={"per_user_per_minute": 1})
    group = botapi.group_chat(GROUP)
    cats = botapi.channel_chat()
    anon = botapi.anonymous_message(group, photo=botapi.photo(chelsea_jpeg), **MENTION)
    botapi.push(botapi.update(message=anon))
    (reply,) = await botapi.wait_for("sendMessage", replies_to(anon))
    as_channel = botapi.anonymous_message(group, cats, photo=botapi.photo(chelsea_jpeg), **MENTION)
    botapi.push(botapi.update(message=as_channel))
    (reply2,) = await botapi.wait_for("sendMessage", replies_to(as_channel))
    ids = [
        tg.parse_vote(r["reply_markup"]["inline_keyboard"][0][0]["callback_data"])
        for r in (reply, reply2)
    ]
    jokes = [await app.service.get_joke(v[0]) for v in ids if v]
    assert [j.user_id for j in jokes] == [f"tg:{GROUP}", f"tg:{cats['id']}"]
    # the limit keys on the sender chat: the same channel again is refused …
    again = botapi.anonymous_message(group, cats, photo=botapi.photo(chelsea_jpeg), **MENTION)
    botapi.push(botapi.update(message=again))
    (refusal,) = await botapi.wait_for("sendMessage", replies_to(again))
    assert refusal["text"].startswith("Slow down")
    # … and a real bot's message is still ignored
    robot = {"id": 999, "is_bot": True, "first_name": "Robot"}
    _, from_bot = botapi.push_message(group, robot, photo=botapi.photo(chelsea_jpeg), **MENTION)
    await asyncio.sleep(0.5)
    assert not [p for p in botapi.sent("sendMessage") if replies_to(from_bot)(p)]


# --------------------------------------------------------------------------- no no-op edits


async def test_repeated_votes_do_not_edit_and_bursts_coalesce(
    botapi: FakeBotAPI, start_bot: StartBot, chelsea_jpeg: bytes
) -> None:
    await start_bot(telegram={"edit_window_s": 1.0})
    group = botapi.group_chat(GROUP)
    asker = botapi.user(7601)
    _, msg = botapi.push_message(group, asker, photo=botapi.photo(chelsea_jpeg), **MENTION)
    (reply,) = await botapi.wait_for("sendMessage", replies_to(msg))
    joke_message = next(
        m
        for (c, _), m in botapi.messages.items()
        if c == GROUP and m["from"]["id"] == BOT_ID and m.get("reply_markup")
    )
    data = reply["reply_markup"]["inline_keyboard"][0][0]["callback_data"]
    voters = [botapi.user(7700 + n) for n in range(12)]
    for voter in voters:
        botapi.push_callback(voter, joke_message, data)
    await botapi.wait_for("answerCallbackQuery", count=12)
    await botapi.wait_for(
        "editMessageReplyMarkup",
        lambda p: keyboard_counts(p["reply_markup"]) == ("👍 12", "👎 0"),
        within=6,
    )
    edits = botapi.sent("editMessageReplyMarkup", ok_only=False)
    assert len(edits) <= 3  # 12 votes, at most one edit per window (the last state wins)
    # the same vote again: a toast, no edit at all
    before = len(botapi.sent("editMessageReplyMarkup", ok_only=False))
    botapi.push_callback(voters[0], joke_message, data)
    await botapi.wait_for("answerCallbackQuery", count=13)
    await asyncio.sleep(1.5)
    assert len(botapi.sent("editMessageReplyMarkup", ok_only=False)) == before


# --------------------------------------------------------------------------- moderation


async def test_admins_block_and_unblock_users_before_any_download(
    botapi: FakeBotAPI, start_bot: StartBot, chelsea_jpeg: bytes, store_url: str
) -> None:
    await start_bot(store={"url": store_url})
    group = botapi.group_chat(GROUP)
    admin, troll, member = botapi.user(ADMIN_ID), botapi.user(7801), botapi.user(7802)
    _, trolling = botapi.push_message(group, troll, text="lol")
    # a member may not block
    _, cmd = botapi.push_message(group, member, text="/block", reply_to=trolling)
    (answer,) = await botapi.wait_for("sendMessage", replies_to(cmd))
    assert "admins" in answer["text"]
    _, cmd = botapi.push_message(group, admin, text="/block", reply_to=trolling)
    (answer,) = await botapi.wait_for("sendMessage", replies_to(cmd))
    assert answer["text"] == "Blocked telegram:user:7801."
    files_before = len(botapi.sent("getFile"))
    update, photo = botapi.push_message(group, troll, photo=botapi.photo(chelsea_jpeg), **MENTION)
    await botapi.wait_consumed(update["update_id"])
    await asyncio.sleep(0.5)
    assert not [p for p in botapi.sent("sendMessage") if replies_to(photo)(p)]  # silence
    assert len(botapi.sent("getFile")) == files_before  # and nothing downloaded
    _, cmd = botapi.push_message(group, admin, text="/unblock 7801")
    (answer,) = await botapi.wait_for("sendMessage", replies_to(cmd))
    assert answer["text"] == "Unblocked telegram:user:7801."
    _, photo = botapi.push_message(group, troll, photo=botapi.photo(chelsea_jpeg), **MENTION)
    (reply,) = await botapi.wait_for("sendMessage", replies_to(photo))
    assert "reply_markup" in reply


async def test_admin_deletes_a_joke_from_the_chat_and_from_training(
    botapi: FakeBotAPI, start_bot: StartBot, chelsea_jpeg: bytes
) -> None:
    from bot.moderation import moderation_for

    app = await start_bot()
    admin = botapi.user(ADMIN_ID)
    chat = botapi.private_chat(admin)
    _, photo = botapi.push_message(chat, admin, photo=botapi.photo(chelsea_jpeg))
    (reply,) = await botapi.wait_for("sendMessage", replies_to(photo))
    joke_id = tg.parse_vote(reply["reply_markup"]["inline_keyboard"][0][0]["callback_data"])[0]
    joke_message = next(
        m
        for (c, _), m in botapi.messages.items()
        if c == chat["id"] and m["from"]["id"] == BOT_ID and m.get("reply_markup")
    )
    _, cmd = botapi.push_message(chat, admin, text="/delete", reply_to=joke_message)
    (answer,) = await botapi.wait_for("sendMessage", replies_to(cmd))
    assert answer["text"].startswith(f"Joke {joke_id} removed")
    (deleted,) = botapi.sent("deleteMessage")
    assert int(deleted["message_id"]) == joke_message["message_id"]
    assert joke_id in await moderation_for(app).removed_jokes()


async def test_allowlist_mode_answers_only_listed_chats(
    botapi: FakeBotAPI, start_bot: StartBot, chelsea_jpeg: bytes
) -> None:
    await start_bot(moderation={"mode": "allowlist", "allow": ["telegram:user:7901"]})
    listed, stranger = botapi.user(7901), botapi.user(7902)
    _, ok = botapi.push_message(
        botapi.private_chat(listed), listed, photo=botapi.photo(chelsea_jpeg)
    )
    (reply,) = await botapi.wait_for("sendMessage", replies_to(ok))
    assert "reply_markup" in reply
    update, no = botapi.push_message(
        botapi.private_chat(stranger), stranger, photo=botapi.photo(chelsea_jpeg)
    )
    await botapi.wait_consumed(update["update_id"])
    await asyncio.sleep(0.5)
    assert not [p for p in botapi.sent("sendMessage") if replies_to(no)(p)]


async def test_a_busy_group_gets_one_notice_not_one_per_member(
    botapi: FakeBotAPI, start_bot: StartBot, chelsea_jpeg: bytes
) -> None:
    await start_bot(limits={"per_chat_per_minute": 1})
    group = botapi.group_chat(GROUP)
    members = [botapi.user(7950 + n) for n in range(4)]
    last = None
    for member in members:
        last, _ = botapi.push_message(group, member, photo=botapi.photo(chelsea_jpeg), **MENTION)
    await botapi.wait_consumed(last["update_id"])
    await botapi.wait_for("sendMessage", lambda p: "reply_markup" in p)
    await asyncio.sleep(0.5)
    texts = [p["text"] for p in botapi.sent("sendMessage") if int(p["chat_id"]) == GROUP]
    assert len(jokes_in(botapi, GROUP)) == 1
    assert sum(t.startswith("This chat is asking a lot") for t in texts) == 1


async def test_a_joke_deleted_while_its_reply_is_pending_is_never_sent(
    botapi: FakeBotAPI, start_bot: StartBot, chelsea_jpeg: bytes
) -> None:
    app = await start_bot(telegram=FAST_OUTBOX)
    user, admin = botapi.user(7971), botapi.user(ADMIN_ID)
    chat = botapi.private_chat(user)
    botapi.fail_chat(chat["id"], status=502, times=1000)
    botapi.push_message(chat, user, photo=botapi.photo(chelsea_jpeg))
    await _calls(botapi, "sendMessage", 502)
    group = botapi.group_chat(GROUP)
    _, cmd = botapi.push_message(group, admin, text="/delete 1")
    (answer,) = await botapi.wait_for("sendMessage", replies_to(cmd))
    assert answer["text"].startswith("Joke 1 removed from training")  # nowhere to delete yet
    botapi.chat_failures.clear()
    await wait_until(lambda: _is(outbox_counts(app), {"dropped": 1}), within=10)
    assert jokes_in(botapi, chat["id"]) == []


async def test_blocking_a_channel_post_blocks_that_channel_not_the_group(
    botapi: FakeBotAPI, start_bot: StartBot, chelsea_jpeg: bytes
) -> None:
    await start_bot()
    group, cats = botapi.group_chat(GROUP), botapi.channel_chat()
    admin, member = botapi.user(ADMIN_ID), botapi.user(7981)
    post = botapi.anonymous_message(group, cats, text="meow")
    botapi.push(botapi.update(message=post))
    _, cmd = botapi.push_message(group, admin, text="/block", reply_to=post)
    (answer,) = await botapi.wait_for("sendMessage", replies_to(cmd))
    assert answer["text"] == f"Blocked telegram:user:{cats['id']}."
    as_channel = botapi.anonymous_message(group, cats, photo=botapi.photo(chelsea_jpeg), **MENTION)
    botapi.push(botapi.update(message=as_channel))
    _, photo = botapi.push_message(group, member, photo=botapi.photo(chelsea_jpeg), **MENTION)
    (reply,) = await botapi.wait_for("sendMessage", replies_to(photo))  # the group still works
    assert "reply_markup" in reply
    await asyncio.sleep(0.3)
    assert not [p for p in botapi.sent("sendMessage") if replies_to(as_channel)(p)]
