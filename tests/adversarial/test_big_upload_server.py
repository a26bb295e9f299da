"""100 MB uploads against the real server (uvicorn in a child process, as ``oogiri serve`` runs).

Declared: the 413 arrives before the client has sent a single body byte, and the connection is
closed, so at most what the kernel's socket buffers took is ever transmitted. Chunked (no length):
the server stops reading at the limit. Either way the server's peak RSS (its own VmHWM, reset
right before the upload) stays far below the upload's size, and it keeps serving.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
from faultsupport import BotProcess
from hostile_cases import BOUNDARY, STREAM_HEAD, MiB, fmt_bytes
from relreport import Reliability, peak_mb, reset_peak, rss_mb

from bot.models import message

TOTAL = 100 * MiB
CHUNK = 256 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    bot = BotProcess(tmp_path_factory.mktemp("bigupload") / "data").start()
    yield bot
    bot.stop()


def _head(port: int, extra: str) -> bytes:
    return (
        f"POST /api/jokes HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept-Language: en\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n{extra}\r\n"
    ).encode()


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    headers = {
        k.strip().lower(): v.strip()
        for k, v in (line.split(b":", 1) for line in head.split(b"\r\n")[1:] if b":" in line)
    }
    body = await reader.readexactly(int(headers[b"content-length"]))
    return status, json.loads(body)


async def _pump(writer: asyncio.StreamWriter, chunked: bool, sent: list[int]) -> None:
    """Send up to 100 MB of body until the server hangs up."""
    zeros = bytes(CHUNK)
    try:
        first = STREAM_HEAD
        writer.write(b"%x\r\n%s\r\n" % (len(first), first) if chunked else first)
        sent[0] += len(first)
        while sent[0] < TOTAL:
            writer.write(b"%x\r\n%s\r\n" % (CHUNK, zeros) if chunked else zeros)
            await writer.drain()
            sent[0] += CHUNK
    except (ConnectionError, OSError):
        return


@pytest.mark.parametrize("chunked", [False, True], ids=["declared-length", "chunked"])
async def test_100mb_upload_to_the_real_server(
    server: BotProcess, chunked: bool, reliability: Reliability
) -> None:
    name = "server-100mb-" + ("chunked" if chunked else "declared")
    reliability.case(
        "hostile input (web)",
        name,
        "size",
        "100 MB upload to uvicorn in a child process"
        + (", chunked (no Content-Length)" if chunked else ", Content-Length declared"),
        "413 too_large, body not read" + (" past the limit" if chunked else ""),
    )
    base = rss_mb(server.pid)
    assert reset_peak(server.pid) or pytest.skip("cannot reset the server's VmHWM")
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    sent = [0]
    started = asyncio.get_running_loop().time()
    try:
        if chunked:
            writer.write(_head(server.port, "Transfer-Encoding: chunked\r\n"))
            pump = asyncio.create_task(_pump(writer, True, sent))
            status, body = await asyncio.wait_for(_read_response(reader), 30)
            sent_at_answer = sent[0]
            await asyncio.wait_for(pump, 30)
        else:
            writer.write(_head(server.port, f"Content-Length: {TOTAL}\r\n"))
            await writer.drain()
            # Not one body byte sent yet: the answer must come anyway.
            status, body = await asyncio.wait_for(_read_response(reader), 10)
            sent_at_answer = sent[0]
            await asyncio.wait_for(_pump(writer, False, sent), 30)
    finally:
        writer.close()
    seconds = asyncio.get_running_loop().time() - started
    peak = reliability.child_peak(server.pid, base)
    assert reliability.record is not None
    reliability.record.seconds = seconds
    reliability.observe(
        f"{status} {body.get('error')}",
        body_bytes_sent_before_answer=sent_at_answer,
        body_bytes_sent_in_all=sent[0],
    )
    assert (status, body) == (413, {"error": "too_large", "message": message(
        "too_large", "en", limit_mb=20)})  # fmt: skip
    if chunked:
        assert sent_at_answer <= 20 * MiB + 64 * 1024 + 16 * MiB  # the limit + socket buffers
    else:
        assert sent_at_answer == 0
    assert sent[0] < TOTAL  # the server hung up; the client could not push all 100 MB
    assert peak is not None and base is not None and peak - base < 64, (base, peak)
    assert seconds < 30
    # still serving
    async with httpx.AsyncClient(base_url=server.url) as client:
        ok = await client.post(
            "/api/jokes", files={"image": ("ok.png", fmt_bytes("PNG"), "image/png")}
        )
    assert ok.status_code == 201, ok.text


def test_peak_helpers_work_here() -> None:
    assert peak_mb() is not None and Path("/proc/self/clear_refs").exists()
