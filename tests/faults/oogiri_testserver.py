"""Test-only wrapper around the real ``App``: serve the configured channels (the web channel by
default) with optional fault-injection plugins, as ``oogiri serve`` does.

Settings come from the environment exactly like ``oogiri serve`` (``OOGIRI_*``). Extra knobs, all
test-only:

* ``OOGIRI_TEST_SLOW_RATING_S``: an ``oogiri_on_rating`` observer that, after a vote is
  committed, appends ``<joke_id> <user_id> <value>`` to ``OOGIRI_TEST_MARKER`` and then sleeps this
  long, so the HTTP answer to the vote is held back — the window "vote accepted, not yet
  answered" in which a test SIGKILLs the process. ``OOGIRI_TEST_SLOW_RATING_JOKES`` (comma-separated
  joke ids) limits this to votes on those jokes.
* ``OOGIRI_TEST_ENGINE_FAULT_FILE``: the configured engine is wrapped so that while this file
  exists every generation fails with ``EngineError`` (a soak run creates and removes it to inject
  engine outages into a running bot).

Run: ``python tests/faults/oogiri_testserver.py``; it logs ``READY <url>`` once serving.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bot.app import App  # noqa: E402
from bot.engines.base import EngineHealth  # noqa: E402
from bot.hookspecs import hookimpl  # noqa: E402
from bot.logs import configure_logging  # noqa: E402
from bot.models import (  # noqa: E402
    EngineError,
    Generation,
    GenerationParams,
    NormalizedImage,
    Rating,
)
from bot.settings import Settings  # noqa: E402

log = logging.getLogger("oogiri.testserver")


class SlowRatingObserver:
    """Holds the answer to every vote back, after the vote is stored."""

    def __init__(self, delay_s: float, marker: Path | None, jokes: set[int] | None) -> None:
        self.delay_s = delay_s
        self.marker = marker
        self.jokes = jokes

    @hookimpl
    async def oogiri_on_rating(self, rating: Rating) -> None:
        if self.jokes is not None and rating.joke_id not in self.jokes:
            return
        if self.marker is not None:
            with self.marker.open("a") as fh:
                fh.write(f"{rating.joke_id} {rating.user_id} {rating.value}\n")
                fh.flush()
                os.fsync(fh.fileno())
        await asyncio.sleep(self.delay_s)


class FlakyEngine:
    """Any engine, failing while ``flag`` exists (checked per request)."""

    def __init__(self, inner: object, flag: Path) -> None:
        self.inner = inner
        self.flag = flag
        self.name = getattr(inner, "name", "engine")
        self.is_demo = getattr(inner, "is_demo", False)

    async def generate(
        self, image: NormalizedImage, prompt: str, params: GenerationParams
    ) -> Generation:
        if self.flag.exists():
            raise EngineError(detail="injected engine fault")
        return await self.inner.generate(image, prompt, params)  # type: ignore[attr-defined]

    async def health(self) -> EngineHealth:
        if self.flag.exists():
            return EngineHealth(ok=False, model="", detail="injected engine fault")
        return await self.inner.health()  # type: ignore[attr-defined]

    async def close(self) -> None:
        await self.inner.close()  # type: ignore[attr-defined]


async def main() -> None:
    settings = Settings()
    configure_logging(settings)
    plugins: list[object] = []
    slow = os.environ.get("OOGIRI_TEST_SLOW_RATING_S")
    if slow:
        marker = os.environ.get("OOGIRI_TEST_MARKER")
        only = os.environ.get("OOGIRI_TEST_SLOW_RATING_JOKES")
        jokes = {int(j) for j in only.split(",") if j.strip()} if only else None
        plugins.append(SlowRatingObserver(float(slow), Path(marker) if marker else None, jokes))
    app = await App.create(settings, plugins=plugins)
    fault_file = os.environ.get("OOGIRI_TEST_ENGINE_FAULT_FILE")
    if fault_file:
        app.swap_engine(FlakyEngine(app.engine, Path(fault_file)))
    try:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        import signal

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await app.start_channels()
        log.info("READY http://%s:%d", settings.web.host, settings.web.port)
        await stop.wait()
    finally:
        await app.close()


if __name__ == "__main__":
    asyncio.run(main())
