"""Defects found in a review of the core (CLI, settings, logs, app start-up, outbox), each pinned by
a test that failed before its fix."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, SecretStr
from sqlalchemy import update

from bot.app import App
from bot.engines.instant import InstantEngine
from bot.hookspecs import hookimpl
from bot.logs import RedactingFilter, secret_values
from bot.outbox import Outbox, OutboxWorker, RetryLater
from bot.plugins import make_manager
from bot.settings import Settings, StoreSettings, mask_url_credentials
from bot.store import OutboxRow, Store

OOGIRI = shutil.which("oogiri", path=str(Path(sys.executable).parent)) or "oogiri"


def oogiri(args: list[str], tmp_path: Path, **env_extra: str) -> subprocess.CompletedProcess[str]:
    """``oogiri ARGS`` as a user runs it: a clean OOGIRI_ environment and its own data dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OOGIRI_", "LC_", "LANG"))}
    env.update(OOGIRI_DATA_DIR=str(tmp_path / "data"), LANG="C.UTF-8", COLUMNS="200")
    env.update(env_extra)
    return subprocess.run(
        [OOGIRI, *args], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path
    )


# --------------------------------------------------------------------------- invalid settings


def test_joke_with_an_invalid_setting_names_the_variable_instead_of_a_traceback(
    tmp_path: Path, sample_dir: Path
) -> None:
    """`oogiri joke` skips the plugin loading that catches bad settings for the other commands:
    an invalid value was a 60-line traceback naming `limits.per_user_per_minute` at best."""
    image = str(sample_dir / "chelsea.png")
    core = oogiri(["joke", image], tmp_path, OOGIRI_LIMITS__PER_USER_PER_MINUTE="abc")
    assert core.returncode == 2, core.stderr
    assert "Traceback" not in core.stderr and "OOGIRI_LIMITS__PER_USER_PER_MINUTE" in core.stderr
    # a plugin's setting is read only once the image passed: the same clear exit, nothing loaded
    plugin = oogiri(["joke", image], tmp_path, OOGIRI_WEB__PORT="eighty")
    assert plugin.returncode == 2, plugin.stderr
    assert "Traceback" not in plugin.stderr and "OOGIRI_WEB__PORT" in plugin.stderr
    assert not (tmp_path / "data" / "oogiri.sqlite3").exists()


def test_config_show_names_the_variable_of_an_invalid_value(tmp_path: Path) -> None:
    """A list that is not JSON was `error parsing value for field "telegram" from source
    "EnvSettingsSource"`: which of the section's variables, and what is wrong with it?"""
    result = oogiri(["config", "show"], tmp_path, OOGIRI_TELEGRAM__ADMIN_IDS="12,34x")
    assert result.returncode == 2 and result.stdout == ""
    assert "OOGIRI_TELEGRAM__ADMIN_IDS" in result.stderr and "JSON" in result.stderr
    ranged = oogiri(["config", "show"], tmp_path, OOGIRI_ENGINE__MAX_NEW_TOKENS="0")
    assert ranged.returncode == 2
    assert "OOGIRI_ENGINE__MAX_NEW_TOKENS" in ranged.stderr
    assert "greater than or equal to 1" in ranged.stderr


# --------------------------------------------------------------------------- secrets in URLs


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        ("redis://default:p@ss@cache:6379/0", "p@ss"),  # urlsplit: password "p@ss"
        ("postgresql+asyncpg://bot:ab/cd@db/oogiri", "ab/cd"),  # SQLAlchemy: password "ab/cd"
    ],
)
def test_a_password_with_an_at_or_a_slash_is_masked_whole(
    url: str, secret: str, tmp_path: Path
) -> None:
    masked = mask_url_credentials(f"store at {url} failed")
    assert secret not in masked and secret.split("@")[-1].split("/")[-1] not in masked
    assert masked.startswith("store at ") and masked.endswith(" failed")
    shown = Settings(data_dir=tmp_path, store=StoreSettings(url=url)).masked()
    assert secret not in shown["store"]["url"]
    assert secret not in RedactingFilter().redact(f"connecting to {url}")


def test_url_masking_leaves_urls_without_credentials_alone() -> None:
    for text in (
        "https://medium.com/@someone",
        "http://host:8080/@x",
        "see http://example.org/a?b=c#d",
    ):
        assert mask_url_credentials(text) == text
    both = mask_url_credentials("redis://u:one@h1/0,redis://:two@h2/0")
    assert "one" not in both and "two" not in both and "h1" in both and "h2" in both


def test_secrets_in_lists_and_dicts_of_a_plugin_section_are_redacted() -> None:
    """A plugin owns its settings: several API keys as ``list[SecretStr]`` are secrets too."""

    class Section(BaseModel):
        keys: list[SecretStr] = []
        by_host: dict[str, SecretStr] = {}

    found = secret_values(
        Section(keys=[SecretStr("key-one-123")], by_host={"a": SecretStr("key-two-456")})
    )
    assert set(found) == {"key-one-123", "key-two-456"}


# --------------------------------------------------------------------------- app start-up


class Closing(InstantEngine):
    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    async def close(self) -> None:
        self.closed = True
        await super().close()


