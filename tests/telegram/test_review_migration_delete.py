"""Review: an admin's ``/delete`` of a joke told in a group before it became a supergroup, and the
other places that address a stored joke's message after such an upgrade.

What Telegram does (and ``FakeBotAPI.migrate_chat`` plays): the upgrade creates a new chat (the
supergroup, a new id) and deactivates the old group; every call that needs to write to the old
group — ``sendMessage``, ``deleteMessage`` — is answered 400 "group chat was upgraded to a
supergroup chat" with ``migrate_to_chat_id``. Message ids are per chat, so the old group's ids name
nothing (or something else) in the supergroup. See ``TelegramChannel._delete_joke_message``.

A real python-telegram-bot Application talks HTTP to ``FakeBotAPI`` on 127.0.0.1; nothing from PTB
is mocked.
"""

from __future__ import annotations

import asyncio
import time
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
    replies_to,
    wait_until,
)

from bot.app import App
from bot.moderation import moderation_for
from bot.store import ChatMoveRow
from plugins.telegram_texts import counted
from plugins.telegram_texts import text as tg_text

OLD_GROUP = -4_000_321  # a basic group: small negative id
SUPERGROUP = -1_009_000_000_321  # what Telegram upgrades it to
# PTB itself warns when it builds a RetryAfter from an int (its v22.2 deprecation).
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:telegram")


def same_id_in_supergroup(api: FakeBotAPI, old: dict[str, Any]) -> dict[str, Any]:
    """A bot message of the supergroup with the old joke message's id (ids are per chat, so this
    happens in real chats): deleting "the old message in the new chat" would hit it."""
    msg = {**old, "chat": api.chats[SUPERGROUP], "text": "an unrelated later message"}
    msg.pop("reply_markup", None)
    api.messages[(SUPERGROUP, old["message_id"])] = msg
    return msg


async def moved_to(app: App, old_chat: int) -> str | None:
    async with app.store.session() as s:
        return await s.scalar(
            select(ChatMoveRow.new_chat).where(ChatMoveRow.old_chat == f"tg:{old_chat}")
        )


async def recorded(app: App) -> bool:
    return await moved_to(app, OLD_GROUP) == f"tg:{SUPERGROUP}"


async def joke_in_old_group(api: FakeBotAPI, chelsea_jpeg: bytes) -> tuple[int, dict[str, Any]]:
    """A joke told in the basic group (before any upgrade): its id and the bot's message."""
    group, member = basic_group(api, OLD_GROUP), api.user(8601)
    api.push_message(group, member, photo=api.photo(chelsea_jpeg), **MENTION)
    (joke,) = await api.wait_for("sendMessage", lambda p: "reply_markup" in p, within=10)
    assert int(joke["chat_id"]) == OLD_GROUP
    joke_id = joke_id_of(joke)
    return joke_id, bot_message(api, OLD_GROUP, joke_id)


def delete_calls(api: FakeBotAPI) -> list[tuple[int, int, int]]:
    """Every ``deleteMessage`` the bot made: ``(chat, message, HTTP status)``."""
    return [
        (int(c.params["chat_id"]), int(c.params["message_id"]), c.status)
        for c in api.calls
        if c.method == "deleteMessage"
    ]


# --------------------------------------------------------------------------- /delete


