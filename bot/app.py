"""The assembled application: settings + plugins + store + engine + service + channels."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Iterable
from typing import Any, Protocol

import pluggy

from bot.engines.base import Engine
from bot.limits import Limiter, make_limiter
from bot.metrics import Metrics
from bot.plugins import Registry, call_hook, collect, make_manager, notify
from bot.service import JokeService
from bot.settings import Settings, mask_url
from bot.store import Store

log = logging.getLogger(__name__)


class Channel(Protocol):
    """A way people reach the bot. ``start`` returns once it is serving; ``stop`` drains it."""

    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class App:
    def __init__(
        self,
        settings: Settings,
        pm: pluggy.PluginManager,
        store: Store,
        engine: Engine,
        limiter: Limiter,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.pm = pm
        self.store = store
        self.engine = engine
        self.limiter = limiter
        self.metrics = metrics
        self.service = JokeService(settings, pm, store, engine, limiter, metrics)
        self.channel_registry: Registry = collect(
            pm, "oogiri_register_channels", "channel", settings
        )
        self.channels: list[Channel] = []
        self.state: dict[str, Any] = {}  # plugins keep their per-app objects here

    @classmethod
    async def create(
        cls,
        settings: Settings | None = None,
        pm: pluggy.PluginManager | None = None,
        engine: Engine | None = None,
        plugins: Iterable[object] = (),
    ) -> App:
        settings = settings or Settings()
        pm = pm or make_manager(settings.plugins, extra=plugins)
        settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # private when new
        store = Store(settings.database_url, settings.images_dir, echo=settings.store.echo)
        made: Engine | None = None
        try:
            log.info("store: %s", mask_url(settings.database_url))
            await store.upgrade()
            if engine is None:
                engines = collect(pm, "oogiri_register_engines", "engine", settings)
                factory = engines.get(settings.engine.name)
                built: Engine = await asyncio.to_thread(factory, settings)
                made = engine = built
            serving: Engine = engine
            limiter = make_limiter(settings.limits.backend)
        except BaseException:
            if made is not None:
                await made.close()
            await store.close()
            raise
        app = cls(settings, pm, store, serving, limiter, Metrics())
        try:
            await call_hook(pm, "oogiri_startup", app=app)
        except BaseException:
            # a start-up hook failed or Ctrl-C came: what started (a managed LMDeploy server, a
            # plugin's task) is stopped here, since the caller gets no app to close
            await app.close()
            raise
        return app

    def swap_engine(self, engine: Engine) -> Engine:
        """Route new requests to ``engine``; the caller drains and closes the returned old one."""
        old, self.engine, self.service.engine = self.engine, engine, engine
        return old

    async def start_channels(self, names: Iterable[str] | None = None) -> None:
        names = list(names if names is not None else self.settings.channels)
        # every name first: a misspelt channel starts nothing (and nothing has to be stopped)
        factories = [(name, self.channel_registry.get(name)) for name in names]
        for name, factory in factories:
            try:
                channel = factory(self)
                await channel.start()
            except Exception:
                log.error("channel %s failed to start", name)
                raise
            self.channels.append(channel)
            log.info("channel %s started", name)

    async def serve_forever(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):
                pass
        # A stop signal while the channels start (a gateway that does not answer) ends the start
        # too: the handlers above replaced Ctrl-C's usual KeyboardInterrupt.
        starting = asyncio.ensure_future(self.start_channels())
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():
                log.info("stop requested while the channels were starting")
                starting.cancel()
                await asyncio.gather(starting, return_exceptions=True)
            else:
                starting.result()  # a channel that failed to start
                await stopping
        finally:
            starting.cancel()
            stopping.cancel()
        log.info("shutting down")

    async def close(self) -> None:
        for channel in reversed(self.channels):
            try:
                await channel.stop()
            except Exception:
                log.exception("channel %s failed to stop cleanly", channel.name)
        self.channels.clear()
        try:
            await notify(self.pm, "oogiri_shutdown", app=self)  # one failing plugin stops no other
        finally:
            try:
                await self.engine.close()
            finally:
                try:
                    await self.limiter.close()
                finally:
                    await self.store.close()
