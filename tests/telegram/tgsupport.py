"""Helpers shared by the Telegram tests (kept out of conftest.py so that tests can import them)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from fakebotapi import BOT_ID, BOT_USERNAME, TOKEN, FakeBotAPI

import plugins.telegram as tg
from bot.app import App
from bot.settings import Settings

ADMIN_ID = 4242
STEP_TIMEOUT_S = 15.0

StartBot = Callable[..., Awaitable[App]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def jokes_in(api: FakeBotAPI, chat_id: int) -> list[dict[str, Any]]:
    """Joke replies (with a vote keyboard) the bot delivered into ``chat_id``, in order."""
    return [
        c.params
        for c in api.calls
        if c.method == "sendMessage"
        and c.status == 200
        and int(c.params["chat_id"]) == chat_id
        and "reply_markup" in c.params
    ]


def make_settings(tmp_path: Path, api: FakeBotAPI, **overrides: Any) -> Settings:
    telegram = {
        "token": TOKEN,
        "base_url": api.base_url,
        "base_file_url": api.base_file_url,
        "admin_ids": [ADMIN_ID],
        **overrides.pop("telegram", {}),
    }
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "channels": ["telegram"],
        "plugins": [],  # entry points off: the plugin under test is handed in directly
        "language": "en",
        **overrides,
    }
    return Settings(_env_file=None, telegram=telegram, **values)


HANDLE = f"@{BOT_USERNAME}"
#: a group photo's caption that mentions the bot (groups answer only those)
MENTION = {
    "caption": f"{HANDLE} 猫",
    "caption_entities": [{"type": "mention", "offset": 0, "length": len(HANDLE)}],
}
FAST_OUTBOX = {"outbox_poll_s": 0.1}


def basic_group(api: FakeBotAPI, chat_id: int) -> dict[str, Any]:
    """A basic group (small negative id), the kind Telegram upgrades to a supergroup."""
    chat = {"id": chat_id, "type": "group", "title": "Memes"}
    api.chats[chat_id] = chat
    return chat


def replies_to(msg: dict[str, Any]) -> Callable[[dict[str, Any]], bool]:
    return lambda p: (p.get("reply_parameters") or {}).get("message_id") == msg["message_id"]


def joke_id_of(params: dict[str, Any]) -> int:
    vote = tg.parse_vote(params["reply_markup"]["inline_keyboard"][0][0]["callback_data"])
    assert vote is not None
    return vote[0]


def bot_message(api: FakeBotAPI, chat_id: int, joke_id: int) -> dict[str, Any]:
    """The bot's message carrying joke ``joke_id``'s keyboard in ``chat_id``."""
    for (cid, _), msg in api.messages.items():
        markup = msg.get("reply_markup") or {}
        rows = markup.get("inline_keyboard") or [[{}]]
        data = rows[0][0].get("callback_data")
        if cid == chat_id and msg["from"]["id"] == BOT_ID and data == tg.vote_data(joke_id, 1):
            return msg
    raise AssertionError(f"no message of joke {joke_id} in {chat_id}")


async def wait_until(check: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)
