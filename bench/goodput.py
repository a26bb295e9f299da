"""Goodput: the highest Poisson arrival rate at which p95 latency stays within the SLO (2 s).

Users arrive whatever the server is doing, so the load is **open loop**
(``bench.common.open_loop``): every arrival after the warm-up counts, however late its answer.
Per rate a row gives p50/p95/p99 of the jokes answered, the share of *all* arrivals answered
with a joke within the SLO, "busy" answers and errors. **Goodput** = the highest rate whose
share within the SLO is ≥ 95 % (a busy answer or a failure counting as over it).

Paths: ``raw`` POSTs pre-built chat requests to the api_servers; ``bot`` POSTs the picture to
real ``oogiri serve`` processes' ``/api/jokes``, with the bot's admission control on (a bounded
queue) or off. Workloads: ``unique`` (every request a different picture) or ``zipf``
(``zipf_items`` pictures, rank k drawn with probability ∝ 1/k^``zipf_s``).

A plan (JSON, validated by ``Plan``) names server groups and steps; all groups start first
(their start-up dominates a device call), then the steps run one after another::

    python -m bench.goodput --plan bench/plans/goodput-cpu.json --out /tmp/goodput
    python -m bench.goodput --render bench/results/goodput-….json   # markdown only

Server groups: ``launch`` (``bench.serve.Launch``'s keys), ``fake`` (tests/fakes/fake_lmdeploy.py
with a service time and a capacity: the CPU proof of the bench; nothing about a GPU) or
``base_urls``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import Field, model_validator

from bench.common import (
    DOC,
    ROOT,
    Sample,
    append_jsonl,
    fmt,
    git_commit,
    latency_summary,
    machine,
    markdown_table,
    open_loop,
    photo_jpegs,
    timed,
    utc_now,
    write_json,
    write_section,
    zipf_indices,
)
from bench.serve import (
    SERVED_NAME,
    BotProcesses,
    Launch,
    Launched,
    Strict,
    engine_settings,
    launch_servers,
    post_chat,
    post_joke,
    raw_body,
)

FAKE_SERVER = [sys.executable, str(ROOT / "tests/fakes/fake_lmdeploy.py")]

# --------------------------------------------------------------------------- plan


class FakeServers(Strict):
    """tests/fakes/fake_lmdeploy.py: ``delay_s`` per request, ``capacity`` at once."""

    delay_s: float = Field(0.2, gt=0)
    capacity: int = Field(4, ge=1)


class ServerGroup(Strict):
    launch: Launch | None = None
    fake: FakeServers | None = None
    servers: int = Field(1, ge=1, description="fake: how many")
    base_urls: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(
        default_factory=dict, description="extra environment of this group's servers (profiler)"
    )


class AdmissionPlan(Strict):
    """The bot's ``limits`` for a ``bot`` step (``None`` on the step: admission off)."""

    max_concurrency: int = Field(32, ge=1)
    max_queue: int = Field(16, ge=0)
    queue_timeout_s: float = Field(1.0, ge=0)


#: Admission "off": every request goes to the engine at once and waits as long as it takes.
ADMISSION_OFF = {"max_concurrency": 4096, "max_queue": 0, "queue_timeout_s": 3600}


class Step(Strict):
    """One step of a plan. ``kind``: ``load`` (measured rows), ``warmup`` (the same open loop,
    raw, reported apart: first load on fresh servers compiles kernels) or ``prefix_cache_check``
    (tests/gpu/test_prefix_caching.py's check against the group's first server)."""

    name: str
    group: str
    kind: Literal["load", "warmup", "prefix_cache_check"] = "load"
    with_next: bool = Field(False, description="run beside the next step (checks, warm-ups)")
    servers_used: int | None = Field(None, ge=1, description="only the group's first N servers")
    path: Literal["raw", "bot"] = "raw"
    bots: int = Field(1, ge=1)
    admission: AdmissionPlan | None = None
    bot_env: dict[str, str] = Field(
        default_factory=dict, description="more settings of the bots (OOGIRI_POOL__ENABLED …)"
    )
    workload: Literal["unique", "zipf"] = "unique"
    zipf_s: float = Field(1.0, ge=0)
    zipf_items: int = Field(200, ge=1)
    rates: list[float] = Field(default_factory=lambda: [1.0], min_length=1)
    warmup_s: float = Field(3.0, ge=0)
    duration_s: float = Field(15.0, gt=0)
    stop_after_misses: int = Field(
        1, ge=0, description="skip the higher rates after this many rates missed the SLO (0: never)"
    )


