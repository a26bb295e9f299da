"""No LMDeploy process that the deploy files start has its API key on a command line.

LMDeploy 0.18 takes the key only as ``--api-keys KEY`` (docs/lmdeploy.md), and every local user can
read a command line (``ps``, ``/proc/PID/cmdline``; container processes too, from the host). So
every api_server and proxy in deploy/ (the systemd units, the compose services, the Kubernetes
containers) runs bot/engines/lmdeploy_launch.py with the key in LMDEPLOY_LAUNCH_API_KEY, taken
from the secret used before (LMDEPLOY_API_KEY in /etc/oogiri/lmdeploy.env, in deploy/.env, in the
Secret oogiri-secrets). The launcher adds ``--api-keys=KEY`` to ``sys.argv`` inside its own process.

Each of them is checked twice:

* statically: no ``--api-keys`` in its command, and nothing that expands the key into an argv
  (systemd's ``${VAR}``, a shell's ``"$VAR"`` as an argument, Kubernetes' ``$(VAR)``). The launcher
  is what runs, LMDEPLOY_LAUNCH_API_KEY comes from the secret, and the launcher file reaches the
  environment: the /opt/oogiri install, a bind mount of this checkout's file, or an init container
  that copies it out of the bot image;
* for real: the command runs as systemd, compose or the kubelet would run it (their variable
  expansion is emulated, and /bin/sh runs the shell fragment). A stand-in ``lmdeploy`` package on
  PYTHONPATH records its argv, the ``--api-keys`` it parsed, its environment, the command line of
  every process in its session, and ``ps``. The key must reach the parsed arguments and appear on
  no command line. Every other flag must be what it was before the launcher.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from test_deploy_files import (  # noqa: F401  (compose, kubectl: fixtures used below)
    COMPOSE_ENV_EXAMPLE,
    K8S,
    ROOT,
    SYSTEMD,
    by_kind,
    compose,
    env_file_values,
    kubectl,
    kustomize,
    run_compose,
    unit_settings,
)

LAUNCHER = ROOT / "bot" / "engines" / "lmdeploy_launch.py"
SECRET_VAR = "LMDEPLOY_API_KEY"  # the name in lmdeploy.env, deploy/.env and oogiri-secrets
LAUNCH_VAR = "LMDEPLOY_LAUNCH_API_KEY"  # what the launcher reads (bot/engines/lmdeploy_launch.py)
API_KEYS_FLAG = re.compile(r"--api[-_]keys?\b")
# Random, so that no other process on the machine can hold it by chance.
KEY = "sk-deploy-" + secrets.token_hex(12)

SYSTEMD_UNITS = {
    "oogiri-lmdeploy.service": "",
    "oogiri-lmdeploy@.service": "0",  # the instance: GPU 0
    "oogiri-lmdeploy-proxy.service": "",
}
COMPOSE_SERVICES = ["lmdeploy", "lmdeploy-gpu1", "lmdeploy-candidate", "lmdeploy-proxy"]
K8S_CONTAINERS = [
    ("oogiri-lmdeploy", "api-server"),
    ("oogiri-lmdeploy-candidate", "api-server"),
    ("oogiri-lmdeploy-proxy", "proxy"),
]

# What LMDeploy's CLI gets besides the key: the flags each file passed before the launcher.
# /models is the models volume; "ft-v7" the version in the served folder's oogiri-model.json.
_SERVER_TAIL = [
    "--backend", "pytorch", "--trust-remote-code",
    "--chat-template", "/etc/oogiri/chat-template.json",
    "--session-len", "8192", "--cache-max-entry-count", "0.2", "--max-batch-size", "256",
    "--tp", "1", "--disable-fastapi-docs",
]  # fmt: skip
_UNIT_TAIL = [
    "--model-name", "base", "--backend", "pytorch", "--tp", "1", "--trust-remote-code",
    "--chat-template", "/etc/oogiri/chat-template.json",
    "--session-len", "8192", "--cache-max-entry-count", "0.2", "--max-batch-size", "256",
    "--disable-fastapi-docs",
]  # fmt: skip
_K8S_TAIL = [
    "--server-port", "23333", "--backend", "pytorch", "--trust-remote-code",
    "--chat-template", "/models/chat-template.json",
    "--session-len", "8192", "--cache-max-entry-count", "0.2", "--max-batch-size", "256",
    "--tp", "1", "--disable-fastapi-docs",
]  # fmt: skip
EXPECTED = {
    "systemd:oogiri-lmdeploy.service": [
        "serve", "api_server", "/var/lib/oogiri/models/active",
        "--server-name", "127.0.0.1", "--server-port", "23333", *_UNIT_TAIL,
    ],
    "systemd:oogiri-lmdeploy@.service": [
        "serve", "api_server", "/var/lib/oogiri/models/active",
        "--server-name", "127.0.0.1", "--server-port", "23334",
        "--proxy-url", "http://127.0.0.1:8000", *_UNIT_TAIL,
    ],
    "systemd:oogiri-lmdeploy-proxy.service": [
        "serve", "proxy", "--server-name", "127.0.0.1", "--server-port", "8000",
        "--routing-strategy", "min_expected_latency", "--disable-cache-status",
    ],
    "compose:lmdeploy": [
        "serve", "api_server", "/models/active", "--model-name", "ft-v7",
        "--server-name", "lmdeploy", "--server-port", "23333", *_SERVER_TAIL,
    ],
    "compose:lmdeploy-gpu1": [
        "serve", "api_server", "/models/active", "--model-name", "ft-v7",
        "--server-name", "lmdeploy-gpu1", "--server-port", "23333",
        "--proxy-url", "http://lmdeploy-proxy:8000", *_SERVER_TAIL,
    ],
    "compose:lmdeploy-candidate": [
        "serve", "api_server", "/models/candidate", "--model-name", "base",
        "--server-name", "lmdeploy-candidate", "--server-port", "23333", *_SERVER_TAIL,
    ],
    "compose:lmdeploy-proxy": [
        "serve", "proxy", "--server-name", "0.0.0.0", "--server-port", "8000",
        "--routing-strategy", "min_expected_latency",
    ],
    "k8s:oogiri-lmdeploy/api-server": [
        "serve", "api_server", "/models/active", "--model-name", "ft-v7",
        "--server-name", "127.0.0.1", *_K8S_TAIL,  # POD_IP
    ],
    "k8s:oogiri-lmdeploy-candidate/api-server": [
        "serve", "api_server", "/models/candidate", "--model-name", "base",
        "--server-name", "0.0.0.0", *_K8S_TAIL,
    ],
    "k8s:oogiri-lmdeploy-proxy/proxy": [
        "serve", "proxy", "--server-name", "0.0.0.0", "--server-port", "8000",
        "--routing-strategy", "min_expected_latency", "--disable-cache-status",
    ],
}  # fmt: skip


def deploy_files() -> list[Path]:
    return sorted(p for p in (ROOT / "deploy").rglob("*") if p.is_file())


def test_no_deploy_file_passes_api_keys_on_a_command_line() -> None:
    offending = []
    for path in deploy_files():
        for number, line in enumerate(path.read_text("utf-8").splitlines(), 1):
            if not line.lstrip().startswith("#") and API_KEYS_FLAG.search(line):
                offending.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offending, "\n".join(offending)


# --------------------------------------------------------------------------- the stand-in

STANDIN_MAIN = r'''
"""Stand-in for ``python -m lmdeploy``: records what LMDeploy's CLI would get, then exits."""
import argparse, json, os, shutil, subprocess, sys
from pathlib import Path

