"""Running the external training commands: output streamed line by line to a log and a callback,
a timeout, and the whole process group killed when the run is cancelled or times out."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TextIO

LineSink = Callable[[str], None]


class StepTimeout(RuntimeError):
    pass


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)


async def run_command(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    log: TextIO | None = None,
    on_line: LineSink | None = None,
    timeout_s: float | None = None,
) -> int:
    """Run ``cmd``; every output line (stdout and stderr merged) goes to ``log`` and ``on_line``.

    Returns the exit code. On timeout or cancellation the process group gets SIGTERM, then
    SIGKILL after 10 s.
    """
    if log is not None:
        log.write("$ " + " ".join(str(c) for c in cmd) + "\n")
        log.flush()
    proc = await asyncio.create_subprocess_exec(
        *[str(c) for c in cmd],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=dict(env) if env is not None else None,
        cwd=str(cwd) if cwd else None,
        start_new_session=True,  # its own process group: torchrun workers die with it
        limit=1 << 20,
    )
    assert proc.stdout is not None

    async def pump() -> None:
        assert proc.stdout is not None
        while True:
            raw = await proc.stdout.readline()
            if not raw:
                break
            # tqdm-style bars end segments with \r: treat each segment as a line
            for part in raw.decode("utf-8", errors="replace").replace("\r", "\n").splitlines():
                if log is not None:
                    log.write(part + "\n")
                if on_line is not None:
                    on_line(part)
            if log is not None:
                log.flush()

    try:
        await asyncio.wait_for(pump(), timeout_s)
        return await proc.wait()
    except TimeoutError:
        _kill_group(proc)
        await _reap(proc)
        raise StepTimeout(f"{Path(str(cmd[0])).name} ran longer than {timeout_s:.0f} s") from None
    except BaseException:
        _kill_group(proc)
        await _reap(proc)
        raise


async def _reap(proc: asyncio.subprocess.Process) -> None:
    try:
        await asyncio.wait_for(proc.wait(), 10)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
