"""Review of bot/engines: each test here failed before its fix (see the docstrings)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sys
from pathlib import Path

import pytest
from enginesupport import FAKES, engine_settings, jpeg_image
from fake_lmdeploy import FakeLMDeploy

from bot.engines import lmdeploy_server
from bot.engines.lmdeploy_server import ManagedLMDeploy, ServerProcess
from bot.engines.openai_http import OpenAIHTTPEngine, Upstream
from bot.models import EngineError, GenerationParams, NormalizedImage
from bot.settings import Settings

FAKE_CMD = [sys.executable, str(FAKES / "fake_lmdeploy.py")]
PARAMS = GenerationParams(max_new_tokens=16, max_dynamic_patch=1)
PROMPT = "请你根据这张图片，讲一个脑洞大开的梗"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def chats(fake: FakeLMDeploy) -> list[dict]:
    return [r for r in fake.requests if r["path"] == "/v1/chat/completions"]


async def until(condition, timeout_s: float = 10.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    try:
        return "zombie" not in status.read_text()
    except OSError:
        return False


# --------------------------------------------------------------------------- the HTTP engine


@pytest.fixture
async def http_engines():
    made: list[OpenAIHTTPEngine] = []

    def make(*urls: str, clock=None, rng=None, **overrides: object) -> OpenAIHTTPEngine:
        kwargs = {}
        if clock is not None:
            kwargs["clock"] = clock
        if rng is not None:
            kwargs["rng"] = rng
        engine = OpenAIHTTPEngine(engine_settings(*urls, **overrides), **kwargs)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        await engine.close()


async def test_a_retry_waiting_out_its_backoff_goes_to_the_switched_in_server(
    fake_server, http_engines, image: NormalizedImage
) -> None:
    """Defect: the retry picked its upstream *before* sleeping out the backoff. A swap during that
    sleep (drain saw no request on the old server, which was then stopped) sent the retry to the
    stopped server: the request failed although the new server was up."""
    old = fake_server(model_name="old", script=["chat_internal_error"])
    new = fake_server(model_name="new")
    engine = http_engines(
        old.url, retries=1, retry_backoff_s=0.5, served_model_name="old", rng=lambda: 0.5
    )
    request = asyncio.create_task(engine.generate(image, PROMPT, PARAMS))
    # the first attempt has failed (500) and the request is sleeping before its retry
    await until(lambda: len(chats(old)) == 1 and engine.in_flight_to([old.url]) == 0, what="500")
    engine.switch(Upstream.of([new.url], "new", "v2"))
    assert await engine.drain([old.url], timeout_s=0.1)  # nothing is out to the old server …
    old.stop()  # … so the swap stops it
    generation = await request
    assert generation.model == "v2" and len(chats(new)) == 1


async def test_health_recovers_when_the_breaker_may_probe_again(
    fake_server, http_engines, image: NormalizedImage
) -> None:
    """Defect: health() reported not-ok for as long as the breaker *state* was "open", but the
    state only moves on when a request arrives. Behind a readiness probe on /healthz (the
    Kubernetes manifests) a replica with an open breaker gets no traffic, so its breaker never
    probed, never closed, and the replica stayed unready after the server had recovered."""
    clock = Clock()
    fake = fake_server(script=["chat_internal_error"] * 2)
    engine = http_engines(
        fake.url, retries=0, breaker_failures=2, breaker_reset_s=30, clock=clock,
        served_model_name="m",
    )  # fmt: skip
    for _ in range(2):
        with pytest.raises(EngineError):
            await engine.generate(image, PROMPT, PARAMS)
    assert engine.breaker.state == "open"
    assert not (await engine.health()).ok  # fails fast for breaker_reset_s: not ready
    clock.now += 31  # the server answers again; no user request has come since
    assert (await engine.health()).ok
    assert (await engine.generate(image, PROMPT, PARAMS)).text  # the probe closes the breaker
    assert engine.breaker.state == "closed"


# --------------------------------------------------------------------------- managed mode


def free_port_block(n: int = 6) -> int:
    for _ in range(200):
        base = random.randint(20000, 60000)
        if all(lmdeploy_server.port_is_free("127.0.0.1", p) for p in range(base, base + n)):
            return base
    raise RuntimeError("no free port block")


def model_dir(root: Path, name: str) -> Path:
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"architectures": ["InternVLChatModel"]}))
    return path


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setattr(ServerProcess, "HEALTH_POLL_S", 0.05)
    monkeypatch.setattr(ServerProcess, "RESTART_BACKOFF_S", 0.1)
    monkeypatch.setattr(ServerProcess, "LIVENESS_INTERVAL_S", 0.3)
    monkeypatch.setattr(ServerProcess, "LIVENESS_FAILURES", 2)
    monkeypatch.setattr(ServerProcess, "STOP_GRACE_S", 3.0)
    monkeypatch.setenv("FAKE_LMDEPLOY_STARTUP_S", "0.2")
    monkeypatch.setenv("FAKE_LMDEPLOY_DELAY_S", "0.02")
    return Settings(
        _env_file=None,
        data_dir=tmp_path / "data",
        engine={
            "name": "lmdeploy",
            "manage": True,
            "model": str(model_dir(tmp_path, "model-a")),
            "port": free_port_block(),
            "server_command": FAKE_CMD,
            "retry_backoff_s": 0.05,
            "startup_timeout_s": 30,
            "drain_timeout_s": 20,
            "max_dynamic_patch": 1,
        },
    )


@pytest.fixture
async def managed(settings: Settings):
    engines: list[ManagedLMDeploy] = []
    pids: list[int] = []

    def make(s: Settings = settings) -> ManagedLMDeploy:
        engine = ManagedLMDeploy(s)
        engines.append(engine)
        return engine

    make.pids = pids  # type: ignore[attr-defined]  # processes a test wants gone at the end
    yield make
    for engine in engines:
        await engine.close()
    for pid in pids:  # never leave a fake server behind, whatever the test found
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


async def test_a_server_left_on_a_swap_port_is_ended_on_the_next_start(
    managed, settings: Settings, tmp_path: Path
) -> None:
    """Defect: a bot killed after a swap leaves its server on engine.port + 1 (pid file
    lmdeploy-PORT+1.pid). The next start looked only at engine.port's pid file, so that server
    (GPU memory and all) ran on for good, and later swaps moved to yet another port around it."""
    engine = managed()
    await engine.swap(model_dir(tmp_path, "model-b"), label="v2")
    stale = engine.active
    assert stale is not None and stale.proc is not None
    assert stale.port == settings.engine.port + 1
    pid = stale.proc.pid
    managed.pids.append(pid)
    # the bot is killed: nobody stops or watches that server any more
    assert stale._watch is not None
    stale._watch.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await stale._watch
    stale._watch = None

    again = managed()
    await again.start()
    assert again.label == "v2" and again.active is not None
    assert again.active.port == settings.engine.port
    await until(lambda: not alive(pid), timeout_s=5, what="the stale server to end")
    assert (await again.generate(jpeg_image(320, 240), PROMPT, PARAMS)).model == "v2"


async def _swap_draining(engine: ManagedLMDeploy, tmp_path: Path, monkeypatch) -> tuple:
    """A swap stuck in its drain: one slow request is still out to the old server."""
    monkeypatch.setenv("FAKE_LMDEPLOY_DELAY_S", "4")  # the old server answers slowly …
    await engine.start()
    old = engine.active
    assert old is not None and old.proc is not None
    monkeypatch.setenv("FAKE_LMDEPLOY_DELAY_S", "0.02")  # … the new one quickly
    slow = asyncio.create_task(engine.generate(jpeg_image(320, 240), PROMPT, PARAMS))
    await until(lambda: engine.http.in_flight_to([old.url]) == 1, what="the slow request")
    events: list[str] = []
    swap = asyncio.create_task(
        engine.swap(model_dir(tmp_path, "model-b"), label="v2", progress=events.append)
    )
    await until(lambda: any("draining" in e for e in events), timeout_s=20, what="the drain")
    return old, slow, swap


async def test_closing_the_engine_during_a_swap_drain_stops_the_old_server(
    managed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defect: the draining old server was neither ``active`` nor pending, so close() (the bot
    stopping mid-swap) did not stop it: it outlived the bot as an orphan."""
    engine = managed()
    old, slow, swap = await _swap_draining(engine, tmp_path, monkeypatch)
    pid = old.proc.pid
    managed.pids.append(pid)
    new = engine.active
    assert new is not None and new is not old and new.proc is not None
    managed.pids.append(new.proc.pid)
    await engine.close()
    assert not alive(new.proc.pid)
    assert not alive(pid), "the draining old server outlived close()"
    for task in (swap, slow):
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


