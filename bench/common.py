"""What every benchmark shares: load generation, one percentile definition, result writing.

Run benchmarks as modules from the repository root (``python -m bench.serve …``); nothing here
patches ``sys.path``.

* **Percentiles** — one definition for every figure in docs/benchmarks.md: linear interpolation
  between the two nearest ranks (Hyndman & Fan type 7; ``numpy.percentile``'s default and
  ``statistics.quantiles(method="inclusive")``). p95s from different benches are comparable.
* **Load** — ``closed_loop`` keeps N requests in flight (throughput at a fixed concurrency);
  ``open_loop`` starts requests at Poisson arrival times whatever the server does (what users
  do: latency at a given arrival rate, the basis of goodput); ``at_offsets`` is its clock, also
  for paced streams (``i / rate``).
* **Workloads** — ``zipf_indices``: which picture each request sends when popularity follows a
  Zipf law (rank k drawn with probability ∝ 1/k^s).
* **Pictures** — ``source_photos``/``photo_jpegs``: scikit-image's real photos (or a copy of them),
  so every bench sends the same kind of upload.
* **Results** — ``write_json``/``append_jsonl``, ``markdown_table``; ``write_section`` keeps
  docs/benchmarks.md as sections owned by individual benchmarks (between ``<!-- bench:KEY -->``
  markers); ``machine``/``utc_now``/``git_commit``/``rusage_self`` for each result's header.
* **Statistics** — ``share_ci`` (Wilson interval, from ``scipy.stats``) for shares such as
  "answered within 2 s".
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import os
import platform
import random
import re
import resource
import socket
import statistics
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
HEADER = (
    "# Benchmarks\n\nMeasured figures only; each section is written by the benchmark named in it.\n"
)
#: scikit-image's real photos (shipped inside its wheel): the pictures every bench sends.
PHOTOS = ("chelsea.png", "astronaut.png", "coffee.png", "rocket.jpg", "motorcycle_left.png")
#: A bot under load from loopback: every simulated user comes from 127.0.0.1, so the web
#: channel's per-network limits (issue 21) would measure themselves, not the bot.
LOOPBACK_WEB_ENV = {
    "OOGIRI_WEB__UPLOADS_PER_IP_PER_MINUTE": "0",
    "OOGIRI_WEB__VOTES_PER_IP_PER_MINUTE": "0",
    "OOGIRI_WEB__NEW_SESSIONS_PER_IP_PER_HOUR": "0",
    "OOGIRI_WEB__INFLIGHT_UPLOADS_PER_IP": "0",
    "OOGIRI_WEB__MAX_INFLIGHT_UPLOADS": "100000",
    "OOGIRI_WEB__MAX_CONNECTIONS": "100000",
    "OOGIRI_WEB__MAX_CONNECTIONS_PER_IP": "100000",
}


# --------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-quantile (0 ≤ q ≤ 1), linear between closest ranks (numpy's default); None if empty."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be within [0, 1], got {q}")
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo = math.floor(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def share_ci(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float] | None:
    """Wilson interval of a share (scipy.stats.binomtest); None when n is 0."""
    if n <= 0:
        return None
    from scipy.stats import binomtest

    ci = binomtest(successes, n).proportion_ci(confidence_level=confidence, method="wilson")
    return (float(ci.low), float(ci.high))


def _r(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def latency_summary(
    latencies: Sequence[float], slo_s: float | None = None, *, unit: str = "s", spread: bool = False
) -> dict[str, Any]:
    """p50/p95/p99 (the one definition above) in seconds or ``unit="ms"``; ``spread`` adds max
    and mean; given an SLO (seconds), the share answered within it and its Wilson interval."""
    scale, digits = (1000.0, 1) if unit == "ms" else (1.0, 3)

    def r(value: float | None) -> float | None:
        return None if value is None else round(value * scale, digits)

    out: dict[str, Any] = {"n": len(latencies)}
    for q in (50, 95, 99):
        out[f"p{q}_{unit}"] = r(percentile(latencies, q / 100))
    if spread:
        out[f"max_{unit}"] = r(max(latencies, default=None))
        out[f"mean_{unit}"] = r(statistics.fmean(latencies)) if latencies else None
    if slo_s is not None:
        within = sum(1 for v in latencies if v <= slo_s)
        out["within_slo"] = _r(within / len(latencies)) if latencies else None
        ci = share_ci(within, len(latencies))
        out["within_slo_ci"] = [_r(ci[0]), _r(ci[1])] if ci else None
    return out


# --------------------------------------------------------------------------- load generation


@dataclass
class Sample:
    """One request: when it started and ended (loop clock), whether it succeeded, and why not."""

    start: float
    end: float
    ok: bool
    error: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def latency(self) -> float:
        return self.end - self.start


#: A request function: given the request's index, do it and return its Sample.
OneRequest = Callable[[int], Awaitable[Sample]]


class Failed(Exception):
    """A request answered, but not as asked: its Sample's error is this message (a status)."""


