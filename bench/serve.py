"""Serving benchmark: jokes/s and latency through the bot, and straight to LMDeploy's api_server.

Not a test: it measures. A closed loop keeps N requests in flight for ``warmup_s`` + ``measure_s``
seconds per cell; requests that finish inside the measuring window count. Every answer is forced
to ``max_new_tokens`` tokens (``ignore_eos`` + ``min_new_tokens``, both accepted by LMDeploy's
chat endpoint), so cells differ only in what is measured. Paths (one per cell):

* ``raw``: pre-built request bodies POSTed by a bare httpx client: the server alone;
* ``engine``: ``OpenAIHTTPEngine.generate`` (pre-sizing, data URL, retries, breaker …);
* ``service``: ``JokeService.tell`` — the bot's real path (validation and normalisation of the
  upload, limits, hooks, engine, SQLite store) — in the benchmark's own process;
* ``web``: ``bots`` real ``oogiri serve`` processes (web channel, own SQLite each), the load
  POSTed to their ``/api/jokes`` round-robin — what a web user gets, and how the bot scales past
  one process.

"The seed's way" is ``raw``, one in flight, phone photos sent as they are (no pre-sizing).

A ``--plan FILE`` (JSON, the ``Plan`` model; the device's are bench/plans/serve-*.json) names what
runs: several server configurations and cell sweeps in one process — the device machine stays
warm only between calls, so one command should do everything. A config's ``launch`` (the
``Launch`` model) starts api_servers on consecutive ports with the managed mode's own code (logs
under OUT/logs; ``--launch MODEL`` overrides the plan's model); a config without one uses its
``base_urls`` or ``--base-url`` (repeatable: the engine round-robins over several)::

    {"model": "/path/model", "warmup_s": 5, "measure_s": 20, "max_new_tokens": 64,
     "configs": [{"name": "OMP=2", "launch": {"servers": 1, "server_threads": 2},
                  "cells": [{"path": ["raw", "service"], "inflight": [1, 64], "mdp": 6}]}]}

Results: OUT/serve-results.jsonl (one line per cell, written as it finishes), OUT/serve-results.json
and OUT/serve.md; ``--write-docs`` puts the table in docs/benchmarks.md; ``--render RESULTS.json``
rebuilds the markdown from saved results.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import itertools
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

from bench.common import (
    LOOPBACK_WEB_ENV,
    PHOTOS,
    ROOT,
    Failed,
    Sampler,
    append_jsonl,
    chat_body,
    closed_loop,
    fmt,
    git_commit,
    jpeg_bytes,
    latency_summary,
    source_photos,
    timed,
    utc_now,
    write_json,
    write_section,
)
from bot.engines import tiling
from bot.engines.lmdeploy_server import LMDeployEngineSettings as EngineSettings
from bot.engines.lmdeploy_server import ServerProcess, build_env, launcher
from bot.engines.openai_http import OpenAIHTTPEngine, body_error
from bot.models import GenerationParams, NormalizedImage
from bot.settings import DEFAULT_PROMPT, Settings

SERVED_NAME = "oogiri-bench"
GPU_QUERY = "--query-gpu=memory.used,utilization.gpu"
#: A request of one cell, given its index: the token counts it reports (see ``common.timed``).
Call = Callable[[int], Awaitable[dict[str, int]]]
Cleanup = list[Callable[[], Awaitable[Any]]]


# --------------------------------------------------------------------------- configuration


class Strict(BaseModel):
    """Plan entries refuse unknown keys: a typo must not silently run the default."""

    model_config = ConfigDict(extra="forbid")


class Cell(Strict):
    path: Literal["raw", "engine", "service", "web"]
    inflight: int = Field(ge=1)
    mdp: int = Field(ge=1)
    presize: bool = True
    baseline: bool = False
    warmup_s: float | None = None
    measure_s: float | None = None
    bots: int = Field(1, ge=1, description='path "web": this many `oogiri serve` processes')


#: Launch keys that are the managed server's own settings (validated by EngineSettings).
SERVER_FIELDS = ("backend", "tp", "session_len", "cache_max_entry_count", "max_batch_size",
                 "max_prefill_token_num", "api_key", "extra_args", "server_command")  # fmt: skip


class Launch(Strict):
    """api_servers started with the managed mode's code; SERVER_FIELDS mean what they mean in
    the engine settings (and are checked by them), the rest is the bench's own."""

    servers: int = Field(1, ge=1)
    server_threads: int | None = Field(2, description="None: leave OMP/MKL unset (LMDeploy's)")
    backend: str = "pytorch"
    tp: int = 1
    session_len: int = 8192
    cache_max_entry_count: float = 0.2
    max_batch_size: int = 256
    max_prefill_token_num: int | None = None  # None: LMDeploy's own default (plans predate ours)
    api_key: str | None = None
    extra_args: list[str] = Field(default_factory=list)
    server_command: list[str] = Field(default_factory=list)
    gpus: list[int] = Field(default_factory=list, description="server i on gpus[i % len]")
    proxy: bool = Field(False, description="servers register with `lmdeploy serve proxy`")

    def engine_settings(self, startup_timeout_s: float) -> EngineSettings:
        own = {"server_threads": self.server_threads or 1, "startup_timeout_s": startup_timeout_s}
        return EngineSettings.model_validate({**self.model_dump(include=set(SERVER_FIELDS)), **own})


