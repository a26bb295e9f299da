"""Per-App objects of the web channel, shared by every FastAPI app built for the same App."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from plugins.web.guard import Guard
from plugins.web.metrics import WebMetrics
from plugins.web.pages import Template
from plugins.web.sessions import Identities, load_or_create_secret
from plugins.web.static import TEMPLATE_DIR, Assets

if TYPE_CHECKING:
    from bot.app import App

log = logging.getLogger(__name__)

STATE_KEY = "plugins.web"
#: How long the engine's declared demo flag is trusted before its health is asked again.
DEMO_TTL_S = 30.0
HEALTH_TIMEOUT_S = 2.0


class WebState:
    """Identities, metrics, assets and templates of one App's web channel."""

    def __init__(self, app: App) -> None:
        self.app = app
        secret = load_or_create_secret(app.settings)
        self.identities = Identities(secret)
        web = app.settings.web
        self.guard = Guard(
            app.limiter,
            secret=secret,
            trusted_proxies=web.trusted_proxies,
            ipv6_prefix=web.ipv6_prefix,
            uploads_per_minute=web.uploads_per_ip_per_minute,
            votes_per_minute=web.votes_per_ip_per_minute,
            new_sessions_per_hour=web.new_sessions_per_ip_per_hour,
            max_inflight_uploads=web.max_inflight_uploads,
            inflight_uploads_per_network=web.inflight_uploads_per_ip,
        )
        self.metrics = WebMetrics()
        self.assets = Assets()
        self.index = Template((TEMPLATE_DIR / "index.html").read_text(encoding="utf-8"))
        self.stats_page = Template((TEMPLATE_DIR / "stats.html").read_text(encoding="utf-8"))
        self._demo = False
        self._demo_checked = float("-inf")

    def note_demo(self, demo: bool) -> None:
        """Record the demo flag from a health answer obtained elsewhere (e.g. /healthz)."""
        self._demo = demo
        self._demo_checked = time.monotonic()

    async def demo(self) -> bool:
        """Whether the engine declares itself a demo (its health's ``demo``), cached briefly.

        Pages ask on every view; the engine's health may be an HTTP call, so the answer is kept
        for ``DEMO_TTL_S``. A failing probe keeps the last known answer.
        """
        if time.monotonic() - self._demo_checked < DEMO_TTL_S:
            return self._demo
        try:
            health = await asyncio.wait_for(self.app.engine.health(), HEALTH_TIMEOUT_S)
        except Exception as exc:  # the page must render whatever the engine does
            log.debug("web: engine health for the demo flag failed: %s", type(exc).__name__)
            self._demo_checked = time.monotonic()
            return self._demo
        self.note_demo(bool(getattr(health, "demo", False)))
        return self._demo


def web_state(app: App) -> WebState:
    state = app.state.get(STATE_KEY)
    if state is None:
        state = app.state[STATE_KEY] = WebState(app)
    return state
