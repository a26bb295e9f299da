"""``oogiri joke``: one joke per image, as fast as the situation allows.

Order of work, cheapest first, so a mistake costs nothing: every image is validated here (the same
``bot.images.load`` the service uses) before anything is loaded or asked; then, when an ``oogiri
serve`` answers on the configured web address (or ``--server URL`` names one), the jokes come from
its JSON API (no model load, well under a second); otherwise the engine is loaded once for all
images. Messages follow the locale (``LANG``) unless ``language`` is set; English is the fallback.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bot.models import OogiriError
from bot.settings import Settings

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 0.5
REQUEST_TIMEOUT_S = 300.0
MAX_RETRY_AFTER_S = 60.0

TEXTS: dict[str, dict[str, str]] = {
    "loading": {"en": "loading the {engine} engine …", "zh": "正在加载 {engine} 引擎 …"},
    "using_server": {
        "en": "asking the oogiri serve at {url} (--local loads the model here instead)",
        "zh": "使用 {url} 上运行的 oogiri serve（--local 则在本机加载模型）",
    },
    "server_down": {
        "en": "no oogiri serve answers at {url}: {error}",
        "zh": "{url} 上没有可用的 oogiri serve：{error}",
    },
    "server_status": {
        "en": "the oogiri serve at {url} answered HTTP {status}",
        "zh": "{url} 上的 oogiri serve 返回了 HTTP {status}",
    },
    "waiting": {
        "en": "the server asks to wait {seconds} s (rate limit) …",
        "zh": "服务器要求等待 {seconds} 秒（频率限制）…",
    },
    "unreadable": {"en": "cannot read the file: {error}", "zh": "无法读取文件：{error}"},
    "demo": {
        "en": "Note: the demo model answered — random text, not jokes. Set OOGIRI_ENGINE__MODEL "
        "to a model folder for real jokes.",
        "zh": "注意：以上由演示模型生成——只是随机文字，不是笑话。请把 OOGIRI_ENGINE__MODEL "
        "设为模型目录以获得真正的笑话。",
    },
    "model": {"en": "model", "zh": "模型"},
    "joke": {"en": "joke", "zh": "笑话"},
}


def text(key: str, lang: str, **params: Any) -> str:
    table = TEXTS[key]
    return (table.get(lang) or table["en"]).format(**params)


def cli_language(settings: Settings, environ: dict[str, str] | None = None) -> str:
    """``language`` when set explicitly (env, .env, config file); else the locale; else English.

    The settings default ("zh") is the bot's for chat users; a terminal speaks its locale.
    """
    if "language" in settings.model_fields_set:
        return settings.language
    env = os.environ if environ is None else environ
    for var in ("LC_ALL", "LC_MESSAGES", "LANG"):
        value = env.get(var, "")
        if value:
            return "zh" if value.lower().startswith("zh") else "en"
    return "en"


@dataclass
class Outcome:
    """One image's answer: a joke (``joke`` set) or a failure (``error`` key + message)."""

    path: Path
    joke: dict[str, Any] | None = None
    error: str | None = None
    message: str = ""

    def as_json(self) -> dict[str, Any]:
        if self.joke is None:
            return {"image": str(self.path), "error": self.error, "message": self.message}
        return {"image": str(self.path), **self.joke}


@dataclass
class Checked:
    """An image read and validated before any engine work; ``failure`` when it was refused."""

    path: Path
    data: bytes = b""
    failure: Outcome | None = None


def validate(paths: list[Path], settings: Settings, lang: str) -> list[Checked]:
    """Read and validate every image up front (cheap; the model is not loaded yet)."""
    from bot.images import load, read_limited

    checked: list[Checked] = []
    for path in paths:
        try:
            # At most the limit + 1 byte: `oogiri joke /dev/zero` is refused, not read forever.
            data = read_limited(path, settings.images.max_bytes)
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            fail = Outcome(path, error="unreadable", message=text("unreadable", lang, error=reason))
            checked.append(Checked(path, failure=fail))
            continue
        try:
            load(data, settings.images, filename=path.name)
        except OogiriError as exc:
            fail = Outcome(path, error=exc.key, message=exc.user_message(lang))
            checked.append(Checked(path, failure=fail))
            continue
        checked.append(Checked(path, data=data))
    return checked


