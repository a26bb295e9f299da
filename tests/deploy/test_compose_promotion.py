"""Compose: the api_server container's own command serves /models/active under its version's
name and starts again on the new folder when a promotion repoints the link; ``python -m
training.rollout`` (the train job's promote command) returns once the new version answers.

The command is taken from deploy/compose.yaml itself, interpolated as compose would, and run
with the launcher it bind-mounts (bot/engines/lmdeploy_launch.py) and an ``lmdeploy`` package on
PYTHONPATH that runs the fake server (tests/fakes/fake_lmdeploy.py) over loopback; the key goes in
as the container gets it, in LMDEPLOY_LAUNCH_API_KEY."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from training import rollout
from training.rollout import repoint

ROOT = Path(__file__).resolve().parents[2]
FAKE = ROOT / "tests" / "fakes" / "fake_lmdeploy.py"
LAUNCHER = ROOT / "bot" / "engines" / "lmdeploy_launch.py"


def compose_interpolate(text: str) -> str:
    """``${VAR:-default}`` → default (no such variables here), ``$$`` → ``$``."""
    text = re.sub(r"(?<!\$)\$\{(\w+):-([^}]*)\}", lambda m: m.group(2), text)
    return text.replace("$$", "$")


def server_script() -> str:
    doc = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text(encoding="utf-8"))
    command = doc["x-lmdeploy"]["command"]
    assert command[:2] == ["sh", "-c"]
    script = compose_interpolate(command[-1])
    # the launcher's bind mount: this checkout's file
    (mount,) = [v for v in doc["x-lmdeploy"]["volumes"] if str(v["source"]).endswith("launch.py")]
    assert (ROOT / "deploy" / mount["source"]).resolve() == LAUNCHER
    assert mount["target"] in script
    return script.replace(mount["target"], str(LAUNCHER))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def model(root: Path, version: str | None) -> Path:
    folder = root / (version or "plain")
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    if version:
        (folder / "oogiri-model.json").write_text(json.dumps({"version": version}))
    return folder


def names(url: str) -> list[str] | None:
    try:
        r = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k"}, timeout=2)
        return [m["id"] for m in r.json()["data"]]
    except (httpx.HTTPError, ValueError, KeyError):
        return None


def wait_for(url: str, want: list[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while names(url) != want:
        assert time.monotonic() < deadline, (want, names(url))
        time.sleep(0.1)


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    # the image's python3 (LMDeploy's venv): runs the launcher and reads oogiri-model.json
    py = tmp_path / "bin" / "python3"
    py.parent.mkdir()
    py.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    py.chmod(0o755)
    return py.parent


@pytest.fixture
def fake_lmdeploy_package(tmp_path: Path) -> Path:
    """``lmdeploy`` for the launcher's ``python -m lmdeploy``: the fake api_server."""
    package = tmp_path / "pkg" / "lmdeploy"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(
        f"import runpy\nrunpy.run_path({str(FAKE)!r}, run_name='__main__')\n"
    )
    return package.parent


def test_the_server_follows_the_link_and_the_promotion_waits_for_it(
    tmp_path: Path, bin_dir: Path, fake_lmdeploy_package: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OOGIRI_ENGINE__API_KEY", "k")  # what the train container has
    port = free_port()
    template = ROOT / "bot" / "engines" / "templates" / "internvl2_internlm2.json"
    script = (
        server_script()
        .replace("--server-port 23333", f"--server-port {port}")
        .replace("/etc/oogiri/chat-template.json", str(template))
    )
    link = tmp_path / "active"
    repoint(link, model(tmp_path, None))  # a base model without a version marker: "base"
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "LMDEPLOY_MODEL_LINK": str(link),
        "LMDEPLOY_HOST": "127.0.0.1",
        "LMDEPLOY_LAUNCH_API_KEY": "k",  # the server answers /v1/models only with it
        "PYTHONPATH": str(fake_lmdeploy_package),
        "LMDEPLOY_WATCH_S": "0.1",
        "FAKE_LMDEPLOY_STARTUP_S": "0.1",
        "OOGIRI_ENGINE__API_KEY": "k",
    }
    proc = subprocess.Popen(["sh", "-c", script], env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(url, ["base"])
        v2 = model(tmp_path, "ft-v2")
        # the train job's promote command: repoint, then wait until the server serves ft-v2
        rc = rollout.main([str(v2), "ft-v2", "--link", str(link), "--url", url,
                           "--poll", "0.1", "--timeout", "60"])  # fmt: skip
        assert rc == 0 and names(url) == ["ft-v2"]
        assert link.resolve() == v2.resolve()
        # the A/B arm's stop command removes the link: the server stops (its GPU memory freed)
        rollout.main(["--stop", "--link", str(link)])
        wait_for(url, None)  # type: ignore[arg-type]
        assert proc.poll() is None  # the container keeps waiting for a link
        repoint(link, v2)
        wait_for(url, ["ft-v2"])
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    assert names(url) is None  # SIGTERM (docker stop) ends the server too