class CellSpec(Strict):
    """Cells as a plan writes them: each of path/inflight/mdp/presize/bots a value or a list."""

    path: str | list[str] = "raw"
    inflight: int | list[int] = 1
    mdp: int | list[int] = 6
    presize: bool | list[bool] = True
    bots: int | list[int] = 1
    baseline: bool = False
    warmup_s: float | None = None
    measure_s: float | None = None

    def cells(self) -> list[Cell]:
        """Every combination of the swept values, in plan order."""
        swept = ("path", "inflight", "mdp", "presize", "bots")
        values = [v if isinstance(v, list) else [v] for v in (getattr(self, k) for k in swept)]
        fixed = self.model_dump(exclude=set(swept))
        return [
            Cell(**fixed, **dict(zip(swept, c, strict=True))) for c in itertools.product(*values)
        ]


class Config(Strict):
    """One server configuration and its cells (a plan's sweeps, expanded on validation)."""

    name: str
    cells: list[Cell]
    launch: Launch | None = None
    base_urls: list[str] = Field(default_factory=list)
    api_key: str | None = None
    model: str | None = Field(None, description="this config's own model folder")

    @field_validator("cells", mode="before")
    @classmethod
    def _expand(cls, specs: list[Any]) -> list[Any]:
        return [c for s in specs for c in ([s] if isinstance(s, Cell) else CellSpec(**s).cells())]


class Plan(Strict):
    """A plan file (see the module's docstring)."""

    model: str | None = None
    warmup_s: float | None = None
    measure_s: float | None = None
    max_new_tokens: int | None = None
    configs: list[Config]
    port: int | None = None
    deadline_s: float | None = None
    about: str | list[str] | None = Field(None, alias="_about", description="a note for readers")


# --------------------------------------------------------------------------- pictures and GPU


def phone_photos(images_dir: Path | None, phone_size: bool, count: int = 5) -> list[bytes]:
    """Distinct photos as JPEG bytes; ``phone_size`` scales them to 4032×3024 (or portrait)."""
    from PIL import Image

    try:
        sources = source_photos(images_dir, names=None if images_dir else PHOTOS)
    except (ImportError, OSError):
        sources = []
    if not sources:  # no photos on this machine: drawn pictures of the same sizes
        sources = [Image.new("RGB", (640, 480), (40 * i, 120, 200 - 30 * i)) for i in range(count)]
    out = []
    for i, img in enumerate(sources[: max(count, 1)]):
        if phone_size:
            size = (4032, 3024) if img.width >= img.height else (3024, 4032)
            img = img.resize(size, Image.Resampling.BICUBIC)
        img.putpixel((i, i), (i, 255 - i, 7 * i % 256))  # distinct bytes per picture
        out.append(jpeg_bytes(img, quality=90))
    return out


def as_normalized(jpeg: bytes) -> NormalizedImage:
    from PIL import Image

    with Image.open(io.BytesIO(jpeg)) as im:
        width, height = im.size
    return NormalizedImage.of(jpeg, width, height, "JPEG")


def _stdout(cmd: list[str], timeout_s: float) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=True).stdout


