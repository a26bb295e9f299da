"""Managed LMDeploy: the bot runs its own ``lmdeploy serve api_server`` and swaps models blue/green.

With ``engine.name = "lmdeploy"`` and ``engine.manage = true``, ``oogiri serve``:

* starts ``lmdeploy serve api_server MODEL …`` through :mod:`bot.engines.lmdeploy_launch` with
  every relevant flag from settings (:func:`build_command`: backend, --tp, --session-len,
  --cache-max-entry-count, --max-batch-size, --chat-template (the shipped XTuner-matching InternVL2
  template unless another is set), --trust-remote-code, --server-name/--server-port, --model-name)
  and ``OMP_NUM_THREADS``/``MKL_NUM_THREADS = engine.server_threads`` (LMDeploy's image
  preprocessing otherwise spawns a thread per core per request and starves itself). The API key is
  never on a command line (any local user can read those): it goes to the child in the environment
  variable ``LMDEPLOY_LAUNCH_API_KEY``, and the launcher hands it to LMDeploy inside the process
  (:func:`launcher`, :func:`server_env`);
* waits for ``/health`` and, with a key set, checks that ``/v1/models`` refuses a request without
  it (a ``server_command`` that ignores the key is stopped, not served); appends the server's
  output to ``data_dir/logs/lmdeploy-PORT.log``;
* restarts it with exponential backoff (1 s … 60 s) when it exits or stops answering ``/health``;
* swaps models blue/green on request (:meth:`ManagedLMDeploy.swap`): start the new model on the
  next free port (``engine.port + 1 …``), wait for health, warm it with a real picture request,
  switch new requests to it atomically (one assignment in the HTTP engine), wait for the requests
  still running on the old server (drain), then stop the old one. A failed start or warm-up stops
  the new server and leaves the old one serving. The active model is remembered in
  ``data_dir/engine-state.json`` so that a restart of the bot serves the swapped-in model (until
  ``engine.model`` itself is changed in settings, which then wins).

Control from another process: ``oogiri serve`` listens on a Unix socket
(``engine.control_socket``, default ``data_dir/run/engine.sock``, mode 0600, so only its user can
swap). The protocol is one JSON line in — ``{"op": "status"}`` or ``{"op": "swap", "model": DIR,
"label": …}`` — and JSON lines out: zero or more ``{"event": "progress", "message": …}`` and one
final ``{"ok": true, "result": …}`` / ``{"ok": false, "error": …}``. ``oogiri engine swap DIR`` and
``oogiri engine status`` are thin clients of it (:func:`control_request`); the retraining job uses
the same function. A Unix socket needs no port, no token and no polling, and its file permissions
are the access control.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Literal

import httpx
from pydantic import Field

from bot.engines.base import EngineHealth
from bot.engines.internvl import CHAT_TEMPLATE
from bot.engines.lmdeploy_launch import API_KEY_ENV, LAUNCH_FILE
from bot.engines.openai_http import (
    CHAT_PATH,
    HEALTH_PATH,
    MODELS_PATH,
    OpenAIHTTPEngine,
    Upstream,
    assert_only_data_urls,
    body_error,
    to_data_url,
)
from bot.engines.serving_view import serving_folder
from bot.models import EngineError, Generation, GenerationParams, NormalizedImage
from bot.settings import EngineSettings, Settings

log = logging.getLogger(__name__)

TEMPLATE = CHAT_TEMPLATE
STATE_FILE = "engine-state.json"
LOG_ROTATE_BYTES = 64 * 1024 * 1024
Progress = Callable[[str], None]


class LMDeployEngineSettings(EngineSettings):
    """The core's ``engine`` section plus the knobs of a managed ``lmdeploy serve api_server``.

    This plugin registers it for the ``engine`` section (``oogiri_register_settings`` with a
    subclass of ``EngineSettings``), so the fields keep their names: ``settings.engine.manage``,
    OOGIRI_ENGINE__TP, ``[engine] session_len`` in oogiri.toml; the core declares none of them.
    """

    manage: bool = False
    backend: Literal["pytorch", "turbomind"] = "pytorch"
    tp: int = Field(default=1, ge=1)
    session_len: int = 8192
    cache_max_entry_count: float = Field(default=0.2, gt=0, le=1)
    max_batch_size: int = 256
    max_prefill_token_num: int | None = Field(
        default=16384,
        ge=1,
        description="prompt tokens per engine step; LMDeploy's 8192 holds four 6-tile requests "
        "(16384: +11 % jokes/s on an H100, docs/benchmarks.md); unset: LMDeploy's default",
    )
    chat_template: Path | None = Field(
        default=None, description="unset: the shipped InternVL2 template"
    )
    port: int = 23333
    server_threads: int = Field(
        default=2, ge=1, description="OMP/MKL threads of the managed server"
    )
    extra_args: list[str] = Field(default_factory=list)
    server_command: list[str] = Field(
        default_factory=list,
        description="argv that runs lmdeploy's CLI; empty: this python through the launcher "
        "(bot/engines/lmdeploy_launch.py); [PY, -m, MODULE] and [PY, FILE.py] also run through "
        "it; anything else must read the API key from LMDEPLOY_LAUNCH_API_KEY",
    )
    server_host: str = Field(default="127.0.0.1", description="--server-name of the managed server")
    trust_remote_code: bool = Field(
        default=True, description="InternVL2 folders need remote config code"
    )
    startup_timeout_s: float = Field(default=900.0, gt=0, description="wait this long for /health")
    drain_timeout_s: float = Field(
        default=180.0,
        gt=0,
        description="swap: wait this long for in-flight requests on the old server",
    )
    control_socket: Path | None = Field(
        default=None, description="admin socket of `oogiri serve`; unset: data_dir/run/engine.sock"
    )


def server_settings(settings: Settings) -> LMDeployEngineSettings:
    """``settings.engine`` with this plugin's fields (present whenever the plugin is installed)."""
    engine = settings.engine
    if not isinstance(engine, LMDeployEngineSettings):
        raise TypeError("settings.engine lacks the LMDeploy server fields: is the plugin loaded?")
    return engine


