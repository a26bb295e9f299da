"""The built-in web channel: an upload page, a JSON API, /healthz, /metrics and a stats page.

Registered through the ``oogiri`` hooks exactly like a third-party plugin. Everything a person does
here goes through ``JokeService`` (``tell`` / ``rate`` / ``get_joke``); this module only translates
HTTP ⇄ ``JokeRequest`` / ``Joke`` / ``Rating``.

Identity: an anonymous ``web:<random>`` user id in a signed, HttpOnly, SameSite=Lax cookie. A
tampered or foreign cookie simply yields a new identity. State-changing requests are checked for
same-origin (Origin/Referer against Host); votes additionally need a JSON body and a CSRF token
derived from the identity cookie (``X-CSRF-Token``; the page carries it in a meta tag, API clients
get it from ``GET /api/session`` or the ``oogiri_csrf`` cookie).

Uploads are size-limited before the body is read (Content-Length) and while it streams, so a
100 MB body is refused after at most ``images.max_bytes`` + a little slack has been received.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import html
import json
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from itsdangerous import BadSignature, URLSafeSerializer
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.datastructures import MutableHeaders, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bot.hookspecs import hookimpl
from bot.models import (
    EngineBusy,
    EngineError,
    ImageRejected,
    Joke,
    JokeRequest,
    NotFound,
    OogiriError,
    RateLimited,
    Rejected,
    StoreUnavailable,
    message,
)
from bot.plugins import resolve

if TYPE_CHECKING:
    from bot.app import App
    from bot.settings import Settings

log = logging.getLogger(__name__)

CHANNEL = "web"
STATIC_DIR = Path(__file__).parent / "static"
USER_COOKIE = "oogiri_id"
CSRF_COOKIE = "oogiri_csrf"
CSRF_HEADER = "X-CSRF-Token"
COOKIE_MAX_AGE = 365 * 24 * 3600
SECRET_FILE = "web-cookie-secret"
#: Room for the multipart boundaries, part headers and the hint field around the image itself.
MULTIPART_SLACK = 64 * 1024
#: A slow client must finish sending its upload within this time.
UPLOAD_READ_TIMEOUT_S = 120.0
MAX_JSON_BODY = 1024
STATE_KEY = "plugins.web"

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS: tuple[tuple[str, str], ...] = (
    ("Content-Security-Policy", CSP),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "same-origin"),
    ("Cross-Origin-Opener-Policy", "same-origin"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
    ("Permissions-Policy", "camera=(), microphone=(), geolocation=(), interest-cohort=()"),
)

# Texts that belong to this channel rather than to the core (the core's MESSAGES cover the rest).
WEB_MESSAGES: dict[str, dict[str, str]] = {
    "no_image": {"en": "Choose a picture first.", "zh": "请先选择一张图片。"},
    "bad_form": {
        "en": "The upload could not be read; please try again.",
        "zh": "上传的内容无法读取，请重试。",
    },
    "bad_request": {"en": "That request is not valid.", "zh": "请求无效。"},
    "unsupported_media_type": {
        "en": "Send the picture as multipart/form-data (field 'image').",
        "zh": "请用 multipart/form-data 上传图片（字段 image）。",
    },
    "json_required": {"en": "Send the vote as JSON.", "zh": "请用 JSON 提交投票。"},
    "csrf": {
        "en": "This page is out of date; reload it and try again.",
        "zh": "页面已过期，请刷新后重试。",
    },
    "cross_site": {
        "en": "Requests from other sites are not accepted.",
        "zh": "不接受来自其他网站的请求。",
    },
    "upload_timeout": {
        "en": "The upload took too long; please try again.",
        "zh": "上传超时，请重试。",
    },
    "rejected": {"en": "That request was refused.", "zh": "请求被拒绝了。"},
    "internal": {
        "en": "Something went wrong on our side; please try again.",
        "zh": "服务器出了点问题，请重试。",
    },
    "not_found": {"en": "Nothing here.", "zh": "这里什么都没有。"},
}

# Page texts, filled into the static HTML templates (always HTML-escaped).
PAGE_TEXTS: dict[str, dict[str, str]] = {
    "en": {
        "title": "oogiri — a joke for your picture",
        "heading": "A joke for your picture",
        "tagline": "Pick, drop or paste a picture and get a joke about it.",
        "pick": "Choose a picture",
        "drop": "or drop / paste it here",
        "hint_label": "Nudge (optional)",
        "hint_placeholder": "e.g. Monday morning",
        "submit": "Tell me a joke",
        "thinking": "Thinking of something funny…",
        "model": "model",
        "like": "Funny",
        "dislike": "Not funny",
        "vote_saved": "Thanks — your vote is saved. You can change it.",
        "network": "The server could not be reached; check the connection and try again.",
        "another": "Another picture",
        "stats": "Stats",
        "demo": (
            "Demo mode: this server runs the tiny built-in test model, so the jokes are random "
            "noise. Configure a real model with OOGIRI_ENGINE__MODEL."
        ),
        "stats_title": "oogiri — stats per model version",
        "stats_heading": "How funny is each model version?",
        "version": "Model version",
        "jokes": "Jokes",
        "up": "👍",
        "down": "👎",
        "like_rate": "Like rate",
        "no_votes": "no votes yet",
        "n_jokes": "{n} jokes",
        "no_jokes": "No jokes yet.",
        "back": "Back to the upload page",
        "chart_label": "Like rate per model version",
    },
    "zh": {
        "title": "oogiri — 给图片讲个梗",
        "heading": "给你的图片讲个梗",
        "tagline": "选择、拖入或粘贴一张图片，看看它有什么梗。",
        "pick": "选择图片",
        "drop": "或把图片拖到/粘贴到这里",
        "hint_label": "提示（可选）",
        "hint_placeholder": "比如：周一早上",
        "submit": "讲个梗",
        "thinking": "正在想梗…",
        "model": "模型",
        "like": "好笑",
        "dislike": "不好笑",
        "vote_saved": "谢谢，已记下你的投票，可以随时改。",
        "network": "连不上服务器，请检查网络后重试。",
        "another": "换一张图",
        "stats": "统计",
        "demo": (
            "演示模式：当前使用的是内置的微型测试模型，讲出来的梗只是随机噪声。"
            "请通过 OOGIRI_ENGINE__MODEL 配置真正的模型。"
        ),
        "stats_title": "oogiri — 各模型版本统计",
        "stats_heading": "每个模型版本有多好笑？",
        "version": "模型版本",
        "jokes": "梗数",
        "up": "👍",
        "down": "👎",
        "like_rate": "好评率",
        "no_votes": "还没有投票",
        "n_jokes": "{n} 个梗",
        "no_jokes": "还没有梗。",
        "back": "返回上传页面",
        "chart_label": "各模型版本的好评率",
    },
}


def web_message(key: str, lang: str, **params: Any) -> str:
    table = WEB_MESSAGES.get(key)
    if table is None:
        return message(key, lang, **params)
    return table.get(lang) or table["en"]


# --------------------------------------------------------------------------- language


def pick_language(accept_language: str | None, default: str = "zh") -> str:
    """The best of zh/en for an Accept-Language header; ``default`` when neither is wanted."""
    if not accept_language:
        return default
    best: tuple[float, int, str] | None = None
    for index, part in enumerate(accept_language.split(",")):
        piece = part.strip()
        if not piece:
            continue
        tag, _, params = piece.partition(";")
        quality = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        primary = tag.strip().lower().split("-")[0]
        if primary not in ("zh", "en") or quality <= 0:
            continue
        key = (quality, -index, primary)
        if best is None or key > best:
            best = key
    return best[2] if best else default


def request_language(request: Request, settings: Settings) -> str:
    forced = request.query_params.get("lang")
    if forced in ("zh", "en"):
        return forced
    return pick_language(request.headers.get("accept-language"), settings.language)


# --------------------------------------------------------------------------- identity / CSRF


def load_or_create_secret(settings: Settings) -> bytes:
    """settings.web.cookie_secret, else a random secret created once in data_dir (mode 0600)."""
    configured = settings.web.cookie_secret
    if configured is not None and configured.get_secret_value():
        return configured.get_secret_value().encode()
    path = settings.data_dir / SECRET_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(48))
            fh.flush()
            os.fsync(fh.fileno())
        log.info("web: created a new cookie secret file in the data directory")
    # Another process may have just created it: give it a moment to be written.
    for _ in range(50):
        value = path.read_text().strip()
        if value:
            break
        time.sleep(0.02)
    else:
        raise RuntimeError(f"{path} is empty; delete it or set OOGIRI_WEB__COOKIE_SECRET")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning("web: cookie secret file had mode %o; tightening to 600", mode)
        path.chmod(0o600)
    return value.encode()


class Identities:
    """Signs user ids into cookies and derives the CSRF token bound to each id."""

    def __init__(self, secret: bytes) -> None:
        self._serializer = URLSafeSerializer(secret, salt="oogiri.web.user")
        self._csrf_key = hmac.new(secret, b"oogiri.web.csrf", hashlib.sha256).digest()

    @staticmethod
    def new_user_id() -> str:
        return f"web:{secrets.token_urlsafe(16)}"

    def sign(self, user_id: str) -> str:
        return self._serializer.dumps(user_id)

    def verify(self, cookie: str | None) -> str | None:
        if not cookie:
            return None
        try:
            value = self._serializer.loads(cookie)
        except BadSignature:
            return None
        if not isinstance(value, str) or not value.startswith("web:") or len(value) > 100:
            return None
        return value

    def csrf_token(self, user_id: str) -> str:
        return hmac.new(self._csrf_key, user_id.encode(), hashlib.sha256).hexdigest()

    def csrf_ok(self, user_id: str, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.csrf_token(user_id), token or "")


@dataclass(slots=True)
class Visitor:
    user_id: str
    is_new: bool
    csrf: str


def _normalise_host(host: str) -> str:
    """Lower-case host[:port] without a default port (:80/:443; a proxy may add either)."""
    host = host.strip().lower()
    for default in (":80", ":443"):
        if host.endswith(default):
            return host[: -len(default)]
    return host


def same_origin(request: Request) -> bool:
    """False when Origin (or, without it, Referer) names another host than the one asked.

    Requests with neither header (curl, API clients) pass; a cross-site browser form always sends
    Origin on POST. X-Forwarded-Host is accepted as well: a cross-site form cannot set it.
    """
    hosts = {_normalise_host(request.headers.get("host", ""))}
    forwarded = request.headers.get("x-forwarded-host")
    if forwarded:
        hosts.add(_normalise_host(forwarded.split(",")[0]))
    hosts.discard("")
    origin = request.headers.get("origin")
    source = origin if origin is not None else request.headers.get("referer")
    if source is None:
        return True
    if source == "null":
        return False
    parts = urlsplit(source)
    if not parts.netloc:
        return False
    return _normalise_host(parts.netloc) in hosts


# --------------------------------------------------------------------------- metrics


class WebMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.http = Counter(
            "oogiri_web_http_requests",
            "HTTP requests served by the web channel",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.http_latency = Histogram(
            "oogiri_web_http_seconds",
            "HTTP response time of the web channel",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.upload_bytes = Histogram(
            "oogiri_web_upload_bytes",
            "Size of uploaded pictures",
            buckets=tuple(2**n for n in range(12, 26)),
            registry=self.registry,
        )
        self.refused = Counter(
            "oogiri_web_refused",
            "Requests the web channel refused before they reached the service",
            ["reason"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class WebMiddleware:
    """Adds the security headers to every response and counts requests per route template."""

    def __init__(self, app: ASGIApp, metrics: WebMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_with_headers(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
                headers = MutableHeaders(scope=msg)
                for name, value in SECURITY_HEADERS:
                    if name not in headers:
                        headers[name] = value
            await send(msg)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.http.labels(scope.get("method", ""), route, str(status)).inc()
            self.metrics.http_latency.labels(route).observe(time.perf_counter() - started)


# --------------------------------------------------------------------------- static assets


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    media_type: str
    etag: str


ASSET_TYPES = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
}


def _load_assets() -> dict[str, Asset]:
    assets = {}
    for name, media_type in ASSET_TYPES.items():
        body = (STATIC_DIR / name).read_bytes()
        assets[name] = Asset(body, media_type, hashlib.sha256(body).hexdigest()[:16])
    return assets


class Template:
    """``{{name}}`` placeholders filled with HTML-escaped values (``{{{name}}}``: trusted HTML)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def render(self, values: dict[str, str], trusted: dict[str, str] | None = None) -> str:
        out = self.text
        for name, value in (trusted or {}).items():
            out = out.replace("{{{" + name + "}}}", value)
        for name, value in values.items():
            out = out.replace("{{" + name + "}}", html.escape(value, quote=True))
        return out


