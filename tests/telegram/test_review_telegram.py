"""Defects found in a review of the Telegram channel, each pinned by a test on the fake Bot API.

A real python-telegram-bot Application talks HTTP to ``FakeBotAPI`` on 127.0.0.1; nothing from PTB
is mocked.
"""

from __future__ import annotations

import asyncio
import traceback
from pathlib import Path
from typing import Any

import pytest
import typer
from fakebotapi import BOT_ID, FakeBotAPI, keyboard_counts
from tgsupport import ADMIN_ID, StartBot
from typer.testing import CliRunner

import plugins.telegram as tg
from plugins.telegram_texts import text as tg_text

GROUP = -1001234567890
# PTB itself warns when it builds a RetryAfter from an int (its v22.2 deprecation).
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:telegram")


def replies_to(msg: dict[str, Any]):
    return lambda p: (p.get("reply_parameters") or {}).get("message_id") == msg["message_id"]


def joke_message(api: FakeBotAPI, chat_id: int, asked: dict[str, Any]) -> dict[str, Any]:
    """The bot's joke message (as Telegram stores it) that answers ``asked``."""
    for (cid, _), sent in api.messages.items():
        if (
            cid == chat_id
            and sent["from"]["id"] == BOT_ID
            and sent.get("reply_to_message", {}).get("message_id") == asked["message_id"]
        ):
            return sent
    raise AssertionError("no joke message")


def joke_id_of(reply: dict[str, Any]) -> int:
    vote = tg.parse_vote(reply["reply_markup"]["inline_keyboard"][0][0]["callback_data"])
    assert vote is not None
    return vote[0]


# --------------------------------------------------------------------------- flood control


async def test_flood_control_on_getfile_is_not_silence(
    botapi: FakeBotAPI, start_bot: StartBot, chelsea_jpeg: bytes
) -> None:
    """A 429 on ``getFile`` (not a chat send, so the per-chat limiter does not retry it) used to
    escape the handler: the picture was admitted and counted, and the user heard nothing."""
    app = await start_bot()
    botapi.fail("getFile", retry_after=1)
    user = botapi.user(9101)
    chat = botapi.private_chat(user)
    _, msg = botapi.push_message(chat, user, photo=botapi.photo(chelsea_jpeg))
    (reply,) = await botapi.wait_for("sendMessage", replies_to(msg))
    assert reply["text"] == tg_text("download_failed", "en")
    assert "reply_markup" not in reply
    assert [c.status for c in botapi.calls if c.method == "getFile"] == [429]
    # and the picture sent again is answered with a joke
    _, again = botapi.push_message(chat, user, photo=botapi.photo(chelsea_jpeg))
    (joke,) = await botapi.wait_for("sendMessage", replies_to(again))
    assert keyboard_counts(joke["reply_markup"]) == ("👍 0", "👎 0")
    assert await app.store.request_outcomes() == {"ok": 1}


async def test_flood_control_on_the_vote_toast_still_updates_the_counts(
    botapi: FakeBotAPI, start_bot: StartBot, chelsea_jpeg: bytes
) -> None:
    """A 429 on ``answerCallbackQuery`` used to abort the handler after the vote was stored but
    before the keyboard refresh was scheduled: the message kept showing the old counts."""
    app = await start_bot()
    user = botapi.user(9201)
    chat = botapi.private_chat(user)
    _, msg = botapi.push_message(chat, user, photo=botapi.photo(chelsea_jpeg))
    (reply,) = await botapi.wait_for("sendMessage", replies_to(msg))
    joke_id = joke_id_of(reply)
    shown = joke_message(botapi, chat["id"], msg)

    botapi.fail("answerCallbackQuery", retry_after=1)
    botapi.push_callback(user, shown, f"v:{joke_id}:+1")
    (edit,) = await botapi.wait_for("editMessageReplyMarkup")
    assert keyboard_counts(edit["reply_markup"]) == ("👍 1", "👎 0")
    assert await app.store.ratings_for(joke_id) == [("tg:9201", 1)]


# --------------------------------------------------------------------------- admin replies


async def test_delete_of_an_unknown_joke_says_there_is_no_such_joke(
    botapi: FakeBotAPI, start_bot: StartBot
) -> None:
    """``/delete 424242`` used to answer "This button is not valid (any more)." — about a button
    the admin never pressed."""
    await start_bot()
    admin = botapi.user(ADMIN_ID, language_code="zh-hans")
    chat = botapi.private_chat(admin)
    _, cmd = botapi.push_message(chat, admin, text="/delete 424242")
    (answer,) = await botapi.wait_for("sendMessage", replies_to(cmd))
    assert answer["text"] != tg_text("bad_button", "zh")
    assert "424242" in answer["text"]
    assert answer["text"] == tg_text("no_such_joke", "zh", joke_id=424242)


# --------------------------------------------------------------------------- secrets


async def test_cli_with_a_rejected_token_does_not_print_it(
    botapi: FakeBotAPI, tmp_path: Path
) -> None:
    """``oogiri telegram set-webhook`` (run from deploy jobs, whose output is kept) with a token
    Telegram rejects: PTB's InvalidToken quotes the token in its message, and it reached the
    terminal as the command's traceback."""
    wrong = "987654321:AAWrongTokenWrongTokenWrongToken_xyz123"
    cli = typer.Typer()
    tg.oogiri_register_commands(cli=cli)
    env = {
        "OOGIRI_DATA_DIR": str(tmp_path),
        "OOGIRI_TELEGRAM__TOKEN": wrong,
        "OOGIRI_TELEGRAM__BASE_URL": botapi.base_url,
        "OOGIRI_TELEGRAM__WEBHOOK_URL": "https://bot.example.test",
    }

    def invoke(*args: str):
        return CliRunner().invoke(cli, ["telegram", *args], env=env)

    for command in ("set-webhook", "webhook-info", "delete-webhook"):
        result = await asyncio.wait_for(asyncio.to_thread(invoke, command), 15)
        shown = result.output
        if result.exception is not None:
            shown += "".join(traceback.format_exception(result.exception))
        assert wrong not in shown and wrong.split(":")[1] not in shown, command
        assert result.exit_code == 2, (command, shown)
        assert "rejected the bot token" in result.output, command