async def timed(call: Callable[[], Awaitable[dict[str, int] | None]]) -> Sample:
    """Run ``call`` and turn its outcome into a Sample: what it returns are the token counts; an
    exception is a failure named by ``Failed``'s message or else its type (never raised on)."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    try:
        tokens = await call() or {}
    except Failed as exc:
        return Sample(t0, loop.time(), False, error=str(exc))
    except Exception as exc:  # the bench counts failures; it never stops on one
        return Sample(t0, loop.time(), False, error=type(exc).__name__)
    return Sample(t0, loop.time(), True, **tokens)


async def closed_loop(
    one: OneRequest, inflight: int, warmup_s: float, measure_s: float
) -> tuple[list[Sample], float, float]:
    """Keep ``inflight`` requests going; return (samples, window start, window end).

    A sample counts for the window when it *ends* inside it (throughput = ok / measure_s).
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    w0, w1 = start + warmup_s, start + warmup_s + measure_s
    samples: list[Sample] = []
    counter = iter(range(10**12))

    async def worker() -> None:
        while loop.time() < w1:
            samples.append(await one(next(counter)))

    tasks = [asyncio.create_task(worker()) for _ in range(inflight)]
    try:
        await asyncio.sleep(max(0.0, w1 - loop.time()))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return [s for s in samples if w0 <= s.end <= w1], w0, w1


async def at_offsets(offsets: Sequence[float], t0: float | None = None) -> AsyncIterator[int]:
    """Yield each offset's index when it comes (seconds after ``t0``, the loop clock; default
    now) whatever the server does: the clock of every open loop (Poisson or paced)."""
    loop = asyncio.get_running_loop()
    t0 = loop.time() if t0 is None else t0
    for i, offset in enumerate(offsets):
        delay = t0 + offset - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        yield i


def poisson_arrivals(rate: float, duration_s: float, seed: int = 0) -> list[float]:
    """Arrival offsets (s) of a Poisson process of ``rate`` per second over ``duration_s``."""
    if rate <= 0 or duration_s <= 0:
        raise ValueError("rate and duration_s must be > 0")
    rng = random.Random(seed)
    t, out = 0.0, []
    while True:
        t += rng.expovariate(rate)
        if t >= duration_s:
            return out
        out.append(t)


async def open_loop(
    one: OneRequest,
    rate: float,
    duration_s: float,
    *,
    warmup_s: float = 0.0,
    seed: int = 0,
    drain_s: float = 120.0,
) -> tuple[list[Sample], float]:
    """Start requests at Poisson times for ``warmup_s + duration_s``, whatever the server does.

    Returns the samples of requests that *arrived* after the warm-up (late answers included:
    an open loop must not hide its slowest requests) and the achieved arrival rate. Requests
    still unanswered ``drain_s`` after the last arrival are cancelled and count as failures
    with error "drain timeout".
    """
    loop = asyncio.get_running_loop()
    offsets = poisson_arrivals(rate, warmup_s + duration_s, seed)
    t0 = loop.time()
    tasks: list[tuple[float, asyncio.Task[Sample]]] = []
    async for i in at_offsets(offsets, t0):
        tasks.append((offsets[i], asyncio.create_task(one(i))))
    measured = [(o, t) for o, t in tasks if o >= warmup_s]
    done: set[asyncio.Task[Sample]] = set()
    if tasks:
        done, pending = await asyncio.wait([t for _, t in tasks], timeout=drain_s)
        for task in pending:
            task.cancel()
    samples: list[Sample] = []
    for offset, task in measured:
        if task in done and not task.cancelled() and task.exception() is None:
            samples.append(task.result())
        else:
            samples.append(Sample(t0 + offset, loop.time(), False, error="drain timeout"))
    return samples, len(measured) / duration_s


def zipf_indices(n_requests: int, n_items: int, s: float, seed: int = 0) -> list[int]:
    """Item index of each request when popularity is Zipf: P(rank k) ∝ 1 / k**s, k = 1…n_items.

    s = 0 is uniform; s ≈ 1 is the classic web/meme heavy tail (the top picture gets about
    1/H(n) of the traffic: 13 % of 1,000 pictures at s = 1). Index 0 is the most popular.
    """
    if n_items < 1:
        raise ValueError("n_items must be >= 1")
    if s < 0:
        raise ValueError("s must be >= 0")
    rng = random.Random(seed)
    weights = [1.0 / (k**s) for k in range(1, n_items + 1)]
    return rng.choices(range(n_items), weights=weights, k=n_requests)


class Sampler:
    """Calls ``read`` every ``every_s`` seconds (in a thread: a read may block, e.g. nvidia-smi)
    while started and keeps (loop time, value); a read that returns None or fails is skipped."""

    def __init__(self, read: Callable[[], Any], every_s: float) -> None:
        self.read = read
        self.every_s = every_s
        self.samples: list[tuple[float, Any]] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            with contextlib.suppress(Exception):
                value = await asyncio.to_thread(self.read)
                if value is not None:
                    self.samples.append((loop.time(), value))
            await asyncio.sleep(self.every_s)

    def start(self) -> Sampler:
        self._task = asyncio.create_task(self._run())
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def values(self, start: float = -math.inf, end: float = math.inf) -> list[Any]:
        """The values sampled between ``start`` and ``end`` (loop time)."""
        return [v for t, v in self.samples if start <= t <= end]


