"""HTTP engine for OpenAI-compatible vision servers: LMDeploy's api_server (or its proxy), vLLM, …

Registered twice: ``lmdeploy`` (production; sends InternVL's per-request ``max_dynamic_patch`` and
pre-sizes pictures to the tile grid) and ``openai`` (any other server; plain OpenAI fields only).

What one ``generate`` does:

1. refuse at once with ``EngineBusy`` when ``max_in_flight`` requests are already out, or while
   the circuit breaker is open (``breaker_failures`` consecutive server failures open it for
   ``breaker_reset_s``; then one probe request is let through: success closes it, failure re-opens);
2. optionally resize the picture to its InternVL tile grid (``bot.engines.tiling``) in a thread;
3. POST ``/v1/chat/completions`` with the picture as a ``data:image/jpeg;base64,…`` URL — never a
   path or ``file://`` URL, which LMDeploy would read from its own disk (checked before every send);
4. retry with exponential backoff and jitter on connection errors and 5xx (never on 4xx, never on a
   read timeout, which would only pile more work on a slow server), moving to the next base URL;
5. read the body even on HTTP 200: ``lmdeploy serve proxy`` answers 200 with the backend's error
   as the body; then strip chat-template leftovers (``<|im_end|>`` …) from the text.

Errors map to what a user can be told: 401/403 → ``EngineError`` ("bad API key" in the detail, for
the operator's log); a picture the server cannot decode → ``ImageRejected``; overload or an open
breaker → ``EngineBusy``; anything else down → ``EngineError``.

The engine's upstream (base URLs + served model name + label) is one immutable value swapped
atomically by :meth:`OpenAIHTTPEngine.switch`; requests in flight keep the upstream they started
with and :meth:`OpenAIHTTPEngine.drain` waits for them — the managed server's blue/green swap.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import logging
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx

from bot.engines import tiling
from bot.engines.base import EngineHealth
from bot.hookspecs import hookimpl
from bot.models import (
    EngineBusy,
    EngineError,
    Generation,
    GenerationParams,
    ImageRejected,
    NormalizedImage,
    OogiriError,
    Usage,
    showable,
)
from bot.settings import EngineSettings, Settings, mask_url_credentials

log = logging.getLogger(__name__)

CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"
HEALTH_PATH = "/health"
DATA_URL_PREFIX = "data:image/jpeg;base64,"
URL_COOLDOWN_S = 5.0  # a base URL that refused a connection is skipped this long
MAX_BACKOFF_S = 5.0

# Text after any of these is not the model's answer (a template that did not stop it).
STOP_MARKERS = (
    "<|im_end|>",
    "<|im_start|>",
    "<|endoftext|>",
    "</s>",
    "<|eot_id|>",
    "<|end|>",
    "<|action_end|>",
)
# Tokens that may leak into text when a server does not skip special tokens.
STRAY_TOKENS = ("<s>", "<img>", "</img>", "<IMG_CONTEXT>", "<|im_end|>", "<|im_start|>")
IMAGE_ERROR = re.compile(
    r"cannot identify|identify image|decod|truncat|corrupt|not a valid image|invalid image|"
    r"unsupported image|image file|broken data stream|incorrect padding|base64|unidentified|"
    r"preprocess",  # LMDeploy ≥ 0.16 answers a picture it cannot open with "preprocessing failed"
    re.IGNORECASE,
)
# ``lmdeploy serve proxy`` error codes (its own, not HTTP): model not found / unavailable / timeout.
PROXY_CODES = {10400: 404, 10401: 503, 10402: 504}


@dataclass(frozen=True, slots=True)
class Flavor:
    name: str
    send_max_dynamic_patch: bool
    presize_by_default: bool
    # the server's field for "no end token before N tokens": a fine-tuned model that learnt short
    # answers samples its end token first often enough that asking again is not enough
    min_tokens_field: str | None


FLAVORS = {
    "lmdeploy": Flavor(
        "lmdeploy",
        send_max_dynamic_patch=True,
        presize_by_default=True,
        min_tokens_field="min_new_tokens",
    ),
    # servers disagree on the name (vLLM min_tokens, SGLang min_new_tokens): request_extra
    "openai": Flavor(
        "openai", send_max_dynamic_patch=False, presize_by_default=False, min_tokens_field=None
    ),
}


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where requests go. Swapped as one value, so a request never mixes two upstreams."""

    base_urls: tuple[str, ...]
    model: str | None = None  # served model name; None: ask /v1/models
    label: str | None = None  # model_version stored with jokes; None: the served name

    @classmethod
    def of(
        cls, urls: Iterable[str], model: str | None = None, label: str | None = None
    ) -> Upstream:
        cleaned = tuple(normalize_base_url(u) for u in urls)
        if not cleaned:
            raise ValueError("at least one base URL is needed")
        return cls(cleaned, model, label)