async def test_a_cancelled_swap_drain_still_stops_the_old_server(
    managed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defect: cancelling the swap while it drained (asyncio.run cancels what is left at exit, a
    caller's timeout) skipped stopping the old server: two servers ran on, one of them unowned."""
    engine = managed()
    old, slow, swap = await _swap_draining(engine, tmp_path, monkeypatch)
    pid = old.proc.pid
    managed.pids.append(pid)
    swap.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await swap
    assert not alive(pid), "a cancelled swap left the old server running"
    assert engine.active is not None and engine.active.label == "v2"
    assert (await engine.generate(jpeg_image(320, 240), PROMPT, PARAMS)).model == "v2"
    slow.cancel()
    with contextlib.suppress(BaseException):
        await slow


async def test_the_supervisor_outlives_a_restart_that_raises_oserror(
    managed, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defect: the restart loop caught only ServerFailed. A restart that met an OSError (the data
    directory full when the log header is written) ended the supervisor task silently: the server
    stayed down for good, with state "restarting", even once the disk had room again."""
    engine = managed()
    await engine.start()
    server = engine.active
    assert server is not None and server.proc is not None
    disk_full = True
    real_open_log = ServerProcess._open_log

    def open_log(self: ServerProcess, header: str):
        if disk_full:
            raise OSError(28, "No space left on device", str(self.log_path))
        return real_open_log(self, header)

    monkeypatch.setattr(ServerProcess, "_open_log", open_log)
    first = server.proc.pid
    os.kill(first, signal.SIGKILL)
    await until(lambda: server.restarts >= 2, timeout_s=10, what="failed restarts")
    disk_full = False  # room again
    await until(
        lambda: server.state == "healthy" and server.proc is not None and server.proc.pid != first,
        timeout_s=15,
        what="the server to come back",
    )
    assert (await engine.generate(jpeg_image(320, 240), PROMPT, PARAMS)).text


def test_the_one_argument_api_keys_form_is_redacted_too() -> None:
    """``--api-keys=KEY`` (as an operator may write it in extra_args) was shown as is in the
    status page and the server log's header."""
    shown = lmdeploy_server.redact(["lmdeploy", "serve", "api_server", "--api-keys=sk-hidden-1"])
    assert "sk-hidden-1" not in " ".join(shown)
    assert shown[-1] == "--api-keys=**********"