class Plan(Strict):
    model: str | None = None
    max_new_tokens: int = 64
    max_dynamic_patch: int = 6
    image_size: tuple[int, int] = (1344, 896)
    slo_s: float = 2.0
    seed: int = 0
    photos_dir: str | None = Field(None, description="unset: scikit-image's own photos")
    profile_step: str | None = Field(None, description="the step that loads the profiled group")
    profile_wait_s: float = Field(90, ge=0, description="wait this long for the trace")
    groups: dict[str, ServerGroup]
    steps: list[Step]

    @model_validator(mode="after")
    def _consistent(self) -> Plan:
        """What would otherwise fail on the device, minutes into a call."""
        names = [s.name for s in self.steps]
        if len(set(names)) != len(names):
            raise ValueError("step names must be unique (rows and bots' folders are keyed on them)")
        if self.profile_step is not None and self.profile_step not in names:
            raise ValueError(f"profile_step {self.profile_step!r} names no step")
        for step, after in zip(self.steps, [*self.steps[1:], None], strict=True):
            group = self.groups.get(step.group)
            if group is None:
                raise ValueError(f"step {step.name!r}: no group {step.group!r}")
            # LMDeploy 0.18 answers 400 to a request with logprobs unless the server was started
            # with a logprobs mode (serve/openai/chat_completions/validation.py)
            launch = group.launch
            if (
                step.kind == "prefix_cache_check"
                and launch
                and "--logprobs-mode" not in launch.extra_args
            ):
                raise ValueError(
                    f'step {step.name!r}: group {step.group!r} needs "--logprobs-mode", '
                    '"raw_logprobs" in launch.extra_args (the check asks for logprobs)'
                )
            if step.kind != "load" and step.path != "raw":
                raise ValueError(f"step {step.name!r}: a {step.kind} step is raw")
            if bad := [k for k in step.bot_env if not k.startswith("OOGIRI_")]:
                raise ValueError(f"step {step.name!r}: bot_env keys are OOGIRI_ settings: {bad}")
            if step.with_next and "load" in (step.kind, after.kind if after else "load"):
                raise ValueError(
                    f"step {step.name!r}: with_next pairs a check or warm-up with the next "
                    "step, which must not be a load step either"
                )
        return self


# --------------------------------------------------------------------------- servers


def fake_model() -> Path:
    """A model folder the fake api_server accepts."""
    model = Path(tempfile.mkdtemp(prefix="goodput-fake-model-"))
    (model / "config.json").write_text("{}")
    return model