class ServerFailed(EngineError):
    """A managed server did not start, died during start, or never became healthy."""


class SwapError(EngineError):
    """A swap was refused or failed; the old model is still serving."""


# --------------------------------------------------------------------------- command line


def is_python(executable: str) -> bool:
    name = Path(executable).name
    return executable == sys.executable or re.fullmatch(r"python[0-9.]*", name) is not None


def launcher(settings: LMDeployEngineSettings) -> list[str]:
    """The argv prefix that runs LMDeploy's CLI, so that the API key can stay off every argv.

    Empty ``server_command``: this Python runs :mod:`bot.engines.lmdeploy_launch` (by file, so it
    needs nothing of the bot). A ``server_command`` that runs Python — ``[PY, -m, MODULE, …]`` or
    ``[PY, FILE.py, …]`` — runs the same launcher under that ``PY`` with ``--module``/``--script``,
    which hands the key to the module inside its process. Anything else (a binary, a shell
    script) runs as given and gets the key only in ``LMDEPLOY_LAUNCH_API_KEY``: it must hand it to
    LMDeploy itself; :meth:`ServerProcess.wait_healthy` refuses a server that answers without it.
    """
    cmd = list(settings.server_command)
    if not cmd:
        return [sys.executable, str(LAUNCH_FILE)]
    if len(cmd) >= 2 and is_python(cmd[0]):
        if cmd[1] == "-m" and len(cmd) >= 3:
            return [cmd[0], str(LAUNCH_FILE), "--module", cmd[2], *cmd[3:]]
        if cmd[1].endswith(".py"):
            return [cmd[0], str(LAUNCH_FILE), "--script", cmd[1], *cmd[2:]]
    return cmd


def api_key_of(settings: LMDeployEngineSettings) -> str | None:
    """The server's API key, or None (unset or empty: the server runs without one)."""
    if settings.api_key is None:
        return None
    return settings.api_key.get_secret_value() or None


def template_path(settings: LMDeployEngineSettings) -> Path:
    return Path(settings.chat_template) if settings.chat_template else TEMPLATE


