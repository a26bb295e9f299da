"""No token, key or secret in any log line or any answer, over a whole session of every channel.

One App with every secret configured (Telegram bot token and webhook secret, the engine's API key,
the web cookie secret), logging set up exactly as ``oogiri serve`` does (``configure_logging``) at
DEBUG, serving the real web server (uvicorn, access log on) and Telegram (python-telegram-bot
polling the fake Bot API), with an engine server that answers one request with a 500 quoting our
``Authorization`` header back. Then every byte the log handler wrote and every response body are
searched for each secret.

Other security properties are tested where they live (see docs/reliability.md): forged/stale vote
buttons (tests/telegram, tests/discord, tests/test_web.py), admin-only /stats, the webhook secret,
the signed cookie and CSRF, the upload limit before the body, data:-only image URLs to the engine,
per-user caps in the training export.
"""

from __future__ import annotations

import asyncio
import io
import logging
from pathlib import Path

import httpx
import pytest
from relreport import Reliability

pytest.importorskip("telegram")

from fake_openai import FakeOpenAI
from fakebotapi import TOKEN, FakeBotAPI
from tgsupport import ADMIN_ID, STEP_TIMEOUT_S, make_settings

import plugins.telegram as telegram_plugin
from bot.app import App
from bot.logs import configure_logging
from plugins import web as web_plugin
from plugins.web import CSRF_HEADER

openai_http = pytest.importorskip("bot.engines.openai_http")

API_KEY = "sk-live-0123456789abcdefSECRETKEY"
WEBHOOK_SECRET = "whsec_ThisMustNeverBeLogged_42"
COOKIE_SECRET = "cookie-secret-that-signs-identities-0123456789"


async def test_no_secret_in_logs_or_answers_over_a_whole_session(
    tmp_path: Path, chelsea_png: bytes, reliability: Reliability
) -> None:
    reliability.case(
        "security", "secrets-in-logs", "secrets",
        "web + Telegram session at DEBUG with token, webhook secret, API key and cookie secret "
        "set; the engine quotes our Authorization header in a 500",
        "no secret in any log line or response",
    )  # fmt: skip
    api = FakeBotAPI()
    await asyncio.wait_for(api.start(), STEP_TIMEOUT_S)
    engine_server = await FakeOpenAI().start()
    settings = make_settings(
        tmp_path,
        api,
        channels=["web", "telegram"],
        log_level="DEBUG",
        telegram={"webhook_secret": WEBHOOK_SECRET},
        web={"host": "127.0.0.1", "port": 0, "cookie_secret": COOKIE_SECRET},
        engine={
            "name": "openai",
            "base_urls": [engine_server.url],
            "served_model_name": "fake-vl",
            "api_key": API_KEY,
            "retries": 1,
            "retry_backoff_s": 0.01,
        },
        limits={"per_user_per_minute": 0},
    )
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    configure_logging(settings)
    sink = io.StringIO()
    root.handlers[0].stream = sink  # type: ignore[attr-defined]
    bodies: list[str] = []
    app = None
    try:
        with reliability.measure(time_limit_s=60):
            app = await App.create(settings, plugins=[telegram_plugin, web_plugin, openai_http])
            await asyncio.wait_for(app.start_channels(), STEP_TIMEOUT_S)
            web = next(c for c in app.channels if c.name == "web")
            async with httpx.AsyncClient(base_url=web.url) as client:
                bodies.append((await client.get("/")).text)
                token = (await client.get("/api/session")).json()["csrf_token"]
                files = {"image": ("c.png", chelsea_png, "image/png")}
                engine_server.script = ["echo-auth-500", "echo-auth-500"]
                failed = await client.post("/api/jokes", files=files)
                bodies.append(failed.text)
                assert failed.status_code == 503
                joke = await client.post("/api/jokes", files=files)
                bodies.append(joke.text)
                assert joke.status_code == 201
                headers = {CSRF_HEADER: token, "Origin": web.url}
                url = f"/api/jokes/{joke.json()['id']}/rating"
                for value in (1, 7):
                    r = await client.post(url, json={"value": value}, headers=headers)
                    bodies.append(r.text)
                for path in ("/healthz", "/metrics", "/stats", "/api/stats"):
                    bodies.append((await client.get(path)).text)
            # Telegram: a picture, a vote, an admin command, a bad file
            user = api.user(ADMIN_ID, language_code="en")
            chat = api.private_chat(user)
            _, msg = api.push_message(chat, user, photo=api.photo(chelsea_png))
            (reply,) = await api.wait_for("sendMessage", within=STEP_TIMEOUT_S)
            joke_msg = next(
                m for (c, _), m in api.messages.items() if c == chat["id"] and m is not msg
            )
            data = reply["reply_markup"]["inline_keyboard"][0][0]["callback_data"]
            api.push_callback(user, joke_msg, data)
            await api.wait_for("answerCallbackQuery", within=STEP_TIMEOUT_S)
            api.push_message(chat, user, text="/stats")
            api.push_message(chat, user, document=api.document(b"nope", "image/png", "x.png"))
            await api.wait_for("sendMessage", count=3, within=STEP_TIMEOUT_S)
            await app.close()
            app = None
    finally:
        if app is not None:
            await app.close()
        await engine_server.stop()
        await api.stop()
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    logged = sink.getvalue()
    # the session did happen, and loudly: requests, PTB's DEBUG chatter, the engine's 500
    assert "POST /api/jokes" in logged and "answered 500" in logged
    assert "Bearer **********" in logged  # the quoted header reached the log, redacted
    assert "telegram" in logged.lower()
    secrets = {
        "bot token": TOKEN,
        "bot token secret part": TOKEN.split(":", 1)[1],
        "engine API key": API_KEY,
        "webhook secret": WEBHOOK_SECRET,
        "cookie secret": COOKIE_SECRET,
    }
    everything = logged + "\n".join(bodies) + "".join(str(c.params) for c in api.calls)
    leaked = [name for name, value in secrets.items() if value in everything]
    assert leaked == []
    reliability.observe(
        f"{len(logged.splitlines())} log lines, {len(bodies)} web answers, "
        f"{len(api.calls)} Bot API calls searched: no secret found",
        log_lines=len(logged.splitlines()),
    )