# --------------------------------------------------------------------------- a running serve

#: Written by `oogiri serve` into its data dir while it runs: where its web channel answers.
SERVE_MARKER = Path("run") / "serve.json"
#: The CLI's web identity per server (see ``RemoteJokes``).
COOKIE_FILE = Path("run") / "cli-web-cookies.json"


class CoreSettings(Settings):
    """The core's settings alone. ``Settings()`` imports every installed plugin to learn its
    section (≈ 1 s of CPU: web, Telegram, Discord …); a joke asked of a running serve needs only
    the core's data_dir, images limits and language."""


def core_settings() -> Settings | None:
    """The core-only settings, or None where they cannot be had (e.g. --strict refusing the
    plugin keys they do not know): then the caller builds the full ``Settings()``."""
    try:
        return CoreSettings()
    except Exception:
        return None


def write_serve_marker(settings: Settings) -> Path | None:
    """Tell later `oogiri joke` calls on this data dir where this serve's web channel answers."""
    if "web" not in settings.channels:
        return None
    path = settings.data_dir / SERVE_MARKER
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"url": local_server_url(settings), "pid": os.getpid()}
        path.write_text(json.dumps(doc), encoding="utf-8")
    except OSError as exc:  # a read-only data dir costs only the shortcut
        log.debug("could not write %s: %s", path, exc)
        return None
    return path