def gpu_now() -> tuple[float, float] | None:
    """nvidia-smi's memory used (MiB, all GPUs) and mean utilisation (%); None without a GPU."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    out = _stdout([exe, GPU_QUERY, "--format=csv,noheader,nounits"], 5)
    rows = [line.split(",") for line in out.strip().splitlines() if line.strip()]
    if not rows:
        return None
    return sum(float(r[0]) for r in rows), sum(float(r[1]) for r in rows) / len(rows)


def device_info() -> dict[str, Any]:
    """The results' header: machine, date, commit, GPUs and LMDeploy's version."""
    info: dict[str, Any] = {
        "host": platform.node(), "python": platform.python_version(), "cpus": os.cpu_count(),
        "date": utc_now(), "commit": git_commit(),
    }  # fmt: skip
    exe = shutil.which("nvidia-smi")
    if exe:
        with contextlib.suppress(Exception):
            query = [exe, "--query-gpu=name,memory.total", "--format=csv,noheader"]
            info["gpu"] = _stdout(query, 10).strip().splitlines()
    with contextlib.suppress(Exception):
        version = [sys.executable, "-c", "import lmdeploy; print(lmdeploy.__version__)"]
        info["lmdeploy"] = _stdout(version, 120).strip()
    return info


# --------------------------------------------------------------------------- one cell


class Bench:
    def __init__(self, args: argparse.Namespace, photos: list[bytes], out: Path) -> None:
        self.args = args
        self.photos = photos
        self.out = out
        self.prompt = DEFAULT_PROMPT
        self._bodies: dict[tuple[int, bool, int], bytes] = {}

    def engine_settings(self, urls: list[str], cell: Cell, api_key: str | None) -> EngineSettings:
        n = self.args.max_new_tokens
        return EngineSettings(
            name="lmdeploy", base_urls=urls, api_key=api_key,
            served_model_name=self.args.model_name, max_new_tokens=n, max_dynamic_patch=cell.mdp,
            presize_to_tiles=cell.presize, max_in_flight=max(cell.inflight, 1) + 8, retries=0,
            breaker_failures=1_000_000, timeout_s=self.args.request_timeout_s,
            request_extra={"ignore_eos": True, "min_new_tokens": n},
        )  # fmt: skip

    def raw_body(self, index: int, cell: Cell) -> bytes:
        key = (index, cell.presize, cell.mdp)
        if key not in self._bodies:
            image = as_normalized(self.photos[index])
            if cell.presize:
                image = tiling.presize(image, cell.mdp)
            n = self.args.max_new_tokens
            body = chat_body(
                self.args.model_name, image.jpeg, cell.mdp, n, self.prompt,
                ignore_eos=True, min_new_tokens=n,
            )  # fmt: skip
            self._bodies[key] = json.dumps(body).encode()
        return self._bodies[key]

    def client(self, cell: Cell, cleanup: Cleanup) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=cell.inflight + 8)
        client = httpx.AsyncClient(
            timeout=self.args.request_timeout_s, limits=limits, trust_env=False
        )
        cleanup.append(client.aclose)
        return client

    async def caller(
        self, cell: Cell, urls: list[str], api_key: str | None, cleanup: Cleanup
    ) -> Call:
        """The cell's path, ready to run: one request per call (what it needs closed after goes
        into ``cleanup``)."""
        photos = self.photos
        if cell.path == "raw":
            client = self.client(cell, cleanup)
            headers = {"content-type": "application/json"}
            if api_key:
                headers["authorization"] = f"Bearer {api_key}"
            for i in range(len(photos)):  # build bodies before the clock starts
                await asyncio.to_thread(self.raw_body, i, cell)

            async def raw(i: int) -> dict[str, int]:
                body = self.raw_body(i % len(photos), cell)
                url = urls[i % len(urls)] + "/v1/chat/completions"
                r = await client.post(url, content=body, headers=headers)
                data = r.json()
                if r.status_code != 200 or body_error(data):
                    raise Failed(str(r.status_code))
                usage = data.get("usage") or {}
                return {k: int(usage.get(k) or 0) for k in ("prompt_tokens", "completion_tokens")}

            return raw
        if cell.path == "engine":
            engine = OpenAIHTTPEngine(self.engine_settings(urls, cell, api_key))
            cleanup.append(engine.close)
            images = [as_normalized(p) for p in photos]
            params = GenerationParams(
                max_new_tokens=self.args.max_new_tokens, max_dynamic_patch=cell.mdp
            )

            async def through_engine(i: int) -> dict[str, int]:
                gen = await engine.generate(images[i % len(images)], self.prompt, params)
                u = gen.usage
                return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens}

            return through_engine
        if cell.path == "service":
            app, tap = await self.make_app(urls, cell, api_key)
            cleanup.append(app.close)
            from bot.models import JokeRequest

            async def service(i: int) -> dict[str, int]:
                request = JokeRequest(image_bytes=photos[i % len(photos)], channel="bench",
                                      user_id=f"bench:{i}", filename="photo.jpg")  # fmt: skip
                try:
                    await app.service.tell(request)
                finally:
                    u = tap.pop(asyncio.current_task(), None)
                return {"prompt_tokens": u.prompt_tokens if u else 0,
                        "completion_tokens": u.completion_tokens if u else 0}  # fmt: skip

            return service
        if cell.path == "web":
            bots = await BotProcesses.launch(
                self.engine_settings(urls, cell, api_key),
                self.out / "bots" / f"{cell.path}-{cell.inflight}-{cell.mdp}-{time.time_ns()}",
                port=self.args.port + 200, count=cell.bots,
                startup_timeout_s=self.args.startup_timeout_s,
                limits={"max_concurrency": cell.inflight + 8},
            )  # fmt: skip
            cleanup.append(bots.stop)
            client = self.client(cell, cleanup)

            async def web(i: int) -> dict[str, int]:
                url = bots.urls[i % len(bots.urls)] + "/api/jokes"
                files = {"image": ("photo.jpg", photos[i % len(photos)], "image/jpeg")}
                r = await client.post(url, files=files)
                if r.status_code != 201:
                    raise Failed(str(r.status_code))
                # the web API does not report token counts; the engine paths measure them
                return {"completion_tokens": self.args.max_new_tokens}

            return web
        raise ValueError(f"unknown path {cell.path!r}")

    async def run_cell(
        self, config: Config, cell: Cell, urls: list[str], api_key: str | None
    ) -> dict[str, Any]:
        warmup = cell.warmup_s if cell.warmup_s is not None else self.args.warmup_s
        measure = cell.measure_s if cell.measure_s is not None else self.args.measure_s
        cleanup: Cleanup = []
        sampler = Sampler(gpu_now, every_s=1.0)

        async def sample_gpu() -> None:  # only while the window measures
            await asyncio.sleep(warmup)
            sampler.start()
            try:
                await asyncio.sleep(measure)
            finally:
                await sampler.stop()

        try:
            call = await self.caller(cell, urls, api_key, cleanup)
            sampling = asyncio.create_task(sample_gpu())
            try:
                window, _, _ = await closed_loop(
                    lambda i: timed(lambda: call(i)), cell.inflight, warmup, measure
                )
                await sampling
            finally:
                sampling.cancel()
        finally:
            for close in cleanup:
                with contextlib.suppress(Exception):
                    await close()
        ok = [s for s in window if s.ok]
        lat = latency_summary([s.latency for s in ok])
        gpu = sampler.values()
        launch = config.launch
        return {
            "config": config.name,
            "servers": launch.servers if launch else len(urls),
            "gpus": len(set(launch.gpus)) or 1 if launch else None,
            "bots": cell.bots,
            "proxy": bool(launch and launch.proxy),
            "server_threads": launch.server_threads if launch else None,
            **cell.model_dump(),
            "warmup_s": warmup,
            "measure_s": measure,
            "ok": len(ok),
            "errors": dict(Counter(s.error for s in window if not s.ok)),
            "jokes_per_s": round(len(ok) / measure, 3),
            **{k: lat[k] for k in ("p50_s", "p95_s", "p99_s")},
            **{
                k: round(sum(getattr(s, k) for s in ok) / len(ok), 1) if ok else None
                for k in ("prompt_tokens", "completion_tokens")
            },
            "gpu_mem_mib": max((mem for mem, _ in gpu), default=None),
            "gpu_util_pct": round(statistics.fmean(u for _, u in gpu), 1) if gpu else None,
        }

    async def make_app(
        self, urls: list[str], cell: Cell, api_key: str | None
    ) -> tuple[Any, dict[Any, Any]]:
        """The bot in this process (no plugins, no per-user limits, its own SQLite) and the tap
        its engine leaves each request's token usage in."""
        from bot.app import App
        from bot.plugins import make_manager

        settings = Settings(
            _env_file=None,
            data_dir=Path(tempfile.mkdtemp(prefix="oogiri-bench-")),
            plugins=[],
            engine=self.engine_settings(urls, cell, api_key).model_dump(),
            limits={"per_user_per_minute": 0, "per_chat_per_minute": 0,
                    "max_concurrency": cell.inflight, "queue_timeout_s": 3600},
        )  # fmt: skip
        engine = UsageTap(settings)
        app = await App.create(settings, pm=make_manager([]), engine=engine)
        return app, engine.tap