async def test_delete_by_id_of_a_joke_told_before_the_upgrade_says_what_happened(
    botapi: FakeBotAPI, start_bot: StartBot, chelsea_jpeg: bytes
) -> None:
    """The defect: ``/delete <id>`` tried the old group's message (where the outbox delivered it),
    Telegram refused ("group chat was upgraded to a supergroup chat") and the admin was told
    "…but I could not delete the message here" — neither where nor why, and the bot did not learn
    of the upgrade. Now: the joke is removed either way, the move is recorded, the message is not
    looked for in the supergroup (its ids are not the old group's), and the admin hears why."""
    app = await start_bot()
    joke_id, old_message = await joke_in_old_group(botapi, chelsea_jpeg)
    botapi.migrate_chat(OLD_GROUP, SUPERGROUP)  # the bot has not seen the service messages
    bystander = same_id_in_supergroup(botapi, old_message)

    admin = botapi.user(ADMIN_ID, language_code="zh-hans")
    chat = botapi.private_chat(admin)
    _, cmd = botapi.push_message(chat, admin, text=f"/delete {joke_id}")
    (answer,) = await botapi.wait_for("sendMessage", replies_to(cmd))

    assert answer["text"] == tg_text("joke_deleted_upgraded", "zh", joke_id=joke_id)
    assert answer["text"] != tg_text("joke_deleted_upgraded", "en", joke_id=joke_id)
    assert joke_id in await moderation_for(app).removed_jokes()
    # one try where the message was delivered; Telegram's refusal told the bot about the upgrade
    assert delete_calls(botapi) == [(OLD_GROUP, old_message["message_id"], 400)]
    assert await recorded(app)
    # nothing in the supergroup was touched: the same message id there is another message
    assert botapi.messages[(SUPERGROUP, bystander["message_id"])] is bystander
    assert (OLD_GROUP, old_message["message_id"]) in botapi.messages


async def test_delete_in_reply_sent_in_the_old_group_is_answered_in_the_supergroup(
    botapi: FakeBotAPI, start_bot: StartBot, chelsea_jpeg: bytes
) -> None:
    """``/delete`` in reply to the joke, sent in the group just before the upgrade and handled
    after it: the reply target is the old group's message, which Telegram no longer lets the bot
    delete; the answer goes to the supergroup (without quoting the old command's id)."""
    app = await start_bot()
    joke_id, old_message = await joke_in_old_group(botapi, chelsea_jpeg)
    botapi.migrate_chat(OLD_GROUP, SUPERGROUP)
    admin = botapi.user(ADMIN_ID)
    botapi.push_message(basic_group(botapi, OLD_GROUP), admin, text="/delete", reply_to=old_message)
    (answer,) = await botapi.wait_for(
        "sendMessage", lambda p: int(p["chat_id"]) == SUPERGROUP, within=10
    )
    assert answer["text"] == tg_text("joke_deleted_upgraded", "en", joke_id=joke_id)
    assert not (answer.get("reply_parameters") or {}).get("message_id")
    assert joke_id in await moderation_for(app).removed_jokes()
    assert [(c, s) for c, _, s in delete_calls(botapi)] == [(OLD_GROUP, 400)]
    assert await recorded(app)


async def test_delete_after_the_upgrade_is_known_does_not_try_the_old_group(
    botapi: FakeBotAPI, start_bot: StartBot, chelsea_jpeg: bytes
) -> None:
    """Once the bot has seen Telegram's service messages it knows the old group can't be written
    to: no doomed ``deleteMessage``, the same honest answer."""
    app = await start_bot()
    joke_id, _ = await joke_in_old_group(botapi, chelsea_jpeg)
    member = botapi.user(8602)
    supergroup = botapi.migrate_chat(OLD_GROUP, SUPERGROUP)
    botapi.push_message(basic_group(botapi, OLD_GROUP), member, migrate_to_chat_id=SUPERGROUP)
    botapi.push_message(supergroup, member, migrate_from_chat_id=OLD_GROUP)
    await wait_until(lambda: recorded(app))

    admin = botapi.user(ADMIN_ID)
    _, cmd = botapi.push_message(supergroup, admin, text=f"/delete {joke_id}")
    (answer,) = await botapi.wait_for("sendMessage", replies_to(cmd))
    assert answer["text"] == tg_text("joke_deleted_upgraded", "en", joke_id=joke_id)
    assert delete_calls(botapi) == []
    assert joke_id in await moderation_for(app).removed_jokes()