class Servers:
    """Everything started for a plan's groups; ``urls[group]`` are its api_server base URLs."""

    def __init__(self) -> None:
        self.urls: dict[str, list[str]] = {}
        self.errors: dict[str, str] = {}
        self.started: list[Launched] = []

    async def start(self, plan: Plan, out: Path, port: int, startup_timeout_s: float) -> None:
        await asyncio.gather(
            *(
                self.start_group(name, group, plan, out, port + 20 * i, startup_timeout_s)
                for i, (name, group) in enumerate(plan.groups.items())
            )
        )

    async def start_group(
        self, name: str, group: ServerGroup, plan: Plan, out: Path, port: int, startup_s: float
    ) -> None:
        # {out}, {root} and {PYTHONPATH} (as the bench process has it) in env values
        paths = {
            "{out}": str(out),
            "{root}": str(ROOT),
            "{PYTHONPATH}": os.getenv("PYTHONPATH", ""),
        }
        env = {
            k: re.sub("|".join(map(re.escape, paths)), lambda m: paths[m[0]], v)
            for k, v in group.env.items()
        }
        try:
            if group.base_urls:
                self.urls[name] = list(group.base_urls)
                return
            if group.fake is not None:
                launch = Launch(servers=group.servers, server_threads=1, server_command=FAKE_SERVER)
                env["FAKE_LMDEPLOY_DELAY_S"] = str(group.fake.delay_s)
                env["FAKE_LMDEPLOY_CAPACITY"] = str(group.fake.capacity)
                model = fake_model()
            elif group.launch is None or not plan.model:
                raise ValueError(f"group {name}: needs launch + the plan's model, or fake")
            else:
                launch, model = group.launch, Path(plan.model)
            started = await launch_servers(launch, model, port, out / "logs" / name, startup_s, env)
            self.started.append(started)
            self.urls[name] = started.urls
        except Exception as exc:  # one group failing must not lose the others' steps
            self.errors[name] = f"{type(exc).__name__}: {str(exc)[:300]}"

    async def stop(self) -> None:
        for started in reversed(self.started):
            await started.stop(grace_s=10)


# --------------------------------------------------------------------------- requests


def pictures_for(step: Step, plan: Plan) -> tuple[list[bytes], Callable[[float], list[int]]]:
    """The step's pictures and, for a rate, which picture each arrival index sends.

    Zipf: each rate draws its own sequence (seeded by the plan's seed and the rate, like the
    arrival times), so two steps at one rate send the same pictures at the same moments (pool
    on/off is a paired comparison) while a higher rate does not replay the lower one's
    sequence (which would flatter a cache carried over from it)."""
    most = max(step.rates) * (step.warmup_s + step.duration_s)
    n_arrivals = int(most * 1.5) + 50  # Poisson arrivals run above the mean at times
    photos = Path(plan.photos_dir) if plan.photos_dir else None
    if step.workload == "unique":
        pictures = photo_jpegs(n_arrivals, plan.image_size, workers=8, photos_dir=photos)
        return pictures, lambda rate: list(range(n_arrivals))
    pictures = photo_jpegs(step.zipf_items, plan.image_size, workers=8, photos_dir=photos)

    def order(rate: float) -> list[int]:
        seed = plan.seed + int(rate * 1000)
        return zipf_indices(n_arrivals, step.zipf_items, step.zipf_s, seed=seed)

    return pictures, order


