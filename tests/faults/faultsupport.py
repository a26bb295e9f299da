"""Helpers of the fault-injection suite: free ports, a bot server in a child process, a throwaway
PostgreSQL cluster to restart, a tmpfs that fills up."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
TESTSERVER = Path(__file__).resolve().parent / "oogiri_testserver.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class BotProcess:
    """``oogiri serve`` (or the test wrapper) in a child process, on 127.0.0.1:<port>."""

    def __init__(self, data_dir: Path, port: int | None = None, **env: str) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "OOGIRI_DATA_DIR": str(data_dir),
            "OOGIRI_ENGINE__NAME": "instant",
            "OOGIRI_PLUGINS": "web,engine_instant",
            "OOGIRI_CHANNELS": "web",
            "OOGIRI_WEB__HOST": "127.0.0.1",
            "OOGIRI_WEB__PORT": str(self.port),
            "OOGIRI_LIMITS__PER_USER_PER_MINUTE": "0",
            "OOGIRI_LIMITS__PER_CHAT_PER_MINUTE": "0",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"server-{self.port}-{int(time.time() * 1000)}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, cli: bool = False, timeout_s: float = 30.0) -> BotProcess:
        """Start it and wait for /livez. ``cli``: the real ``oogiri serve`` instead of the
        wrapper (which can load test-only fault plugins)."""
        argv = (
            [sys.executable, "-m", "bot.cli", "serve"] if cli else [sys.executable, str(TESTSERVER)]
        )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/livez", timeout=1.0).status_code == 200:
                    return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"server did not come up within {timeout_s} s:\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL: no handler, no drain, no flush — what the OOM killer or a power cut does."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout_s: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""


@contextlib.contextmanager
def running(bot: BotProcess, cli: bool = False) -> Iterator[BotProcess]:
    bot.start(cli=cli)
    try:
        yield bot
    finally:
        bot.stop()


# --------------------------------------------------------------------------- throwaway servers


def pg_bindir() -> Path | None:
    """The newest PostgreSQL server binaries: Debian's /usr/lib/postgresql/<v>/bin, else PATH."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class ThrowawayPostgres:
    """A PostgreSQL cluster of its own (initdb into a temp folder, a free loopback port), so a
    test may restart or kill it without touching the machine's server or anyone using it.

    PostgreSQL refuses to run as root; as root, every server command runs as the ``postgres``
    user (``runuser``), which then owns the folder. ``start``/``restart``/``stop`` act on THIS
    cluster only (``pg_ctl -D <its folder>``).
    """

    def __init__(self, run_as: str = "postgres") -> None:
        bindir = pg_bindir()
        if bindir is None:
            raise FileNotFoundError("no PostgreSQL server binaries (initdb, pg_ctl)")
        self.bindir = bindir
        self.port = free_port()
        # Not under pytest's tmp_path: that is 0700 root, and the server user must reach it.
        self.root = Path(tempfile.mkdtemp(prefix="oogiri-pg-"))
        self.data = self.root / "data"
        self.log_path = self.root / "server.log"
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam(run_as)
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self.as_user = ["runuser", "-u", run_as, "--"]

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the ``postgres`` database (trust auth on loopback)."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.as_user, *argv], capture_output=True, text=True, timeout=timeout_s, check=False
        )

    def _pg_ctl(self, action: str, *extra: str) -> subprocess.CompletedProcess[str]:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        return self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log_path),
            "-o", options, "-w", "-t", "60", action, *extra,
        )  # fmt: skip

    def start(self) -> ThrowawayPostgres:
        if not self.data.exists():
            done = self._run(
                str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres",
                "--auth=trust", "-E", "UTF8", "--no-sync", "--locale=C",
            )  # fmt: skip
            if done.returncode != 0:
                raise RuntimeError(f"initdb failed: {done.stderr.strip()[-2000:]}")
        done = self._pg_ctl("start")
        if done.returncode != 0:
            raise RuntimeError(f"could not start PostgreSQL: {done.stderr.strip()}\n{self.log()}")
        return self

    def restart(self) -> subprocess.CompletedProcess[str]:
        """A fast restart (connections dropped), as an operator's restart would do."""
        return self._pg_ctl("restart", "-m", "fast")

    def ready(self, timeout_s: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            probe = [str(self.bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-q"]
            if subprocess.run(probe, check=False).returncode == 0:
                return True
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        """Stop it (immediately: nothing in it is worth a checkpoint) and delete its folder."""
        if self.data.exists():
            self._pg_ctl("stop", "-m", "immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


# --------------------------------------------------------------------------- a small full disk


@contextlib.contextmanager
def tiny_tmpfs(path: Path, size: str = "256k") -> Iterator[Path]:
    """Mount a tmpfs of ``size`` on ``path`` (root only); raises PermissionError where refused."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise PermissionError(done.stderr.strip() or "mount refused")
    try:
        yield path
    finally:
        for _ in range(20):
            if subprocess.run(["umount", str(path)], check=False).returncode == 0:
                break
            time.sleep(0.1)