async def test_a_joke_whose_reply_reached_the_supergroup_is_deleted_there(
    botapi: FakeBotAPI, start_bot: StartBot, chelsea_jpeg: bytes
) -> None:
    """The other side of the mapping: a reply the outbox re-sent to the supergroup is recorded with
    the supergroup's id and message id, and ``/delete <id>`` deletes exactly that message."""
    app = await start_bot(telegram=FAST_OUTBOX)
    group, member = basic_group(botapi, OLD_GROUP), botapi.user(8603)
    botapi.push_message(group, member, photo=botapi.photo(chelsea_jpeg), **MENTION)
    botapi.migrate_chat(OLD_GROUP, SUPERGROUP)  # upgraded while the joke was being written
    (joke,) = await botapi.wait_for(
        "sendMessage", lambda p: int(p["chat_id"]) == SUPERGROUP, within=10
    )
    joke_id = joke_id_of(joke)
    shown = bot_message(botapi, SUPERGROUP, joke_id)

    admin = botapi.user(ADMIN_ID)
    chat = botapi.private_chat(admin)
    _, cmd = botapi.push_message(chat, admin, text=f"/delete {joke_id}")
    (answer,) = await botapi.wait_for("sendMessage", replies_to(cmd))
    assert answer["text"] == tg_text("joke_deleted", "en", joke_id=joke_id)
    assert delete_calls(botapi) == [(SUPERGROUP, shown["message_id"], 200)]
    assert joke_id in await moderation_for(app).removed_jokes()


async def test_delete_of_a_joke_never_delivered_says_there_is_no_message(
    botapi: FakeBotAPI, start_bot: StartBot, chelsea_jpeg: bytes
) -> None:
    """``/delete <id>`` of a joke whose reply never reached a chat used to say "I could not delete
    the message here" — there was no message, and "here" was the admin's own chat."""
    app = await start_bot(telegram=FAST_OUTBOX)
    user = botapi.user(8604)
    botapi.fail_chat(user["id"], status=502, times=1000)
    botapi.push_message(botapi.private_chat(user), user, photo=botapi.photo(chelsea_jpeg))
    await botapi.wait_for("sendChatAction")
    await wait_until(lambda: _refused(botapi, user["id"]))

    admin = botapi.user(ADMIN_ID)
    _, cmd = botapi.push_message(botapi.private_chat(admin), admin, text="/delete 1")
    (answer,) = await botapi.wait_for("sendMessage", replies_to(cmd))
    assert answer["text"] == tg_text("joke_deleted_unsent", "en", joke_id=1)
    assert delete_calls(botapi) == []
    assert await moderation_for(app).removed_jokes() == {1}  # removed all the same, and only it


async def test_delete_in_reply_to_a_message_of_another_chat_says_so(
    botapi: FakeBotAPI, start_bot: StartBot
) -> None:
    """A reply to a message of another chat (e.g. the old group's history, which clients show
    above the supergroup's) reaches the bot as ``external_reply``, without the message's buttons
    or, for a basic group, its id: the bot cannot tell which joke it was and says so, instead of
    "Reply to one of my jokes with /delete" to someone who just did."""
    await start_bot()
    supergroup = botapi.migrate_chat(OLD_GROUP, SUPERGROUP)
    admin = botapi.user(ADMIN_ID)
    origin = {"type": "user", "date": int(time.time()) - 60, "sender_user": botapi.me}
    _, cmd = botapi.push_message(
        supergroup, admin, text="/delete", external_reply={"origin": origin}
    )
    (answer,) = await botapi.wait_for("sendMessage", replies_to(cmd))
    assert answer["text"] == tg_text("delete_external", "en")
    assert answer["text"] != tg_text("delete_usage", "en")
    assert delete_calls(botapi) == []


# --------------------------------------------------------------------------- votes, moderation


