"""The API key of a managed api_server never appears on a command line (/proc/PID/cmdline, ps).

LMDeploy 0.18 takes its keys only as ``--api-keys KEY`` (``lmdeploy/cli/utils.py``,
``ArgumentHelper.api_keys``). Managed mode hands the key over in the environment
(``LMDEPLOY_LAUNCH_API_KEY``, readable only by the owner) to ``bot/engines/lmdeploy_launch.py``,
which adds ``--api-keys=KEY`` to ``sys.argv`` inside the process and runs LMDeploy's CLI there.

CPU tests: the launcher with a stub ``lmdeploy`` package (real files in a temp dir), and managed
servers (the fake api_server, started through the launcher) whose command lines are read from
/proc. ``test_real_lmdeploy_keeps_the_key_off_every_cmdline`` does the same with LMDeploy itself;
it skips without CUDA or an importable ``lmdeploy`` (docs/lmdeploy.md has the device command).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from enginesupport import FAKES, jpeg_image
from test_lmdeploy_server import FAKE_CMD, PARAMS, PROMPT, alive, free_port_block
from test_lmdeploy_server import managed_settings as lmd_settings

from bot.engines import lmdeploy_launch
from bot.engines.lmdeploy_launch import API_KEY_ENV, LAUNCH_FILE, lmdeploy_args, main
from bot.engines.lmdeploy_server import (
    LMDeployEngineSettings,
    ManagedLMDeploy,
    ServerFailed,
    ServerProcess,
    launcher,
)
from bot.settings import Settings

KEY = "sk-cmdline-0123456789_abc.DEF"


# --------------------------------------------------------------------------- helpers


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def session_pids(sid: int) -> list[int]:
    """Every process in session ``sid`` (a managed server is started in its own session)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat_line = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat_line.rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp sid
        if int(fields[3]) == sid:
            pids.append(int(entry.name))
    return pids


def environ(pid: int) -> list[bytes]:
    return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def assert_key_off_cmdlines(pid: int, key: str) -> list[str]:
    """The key is in no command line of the server's session, nor in any that ``ps`` shows."""
    pids = session_pids(pid)
    assert pid in pids
    lines = [cmdline(p) for p in pids]
    for line in lines:
        assert key not in line and "--api-keys" not in line and "--api_keys" not in line, line
    ps = shutil.which("ps")
    if ps is not None:
        listing = subprocess.run([ps, "-eo", "pid,args"], capture_output=True, text=True).stdout
        assert key not in listing
    # what any local user can read (cmdline, 0444) vs what only the owner can (environ, 0400)
    assert stat.S_IMODE(os.stat(f"/proc/{pid}/cmdline").st_mode) == 0o444
    assert stat.S_IMODE(os.stat(f"/proc/{pid}/environ").st_mode) == 0o400
    return lines


