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
from pydantic import BaseModel

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
    pm.hook.oogiri_add_hookspecs.call_historic(kwargs={"pm": pm})
    pm.hook.oogiri_register_settings(register=add_settings_section)
    return pm


# Settings sections contributed by plugins (``oogiri_register_settings``), for the whole process:
# ``bot.settings.settings_class()`` builds the Settings class from the core fields and these.
_settings_sections: dict[str, type[BaseModel]] = {}


def _qualified(model: type) -> str:
    return f"{model.__module__}.{model.__qualname__}"


def add_settings_section(section: str, model: type[BaseModel]) -> None:
    """The ``register`` callback of ``oogiri_register_settings``: ``register(section, Model)``.

    A plugin loaded twice may register the same model again, and a subclass refines the section's
    model; two unrelated models for one section are an error.
    """
    if not section.isidentifier() or section != section.lower() or section.startswith("_"):
        raise ValueError(f"settings section {section!r}: use a lower-case Python identifier")
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise TypeError(f"settings section {section!r}: {model!r} is not a pydantic model")
    previous = _settings_sections.get(section)
    if previous is None or issubclass(model, previous):
        _settings_sections[section] = model
    elif not issubclass(previous, model):
        raise ValueError(
            f"settings section {section!r} is registered twice "
            f"({_qualified(previous)}, {_qualified(model)})"
        )


def settings_sections() -> dict[str, type[BaseModel]]:
    """Every plugin section registered so far in this process."""
    return dict(_settings_sections)


async def resolve(value: Any) -> Any:
    """``value``, awaited first if it is awaitable (an ``async def`` implementation's answer)."""
    if inspect.isawaitable(value):
        return await value
    return value


def _close_pending(values: Iterable[Any]) -> None:
    # Coroutines that will never be awaited (an earlier one raised): close them, no warning.
    for value in values:
        if inspect.iscoroutine(value):
            value.close()


async def await_results(caller: pluggy.HookCaller, **kwargs: Any) -> Any:
    """Call a hook through pluggy and await what it returned: the one helper every call uses.

    pluggy does the calling (argument selection, ``tryfirst``/``trylast``, ``wrapper=True`` and
    old-style ``hookwrapper`` implementations, ``firstresult``); this only awaits awaitables. For a
    *firstresult* hook pluggy stops at the first non-None return value, and the coroutine of an
    ``async def`` implementation is one: an async implementation's answer is final, so a
    firstresult implementation that may decline is a plain ``def`` returning ``None``.
    """
    result = caller(**kwargs)
    if caller.spec is not None and caller.spec.opts.get("firstresult"):
        return await resolve(result)
    values = list(result)
    resolved: list[Any] = []
    try:
        for value in values:
            resolved.append(await resolve(value))
    except BaseException:
        _close_pending(values[len(resolved) + 1 :])
        raise
    return resolved


async def call_hook(pm: pluggy.PluginManager, name: str, **kwargs: Any) -> Any:
    """``pm.hook.<name>(**kwargs)`` with awaitables awaited: a list, or one value (firstresult)."""
    return await await_results(getattr(pm.hook, name), **kwargs)


async def call_first(pm: pluggy.PluginManager, name: str, **kwargs: Any) -> Any:
    """Call a *firstresult* hook: the first non-None answer in pluggy's order, awaited."""
    caller = getattr(pm.hook, name)
    if caller.spec is None or not caller.spec.opts.get("firstresult"):
        raise TypeError(f"{name} is not a firstresult hook; use call_hook")
    return await await_results(caller, **kwargs)


def each_implementation(pm: pluggy.PluginManager, name: str) -> list[tuple[str, pluggy.HookCaller]]:
    """One pluggy caller per (non-wrapper) implementation of ``name``, in pluggy's call order.

    Each caller is pluggy's own ``subset_hook_caller`` without the other implementations: it keeps
    every wrapper, ``tryfirst``/``trylast`` and argument selection. Observers use it so that one
    failing plugin cannot stop the others (a plain pluggy call stops at the first exception).
    """
    caller: pluggy.HookCaller = getattr(pm.hook, name)
    impls = [i for i in reversed(caller.get_hookimpls()) if not (i.wrapper or i.hookwrapper)]
    if not impls:  # only wrappers (or nothing): one plain call, as pluggy would make
        return [("wrappers", caller)]
    plugins = [i.plugin for i in impls]
    return [
        (
            impl.plugin_name,
            pm.subset_hook_caller(
                name, remove_plugins=[p for p in plugins if p is not impl.plugin]
            ),
        )
        for impl in impls
    ]


async def notify(pm: pluggy.PluginManager, name: str, **kwargs: Any) -> None:
    """Call an observer hook: each implementation runs even if another one fails."""
    for plugin_name, caller in each_implementation(pm, name):
        try:
            await await_results(caller, **kwargs)
        except Exception:
            log.exception("%s in plugin %s failed; other observers still run", name, plugin_name)


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