class NewVisitors(httpx.AsyncHTTPTransport):
    """Drops Set-Cookie: every upload comes from a new visitor, as when many people send one
    meme (one cookie jar would make the whole load a single web user)."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        if "set-cookie" in response.headers:
            del response.headers["set-cookie"]
        return response


async def run_step(
    step: Step, plan: Plan, urls: list[str], out: Path, port: int, deadline: float
) -> list[dict[str, Any]]:
    pictures, order_for = await asyncio.to_thread(pictures_for, step, plan)
    order: list[int] = []
    n, mdp = plan.max_new_tokens, plan.max_dynamic_patch
    limits = httpx.Limits(max_connections=4096)
    transport = NewVisitors(limits=limits) if step.path == "bot" else None
    client = httpx.AsyncClient(timeout=300, transport=transport, limits=limits, trust_env=False)
    bots: BotProcesses | None = None
    try:
        if step.path == "bot":
            bots = await BotProcesses.launch(
                engine_settings(urls, n, mdp),
                out / "bots" / step.name.replace(" ", "_"),
                port=port,
                count=step.bots,
                startup_timeout_s=120,
                limits=step.admission.model_dump() if step.admission else ADMISSION_OFF,
                env_extra=step.bot_env,
            )

        async def one(i: int) -> Sample:
            jpeg = pictures[order[i % len(order)]]
            if bots is not None:
                return await timed(
                    lambda: post_joke(client, bots.urls[i % len(bots.urls)], jpeg, n)
                )
            return await timed(
                lambda: post_chat(client, urls[i % len(urls)], raw_body(jpeg, mdp, n))
            )

        rows: list[dict[str, Any]] = []
        misses = 0
        for rate in sorted(step.rates):
            row = {**step_meta(step), "rate": rate}
            if time.monotonic() + step.warmup_s + step.duration_s + 10 > deadline:
                rows.append({**row, "skipped": "deadline"})
                continue
            if step.stop_after_misses and misses >= step.stop_after_misses:
                rows.append({**row, "skipped": "above the knee"})
                continue
            order[:] = order_for(rate)
            before = await pool_answers(client, bots.urls) if bots is not None else None
            samples, achieved = await open_loop(
                one,
                rate,
                step.duration_s,
                warmup_s=step.warmup_s,
                seed=plan.seed + int(rate * 1000),
                drain_s=max(30.0, 4 * plan.slo_s),
            )
            row |= summarize(samples, achieved, step, plan)
            if before is not None and bots is not None:
                after = await pool_answers(client, bots.urls)
                if after is not None:
                    pool, engine = (
                        after["pool"] - before["pool"],
                        after["engine"] - before["engine"],
                    )
                    # the cell's warm-up arrivals included: the bot cannot tell them apart
                    row["pool_answers"] = int(pool)
                    row["pool_share"] = round(pool / (pool + engine), 4) if pool + engine else None
            rows.append(row)
            print(json.dumps(row), flush=True)
            misses = misses + 1 if not row["meets_slo"] else 0
        return rows
    finally:
        await client.aclose()
        if bots is not None:
            await bots.stop()


POOL_METRIC = re.compile(
    r'^oogiri_joke_pool_answers\{source="(pool|engine)"\}\s+([0-9.eE+-]+)', re.M
)


async def pool_answers(client: httpx.AsyncClient, bots: list[str]) -> dict[str, float] | None:
    """The joke pool's answers so far, summed over the bots (None: no bot runs the pool)."""
    total = {"pool": 0.0, "engine": 0.0}
    found = False
    for url in bots:
        try:
            r = await client.get(url + "/metrics", timeout=10)
        except httpx.HTTPError:
            return None
        for source, value in POOL_METRIC.findall(r.text if r.status_code == 200 else ""):
            total[source] += float(value)
            found = True
    return total if found else None


def step_meta(step: Step) -> dict[str, Any]:
    zipf = step.workload == "zipf"
    return {
        "step": step.name,
        "group": step.group,
        "path": step.path,
        "bots": step.bots if step.path == "bot" else None,
        "admission": step.admission.model_dump() if step.admission else None,
        "bot_env": step.bot_env or None,
        "workload": step.workload,
        "zipf_s": step.zipf_s if zipf else None,
        "zipf_items": step.zipf_items if zipf else None,
    }


def summarize(samples: list[Sample], achieved: float, step: Step, plan: Plan) -> dict[str, Any]:
    ok = [s for s in samples if s.ok]
    errors = Counter(s.error for s in samples if not s.ok)
    busy = errors.pop("busy", 0)
    good = sum(1 for s in ok if s.latency <= plan.slo_s)
    n = len(samples)
    jokes = latency_summary([s.latency for s in ok])
    busy_lat = [s.latency for s in samples if not s.ok and s.error == "busy"]
    within = good / n if n else None

    def mean(key: str) -> float | None:
        return round(sum(getattr(s, key) for s in ok) / len(ok), 1) if ok else None

    return {
        "arrivals": n,
        "achieved_rate": round(achieved, 2),
        "ok": len(ok),
        "busy": busy,
        "errors": dict(errors),
        **{k: jokes[k] for k in ("p50_s", "p95_s", "p99_s")},
        "busy_p95_s": latency_summary(busy_lat)["p95_s"],
        "within_slo": round(within, 4) if within is not None else None,
        "good_per_s": round(good / step.duration_s, 2),
        "meets_slo": bool(n and within is not None and within >= 0.95),
        "cached_tokens": mean("cached_tokens"),
        "prompt_tokens": mean("prompt_tokens"),
    }


# --------------------------------------------------------------------------- report


