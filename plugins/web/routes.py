"""The JSON API and the operations endpoints of the web channel, assembled into one FastAPI app.

Everything a person does here goes through ``JokeService`` (``tell`` / ``rate`` / ``get_joke``);
this module only translates HTTP ⇄ ``JokeRequest`` / ``Joke`` / ``Rating``.

Uploads are size-limited before the body is read (Content-Length) and while it streams, so a
100 MB body is refused after at most ``images.max_bytes`` + a little slack has been received.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from bot.models import Joke, JokeRequest, NotFound, OogiriError, Rejected, message
from bot.plugins import resolve
from plugins.web import hookspecs
from plugins.web.errors import TooLarge, error_response, limit_mb, oogiri_error_response
from plugins.web.metrics import WebMiddleware
from plugins.web.pages import add_page_routes, stats_rows
from plugins.web.sessions import CSRF_HEADER, Visitor, same_origin
from plugins.web.state import web_state
from plugins.web.texts import request_language, web_message

if TYPE_CHECKING:
    from bot.app import App

log = logging.getLogger(__name__)

CHANNEL = "web"
#: Room for the multipart boundaries, part headers and the hint field around the image itself.
MULTIPART_SLACK = 64 * 1024
#: A slow client must finish sending its upload within this time.
UPLOAD_READ_TIMEOUT_S = 120.0
MAX_JSON_BODY = 1024
#: The status logged for a request whose client left before the answer (nginx's 499).
CLIENT_CLOSED = 499


#: A joke's public id (``Joke.public_id``): URL-safe base64, ASCII only.
PUBLIC_ID = re.compile(r"[A-Za-z0-9_-]{8,32}")
#: A refused upload's body is still read (and dropped) up to this much, so that clients which
#: send the whole body before reading (Python's urllib, curl without Expect) see the answer
#: instead of a connection reset; beyond it the connection is closed unread.
DRAIN_MAX_BYTES = 4 * 1024 * 1024
DRAIN_TIMEOUT_S = 10.0


def parse_public_id(raw: str) -> str | None:
    """The public id in a URL, or None (``str.isdigit`` and friends accept "²" and "⑦")."""
    return raw if PUBLIC_ID.fullmatch(raw) else None


async def drain(request: Request, limit: int) -> bool:
    """Read and drop the rest of the body, up to ``limit`` bytes; True when it all arrived."""
    received = 0
    try:
        async with asyncio.timeout(DRAIN_TIMEOUT_S):
            while True:
                msg = await request.receive()
                if msg["type"] == "http.disconnect":
                    return False
                received += len(msg.get("body", b""))
                if not msg.get("more_body", False):
                    return True
                if received > limit:
                    return False
    except (TimeoutError, ClientDisconnect, RuntimeError):  # RuntimeError: stream consumed
        return False


def create_api(app: App) -> FastAPI:
    """The FastAPI application of the web channel for ``app`` (also used directly by tests)."""
    settings = app.settings
    state = web_state(app)
    identities = state.identities
    max_bytes = settings.images.max_bytes
    body_limit = max_bytes + MULTIPART_SLACK

    # Routes added by other plugins (e.g. a Telegram webhook) through ``oogiri_web_routes``.
    plugin_router = APIRouter()
    pending: list[Awaitable[Any]] = []
    if not hasattr(app.pm.hook, "oogiri_web_routes"):  # an app built without this plugin
        app.pm.add_hookspecs(hookspecs)
    for result in app.pm.hook.oogiri_web_routes(router=plugin_router, app=app):
        if hasattr(result, "__await__"):
            pending.append(result)

    @asynccontextmanager
    async def lifespan(api: FastAPI) -> AsyncIterator[None]:
        if pending:
            for awaitable in pending:
                await resolve(awaitable)
            api.include_router(plugin_router)
        yield

    api = FastAPI(
        title="oogiri",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
    )
    api.state.oogiri = app

    # ------------------------------------------------------------------ helpers

    guard = state.guard

    def visitor(request: Request) -> Visitor:
        return identities.visitor(request)

    def remember(response: Response, who: Visitor) -> Response:
        return identities.remember(response, who, settings.web.secure_cookies)

    def refuse(request: Request, status: int, key: str, lang: str) -> JSONResponse:
        state.metrics.refused.labels(key).inc()
        return error_response(status, key, web_message(key, lang))

    def joke_json(joke: Joke, demo: bool, vote: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": joke.public_id,
            "text": joke.text,
            "model_version": joke.model_version,
            "up": joke.up,
            "down": joke.down,
            # The engine declared itself a demo (random tiny model): the text is noise.
            "demo": demo,
        }
        if vote is not None:
            out["vote"] = vote
        return out

    async def web_joke(raw_id: str) -> Joke:
        """Only jokes told on the web are visible here: other channels' chats stay private."""
        public_id = parse_public_id(raw_id)
        if public_id is None:
            raise NotFound()
        joke = await app.service.get_joke_by_public_id(public_id)
        if joke.channel != CHANNEL:
            raise NotFound()
        return joke

    async def admit_identity(request: Request, who: Visitor, network: str) -> None:
        """A new identity costs one of its network's session slots (``RateLimited``)."""
        if who.is_new:
            await guard.new_session(network)

    async def refuse_unread(request: Request, response: Response, limit: int) -> Response:
        """Answer a request whose body we will not use: drain a small one, else close."""
        if not await drain(request, limit):
            response.headers["Connection"] = "close"
        return response

    def declared_length(request: Request) -> int | None:
        value = request.headers.get("content-length")
        if value is None or not value.isascii() or not value.isdigit():
            return None
        return int(value)

    add_page_routes(api, app, state)
    api.mount("/static", state.assets, name="static")

    # ------------------------------------------------------------------ JSON API

    @api.get("/api/session")
    async def session(request: Request) -> Response:
        """For API clients: sets the identity cookie and returns the CSRF token for votes."""
        who = visitor(request)
        try:
            await admit_identity(request, who, guard.network(request))
        except OogiriError as exc:
            return oogiri_error_response(exc, request_language(request, settings))
        return remember(JSONResponse({"csrf_token": who.csrf}), who)

    @api.post("/api/jokes")
    async def tell(request: Request) -> Response:
        lang = request_language(request, settings)
        who = visitor(request)
        if not same_origin(request):
            return await refuse_unread(
                request, refuse(request, 403, "cross_site", lang), body_limit
            )
        content_type = request.headers.get("content-type", "")
        if not content_type.lower().startswith("multipart/form-data"):
            return await refuse_unread(
                request, refuse(request, 415, "unsupported_media_type", lang), body_limit
            )
        raw_length = request.headers.get("content-length")
        declared = declared_length(request)
        if raw_length is not None and declared is None:
            return refuse(request, 400, "bad_request", lang)  # cannot drain what is unframed
        if declared is not None and declared > body_limit:
            # refused before a session slot was paid for: no new identity with this answer
            return await _too_large(
                request, lang, None if who.is_new else who, declared - body_limit
            )
        network = guard.network(request)
        try:
            await admit_identity(request, who, network)
            await guard.upload(network)
            with guard.admit(network):
                return await _tell(request, lang, who, network)
        except OogiriError as exc:
            state.metrics.refused.labels(exc.key).inc()
            response = oogiri_error_response(exc, lang)
            return await refuse_unread(request, response, body_limit)

    async def _tell(request: Request, lang: str, who: Visitor, network: str) -> Response:
        received = 0

        async def capped() -> AsyncGenerator[bytes, None]:
            nonlocal received
            async for chunk in request.stream():
                received += len(chunk)
                if received > body_limit:
                    raise TooLarge()
                yield chunk

        form = None
        try:
            async with asyncio.timeout(UPLOAD_READ_TIMEOUT_S):
                parser = MultiPartParser(
                    request.headers, capped(), max_files=1, max_fields=4, max_part_size=16 * 1024
                )
                form = await parser.parse()
                upload = form.get("image")
                hint = form.get("hint")
                if not isinstance(upload, UploadFile):
                    return remember(refuse(request, 400, "no_image", lang), who)
                data = await upload.read()
        except TooLarge:
            declared = declared_length(request)
            return await _too_large(request, lang, who, declared and declared - body_limit)
        except TimeoutError:
            response = remember(refuse(request, 408, "upload_timeout", lang), who)
            response.headers["Connection"] = "close"
            return response
        except ClientDisconnect:
            # The person gave up (closed the tab, lost the network): nothing to answer, no error.
            log.info("web: client went away during an upload after %d bytes", received)
            state.metrics.refused.labels("client_disconnect").inc()
            return Response(status_code=CLIENT_CLOSED)
        except MultiPartException as exc:
            if "maximum size" in str(exc):  # only text fields have a part limit: the hint
                limit = settings.limits.max_hint_chars
                refused = Rejected(key="hint_too_long", limit=limit)
                return remember(oogiri_error_response(refused, lang), who)
            return remember(refuse(request, 400, "bad_form", lang), who)
        except (KeyError, ValueError):
            return remember(refuse(request, 400, "bad_form", lang), who)
        finally:
            if form is not None:
                await form.close()
        state.metrics.upload_bytes.observe(len(data))
        joke_request = JokeRequest(
            image_bytes=data,
            channel=CHANNEL,
            user_id=who.user_id,
            hint=(hint.strip() or None) if isinstance(hint, str) else None,
            language=lang,
            filename=upload.filename,
            content_type=upload.content_type,
            # Not stored; lets an oogiri_before_joke plugin apply per-address quotas.
            meta={"remote_addr": str(guard.address(request) or ""), "network": network},
        )
        try:
            joke = await app.service.tell(joke_request)
        except OogiriError as exc:
            return remember(oogiri_error_response(exc, lang), who)
        response = JSONResponse(
            joke_json(joke, await state.demo()),
            status_code=201,
            headers={"Location": f"/api/jokes/{joke.public_id}"},
        )
        return remember(response, who)

    async def _too_large(
        request: Request, lang: str, who: Visitor | None, excess: int | None
    ) -> Response:
        """413; the rest of a body declared slightly too large is read so the client sees the
        answer (``excess`` None: a chunked body of unknown size, never drained; ``who`` None:
        no identity to remember)."""
        state.metrics.refused.labels("too_large").inc()
        response = error_response(
            413, "too_large", message("too_large", lang, limit_mb=limit_mb(max_bytes))
        )
        if who is not None:
            response = remember(response, who)
        if excess is None or excess > DRAIN_MAX_BYTES:
            response.headers["Connection"] = "close"  # not worth reading: close honestly
            return response
        return await refuse_unread(request, response, DRAIN_MAX_BYTES)

    @api.get("/api/jokes/{joke_id}")
    async def get_joke(joke_id: str, request: Request) -> Response:
        lang = request_language(request, settings)
        try:
            joke = await web_joke(joke_id)
        except OogiriError as exc:
            return oogiri_error_response(exc, lang)
        return JSONResponse(
            joke_json(joke, await state.demo()), headers={"Cache-Control": "no-store"}
        )

    @api.post("/api/jokes/{joke_id}/rating")
    async def rate(joke_id: str, request: Request) -> Response:
        lang = request_language(request, settings)
        who = visitor(request)
        if not same_origin(request):
            return await refuse_unread(request, refuse(request, 403, "cross_site", lang), 4096)
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            return await refuse_unread(request, refuse(request, 415, "json_required", lang), 4096)
        if who.is_new or not identities.csrf_ok(who.user_id, request.headers.get(CSRF_HEADER)):
            # A new identity cannot carry a valid token: the cookie was missing or forged.
            response = refuse(request, 403, "csrf", lang)
            try:  # the fresh identity handed back costs a session slot, as everywhere else
                await admit_identity(request, who, guard.network(request))
            except OogiriError:
                pass  # none left for this network: refused without an identity
            else:
                response = remember(response, who)
            return await refuse_unread(request, response, 4096)
        network = guard.network(request)
        try:
            await guard.vote(network)
        except OogiriError as exc:
            state.metrics.refused.labels(exc.key).inc()
            return await refuse_unread(request, oogiri_error_response(exc, lang), 4096)
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_JSON_BODY:
                    response = remember(refuse(request, 413, "bad_request", lang), who)
                    return await refuse_unread(request, response, 4096)
        except ClientDisconnect:
            log.info("web: client went away while sending a vote")
            return Response(status_code=CLIENT_CLOSED)
        try:
            payload = json.loads(body)
        except ValueError:
            return remember(refuse(request, 400, "bad_request", lang), who)
        value = payload.get("value") if isinstance(payload, dict) else None
        if isinstance(value, bool) or value not in (1, -1):
            return remember(error_response(400, "bad_vote", message("bad_vote", lang)), who)
        try:
            joke = await web_joke(joke_id)
            rating = await app.service.rate(
                joke.id, who.user_id, value, CHANNEL, network=guard.network_hash(network)
            )
        except OogiriError as exc:
            return remember(oogiri_error_response(exc, lang), who)
        return remember(
            JSONResponse(
                {
                    "id": joke.public_id,
                    "up": rating.up,
                    "down": rating.down,
                    "vote": rating.value,
                    "previous": rating.previous,
                }
            ),
            who,
        )

    @api.get("/api/stats")
    async def api_stats(request: Request) -> Response:
        if not settings.web.public_stats:
            lang = request_language(request, settings)
            return error_response(404, "not_found", web_message("not_found", lang))
        return JSONResponse(
            {"versions": await stats_rows(app)}, headers={"Cache-Control": "no-store"}
        )

    # ------------------------------------------------------------------ operations

    @api.get("/healthz")
    async def healthz() -> Response:
        engine = app.engine
        engine_info: dict[str, Any]
        try:
            health = await asyncio.wait_for(engine.health(), timeout=10)
            engine_info = {"ok": bool(health.ok), "model": health.model, "detail": health.detail}
            demo = bool(getattr(health, "demo", False))
            state.note_demo(demo)
        except Exception as exc:  # a probe must answer, whatever the engine does
            engine_info = {"ok": False, "detail": type(exc).__name__}
        engine_info["name"] = getattr(engine, "name", type(engine).__name__)
        engine_info["demo"] = await state.demo()
        db_info: dict[str, Any]
        started = time.perf_counter()
        try:
            await asyncio.wait_for(app.service.check_store(), timeout=5)
            db_info = {"ok": True, "latency_ms": round((time.perf_counter() - started) * 1000, 1)}
        except Exception as exc:
            db_info = {"ok": False, "detail": type(exc).__name__}
        ok = engine_info["ok"] and db_info["ok"]
        return JSONResponse(
            {"ok": ok, "engine": engine_info, "database": db_info},
            status_code=200 if ok else 503,
            headers={"Cache-Control": "no-store"},
        )

    @api.get("/livez")
    async def livez() -> Response:
        # Liveness: the process and its event loop answer. A dependency being down is /healthz's
        # business (readiness); restarting the bot would not bring LMDeploy back.
        return JSONResponse({"ok": True}, headers={"Cache-Control": "no-store"})

    metrics_token = settings.web.metrics_token

    @api.get("/metrics")
    async def metrics(request: Request) -> Response:
        if metrics_token is not None and metrics_token.get_secret_value():
            given = request.headers.get("authorization", "")
            expected = f"Bearer {metrics_token.get_secret_value()}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                lang = request_language(request, settings)
                return error_response(
                    401,
                    "metrics_auth",
                    web_message("metrics_auth", lang),
                    {"WWW-Authenticate": 'Bearer realm="metrics"'},
                )
        body = app.metrics.render() + state.metrics.render()
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @api.exception_handler(OogiriError)
    async def oogiri_error(request: Request, exc: OogiriError) -> Response:
        # A user-facing error outside the routes' own handling, e.g. the database went away
        # under the stats page: its message and status, not a 500.
        return oogiri_error_response(exc, request_language(request, settings))

    @api.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
        log.info("web: client went away during %s %s", request.method, request.url.path)
        return Response(status_code=CLIENT_CLOSED)

    @api.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("web: unexpected error on %s %s", request.method, request.url.path)
        lang = request_language(request, settings)
        return error_response(500, "internal", web_message("internal", lang))

    if not pending:
        api.include_router(plugin_router)
    api.add_middleware(WebMiddleware, metrics=state.metrics)
    return api