class UsageTap(OpenAIHTTPEngine):
    """The bot's engine, handing each request's token usage back to the task that asked (the
    service's answer does not carry it)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings.engine)
        self.tap: dict[Any, Any] = {}

    async def generate(self, image: NormalizedImage, prompt: str, params: GenerationParams) -> Any:
        gen = await super().generate(image, prompt, params)
        self.tap[asyncio.current_task()] = gen.usage
        return gen


class BotProcesses:
    """``oogiri serve`` processes (web channel) for the ``web`` path: the bot as users reach it.

    One process per ``cell.bots`` (goodput's bot steps start them too), each with its own SQLite
    store (they stand for replicas; on one PostgreSQL they would share it), the engine pointed at
    the cell's servers (or proxy), no per-user limits, and the same engine settings as the
    in-process ``service`` path.
    """

    def __init__(self, procs: list[subprocess.Popen[bytes]], urls: list[str]) -> None:
        self.procs = procs
        self.urls = urls

    @classmethod
    async def launch(
        cls,
        es: EngineSettings,
        root: Path,
        *,
        port: int,
        count: int,
        startup_timeout_s: float,
        limits: dict[str, Any] | None = None,
        env_extra: dict[str, str] | None = None,
    ) -> BotProcesses:
        """Start ``count`` bots on ports port, port+1, …; ``limits`` set ``OOGIRI_LIMITS__*``,
        ``env_extra`` any other setting (``OOGIRI_POOL__ENABLED``…)."""
        engine = {
            "name": "lmdeploy", "manage": "false", "base_urls": json.dumps(list(es.base_urls)),
            "max_new_tokens": es.max_new_tokens, "max_dynamic_patch": es.max_dynamic_patch,
            "presize_to_tiles": str(es.presize_to_tiles).lower(),
            "max_in_flight": es.max_in_flight, "retries": 0,
            "breaker_failures": es.breaker_failures, "timeout_s": es.timeout_s,
            "request_extra": json.dumps(es.request_extra),
        }  # fmt: skip
        named = {"served_model_name": es.served_model_name or None,
                 "api_key": es.api_key.get_secret_value() if es.api_key else None}  # fmt: skip
        procs, urls = [], []
        for i in range(count):
            env = {
                **os.environ,
                "OOGIRI_DATA_DIR": str(root / f"bot-{i}"),
                "OOGIRI_CHANNELS": "web",
                "OOGIRI_WEB__HOST": "127.0.0.1",
                "OOGIRI_WEB__PORT": str(port + i),
                **{f"OOGIRI_ENGINE__{k.upper()}": str(v) for k, v in engine.items()},
                "OOGIRI_LIMITS__PER_USER_PER_MINUTE": "0",
                "OOGIRI_LIMITS__PER_CHAT_PER_MINUTE": "0",
                **LOOPBACK_WEB_ENV,
                **{f"OOGIRI_LIMITS__{k.upper()}": str(v) for k, v in (limits or {}).items()},
                **(env_extra or {}),
                **{f"OOGIRI_ENGINE__{k.upper()}": v for k, v in named.items() if v},
            }
            procs.append(await asyncio.to_thread(cls._spawn, env, root, i))
            urls.append(f"http://127.0.0.1:{port + i}")
        bots = cls(procs, urls)
        try:
            await bots.wait_healthy(startup_timeout_s, root)
        except BaseException:
            await bots.stop()
            raise
        return bots

    @staticmethod
    def _spawn(env: dict[str, str], root: Path, i: int) -> subprocess.Popen[bytes]:
        (root / f"bot-{i}").mkdir(parents=True, exist_ok=True)
        with open(root / f"bot-{i}.log", "ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "bot.cli", "serve"],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT,
            )  # fmt: skip

    async def wait_healthy(self, timeout_s: float, root: Path) -> None:
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(timeout=5.0, trust_env=False) as http:
            for i, url in enumerate(self.urls):
                while True:
                    if self.procs[i].poll() is not None:
                        tail = (root / f"bot-{i}.log").read_text(errors="replace")[-1500:]
                        raise RuntimeError(f"oogiri serve #{i} exited:\n{tail}")
                    with contextlib.suppress(httpx.HTTPError):
                        if (await http.get(url + "/healthz")).status_code == 200:
                            break
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"oogiri serve #{i} not healthy in {timeout_s:.0f} s")
                    await asyncio.sleep(0.3)

    async def stop(self) -> None:
        await asyncio.to_thread(self._stop)

    def _stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 15)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 9)


# --------------------------------------------------------------------------- servers


class Proxy:
    """``lmdeploy serve proxy``: LMDeploy's own router over several api_servers (issue 7)."""

    def __init__(self, settings: EngineSettings, port: int, log_dir: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.command = [
            *launcher(settings), "serve", "proxy", "--server-name", "127.0.0.1",
            "--server-port", str(port), "--routing-strategy", "min_expected_latency",
        ]  # fmt: skip
        self.log_path = log_dir / f"proxy-{port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    async def wait_nodes(self, n: int, timeout_s: float) -> None:
        """Until the proxy lists n healthy nodes (the servers register themselves)."""
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(timeout=5.0, trust_env=False) as http:
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"the proxy exited: {self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    r = await http.get(self.url + "/nodes/status")
                    if r.status_code == 200 and len(r.json()) >= n:
                        return
                await asyncio.sleep(1.0)
        raise TimeoutError(f"the proxy saw fewer than {n} nodes in {timeout_s:.0f} s")

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 15)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)