# --------------------------------------------------------------------------- pictures


def skimage_photos() -> Path:
    """scikit-image's data folder (its real photos ship inside the wheel)."""
    import skimage

    return Path(skimage.__file__).parent / "data"


def source_photos(folder: Path | None = None, names: Sequence[str] | None = PHOTOS) -> list[Any]:
    """RGB PIL images: ``names`` from ``folder`` (default scikit-image's), or with ``names=None``
    every picture in ``folder`` in name order."""
    from PIL import Image

    folder = folder or skimage_photos()
    if names is None:
        suffixes = (".jpg", ".jpeg", ".png", ".webp")
        names = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in suffixes)
    return [Image.open(folder / name).convert("RGB") for name in names]


def jpeg_bytes(img: Any, quality: int = 88) -> bytes:
    """A PIL image as JPEG bytes."""
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def photo_jpegs(
    count: int,
    size: tuple[int, int] = (1155, 866),
    quality: int = 88,
    workers: int = 1,
    photos_dir: Path | None = None,
) -> list[bytes]:
    """``count`` distinct JPEGs from scikit-image's real photos (one pixel signs each copy, so no
    two are equal: no cache or dedupe can serve one for another). ``workers`` threads encode
    (Pillow releases the GIL while it does). ``photos_dir``: the same photos copied elsewhere
    (the device has no scikit-image; bench/device_prep.sh copies them to .device/photos)."""
    from PIL import Image

    scaled = [im.resize(size, Image.Resampling.BICUBIC) for im in source_photos(photos_dir)]

    def one(i: int) -> bytes:
        src = scaled[i % len(scaled)].copy()
        src.putpixel(
            (i % size[0], (i // size[0]) % size[1]), (i % 256, (i * 7) % 256, (i * 13) % 256)
        )
        return jpeg_bytes(src, quality)

    if workers <= 1:
        return [one(i) for i in range(count)]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, range(count)))


def chat_body(
    model: str, jpeg: bytes, mdp: int, max_tokens: int, prompt: str | None = None, **extra: Any
) -> dict[str, Any]:
    """A chat request as LMDeploy's api_server takes it: one picture (with InternVL's
    ``max_dynamic_patch``) and the prompt (the bot's by default); ``extra`` adds fields."""
    from bot.engines.openai_http import to_data_url
    from bot.settings import DEFAULT_PROMPT

    picture = {"url": to_data_url(jpeg), "max_dynamic_patch": mdp}
    content = [
        {"type": "image_url", "image_url": picture},
        {"type": "text", "text": prompt or DEFAULT_PROMPT},
    ]
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0.8,
        "top_p": 0.9,
        **extra,
    }


# --------------------------------------------------------------------------- results


def machine(cpu_model: bool = False) -> str:
    """'x86_64, 2 cores, Python 3.11.7'; ``cpu_model``: the CPU's name and the OS instead."""
    cpu = platform.machine()
    if cpu_model:
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    text = f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"
    return f"{text}, {platform.system()}" if cpu_model else text


def utc_now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def git_commit() -> str | None:
    """The tree's short commit; the device gets a copy without .git, so OOGIRI_COMMIT there."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        )  # fmt: skip
        if done.stdout.strip():
            return done.stdout.strip()
    return os.environ.get("OOGIRI_COMMIT")


def rusage_self() -> dict[str, float]:
    """This process's peak RSS (MB) and CPU seconds so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
    }


def free_port() -> int:
    """A TCP port nothing listens on at 127.0.0.1 (right now)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_json(path: Path, doc: Any, indent: int = 2) -> Path:
    """Write results as indented JSON (folders made as needed); returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(doc, indent=indent, ensure_ascii=False, default=str)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def append_jsonl(path: Path, row: Any) -> None:
    """Append one JSON line: a run cut short keeps what it finished."""
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def fmt(value: Any, digits: int = 2) -> str:
    """A table cell: '–' for None, fixed digits for floats, thousands separators for ints."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def tally(counts: dict[str, int], item: str = "{k}: {v}", empty: str = "") -> str:
    """Counts on one line in key order, 'a: 2, b: 1'; ``item`` spells one (``{k}``, ``{v}``)."""
    return ", ".join(item.format(k=k, v=v) for k, v in sorted(counts.items())) or empty


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; cells go through ``fmt`` unless already strings."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in row) + " |")
    return "\n".join(lines)


def write_section(key: str, title: str, body: str, doc: Path = DOC) -> None:
    """Replace (or append) the section ``key`` of docs/benchmarks.md; other sections stay."""
    text = doc.read_text(encoding="utf-8") if doc.exists() else HEADER
    block = f"<!-- bench:{key} -->\n## {title}\n\n{body.strip()}\n<!-- /bench:{key} -->"
    pattern = re.compile(
        rf"<!-- bench:{re.escape(key)} -->.*?<!-- /bench:{re.escape(key)} -->", re.S
    )
    text = (
        pattern.sub(lambda _m: block, text)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + block + "\n"
    )
    doc.write_text(text, encoding="utf-8")