# --------------------------------------------------------------------------- stats chart


def _fmt_rate(rate: float | None) -> str:
    return "–" if rate is None else f"{rate * 100:.0f}%"


def stats_svg(rows: list[dict[str, Any]], texts: dict[str, str]) -> str:
    """An accessible horizontal bar chart of like rate per model version, as inline SVG."""
    bar_h, gap, label_w, chart_w, pad = 26, 12, 190, 360, 8
    width = label_w + chart_w + 100
    height = pad * 2 + 20 + max(1, len(rows)) * (bar_h + gap)
    esc = html.escape
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" '
        f'viewBox="0 0 {width} {height}" width="100%" aria-labelledby="chart-title">',
        f'<title id="chart-title">{esc(texts["chart_label"])}</title>',
    ]
    x0 = label_w
    # gridlines at 0, 25, 50, 75, 100 %
    for pct in (0, 25, 50, 75, 100):
        x = x0 + chart_w * pct / 100
        parts.append(
            f'<line x1="{x:.1f}" y1="{pad + 14}" x2="{x:.1f}" y2="{height - pad}" '
            f'class="grid" stroke="#d0d4da" stroke-width="1"/>'
            f'<text class="muted" x="{x:.1f}" y="{pad + 8}" font-size="11" '
            f'text-anchor="middle" fill="#5b6470">{pct}%</text>'
        )
    for i, row in enumerate(rows):
        y = pad + 20 + i * (bar_h + gap)
        version = str(row["model_version"])
        label = version if len(version) <= 22 else version[:21] + "…"
        rate = row["like_rate"]
        parts.append(
            f'<text x="{x0 - 8}" y="{y + bar_h * 0.68:.1f}" font-size="12" text-anchor="end" '
            f'fill="#1d232b"><title>{esc(version)}</title>{esc(label)}</text>'
        )
        if rate is None:
            parts.append(
                f'<rect class="empty" x="{x0}" y="{y}" width="{chart_w}" height="{bar_h}" '
                f'fill="#eef0f3" rx="3"/><text class="muted" x="{x0 + 8}" '
                f'y="{y + bar_h * 0.68:.1f}" font-size="12" fill="#5b6470">'
                f"{esc(texts['no_votes'])} · "
                f"{esc(texts['n_jokes'].format(n=row['jokes']))}</text>"
            )
            continue
        w = max(2.0, chart_w * rate)
        tip = f"{version}: {_fmt_rate(rate)} ({row['up']} 👍 / {row['down']} 👎)"
        parts.append(
            f'<rect class="bar" x="{x0}" y="{y}" width="{w:.1f}" height="{bar_h}" '
            f'fill="#2f7d4f" rx="3"><title>{esc(tip)}</title></rect>'
            f'<text x="{x0 + w + 6:.1f}" y="{y + bar_h * 0.68:.1f}" font-size="12" '
            f'fill="#1d232b">{_fmt_rate(rate)} (n={row["up"] + row["down"]})</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


# --------------------------------------------------------------------------- errors


class _TooLarge(Exception):
    pass


def error_response(
    status: int,
    key: str,
    text: str,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        {"error": key, "message": text},
        status_code=status,
        headers={"Cache-Control": "no-store", **(headers or {})},
    )


def oogiri_error_response(exc: OogiriError, lang: str) -> JSONResponse:
    headers: dict[str, str] = {}
    text = exc.user_message(lang)
    if isinstance(exc, ImageRejected):
        status = 413 if exc.key == "too_large" else 400
    elif isinstance(exc, RateLimited):
        status = 429
        seconds = exc.params.get("seconds", 1)
        headers["Retry-After"] = str(max(1, math.ceil(float(seconds))))
    elif isinstance(exc, EngineBusy):
        status = 503
        headers["Retry-After"] = "5"
    elif isinstance(exc, EngineError):
        status = 503
        headers["Retry-After"] = "30"
    elif isinstance(exc, StoreUnavailable):
        status = 503
        headers["Retry-After"] = "5"
    elif isinstance(exc, NotFound):
        status = 404
    elif isinstance(exc, Rejected):
        status = 400 if exc.key == "hint_too_long" else 403
        if exc.key == "rejected" and not exc.reason:
            text = web_message("rejected", lang)
    else:
        status = 400
    return error_response(status, exc.key, text, headers)


# --------------------------------------------------------------------------- the API


class WebState:
    """Per-App objects of the web channel (shared by every FastAPI built for the same App)."""

    def __init__(self, app: App) -> None:
        self.identities = Identities(load_or_create_secret(app.settings))
        self.metrics = WebMetrics()
        self.assets = _load_assets()
        self.index = Template((STATIC_DIR / "index.html").read_text(encoding="utf-8"))
        self.stats_page = Template((STATIC_DIR / "stats.html").read_text(encoding="utf-8"))


def web_state(app: App) -> WebState:
    state = app.state.get(STATE_KEY)
    if state is None:
        state = app.state[STATE_KEY] = WebState(app)
    return state


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
        user_id = identities.verify(request.cookies.get(USER_COOKIE))
        is_new = user_id is None
        if user_id is None:
            user_id = identities.new_user_id()
        return Visitor(user_id, is_new, identities.csrf_token(user_id))

    def remember(response: Response, who: Visitor) -> Response:
        """Set the identity cookies for a new visitor; always expose the current CSRF token."""
        response.headers[CSRF_HEADER] = who.csrf
        if who.is_new:
            secure = settings.web.secure_cookies
            response.set_cookie(
                USER_COOKIE,
                identities.sign(who.user_id),
                max_age=COOKIE_MAX_AGE,
                httponly=True,
                samesite="lax",
                secure=secure,
                path="/",
            )
            response.set_cookie(
                CSRF_COOKIE,
                who.csrf,
                max_age=COOKIE_MAX_AGE,
                httponly=False,
                samesite="strict",
                secure=secure,
                path="/",
            )
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers["Vary"] = "Cookie, Accept-Language"
        return response

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

    # ------------------------------------------------------------------ pages

    @api.get("/", response_class=HTMLResponse)
    async def index(request: Request) -> Response:
        lang = request_language(request, settings)
        who = visitor(request)
        texts = PAGE_TEXTS[lang]
        demo = bool(getattr(app.engine, "is_demo", False))
        i18n = {
            k: texts[k]
            for k in ("thinking", "model", "vote_saved", "network", "like", "dislike", "submit")
        }
        i18n["too_large"] = message("too_large", lang, limit_mb=_limit_mb(max_bytes))
        i18n["no_image"] = web_message("no_image", lang)
        values = {
            **{f"t.{k}": v for k, v in texts.items()},
            "lang": lang,
            "csrf": who.csrf,
            "max_bytes": str(max_bytes),
            "max_hint": str(settings.limits.max_hint_chars),
            "js": f"/static/app.js?v={state.assets['app.js'].etag}",
            "css": f"/static/style.css?v={state.assets['style.css'].etag}",
            "icon": f"/static/icon.svg?v={state.assets['icon.svg'].etag}",
            "demo_hidden": "" if demo else "hidden",
            "stats_hidden": "" if settings.web.public_stats else "hidden",
        }
        # JSON inside <script type="application/json"> is data, not script (CSP-safe);
        # escaping "<" keeps "</script>" out of it.
        trusted = {"i18n": json.dumps(i18n, ensure_ascii=False).replace("<", "\\u003c")}
        page = state.index.render(values, trusted)
        return remember(HTMLResponse(page), who)

    @api.get("/static/{name}", include_in_schema=False)
    async def static(name: str, request: Request) -> Response:
        asset = state.assets.get(name)
        if asset is None:
            return Response(status_code=404)
        etag = f'"{asset.etag}"'
        headers = {"ETag": etag, "Cache-Control": "public, max-age=86400"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(asset.body, media_type=asset.media_type, headers=headers)

    @api.get("/stats", response_class=HTMLResponse)
    async def stats_page(request: Request) -> Response:
        if not settings.web.public_stats:
            return HTMLResponse("Not found", status_code=404)
        lang = request_language(request, settings)
        texts = PAGE_TEXTS[lang]
        rows = await _stats_rows(app)
        body_rows = []
        for row in rows:
            body_rows.append(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>".format(
                    html.escape(row["model_version"]),
                    row["jokes"],
                    row["up"],
                    row["down"],
                    _fmt_rate(row["like_rate"]),
                )
            )
        table = "".join(body_rows) or (
            f'<tr><td colspan="5">{html.escape(texts["no_jokes"])}</td></tr>'
        )
        values = {
            **{f"t.{k}": v for k, v in texts.items()},
            "lang": lang,
            "css": f"/static/style.css?v={state.assets['style.css'].etag}",
            "icon": f"/static/icon.svg?v={state.assets['icon.svg'].etag}",
        }
        page = state.stats_page.render(
            values, {"rows": table, "chart": stats_svg(rows, texts) if rows else ""}
        )
        return HTMLResponse(page, headers={"Cache-Control": "no-store", "Vary": "Accept-Language"})

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
                    raise _TooLarge()
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
        except _TooLarge:
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
            message("too_large", lang, limit_mb=_limit_mb(max_bytes)),
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
            {"versions": await _stats_rows(app)}, headers={"Cache-Control": "no-store"}
        )

    # ------------------------------------------------------------------ operations

    @api.get("/healthz")
    async def healthz() -> Response:
        engine = app.engine
        engine_info: dict[str, Any]
        try:
            health = await asyncio.wait_for(engine.health(), timeout=10)
            engine_info = {"ok": bool(health.ok), "model": health.model, "detail": health.detail}
        except Exception as exc:  # a probe must answer, whatever the engine does
            engine_info = {"ok": False, "detail": type(exc).__name__}
        engine_info["name"] = getattr(engine, "name", type(engine).__name__)
        engine_info["demo"] = bool(getattr(engine, "is_demo", False))
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