def normalize_base_url(url: str) -> str:
    """``http://h:23333/v1/`` and ``http://h:23333`` both mean the server root."""
    url = url.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"base URL must start with http:// or https://: {url!r}")
    return url


def to_data_url(jpeg: bytes) -> str:
    return DATA_URL_PREFIX + base64.b64encode(jpeg).decode("ascii")


def image_urls_in(payload: Any) -> list[str]:
    """Every ``image_url.url`` anywhere in a request body."""
    found: list[str] = []
    if isinstance(payload, dict):
        for key, value in payload.items():
            if key == "image_url":
                url = value.get("url") if isinstance(value, dict) else value
                found.append(url if isinstance(url, str) else repr(url))
            else:
                found.extend(image_urls_in(value))
    elif isinstance(payload, list):
        for item in payload:
            found.extend(image_urls_in(item))
    return found


def assert_only_data_urls(payload: Any) -> None:
    """LMDeploy opens ``file://`` URLs and bare paths on its own disk: only data: URLs may leave."""
    for url in image_urls_in(payload):
        if not url.startswith(DATA_URL_PREFIX):
            raise EngineError(detail=f"refusing to send a non-data: image URL ({url[:40]!r}…)")


def clean_text(text: str) -> str:
    """The model's answer without chat-template leftovers."""
    cut = len(text)
    for marker in STOP_MARKERS:
        at = text.find(marker)
        if at != -1:
            cut = min(cut, at)
    text = text[:cut]
    for token in STRAY_TOKENS:
        text = text.replace(token, "")
    # before the empty-answer check, so that an answer of only broken characters is asked again
    return showable(text).strip()


def body_error(data: Any) -> tuple[int | None, str] | None:
    """``(code, message)`` when a JSON body is an error, whatever the HTTP status said."""
    if not isinstance(data, dict):
        return None
    if "error_code" in data:  # lmdeploy serve proxy's own envelope
        code = data.get("error_code")
        code = code if isinstance(code, int) else None
        return PROXY_CODES.get(code or 0, code), str(data.get("text") or data.get("error_code"))
    if data.get("object") == "error":  # LMDeploy / vLLM ErrorResponse
        code = data.get("code")
        return (code if isinstance(code, int) else None), str(data.get("message", ""))
    err = data.get("error")
    if isinstance(err, dict):  # OpenAI's {"error": {...}}
        code = err.get("code")
        if not isinstance(code, int):
            code = int(code) if isinstance(code, str) and code.isdigit() else None
        return code, str(err.get("message", ""))
    if isinstance(err, str):
        return None, err
    if "detail" in data and "choices" not in data:  # FastAPI's default error body
        return None, str(data["detail"])
    return None


# --------------------------------------------------------------------------- circuit breaker