async def launch_servers(
    launch: Launch, model: Path, port: int, log_dir: Path, startup_timeout_s: float
) -> tuple[list[ServerProcess], Proxy | None]:
    """``launch.servers`` api_servers on port, port+1, … (the proxy on port+100), healthy. The
    environment is read before the first await (goodput sets it per server group)."""
    settings = launch.engine_settings(startup_timeout_s)
    proxy = Proxy(settings, port + 100, log_dir) if launch.proxy else None
    if proxy is not None:
        extra_args = [*launch.extra_args, "--proxy-url", proxy.url]
        settings = settings.model_copy(update={"extra_args": extra_args})
        proxy.start()
    if launch.server_threads is None:  # LMDeploy's defaults: leave OMP/MKL unset
        unset = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
        env = {k: v for k, v in os.environ.items() if k not in unset} | {"PYTHONUNBUFFERED": "1"}
    else:
        env = build_env(settings)
    gpus = launch.gpus

    def env_of(i: int) -> dict[str, str]:
        return {**env, "CUDA_VISIBLE_DEVICES": str(gpus[i % len(gpus)])} if gpus else env

    servers = [
        ServerProcess(settings, model, port + i, SERVED_NAME, f"bench-{i}", log_dir, env=env_of(i))
        for i in range(launch.servers)
    ]
    try:
        for server in servers:
            await server.start()
        await asyncio.gather(*(s.wait_healthy() for s in servers))
        if proxy is not None:
            await proxy.wait_nodes(len(servers), 60)
    except BaseException:
        await asyncio.gather(*(s.stop(grace_s=10) for s in servers), return_exceptions=True)
        if proxy is not None:
            proxy.stop()
        raise
    return servers, proxy


