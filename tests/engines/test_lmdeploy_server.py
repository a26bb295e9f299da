"""Managed mode with a fake ``lmdeploy`` executable: start, health, restart, blue/green swap."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import stat
import sys
from pathlib import Path

import pytest
from enginesupport import FAKES, jpeg_image

from bot.engines import lmdeploy_plugin, lmdeploy_server
from bot.engines.lmdeploy_launch import API_KEY_ENV, LAUNCH_FILE
from bot.engines.lmdeploy_server import (
    TEMPLATE,
    ControlServer,
    ControlUnavailable,
    ManagedLMDeploy,
    ServerFailed,
    ServerProcess,
    SwapError,
    build_command,
    build_env,
    control_request,
    redact,
    server_env,
    socket_path,
)
from bot.engines.lmdeploy_server import LMDeployEngineSettings as EngineSettings
from bot.models import GenerationParams
from bot.settings import Settings

FAKE_CMD = [sys.executable, str(FAKES / "fake_lmdeploy.py")]
PARAMS = GenerationParams(max_new_tokens=16, max_dynamic_patch=1)
PROMPT = "请你根据这张图片，讲一个脑洞大开的梗"
ROOT = Path(__file__).resolve().parents[2]


def free_port_block(n: int = 6) -> int:
    for _ in range(200):
        base = random.randint(20000, 60000)
        if all(lmdeploy_server.port_is_free("127.0.0.1", p) for p in range(base, base + n)):
            return base
    raise RuntimeError("no free port block")


def model_dir(root: Path, name: str, broken: bool = False) -> Path:
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"architectures": ["InternVLChatModel"]}))
    if broken:
        (path / "FAKE_BROKEN").write_text("")
    return path


@pytest.fixture(autouse=True)
def fast_supervision(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ServerProcess, "HEALTH_POLL_S", 0.05)
    monkeypatch.setattr(ServerProcess, "RESTART_BACKOFF_S", 0.1)
    monkeypatch.setattr(ServerProcess, "LIVENESS_INTERVAL_S", 0.3)
    monkeypatch.setattr(ServerProcess, "LIVENESS_FAILURES", 2)
    monkeypatch.setattr(ServerProcess, "STOP_GRACE_S", 3.0)
    monkeypatch.setenv("FAKE_LMDEPLOY_STARTUP_S", "0.3")
    monkeypatch.setenv("FAKE_LMDEPLOY_DELAY_S", "0.02")


def managed_settings(tmp_path: Path, **engine: object) -> Settings:
    """Managed mode on the fake api_server (``FAKE_CMD``), quick to start and to retry."""
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
            **engine,
        },
    )


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return managed_settings(tmp_path, api_key="sk-managed")


@pytest.fixture
async def managed(settings: Settings):
    engines: list[ManagedLMDeploy] = []

    def make(s: Settings = settings) -> ManagedLMDeploy:
        engine = ManagedLMDeploy(s)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.close()


async def run_load(engine, stop: asyncio.Event, workers: int = 16):
    image = jpeg_image(320, 240)
    answers: list[tuple[float, str]] = []
    failures: list[BaseException] = []

    async def worker() -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            try:
                gen = await engine.generate(image, PROMPT, PARAMS)
            except Exception as exc:
                failures.append(exc)
                await asyncio.sleep(0.01)  # an engine that fails instantly must not starve the loop
            else:
                answers.append((loop.time(), gen.model))

    await asyncio.gather(*(worker() for _ in range(workers)))
    return answers, failures


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()


# --------------------------------------------------------------------------- command line


def test_command_line_has_every_setting(tmp_path: Path) -> None:
    e = EngineSettings(
        backend="turbomind",
        tp=2,
        session_len=4096,
        cache_max_entry_count=0.25,
        max_batch_size=128,
        max_prefill_token_num=4096,
        api_key="sk-secret",
        server_threads=3,
        extra_args=["--log-level", "INFO"],
    )
    cmd = build_command(e, tmp_path / "m", 24000, "oogiri-v2")
    # LMDeploy through the launcher, which takes the key from the environment (never argv)
    assert cmd[:4] == [sys.executable, str(LAUNCH_FILE), "serve", "api_server"]
    assert cmd[4] == str(tmp_path / "m")

    def flag(name: str) -> str:
        return cmd[cmd.index(name) + 1]

    assert flag("--backend") == "turbomind" and flag("--tp") == "2"
    assert flag("--session-len") == "4096" and flag("--cache-max-entry-count") == "0.25"
    assert flag("--max-batch-size") == "128" and flag("--server-port") == "24000"
    assert flag("--max-prefill-token-num") == "4096"
    assert flag("--server-name") == "127.0.0.1" and flag("--model-name") == "oogiri-v2"
    assert flag("--chat-template") == str(TEMPLATE) and TEMPLATE.is_file()
    assert "--trust-remote-code" in cmd
    assert "sk-secret" not in " ".join(cmd) and not any("--api-keys" in a for a in cmd)
    assert cmd[-2:] == ["--log-level", "INFO"]
    assert "--distributed-executor-backend" not in cmd  # turbomind needs no ray/mp choice
    shown = redact([*cmd, "--api-keys", "sk-in-extra-args"])  # e.g. an operator's extra_args
    assert "sk-in-extra-args" not in shown and shown[-1] == "**********"
    env = build_env(e, base={"PATH": "/bin"})
    assert env["OMP_NUM_THREADS"] == "3" and env["MKL_NUM_THREADS"] == "3"
    assert env["PATH"] == "/bin" and API_KEY_ENV not in env  # build_env is printable
    assert server_env(e, env)[API_KEY_ENV] == "sk-secret"

    pt = EngineSettings(tp=2, chat_template=tmp_path / "t.json", trust_remote_code=False)
    cmd = build_command(pt, "m", 1, "x")
    assert cmd[cmd.index("--distributed-executor-backend") + 1] == "mp"
    assert cmd[cmd.index("--chat-template") + 1] == str(tmp_path / "t.json")
    assert "--trust-remote-code" not in cmd and "--api-keys" not in cmd
    assert cmd[cmd.index("--backend") + 1] == "pytorch"  # the default: TurboMind needs CUDA 12
    assert cmd[cmd.index("--max-prefill-token-num") + 1] == "16384"  # measured default
    lmdeploy_default = build_command(EngineSettings(max_prefill_token_num=None), "m", 1, "x")
    assert "--max-prefill-token-num" not in lmdeploy_default


def test_managed_mode_needs_a_model(tmp_path: Path) -> None:
    s = Settings(_env_file=None, data_dir=tmp_path, engine={"manage": True})
    with pytest.raises(Exception, match=r"engine\.model"):
        ManagedLMDeploy(s)


# --------------------------------------------------------------------------- start / stop


async def test_start_serve_and_stop(managed, settings: Settings) -> None:
    engine = managed()
    await engine.start()
    server = engine.active
    assert server is not None and server.state == "healthy" and alive(server.proc.pid)
    gen = await engine.generate(jpeg_image(640, 480), PROMPT, PARAMS)
    assert gen.text.startswith("[model-a]") and gen.model == "model-a"
    log_text = server.log_path.read_text()
    assert server.log_path.parent == settings.data_dir / "logs"
    assert "oogiri starts model-a" in log_text and "**********" in log_text
    assert "sk-managed" not in log_text.split("fake lmdeploy: argv")[0]  # header redacts the key
    assert "OMP_NUM_THREADS=2 MKL_NUM_THREADS=2" in log_text
    assert "chat template oogiri-internvl2-internlm2-xtuner" in log_text
    health = await engine.health()
    assert health.ok and health.extra["active"]["label"] == "model-a"
    pid = server.proc.pid
    await engine.close()
    assert not alive(pid) and not server.pid_path.exists()


async def test_waits_for_health(managed, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_LMDEPLOY_STARTUP_S", "1.0")
    engine = managed()
    loop = asyncio.get_running_loop()
    began = loop.time()
    gen = await engine.generate(jpeg_image(300, 300), PROMPT, PARAMS)  # starts on first use
    assert loop.time() - began >= 1.0 and gen.text


async def test_start_failure_shows_the_log(managed, settings: Settings, tmp_path: Path) -> None:
    s = settings.model_copy(
        update={
            "engine": settings.engine.model_copy(
                update={"model": model_dir(tmp_path, "broken", broken=True)}
            )
        }
    )
    with pytest.raises(ServerFailed, match="exited with status 3") as info:
        await managed(s).start()
    assert "model is broken" in info.value.detail


async def test_port_in_use_is_refused(managed, settings: Settings) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", settings.engine.port))
        sock.listen()
        with pytest.raises(ServerFailed, match="already in use"):
            await managed().start()


async def test_restart_after_crash(managed) -> None:
    engine = managed()
    await engine.start()
    server = engine.active
    first = server.proc.pid
    os.kill(first, signal.SIGKILL)
    for _ in range(200):
        await asyncio.sleep(0.05)
        if server.restarts == 1 and server.state == "healthy":
            break
    assert server.restarts == 1 and server.state == "healthy"
    assert server.proc.pid != first and alive(server.proc.pid)
    assert (await engine.generate(jpeg_image(300, 300), PROMPT, PARAMS)).text
    assert server.log_path.read_text().count("oogiri starts model-a") == 2


async def test_restart_when_health_stops_answering(managed) -> None:
    engine = managed()
    await engine.start()
    server = engine.active
    first = server.proc.pid
    os.kill(first, signal.SIGSTOP)  # hung: alive but silent
    try:
        for _ in range(300):
            await asyncio.sleep(0.05)
            if server.restarts == 1 and server.state == "healthy":
                break
    finally:
        if alive(first):
            os.kill(first, signal.SIGKILL)
    assert server.restarts == 1 and server.proc.pid != first
    assert (await engine.generate(jpeg_image(300, 300), PROMPT, PARAMS)).text


# --------------------------------------------------------------------------- blue/green swap


async def test_swap_under_continuous_load_fails_no_request(
    managed, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_LMDEPLOY_DELAY_S", "0.1")  # requests are in flight during the switch
    engine = managed()
    await engine.start()
    old = engine.active
    stop = asyncio.Event()
    load = asyncio.create_task(run_load(engine, stop, workers=24))
    await asyncio.sleep(0.5)
    events: list[str] = []
    result = await engine.swap(model_dir(tmp_path, "model-b"), label="v2", progress=events.append)
    switched_at = asyncio.get_running_loop().time()
    await asyncio.sleep(0.5)
    stop.set()
    answers, failures = await load
    assert failures == [], failures[:3]
    assert result["ok"] and result["drained"]
    assert result["from"] == "model-a" and result["to"] == "v2"
    labels = [m for _, m in answers]
    assert "model-a" in labels and "v2" in labels and len(answers) > 100
    assert all(m == "v2" for t, m in answers if t > switched_at + 0.2)
    assert old.state == "stopped" and not alive(old.proc.pid)
    assert engine.active.port == settings.engine.port + 1 and engine.active.state == "healthy"
    assert any("draining" in e for e in events) and any("stopped model-a" in e for e in events)
    state = json.loads((settings.data_dir / "engine-state.json").read_text())
    assert state["label"] == "v2" and state["model"].endswith("model-b")
    # swapping back reuses the first port
    await engine.swap(settings.engine.model)
    assert engine.active.port == settings.engine.port


async def test_a_restarted_bot_serves_the_swapped_model(
    managed, settings: Settings, tmp_path: Path
) -> None:
    engine = managed()
    await engine.swap(model_dir(tmp_path, "model-b"), label="v2")
    await engine.close()
    again = managed()
    assert again.label == "v2" and again.model_dir.name == "model-b"
    changed = settings.model_copy(
        update={
            "engine": settings.engine.model_copy(update={"model": model_dir(tmp_path, "model-c")})
        }
    )
    assert managed(changed).label == "model-c"  # a new engine.model in settings wins


async def test_failed_swap_keeps_the_old_model_serving(
    managed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = managed()
    await engine.start()
    stop = asyncio.Event()
    load = asyncio.create_task(run_load(engine, stop, workers=8))
    with pytest.raises(SwapError, match="still serving model-a"):
        await engine.swap(model_dir(tmp_path, "bad", broken=True))
    stop.set()
    answers, failures = await load
    assert failures == [] and answers and {m for _, m in answers} == {"model-a"}
    assert engine.active.label == "model-a" and engine.history[-1]["ok"] is False
    assert engine.status()["starting"] == []


async def test_swap_refusals(managed, tmp_path: Path) -> None:
    engine = managed()
    with pytest.raises(SwapError, match=r"no config\.json"):
        await engine.swap(tmp_path)
    await engine.start()
    first = asyncio.create_task(engine.swap(model_dir(tmp_path, "model-b")))
    await asyncio.sleep(0.05)
    with pytest.raises(SwapError, match="already in progress"):
        await engine.swap(model_dir(tmp_path, "model-c"))
    assert (await first)["ok"]


# --------------------------------------------------------------------------- another process


async def test_swap_and_status_from_a_separate_process(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bot.app import App

    engine = ManagedLMDeploy(settings)
    app = await App.create(settings, engine=engine, plugins=[lmdeploy_plugin])
    stack = contextlib.ExitStack()
    try:
        # the startup hook started the server and the control socket
        assert engine.active is not None and engine.active.state == "healthy"
        sock = socket_path(settings)
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        stop = asyncio.Event()
        load = asyncio.create_task(run_load(engine, stop, workers=12))
        stack.callback(stop.set)
        env = {
            **os.environ,
            "OOGIRI_DATA_DIR": str(settings.data_dir),
            "PYTHONPATH": str(ROOT),
        }
        script = (
            "import sys; from bot.cli import cli; from bot.engines import lmdeploy_plugin as m; "
            "m.oogiri_register_commands(cli); cli(sys.argv[1:], prog_name='oogiri')"
        )

        async def oogiri(*args: str) -> tuple[int, str, str]:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", script, *args, cwd=tmp_path, env=env,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await proc.communicate()
            return proc.returncode, out.decode(), err.decode()

        code, out, err = await oogiri("engine", "status")
        assert code == 0, err
        status = json.loads(out)
        assert status["active"]["label"] == "model-a" and status["health"]["ok"]
        code, out, err = await oogiri("engine", "swap", str(model_dir(tmp_path, "model-b")))
        assert code == 0, err
        assert json.loads(out)["to"] == "model-b" and "draining" in err
        code, out, err = await oogiri("engine", "swap", str(tmp_path / "nope"))
        assert code == 1 and "no config.json" in err
        stop.set()
        answers, failures = await load
        assert failures == [] and {m for _, m in answers} == {"model-a", "model-b"}
        code, out, err = await oogiri("engine", "status")
        assert json.loads(out)["active"]["label"] == "model-b"
    finally:
        stack.close()
        await app.close()
    assert not socket_path(settings).exists()
    code, out, err = await oogiri("engine", "status")
    assert code == 3 and "no running `oogiri serve`" in err and "model-b" in err


async def test_control_socket_protocol(settings: Settings, tmp_path: Path) -> None:
    from bot.engines.instant import InstantEngine

    class FakeApp:
        engine = InstantEngine()

    path = tmp_path / "c.sock"
    control = ControlServer(FakeApp(), path)
    assert await control.start()
    second = ControlServer(FakeApp(), path)
    assert not await second.start()  # a live socket is never stolen
    try:
        status = await asyncio.to_thread(control_request, path, {"op": "status"})
        assert status["ok"] and status["result"]["engine"] == "instant"
        swap = await asyncio.to_thread(control_request, path, {"op": "swap", "model": "/x"})
        assert not swap["ok"] and "not a managed server" in swap["error"]
        bad = await asyncio.to_thread(control_request, path, {"op": "dance"})
        assert not bad["ok"] and "unknown op" in bad["error"]
    finally:
        await control.close()
    with pytest.raises(ControlUnavailable):
        control_request(path, {"op": "status"})


def test_engine_command_prints_the_command_line(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import typer
    from typer.testing import CliRunner

    cli = typer.Typer()
    lmdeploy_plugin.oogiri_register_commands(cli)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OOGIRI_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("OOGIRI_ENGINE__API_KEY", "sk-hidden")
    monkeypatch.setenv("OOGIRI_ENGINE__SERVER_THREADS", "4")
    result = CliRunner().invoke(cli, ["engine", "command", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert "OMP_NUM_THREADS=4" in result.output and "serve api_server" in result.output
    assert "sk-hidden" not in result.output and "--chat-template" in result.output