class CircuitBreaker:
    """closed → (N consecutive failures) → open → (reset_s) → half-open: one probe → closed/open."""

    def __init__(
        self, failures: int, reset_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.threshold = failures
        self.reset_s = reset_s
        self.clock = clock
        self.state = "closed"
        self.failures = 0
        self.opened_at = 0.0
        self.opened_count = 0
        self._probing = False

    def allow(self) -> bool:
        if self.state == "closed":
            return True
        if self.state == "open":
            if self.clock() - self.opened_at < self.reset_s:
                return False
            self.state = "half-open"
            self._probing = False
        if self._probing:  # half-open: exactly one probe at a time
            return False
        self._probing = True
        return True

    def retry_after(self) -> float:
        if self.state != "open":
            return 1.0
        return max(0.0, self.reset_s - (self.clock() - self.opened_at))

    def success(self) -> None:
        if self.state != "closed":
            log.info("circuit breaker closed")
        self.state, self.failures, self._probing = "closed", 0, False

    def failure(self) -> None:
        self.failures += 1
        if self.state == "half-open" or (
            self.state == "closed" and self.failures >= self.threshold
        ):
            if self.state == "closed":
                log.warning("circuit breaker open after %d consecutive failures", self.failures)
            self.state, self.opened_at, self._probing = "open", self.clock(), False
            self.opened_count += 1

    def release(self) -> None:
        """A request that ended without a verdict (cancelled) gives its probe back."""
        self._probing = False

    def reset(self) -> None:
        self.state, self.failures, self._probing = "closed", 0, False


# --------------------------------------------------------------------------- failures


class _EmptyAnswer(EngineError):
    """The server answered, but with nothing printable: a sampling outcome, worth one more try."""


class _ServerFailure(Exception):
    """The server (not the request) failed; counts against the breaker."""

    def __init__(self, detail: str, *, retry: bool, busy: bool = False, down_url: str = "") -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry = retry
        self.busy = busy
        self.down_url = down_url

    def to_user_error(self) -> OogiriError:
        if self.busy:
            return EngineBusy(detail=self.detail)
        return EngineError(detail=self.detail)


class _Rediscover(Exception):
    """The discovered model name is gone (model swapped behind a proxy): ask again, once."""


@dataclass(slots=True)
class Stats:
    requests: int = 0
    ok: int = 0
    retries: int = 0
    errors: Counter[str] = field(default_factory=Counter)


# --------------------------------------------------------------------------- the engine


class OpenAIHTTPEngine:
    """One pooled ``httpx.AsyncClient`` for all requests; safe to share across tasks."""

    def __init__(
        self,
        settings: EngineSettings,
        *,
        flavor: str = "lmdeploy",
        upstream: Upstream | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if flavor not in FLAVORS:
            raise ValueError(f"unknown flavor {flavor!r}")
        self.settings = settings
        self.flavor = FLAVORS[flavor]
        self.name = flavor
        self.presize = (
            settings.presize_to_tiles
            if self.flavor.presize_by_default or "presize_to_tiles" in settings.model_fields_set
            else False
        )
        self._upstream = upstream or Upstream.of(
            settings.base_urls, settings.served_model_name, settings.model_version
        )
        self.breaker = CircuitBreaker(settings.breaker_failures, settings.breaker_reset_s, clock)
        self.clock = clock
        self.rng = rng
        self.stats = Stats()
        self.in_flight = 0
        self.url_in_flight: Counter[str] = Counter()
        self._down_until: dict[str, float] = {}
        self._discovered: dict[str, str] = {}
        self._rr = itertools.count()
        self._closed = False
        headers = {"User-Agent": "oogiri"}
        if settings.api_key is not None and settings.api_key.get_secret_value():
            headers["Authorization"] = f"Bearer {settings.api_key.get_secret_value()}"
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(settings.timeout_s, connect=settings.connect_timeout_s),
            limits=httpx.Limits(
                max_connections=settings.max_in_flight + 8,
                max_keepalive_connections=settings.max_in_flight,
            ),
            transport=transport,
            trust_env=False,  # never send loopback inference traffic through an HTTP proxy
        )

    # ------------------------------------------------------------------ upstream

    @property
    def upstream(self) -> Upstream:
        return self._upstream

    def switch(self, upstream: Upstream) -> Upstream:
        """Send every new request (and retry) to ``upstream``; returns the previous one."""
        old, self._upstream = self._upstream, upstream
        self.breaker.reset()
        for url in upstream.base_urls:
            self._down_until.pop(url, None)
            self._discovered.pop(url, None)
        log.info("engine upstream switched: %s → %s", old.base_urls, upstream.base_urls)
        return old

    def in_flight_to(self, urls: Iterable[str]) -> int:
        return sum(self.url_in_flight[u] for u in urls)

    async def drain(self, urls: Iterable[str], timeout_s: float, poll_s: float = 0.05) -> bool:
        """Wait until no request is out to ``urls``; False if some still are after ``timeout_s``."""
        urls = tuple(urls)
        deadline = self.clock() + timeout_s
        while self.in_flight_to(urls):
            if self.clock() >= deadline:
                return False
            await asyncio.sleep(poll_s)
        return True

    # ------------------------------------------------------------------ protocol

    async def generate(
        self, image: NormalizedImage, prompt: str, params: GenerationParams
    ) -> Generation:
        if self._closed:
            raise EngineError(detail="engine is closed")
        if self.in_flight >= self.settings.max_in_flight:
            self.stats.errors["saturated"] += 1
            raise EngineBusy(detail=f"{self.in_flight} requests in flight (max_in_flight)")
        if not self.breaker.allow():
            self.stats.errors["breaker_open"] += 1
            raise EngineBusy(
                detail=f"circuit breaker open; retry in {self.breaker.retry_after():.0f} s"
            )
        started = time.perf_counter()
        self.in_flight += 1
        self.stats.requests += 1
        verdict: str | None = None
        try:
            generation = await self._generate(image, prompt, params, started)
            verdict = "ok"
            self.stats.ok += 1
            return generation
        except _ServerFailure as exc:
            verdict = "failure"
            self.stats.errors["busy" if exc.busy else "server"] += 1
            raise exc.to_user_error() from None
        except OogiriError as exc:
            verdict = "ok"  # the server answered; the request (or picture, or key) was the problem
            self.stats.errors[exc.code] += 1
            raise
        finally:
            self.in_flight -= 1
            if verdict == "ok":
                self.breaker.success()
            elif verdict == "failure":
                self.breaker.failure()
            else:
                self.breaker.release()

    async def _generate(
        self, image: NormalizedImage, prompt: str, params: GenerationParams, started: float
    ) -> Generation:
        if self.presize:
            image = await asyncio.to_thread(self._presize, image, params.max_dynamic_patch)
        data_url = to_data_url(image.jpeg)
        attempts = self.settings.retries + 1
        last: _ServerFailure | None = None
        rediscovered = False
        empty_retries = self.settings.empty_answer_retries
        start = next(self._rr)
        attempt = 0
        while attempt < attempts:
            if attempt:
                self.stats.retries += 1
                await asyncio.sleep(self._backoff(attempt))
            # read per attempt, after the backoff: a retry after a swap goes to the new one (a
            # request sleeping here is out to no server, so the swap's drain does not wait for it)
            upstream = self._upstream
            url = self._pick(upstream, start, attempt)
            self.url_in_flight[url] += 1
            try:
                model = await self._model_for(upstream, url)
                body = self.build_payload(model, data_url, prompt, params)
                assert_only_data_urls(body)
                try:
                    response = await self._client.post(url + CHAT_PATH, json=body)
                except httpx.TransportError as exc:
                    raise self._transport_failure(url, exc) from None
                return self._parse(response, url, upstream, model, started)
            except _Rediscover:
                if rediscovered or upstream.model is not None:
                    raise _ServerFailure(
                        f"model {model!r} not served at {url}", retry=False
                    ) from None
                rediscovered = True
                self._discovered.pop(url, None)
                continue  # not counted as an attempt
            except _EmptyAnswer as exc:
                # a random or undertrained model can sample its end token first; a user must
                # never get a blank joke, and asking again usually gives a real one
                if empty_retries <= 0:
                    raise
                empty_retries -= 1
                self.stats.errors["empty_retried"] += 1
                log.info("empty answer from %s, asking again: %s", url, exc.detail)
                continue  # not a server failure: no backoff, not counted as an attempt
            except _ServerFailure as exc:
                last = exc
                if exc.down_url:
                    self._down_until[exc.down_url] = self.clock() + min(
                        URL_COOLDOWN_S, self.settings.breaker_reset_s
                    )
                if not exc.retry:
                    raise
                log.info("attempt %d/%d to %s failed: %s", attempt + 1, attempts, url, exc.detail)
            finally:
                self.url_in_flight[url] -= 1
            attempt += 1
        assert last is not None
        raise last

    def build_payload(
        self, model: str, data_url: str, prompt: str, params: GenerationParams
    ) -> dict[str, Any]:
        """The chat request: one user turn, picture first, then the instruction.

        Picture-then-text is what XTuner trains InternVL on (``<img>…</img>\\n`` + prompt), and
        LMDeploy renders content items in the order given.
        """
        image_url: dict[str, Any] = {"url": data_url}
        if self.flavor.send_max_dynamic_patch:
            image_url["max_dynamic_patch"] = params.max_dynamic_patch
        body: dict[str, Any] = {
            "model": model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": image_url},
                        {"type": "text", "text": prompt.strip()},
                    ],
                }
            ],
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stream": False,
        }
        if params.seed is not None:
            body["seed"] = params.seed
        least = min(self.settings.min_new_tokens, params.max_new_tokens)
        if self.flavor.min_tokens_field and least > 0:
            body[self.flavor.min_tokens_field] = least
        body.update(self.settings.request_extra)
        return body

    async def health(self) -> EngineHealth:
        upstream = self._upstream
        urls: dict[str, bool] = {}
        for url in upstream.base_urls:
            try:
                response = await self._client.get(url + HEALTH_PATH, timeout=5.0)
                reachable = response.status_code == 200
            except httpx.HTTPError:
                reachable = False
            # health is shown on the public /healthz page: a password in a URL must not be
            urls[mask_url_credentials(url)] = reachable
        # an open breaker past breaker_reset_s lets the next request probe: not a reason to be
        # unready (behind a readiness check no request would come, and it would never close)
        failing_fast = self.breaker.state == "open" and self.breaker.retry_after() > 0
        ok = any(urls.values()) and not failing_fast
        return EngineHealth(
            ok=ok,
            model=upstream.label or upstream.model or self._discovered_name(upstream) or "",
            detail="" if ok else f"breaker {self.breaker.state}; reachable: {urls}",
            extra={
                "flavor": self.flavor.name,
                "urls": urls,
                "breaker": self.breaker.state,
                "in_flight": self.in_flight,
                "requests": self.stats.requests,
                "ok": self.stats.ok,
                "retries": self.stats.retries,
                "errors": dict(self.stats.errors),
            },
        )

    async def close(self) -> None:
        self._closed = True
        await self._client.aclose()

    # ------------------------------------------------------------------ internals

    def _pick(self, upstream: Upstream, start: int, attempt: int) -> str:
        """Round-robin over the base URLs, skipping ones that just refused; retries move on."""
        urls = upstream.base_urls
        if len(urls) == 1:
            return urls[0]
        start %= len(urls)
        order = urls[start:] + urls[:start]
        now = self.clock()
        alive = [u for u in order if self._down_until.get(u, 0.0) <= now] or list(order)
        return alive[attempt % len(alive)]

    @staticmethod
    def _presize(image: NormalizedImage, max_tiles: int) -> NormalizedImage:
        try:
            return tiling.presize(image, max_tiles)
        except Exception as exc:  # the server decides about pictures we cannot resize
            log.warning("could not pre-size image %s: %s", image.sha256[:12], exc)
            return image

    def _backoff(self, attempt: int) -> float:
        base = self.settings.retry_backoff_s * (2 ** (attempt - 1))
        return min(MAX_BACKOFF_S, base) * (0.5 + self.rng())

    def _discovered_name(self, upstream: Upstream) -> str | None:
        for url in upstream.base_urls:
            if url in self._discovered:
                return self._discovered[url]
        return None

    async def _model_for(self, upstream: Upstream, url: str) -> str:
        if upstream.model:
            return upstream.model
        if url in self._discovered:
            return self._discovered[url]
        try:
            response = await self._client.get(url + MODELS_PATH)
        except httpx.TransportError as exc:
            raise self._transport_failure(url, exc) from None
        try:
            data = response.json()
        except ValueError:
            data = None
        error = body_error(data)
        status = response.status_code
        if error is not None and status == 200:
            status = error[0] or 502
        if status in (401, 403):
            raise EngineError(detail=self._bad_key(url, status, error[1] if error else ""))
        if status >= 500:
            raise _ServerFailure(f"{url}{MODELS_PATH} answered {status}", retry=True)
        ids: list[str] = [
            m["id"]
            for m in (data or {}).get("data", [])
            if isinstance(m, dict) and isinstance(m.get("id"), str)
        ]
        if status != 200 or not ids:
            raise _ServerFailure(
                f"cannot discover the model at {url}{MODELS_PATH} (HTTP {status})", retry=False
            )
        if len(ids) > 1:
            log.info("%s serves %s; using %r (set engine.served_model_name)", url, ids, ids[0])
        self._discovered[url] = ids[0]
        return ids[0]

    def _transport_failure(self, url: str, exc: httpx.TransportError) -> _ServerFailure:
        if isinstance(exc, httpx.PoolTimeout):
            return _ServerFailure(f"no free connection to {url}", retry=False, busy=True)
        if isinstance(exc, httpx.ConnectTimeout | httpx.ConnectError):
            return _ServerFailure(
                f"cannot connect to {url}: {type(exc).__name__}", retry=True, down_url=url
            )
        if isinstance(exc, httpx.TimeoutException):  # read/write: the server is alive but slow
            return _ServerFailure(
                f"no answer from {url} within {self.settings.timeout_s:g} s", retry=False
            )
        # the connection broke mid-request (server restarted, proxy reset): safe to ask again
        return _ServerFailure(f"{url}: {type(exc).__name__}: {exc}", retry=True, down_url=url)

    def _bad_key(self, url: str, status: int, message: str) -> str:
        has_key = self.settings.api_key is not None
        return f"bad API key: {url} answered {status} ({message or 'unauthorized'}); " + (
            "check engine.api_key (OOGIRI_ENGINE__API_KEY)"
            if has_key
            else "the server wants a key: set engine.api_key (OOGIRI_ENGINE__API_KEY)"
        )

    def _parse(
        self,
        response: httpx.Response,
        url: str,
        upstream: Upstream,
        model: str,
        started: float,
    ) -> Generation:
        status = response.status_code
        try:
            data = response.json()
        except ValueError:
            data = None
        error = body_error(data)
        message = error[1] if error else response.text[:300]
        if status == 200 and error is not None:
            # lmdeploy serve proxy: HTTP 200 carrying the backend's (or its own) error
            status = error[0] if error[0] and error[0] >= 400 else 502
            log.warning("%s answered 200 with an error body: %s", url, message[:200])
        if status == 200:
            return self._generation(data, upstream, model, started, url)
        if status in (401, 403):
            raise EngineError(detail=self._bad_key(url, status, message))
        if IMAGE_ERROR.search(message):
            raise ImageRejected("corrupt", detail=f"server could not read the picture: {message}")
        if status == 404:
            raise _Rediscover()
        if status in (408, 429):
            raise EngineBusy(detail=f"{url} answered {status}: {message}")
        if 400 <= status < 500:
            raise EngineError(detail=f"{url} rejected the request ({status}): {message}")
        if status == 503:
            raise _ServerFailure(f"{url} is overloaded (503): {message}", retry=True, busy=True)
        raise _ServerFailure(f"{url} answered {status}: {message}", retry=True)

    def _generation(
        self, data: Any, upstream: Upstream, model: str, started: float, url: str
    ) -> Generation:
        try:
            choice = data["choices"][0]
            raw = choice["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise _ServerFailure(f"{url} sent an answer without choices", retry=False) from None
        text = clean_text(str(raw))
        if not text:
            raise _EmptyAnswer(detail=f"{url} returned an empty answer ({raw!r})")
        return Generation(
            text=text,
            model=upstream.label or model,
            usage=_usage(data.get("usage")),
            latency_s=time.perf_counter() - started,
        )


def _usage(raw: Any) -> Usage:
    """Token counts are bookkeeping: a server's odd ``usage`` must never cost a user the joke."""
    if not isinstance(raw, dict):
        return Usage()

    def count(key: str) -> int:
        try:
            return max(0, int(raw.get(key) or 0))
        except (TypeError, ValueError):
            return 0

    return Usage(prompt_tokens=count("prompt_tokens"), completion_tokens=count("completion_tokens"))


# --------------------------------------------------------------------------- registration


def make_openai_engine(settings: Settings) -> OpenAIHTTPEngine:
    return OpenAIHTTPEngine(settings.engine, flavor="openai")


@hookimpl
def oogiri_register_engines(register: Callable[..., Any], settings: Any) -> None:
    # "lmdeploy" (this client, or a managed server behind it) is registered by
    # bot.engines.lmdeploy_server, which builds on this module.
    register("openai", make_openai_engine)
