"""Split an api_server's GPU time into vision encoder, LLM prefill, decode and idle.

Reads the Chrome trace that LMDeploy's own torch profiler writes (``LMDEPLOY_PROFILE_CUDA=1``,
``LMDEPLOY_PROFILE_CPU=1``; the ``oogiri::*`` ranges come from bench/profile_marks). Each GPU
kernel is attributed through its launch (the ``correlation`` id):

* launched by ``cudaGraphLaunch`` → **decode** (LMDeploy replays decode steps from CUDA graphs);
* launched inside ``oogiri::vision`` → **vision** (InternViT + the projector);
* inside ``oogiri::prefill`` → **prefill** (the LLM over the prompt), ``oogiri::decode_eager`` →
  **decode** (batches too big for a graph);
* anything else (sampling, copies, embedding scatter outside the marks) → **other**.

Only the last burst of kernels counts (after the last idle gap over ``gap_s``): the load.
**Idle** is the busy window (first to last kernel of the load) minus the union of kernel
intervals: time the GPU ran nothing. Usage: ``python -m bench.profile_trace TRACE.json.gz
[--jokes N]`` prints JSON (``--jokes``: jokes answered in the window, for per-joke figures).
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

PHASES = ("vision", "prefill", "decode", "other")
MARKS = {"vision": "vision", "prefill": "prefill", "decode_eager": "decode"}  # mark → phase


def load(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        doc = json.load(f)
    return doc["traceEvents"] if isinstance(doc, dict) else doc


def _corr(event: dict[str, Any]) -> Any:
    """The id that ties a kernel to the CUDA call that launched it."""
    return (event.get("args") or {}).get("correlation")


def _ranges(events: list[dict[str, Any]]) -> dict[tuple[Any, Any], list[tuple[float, float, str]]]:
    """The oogiri::* CPU ranges per (pid, tid), sorted by start."""
    out: dict[tuple[Any, Any], list[tuple[float, float, str]]] = defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and str(e.get("name", "")).startswith("oogiri::"):
            gpu = str(e.get("cat", "")).lower() == "gpu_user_annotation"
            out[("gpu", "gpu") if gpu else (e.get("pid"), e.get("tid"))].append(
                (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), e["name"][8:])
            )
    for v in out.values():
        v.sort()
    return out


def _phase_at(ranges: list[tuple[float, float, str]], starts: list[float], ts: float) -> str | None:
    """The innermost mark containing ts (vision nests inside prefill)."""
    i = bisect.bisect_right(starts, ts) - 1
    found = None
    while i >= 0:
        start, end, name = ranges[i]
        if start <= ts <= end:
            if found is None or name == "vision":
                found = name
        elif end < ts and found is not None:
            break
        i -= 1
        if i >= 0 and ts - ranges[i][0] > 120e6:  # no range lasts two minutes
            break
    return found


def analyse(
    events: list[dict[str, Any]], jokes: int | None = None, top: int = 12, gap_s: float = 3.0
) -> dict:
    """Seconds and shares of GPU kernel time per phase, idle time and the heaviest kernels."""
    xs = [(e, str(e.get("cat", "")).lower()) for e in events if e.get("ph") == "X"]
    launches = {_corr(e): e for e, c in xs if c in ("cuda_runtime", "cuda_driver")}
    launches.pop(None, None)
    kernels = sorted((e for e, c in xs if c == "kernel"), key=lambda k: float(k["ts"]))
    if not kernels:
        return {"error": "no GPU kernels in the trace"}
    # only the last burst of work: start-up (graph capture, warm-up) ends in a long idle gap
    cut, last_end = 0, float(kernels[0]["ts"])
    for i, k in enumerate(kernels):
        if float(k["ts"]) - last_end > gap_s * 1e6:
            cut = i
        last_end = max(last_end, float(k["ts"]) + float(k.get("dur", 0)))
    kernels = kernels[cut:]
    ranges = _ranges(events)
    starts = {k: [r[0] for r in v] for k, v in ranges.items()}

    def mark(key: tuple[Any, Any], ts: float) -> str | None:
        return _phase_at(ranges[key], starts[key], ts) if key in ranges else None

    time_by: dict[str, float] = defaultdict(float)
    by_kernel: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    intervals = []
    for k in kernels:
        ts, dur = float(k["ts"]), float(k.get("dur", 0))
        intervals.append((ts, ts + dur))
        launch = launches.get(_corr(k))
        phase = "other"
        if launch is not None and "Graph" in str(launch.get("name", "")):
            phase = "decode"
        elif launch is not None:  # else the GPU-side copy of the marks
            found = mark((launch.get("pid"), launch.get("tid")), float(launch["ts"]))
            found = mark(("gpu", "gpu"), ts) if found is None else found
            phase = MARKS.get(found or "", "other")
        time_by[phase] += dur
        entry = by_kernel[(phase, str(k.get("name", "?"))[:120])]
        entry[0] += dur
        entry[1] += 1
    intervals.sort()
    busy, cur_s, cur_e = 0.0, intervals[0][0], intervals[0][1]
    for s, e in intervals[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    window = intervals[-1][1] - intervals[0][0]
    kernel_sum = sum(time_by.values())
    out: dict[str, Any] = {
        "window_s": round(window * 1e-6, 6),
        "gpu_busy_s": round(busy * 1e-6, 6),
        "idle_s": round((window - busy) * 1e-6, 6),
        "idle_share": round((window - busy) / window, 4) if window else None,
        "kernel_s": {p: round(time_by[p] * 1e-6, 6) for p in PHASES},
        "kernel_share": {
            p: round(time_by[p] / kernel_sum, 4) if kernel_sum else None for p in PHASES
        },
        "overlap_note": "kernel seconds can exceed busy seconds where streams overlap",
        "marks_found": sum(len(v) for v in ranges.values()),
        "kernels": len(kernels),
        "top_kernels": [
            {"phase": ph, "name": name, "s": round(t * 1e-6, 6), "calls": int(n)}
            for (ph, name), (t, n) in sorted(by_kernel.items(), key=lambda kv: -kv[1][0])[:top]
        ],
    }
    if jokes:
        out["jokes"] = jokes
        per_joke = {**{p: time_by[p] for p in PHASES}, "idle": window - busy}
        out["per_joke_ms"] = {p: round(t / 1000 / jokes, 2) for p, t in per_joke.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace", type=Path)
    ap.add_argument("--jokes", type=int, default=None)
    args = ap.parse_args(argv)
    print(json.dumps(analyse(load(args.trace), args.jokes), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