def build_command(
    settings: LMDeployEngineSettings, model_dir: Path | str, port: int, served_name: str
) -> list[str]:
    """The ``lmdeploy serve api_server`` argv for one managed server (never with the API key:
    :func:`server_env` puts that in the child's environment)."""
    cmd = [
        *launcher(settings),
        "serve",
        "api_server",
        str(model_dir),
        "--backend",
        settings.backend,
        "--server-name",
        settings.server_host,
        "--server-port",
        str(port),
        "--model-name",
        served_name,
        "--tp",
        str(settings.tp),
        "--session-len",
        str(settings.session_len),
        "--cache-max-entry-count",
        f"{settings.cache_max_entry_count:g}",
        "--max-batch-size",
        str(settings.max_batch_size),
        "--chat-template",
        str(template_path(settings)),
    ]
    if settings.max_prefill_token_num is not None:
        cmd += ["--max-prefill-token-num", str(settings.max_prefill_token_num)]
    if settings.trust_remote_code:
        cmd.append("--trust-remote-code")
    if (
        settings.backend == "pytorch"
        and settings.tp > 1
        and "--distributed-executor-backend" not in settings.extra_args
    ):
        cmd += ["--distributed-executor-backend", "mp"]  # else LMDeploy wants ray for tp > 1
    cmd += list(settings.extra_args)
    return cmd


def redact(cmd: list[str]) -> list[str]:
    out, hide = [], False
    for arg in cmd:
        if hide and not arg.startswith("--"):
            out.append("**********")
            continue
        hide = arg == "--api-keys"
        if arg.startswith("--api-keys="):  # the one-argument form, e.g. from extra_args
            arg = "--api-keys=**********"
        out.append(arg)
    return out


def build_env(
    settings: LMDeployEngineSettings, base: dict[str, str] | None = None
) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    threads = str(settings.server_threads)
    env["OMP_NUM_THREADS"] = threads
    env["MKL_NUM_THREADS"] = threads
    env["PYTHONUNBUFFERED"] = "1"
    return env


def server_env(settings: LMDeployEngineSettings, env: dict[str, str]) -> dict[str, str]:
    """``env`` plus the API key for the launcher (or without the variable when no key is set)."""
    env = dict(env)
    key = api_key_of(settings)
    if key:
        env[API_KEY_ENV] = key
    else:
        env.pop(API_KEY_ENV, None)  # one in the bot's own environment is not this server's key
    return env


def model_folder(model_dir: Path | str) -> Path:
    path = Path(model_dir).expanduser().resolve()
    if not (path / "config.json").is_file():
        raise SwapError(detail=f"{path} is not a model folder (no config.json)")
    return path


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # as uvicorn does: connections of a previous server in TIME_WAIT do not block the port
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host if host not in ("", "0.0.0.0") else "127.0.0.1", port))
        except OSError:
            return False
    return True


def local_url(host: str, port: int) -> str:
    return f"http://{'127.0.0.1' if host in ('', '0.0.0.0') else host}:{port}"