@pytest.fixture
def stub_lmdeploy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A real ``lmdeploy`` package in a temp dir on sys.path: its ``__main__`` parses
    ``--api-keys`` as LMDeploy 0.18 declares it (``type=str, nargs='*'``), records what it got."""
    root = tmp_path / "stub-argv"
    write(root / "lmdeploy" / "__init__.py", "RECORDED = []\n")
    write(
        root / "lmdeploy" / "__main__.py",
        """\
        import argparse, os, sys
        import lmdeploy

        parser = argparse.ArgumentParser(prog="lmdeploy")
        parser.add_argument("command")
        parser.add_argument("subcommand")
        parser.add_argument("--api-keys", type=str, nargs="*", default=None)
        args, rest = parser.parse_known_args()
        main = sys.modules["__main__"]
        lmdeploy.RECORDED.append({
            "argv": list(sys.argv),
            "api_keys": args.api_keys,
            "rest": rest,
            "env": os.environ.get("LMDEPLOY_LAUNCH_API_KEY"),
            "main": getattr(getattr(main, "__spec__", None), "name", None),
        })
        """,
    )
    before = set(sys.modules)
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setattr(sys, "argv", ["pytest-argv"])
    yield root
    for name in set(sys.modules) - before:
        if name == "lmdeploy" or name.startswith("lmdeploy."):
            del sys.modules[name]


def recorded() -> list[dict[str, Any]]:
    return importlib.import_module("lmdeploy").RECORDED  # the stub, on sys.path (fixture)


# --------------------------------------------------------------------------- the launcher


def test_the_launcher_imports_without_lmdeploy() -> None:
    code = (
        "import sys, importlib.util; import bot.engines.lmdeploy_launch as m; "
        "assert 'lmdeploy' not in sys.modules; print(importlib.util.find_spec('lmdeploy'))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "lmdeploy" not in vars(lmdeploy_launch)  # no module-level import of it either


@pytest.mark.parametrize("key", [KEY, "-starts-with-a-dash", "has space"])
def test_the_launcher_hands_the_key_to_lmdeploy_in_process(
    stub_lmdeploy: Path, monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    monkeypatch.setenv(API_KEY_ENV, key)
    args = ["serve", "api_server", "/models/m", "--server-port", "23333", "--tp", "1"]
    assert main(args) == 0
    (got,) = recorded()
    assert got["argv"][1:] == [*args, f"--api-keys={key}"]
    assert str(got["argv"][0]).endswith(os.path.join("lmdeploy", "__main__.py"))
    assert got["api_keys"] == [key]  # one key, exactly, even with a leading dash
    assert got["rest"] == ["/models/m", "--server-port", "23333", "--tp", "1"]
    assert got["env"] is None and API_KEY_ENV not in os.environ  # LMDeploy's children lack it
    # run as `python -m lmdeploy`: multiprocessing's spawn re-imports lmdeploy's __main__
    assert got["main"] == "lmdeploy.__main__"
    assert sys.argv == ["pytest-argv"]  # restored


def test_the_launcher_refuses_the_key_twice(
    stub_lmdeploy: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(API_KEY_ENV, KEY)
    assert main(["serve", "api_server", "m", "--api-keys", "other"]) == 2
    err = capsys.readouterr().err
    assert "extra_args" in err and KEY not in err and "other" not in err
    assert recorded() == []  # LMDeploy never ran


def test_the_launcher_without_a_key_passes_arguments_as_they_are(
    stub_lmdeploy: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert main(["serve", "proxy", "--server-port", "8000"]) == 0
    assert recorded()[0]["argv"][1:] == ["serve", "proxy", "--server-port", "8000"]
    assert capsys.readouterr().err == ""
    assert main(["serve", "api_server", "m", "--api-keys=visible"]) == 0  # an operator's own
    assert recorded()[1]["api_keys"] == ["visible"]
    assert "visible to every local user" in capsys.readouterr().err


def test_lmdeploy_arguments() -> None:
    base = ["serve", "api_server", "m"]
    assert lmdeploy_args(base, None) == base and lmdeploy_args(base, "") == base
    assert lmdeploy_args(base, "k") == [*base, "--api-keys=k"]
    assert lmdeploy_args(["serve", "proxy"], "k") == ["serve", "proxy", "--api-keys=k"]
    assert lmdeploy_args(["check_env"], "k") == ["check_env"]  # nothing that takes a key
    for twice in ("--api-keys", "--api-keys=x", "--api_keys", "--api-key", "--api"):
        with pytest.raises(lmdeploy_launch.LaunchError):
            lmdeploy_args([*base, twice, "x"], "k")
    assert lmdeploy_args([*base, "--apix"], "k")[-1] == "--api-keys=k"  # not an abbreviation


def test_the_launcher_runs_as_a_script_with_the_standard_library_only(tmp_path: Path) -> None:
    """As ``server_command`` uses it under another Python (LMDeploy's own virtualenv)."""
    out = tmp_path / "seen.txt"
    script = write(
        tmp_path / "cli.py",
        f"""\
        import sys
        bot = sorted(m for m in sys.modules if m.split(".")[0] in ("bot", "pydantic", "httpx"))
        open({str(out)!r}, "w").write(repr((sys.argv[1:], bot, sys.path[0])))
        """,
    )
    env = {**os.environ, API_KEY_ENV: KEY}
    result = subprocess.run(
        [sys.executable, "-I", str(LAUNCH_FILE), "--script", str(script), "serve", "api_server",
         "m"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    argv, imported, path0 = eval(out.read_text())
    assert argv == ["serve", "api_server", "m", f"--api-keys={KEY}"]
    assert imported == [] and path0 == str(tmp_path)


def test_server_command_that_runs_python_goes_through_the_launcher() -> None:
    def cmd(server_command: list[str]) -> list[str]:
        return launcher(LMDeployEngineSettings(server_command=server_command))

    launch = str(LAUNCH_FILE)
    assert cmd([]) == [sys.executable, launch]
    assert cmd(["/opt/lmd/bin/python3.12", "-m", "lmdeploy"]) == [
        "/opt/lmd/bin/python3.12", launch, "--module", "lmdeploy"
    ]  # fmt: skip
    assert cmd([sys.executable, "fake.py", "-v"]) == [
        sys.executable, launch, "--script", "fake.py", "-v"
    ]  # fmt: skip
    for other in (["/opt/lmd/bin/lmdeploy"], ["docker", "run", "img", "lmdeploy"]):
        assert cmd(other) == other  # runs as given; gets the key in the environment only


# --------------------------------------------------------------------------- managed servers


@pytest.fixture(autouse=True)
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ServerProcess, "HEALTH_POLL_S", 0.05)
    monkeypatch.setattr(ServerProcess, "STOP_GRACE_S", 3.0)
    monkeypatch.setenv("FAKE_LMDEPLOY_STARTUP_S", "0.1")
    monkeypatch.setenv("FAKE_LMDEPLOY_DELAY_S", "0.01")
    monkeypatch.setenv(API_KEY_ENV, "sk-of-the-bot-environment")  # must not reach a server


def fake_as_lmdeploy(root: Path) -> Path:
    """A stub ``lmdeploy`` package whose CLI is the fake api_server (tests/fakes)."""
    write(root / "lmdeploy" / "__init__.py", "__version__ = '0.0-fake'\n")
    write(
        root / "lmdeploy" / "__main__.py",
        f"""\
        import sys
        sys.path.insert(0, {str(FAKES)!r})
        import fake_lmdeploy
        sys.exit(fake_lmdeploy.main(sys.argv[1:]))
        """,
    )
    return root


def managed_settings(tmp_path: Path, server_command: list[str], **engine: object) -> Settings:
    return lmd_settings(tmp_path, server_command=server_command, **({"api_key": KEY} | engine))


@pytest.mark.parametrize("way", ["launcher", "python-script", "python-module"])
async def test_managed_server_keeps_the_key_off_its_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, way: str
) -> None:
    def prepend_pythonpath(path: Path) -> None:  # first: ahead of a real lmdeploy (device)
        rest = os.environ.get("PYTHONPATH")
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(path), *([rest] if rest else [])]))

    if way == "launcher":  # the default: this Python, the launcher, `lmdeploy` (here the stub)
        prepend_pythonpath(fake_as_lmdeploy(tmp_path / "stub"))
        server_command: list[str] = []
    elif way == "python-script":
        server_command = FAKE_CMD
    else:
        prepend_pythonpath(FAKES)
        server_command = [sys.executable, "-m", "fake_lmdeploy"]
    engine = ManagedLMDeploy(managed_settings(tmp_path, server_command))
    try:
        await engine.start()
        server = engine.active
        assert server is not None and server.proc is not None
        (line, *_) = assert_key_off_cmdlines(server.proc.pid, KEY)
        assert str(LAUNCH_FILE) in line and "serve api_server" in line
        log_head = server.log_path.read_text().split("fake lmdeploy:")[0]
        assert KEY not in log_head and f"{API_KEY_ENV}=**********" in log_head
        # the server still requires the key: refused without it or with another, served with it
        async with httpx.AsyncClient(base_url=server.url, trust_env=False) as http:
            assert (await http.get("/v1/models")).status_code == 401
            wrong = {"Authorization": "Bearer sk-of-the-bot-environment"}
            assert (await http.get("/v1/models", headers=wrong)).status_code == 401
            body = {"model": server.served_name, "messages": [{"role": "user", "content": "hi"}]}
            assert (await http.post("/v1/chat/completions", json=body)).status_code == 401
            good = {"Authorization": f"Bearer {KEY}"}
            assert (await http.get("/v1/models", headers=good)).status_code == 200
        gen = await engine.generate(jpeg_image(320, 240), PROMPT, PARAMS)
        assert gen.text.startswith("[model-a]")
    finally:
        await engine.close()