async def test_a_vote_on_an_old_group_message_never_edits_the_supergroup(
    botapi: FakeBotAPI, start_bot: StartBot, chelsea_jpeg: bytes
) -> None:
    """A button pressed on the old group's message after the upgrade: the vote counts (the joke is
    the group's), and the count refresh addresses the message that was pressed, in its own chat —
    never the supergroup with the old group's message id. Telegram's refusal there teaches the
    bot the move instead of only being logged."""
    app = await start_bot()
    joke_id, old_message = await joke_in_old_group(botapi, chelsea_jpeg)
    botapi.migrate_chat(OLD_GROUP, SUPERGROUP)
    bystander = same_id_in_supergroup(botapi, old_message)
    member = botapi.user(8605)
    query_id = botapi.push_callback(member, old_message, f"v:{joke_id}:+1")
    (answer,) = await botapi.wait_for(
        "answerCallbackQuery", lambda p: p.get("callback_query_id") == query_id
    )
    assert answer.get("text") == tg_text("vote_up", "en")
    assert await app.store.ratings_for(joke_id) == [("tg:8605", 1)]
    await wait_until(lambda: recorded(app))
    edits = [c for c in botapi.calls if c.method == "editMessageReplyMarkup"]
    assert [int(c.params["chat_id"]) for c in edits] == [OLD_GROUP]
    assert "reply_markup" not in botapi.messages[(SUPERGROUP, bystander["message_id"])]


async def test_a_block_of_the_group_holds_in_the_supergroup_it_became(
    botapi: FakeBotAPI, start_bot: StartBot, chelsea_jpeg: bytes
) -> None:
    """``/block <group id>`` before the upgrade: pictures asked for in the supergroup get silence
    once the bot has learnt of the move (docs/telegram.md used to say the opposite)."""
    app = await start_bot()
    admin, member = botapi.user(ADMIN_ID), botapi.user(8606)
    group = basic_group(botapi, OLD_GROUP)
    _, cmd = botapi.push_message(group, admin, text=f"/block {OLD_GROUP}")
    (answer,) = await botapi.wait_for("sendMessage", replies_to(cmd))
    assert answer["text"] == tg_text("blocked", "en", subject=f"telegram:chat:{OLD_GROUP}")
    supergroup = botapi.migrate_chat(OLD_GROUP, SUPERGROUP)
    botapi.push_message(supergroup, member, migrate_from_chat_id=OLD_GROUP)
    await wait_until(lambda: recorded(app))
    update, photo = botapi.push_message(
        supergroup, member, photo=botapi.photo(chelsea_jpeg), **MENTION
    )
    await botapi.wait_consumed(update["update_id"])
    await asyncio.sleep(0.5)
    assert jokes_in(botapi, SUPERGROUP) == []
    assert not [p for p in botapi.sent("sendMessage") if replies_to(photo)(p)]
    assert not botapi.sent("getFile")


# --------------------------------------------------------------------------- counts


@pytest.mark.parametrize(
    ("n", "lang", "expected"),
    [(1, "en", "1 joke"), (2, "en", "2 jokes"), (0, "en", "0 jokes"), (1, "zh", "1 个笑话")],
)
def test_counted_says_one_joke(n: int, lang: str, expected: str) -> None:
    assert counted("jokes", n, lang) == expected


async def test_stats_say_1_joke_not_1_jokes(
    botapi: FakeBotAPI, start_bot: StartBot, chelsea_jpeg: bytes
) -> None:
    await start_bot()
    admin = botapi.user(ADMIN_ID)
    chat = botapi.private_chat(admin)
    _, photo = botapi.push_message(chat, admin, photo=botapi.photo(chelsea_jpeg))
    (joke,) = await botapi.wait_for("sendMessage", replies_to(photo))
    assert keyboard_counts(joke["reply_markup"]) == ("👍 0", "👎 0")
    _, cmd = botapi.push_message(chat, admin, text="/stats")
    (answer,) = await botapi.wait_for("sendMessage", replies_to(cmd))
    assert answer["text"].splitlines()[1] == "instant-0: 1 joke · 0 👍 · 0 👎 · " + tg_text(
        "no_votes", "en"
    )


async def _refused(api: FakeBotAPI, chat_id: int) -> bool:
    return any(
        c.method == "sendMessage" and c.status == 502 and int(c.params["chat_id"]) == chat_id
        for c in api.calls
    )