def warm_up_jpeg(images_dir: Path | None = None) -> bytes:
    """A picture to warm up with: a stored user picture if there is one, else a drawn one."""
    if images_dir is not None and images_dir.is_dir():
        for path in images_dir.glob("*/*.jpg"):
            with contextlib.suppress(OSError):
                return path.read_bytes()
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (896, 672), (250, 240, 220))
    draw = ImageDraw.Draw(img)
    for i in range(12):
        draw.ellipse((40 + i * 60, 100 + (i % 3) * 150, 140 + i * 60, 200 + (i % 3) * 150),
                     fill=(20 * i % 255, 120, 255 - 20 * i % 255))  # fmt: skip
    draw.rectangle((300, 500, 600, 640), fill=(60, 60, 60))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def end_stale_server(pid_path: Path, port: int) -> None:
    """A server left behind by a bot that was killed (pid file + our command line) is ended."""
    try:
        pid = int(pid_path.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        cmdline = ""
    if "api_server" in cmdline and f"--server-port {port}" in cmdline:
        log.warning("ending stale lmdeploy api_server pid %d on port %d", pid, port)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    with contextlib.suppress(OSError):
        pid_path.unlink()


# --------------------------------------------------------------------------- one server process


class ServerProcess:
    """One ``api_server`` child: start, health wait, supervision with restarts, graceful stop."""

    HEALTH_POLL_S = 0.5
    RESTART_BACKOFF_S = 1.0
    RESTART_BACKOFF_MAX_S = 60.0
    STABLE_AFTER_S = 300.0  # a server up this long starts the backoff from the beginning again
    LIVENESS_INTERVAL_S = 15.0
    LIVENESS_FAILURES = 4
    STOP_GRACE_S = 30.0

    def __init__(
        self,
        settings: LMDeployEngineSettings,
        model_dir: Path,
        port: int,
        served_name: str,
        label: str,
        log_dir: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.env = env  # None: build_env(settings); benchmarks pass their own
        self.model_dir = model_dir
        self.port = port
        self.served_name = served_name
        self.label = label
        self.log_dir = log_dir
        self.log_path = log_dir / f"lmdeploy-{port}.log"
        self.pid_path = log_dir / f"lmdeploy-{port}.pid"
        self.url = local_url(settings.server_host, port)
        self.command = build_command(settings, model_dir, port, served_name)
        self.proc: asyncio.subprocess.Process | None = None
        self.state = "new"
        self.restarts = 0
        self.started_at = 0.0
        self.healthy_at = 0.0
        self._stopping = False
        self._watch: asyncio.Task[None] | None = None
        self._http = httpx.AsyncClient(timeout=10.0, trust_env=False)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._kill_stale()
        if not port_is_free(self.settings.server_host, self.port):
            raise ServerFailed(
                detail=f"port {self.port} is already in use; is another oogiri serve or "
                "lmdeploy server running? (engine.port)"
            )
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # InternVL's own config class breaks LMDeploy on transformers 5: serve a view of the
        # folder with the project's (bot/engines/serving_view.py)
        served_dir = await asyncio.to_thread(
            serving_folder, self.model_dir, self.log_dir.parent / "lmdeploy-views"
        )
        self.command = build_command(self.settings, served_dir, self.port, self.served_name)
        self._rotate_log()
        keyed = f" ({API_KEY_ENV}=**********)" if api_key_of(self.settings) else ""
        header = (
            f"\n===== {datetime.now(UTC).isoformat()} oogiri starts {self.label} "
            f"on port {self.port}: {' '.join(redact(self.command))}{keyed}\n"
        )
        env = self.env if self.env is not None else build_env(self.settings)
        with self._open_log(header) as logf:
            try:
                self.proc = await asyncio.create_subprocess_exec(
                    *self.command,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=logf,
                    stderr=asyncio.subprocess.STDOUT,
                    env=server_env(self.settings, env),  # the key: here, never in argv
                    start_new_session=True,  # its own process group: stop() reaches its workers
                )
            except OSError as exc:
                raise ServerFailed(detail=f"cannot run {self.command[0]}: {exc}") from exc
        self.pid_path.write_text(str(self.proc.pid))
        self.state = "starting"
        self.started_at = time.monotonic()
        log.info("lmdeploy api_server for %s starting: pid %d, %s", self.label, self.proc.pid,
                 self.url)  # fmt: skip

    async def wait_healthy(self, timeout_s: float | None = None) -> None:
        timeout_s = self.settings.startup_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc is None or self.proc.returncode is not None:
                code = None if self.proc is None else self.proc.returncode
                self.state = "exited"
                raise ServerFailed(
                    detail=f"lmdeploy api_server for {self.label} exited with status {code} "
                    f"while starting; log {self.log_path}:\n{self.log_tail()}"
                )
            if await self.probe():
                await self.check_key_required()
                self.state = "healthy"
                self.healthy_at = time.monotonic()
                log.info("lmdeploy api_server for %s healthy after %.1f s", self.label,
                         self.healthy_at - self.started_at)  # fmt: skip
                return
            if time.monotonic() >= deadline:
                raise ServerFailed(
                    detail=f"lmdeploy api_server for {self.label} not healthy after "
                    f"{timeout_s:g} s; log {self.log_path}:\n{self.log_tail()}"
                )
            await asyncio.sleep(self.HEALTH_POLL_S)

    async def probe(self) -> bool:
        try:
            response = await self._http.get(self.url + HEALTH_PATH, timeout=5.0)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def check_key_required(self) -> None:
        """With a key set, ``/v1/models`` without it must be refused: a ``server_command`` that
        ignored ``LMDEPLOY_LAUNCH_API_KEY`` would otherwise serve anyone."""
        if not api_key_of(self.settings):
            return
        try:
            response = await self._http.get(self.url + MODELS_PATH, timeout=10.0)
        except httpx.HTTPError as exc:
            raise ServerFailed(
                detail=f"lmdeploy api_server for {self.label}: cannot check that it requires the "
                f"API key ({exc!r})"
            ) from exc
        if response.status_code < 400:
            self.state = "unprotected"
            raise ServerFailed(
                detail=f"lmdeploy api_server for {self.label} answered {MODELS_PATH} without the "
                f"API key (HTTP {response.status_code}): engine.server_command "
                f"{self.command[0]!r} does not hand {API_KEY_ENV} to LMDeploy; run LMDeploy "
                "through bot/engines/lmdeploy_launch.py (docs/lmdeploy.md)"
            )

    def supervise(self) -> None:
        if self._watch is None:
            self._watch = asyncio.create_task(self._supervise(), name=f"lmdeploy-{self.port}")

    async def _supervise(self) -> None:
        backoff = self.RESTART_BACKOFF_S
        while not self._stopping:
            assert self.proc is not None
            reason = await self._wait_for_trouble()
            if self._stopping:
                return
            if time.monotonic() - self.healthy_at > self.STABLE_AFTER_S:
                backoff = self.RESTART_BACKOFF_S
            self.state = "restarting"
            log.error("lmdeploy api_server for %s (port %d) %s; restarting in %.1f s (log %s)",
                      self.label, self.port, reason, backoff, self.log_path)  # fmt: skip
            await self._terminate()
            await asyncio.sleep(backoff)
            backoff = min(self.RESTART_BACKOFF_MAX_S, backoff * 2)
            if self._stopping:
                return
            self.restarts += 1
            try:
                await self.start()
                await self.wait_healthy()
            except (ServerFailed, OSError) as exc:  # e.g. a full disk: keep trying, with backoff
                reason = exc.detail if isinstance(exc, ServerFailed) else f"{exc!r}"
                log.error("restart of lmdeploy api_server failed: %s", reason.splitlines()[0])
                await self._terminate(grace_s=5)
                continue
            log.warning("lmdeploy api_server for %s is back (restart %d)", self.label,
                        self.restarts)  # fmt: skip

    async def _wait_for_trouble(self) -> str:
        """Return when the process exits or stops answering /health for a while."""
        assert self.proc is not None
        misses = 0
        while True:
            try:
                code = await asyncio.wait_for(self.proc.wait(), self.LIVENESS_INTERVAL_S)
            except TimeoutError:
                if self._stopping:
                    return "stopping"
                misses = 0 if await self.probe() else misses + 1
                if misses >= self.LIVENESS_FAILURES:
                    return f"did not answer /health {misses} times"
                continue
            return f"exited with status {code}"

    async def stop(self, grace_s: float | None = None) -> None:
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        await self._terminate(grace_s)
        self.state = "stopped"
        with contextlib.suppress(OSError):
            self.pid_path.unlink()
        await self._http.aclose()

    async def _terminate(self, grace_s: float | None = None) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        grace_s = self.STOP_GRACE_S if grace_s is None else grace_s
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
            os.killpg(proc.pid, signal.SIGCONT)  # a stopped process must run to handle TERM
        try:
            await asyncio.wait_for(proc.wait(), grace_s)
        except TimeoutError:
            log.warning("lmdeploy api_server pid %d ignored SIGTERM; killing it", proc.pid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        # workers it forked into its group must not outlive it (GPU memory)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    # ------------------------------------------------------------------ helpers

    def _kill_stale(self) -> None:
        end_stale_server(self.pid_path, self.port)

    def _open_log(self, header: str) -> BinaryIO:
        logf = open(self.log_path, "ab")  # handed to the child; the caller closes it
        logf.write(header.encode())
        logf.flush()
        return logf

    def _rotate_log(self) -> None:
        with contextlib.suppress(OSError):
            if self.log_path.stat().st_size > LOG_ROTATE_BYTES:
                self.log_path.replace(self.log_path.with_suffix(".log.1"))

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 16384))
                text = fh.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "model": str(self.model_dir),
            "label": self.label,
            "served_name": self.served_name,
            "url": self.url,
            "port": self.port,
            "pid": self.proc.pid if self.proc else None,
            "state": self.state,
            "uptime_s": round(now - self.healthy_at, 1) if self.healthy_at else 0.0,
            "restarts": self.restarts,
            "log": str(self.log_path),
            "command": redact(self.command),
        }


