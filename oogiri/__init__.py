"""The public API for oogiri plugin authors: import from here, not from ``bot.*``.

A plugin is a module (or object) with functions marked ``@hookimpl``, found through the ``oogiri``
entry-point group. Everything a plugin receives or returns is named here, so that the core's module
layout can change without breaking third-party plugins. docs/plugins.md walks through a complete
plugin; ``bot/hookspecs.py`` is the contract itself.

    from oogiri import hookimpl

    @hookimpl
    def oogiri_after_joke(request, joke):
        return joke.text.replace("  ", " ")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bot.engines.base import Engine, EngineHealth
from bot.hookspecs import hookimpl, hookspec
from bot.models import (
    EngineBusy,
    EngineError,
    Generation,
    GenerationParams,
    ImageRejected,
    Joke,
    JokeRequest,
    NormalizedImage,
    NotFound,
    OogiriError,
    RateLimited,
    Rating,
    Rejected,
    Usage,
)
from bot.settings import PluginSettings, Settings, split_list

if TYPE_CHECKING:
    from bot.app import App, Channel

__all__ = [
    "App",
    "Channel",
    "Engine",
    "EngineBusy",
    "EngineError",
    "EngineHealth",
    "Generation",
    "GenerationParams",
    "ImageRejected",
    "Joke",
    "JokeRequest",
    "NormalizedImage",
    "NotFound",
    "OogiriError",
    "PluginSettings",
    "RateLimited",
    "Rating",
    "Rejected",
    "Settings",
    "Usage",
    "hookimpl",
    "hookspec",
    "split_list",
]


def __getattr__(name: str) -> Any:
    # App and Channel pull in the store (SQLAlchemy): imported on first use, not by
    # ``from oogiri import hookimpl``.
    if name in ("App", "Channel"):
        from bot import app

        return getattr(app, name)
    raise AttributeError(f"module 'oogiri' has no attribute {name!r}")