def marked_server(data_dir: Path) -> str | None:
    """The web address a serve on this data dir wrote, if any (it may be stale: probe it)."""
    try:
        url = json.loads((data_dir / SERVE_MARKER).read_text(encoding="utf-8"))["url"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return url if isinstance(url, str) and url.startswith(("http://", "https://")) else None


def local_server_url(settings: Settings) -> str:
    """The configured web address as a client reaches it (a wildcard bind → loopback)."""
    host = settings.web.host
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{settings.web.port}"


def serve_answers(url: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether an oogiri serve answers at ``url`` (its /livez says ``{"ok": true}``)."""
    try:
        r = httpx.get(url.rstrip("/") + "/livez", timeout=timeout_s)
        return r.status_code == 200 and r.json().get("ok") is True
    except (httpx.HTTPError, ValueError, AttributeError):
        return False


class ServerDown(Exception):
    """The named server cannot be reached at all."""


@dataclass
class RemoteJokes:
    """Jokes from a running ``oogiri serve`` over its JSON API (``POST /api/jokes``).

    The server's identity cookie keeps this terminal one web user — across calls too, through
    ``cookie_file`` (per server URL, in an existing data dir): otherwise every call would be a
    new visitor and spend the server's per-network allowance of new sessions. Its rate limits
    apply as to anyone; a 429 is waited out (Retry-After, up to a minute) and retried.
    """

    url: str
    lang: str
    on_wait: Callable[[str], None] = lambda _msg: None
    cookie_file: Path | None = None
    client: httpx.Client = field(init=False)
    engine: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        self.client = httpx.Client(
            base_url=self.url,
            timeout=httpx.Timeout(REQUEST_TIMEOUT_S, connect=5.0),
            headers={"Accept-Language": self.lang, "User-Agent": "oogiri-cli"},
        )
        for name, value in self._saved().get(self.url, {}).items():
            self.client.cookies.set(name, value)

    def _saved(self) -> dict[str, dict[str, str]]:
        if self.cookie_file is None:
            return {}
        try:
            doc = json.loads(self.cookie_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def save_cookies(self) -> None:
        """Keep the identity for the next call (0600: it is this terminal's login)."""
        if self.cookie_file is None or not self.cookie_file.parent.parent.is_dir():
            return  # no data dir yet: nothing is created for a cookie
        doc = self._saved()
        doc[self.url] = {c.name: c.value or "" for c in self.client.cookies.jar}
        try:
            self.cookie_file.parent.mkdir(exist_ok=True)
            fd = os.open(self.cookie_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(doc, fh)
        except OSError as exc:
            log.debug("could not keep the web cookie in %s: %s", self.cookie_file, exc)

    def connect(self) -> None:
        """Learn the engine's name and demo flag from /healthz (503 still carries them)."""
        try:
            r = self.client.get("/healthz", timeout=15.0)
        except httpx.HTTPError as exc:
            raise ServerDown(str(exc) or type(exc).__name__) from exc
        try:
            self.engine = dict(r.json().get("engine") or {})
        except (ValueError, AttributeError):
            self.engine = {}

    def tell(self, item: Checked, hint: str | None) -> Outcome:
        started = time.perf_counter()
        for _attempt in range(3):
            files = {"image": (item.path.name, item.data, "application/octet-stream")}
            data = {"hint": hint} if hint else None
            try:
                r = self.client.post("/api/jokes", files=files, data=data)
            except httpx.HTTPError as exc:
                return Outcome(
                    item.path,
                    error="server_unreachable",
                    message=text("server_down", self.lang, url=self.url, error=exc),
                )
            wait = _retry_after(r)
            if r.status_code == 429 and wait is not None and wait <= MAX_RETRY_AFTER_S:
                self.on_wait(text("waiting", self.lang, seconds=f"{wait:g}"))
                time.sleep(wait)
                continue
            break
        try:
            body = r.json()
        except ValueError:
            body = {}
        if r.status_code == 201 and isinstance(body, dict) and "text" in body:
            joke = {
                "joke_id": body.get("id"),
                "text": body["text"],
                "model_version": body.get("model_version"),
                "engine": self.engine.get("name"),
                "latency_ms": round((time.perf_counter() - started) * 1000),
                "demo": bool(body.get("demo", self.engine.get("demo", False))),
                "server": self.url,
            }
            return Outcome(item.path, joke=joke)
        if isinstance(body, dict) and body.get("error"):
            return Outcome(item.path, error=str(body["error"]), message=str(body.get("message")))
        status = text("server_status", self.lang, url=self.url, status=r.status_code)
        return Outcome(item.path, error="server_error", message=status)

    def close(self) -> None:
        self.save_cookies()
        self.client.close()


def _retry_after(r: httpx.Response) -> float | None:
    try:
        return max(0.0, float(r.headers.get("retry-after", "")))
    except ValueError:
        return None


# --------------------------------------------------------------------------- in this process


async def local_jokes(
    settings: Settings,
    items: list[Checked],
    hint: str | None,
    lang: str,
    emit: Callable[[Outcome], None],
    on_loading: Callable[[str], Any],
) -> None:
    """Load the engine once, then tell a joke for each valid image (in order, as they come)."""
    from bot.app import App
    from bot.models import JokeRequest

    with on_loading(text("loading", lang, engine=repr(settings.engine.name))):
        app = await App.create(settings)
    try:
        try:
            health = await asyncio.wait_for(app.engine.health(), timeout=10)
            demo = bool(health.demo)
        except Exception:  # the flag is informative; a slow probe must not stop the jokes
            demo = bool(getattr(app.engine, "is_demo", False))
        user = f"cli:{getpass.getuser()}"
        for item in items:
            if item.failure is not None:
                emit(item.failure)
                continue
            request = JokeRequest(
                image_bytes=item.data,
                channel="cli",
                user_id=user,
                filename=item.path.name,
                hint=hint,
                language=lang,
            )
            try:
                result = await app.service.tell(request)
            except OogiriError as exc:
                emit(Outcome(item.path, error=exc.key, message=exc.user_message(lang)))
                continue
            joke = {
                "joke_id": result.id,
                "text": result.text,
                "model_version": result.model_version,
                "engine": result.engine,
                "latency_ms": result.latency_ms,
                "demo": demo,
                "server": None,
            }
            emit(Outcome(item.path, joke=joke))
    finally:
        await app.close()


def one_line(joke_text: str) -> str:
    """One joke per line, so scripts can pair lines with images (--json keeps exact text)."""
    return " ".join(joke_text.splitlines())


def render(outcome: Outcome, lang: str, as_json: bool) -> str:
    """The stdout line of one outcome (failures go to stderr unless --json)."""
    if as_json:
        return json.dumps(outcome.as_json(), ensure_ascii=False)
    if outcome.joke is None:
        return f"{outcome.path}: {outcome.message}"
    j = outcome.joke
    return (
        f"{outcome.path}: {one_line(j['text'])}  "
        f"[{text('model', lang)} {j['model_version']}, {text('joke', lang)} #{j['joke_id']}]"
    )


def stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
