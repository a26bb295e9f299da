"""A small fake Discord on 127.0.0.1 for exercising discord.py's real HTTP and gateway code.

It speaks just enough of Discord's API v10 for a bot that uses application commands:

REST (under ``/api/v10``)
    ``GET /users/@me``, ``GET /oauth2/applications/@me``, ``GET /gateway``, ``GET /gateway/bot``,
    bulk overwrite of global and guild commands, interaction callbacks (with ``with_response``),
    follow-up webhooks (JSON or multipart with files), ``GET/PATCH/DELETE`` of webhook messages
    (``@original`` or by id) and ``PATCH`` of channel messages.
Gateway (``/gateway``)
    HELLO, IDENTIFY → READY (with ``shard`` when asked), heartbeats → HEARTBEAT_ACK, RESUME →
    RESUMED (INVALID_SESSION for an unknown session), and dispatch of any event
    (``INTERACTION_CREATE`` …) to the shard that owns the guild. Transport compression is whatever
    the client asks for in its URL: ``zlib-stream`` (one shared ``compressobj`` per connection,
    each message ended by ``Z_SYNC_FLUSH``; longer messages are split across two frames, so the
    client's partial-message buffering runs too) or ``zstd-stream`` when the ``zstandard`` module
    is installed.
CDN (``/attachments/…``)
    Serves the bytes registered with :meth:`FakeDiscord.add_file` and counts every download.

Discord semantics modelled because the bot depends on them: one callback per interaction (a second
gets error 40060), a deferred response shows a loading message, and the first follow-up after a
deferral fills that message in (inheriting its ephemerality) instead of posting a new one.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

API = "/api/v10"
EPHEMERAL = 1 << 6
LOADING = 1 << 7
DISCORD_EPOCH_MS = 1420070400000
#: compressed gateway messages longer than this are sent in two WebSocket frames
SPLIT_OVER = 64

# Interaction callback types
PONG, CHANNEL_MESSAGE, DEFERRED_CHANNEL_MESSAGE, DEFERRED_UPDATE, UPDATE_MESSAGE = 1, 4, 5, 6, 7

try:  # discord.py asks for zstd-stream when it can decompress it
    import zstandard
except ModuleNotFoundError:  # pragma: no cover - depends on the environment
    zstandard = None


def json_response(data: Any, status: int = 200) -> web.Response:
    # discord.py parses a body as JSON only when the content type is exactly application/json
    return web.Response(
        body=json.dumps(data).encode(), status=status, headers={"Content-Type": "application/json"}
    )


def iso_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000+00:00", time.gmtime())


@dataclass
class FakeInteraction:
    id: str
    token: str
    payload: dict[str, Any]
    callbacks: list[dict[str, Any]] = field(default_factory=list)
    callback_times: list[float] = field(default_factory=list)
    created: float = field(default_factory=time.monotonic)
    original_id: str | None = None
    deleted_original: bool = False
    followups: list[str] = field(default_factory=list)

    @property
    def channel_id(self) -> str:
        return self.payload["channel_id"]


class GatewaySession:
    """One WebSocket connection of one shard."""

    def __init__(self, ws: web.WebSocketResponse, compress: str | None) -> None:
        self.ws = ws
        self.compress = compress
        self.seq = 0
        self.shard: tuple[int, int] | None = None
        self.identified = asyncio.Event()
        self.heartbeats = 0
        self.frames = 0
        self.split_messages = 0
        self.session_id: str | None = None
        self._lock = asyncio.Lock()
        self._zlib = zlib.compressobj() if compress == "zlib-stream" else None
        self._zstd = (
            zstandard.ZstdCompressor().compressobj()
            if compress == "zstd-stream" and zstandard is not None
            else None
        )

    async def send(self, payload: dict[str, Any]) -> None:
        raw = json.dumps(payload, separators=(",", ":")).encode()
        async with self._lock:  # the compression context is shared by every message, in order
            if self._zlib is not None:
                data = self._zlib.compress(raw) + self._zlib.flush(zlib.Z_SYNC_FLUSH)
                if len(data) > SPLIT_OVER:  # one message over two frames, as Discord may do
                    half = len(data) // 2
                    await self.ws.send_bytes(data[:half])
                    await self.ws.send_bytes(data[half:])
                    self.frames += 2
                    self.split_messages += 1
                else:
                    await self.ws.send_bytes(data)
                    self.frames += 1
            elif self._zstd is not None:
                data = self._zstd.compress(raw) + self._zstd.flush(
                    zstandard.COMPRESSOBJ_FLUSH_BLOCK
                )
                await self.ws.send_bytes(data)
                self.frames += 1
            else:
                await self.ws.send_str(raw.decode())
                self.frames += 1

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        self.seq += 1
        await self.send({"op": 0, "t": event, "s": self.seq, "d": data})


class FakeDiscord:
    def __init__(
        self,
        *,
        token: str = "fake-bot-token",
        heartbeat_interval_ms: int = 400,
        app_name: str = "oogiri-test",
    ) -> None:
        self.token = token
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self._snowflakes = itertools.count(1)
        self.app_id = self.snowflake()
        self.bot_user = self.user(self.app_id, "oogiri", bot=True)
        self.owner = self.user(self.snowflake(), "owner")
        self.app_name = app_name
        self.commands: dict[str | None, list[dict[str, Any]]] = {}  # None: global
        self.command_puts: list[tuple[str | None, list[dict[str, Any]]]] = []
        self.messages: dict[str, dict[str, Any]] = {}
        self.deleted_messages: dict[str, dict[str, Any]] = {}
        self.interactions: dict[str, FakeInteraction] = {}
        self.by_token: dict[str, FakeInteraction] = {}
        self.drop_followups = 0  # the next n follow-ups lose their connection (no answer)
        self.files: dict[str, tuple[bytes, str]] = {}
        self.cdn_hits: Counter[str] = Counter()
        self.requests: list[tuple[str, str]] = []
        self.sessions: list[GatewaySession] = []
        self.identifies: list[dict[str, Any]] = []
        self.resumes: list[dict[str, Any]] = []
        self._known_sessions: dict[str, tuple[int, int] | None] = {}
        self.gateway_queries: list[dict[str, str]] = []
        self.changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.port = 0

    # ------------------------------------------------------------------ ids and objects

    def snowflake(self) -> str:
        now_ms = int(time.time() * 1000) - DISCORD_EPOCH_MS
        return str((now_ms << 22) | next(self._snowflakes))

    @staticmethod
    def user(user_id: str, name: str, *, bot: bool = False) -> dict[str, Any]:
        return {
            "id": user_id,
            "username": name,
            "global_name": name,
            "discriminator": "0",
            "avatar": None,
            "bot": bot,
            "public_flags": 0,
        }

    def new_user(self, name: str = "alice") -> dict[str, Any]:
        return self.user(self.snowflake(), name)

    # ------------------------------------------------------------------ lifecycle

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_base(self) -> str:
        return self.base_url + API

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    async def start(self) -> FakeDiscord:
        app = web.Application(middlewares=[self._log_middleware], client_max_size=64 * 1024 * 1024)
        r = app.router
        r.add_get("/gateway", self._gateway)
        r.add_get("/attachments/{path:.+}", self._cdn)
        r.add_get(API + "/users/@me", self._me)
        r.add_get(API + "/oauth2/applications/@me", self._application)
        r.add_get(API + "/gateway", self._gateway_info)
        r.add_get(API + "/gateway/bot", self._gateway_bot)
        r.add_put(API + "/applications/{app}/commands", self._put_commands)
        r.add_get(API + "/applications/{app}/commands", self._get_commands)
        r.add_put(API + "/applications/{app}/guilds/{guild}/commands", self._put_commands)
        r.add_get(API + "/applications/{app}/guilds/{guild}/commands", self._get_commands)
        r.add_post(API + "/interactions/{id}/{token}/callback", self._callback)
        r.add_post(API + "/webhooks/{app}/{token}", self._followup)
        wh = API + "/webhooks/{app}/{token}/messages/{message}"
        r.add_get(wh, self._get_webhook_message)
        r.add_patch(wh, self._edit_webhook_message)
        r.add_delete(wh, self._delete_webhook_message)
        r.add_patch(API + "/channels/{channel}/messages/{message}", self._edit_channel_message)
        r.add_delete(API + "/channels/{channel}/messages/{message}", self._delete_channel_message)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def close(self) -> None:
        for session in list(self.sessions):
            if not session.ws.closed:
                await session.ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def wait_until(self, predicate: Callable[[], Any], within: float = 5.0) -> Any:
        """Wait for ``predicate()`` to become truthy (re-checked after every change)."""

        async def waiter() -> Any:
            async with self.changed:
                while not (result := predicate()):
                    await self.changed.wait()
                return result

        return await asyncio.wait_for(waiter(), within)

    # ------------------------------------------------------------------ REST helpers

    @web.middleware
    async def _log_middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append((request.method, request.path))
        if request.path.startswith(API) and not self._public(request.path):
            if request.headers.get("Authorization") != f"Bot {self.token}":
                return self._error(401, 0, "401: Unauthorized")
        return await handler(request)

    @staticmethod
    def _public(path: str) -> bool:
        # interaction callbacks and webhooks authenticate by their token in the URL
        return path.startswith((API + "/interactions/", API + "/webhooks/"))

    @staticmethod
    def _error(status: int, code: int, text: str) -> web.Response:
        return json_response({"code": code, "message": text}, status=status)

    async def _body(self, request: web.Request) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """JSON body, or multipart ``payload_json`` plus ``files[n]`` parts."""
        if request.content_type.startswith("multipart/"):
            payload: dict[str, Any] = {}
            files: list[dict[str, Any]] = []
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if part.name == "payload_json":
                    payload = json.loads(await part.text())
                else:
                    files.append(
                        {
                            "name": part.name,
                            "filename": part.filename,
                            "content_type": part.headers.get("Content-Type"),
                            "data": await part.read(),
                        }
                    )
            return payload, files
        if request.can_read_body:
            return await request.json(), []
        return {}, []

    # ------------------------------------------------------------------ CDN

    def add_file(
        self,
        filename: str,
        data: bytes,
        content_type: str | None,
        *,
        size: int | None = None,
        channel_id: str | None = None,
        width: int | None = None,
        height: int | None = None,
    ) -> dict[str, Any]:
        """Put bytes on the CDN and return the attachment object that points at them.

        ``size`` may claim another size than ``len(data)`` (as a crafted payload could).
        """
        attachment_id = self.snowflake()
        path = f"{channel_id or '0'}/{attachment_id}/{filename}"
        self.files[path] = (data, content_type or "application/octet-stream")
        url = f"{self.base_url}/attachments/{path}"
        attachment: dict[str, Any] = {
            "id": attachment_id,
            "filename": filename,
            "size": len(data) if size is None else size,
            "url": url,
            "proxy_url": url,
        }
        if content_type is not None:
            attachment["content_type"] = content_type
        if width is not None:
            attachment["width"], attachment["height"] = width, height
        return attachment

    async def _cdn(self, request: web.Request) -> web.Response:
        path = request.match_info["path"]
        self.cdn_hits[path] += 1
        if path not in self.files:
            return web.Response(status=404)
        data, content_type = self.files[path]
        return web.Response(body=data, content_type=content_type)

    @staticmethod
    def _cdn_path(attachment: dict[str, Any]) -> str:
        return attachment["url"].split("/attachments/", 1)[1]

    def hits_for(self, attachment: dict[str, Any]) -> int:
        return self.cdn_hits[self._cdn_path(attachment)]

    def file_bytes(self, attachment: dict[str, Any]) -> bytes:
        return self.files[self._cdn_path(attachment)][0]

    # ------------------------------------------------------------------ identity

    async def _me(self, request: web.Request) -> web.Response:
        return json_response(self.bot_user)

    async def _application(self, request: web.Request) -> web.Response:
        return json_response(
            {
                "id": self.app_id,
                "name": self.app_name,
                "icon": None,
                "description": "",
                "bot_public": True,
                "bot_require_code_grant": False,
                "owner": self.owner,
                "team": None,
                "verify_key": "00" * 32,
                "flags": 0,
                "bot": self.bot_user,
                "summary": "",
            }
        )

    async def _gateway_info(self, request: web.Request) -> web.Response:
        return json_response({"url": self.gateway_url})

    async def _gateway_bot(self, request: web.Request) -> web.Response:
        return json_response(
            {
                "url": self.gateway_url,
                "shards": 1,
                "session_start_limit": {
                    "total": 1000,
                    "remaining": 999,
                    "reset_after": 14400000,
                    "max_concurrency": 1,
                },
            }
        )

    # ------------------------------------------------------------------ commands

    async def _put_commands(self, request: web.Request) -> web.Response:
        if request.match_info["app"] != self.app_id:
            return self._error(403, 50001, "Missing Access")
        guild = request.match_info.get("guild")
        body, _ = await self._body(request)
        stored = []
        for command in body:
            stored.append(
                {
                    "id": self.snowflake(),
                    "application_id": self.app_id,
                    "version": self.snowflake(),
                    "default_member_permissions": None,
                    "type": 1,
                    "description": "",
                    "options": [],
                    "nsfw": False,
                    **({"guild_id": guild} if guild else {}),
                    **command,
                }
            )
        self.commands[guild] = stored
        self.command_puts.append((guild, body))
        await self._notify()
        return json_response(stored)

    async def _get_commands(self, request: web.Request) -> web.Response:
        return json_response(self.commands.get(request.match_info.get("guild"), []))

    def find_command(self, name: str, guild_id: str | None, kind: int = 1) -> dict[str, Any]:
        for scope in ([guild_id] if guild_id else []) + [None]:
            for command in self.commands.get(scope, []):
                if command["name"] == name and command.get("type", 1) == kind:
                    return command
        raise LookupError(f"command {name!r} (type {kind}) was never synced for {guild_id}")

    # ------------------------------------------------------------------ gateway

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True, heartbeat=None)
        await ws.prepare(request)
        query = dict(request.query)
        self.gateway_queries.append(query)
        compress = query.get("compress")
        if compress == "zstd-stream" and zstandard is None:
            await ws.close(code=4000, message=b"zstd-stream not available")
            return ws
        session = GatewaySession(ws, compress)
        self.sessions.append(session)
        await session.send({"op": 10, "d": {"heartbeat_interval": self.heartbeat_interval_ms}})
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                frame = json.loads(msg.data)
                op, data = frame.get("op"), frame.get("d")
                if op == 1:
                    session.heartbeats += 1
                    await session.send({"op": 11})
                    await self._notify()
                elif op == 2:
                    await self._identify(session, data)
                elif op == 6:
                    await self._resume(session, data)
        finally:
            if session in self.sessions:
                self.sessions.remove(session)
            await self._notify()
        return ws

    async def _identify(self, session: GatewaySession, data: dict[str, Any]) -> None:
        if data.get("token") != self.token:
            await session.ws.close(code=4004, message=b"Authentication failed.")
            return
        self.identifies.append(data)
        ready: dict[str, Any] = {
            "v": 10,
            "user": self.bot_user,
            "guilds": [],
            "private_channels": [],
            "relationships": [],
            "session_id": f"session-{len(self.identifies)}",
            "session_type": "normal",
            "resume_gateway_url": self.gateway_url,
            "application": {"id": self.app_id, "flags": 0},
            "_trace": ["fake-discord"],
        }
        if data.get("shard"):
            session.shard = (data["shard"][0], data["shard"][1])
            ready["shard"] = list(session.shard)
        session.session_id = ready["session_id"]
        self._known_sessions[session.session_id] = session.shard
        await session.dispatch("READY", ready)
        session.identified.set()
        await self._notify()

    async def _resume(self, session: GatewaySession, data: dict[str, Any]) -> None:
        session_id = data.get("session_id")
        if data.get("token") != self.token or session_id not in self._known_sessions:
            await session.send({"op": 9, "d": False})  # INVALID_SESSION, not resumable
            return
        self.resumes.append(data)
        session.session_id = session_id
        session.shard = self._known_sessions[session_id]
        session.seq = int(data.get("seq") or 0)
        await session.dispatch("RESUMED", {})
        session.identified.set()
        await self._notify()

    async def drop_connections(self, code: int = 4000) -> None:
        """Close every gateway connection as Discord does on an unknown error (resumable)."""
        for session in list(self.sessions):
            await session.ws.close(code=code, message=b"Unknown error")

    def ready_sessions(self) -> list[GatewaySession]:
        return [s for s in self.sessions if s.identified.is_set() and not s.ws.closed]

    async def wait_connected(self, count: int = 1, within: float = 5.0) -> None:
        await self.wait_until(lambda: len(self.ready_sessions()) >= count, within)

    def session_for(self, guild_id: str | None) -> GatewaySession:
        sessions = self.ready_sessions()
        if not sessions:
            raise RuntimeError("no bot is connected to the fake gateway")
        for session in sessions:
            if session.shard is None:
                return session
            shard_id, count = session.shard
            wanted = (int(guild_id) >> 22) % count if guild_id else 0
            if shard_id == wanted:
                return session
        raise RuntimeError(f"no connected shard serves guild {guild_id}")

    # ------------------------------------------------------------------ interactions

    def _base_interaction(
        self,
        kind: int,
        data: dict[str, Any],
        *,
        user: dict[str, Any],
        channel_id: str,
        guild_id: str | None,
        locale: str,
    ) -> dict[str, Any]:
        interaction_id = self.snowflake()
        token = f"itoken-{interaction_id}"
        payload: dict[str, Any] = {
            "id": interaction_id,
            "application_id": self.app_id,
            "type": kind,
            "data": data,
            "channel_id": channel_id,
            "token": token,
            "version": 1,
            "locale": locale,
            "app_permissions": "562949953421311",
            "entitlements": [],
            "attachment_size_limit": 10 * 1024 * 1024,
        }
        if guild_id:
            payload["guild_id"] = guild_id
            payload["guild_locale"] = "en-US"
            payload["guild"] = {"id": guild_id, "locale": "en-US", "features": []}
            payload["channel"] = {
                "id": channel_id,
                "type": 0,
                "guild_id": guild_id,
                "name": "general",
                "position": 0,
                "permission_overwrites": [],
                "nsfw": False,
                "parent_id": None,
                "topic": None,
                "last_message_id": None,
                "rate_limit_per_user": 0,
                "flags": 0,
                "permissions": "562949953421311",
            }
            payload["member"] = {
                "user": user,
                "roles": [],
                "joined_at": iso_now(),
                "deaf": False,
                "mute": False,
                "flags": 0,
                "permissions": "562949953421311",
            }
            payload["authorizing_integration_owners"] = {"0": guild_id}
            payload["context"] = 0
        else:
            payload["channel"] = {"id": channel_id, "type": 1, "recipients": [user]}
            payload["user"] = user
            payload["authorizing_integration_owners"] = {"0": "0"}
            payload["context"] = 1
        self.interactions[interaction_id] = FakeInteraction(interaction_id, token, payload)
        self.by_token[token] = self.interactions[interaction_id]
        return payload

    async def _send_interaction(self, payload: dict[str, Any]) -> FakeInteraction:
        await self.session_for(payload.get("guild_id")).dispatch("INTERACTION_CREATE", payload)
        return self.interactions[payload["id"]]

    async def slash(
        self,
        name: str,
        *,
        user: dict[str, Any],
        channel_id: str,
        guild_id: str | None = None,
        attachments: dict[str, dict[str, Any]] | None = None,
        options: list[dict[str, Any]] | None = None,
        locale: str = "en-US",
        resolved: dict[str, Any] | None = None,
    ) -> FakeInteraction:
        """Dispatch a chat-input command. ``attachments``: option name → attachment object;
        ``resolved``: users (etc.) the options name, as Discord resolves them."""
        command = self.find_command(name, guild_id, kind=1)
        opts = list(options or [])
        resolved = dict(resolved or {})
        for option_name, attachment in (attachments or {}).items():
            opts.append({"name": option_name, "type": 11, "value": attachment["id"]})
            resolved.setdefault("attachments", {})[attachment["id"]] = attachment
        data: dict[str, Any] = {"id": command["id"], "name": name, "type": 1, "options": opts}
        if resolved:
            data["resolved"] = resolved
        if "guild_id" in command:
            data["guild_id"] = command["guild_id"]
        payload = self._base_interaction(
            2, data, user=user, channel_id=channel_id, guild_id=guild_id, locale=locale
        )
        return await self._send_interaction(payload)

    async def message_command(
        self,
        name: str,
        target: dict[str, Any],
        *,
        user: dict[str, Any],
        guild_id: str | None = None,
        locale: str = "en-US",
    ) -> FakeInteraction:
        """Dispatch a message context-menu command on ``target`` (a message object)."""
        command = self.find_command(name, guild_id, kind=3)
        data: dict[str, Any] = {
            "id": command["id"],
            "name": name,
            "type": 3,
            "target_id": target["id"],
            "resolved": {"messages": {target["id"]: target}},
        }
        if "guild_id" in command:
            data["guild_id"] = command["guild_id"]
        payload = self._base_interaction(
            2, data, user=user, channel_id=target["channel_id"], guild_id=guild_id, locale=locale
        )
        return await self._send_interaction(payload)

    async def press(
        self,
        message_id: str,
        custom_id: str,
        *,
        user: dict[str, Any],
        guild_id: str | None = None,
        channel_id: str | None = None,
        locale: str = "en-US",
    ) -> FakeInteraction:
        """Press the button ``custom_id`` of a message (as the client would show it)."""
        msg = self.messages[message_id]
        data = {"custom_id": custom_id, "component_type": 2}
        payload = self._base_interaction(
            3,
            data,
            user=user,
            channel_id=channel_id or msg["channel_id"],
            guild_id=guild_id,
            locale=locale,
        )
        payload["message"] = msg
        return await self._send_interaction(payload)

    def post_user_message(
        self,
        *,
        author: dict[str, Any],
        channel_id: str,
        guild_id: str | None = None,
        content: str = "",
        attachments: list[dict[str, Any]] | None = None,
        embeds: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """A message by a person, as the target of a context-menu command."""
        msg = self._message(channel_id, {"content": content}, author=author)
        msg["attachments"] = attachments or []
        msg["embeds"] = embeds or []
        if guild_id:
            msg["guild_id"] = guild_id
        self.messages[msg["id"]] = msg
        return msg

    # ------------------------------------------------------------------ messages

    def _message(
        self,
        channel_id: str,
        body: dict[str, Any],
        *,
        author: dict[str, Any] | None = None,
        flags: int = 0,
        files: list[dict[str, Any]] | None = None,
        interaction: FakeInteraction | None = None,
    ) -> dict[str, Any]:
        message_id = self.snowflake()
        msg: dict[str, Any] = {
            "id": message_id,
            "channel_id": channel_id,
            "type": 0,
            "content": body.get("content") or "",
            "author": author or self.bot_user,
            "timestamp": iso_now(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": self._attachments(channel_id, files or []),
            "embeds": body.get("embeds") or [],
            "components": body.get("components") or [],
            "pinned": False,
            "flags": flags | int(body.get("flags") or 0),
        }
        if interaction is not None:
            msg["webhook_id"] = self.app_id
            msg["application_id"] = self.app_id
            msg["type"] = 20 if interaction.payload["type"] == 2 else 0
            invoker = interaction.payload.get("member", {}).get("user") or interaction.payload.get(
                "user"
            )
            msg["interaction_metadata"] = {
                "id": interaction.id,
                "type": interaction.payload["type"],
                "user": invoker,
                "authorizing_integration_owners": interaction.payload[
                    "authorizing_integration_owners"
                ],
            }
        return msg

    def _attachments(self, channel_id: str, files: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            self.add_file(f["filename"], f["data"], f["content_type"], channel_id=channel_id)
            for f in files
        ]

    def _apply_edit(
        self, msg: dict[str, Any], body: dict[str, Any], files: list[dict[str, Any]]
    ) -> None:
        for key in ("content", "embeds", "components"):
            if key in body:
                msg[key] = body[key] if body[key] is not None else ([] if key != "content" else "")
        if "flags" in body and body["flags"] is not None:
            msg["flags"] = (msg["flags"] & EPHEMERAL) | int(body["flags"])
        if files or "attachments" in body:
            kept = {str(a.get("id")) for a in body.get("attachments") or []}
            msg["attachments"] = [a for a in msg["attachments"] if a["id"] in kept]
            msg["attachments"] += self._attachments(msg["channel_id"], files)
        msg["edited_timestamp"] = iso_now()

    def visible_messages(self, channel_id: str) -> list[dict[str, Any]]:
        """Messages everyone in the channel sees (not ephemeral, not loading)."""
        return [
            m
            for m in self.messages.values()
            if m["channel_id"] == channel_id and not m["flags"] & (EPHEMERAL | LOADING)
        ]

    # ------------------------------------------------------------------ interaction responses

    async def _callback(self, request: web.Request) -> web.Response:
        interaction = self.interactions.get(request.match_info["id"])
        if interaction is None or interaction.token != request.match_info["token"]:
            return self._error(404, 10062, "Unknown interaction")
        if interaction.callbacks:
            return self._error(400, 40060, "Interaction has already been acknowledged.")
        body, files = await self._body(request)
        kind, data = body.get("type"), body.get("data") or {}
        interaction.callbacks.append(body)
        interaction.callback_times.append(time.monotonic() - interaction.created)
        message: dict[str, Any] | None = None
        if kind == CHANNEL_MESSAGE:
            message = self._message(
                interaction.channel_id, data, files=files, interaction=interaction
            )
        elif kind == DEFERRED_CHANNEL_MESSAGE:
            message = self._message(
                interaction.channel_id,
                {},
                flags=LOADING | (int(data.get("flags") or 0) & EPHEMERAL),
                interaction=interaction,
            )
        elif kind == UPDATE_MESSAGE:
            message = self.messages[interaction.payload["message"]["id"]]
            self._apply_edit(message, data, files)
        elif kind == DEFERRED_UPDATE:
            # a component's deferred update: "@original" is now the message the component is on
            interaction.original_id = interaction.payload.get("message", {}).get("id")
        else:
            return self._error(400, 50035, f"unsupported callback type {kind}")
        if message is not None and kind in (CHANNEL_MESSAGE, DEFERRED_CHANNEL_MESSAGE):
            self.messages[message["id"]] = message
            interaction.original_id = message["id"]
        await self._notify()
        response: dict[str, Any] = {
            "interaction": {
                "id": interaction.id,
                "type": interaction.payload["type"],
                **(
                    {
                        "response_message_id": message["id"],
                        "response_message_loading": bool(message["flags"] & LOADING),
                        "response_message_ephemeral": bool(message["flags"] & EPHEMERAL),
                    }
                    if message is not None
                    else {}
                ),
            },
        }
        if message is not None:
            response["resource"] = {"type": kind, "message": message}
        if request.query.get("with_response") in ("1", "true", "True"):
            return json_response(response)
        return web.Response(status=204)

    def _interaction_for(self, request: web.Request) -> FakeInteraction | None:
        interaction = self.by_token.get(request.match_info["token"])
        if interaction is None or request.match_info["app"] != self.app_id:
            return None
        return interaction

    def _webhook_message(
        self, interaction: FakeInteraction, message_id: str
    ) -> dict[str, Any] | None:
        if message_id == "@original":
            message_id = interaction.original_id or ""
        if message_id != interaction.original_id and message_id not in interaction.followups:
            return None
        return self.messages.get(message_id)

    async def _followup(self, request: web.Request) -> web.Response:
        interaction = self._interaction_for(request)
        if interaction is None:
            return self._error(404, 10015, "Unknown Webhook")
        if not interaction.callbacks:
            return self._error(404, 10015, "Unknown Webhook")  # not acknowledged yet
        body, files = await self._body(request)
        if self.drop_followups > 0:  # the network fails: the bot never hears back
            self.drop_followups -= 1
            self.requests.append(("DROPPED", request.path))
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=500)
        original = self.messages.get(interaction.original_id or "")
        if original is not None and original["flags"] & LOADING:
            # the first follow-up after a deferral fills in the "thinking…" message, which stays
            # as ephemeral (or public) as the deferral made it: the follow-up's flag is ignored
            ephemeral = original["flags"] & EPHEMERAL
            self._apply_edit(original, body, files)
            original["flags"] = (original["flags"] & ~(LOADING | EPHEMERAL)) | ephemeral
            msg = original
        else:
            msg = self._message(interaction.channel_id, body, files=files, interaction=interaction)
            msg["flags"] = int(body.get("flags") or 0) & EPHEMERAL
            self.messages[msg["id"]] = msg
            interaction.followups.append(msg["id"])
        await self._notify()
        if request.query.get("wait") in ("1", "true", "True"):
            return json_response(msg)
        return web.Response(status=204)

    async def _get_webhook_message(self, request: web.Request) -> web.Response:
        interaction = self._interaction_for(request)
        msg = interaction and self._webhook_message(interaction, request.match_info["message"])
        if not msg:
            return self._error(404, 10008, "Unknown Message")
        return json_response(msg)

    async def _edit_webhook_message(self, request: web.Request) -> web.Response:
        interaction = self._interaction_for(request)
        msg = interaction and self._webhook_message(interaction, request.match_info["message"])
        if not msg:
            return self._error(404, 10008, "Unknown Message")
        body, files = await self._body(request)
        self._apply_edit(msg, body, files)
        msg["flags"] &= ~LOADING
        await self._notify()
        return json_response(msg)

    async def _delete_webhook_message(self, request: web.Request) -> web.Response:
        interaction = self._interaction_for(request)
        msg = interaction and self._webhook_message(interaction, request.match_info["message"])
        if not msg:
            return self._error(404, 10008, "Unknown Message")
        self.deleted_messages[msg["id"]] = self.messages.pop(msg["id"])
        if msg["id"] == interaction.original_id:  # type: ignore[union-attr]
            interaction.deleted_original = True  # type: ignore[union-attr]
        await self._notify()
        return web.Response(status=204)

    async def _delete_channel_message(self, request: web.Request) -> web.Response:
        msg = self.messages.get(request.match_info["message"])
        if msg is None or msg["channel_id"] != request.match_info["channel"]:
            return self._error(404, 10008, "Unknown Message")
        if msg["author"]["id"] != self.bot_user["id"]:
            return self._error(403, 50013, "Missing Permissions")
        self.deleted_messages[msg["id"]] = self.messages.pop(msg["id"])
        await self._notify()
        return web.Response(status=204)

    async def _edit_channel_message(self, request: web.Request) -> web.Response:
        msg = self.messages.get(request.match_info["message"])
        if msg is None or msg["channel_id"] != request.match_info["channel"]:
            return self._error(404, 10008, "Unknown Message")
        if msg["author"]["id"] != self.bot_user["id"]:
            return self._error(403, 50005, "Cannot edit a message authored by another user")
        body, files = await self._body(request)
        self._apply_edit(msg, body, files)
        await self._notify()
        return json_response(msg)