# --------------------------------------------------------------------------- report

COLUMNS = ("config", "servers", "OMP", "path", "in flight", "mdp", "presize", "jokes/s", "p50 s",
           "p95 s", "p99 s", "prompt tok", "GPU MiB", "GPU %", "errors")  # fmt: skip


def failure_summary(exc: BaseException, limit: int = 300) -> str:
    """The first line (what failed) and the log tail's last exception line (why), else its last
    top-level line."""
    lines = [ln for ln in str(exc).splitlines() if ln.strip()] or [repr(exc)]
    head, tail = lines[0], [ln for ln in lines[1:] if not ln[0].isspace()]
    raised = [ln for ln in tail if re.match(r"[\w.]*(Error|Exception)\b", ln)]
    why = (raised or tail or [""])[-1]
    text = f"{head} … {why}" if why and why != head else head
    return text if len(text) <= limit else text[: limit - 1] + "…"


def table_text(text: str, limit: int = 240) -> str:
    """One markdown table cell: one line, no column breaks."""
    flat = " ".join(str(text).split()).replace("|", "\\|")
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def table_row(cells: list[str]) -> str:
    """A markdown table row; an empty cell is one space."""
    return "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"


def render_markdown(doc: dict[str, Any]) -> str:
    meta = doc.get("meta", {})
    gpu = "; ".join(meta.get("gpu") or []) or "no GPU"
    lines = [
        f"Device: {gpu}, {meta.get('cpus')} CPUs · LMDeploy {meta.get('lmdeploy') or '?'} · "
        f"model `{meta.get('model') or '?'}` · {meta.get('max_new_tokens')} output tokens "
        f"(ignore_eos) · bot {meta.get('commit') or '?'} · {meta.get('date')}",
        "",
        "Paths: raw = bare HTTP client to api_server; engine = the bot's LMDeploy engine; "
        "service = the bot's full request path (validation, limits, engine, store). "
        "mdp = max_dynamic_patch (tiles). Closed loop; a cell counts requests finishing in its "
        "measuring window.",
        "",
        table_row(list(COLUMNS)),
        "|" + "---|" * len(COLUMNS),
    ]
    for r in doc.get("rows", []):
        if r.get("skipped"):
            where = [
                str(r[k]) if r.get(k) is not None else "–" for k in ("path", "inflight", "mdp")
            ]
            skipped = f"skipped: {table_text(r['skipped'])}"
            lines.append(table_row([r["config"], "", "", *where, "", skipped, *[""] * 7]))
            continue
        errors = ", ".join(f"{k}×{v}" for k, v in (r.get("errors") or {}).items()) or "0"
        lines.append(table_row([
            r["config"], servers_text(r), str(r["server_threads"] or "default"), path_text(r),
            str(r["inflight"]), str(r["mdp"]), "yes" if r["presize"] else "no",
            f"{r['jokes_per_s']:.2f}", fmt(r["p50_s"]), fmt(r["p95_s"]), fmt(r["p99_s"]),
            fmt(r["prompt_tokens"], 0), fmt(r["gpu_mem_mib"], 0), fmt(r["gpu_util_pct"], 0),
            errors,
        ]))  # fmt: skip
    summary = goals(doc.get("rows", []))
    return "\n".join([*lines, "", *summary] if summary else lines)