async def test_a_server_command_that_ignores_the_key_is_stopped_not_served(
    tmp_path: Path,
) -> None:
    """A non-Python ``server_command`` gets the key only in its environment; one that does not
    hand it to LMDeploy would serve anyone, so managed mode refuses it."""
    wrapper = write(
        tmp_path / "run-lmdeploy.sh",
        f'#!/bin/sh\nexec {sys.executable} {FAKES / "fake_lmdeploy.py"} "$@"\n',
    )
    wrapper.chmod(0o755)
    engine = ManagedLMDeploy(managed_settings(tmp_path, [str(wrapper)]))
    try:
        with pytest.raises(ServerFailed, match=API_KEY_ENV) as info:
            await engine.start()
        assert "without the API key (HTTP 200)" in info.value.detail
        assert engine.active is None
        pids = [int(p.read_text()) for p in (tmp_path / "data" / "logs").glob("*.pid")]
        assert not any(alive(pid) for pid in pids)  # stopped (its pid file is gone too)
    finally:
        await engine.close()


async def test_without_a_key_nothing_is_handed_over(tmp_path: Path) -> None:
    settings = managed_settings(tmp_path, FAKE_CMD, api_key=None)
    engine = ManagedLMDeploy(settings)
    try:
        await engine.start()
        server = engine.active
        assert server is not None and server.proc is not None
        assert not any(v.startswith(API_KEY_ENV.encode() + b"=") for v in environ(server.proc.pid))
        async with httpx.AsyncClient(base_url=server.url, trust_env=False) as http:
            assert (await http.get("/v1/models")).status_code == 200
    finally:
        await engine.close()


