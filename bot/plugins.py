"""Plugin loading: every plugin, built-in or third-party, comes from the ``oogiri`` entry points."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any

import pluggy

from bot import hookspecs

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "oogiri"


def make_manager(
    only: Iterable[str] | None = None, extra: Iterable[object] = ()
) -> pluggy.PluginManager:
    """A manager with the hookspecs, the entry-point plugins (filtered by ``only``) and ``extra``.

    ``only`` is the OOGIRI_PLUGINS list: names of entry points to load; ``None`` loads all.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    wanted = set(only) if only is not None else None
    found: set[str] = set()
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.add(ep.name)
        if wanted is not None and ep.name not in wanted:
            continue
        if pm.has_plugin(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception:
            # A broken third-party plugin must not take the bot down; say so loudly instead.
            log.exception("plugin %s (%s) failed to load; skipped", ep.name, ep.value)
            continue
        pm.register(plugin, name=ep.name)
    if wanted is not None:
        for missing in sorted(wanted - found):
            log.warning("OOGIRI_PLUGINS names %r but no such plugin is installed", missing)
    for plugin in extra:
        if not pm.is_registered(plugin):  # already loaded through its entry point
            pm.register(plugin)
    return pm


async def resolve(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


async def call_hook(pm: pluggy.PluginManager, name: str, **kwargs: Any) -> list[Any]:
    """Call a (non-firstresult) hook and await any awaitable results, in pluggy's order."""
    results = getattr(pm.hook, name)(**kwargs)
    return [await resolve(r) for r in results]


async def call_first(pm: pluggy.PluginManager, name: str, **kwargs: Any) -> Any:
    """Call a hook and return the first non-None result, awaiting awaitables.

    pluggy's firstresult stops at the first non-None *object*, and an un-awaited coroutine is one;
    so async implementations are awaited here, in order, until one answers.
    """
    caller = getattr(pm.hook, name)
    for impl in reversed(caller.get_hookimpls()):
        args = {k: kwargs[k] for k in impl.argnames if k in kwargs}
        value = await resolve(impl.function(**args))
        if value is not None:
            return value
    return None


async def notify(pm: pluggy.PluginManager, name: str, **kwargs: Any) -> None:
    """Call an observer hook: each implementation runs even if another one fails."""
    for impl in reversed(getattr(pm.hook, name).get_hookimpls()):
        args = {k: kwargs[k] for k in impl.argnames if k in kwargs}
        try:
            await resolve(impl.function(**args))
        except Exception:
            log.exception(
                "%s in plugin %s failed; other observers still run", name, impl.plugin_name
            )


@dataclass(frozen=True, slots=True)
class PluginInfo:
    name: str
    module: str
    hooks: tuple[str, ...]


def describe(pm: pluggy.PluginManager) -> list[PluginInfo]:
    infos = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        hooks = tuple(sorted(h.name for h in pm.get_hookcallers(plugin) or []))
        module = plugin.__name__ if isinstance(plugin, ModuleType) else type(plugin).__module__
        infos.append(PluginInfo(name=name, module=module, hooks=hooks))
    return sorted(infos, key=lambda i: i.name)


class Registry:
    """Name → factory, filled through a ``register`` callback handed to a registration hook."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., Any]] = {}

    def register(self, name: str, factory: Callable[..., Any]) -> None:
        if name in self._factories:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._factories[name] = factory

    def names(self) -> list[str]:
        return sorted(self._factories)

    def get(self, name: str) -> Callable[..., Any]:
        try:
            return self._factories[name]
        except KeyError:
            known = ", ".join(self.names()) or "none"
            raise LookupError(f"no {self.kind} named {name!r} (registered: {known})") from None


def collect(pm: pluggy.PluginManager, hook: str, kind: str, settings: Any) -> Registry:
    registry = Registry(kind)
    getattr(pm.hook, hook)(register=registry.register, settings=settings)
    return registry
