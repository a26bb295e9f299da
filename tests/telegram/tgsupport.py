"""Helpers shared by the Telegram tests (kept out of conftest.py so that tests can import them)."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from fakebotapi import TOKEN, FakeBotAPI

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
