"""A small fake Telegram Bot API server (aiohttp, 127.0.0.1) for tests and benchmarks.

It speaks the HTTP API python-telegram-bot uses — ``POST /bot<token>/<method>`` with form or JSON
parameters and ``GET /file/bot<token>/<path>`` for downloads — with Telegram's response envelope
(``{"ok": true, "result": …}`` / ``{"ok": false, "error_code": …, "description": …}``) and the
behaviours a bot depends on: long-polling ``getUpdates`` with offsets, 409 while a webhook is set,
"message is not modified" on identical edits, callback queries answerable once, 429 with
``retry_after``. Failures are injected as Telegram answers them: ``fail_chat`` refuses one chat
(429, after which that chat stays refused for ``retry_after`` seconds, or a 5xx) and ``chaos``
refuses a random share of all chat sends; ``migrate_chat`` upgrades a group to a supergroup, after
which every call naming the old chat gets Telegram's 400 with ``parameters.migrate_to_chat_id``.
Every call is recorded so a test can see exactly what the bot sent.

The other half plays the users: ``push_*`` helpers build real update JSON (``anonymous_message``:
posts with ``sender_chat``, as anonymous admins and "send as channel" produce) and queue it
(polling) or ``post_webhook`` delivers it to the bot's webhook like Telegram does.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import ClientSession, ClientTimeout, web

TOKEN = "123456789:AAFakeTokenForOogiriTests_0123456789abc"
BOT_ID = 123456789
BOT_USERNAME = "oogiri_test_bot"
# The placeholder senders Telegram puts in ``from`` of anonymous posts (Bot API docs, Message).
GROUP_ANONYMOUS_BOT = {
    "id": 1087968824,
    "is_bot": True,
    "first_name": "Group",
    "username": "GroupAnonymousBot",
}
CHANNEL_BOT = {"id": 136817688, "is_bot": True, "first_name": "Channel", "username": "Channel_Bot"}
#: Methods that put a message into a chat (what flood control and chaos apply to).
CHAT_SENDS = ("sendMessage", "editMessageReplyMarkup", "editMessageText", "deleteMessage")
FILE_LIMIT = 20 * 1024 * 1024

# Parameters that are always strings (PTB sends them raw; everything else is JSON-encoded).
STRING_PARAMS = {
    "text",
    "caption",
    "callback_query_id",
    "url",
    "secret_token",
    "file_id",
    "action",
    "language_code",
    "ip_address",
    "parse_mode",
    "inline_message_id",
}


@dataclass
class Call:
    method: str
    params: dict[str, Any]
    status: int
    at: float = field(default_factory=time.monotonic)


@dataclass
class FakeFile:
    file_id: str
    unique_id: str
    path: str
    data: bytes
    size: int


class BotAPIError(Exception):
    def __init__(self, code: int, description: str, parameters: dict[str, Any] | None = None):
        super().__init__(description)
        self.code = code
        self.description = description
        self.parameters = parameters


class FakeBotAPI:
    def __init__(self, token: str = TOKEN, bot_id: int = BOT_ID, username: str = BOT_USERNAME):
        self.token = token
        self.me = {
            "id": bot_id,
            "is_bot": True,
            "first_name": "Oogiri",
            "username": username,
            "can_join_groups": True,
            "can_read_all_group_messages": False,
            "supports_inline_queries": False,
        }
        self.calls: list[Call] = []
        self.updates: list[dict[str, Any]] = []
        self.confirmed_offset = 0  # updates below this id were confirmed by the bot
        self.files: dict[str, FakeFile] = {}
        self.messages: dict[tuple[int, int], dict[str, Any]] = {}  # every message we know of
        self.chats: dict[int, dict[str, Any]] = {}
        self.open_queries: dict[str, dict[str, Any]] = {}  # callback queries not yet answered
        self.webhook: dict[str, Any] = {"url": ""}
        self.commands: dict[str | None, list[dict[str, Any]]] = {}
        self.failures: dict[str, list[int]] = {}
        self.chat_failures: dict[tuple[str, int], list[tuple[int, int]]] = {}
        self.flood_until: dict[int, float] = {}  # chat → its 429 holds until then
        self.migrated: dict[int, int] = {}  # a group → the supergroup it was upgraded to
        self.chaos_rates: tuple[float, float] = (0.0, 0.0)
        self.chaos_retry_after = 1
        self._chaos = random.Random(0)
        self.injected: dict[str, int] = {"429": 0, "5xx": 0}
        self.port = 0
        self._ids = itertools.count(1)
        self._update_ids = itertools.count(1)
        self._message_ids = itertools.count(1)
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self._closing = asyncio.Event()

    # ------------------------------------------------------------------ server

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/bot"

    @property
    def base_file_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/file/bot"

    async def start(self) -> FakeBotAPI:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/bot{token}/{method}", self._api)
        app.router.add_get("/file/bot{token}/{path:.+}", self._download)
        self._runner = web.AppRunner(
            app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        self._closing.set()
        async with self._changed:
            self._changed.notify_all()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeBotAPI:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ failure injection

    def fail(self, method: str, retry_after: int = 1, times: int = 1) -> None:
        """Answer the next ``times`` calls of ``method`` with 429 Too Many Requests."""
        self.failures.setdefault(method, []).extend([retry_after] * times)

    def fail_chat(
        self,
        chat_id: int,
        method: str = "sendMessage",
        times: int = 1,
        status: int = 429,
        retry_after: int = 1,
    ) -> None:
        """Fail the next ``times`` ``method`` calls into ``chat_id`` only: 429 (flood control:
        the chat then stays refused for ``retry_after`` seconds, as Telegram does) or a 5xx."""
        self.chat_failures.setdefault((method, chat_id), []).extend([(status, retry_after)] * times)

    def migrate_chat(self, old_id: int, new_id: int, title: str = "Memes") -> dict[str, Any]:
        """Upgrade group ``old_id`` to supergroup ``new_id`` (returned): from now on every call
        naming the old chat is answered as Telegram does, 400 with ``migrate_to_chat_id``."""
        self.migrated[old_id] = new_id
        return self.group_chat(new_id, title)

    def _migration(self, params: dict[str, Any]) -> web.Response | None:
        try:
            new_id = self.migrated.get(int(params.get("chat_id")))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return None
        if new_id is None:
            return None
        return _error(
            400,
            "Bad Request: group chat was upgraded to a supergroup chat",
            {"migrate_to_chat_id": new_id},
        )

    def chaos(self, rate_429: float, rate_5xx: float, retry_after: int = 1, seed: int = 0) -> None:
        """Refuse a share of chat sends at random: 429 for that chat, or a 5xx (benchmarks)."""
        self.chaos_rates = (rate_429, rate_5xx)
        self.chaos_retry_after = retry_after
        self._chaos = random.Random(seed)

    def _chat_failure(self, method: str, params: dict[str, Any]) -> web.Response | None:
        if method not in CHAT_SENDS:
            return None
        try:
            chat_id = int(params.get("chat_id"))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return None
        now = time.monotonic()
        until = self.flood_until.get(chat_id, 0.0)
        if until > now:  # still under flood control: Telegram keeps refusing this chat
            left = max(1, round(until - now))
            return _error(429, f"Too Many Requests: retry after {left}", {"retry_after": left})
        planned = self.chat_failures.get((method, chat_id))
        status, retry_after = planned.pop(0) if planned else (0, 0)
        if not status:
            r429, r5xx = self.chaos_rates
            roll = self._chaos.random()
            if roll < r429:
                status, retry_after = 429, self.chaos_retry_after
            elif roll < r429 + r5xx:
                status = 502
        if status == 429:
            self.injected["429"] += 1
            self.flood_until[chat_id] = now + retry_after
            return _error(
                429, f"Too Many Requests: retry after {retry_after}", {"retry_after": retry_after}
            )
        if status >= 500:
            self.injected["5xx"] += 1
            return _error(status, "Bad Gateway" if status == 502 else "Internal Server Error")
        return None

    # ------------------------------------------------------------------ what the bot did

    def sent(self, method: str, ok_only: bool = True) -> list[dict[str, Any]]:
        return [
            c.params for c in self.calls if c.method == method and (c.status == 200 or not ok_only)
        ]

    def calls_to(self, chat_id: int) -> list[Call]:
        return [c for c in self.calls if _same_id(c.params.get("chat_id"), chat_id)]

    async def wait_for(
        self,
        method: str,
        predicate: Callable[[dict[str, Any]], bool] | None = None,
        count: int = 1,
        within: float = 5.0,
    ) -> list[dict[str, Any]]:
        """Params of successful ``method`` calls matching ``predicate``, once ``count`` exist."""

        def matching() -> list[dict[str, Any]]:
            return [p for p in self.sent(method) if predicate is None or predicate(p)]

        async def wait() -> list[dict[str, Any]]:
            async with self._changed:
                while len(found := matching()) < count:
                    await self._changed.wait()
                return found

        try:
            return await asyncio.wait_for(wait(), within)
        except TimeoutError:
            seen = [(c.method, c.status) for c in self.calls[-20:]]
            raise AssertionError(
                f"timed out waiting for {count}× {method}; last calls: {seen}"
            ) from None

    async def wait_consumed(self, update_id: int, within: float = 5.0) -> None:
        """Wait until the bot confirmed ``update_id`` (asked for updates past it)."""

        async def wait() -> None:
            async with self._changed:
                while self.confirmed_offset <= update_id:
                    await self._changed.wait()

        await asyncio.wait_for(wait(), within)

    # ------------------------------------------------------------------ users' side

    def user(self, user_id: int, first_name: str = "Ann", language_code: str | None = "en"):
        user: dict[str, Any] = {"id": user_id, "is_bot": False, "first_name": first_name}
        if language_code:
            user["language_code"] = language_code
        return user

    def private_chat(self, user: dict[str, Any]) -> dict[str, Any]:
        chat = {"id": user["id"], "type": "private", "first_name": user["first_name"]}
        self.chats[chat["id"]] = chat
        return chat

    def group_chat(self, chat_id: int = -1001234567890, title: str = "Memes") -> dict[str, Any]:
        chat = {"id": chat_id, "type": "supergroup", "title": title}
        self.chats[chat_id] = chat
        return chat

    def add_file(self, data: bytes, suffix: str = "jpg", size: int | None = None) -> FakeFile:
        n = next(self._ids)
        file = FakeFile(
            file_id=f"FILE{n:06d}-{len(data)}",
            unique_id=f"U{n:06d}",
            path=f"files/file_{n}.{suffix}",
            data=data,
            size=len(data) if size is None else size,
        )
        self.files[file.file_id] = file
        return file

    def photo(self, data: bytes, width: int = 451, height: int = 300) -> list[dict[str, Any]]:
        """PhotoSize list as Telegram sends it: a thumbnail, then the full size."""
        thumb = self.add_file(data[: max(1, len(data) // 10)])
        full = self.add_file(data)
        return [
            {
                "file_id": thumb.file_id,
                "file_unique_id": thumb.unique_id,
                "width": max(1, width // 4),
                "height": max(1, height // 4),
                "file_size": thumb.size,
            },
            {
                "file_id": full.file_id,
                "file_unique_id": full.unique_id,
                "width": width,
                "height": height,
                "file_size": full.size,
            },
        ]

    def document(
        self, data: bytes, mime_type: str, file_name: str, size: int | None = None
    ) -> dict[str, Any]:
        file = self.add_file(data, file_name.rsplit(".", 1)[-1], size=size)
        return {
            "file_id": file.file_id,
            "file_unique_id": file.unique_id,
            "file_name": file_name,
            "mime_type": mime_type,
            "file_size": file.size,
        }

    def sticker(self, data: bytes, animated: bool = False, video: bool = False) -> dict[str, Any]:
        file = self.add_file(data, "tgs" if animated else "webm" if video else "webp")
        return {
            "file_id": file.file_id,
            "file_unique_id": file.unique_id,
            "type": "regular",
            "width": 512,
            "height": 512,
            "is_animated": animated,
            "is_video": video,
            "emoji": "😹",
            "file_size": file.size,
        }

    def media(self, kind: str) -> dict[str, Any]:
        """A video, voice, video_note or animation attachment (never downloaded by the bot)."""
        file = self.add_file(b"\x00" * 64, "bin")
        base = {"file_id": file.file_id, "file_unique_id": file.unique_id, "file_size": file.size}
        if kind in ("video", "animation"):
            base.update(width=320, height=240, duration=3, mime_type="video/mp4")
        elif kind == "voice":
            base.update(duration=2, mime_type="audio/ogg")
        elif kind == "video_note":
            base.update(length=240, duration=2)
        return base

    def message(
        self,
        chat: dict[str, Any],
        user: dict[str, Any],
        reply_to: dict[str, Any] | None = None,
        **content: Any,
    ) -> dict[str, Any]:
        """A user's message in ``chat``; ``content`` holds text/caption/photo/document/…"""
        msg: dict[str, Any] = {
            "message_id": next(self._message_ids),
            "date": int(time.time()),
            "chat": chat,
            "from": user,
            **content,
        }
        if reply_to is not None:
            msg["reply_to_message"] = {k: v for k, v in reply_to.items() if k != "reply_to_message"}
        if "text" in msg and msg["text"].startswith("/") and "entities" not in msg:
            command = msg["text"].split()[0]
            msg["entities"] = [{"type": "bot_command", "offset": 0, "length": len(command)}]
        self.messages[(chat["id"], msg["message_id"])] = msg
        return msg

    def anonymous_message(
        self,
        chat: dict[str, Any],
        as_chat: dict[str, Any] | None = None,
        **content: Any,
    ) -> dict[str, Any]:
        """A post with ``sender_chat``: an anonymous admin of ``chat`` (``as_chat`` unset) or a
        member posting as their channel ``as_chat``, as the Bot API shows them."""
        placeholder = GROUP_ANONYMOUS_BOT if as_chat is None else CHANNEL_BOT
        msg = self.message(chat, placeholder, **content)
        msg["sender_chat"] = as_chat or chat
        return msg

    def channel_chat(self, chat_id: int = -1009876543210, title: str = "Cats") -> dict[str, Any]:
        chat = {"id": chat_id, "type": "channel", "title": title}
        self.chats[chat_id] = chat
        return chat

    def update(self, **payload: Any) -> dict[str, Any]:
        return {"update_id": next(self._update_ids), **payload}

    def push(self, update: dict[str, Any]) -> dict[str, Any]:
        self.updates.append(update)
        asyncio.get_running_loop().create_task(self._notify())
        return update

    def push_message(self, chat: dict[str, Any], user: dict[str, Any], **content: Any):
        """Queue a message update; returns ``(update, message)``."""
        msg = self.message(chat, user, **content)
        return self.push(self.update(message=msg)), msg

    def callback_update(
        self, user: dict[str, Any], message: dict[str, Any] | None, data: str
    ) -> dict[str, Any]:
        query_id = f"Q{next(self._ids)}"
        query: dict[str, Any] = {
            "id": query_id,
            "from": user,
            "chat_instance": "ci-1",
            "data": data,
        }
        if message is not None:
            query["message"] = message
        self.open_queries[query_id] = query
        return self.update(callback_query=query)

    def push_callback(self, user: dict[str, Any], message: dict[str, Any] | None, data: str):
        update = self.callback_update(user, message, data)
        self.push(update)
        return update["callback_query"]["id"]

    async def post_webhook(
        self, url: str, update: dict[str, Any], secret: str | None, within: float = 5.0
    ) -> int:
        """Deliver ``update`` like Telegram: POST JSON with the secret-token header."""
        headers = {"Content-Type": "application/json"}
        if secret is not None:
            headers["X-Telegram-Bot-Api-Secret-Token"] = secret
        async with (
            ClientSession(timeout=ClientTimeout(total=within)) as session,
            session.post(url, data=json.dumps(update), headers=headers) as response,
        ):
            await response.read()
            return response.status

    # ------------------------------------------------------------------ HTTP handlers

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _params(self, request: web.Request) -> dict[str, Any]:
        raw: dict[str, Any] = dict(request.query)
        if request.can_read_body:
            if request.content_type == "application/json":
                body = await request.json()
                return {**raw, **(body or {})}
            form = await request.post()
            for key, value in form.items():
                raw[key] = value if isinstance(value, str) else value.file.read()
        params: dict[str, Any] = {}
        for key, value in raw.items():
            if isinstance(value, str) and key not in STRING_PARAMS:
                try:
                    value = json.loads(value)
                except ValueError:
                    pass
            params[key] = value
        return params

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        if request.match_info["token"] != self.token:
            return _error(401, "Unauthorized")
        params = await self._params(request)
        refused = self._migration(params) or self._chat_failure(method, params)
        if refused is not None:
            await self._record(method, params, refused.status)
            return refused
        pending = self.failures.get(method)
        if pending:
            retry_after = pending.pop(0)
            await self._record(method, params, 429)
            return _error(
                429,
                f"Too Many Requests: retry after {retry_after}",
                {"retry_after": retry_after},
            )
        handler = getattr(self, f"api_{method}", None)
        if handler is None:
            await self._record(method, params, 404)
            return _error(404, "Not Found")
        try:
            result = await handler(params)
        except BotAPIError as exc:
            await self._record(method, params, exc.code)
            return _error(exc.code, exc.description, exc.parameters)
        if method != "getUpdates" or result:
            await self._record(method, params, 200)
        return web.json_response({"ok": True, "result": result})

    async def _record(self, method: str, params: dict[str, Any], status: int) -> None:
        async with self._changed:
            self.calls.append(Call(method, params, status))
            self._changed.notify_all()

    async def _download(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return web.Response(status=401)
        path = request.match_info["path"]
        for file in self.files.values():
            if file.path == path:
                await self._record("download", {"file_path": path}, 200)
                return web.Response(body=file.data, content_type="application/octet-stream")
        return web.Response(status=404)

    # ------------------------------------------------------------------ Bot API methods

    async def api_getMe(self, params: dict[str, Any]) -> Any:
        return self.me

    async def api_getUpdates(self, params: dict[str, Any]) -> Any:
        if self.webhook["url"]:
            raise BotAPIError(
                409,
                "Conflict: can't use getUpdates method while webhook is active; "
                "use deleteWebhook to delete the webhook first",
            )
        offset = int(params.get("offset") or 0)
        limit = max(1, min(100, int(params.get("limit") or 100)))
        timeout = max(0.0, float(params.get("timeout") or 0))
        if offset:
            async with self._changed:
                self.updates = [u for u in self.updates if u["update_id"] >= offset]
                self.confirmed_offset = max(self.confirmed_offset, offset)
                self._changed.notify_all()

        def available() -> list[dict[str, Any]]:
            return [u for u in self.updates if u["update_id"] >= offset][:limit]

        deadline = time.monotonic() + timeout
        async with self._changed:
            while not (found := available()) and not self._closing.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    await asyncio.wait_for(self._changed.wait(), left)
                except TimeoutError:
                    break
        return found

    def _bot_message(self, chat_id: Any, params: dict[str, Any], **content: Any) -> dict[str, Any]:
        chat_id = int(chat_id)
        chat = self.chats.get(chat_id) or {"id": chat_id, "type": "private", "first_name": "?"}
        msg: dict[str, Any] = {
            "message_id": next(self._message_ids),
            "date": int(time.time()),
            "chat": chat,
            "from": self.me,
            **content,
        }
        if params.get("message_thread_id"):
            msg["message_thread_id"] = params["message_thread_id"]
            msg["is_topic_message"] = True
        reply = params.get("reply_parameters") or {}
        original = self.messages.get((chat_id, int(reply.get("message_id") or 0)))
        if original is not None:
            msg["reply_to_message"] = {k: v for k, v in original.items() if k != "reply_to_message"}
        elif reply and not reply.get("allow_sending_without_reply"):
            raise BotAPIError(400, "Bad Request: message to be replied not found")
        markup = params.get("reply_markup")
        if markup and "inline_keyboard" in markup:
            msg["reply_markup"] = markup
        self.messages[(chat_id, msg["message_id"])] = msg
        return msg

    async def api_sendMessage(self, params: dict[str, Any]) -> Any:
        body = params.get("text")
        if "chat_id" not in params:
            raise BotAPIError(400, "Bad Request: chat_id is empty")
        if not isinstance(body, str) or not body.strip():
            raise BotAPIError(400, "Bad Request: message text is empty")
        if len(body) > 4096:
            raise BotAPIError(400, "Bad Request: message is too long")
        return self._bot_message(params["chat_id"], params, text=body)

    async def api_sendChatAction(self, params: dict[str, Any]) -> Any:
        if "chat_id" not in params or not params.get("action"):
            raise BotAPIError(400, "Bad Request: wrong parameters")
        return True

    async def api_getFile(self, params: dict[str, Any]) -> Any:
        file = self.files.get(str(params.get("file_id")))
        if file is None:
            raise BotAPIError(400, "Bad Request: invalid file_id")
        if file.size > FILE_LIMIT:
            raise BotAPIError(400, "Bad Request: file is too big")
        return {
            "file_id": file.file_id,
            "file_unique_id": file.unique_id,
            "file_size": file.size,
            "file_path": file.path,
        }

    def _find(self, params: dict[str, Any]) -> dict[str, Any]:
        key = (int(params.get("chat_id") or 0), int(params.get("message_id") or 0))
        msg = self.messages.get(key)
        if msg is None or msg.get("from", {}).get("id") != self.me["id"]:
            raise BotAPIError(400, "Bad Request: message to edit not found")
        return msg

    async def api_editMessageReplyMarkup(self, params: dict[str, Any]) -> Any:
        msg = self._find(params)
        markup = params.get("reply_markup") or None
        if markup == msg.get("reply_markup"):
            raise BotAPIError(
                400,
                "Bad Request: message is not modified: specified new message content and reply "
                "markup are exactly the same as a current content and reply markup of the message",
            )
        if markup:
            msg["reply_markup"] = markup
        else:
            msg.pop("reply_markup", None)
        return msg

    async def api_editMessageText(self, params: dict[str, Any]) -> Any:
        msg = self._find(params)
        markup = params.get("reply_markup") or None
        if params.get("text") == msg.get("text") and markup == msg.get("reply_markup"):
            raise BotAPIError(400, "Bad Request: message is not modified")
        msg["text"] = params.get("text")
        if markup:
            msg["reply_markup"] = markup
        return msg

    async def api_deleteMessage(self, params: dict[str, Any]) -> Any:
        key = (int(params.get("chat_id") or 0), int(params.get("message_id") or 0))
        if self.messages.pop(key, None) is None:
            raise BotAPIError(400, "Bad Request: message to delete not found")
        return True

    async def api_answerCallbackQuery(self, params: dict[str, Any]) -> Any:
        if self.open_queries.pop(str(params.get("callback_query_id")), None) is None:
            raise BotAPIError(
                400,
                "Bad Request: query is too old and response timeout expired or query ID is invalid",
            )
        return True

    async def api_setWebhook(self, params: dict[str, Any]) -> Any:
        url = params.get("url") or ""
        if url and not url.startswith("https://"):
            raise BotAPIError(400, "Bad Request: bad webhook: HTTPS url must be provided")
        self.webhook = {
            "url": url,
            "secret_token": params.get("secret_token"),
            "allowed_updates": params.get("allowed_updates"),
            "max_connections": params.get("max_connections", 40),
        }
        if params.get("drop_pending_updates"):
            self.updates.clear()
        return True

    async def api_deleteWebhook(self, params: dict[str, Any]) -> Any:
        self.webhook = {"url": ""}
        if params.get("drop_pending_updates"):
            self.updates.clear()
        return True

    async def api_getWebhookInfo(self, params: dict[str, Any]) -> Any:
        info: dict[str, Any] = {
            "url": self.webhook["url"],
            "has_custom_certificate": False,
            "pending_update_count": len(self.updates),
        }
        if self.webhook["url"]:
            info["max_connections"] = self.webhook.get("max_connections") or 40
            if self.webhook.get("allowed_updates"):
                info["allowed_updates"] = self.webhook["allowed_updates"]
            if self.webhook.get("last_error_message"):
                info["last_error_date"] = int(time.time())
                info["last_error_message"] = self.webhook["last_error_message"]
        return info

    async def api_setMyCommands(self, params: dict[str, Any]) -> Any:
        commands = params.get("commands")
        if not isinstance(commands, list):
            raise BotAPIError(400, "Bad Request: commands must be an array")
        self.commands[params.get("language_code")] = commands
        return True

    async def api_getMyCommands(self, params: dict[str, Any]) -> Any:
        return self.commands.get(params.get("language_code"), [])

    async def api_deleteMyCommands(self, params: dict[str, Any]) -> Any:
        self.commands.pop(params.get("language_code"), None)
        return True


def _same_id(value: Any, chat_id: int) -> bool:
    try:
        return int(value) == chat_id
    except (TypeError, ValueError):
        return False


def _error(code: int, description: str, parameters: dict[str, Any] | None = None) -> web.Response:
    body: dict[str, Any] = {"ok": False, "error_code": code, "description": description}
    if parameters:
        body["parameters"] = parameters
    return web.json_response(body, status=code)


def keyboard_counts(markup: dict[str, Any] | None) -> tuple[str, ...]:
    """The button labels of an inline keyboard, e.g. ``("👍 1", "👎 0")``."""
    if not markup:
        return ()
    rows: Iterable[list[dict[str, Any]]] = markup.get("inline_keyboard", [])
    return tuple(button["text"] for row in rows for button in row)
