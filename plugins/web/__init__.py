"""The built-in web channel: an upload page, a JSON API, /healthz, /metrics and a stats page.

Registered through the ``oogiri`` hooks exactly like a third-party plugin (entry point
``web = "plugins.web"``). The package is split by concern:

- ``routes``   the FastAPI app: JSON API, /healthz, /livez, /metrics (``create_api``)
- ``pages``    the upload page and the stats page (templates in ``templates/``)
- ``sessions`` anonymous cookie identities, CSRF tokens, the same-origin check
- ``static``   the page's assets through Starlette's ``StaticFiles``
- ``metrics``  Prometheus counters and the middleware adding security headers
- ``texts``    the channel's messages and language negotiation
- ``server``   ``WebChannel``: uvicorn inside the App's event loop
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from oogiri import hookimpl
from plugins.web import hookspecs
from plugins.web.errors import error_response, oogiri_error_response
from plugins.web.metrics import SECURITY_HEADERS, WebMetrics, WebMiddleware
from plugins.web.pages import Template, stats_svg
from plugins.web.routes import CHANNEL, MAX_JSON_BODY, MULTIPART_SLACK, create_api
from plugins.web.server import WebChannel
from plugins.web.sessions import (
    CSRF_COOKIE,
    CSRF_HEADER,
    USER_COOKIE,
    Identities,
    Visitor,
    load_or_create_secret,
    same_origin,
)
from plugins.web.settings import WebSettings
from plugins.web.state import WebState, web_state
from plugins.web.static import STATIC_DIR
from plugins.web.texts import PAGE_TEXTS, WEB_MESSAGES, pick_language, web_message

if TYPE_CHECKING:
    from bot.settings import Settings

__all__ = [
    "CHANNEL",
    "CSRF_COOKIE",
    "CSRF_HEADER",
    "MAX_JSON_BODY",
    "MULTIPART_SLACK",
    "PAGE_TEXTS",
    "SECURITY_HEADERS",
    "STATIC_DIR",
    "USER_COOKIE",
    "WEB_MESSAGES",
    "Identities",
    "Template",
    "Visitor",
    "WebChannel",
    "WebMetrics",
    "WebMiddleware",
    "WebSettings",
    "WebState",
    "create_api",
    "error_response",
    "load_or_create_secret",
    "oogiri_error_response",
    "pick_language",
    "same_origin",
    "stats_svg",
    "web_message",
    "web_state",
]


@hookimpl
def oogiri_add_hookspecs(pm: Any) -> None:
    pm.add_hookspecs(hookspecs)


@hookimpl
def oogiri_register_settings(register: Callable[..., None]) -> None:
    register("web", WebSettings)


@hookimpl
def oogiri_register_channels(register: Callable[..., None], settings: Settings) -> None:
    register(CHANNEL, WebChannel)