def _limit_mb(max_bytes: int) -> str:
    mb = max_bytes / (1024 * 1024)
    return f"{mb:.0f}" if mb >= 10 else f"{mb:.1f}".rstrip("0").rstrip(".")


async def _stats_rows(app: App) -> list[dict[str, Any]]:
    # JokeService has no read-only stats call; the store's aggregate is the one source.
    return [
        {
            "model_version": s.model_version,
            "jokes": s.jokes,
            "up": s.up,
            "down": s.down,
            "rated": s.rated,
            "like_rate": s.like_rate,
        }
        for s in await app.service.stats()
    ]


# --------------------------------------------------------------------------- the channel


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the App owns SIGINT/SIGTERM and stops us."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.set_inheritable(True)
    except BaseException:
        sock.close()
        raise
    return sock


class WebChannel:
    """Serves ``create_api(app)`` with uvicorn inside the running event loop."""

    name = CHANNEL

    def __init__(
        self,
        app: App,
        host: str | None = None,
        port: int | None = None,
        graceful_timeout_s: float = 10.0,
    ) -> None:
        self.app = app
        self.host = host if host is not None else app.settings.web.host
        self.requested_port = port if port is not None else app.settings.web.port
        self.graceful_timeout_s = graceful_timeout_s
        self.server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._socket: socket.socket | None = None

    @property
    def port(self) -> int:
        """The port actually listened on (useful with port 0)."""
        if self._socket is None:
            return self.requested_port
        return int(self._socket.getsockname()[1])

    @property
    def url(self) -> str:
        host = self.host if ":" not in self.host else f"[{self.host}]"
        if host in ("0.0.0.0", "[::]", ""):
            host = "127.0.0.1"
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("web channel already started")
        # Binding first turns "address in use" into an OSError for the caller (uvicorn would
        # call sys.exit) and makes port 0 usable.
        self._socket = _bind(self.host, self.requested_port)
        try:
            config = uvicorn.Config(
                create_api(self.app),
                lifespan="on",
                log_config=None,
                access_log=True,
                proxy_headers=True,
                server_header=False,
                timeout_graceful_shutdown=int(self.graceful_timeout_s),
            )
            server = self.server = _Server(config)
            task = self._task = asyncio.create_task(
                self._serve(server, self._socket), name="oogiri-web"
            )
            while not server.started:
                if task.done():
                    task.result()  # re-raise the startup failure
                    raise RuntimeError("web server stopped while starting")
                await asyncio.sleep(0.01)
        except BaseException:
            if self._task is not None and not self._task.done():
                self._task.cancel()
            self._task = None
            self._socket.close()
            self._socket = None
            raise
        log.info("web: serving on %s", self.url)

    @staticmethod
    async def _serve(server: uvicorn.Server, sock: socket.socket) -> None:
        try:
            await server.serve(sockets=[sock])
        except SystemExit as exc:  # uvicorn exits on a failed lifespan startup
            raise RuntimeError("the web server failed to start (see the log)") from exc

    async def stop(self) -> None:
        task, server = self._task, self.server
        if task is None or server is None:
            return
        server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=self.graceful_timeout_s + 5)
        except TimeoutError:
            server.force_exit = True
            with contextlib.suppress(Exception):
                await task
        except Exception:
            log.exception("web: server ended with an error")
        finally:
            self._task = None
            if self._socket is not None:
                self._socket.close()
                self._socket = None
        log.info("web: stopped")


@hookimpl
def oogiri_register_channels(register: Callable[..., None], settings: Settings) -> None:
    register(CHANNEL, WebChannel)
