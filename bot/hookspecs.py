"""The plugin contract: every hook oogiri calls. Documented one by one in docs/plugins.md.

pluggy calls hooks synchronously; an implementation may return an awaitable and the core awaits it
(see ``bot.plugins.call_hook``). Registration hooks receive a ``register`` callback rather than
returning objects, so one plugin can register several things and ordering stays explicit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from pydantic import BaseModel

    from bot.app import App
    from bot.models import Joke, JokeRequest, Rating
    from bot.settings import Settings

PROJECT = "oogiri"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def oogiri_register_channels(register: Callable[..., None], settings: Settings) -> None:
    """Register channel factories: ``register(name, factory)``; factory(app) -> Channel."""


@hookspec
def oogiri_register_engines(register: Callable[..., None], settings: Settings) -> None:
    """Register engine factories: ``register(name, factory)``; factory(settings) -> Engine."""


@hookspec
def oogiri_register_settings(register: Callable[[str, type[BaseModel]], None]) -> None:
    """Add a settings section: ``register(section, Model)`` → ``settings.<section>``, read from
    ``OOGIRI_<SECTION>__<FIELD>`` and ``[section]`` in oogiri.toml. A subclass of a core section's
    model adds fields to that section."""


@hookspec
def oogiri_register_commands(cli: Any) -> None:
    """Add sub-commands to the ``oogiri`` Typer app (``cli.add_typer`` / ``cli.command``)."""


@hookspec(firstresult=True)
def oogiri_prompt(request: JokeRequest, settings: Settings) -> str | None:
    """Return the instruction text for this request; the first non-None answer wins."""


@hookspec
def oogiri_admit(request: JokeRequest) -> None:
    """Before any download or decode (``JokeService.admit``): raise ``Rejected`` to refuse cheaply.

    Only ids are known here (``request.user_id``, ``chat_id``, ``meta``), no image: block lists,
    allow lists, quotas. ``tell`` runs it too for a request no channel admitted first.
    """


@hookspec
def oogiri_before_joke(request: JokeRequest) -> None:
    """Called after the image is validated, before the engine. Raise ``Rejected`` to refuse."""


@hookspec
def oogiri_after_joke(request: JokeRequest, joke: Joke) -> str | None:
    """Called after generation, before storing. Return a string to replace the joke text."""


@hookspec
def oogiri_on_rating(rating: Rating) -> None:
    """Called after a vote has been committed to the store."""


@hookspec
def oogiri_training_examples(examples: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """Filter or augment exported training examples; return a new list to replace them."""


@hookspec
def oogiri_model_promoted(version: str, previous: str | None) -> None:
    """Called after a model version became the active one (promotion or rollback)."""


@hookspec
def oogiri_startup(app: App) -> None:
    """Called once the app (store, engine, service) is ready, before channels start."""


@hookspec
def oogiri_shutdown(app: App) -> None:
    """Called after channels stopped, before the store and engine close."""


@hookspec(historic=True)
def oogiri_add_hookspecs(pm: pluggy.PluginManager) -> None:
    """Declare a plugin's own hooks: ``pm.add_hookspecs(module_with_hookspecs)``, so that other
    plugins can implement them (the web plugin's ``oogiri_web_routes``). Historic: a plugin
    registered later is asked too."""
