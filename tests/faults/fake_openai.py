"""A small OpenAI-compatible vision server on 127.0.0.1 (aiohttp) that misbehaves on demand.

``mode`` decides how every ``POST /v1/chat/completions`` is answered (``script`` — a list of modes —
is consumed first, one per request): ``ok`` a short joke; ``http-500`` / ``http-503`` an error
body; ``hang`` never answers (until the client gives up); ``html-200`` a 200 HTML page;
``no-choices`` 200 JSON without choices; ``bad-usage`` a good answer with nonsense ``usage``;
``nul-text`` a joke with NUL bytes in it; ``huge`` a 1 MB answer (ignoring max_tokens); ``die``
reads the request, then drops the connection without a byte; ``echo-auth-500`` a 500 whose
message quotes the request's Authorization header. ``stop()`` closes the port, so the
engine meets "connection refused". Every request body is kept in ``requests``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

MODEL = "fake-vl"
JOKE = "这只猫在思考：周一为什么总是来得这么快？"


class FakeOpenAI:
    def __init__(self) -> None:
        self.mode = "ok"
        self.script: list[str] = []
        self.requests: list[dict[str, Any]] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> FakeOpenAI:
        app = web.Application(client_max_size=32 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port or self.port, reuse_address=True)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.mode == "ok" else 503)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        mode = self.script.pop(0) if self.script else self.mode
        if mode == "hang":
            await asyncio.sleep(3600)
        if mode == "die":
            assert request.transport is not None
            request.transport.abort()  # RST: not one byte of an answer
            await asyncio.sleep(3600)
        if mode == "http-500":
            return web.json_response(
                {"object": "error", "message": "CUDA error: an illegal memory access", "code": 500},
                status=500,
            )
        if mode == "echo-auth-500":  # a careless server quoting our credentials back
            auth = request.headers.get("Authorization", "")
            return web.json_response(
                {"object": "error", "message": f"rejected header Authorization: {auth}"},
                status=500,
            )
        if mode == "http-503":
            return web.json_response(
                {"object": "error", "message": "too many requests in the queue", "code": 503},
                status=503,
            )
        if mode == "html-200":
            page = "<html><h1>502 Bad Gateway</h1></html>"
            return web.Response(text=page, content_type="text/html")
        if mode == "no-choices":
            return web.json_response({"id": "x", "object": "chat.completion", "choices": []})
        text = {"huge": "哈" * (1024 * 1024 // 3), "nul-text": "猫\x00咪\x00"}.get(mode, JOKE)
        usage: Any = {"prompt_tokens": 100, "completion_tokens": 12, "total_tokens": 112}
        if mode == "bad-usage":
            usage = "lots"
        return web.Response(
            text=json.dumps(
                {
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "model": MODEL,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": usage,
                },
                ensure_ascii=False,
            ),
            content_type="application/json",
        )
