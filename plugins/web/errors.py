"""JSON error answers of the web channel: one shape, the status that fits each core error."""

from __future__ import annotations

import math

from fastapi.responses import JSONResponse

from bot.models import (
    EngineBusy,
    EngineError,
    ImageRejected,
    NotFound,
    OogiriError,
    RateLimited,
    Rejected,
    StoreUnavailable,
)
from plugins.web.texts import WEB_MESSAGES, web_message


class TooLarge(Exception):
    """The request body went over its limit while it streamed."""


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
    # The channel's own keys (e.g. per-network limits) have their texts here, not in the core.
    text = web_message(exc.key, lang, **exc.params) if exc.key in WEB_MESSAGES else None
    text = text or exc.user_message(lang)
    if isinstance(exc, ImageRejected):
        status = 413 if exc.key == "too_large" else 400
    elif isinstance(exc, RateLimited):
        status = 429
        seconds = exc.params.get("seconds", 1)
        headers["Retry-After"] = str(max(1, math.ceil(float(seconds))))
    elif isinstance(exc, EngineBusy):
        status = 503
        headers["Retry-After"] = str(max(1, math.ceil(float(exc.params.get("seconds", 5)))))
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


def limit_mb(max_bytes: int) -> str:
    mb = max_bytes / (1024 * 1024)
    return f"{mb:.0f}" if mb >= 10 else f"{mb:.1f}".rstrip("0").rstrip(".")