@pytest.mark.parametrize("how", ["fails", "cancelled"])
async def test_a_start_up_that_fails_closes_the_engine_it_made(
    settings: Settings, how: str
) -> None:
    """A managed LMDeploy server is a child process: a plugin's start-up failing (or Ctrl-C) after
    the engine was made left it, and the store, open: App.create returned nothing to close."""
    made: list[Closing] = []
    entered = asyncio.Event()

    class P:
        @hookimpl
        def oogiri_register_engines(self, register, settings):
            register("closing", lambda s: made.append(Closing()) or made[-1])

        @hookimpl
        async def oogiri_startup(self, app):
            entered.set()
            if how == "fails":
                raise RuntimeError("start-up failed")
            await asyncio.Event().wait()

    settings.engine.name = "closing"
    task = asyncio.create_task(App.create(settings, pm=make_manager([], extra=[P()])))
    await asyncio.wait_for(entered.wait(), 10)
    if how == "cancelled":
        task.cancel()
    with pytest.raises((RuntimeError, asyncio.CancelledError)):
        await task
    assert made and made[0].closed


async def test_a_failing_shutdown_hook_still_closes_the_engine_and_the_other_plugins(
    settings: Settings,
) -> None:
    """One plugin's ``oogiri_shutdown`` raising skipped every other plugin's and the engine's
    close (a managed LMDeploy child process left running)."""
    calls: list[str] = []

    class Broken:
        @hookimpl
        def oogiri_shutdown(self, app):
            raise RuntimeError("shutdown bug")

    class Tidy:
        @hookimpl
        def oogiri_shutdown(self, app):
            calls.append("tidy")

    engine = Closing()
    app = await App.create(settings, pm=make_manager([], extra=[Tidy(), Broken()]), engine=engine)
    await app.close()
    assert engine.closed and calls == ["tidy"]


class Events:
    def __init__(self) -> None:
        self.log: list[str] = []
        self.entered = asyncio.Event()


def channel_plugin(events: Events, hang: bool = False) -> object:
    class Chan:
        def __init__(self, app: App) -> None:
            self.name = "fake"

        async def start(self) -> None:
            events.log.append("start")
            events.entered.set()
            if hang:  # a gateway that never answers
                await asyncio.Event().wait()

        async def stop(self) -> None:
            events.log.append("stop")

    class P:
        @hookimpl
        def oogiri_register_channels(self, register, settings):
            register("fake", Chan)

    return P()


async def test_an_unknown_channel_is_refused_before_any_channel_starts(settings: Settings) -> None:
    events = Events()
    app = await App.create(
        settings, pm=make_manager([], extra=[channel_plugin(events)]), engine=InstantEngine()
    )
    try:
        with pytest.raises(LookupError, match="nope"):
            await app.start_channels(["fake", "nope"])
        assert events.log == []  # not started, then stopped again
    finally:
        await app.close()


async def test_a_stop_signal_during_a_hanging_channel_start_ends_serve(settings: Settings) -> None:
    """The SIGINT/SIGTERM handlers are installed before the channels start, and only set an event
    that was awaited after they all started: a start that hangs could not be interrupted."""
    events = Events()
    settings.channels = ["fake"]
    app = await App.create(
        settings,
        pm=make_manager([], extra=[channel_plugin(events, hang=True)]),
        engine=InstantEngine(),
    )
    try:
        serving = asyncio.create_task(app.serve_forever())
        await asyncio.wait_for(events.entered.wait(), 10)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(serving, 5)
    finally:
        await app.close()
    assert app.channels == []


def test_serve_with_a_channel_that_cannot_start_says_so_and_exits(tmp_path: Path) -> None:
    """A channel's own error (no token, a typo in OOGIRI_CHANNELS) was a traceback, and a
    misspelt channel was found only after the others had started."""
    bad = oogiri(
        ["serve", "--channels", "web,nope"],
        tmp_path,
        OOGIRI_ENGINE__NAME="instant",
        OOGIRI_WEB__PORT="0",
    )
    assert bad.returncode == 1
    assert "Traceback" not in bad.stderr and "'nope'" in bad.stderr
    assert "channel web started" not in bad.stderr
    token = oogiri(["serve", "--channels", "discord"], tmp_path, OOGIRI_ENGINE__NAME="instant")
    assert token.returncode == 1
    assert "Traceback" not in token.stderr and "OOGIRI_DISCORD__TOKEN" in token.stderr


# --------------------------------------------------------------------------- outbox


async def test_a_retry_after_zero_does_not_spin_the_outbox_loop(store: Store) -> None:
    """``RetryLater(seconds=0)`` (a 429 with ``retry_after: 0``) made the row due at once and the
    loop claim it again without ever sleeping: hundreds of sends a second to a rate-limited API."""
    outbox = Outbox(store, "test", owner="a")
    await outbox.add("chat-1", {"n": 1})
    async with store.session(write=True) as s:  # the row's claim lapses: the loop owns it
        await s.execute(update(OutboxRow).values(claimed_by=None, lease_until=None))
    sends = 0

    async def deliver(item: Any) -> dict[str, Any]:
        nonlocal sends
        sends += 1
        raise RetryLater("flood", 0)

    worker = OutboxWorker(outbox, deliver, poll_s=0.2)
    worker.start()
    await asyncio.sleep(1.0)
    await worker.stop()
    # retried, not dropped (a second send), and paced: at most one round per poll_s (0.2 s) in the
    # second the loop ran, where the spinning loop sent hundreds
    assert 2 <= sends <= 6, sends