# --------------------------------------------------------------------------- LMDeploy itself


def why_no_real_lmdeploy() -> str | None:
    if importlib.util.find_spec("lmdeploy") is None:
        return "lmdeploy is not importable"
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    return None if torch.cuda.is_available() else "no CUDA device"


@pytest.mark.gpu
@pytest.mark.skipif(why_no_real_lmdeploy() is not None, reason=str(why_no_real_lmdeploy()))
async def test_real_lmdeploy_keeps_the_key_off_every_cmdline(tmp_path: Path) -> None:
    """LMDeploy's api_server (PyTorch engine, its spawned workers) through the launcher."""
    given = os.environ.get("OOGIRI_GPU_MODEL")
    if given:
        model = Path(given)
    else:
        from bot.engines.internvl.tinymodel import make_tiny_model

        model = make_tiny_model(tmp_path / "tiny", layout="internvl2", seed=0)
    settings = Settings(
        _env_file=None,
        data_dir=tmp_path / "data",
        engine={
            "name": "lmdeploy",
            "manage": True,
            "model": str(model),
            "model_version": "tiny",
            "backend": os.environ.get("OOGIRI_GPU_BACKEND", "pytorch"),
            "port": free_port_block(),
            "api_key": KEY,
            "cache_max_entry_count": 0.05,
            "max_batch_size": 16,
            "startup_timeout_s": float(os.environ.get("STARTUP_S", "420")),
            "timeout_s": 120,
            "max_dynamic_patch": 1,
        },
    )
    engine = ManagedLMDeploy(settings)
    try:
        await engine.start()
        server = engine.active
        assert server is not None and server.proc is not None
        pid = server.proc.pid
        lines = assert_key_off_cmdlines(pid, KEY)
        print("\n".join(f"cmdline: {line[:300]}" for line in lines))
        # not a cmdline matter (environ is the owner's only), reported for the record: workers
        # that LMDeploy spawns after the launcher took the key out of os.environ lack it
        entry = f"{API_KEY_ENV}={KEY}".encode()
        holders = [p for p in session_pids(pid) if entry in environ(p)]
        print(f"processes with the key in their environ: {holders} (launcher: {pid})")
        body = {
            "model": server.served_name,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
        }
        async with httpx.AsyncClient(base_url=server.url, trust_env=False, timeout=120) as http:
            no_key = await http.post("/v1/chat/completions", json=body)
            assert no_key.status_code == 401, no_key.text[:300]
            assert (await http.get("/v1/models")).status_code == 401
            good = {"Authorization": f"Bearer {KEY}"}
            assert (await http.get("/v1/models", headers=good)).status_code == 200
            ok = await http.post("/v1/chat/completions", json=body, headers=good)
            assert ok.status_code == 200 and ok.json()["choices"], ok.text[:300]
        print(f"real lmdeploy: 401 without the key, 200 with it; {len(lines)} processes checked")
    finally:
        await engine.close()