# --------------------------------------------------------------------------- the managed engine


class ManagedLMDeploy:
    """The ``lmdeploy`` engine in managed mode: an HTTP engine plus the server(s) behind it."""

    name = "lmdeploy"
    PORT_CANDIDATES = 16

    def __init__(self, settings: Settings, transport: httpx.AsyncBaseTransport | None = None):
        e = server_settings(settings)
        if e.model is None:
            raise EngineError(
                detail="engine.manage needs engine.model: a local InternVL2 model folder"
            )
        self.settings = settings
        self.engine_settings = e
        self.log_dir = settings.data_dir / "logs"
        self.state_path = settings.data_dir / STATE_FILE
        self.model_dir, self.label = self._initial_model()
        self.served_name = e.served_model_name or self.label
        url = local_url(e.server_host, e.port)
        self.http = OpenAIHTTPEngine(
            e,
            flavor="lmdeploy",
            upstream=Upstream.of([url], self.served_name, self.label),
            transport=transport,
        )
        self.active: ServerProcess | None = None
        self.history: list[dict[str, Any]] = []
        self._pending: set[ServerProcess] = set()
        self._retiring: set[ServerProcess] = set()  # the old server of a swap, while it drains
        self._start_lock = asyncio.Lock()
        self._swap_lock = asyncio.Lock()
        self._closed = False

    # ------------------------------------------------------------------ state

    def _initial_model(self) -> tuple[Path, str]:
        e = self.engine_settings
        assert e.model is not None
        configured = Path(e.model).expanduser().resolve()
        label = e.model_version or configured.name
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return configured, label
        if state.get("settings_model") == str(configured) and Path(state.get("model", "")).is_dir():
            log.info("serving %s (swapped in %s; engine.model unchanged since)", state["model"],
                     state.get("updated_at"))  # fmt: skip
            return Path(state["model"]), str(state.get("label") or Path(state["model"]).name)
        return configured, label

    def _save_state(self) -> None:
        assert self.engine_settings.model is not None
        doc = {
            "model": str(self.model_dir),
            "label": self.label,
            "settings_model": str(Path(self.engine_settings.model).expanduser().resolve()),
            "updated_at": datetime.now(UTC).isoformat(),
        }
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=2), encoding="utf-8")
        tmp.replace(self.state_path)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start the server for the active model and wait until it is healthy (idempotent)."""
        async with self._start_lock:
            if self.active is not None:
                return
            if self._closed:
                raise EngineError(detail="engine is closed")
            # a killed bot may have left its server on any swap port, not only on engine.port
            base = self.engine_settings.port
            for port in range(base, base + self.PORT_CANDIDATES):
                end_stale_server(self.log_dir / f"lmdeploy-{port}.pid", port)
            server = self._server(self.model_dir, self.engine_settings.port, self.label)
            self._pending.add(server)
            try:
                await server.start()
                await server.wait_healthy()
            except BaseException:
                await server.stop(grace_s=5)
                raise
            finally:
                self._pending.discard(server)
            server.supervise()
            self.active = server
            self.http.switch(Upstream.of([server.url], server.served_name, server.label))

    def _server(self, model_dir: Path, port: int, label: str) -> ServerProcess:
        served = self.engine_settings.served_model_name or label
        return ServerProcess(self.engine_settings, model_dir, port, served, label, self.log_dir)

    async def generate(
        self, image: NormalizedImage, prompt: str, params: GenerationParams
    ) -> Generation:
        if self.active is None:
            await self.start()  # outside `oogiri serve` (no startup hook): start on first use
        return await self.http.generate(image, prompt, params)

    async def health(self) -> EngineHealth:
        health = await self.http.health()
        extra = dict(health.extra)
        extra.update(self.status())
        return EngineHealth(ok=health.ok, model=health.model, detail=health.detail, extra=extra)

    async def close(self) -> None:
        self._closed = True
        servers = [s for s in (self.active, *self._pending, *self._retiring) if s is not None]
        for server in servers:
            await server.stop()
        self.active = None
        await self.http.close()

    def status(self) -> dict[str, Any]:
        return {
            "engine": self.name,
            "managed": True,
            "active": self.active.status() if self.active else None,
            "starting": [s.status() for s in self._pending],
            "swap_in_progress": self._swap_lock.locked(),
            "in_flight": self.http.in_flight,
            "breaker": self.http.breaker.state,
            "swaps": self.history[-5:],
            "state_file": str(self.state_path),
        }

    # ------------------------------------------------------------------ blue/green swap

    async def swap(
        self,
        model_dir: Path | str,
        label: str | None = None,
        progress: Progress | None = None,
        warm_image: bytes | None = None,
    ) -> dict[str, Any]:
        """Serve ``model_dir`` instead of the current model without failing a request."""
        say = progress or (lambda message: log.info("swap: %s", message))
        if self._swap_lock.locked():
            raise SwapError(detail="a swap is already in progress")
        async with self._swap_lock:
            began = time.monotonic()
            new_dir = model_folder(model_dir)
            if self.active is None:
                await self.start()
            old = self.active
            assert old is not None
            label = label or new_dir.name
            port = self._free_port(exclude={old.port})
            new = self._server(new_dir, port, label)
            self._pending.add(new)
            say(f"starting {label} ({new_dir}) on port {port}")
            try:
                await new.start()
                await new.wait_healthy()
                say(f"{label} healthy after {time.monotonic() - began:.1f} s; warming up")
                warm_s = await self._warm(new, warm_image)
                say(f"warm-up answered in {warm_s:.2f} s")
            except BaseException as exc:
                await new.stop(grace_s=10)
                self._pending.discard(new)
                detail = exc.detail if isinstance(exc, EngineError) else repr(exc)
                self._record(old, new, began, ok=False, error=detail.splitlines()[0])
                if isinstance(exc, Exception):
                    raise SwapError(
                        detail=f"{label} did not come up ({detail}); still serving {old.label}"
                    ) from exc
                raise
            self._pending.discard(new)
            new.supervise()
            previous = self.http.switch(Upstream.of([new.url], new.served_name, new.label))
            self.active, self.model_dir, self.label = new, new_dir, label
            self.served_name = new.served_name
            self._retiring.add(old)  # close() stops it too, should the bot stop mid-drain
            try:
                self._save_state()
                waiting = self.http.in_flight_to(previous.base_urls)
                say(
                    f"switched new requests to {label}; draining {waiting} request(s) on "
                    f"{old.label}"
                )
                limit = self.engine_settings.drain_timeout_s
                drained = await self.http.drain(previous.base_urls, limit)
                if not drained:
                    say(
                        f"{self.http.in_flight_to(previous.base_urls)} request(s) still running "
                        f"on {old.label} after {limit:g} s; stopping anyway"
                    )
            finally:  # cancelled or failed after the switch: the old server must not run on
                await old.stop()
                self._retiring.discard(old)
            say(f"stopped {old.label} (port {old.port})")
            return self._record(old, new, began, ok=True, drained=drained)

    def _record(
        self, old: ServerProcess, new: ServerProcess, began: float, **info: Any
    ) -> dict[str, Any]:
        entry = {
            "from": old.label,
            "to": new.label,
            "model": str(new.model_dir),
            "url": new.url,
            "port": new.port,
            "seconds": round(time.monotonic() - began, 2),
            "at": datetime.now(UTC).isoformat(),
            **info,
        }
        self.history.append(entry)
        return entry

    def _free_port(self, exclude: set[int]) -> int:
        base = self.engine_settings.port
        host = self.engine_settings.server_host
        for port in range(base, base + self.PORT_CANDIDATES):
            if port not in exclude and port_is_free(host, port):
                return port
        raise SwapError(
            detail=f"no free port in {base}..{base + self.PORT_CANDIDATES - 1} for the new server"
        )

    async def _warm(self, server: ServerProcess, jpeg: bytes | None) -> float:
        """One real chat request with a picture to the new server; any error fails the swap."""
        e = self.engine_settings
        jpeg = jpeg or await asyncio.to_thread(warm_up_jpeg, self.settings.images_dir)
        body = self.http.build_payload(
            server.served_name,
            to_data_url(jpeg),
            self.settings.prompt,
            GenerationParams(max_new_tokens=8, max_dynamic_patch=e.max_dynamic_patch),
        )
        assert_only_data_urls(body)
        headers = {}
        if e.api_key is not None and e.api_key.get_secret_value():
            headers["Authorization"] = f"Bearer {e.api_key.get_secret_value()}"
        started = time.perf_counter()
        async with httpx.AsyncClient(timeout=e.startup_timeout_s, trust_env=False) as client:
            response = await client.post(server.url + CHAT_PATH, json=body, headers=headers)
        try:
            data = response.json()
        except ValueError:
            data = None
        error = body_error(data)
        if response.status_code != 200 or error is not None or not (data or {}).get("choices"):
            message = error[1] if error else response.text[:200]
            raise SwapError(detail=f"warm-up request failed ({response.status_code}): {message}")
        return time.perf_counter() - started


# --------------------------------------------------------------------------- control socket


def socket_path(settings: Settings) -> Path:
    return server_settings(settings).control_socket or settings.data_dir / "run" / "engine.sock"


class ControlUnavailable(RuntimeError):
    pass


class ControlServer:
    """The admin socket of a running ``oogiri serve`` (see the module docstring)."""

    def __init__(self, app: Any, path: Path) -> None:
        self.app = app
        self.path = path
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            if await self._alive():
                log.warning("another oogiri process owns %s; no control socket here", self.path)
                return False
            self.path.unlink()
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._handle, path=str(self.path))
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        log.info("engine control socket: %s", self.path)
        return True

    async def _alive(self) -> bool:
        try:
            _reader, writer = await asyncio.open_unix_connection(str(self.path))
        except OSError:
            return False
        writer.close()
        return True

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
            with contextlib.suppress(OSError):
                self.path.unlink()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def send(doc: dict[str, Any]) -> None:
            writer.write(json.dumps(doc, ensure_ascii=False, default=str).encode() + b"\n")

        try:
            line = await reader.readline()
            try:
                request = json.loads(line or b"{}")
            except ValueError:
                request = {}
            op = request.get("op")
            engine = self.app.engine
            engine = getattr(engine, "base_engine", engine)  # under an A/B router (bot/ab.py)
            extra_op = getattr(self.app, "state", {}).get("control_ops", {}).get(op)
            if extra_op is not None:  # ops that plugins add, e.g. the A/B plugin's "ab_sync"
                try:
                    send({"ok": True, "result": await extra_op(request)})
                except Exception as exc:
                    send({"ok": False, "error": f"{op} failed: {exc}"})
            elif op == "status":
                health = await engine.health()
                status = engine.status() if hasattr(engine, "status") else {"engine": engine.name}
                status["health"] = {"ok": health.ok, "model": health.model, "detail": health.detail}
                send({"ok": True, "result": status})
            elif op == "swap":
                if not isinstance(engine, ManagedLMDeploy):
                    send({"ok": False, "error": f"engine {engine.name!r} is not a managed server"})
                else:
                    model = request.get("model")
                    if not isinstance(model, str) or not model:
                        send({"ok": False, "error": "swap needs a model folder"})
                    else:

                        def progress(message: str) -> None:
                            log.info("swap: %s", message)
                            send({"event": "progress", "message": message})

                        try:
                            result = await engine.swap(
                                model, label=request.get("label") or None, progress=progress
                            )
                        except EngineError as exc:
                            send({"ok": False, "error": exc.detail})
                        else:
                            send({"ok": True, "result": result})
            else:
                send({"ok": False, "error": f"unknown op {op!r} (status, swap)"})
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away; a swap it started still completes
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def control_request(
    path: Path,
    request: dict[str, Any],
    on_event: Callable[[dict[str, Any]], None] | None = None,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Send one request to a running ``oogiri serve`` and return its final answer."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise ControlUnavailable(
                f"no running `oogiri serve` is listening on {path} ({exc.strerror})"
            ) from None
        sock.sendall(json.dumps(request).encode() + b"\n")
        with sock.makefile("rb") as stream:
            for raw in stream:
                doc = json.loads(raw)
                if "ok" in doc:
                    return doc
                if on_event is not None:
                    on_event(doc)
    finally:
        sock.close()
    raise ControlUnavailable(f"{path} closed the connection without an answer")


# --------------------------------------------------------------------------- hooks


def make_lmdeploy_engine(settings: Settings) -> Any:
    """``engine.name = "lmdeploy"``: a managed server when ``engine.manage``, else plain HTTP."""
    if server_settings(settings).manage:
        return ManagedLMDeploy(settings)
    return OpenAIHTTPEngine(settings.engine, flavor="lmdeploy")
