"""The JSON API and the operations endpoints of the web channel, assembled into one FastAPI app.

Everything a person does here goes through ``JokeService`` (``tell`` / ``rate`` / ``get_joke``);
this module only translates HTTP ⇄ ``JokeRequest`` / ``Joke`` / ``Rating``.

Uploads are size-limited before the body is read (Content-Length) and while it streams, so a
100 MB body is refused after at most ``images.max_bytes`` + a little slack has been received.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from bot.models import Joke, JokeRequest, NotFound, OogiriError, Rejected, message
from bot.plugins import resolve
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


def _parse_joke_id(raw: str) -> int | None:
    if not raw.isdigit() or len(raw) > 18:
        return None
    return int(raw)


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

    def visitor(request: Request) -> Visitor:
        return identities.visitor(request)

    def remember(response: Response, who: Visitor) -> Response:
        return identities.remember(response, who, settings.web.secure_cookies)

    def refuse(request: Request, status: int, key: str, lang: str) -> JSONResponse:
        state.metrics.refused.labels(key).inc()
        return error_response(status, key, web_message(key, lang))

    def joke_json(joke: Joke, vote: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": joke.id,
            "text": joke.text,
            "model_version": joke.model_version,
            "up": joke.up,
            "down": joke.down,
        }
        if vote is not None:
            out["vote"] = vote
        return out

    async def web_joke(joke_id: int) -> Joke:
        """Only jokes told on the web are visible here: other channels' chats stay private."""
        joke = await app.service.get_joke(joke_id)
        if joke.channel != CHANNEL:
            raise NotFound()
        return joke

    add_page_routes(api, app, state)
    api.mount("/static", state.assets, name="static")

    # ------------------------------------------------------------------ JSON API

    @api.get("/api/session")
    async def session(request: Request) -> Response:
        """For API clients: sets the identity cookie and returns the CSRF token for votes."""
        who = visitor(request)
        return remember(JSONResponse({"csrf_token": who.csrf}), who)

    @api.post("/api/jokes")
    async def tell(request: Request) -> Response:
        lang = request_language(request, settings)
        who = visitor(request)
        if not same_origin(request):
            return remember(refuse(request, 403, "cross_site", lang), who)
        content_type = request.headers.get("content-type", "")
        if not content_type.lower().startswith("multipart/form-data"):
            return remember(refuse(request, 415, "unsupported_media_type", lang), who)
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                declared_n = int(declared)
            except ValueError:
                return remember(refuse(request, 400, "bad_request", lang), who)
            if declared_n > body_limit:
                return _too_large(request, lang, who)

        async def capped() -> AsyncIterator[bytes]:
            received = 0
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
            return _too_large(request, lang, who)
        except TimeoutError:
            return remember(refuse(request, 408, "upload_timeout", lang), who)
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
            meta={"remote_addr": request.client.host if request.client else None},
        )
        try:
            joke = await app.service.tell(joke_request)
        except OogiriError as exc:
            return remember(oogiri_error_response(exc, lang), who)
        response = JSONResponse(
            joke_json(joke), status_code=201, headers={"Location": f"/api/jokes/{joke.id}"}
        )
        return remember(response, who)

    def _too_large(request: Request, lang: str, who: Visitor) -> Response:
        state.metrics.refused.labels("too_large").inc()
        response = error_response(
            413,
            "too_large",
            message("too_large", lang, limit_mb=limit_mb(max_bytes)),
            # The rest of the body is not read; closing the connection is the honest answer.
            {"Connection": "close"},
        )
        return remember(response, who)

    @api.get("/api/jokes/{joke_id}")
    async def get_joke(joke_id: str, request: Request) -> Response:
        lang = request_language(request, settings)
        parsed = _parse_joke_id(joke_id)
        try:
            if parsed is None:
                raise NotFound()
            joke = await web_joke(parsed)
        except OogiriError as exc:
            return oogiri_error_response(exc, lang)
        return JSONResponse(joke_json(joke), headers={"Cache-Control": "no-store"})

    @api.post("/api/jokes/{joke_id}/rating")
    async def rate(joke_id: str, request: Request) -> Response:
        lang = request_language(request, settings)
        who = visitor(request)
        if not same_origin(request):
            return refuse(request, 403, "cross_site", lang)
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            return refuse(request, 415, "json_required", lang)
        if who.is_new or not identities.csrf_ok(who.user_id, request.headers.get(CSRF_HEADER)):
            # A new identity cannot carry a valid token: the cookie was missing or forged.
            return remember(refuse(request, 403, "csrf", lang), who)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_JSON_BODY:
                return remember(refuse(request, 413, "bad_request", lang), who)
        try:
            payload = json.loads(body)
        except ValueError:
            return remember(refuse(request, 400, "bad_request", lang), who)
        value = payload.get("value") if isinstance(payload, dict) else None
        if isinstance(value, bool) or value not in (1, -1):
            return remember(error_response(400, "bad_vote", message("bad_vote", lang)), who)
        parsed = _parse_joke_id(joke_id)
        try:
            if parsed is None:
                raise NotFound()
            await web_joke(parsed)
            rating = await app.service.rate(parsed, who.user_id, value, CHANNEL)
        except OogiriError as exc:
            return remember(oogiri_error_response(exc, lang), who)
        return remember(
            JSONResponse(
                {
                    "id": rating.joke_id,
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

    @api.get("/metrics")
    async def metrics() -> Response:
        body = app.metrics.render() + state.metrics.render()
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @api.exception_handler(OogiriError)
    async def oogiri_error(request: Request, exc: OogiriError) -> Response:
        # A user-facing error outside the routes' own handling, e.g. the database went away
        # under the stats page: its message and status, not a 500.
        return oogiri_error_response(exc, request_language(request, settings))

    @api.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("web: unexpected error on %s %s", request.method, request.url.path)
        lang = request_language(request, settings)
        return error_response(500, "internal", web_message("internal", lang))

    if not pending:
        api.include_router(plugin_router)
    api.add_middleware(WebMiddleware, metrics=state.metrics)
    return api