parser = argparse.ArgumentParser(prog="lmdeploy")
parser.add_argument("command")
parser.add_argument("subcommand")
parser.add_argument("--api-keys", type=str, nargs="*", default=None)  # as LMDeploy 0.18 has it
args, _rest = parser.parse_known_args()


def stat(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[1]), int(fields[3])  # ppid, session


def cmdline(pid):
    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]]


_, session = stat(os.getpid())
processes = []
for entry in Path("/proc").iterdir():
    if not entry.name.isdigit():
        continue
    try:
        ppid, sid = stat(entry.name)
        if sid == session:
            processes.append({"pid": int(entry.name), "ppid": ppid, "cmdline": cmdline(entry.name)})
    except (OSError, ValueError, IndexError):
        continue  # gone meanwhile
ps = shutil.which("ps")
listing = (
    subprocess.run([ps, "-eww", "-o", "pid,args"], capture_output=True, text=True).stdout
    if ps else None
)
keys = args.api_keys or []
record = {
    "pid": os.getpid(),
    "argv": sys.argv,
    "api_keys": args.api_keys,
    "processes": processes,
    "ps": listing,
    # names of variables still holding the key in LMDeploy's environment (its workers inherit it)
    "env_with_key": sorted(k for k, v in os.environ.items() if v and v in keys),
}
out = os.environ["STANDIN_OUT"]
with open(f"{out}.{os.getpid()}", "w") as f:
    json.dump(record, f)
