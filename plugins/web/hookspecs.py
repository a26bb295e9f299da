"""The web plugin's own hook, declared through ``oogiri_add_hookspecs``: the core knows nothing
about web routes; plugins that want a route on the web channel's port implement this."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from oogiri import hookspec

if TYPE_CHECKING:
    from oogiri import App


@hookspec
def oogiri_web_routes(router: Any, app: App) -> None:
    """Add routes to the web channel's FastAPI ``APIRouter`` (e.g. a Telegram webhook)."""