def goodput(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Per step: the highest rate that met the SLO (None: none did)."""
    out: dict[str, float | None] = {}
    for row in rows:
        out.setdefault(row["step"], None)
        if row.get("meets_slo"):
            out[row["step"]] = max(out[row["step"]] or 0.0, row["rate"])
    return out


def admission_text(row: dict[str, Any]) -> str:
    a = row.get("admission")
    if row["path"] != "bot":
        return "–"
    if not a:
        return "off"
    return f"queue {a['max_queue']}, wait {a['queue_timeout_s']:g} s, {a['max_concurrency']}/bot"


def percent(share: float | None, digits: int) -> str:
    return "–" if share is None else f"{100 * share:.{digits}f} %"


def render_markdown(doc: dict[str, Any]) -> str:
    meta, rows = doc["meta"], doc["rows"]
    slo = meta["slo_s"]
    head = (
        f"{meta.get('device') or meta['machine']} · {meta.get('versions', '')} · "
        f"bot {meta['commit']} · {meta['when']} · SLO {slo:g} s · "
        f"{meta['max_new_tokens']} output tokens · mdp {meta['max_dynamic_patch']} · "
        f"pictures {meta['image_size'][0]}×{meta['image_size'][1]}"
    )
    table_rows = []
    for r in rows:
        workload = r["workload"]
        if workload == "zipf":
            workload += f" (s={r['zipf_s']:g}, {r['zipf_items']})"
        path = r["path"]
        if r.get("servers"):
            path += f" ({r['servers']} srv" + (f", {r['bots']} bots)" if path == "bot" else ")")
        if (r.get("bot_env") or {}).get("OOGIRI_POOL__ENABLED") == "true":
            path += ", joke pool"
        cells = [r["step"], path, admission_text(r), workload]
        if r.get("skipped"):
            table_rows.append([*cells, r["rate"], f"skipped: {r['skipped']}"] + [""] * 10)
            continue
        table_rows.append(
            [
                *cells,
                fmt(r["rate"], 1),
                fmt(r["achieved_rate"], 1),
                fmt(r["p50_s"]),
                fmt(r["p95_s"]),
                fmt(r["p99_s"]),
                percent(r["within_slo"], 1),
                fmt(r["good_per_s"], 1),
                f"{r['busy']} ({fmt(r['busy_p95_s'])} s)" if r["busy"] else "0",
                str(sum(r["errors"].values())),
                fmt(r.get("cached_tokens"), 0),
                percent(r.get("pool_share"), 0),
                "**yes**" if r["meets_slo"] else "no",
            ]
        )
    columns = (
        "step | path | admission | workload | rate /s | arrived /s | p50 s | p95 s | p99 s | "
        f"within {slo:g} s | jokes within SLO /s | busy (p95) | errors | cached tok | from pool | "
        "p95 ≤ SLO"
    ).split(" | ")
    lines = [head, "", markdown_table(columns, table_rows), ""]
    for step, rate in goodput(rows).items():
        lines.append(f"- **{step}**: goodput {fmt(rate, 1) if rate else 'below the lowest rate'}")
    if meta.get("partial"):
        lines.append("- **partial results**: the call ended before the plan did")
    for name, warm in (meta.get("warmups") or {}).items():
        for r in warm:
            if r.get("skipped"):
                lines.append(f"- warm-up {name} ({r['rate']:g}/s): skipped, {r['skipped']}")
                continue
            lines.append(
                f"- warm-up {name} (not in the table), {r['rate']:g}/s on {r['servers']} "
                f"server(s): p50 {fmt(r['p50_s'])} s, p95 {fmt(r['p95_s'])} s, "
                f"{100 * (r['within_slo'] or 0):.1f} % within {slo:g} s"
            )
    for name, error in (meta.get("group_errors") or {}).items():
        lines.append(f"- group {name} did not start: {error}")
    for name, check in (meta.get("checks") or {}).items():
        lines += check_lines(name, check)
    return "\n".join(lines + profile_lines(meta.get("profile")))


def check_lines(name: str, check: dict[str, Any]) -> list[str]:
    """The prefix-cache check's verdict and what it saw."""
    verdict = {True: "**passed**", False: "**FAILED**", None: "did not run"}[check.get("ok")]
    lines = [f"- {name}: {verdict}"]
    for what, ok in (check.get("checks") or {}).items():
        lines.append(f"  - {what}: {'yes' if ok else 'NO'}")
    if check.get("error"):
        lines.append(f"  - error: {check['error'].splitlines()[0]}")
    if check.get("drifted_from_own_reference") is not None:
        lines.append(
            f"  - burst: {check['drifted_from_own_reference']} of {check['burst_requests']} "
            "answers drifted from their own picture's batch-of-one greedy answer (numerics, "
            "reported, not failed); borrowed from another picture: "
            f"{len(check.get('borrowed') or [])}"
        )
    if check.get("lmdeploy_disabled_caching"):
        lines.append("  - LMDeploy logged that it switched prefix caching off for this model")
    if "cached_tokens_a_again" in check:
        lines.append(
            f"  - cached prompt tokens reported: repeated picture "
            f"{check['cached_tokens_a_again']} of {check['prompt_tokens']}, burst max "
            f"{check['cached_tokens_burst_max']}"
        )
    return lines


def profile_lines(prof: dict[str, Any] | None) -> list[str]:
    """bench/profile_trace's split of the profiled server's GPU time."""
    if not prof:
        return []
    if prof.get("error"):
        return [f"- profile: {prof['error']}"]
    share = prof["kernel_share"]
    lines = [
        f"- profile ({prof['step']}, {prof['window_s']:.1f} s window, "
        f"{prof.get('jokes') or '?'} jokes): GPU idle {100 * prof['idle_share']:.1f} %; "
        "kernel time " + ", ".join(f"{p} {100 * (share[p] or 0):.1f} %" for p in share)
    ]
    if prof.get("per_joke_ms"):
        per_joke = ", ".join(f"{k} {v:.1f}" for k, v in prof["per_joke_ms"].items())
        lines.append(f"  - per joke (ms): {per_joke}")
    for k in prof["top_kernels"][:8]:
        lines.append(f"  - {k['phase']}: `{k['name'][:90]}` {k['s']:.3f} s, {k['calls']} calls")
    return lines


# --------------------------------------------------------------------------- main


async def profile_summary(plan: Plan, out: Path, rows: list[dict[str, Any]]) -> dict | None:
    """bench/profile_trace's split of the profiled group's trace (None: no trace yet)."""
    if not any("LMDEPLOY_PROFILE_CUDA" in g.env for g in plan.groups.values()):
        return None
    for _ in range(int(plan.profile_wait_s)):
        traces = sorted((out / "profile").glob("*.json*"))
        if traces and all(time.time() - t.stat().st_mtime > 3 for t in traces):
            break
        await asyncio.sleep(1)
    else:
        return None
    from bench.profile_trace import analyse, load

    step = next((r for r in rows if r.get("step") == plan.profile_step and r.get("ok")), None)
    jokes = None
    if step:  # the trace's last burst is the whole step, warm-up included
        spec = next(s for s in plan.steps if s.name == plan.profile_step)
        jokes = round(step["ok"] * (spec.warmup_s + spec.duration_s) / spec.duration_s)
    trace = traces[-1]
    try:
        summary = await asyncio.to_thread(lambda: analyse(load(trace), jokes))
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {str(exc)[:300]}", "trace": trace.name}
    size_mb = round(trace.stat().st_size / 2**20, 1)
    return summary | {"trace": trace.name, "trace_mb": size_mb, "step": plan.profile_step}


async def prefix_cache_check(plan: Plan, urls: list[str], log_dir: Path) -> dict[str, Any]:
    """tests/gpu/test_prefix_caching.py's check against the group's first server."""
    try:
        from tests.gpu.test_prefix_caching import check

        photos = Path(plan.photos_dir) if plan.photos_dir else None
        result = await check(urls[0], SERVED_NAME, photos_dir=photos)
    except Exception as exc:
        return {"ok": None, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    # LMDeploy 0.18 switches caching off for InternVL's path and logs it: say whether it did
    logs = await asyncio.to_thread(
        lambda: [p.read_text(errors="replace") for p in log_dir.glob("*.log")]
    )
    result["lmdeploy_disabled_caching"] = any("Prefix caching is disabled" in t for t in logs)
    return result


def commit() -> str:
    """HEAD's short hash; a snapshot without .git (git archive) carries it in a COMMIT file."""
    if (ROOT / "COMMIT").is_file():
        return (ROOT / "COMMIT").read_text().strip()
    return git_commit() or "?"


async def run(plan: Plan, out: Path, port: int, deadline_s: float, startup_s: float) -> dict:
    deadline = time.monotonic() + deadline_s
    meta: dict[str, Any] = {
        "machine": machine(),
        "device": os.environ.get("GOODPUT_DEVICE"),
        "versions": os.environ.get("GOODPUT_VERSIONS", ""),
        "commit": commit(),
        "when": utc_now(),
        "slo_s": plan.slo_s,
        "max_new_tokens": plan.max_new_tokens,
        "max_dynamic_patch": plan.max_dynamic_patch,
        "image_size": list(plan.image_size),
        "plan": plan.model_dump(mode="json"),
    }
    servers = Servers()
    rows: list[dict[str, Any]] = []
    (out / "profile").mkdir(parents=True, exist_ok=True)  # LMDeploy's profiler will not make it
    try:
        t0 = time.monotonic()
        await servers.start(plan, out, port, startup_s)
        meta["startup_s"] = round(time.monotonic() - t0, 1)
        meta["group_errors"] = servers.errors

        async def do(i: int, step: Step) -> None:
            urls = servers.urls.get(step.group, [])[: step.servers_used]
            if step.kind == "prefix_cache_check":
                t = time.monotonic()
                if urls:
                    check = await prefix_cache_check(plan, urls, out / "logs" / step.group)
                    check["seconds"] = round(time.monotonic() - t, 1)
                    print(json.dumps(check), flush=True)
                else:
                    check = {"ok": None, "error": f"group {step.group} did not start"}
                meta.setdefault("checks", {})[step.name] = check
                return
            if not urls:
                skipped = {"rate": min(step.rates), "skipped": "no servers"}
                if step.kind == "warmup":
                    meta.setdefault("warmups", {})[step.name] = [skipped]
                else:
                    rows.append(step_meta(step) | skipped)
                return
            step_rows = await run_step(step, plan, urls, out, port + 500 + 10 * i, deadline)
            for row in step_rows:
                row["servers"] = len(urls)
            if step.kind == "warmup":  # reported apart: not a measurement
                meta.setdefault("warmups", {})[step.name] = step_rows
                return
            rows.extend(step_rows)
            for row in step_rows:
                append_jsonl(out / "goodput-results.jsonl", row)

        background: list[asyncio.Task[None]] = []
        for i, step in enumerate(plan.steps):
            task = asyncio.create_task(do(i, step))
            if step.with_next:
                background.append(task)
                continue
            await task
            await asyncio.gather(*background)
            background.clear()
            meta["step_end_s"] = meta.get("step_end_s", {}) | {
                step.name: round(time.monotonic() - t0, 1)
            }
            # after every step: a call killed at its limit keeps what ran
            partial = {"meta": {**meta, "partial": True}, "rows": rows}
            write_json(out / "goodput-results.json", partial)
        meta["profile"] = await profile_summary(plan, out, rows)
    finally:
        await servers.stop()
    if meta.get("profile") is None:  # a trace written at the servers' stop
        meta["profile"] = await profile_summary(plan, out, rows)
    meta["goodput"] = goodput(rows)
    return {"meta": meta, "rows": rows}


def as_cpu_dry_run(plan: Plan, scale: float, delay_s: float = 0.6, capacity: int = 2) -> Plan:
    """A device plan with every ``launch`` group's api_servers replaced by the fake api_server
    (which accepts and ignores LMDeploy's flags): same groups, servers, flags, steps, windows and
    bots; rates × ``scale``, small pictures, short answers, so a CPU machine runs every step
    before the device call does. It proves the plan and the scripts, nothing about a GPU (the
    fake ignores the picture, so the prefix-cache check fails there by design)."""
    fake_env = {"FAKE_LMDEPLOY_DELAY_S": str(delay_s), "FAKE_LMDEPLOY_CAPACITY": str(capacity)}
    groups = {
        name: group.model_copy(
            update={
                "launch": group.launch.model_copy(update={"server_command": FAKE_SERVER}),
                "env": group.env | fake_env,
            }
        )
        if group.launch is not None
        else group
        for name, group in plan.groups.items()
    }
    steps = [
        s.model_copy(update={"rates": [round(r * scale, 2) for r in s.rates]}) for s in plan.steps
    ]
    return plan.model_copy(
        update={
            "model": str(fake_model()),
            "groups": groups,
            "steps": steps,
            "image_size": (448, 448),
            "max_dynamic_patch": 1,
            "max_new_tokens": 16,
        }
    )


def into_doc(text: str, block: str, doc: Path = DOC) -> None:
    """Put ``text`` between ``<!-- goodput:BLOCK -->`` markers inside the goodput section of
    docs/benchmarks.md (replacing that block, or added just before the section's end), leaving
    the section's prose and older tables alone (``--write-docs`` replaces the whole section)."""
    content = doc.read_text(encoding="utf-8")
    start, end = f"<!-- goodput:{block} -->", f"<!-- /goodput:{block} -->"
    piece = f"{start}\n{text.rstrip()}\n{end}"
    if start in content and end in content:
        before, rest = content.split(start, 1)
        content = before + piece + rest.split(end, 1)[1]
    else:
        section_end = "<!-- /bench:goodput -->"
        if section_end not in content:
            raise SystemExit(f"{doc}: no {section_end} marker")
        content = content.replace(section_end, f"{piece}\n{section_end}", 1)
    doc.write_text(content, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plan", type=Path)
    ap.add_argument("--images", type=Path, help="folder with the photos (overrides the plan's)")
    ap.add_argument("--out", type=Path, default=Path("goodput-out"))
    ap.add_argument("--port", type=int, default=24100)
    ap.add_argument("--deadline-s", type=float, default=3600)
    ap.add_argument("--startup-timeout-s", type=float, default=420)
    ap.add_argument("--render", type=Path, help="print the markdown of saved results and exit")
    ap.add_argument("--write-docs", action="store_true", help="the table into docs/benchmarks.md")
    ap.add_argument("--results", type=Path, help="also write the results JSON here")
    ap.add_argument(
        "--into-doc", metavar="BLOCK", help="with --render: the table into its own marked block"
    )
    ap.add_argument(
        "--dry-run-fake",
        type=float,
        metavar="SCALE",
        help="run a device plan on CPU against fake api_servers, rates × SCALE (as_cpu_dry_run)",
    )
    args = ap.parse_args(argv)
    if args.render:
        text = render_markdown(json.loads(args.render.read_text()))
        print(text)
        if args.into_doc:
            into_doc(text, args.into_doc)
        return 0
    if not args.plan:
        ap.error("--plan or --render")
    plan = Plan.model_validate_json(args.plan.read_text())
    if args.images:
        plan = plan.model_copy(update={"photos_dir": str(args.images)})
    if args.dry_run_fake:
        plan = as_cpu_dry_run(plan, args.dry_run_fake)
    args.out.mkdir(parents=True, exist_ok=True)
    doc = asyncio.run(run(plan, args.out, args.port, args.deadline_s, args.startup_timeout_s))
    for path in (args.out / "goodput-results.json", args.results):
        if path:
            write_json(path, doc)
    text = render_markdown(doc)
    (args.out / "goodput.md").write_text(text + "\n")
    print(text)
    if args.write_docs:
        write_section("goodput", "Goodput under a latency promise (`bench/goodput.py`)", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