os.replace(f"{out}.{os.getpid()}", out)
'''


@dataclass
class Sandbox:
    """Stand-ins for what each environment provides: ``python``/``python3`` (this interpreter), an
    ``lmdeploy`` console script (what the deploy files ran before the launcher), the stand-in
    ``lmdeploy`` package, and the models volume (active -> ft-v7 with its version, candidate)."""

    root: Path

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    @property
    def pythonpath(self) -> Path:
        return self.root / "standin"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def out(self) -> Path:
        return self.root / "lmdeploy-argv.json"

    @property
    def log(self) -> Path:
        return self.root / "output.log"

    def unmap(self, argv: list[str]) -> list[str]:
        """The recorded argv with the sandbox's models folder written as the volume's /models."""
        return [a.replace(str(self.models), "/models") for a in argv]


def executable(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    path.chmod(0o755)


@pytest.fixture
def sandbox(tmp_path: Path) -> Sandbox:
    box = Sandbox(tmp_path)
    package = box.pythonpath / "lmdeploy"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(STANDIN_MAIN)
    for name in ("python", "python3"):
        executable(box.bin / name, f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    # LMDeploy's console script (the deploy files ran it directly before the launcher)
    executable(
        box.bin / "lmdeploy",
        f"#!{sys.executable}\nimport runpy\n"
        'runpy.run_module("lmdeploy", run_name="__main__", alter_sys=True)\n',
    )
    (box.models / "ft-v7").mkdir(parents=True)
    (box.models / "ft-v7" / "oogiri-model.json").write_text(json.dumps({"version": "ft-v7"}))
    (box.models / "active").symlink_to("ft-v7")
    (box.models / "candidate").mkdir()  # a folder without a version: served as "base"
    return box


@dataclass
class Run:
    argv: list[str]  # what the outermost process was started with (systemd's, docker's exec)
    record: dict[str, Any] | None
    returncode: int | None  # None: still running when the stand-in had answered (a loop)
    output: str


def run_command(
    box: Sandbox, argv: list[str], env: dict[str, str], timeout: float = 30, exits: bool = False
) -> Run:
    """Run ``argv`` in its own session until the stand-in has recorded (and, with ``exits``,
    until it has ended), then stop the session."""
    full_env = {
        **env,
        "PATH": f"{box.bin}:/usr/local/bin:/usr/bin:/bin",
        "PYTHONPATH": str(box.pythonpath),
        "PYTHONDONTWRITEBYTECODE": "1",
        "STANDIN_OUT": str(box.out),
    }
    with box.log.open("ab") as log:
        proc = subprocess.Popen(
            argv,
            env=full_env,
            cwd=box.root,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout
        while not box.out.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if exits:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        returncode = proc.poll()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    record = json.loads(box.out.read_text()) if box.out.exists() else None
    return Run(argv, record, returncode, box.log.read_text(errors="replace"))


def check_key_off_every_cmdline(
    box: Sandbox, run: Run, target: str, launcher_path: Callable[[str], bool]
) -> None:
    """What each dynamic test asserts about a run that should have started LMDeploy."""
    assert run.record is not None, f"LMDeploy never ran (exit {run.returncode}):\n{run.output}"
    got = run.record
    # the key reached LMDeploy's argument parser, exactly once
    assert got["api_keys"] == [KEY], got["argv"]
    # ... and no command line: not the one the session started with (a shell that exec'd is
    # gone from /proc by now), not any process of the session, nor anything `ps` shows
    assert KEY not in " ".join(run.argv), run.argv
    assert any(p["pid"] == got["pid"] for p in got["processes"])
    for process in got["processes"]:
        line = " ".join(process["cmdline"])
        assert KEY not in line, f"the key is on a command line: {line}"
        assert not API_KEYS_FLAG.search(line), f"--api-keys on a command line: {line}"
    if got["ps"] is not None:
        assert KEY not in got["ps"]
    # LMDeploy (and the workers it spawns) keeps no copy of the key in its environment
    assert got["env_with_key"] == []
    # started through the launcher: it is this process's script ([python, launcher, serve, …])
    (me,) = [p for p in got["processes"] if p["pid"] == got["pid"]]
    assert len(me["cmdline"]) > 1 and launcher_path(me["cmdline"][1]), me["cmdline"]
    assert Path(me["cmdline"][1]).read_bytes() == LAUNCHER.read_bytes()
    # every other flag is what it was
    assert box.unmap(got["argv"][1:]) == [*EXPECTED[target], f"--api-keys={KEY}"]


# --------------------------------------------------------------------------- systemd

OPT = "/opt/"


def specifiers(text: str, instance: str) -> str:
    """systemd's %-specifiers these units use (an unknown one fails the test)."""
    return re.sub(r"%(.)", lambda m: {"i": instance, "%": "%"}[m.group(1)], text)


def systemd_env(unit: Path, instance: str, key: str) -> dict[str, str]:
    """The environment systemd gives the unit: Environment=, then /etc/oogiri/lmdeploy.env (the
    example, with ``key`` as LMDEPLOY_API_KEY), which overrides them."""
    settings = unit_settings(unit)
    env = {}
    for assignment in settings.get("Environment", []):
        name, _, value = specifiers(assignment, instance).partition("=")
        env[name] = value
    files = [specifiers(f, instance) for f in settings.get("EnvironmentFile", [])]
    assert "/etc/oogiri/lmdeploy.env" in files, "the key comes from /etc/oogiri/lmdeploy.env"
    assert all(f.startswith("-") for f in files if f != "/etc/oogiri/lmdeploy.env"), files
    values = env_file_values(SYSTEMD / "lmdeploy.env.example")
    assert SECRET_VAR in values
    env.update(values)
    env[SECRET_VAR] = key
    return env


def systemd_exec_start(unit: Path, instance: str, env: dict[str, str]) -> list[str]:
    """ExecStart= as systemd turns it into an argv: split into words (quotes), then ``$$`` -> ``$``,
    ``${VAR}`` -> its value inside any word, and a word that is ``$VAR`` -> its value's words."""
    (value,) = unit_settings(unit)["ExecStart"]
    value = specifiers(value, instance)
    assert value[:1] not in "-@:+!|" and "\\" not in value, "outside what this emulation reads"
    argv = []
    for word in shlex.split(value):
        whole = re.fullmatch(r"\$([A-Za-z_]\w*)", word)
        if whole:
            argv.extend(env.get(whole.group(1), "").split())
            continue
        argv.append(
            re.sub(
                r"\$\$|\$\{([A-Za-z_]\w*)\}",
                lambda m: env.get(m.group(1), "") if m.group(1) else "$",
                word,
            )
        )
    return argv


def opt_into(box: Sandbox, text: str) -> str:
    return text.replace(OPT, f"{box.root}/opt/")


def systemd_run_in(box: Sandbox, unit: str, key: str) -> tuple[list[str], dict[str, str]]:
    """ExecStart= and the environment of ``unit``, with /opt/ in the sandbox, where the two
    installs the units run from are: LMDeploy's venv and the bot's (the launcher)."""
    instance = SYSTEMD_UNITS[unit]
    env = systemd_env(SYSTEMD / unit, instance, key)
    argv = [opt_into(box, a) for a in systemd_exec_start(SYSTEMD / unit, instance, env)]
    env = {k: opt_into(box, v) for k, v in env.items()}
    lmdeploy_bin = box.root / "opt" / "lmdeploy" / "bin"
    executable(lmdeploy_bin / "python", f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    executable(lmdeploy_bin / "lmdeploy", (box.bin / "lmdeploy").read_text())
    launcher = env.get("LMDEPLOY_LAUNCHER")
    if launcher:
        Path(launcher).parent.mkdir(parents=True, exist_ok=True)
        Path(launcher).write_bytes(LAUNCHER.read_bytes())
    return argv, env


@pytest.mark.parametrize("unit", list(SYSTEMD_UNITS))
def test_systemd_unit_hands_the_key_to_the_launcher(unit: str) -> None:
    settings = unit_settings(SYSTEMD / unit)
    (start,) = settings["ExecStart"]
    assert not API_KEYS_FLAG.search(start), start
    # systemd expands $VAR and ${VAR} into the argv it executes: here it must expand nothing
    assert "$" not in start.replace("$$", ""), start
    argv = shlex.split(start)
    assert argv[:2] == ["/bin/sh", "-c"] and len(argv) == 3, argv
    script = argv[2].replace("$$", "$")
    # sh moves the key into the launcher's variable (refusing to start without one), drops the
    # old name, and execs the launcher: the key variables appear nowhere else in the script
    handover = re.compile(
        rf'export {LAUNCH_VAR}="\$\{{{SECRET_VAR}:\?[^}}"]+\}}"; unset {SECRET_VAR}; exec\s+'
    )
    assert handover.match(script), script
    rest = handover.sub("", script)
    assert SECRET_VAR not in rest and LAUNCH_VAR not in rest, rest
    assert re.match(
        r'/opt/lmdeploy/bin/python "\$LMDEPLOY_LAUNCHER" serve (api_server|proxy)\s', rest
    )

    # LMDEPLOY_LAUNCHER: the launcher as pip installs the bot into /opt/oogiri
    defaults = dict(a.partition("=")[::2] for a in settings["Environment"])
    launcher = defaults["LMDEPLOY_LAUNCHER"]
    match = re.fullmatch(
        r"/opt/oogiri/lib/(python3\.\d+)/site-packages/(bot/engines/lmdeploy_launch\.py)", launcher
    )
    assert match, launcher
    assert match.group(2) == LAUNCHER.relative_to(ROOT).as_posix()
    operations = (ROOT / "docs" / "operations.md").read_text("utf-8")
    assert f"{match.group(1)} -m venv /opt/oogiri" in operations, "the documented install's Python"


@pytest.mark.parametrize("unit", list(SYSTEMD_UNITS))
def test_systemd_unit_runs_lmdeploy_with_the_key_off_every_cmdline(
    sandbox: Sandbox, unit: str
) -> None:
    argv, env = systemd_run_in(sandbox, unit, KEY)
    launcher = env.get("LMDEPLOY_LAUNCHER")
    run = run_command(sandbox, argv, env, exits=True)
    check_key_off_every_cmdline(
        sandbox,
        run,
        f"systemd:{unit}",
        lambda path: path == launcher and path.endswith("/bot/engines/lmdeploy_launch.py"),
    )
    assert run.returncode == 0, run.output  # sh exec'd the launcher; it ended with the stand-in


@pytest.mark.parametrize("unit", list(SYSTEMD_UNITS))
def test_systemd_unit_refuses_to_start_without_the_key(sandbox: Sandbox, unit: str) -> None:
    argv, env = systemd_run_in(sandbox, unit, "")  # LMDEPLOY_API_KEY= (left empty)
    run = run_command(sandbox, argv, env, exits=True)
    assert run.record is None, "LMDeploy started without a key"
    assert run.returncode not in (0, None)
    assert f"set {SECRET_VAR} in /etc/oogiri/lmdeploy.env" in run.output, run.output


# --------------------------------------------------------------------------- compose


@pytest.fixture(scope="module")
def keyed_compose(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """``docker compose config`` with deploy/.env = the example, holding KEY as LMDEPLOY_API_KEY."""
    docker_compose: list[str] = request.getfixturevalue("compose")  # test_deploy_files
    example = COMPOSE_ENV_EXAMPLE.read_text("utf-8")
    text = re.sub(rf"^{SECRET_VAR}=.*$", f"{SECRET_VAR}={KEY}", example, flags=re.M)
    assert KEY in text
    env_file = tmp_path_factory.mktemp("compose-env") / ".env"
    env_file.write_text(text)
    result = run_compose(
        docker_compose, "--profile", "scale", "--profile", "ab", "config", "--format", "json",
        env_file=env_file,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["services"]


def compose_command(service: dict[str, Any]) -> list[str]:
    return [c.replace("$$", "$") for c in service["command"]]  # `config` re-escapes $


def launcher_mount(service: dict[str, Any]) -> dict[str, Any]:
    mounts = [
        v
        for v in service.get("volumes", [])
        if v["type"] == "bind" and Path(v["source"]).resolve() == LAUNCHER.resolve()
    ]
    assert len(mounts) == 1, f"bind-mount {LAUNCHER.relative_to(ROOT)} once: {mounts}"
    return mounts[0]


@pytest.mark.parametrize("name", COMPOSE_SERVICES)
def test_compose_service_hands_the_key_to_the_launcher(
    keyed_compose: dict[str, Any], name: str
) -> None:
    service = keyed_compose[name]
    assert service.get("entrypoint") is None  # not overridden: the command runs as given
    command = compose_command(service)
    text = " ".join(command)
    assert not API_KEYS_FLAG.search(text), text
    assert "API_KEY" not in text, "the command refers to the key: it would expand into an argv"
    for part in ("command", "healthcheck"):
        assert KEY not in json.dumps(service.get(part)), part
    # the key is in the container's environment under the launcher's name only (from deploy/.env)
    env = service["environment"]
    assert env.get(LAUNCH_VAR) == KEY
    assert [k for k, v in env.items() if v == KEY] == [LAUNCH_VAR]
    mount = launcher_mount(service)
    assert mount.get("read_only") is True
    # the image's python3 (LMDeploy's venv) runs the mounted launcher, which runs LMDeploy
    assert re.search(rf"(^|\s)python3 {re.escape(mount['target'])} serve (api_server|proxy) ", text)


@pytest.mark.parametrize("name", COMPOSE_SERVICES)
def test_compose_service_runs_lmdeploy_with_the_key_off_every_cmdline(
    keyed_compose: dict[str, Any], sandbox: Sandbox, name: str
) -> None:
    service = keyed_compose[name]
    command = compose_command(service)
    # what the container sees: the launcher's bind mount (if any) and the models folder
    mounts = [{"source": str(sandbox.models), "target": "/models"}]
    mounts += [
        v
        for v in service.get("volumes", [])
        if v["type"] == "bind" and Path(v["source"]).resolve() == LAUNCHER.resolve()
    ]

    def mapped(text: str) -> str:
        for mount in sorted(mounts, key=lambda m: -len(m["target"])):
            pattern = rf"{re.escape(mount['target'])}(?=/|\b|$)"
            text = re.sub(pattern, lambda _m, m=mount: m["source"], text)
        return text

    argv = [mapped(a) for a in command]
    env = {k: mapped(v.replace("$$", "$")) for k, v in (service.get("environment") or {}).items()}
    env["LMDEPLOY_WATCH_S"] = "0.1"
    run = run_command(sandbox, argv, env)
    check_key_off_every_cmdline(
        sandbox, run, f"compose:{name}", lambda path: Path(path) == LAUNCHER
    )


# --------------------------------------------------------------------------- Kubernetes


@pytest.fixture(scope="module")
def k8s_docs(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return kustomize(request.getfixturevalue("kubectl"), K8S / "base")


def pod_and_container(
    docs: list[dict[str, Any]], deployment: str, container: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    spec = by_kind(docs, "Deployment")[deployment]["spec"]["template"]["spec"]
    (found,) = [c for c in spec["containers"] if c["name"] == container]
    return spec, found


def k8s_expand(text: str, env: dict[str, str]) -> str:
    """The kubelet's ``$(VAR)`` expansion of command and args (``$$`` escapes)."""
    return re.sub(
        r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
        lambda m: "$" if not m.group(1) else env.get(m.group(1), m.group(0)),
        text,
    )


def k8s_env(docs: list[dict[str, Any]], container: dict[str, Any], key: str) -> dict[str, str]:
    """The container's environment, with KEY as oogiri-secrets' LMDEPLOY_API_KEY."""
    secrets_ = {n: dict(s.get("stringData") or {}) for n, s in by_kind(docs, "Secret").items()}
    secrets_["oogiri-secrets"][SECRET_VAR] = key
    configs = {n: dict(c.get("data") or {}) for n, c in by_kind(docs, "ConfigMap").items()}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "secretRef" in source:
            env.update(secrets_[source["secretRef"]["name"]])
        if "configMapRef" in source:
            env.update(configs[source["configMapRef"]["name"]])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = k8s_expand(item["value"], env)
            continue
        ref = item["valueFrom"]
        if "secretKeyRef" in ref:
            secret = ref["secretKeyRef"]
            env[item["name"]] = secrets_[secret["name"]][secret["key"]]
        elif "configMapKeyRef" in ref:
            config = ref["configMapKeyRef"]
            env[item["name"]] = configs[config["name"]][config["key"]]
        else:
            assert ref["fieldRef"]["fieldPath"] == "status.podIP", ref
            env[item["name"]] = "127.0.0.1"
    return env


@pytest.mark.parametrize(("deployment", "name"), K8S_CONTAINERS)
def test_kubernetes_container_hands_the_key_to_the_launcher(
    k8s_docs: list[dict[str, Any]], deployment: str, name: str
) -> None:
    spec, container = pod_and_container(k8s_docs, deployment, name)
    text = " ".join([*container.get("command", []), *container.get("args", [])])
    assert not API_KEYS_FLAG.search(text), text
    assert "API_KEY" not in text, "the command refers to the key: it would expand into an argv"
    # the key: from the Secret, under the launcher's name only
    refs = {
        item["name"]: item.get("valueFrom", {}).get("secretKeyRef")
        for item in container.get("env", [])
    }
    assert refs.get(LAUNCH_VAR) == {"name": "oogiri-secrets", "key": SECRET_VAR}
    assert [n for n, r in refs.items() if r and r["key"] == SECRET_VAR] == [LAUNCH_VAR]
    assert not any("secretRef" in s for s in container.get("envFrom", []))
    # python3 (LMDeploy's image) runs the launcher from a volume ...
    match = re.search(
        r"(?:^|\s)python3 (/\S+/lmdeploy_launch\.py) serve (?:api_server|proxy) ", text
    )
    assert match, text
    path = match.group(1)
    (mount,) = [
        m for m in container["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")
    ]
    assert mount.get("readOnly") is True
    volume = {v["name"]: v for v in spec["volumes"]}[mount["name"]]
    assert "emptyDir" in volume
    # ... that an init container fills from the bot image (the same image as the bot's pods)
    fillers = [
        c
        for c in spec.get("initContainers", [])
        if any(m["name"] == mount["name"] for m in c.get("volumeMounts", []))
    ]
    assert len(fillers) == 1, fillers
    bot_image = by_kind(k8s_docs, "Deployment")["oogiri-bot"]["spec"]["template"]["spec"][
        "containers"
    ][0]["image"]
    assert fillers[0]["image"] == bot_image
    assert "bot.engines.lmdeploy_launch" in " ".join(fillers[0]["command"])


@pytest.mark.parametrize(("deployment", "name"), K8S_CONTAINERS)
def test_kubernetes_container_runs_lmdeploy_with_the_key_off_every_cmdline(
    k8s_docs: list[dict[str, Any]], sandbox: Sandbox, deployment: str, name: str
) -> None:
    spec, container = pod_and_container(k8s_docs, deployment, name)
    volumes: dict[str, Path] = {}
    for volume in spec.get("volumes", []):
        if volume.get("persistentVolumeClaim", {}).get("claimName") == "oogiri-models":
            volumes[volume["name"]] = sandbox.models
        elif "emptyDir" in volume:
            volumes[volume["name"]] = sandbox.root / "volumes" / volume["name"]
            volumes[volume["name"]].mkdir(parents=True)

    def mapped(c: dict[str, Any], text: str) -> str:
        mounts = sorted(c.get("volumeMounts", []), key=lambda m: -len(m["mountPath"]))
        for m in mounts:
            pattern = rf"{re.escape(m['mountPath'].rstrip('/'))}(?=/|\b|$)"
            text = re.sub(pattern, lambda _m, m=m: str(volumes[m["name"]]), text)
        return text

    def argv_of(c: dict[str, Any], env: dict[str, str]) -> list[str]:
        assert c.get("command"), "the image's entrypoint is not part of this emulation"
        return [mapped(c, k8s_expand(a, env)) for a in [*c["command"], *c.get("args", [])]]

    for init in spec.get("initContainers", []):  # the bot image: this checkout's Python has bot
        env = k8s_env(k8s_docs, init, KEY)
        result = subprocess.run(
            argv_of(init, env),
            env={**env, "PATH": f"{sandbox.bin}:/usr/bin:/bin"},
            cwd=sandbox.root,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
    env = k8s_env(k8s_docs, container, KEY)
    run = run_command(sandbox, argv_of(container, env), env)
    check_key_off_every_cmdline(
        sandbox,
        run,
        f"k8s:{deployment}/{name}",
        lambda path: Path(path).parent.parent == sandbox.root / "volumes",
    )