def path_text(row: dict[str, Any]) -> str:
    """'web (3 bots)', 'raw (seed)' …"""
    text = str(row["path"]) + (" (seed)" if row.get("baseline") else "")
    if row.get("path") == "web":
        bots = row.get("bots") or 1
        text += f" ({bots} bot{'s' if bots > 1 else ''})"
    return text


def servers_text(row: dict[str, Any]) -> str:
    """'2 on 2 GPUs via proxy' — how the cell's api_servers were laid out."""
    text = str(row["servers"])
    if (row.get("gpus") or 1) > 1:
        text += f" on {row['gpus']} GPUs"
    return text + (" via proxy" if row.get("proxy") else "")


def goals(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's targets at 6 tiles: ≥ 34 jokes/s via the bot, p95 ≤ 2 s, bot ≥ 95% of raw."""
    done = [r for r in rows if not r.get("skipped") and r.get("ok")]
    # the bot: in-process (service) or its real processes over HTTP (web)
    bot = [r for r in done if r["path"] in ("service", "web") and r["mdp"] == 6]
    if not bot:
        return []
    best = max(bot, key=lambda r: r["jokes_per_s"])
    out = [
        f"Best through the bot at 6 tiles: **{best['jokes_per_s']:.1f} jokes/s**, "
        f"p95 {fmt(best['p95_s'])} s ({best['config']}, {path_text(best)}, "
        f"{best['inflight']} in flight); goal ≥ 34 jokes/s with p95 ≤ 2 s."
    ]
    same = ("config", "inflight", "mdp", "presize")
    raw = [r for r in done if r["path"] == "raw" and all(r[k] == best[k] for k in same)]
    if raw:
        ratio = best["jokes_per_s"] / raw[0]["jokes_per_s"] if raw[0]["jokes_per_s"] else 0
        out.append(f"Bot vs raw api_server, same cell: {ratio:.1%} (goal ≥ 95%).")
    seed = [r for r in done if r.get("baseline")]
    if seed and seed[0]["jokes_per_s"]:
        out.append(
            f"Versus the seed's way (one at a time, {seed[0]['jokes_per_s']:.2f} jokes/s): "
            f"{best['jokes_per_s'] / seed[0]['jokes_per_s']:.1f}× (goal ≥ 15×)."
        )
    return out


def load_results(names: list[str]) -> dict[str, Any]:
    """Saved runs (several device calls) as one document; a .jsonl is a run cut short: its
    finished cells."""
    doc: dict[str, Any] = {"meta": {}, "rows": []}
    for name in names:
        text = Path(name).read_text(encoding="utf-8")
        if name.endswith(".jsonl"):
            part = {"rows": [json.loads(line) for line in text.splitlines() if line]}
        else:
            part = json.loads(text)
        doc["meta"] = doc["meta"] or part.get("meta", {})
        doc["rows"] += part.get("rows", [])
    return doc


# --------------------------------------------------------------------------- main


async def run(args: argparse.Namespace, configs: list[Config], model: Path | None) -> dict:
    out = Path(args.out)
    began = time.monotonic()
    images = Path(args.images) if args.images else None
    photos = await asyncio.to_thread(phone_photos, images, not args.no_phone_size)
    meta = await asyncio.to_thread(device_info)
    meta.update({"model": str(model) if model else None, "max_new_tokens": args.max_new_tokens,
                 "photos": len(photos)})  # fmt: skip
    doc: dict[str, Any] = {"meta": meta, "rows": []}
    bench = Bench(args, photos, out)

    def remaining() -> float:
        return args.deadline_s - (time.monotonic() - began) if args.deadline_s else float("inf")

    def emit(row: dict[str, Any]) -> None:
        doc["rows"].append(row)
        append_jsonl(out / "serve-results.jsonl", row)
        print(json.dumps(row, ensure_ascii=False), flush=True)

    for config in configs:
        servers: list[ServerProcess] = []
        proxy: Proxy | None = None
        try:
            if config.launch is not None:
                served = Path(config.model) if config.model else model
                if served is None:
                    raise SystemExit("--launch/plan 'launch' needs a model folder")
                if remaining() < 60:
                    for cell in config.cells:
                        emit({"config": config.name, **cell.model_dump(), "skipped": "deadline"})
                    continue
                t0 = time.monotonic()
                startup_s = min(args.startup_timeout_s, remaining())
                servers, proxy = await launch_servers(
                    config.launch, served, args.port, out / "logs", startup_s
                )
                print(f"# {config.name}: {len(servers)} server(s) healthy in "
                      f"{time.monotonic() - t0:.0f} s", flush=True)  # fmt: skip
                urls = [proxy.url] if proxy is not None else [s.url for s in servers]
                api_key = config.launch.api_key
            else:
                urls = config.base_urls or list(args.base_url)
                api_key = config.api_key or args.api_key
            for cell in config.cells:
                need = (cell.warmup_s or args.warmup_s) + (cell.measure_s or args.measure_s) + 5
                if remaining() < need:
                    emit({"config": config.name, **cell.model_dump(), "skipped": "deadline"})
                    continue
                emit(await bench.run_cell(config, cell, urls, api_key))
        except Exception as exc:  # a config that cannot start must not lose the others' numbers
            print(f"# {config.name} failed: {exc!r}", flush=True)
            for s in servers:
                print(s.log_tail(40), flush=True)
            if proxy is not None:
                print(proxy.log_tail(), flush=True)
            emit({"config": config.name, "skipped": f"failed: {failure_summary(exc)}"})
        finally:
            await asyncio.gather(*(s.stop(grace_s=20) for s in servers), return_exceptions=True)
            if proxy is not None:
                proxy.stop()
    write_json(out / "serve-results.json", doc)
    (out / "serve.md").write_text(render_markdown(doc) + "\n", encoding="utf-8")
    return doc


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Serving benchmark (see the module docstring).")
    p.add_argument("--plan", help="JSON plan: several server configs and cell sweeps")
    p.add_argument("--base-url", action="append", default=[], help="running server(s)")
    p.add_argument("--launch", metavar="MODEL", help="the model folder, instead of the plan's")
    p.add_argument("--server-command", default="", help="argv prefix instead of python -m lmdeploy")
    p.add_argument("--port", type=int, default=23333)
    p.add_argument("--api-key", default=None)
    p.add_argument("--model-name", default=SERVED_NAME, help="served model name")
    p.add_argument("--warmup-s", type=float, default=5.0)
    p.add_argument("--measure-s", type=float, default=20.0)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--request-timeout-s", type=float, default=600.0)
    p.add_argument("--startup-timeout-s", type=float, default=420.0)
    p.add_argument("--deadline-s", type=float, default=0.0, help="stop starting cells after this")
    p.add_argument("--images", default=None, help="folder of photos (default: skimage's)")
    p.add_argument("--no-phone-size", action="store_true", help="send photos at their own size")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve"))
    p.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    p.add_argument(
        "--render", nargs="+", default=None, help="only re-render saved serve-results.json file(s)"
    )
    args = p.parse_args(argv)
    if not (args.plan or args.render):
        p.error("give --plan FILE (or --render RESULTS)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        doc = load_results(args.render)
    else:
        plan = Plan.model_validate_json(Path(args.plan).read_text(encoding="utf-8"))
        for key in ("warmup_s", "measure_s", "max_new_tokens", "port", "deadline_s"):
            if getattr(plan, key) is not None:  # the plan's own, else the flag's
                setattr(args, key, getattr(plan, key))
        model = Path(args.launch or plan.model) if args.launch or plan.model else None
        for config in plan.configs:
            if config.launch and not config.launch.server_command and args.server_command:
                config.launch.server_command = args.server_command.split()
        Path(args.out).mkdir(parents=True, exist_ok=True)
        doc = asyncio.run(run(args, plan.configs, model))
    markdown = render_markdown(doc)
    print(markdown)
    if args.write_docs:
        write_section("serve", "Serving: LMDeploy on the GPU (bench/serve.py)", markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
