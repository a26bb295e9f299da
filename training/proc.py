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
LEFTOVER_OUTPUT_S = 2.0  # output still read after the command ends, before its leftovers end


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
    SIGKILL after 10 s; so does whatever the command left running in it when it ended.
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

    async def finish() -> int:
        reader = asyncio.create_task(pump())
        try:
            # proc.wait() also waits for the end of output, which a leftover child may hold
            while proc.returncode is None and not reader.done():
                await asyncio.wait({reader}, timeout=0.1)
            if reader.done():
                await proc.wait()  # the output ended first: the command still runs its course
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(reader), LEFTOVER_OUTPUT_S)
            # The command has ended; what it started may not have (torchrun's workers when
            # torchrun itself was killed). Their output is read for a moment, then they end too:
            # they would hold the GPUs, and the step's end of output, for ever.
            await _end_group(proc.pid, reader)
            await reader
            return await proc.wait()
        finally:
            if not reader.done():
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader

    try:
        return await asyncio.wait_for(finish(), timeout_s)
    except TimeoutError:
        _kill_group(proc)
        await _reap(proc)
        raise StepTimeout(f"{Path(str(cmd[0])).name} ran longer than {timeout_s:.0f} s") from None
    except BaseException:
        _kill_group(proc)
        await _reap(proc)
        raise


async def _end_group(pgid: int, reader: asyncio.Task[None], grace_s: float = 10.0) -> None:
    """SIGTERM to what is left of the process group, SIGKILL after ``grace_s``."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return  # nothing left
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace_s
    while loop.time() < deadline:
        await asyncio.sleep(0.05)
        if reader.done() and not _group_alive(pgid):
            return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


async def _reap(proc: asyncio.subprocess.Process) -> None:
    try:
        await asyncio.wait_for(proc.wait(), 10)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
