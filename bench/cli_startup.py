"""How long a newcomer waits for the CLI: start-up, and `oogiri joke` on one picture against a
running `oogiri serve` (instant engine: the CLI's own cost) and without one (the tiny demo model
loaded in the process; the first call builds it and is not counted). Every figure is the wall
clock of the real console script in a fresh process, as a shell runs it. Goal: ≤ 1 s for
`oogiri joke` against a running serve.

Usage: ``python -m bench.cli_startup [--repeats 7] [--no-doc]``. Results:
bench/results/cli_startup.json and the ``cli-startup`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    LOOPBACK_WEB_ENV,
    RESULTS,
    free_port,
    latency_summary,
    machine,
    markdown_table,
    skimage_photos,
    utc_now,
    write_json,
    write_section,
)
from tests.faults.faultsupport import BotProcess, running

GOAL_S = 1.0


def oogiri() -> str:
    found = shutil.which("oogiri", path=str(Path(sys.executable).parent)) or shutil.which("oogiri")
    if not found:
        raise SystemExit("no `oogiri` console script next to this Python: pip install -e .")
    return found


def clean_env(data_dir: Path, port: int) -> dict[str, str]:
    """A newcomer's shell (run_all drops this one's OOGIRI_*) with a data dir and a port."""
    return {**os.environ, "OOGIRI_DATA_DIR": str(data_dir), "OOGIRI_WEB__PORT": str(port)}


def timed(argv: list[str], env: dict[str, str], repeats: int) -> dict[str, Any]:
    """Wall-clock seconds of ``oogiri ARGV`` over ``repeats`` fresh processes (each must exit 0),
    and the CLI process's own CPU seconds: what a busy machine does not inflate."""
    times: list[float] = []
    cpu: list[float] = []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        done = subprocess.run([oogiri(), *argv], env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - started)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode != 0:
            raise SystemExit(f"oogiri {' '.join(argv)} failed ({done.returncode}):\n{done.stderr}")
        cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return {
        "n": len(times),
        "median_s": round(statistics.median(times), 3),
        "p95_s": latency_summary(times)["p95_s"] or 0.0,
        "min_s": round(min(times), 3),
        "max_s": round(max(times), 3),
        "cpu_median_s": round(statistics.median(cpu), 3),
    }


def run_all(repeats: int) -> dict[str, Any]:
    """Every row; none of this shell's OOGIRI_* settings may reach the CLI or the serve."""
    for key in [k for k in os.environ if k.startswith("OOGIRI_")]:
        del os.environ[key]
    os.environ["LANG"] = "C.UTF-8"
    image = str(skimage_photos() / "chelsea.png")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="oogiri-bench-cli-") as tmp:
        root = Path(tmp)

        def add(what: str, argv: list[str], env: dict[str, str]) -> None:
            row = {"what": what, "command": "oogiri " + " ".join(argv), **timed(argv, env, repeats)}
            rows.append(row)
            print(f"{what:<48} median {row['median_s']:.3f} s", file=sys.stderr, flush=True)

        # Nothing listens at that port: `oogiri joke` loads the model itself.
        local = clean_env(root / "local", free_port())
        add("start-up: `oogiri --help` (loads every plugin)", ["--help"], local)
        add("start-up: `oogiri joke --help` (no plugins)", ["joke", "--help"], local)
        # No rate limits: dozens of calls a minute from one terminal are the bench, not abuse.
        serve = BotProcess(root / "serve", **LOOPBACK_WEB_ENV)
        with running(serve, cli=True):
            same = clean_env(root / "serve", serve.port)
            add("joke, 1 image, a serve running on the same data dir", ["joke", image], same)
            beside = clean_env(root / "client", serve.port)
            add("joke, 1 image, a serve at the web address only", ["joke", image], beside)
            add("joke, 1 image, --server URL", ["joke", "--server", serve.url, image], local)
        # The first call builds the demo model into the data dir: a one-off, not counted.
        subprocess.run([oogiri(), "joke", image], env=local, capture_output=True, check=True)
        add("joke, 1 image, no serve: the tiny demo model loaded here", ["joke", image], local)
    return {
        "generated": utc_now(),
        "machine": machine(),
        "load_average_1m_before": round(os.getloadavg()[0], 2),
        "repeats": repeats,
        "goal_s": GOAL_S,
        "rows": rows,
    }


def render(doc: dict[str, Any]) -> str:
    verdict = ""
    if served := next((r for r in doc["rows"] if "same data dir" in r["what"]), None):
        met = "met" if served["median_s"] <= doc["goal_s"] else "NOT met"
        verdict = (
            f" Goal ≤ {doc['goal_s']:g} s against a running serve (same data dir): **{met}** "
            f"({served['median_s']:.2f} s wall at that load; the CLI's own CPU time "
            f"{served['cpu_median_s']:.2f} s)."
        )
    intro = (
        f"Wall clock of the real console script, a fresh process per run, median of "
        f"{doc['repeats']} runs; {doc['machine']}; {doc['generated']}; 1-minute load average "
        f"{doc['load_average_1m_before']} when it started (the machine's 2 cores were shared with "
        f"other work, so wall times are upper bounds; the CPU column is the CLI process's own "
        f"user+system time). The serve runs the instant engine, so its rows are the CLI's own "
        f"cost; a real model adds its generation time. *Same data dir*: the serve's address is "
        f"read from its `run/serve.json` and only the core's settings are built; *web address "
        f"only*: the full settings (every plugin imported) are built to find it. The last row "
        f"loads and runs the tiny demo model in the CLI process.{verdict}"
    )
    keys = ("median_s", "p95_s", "min_s", "max_s", "cpu_median_s")
    table = markdown_table(
        ["what", "median s", "p95 s", "min s", "max s", "CLI CPU s (median)"],
        [[r["what"], *(f"{r[k]:.2f}" for k in keys)] for r in doc["rows"]],
    )
    notes = (
        "What it shows: with a serve running, `oogiri joke` costs about what Python and the "
        "CLI's imports cost (the `joke --help` row) plus one HTTP round trip; before issue 19 "
        "every call loaded the model in-process (the last row) whatever ran. The *web address "
        "only* row is slow because building the full settings imports every installed plugin "
        "to learn its settings section. What it does not prove: a serve on another machine adds "
        "its network latency, and a real model adds seconds of generation to every row."
    )
    return f"{intro}\n\n{table}\n\n{notes}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-doc", action="store_true", help="do not touch docs/benchmarks.md")
    args = parser.parse_args()
    doc = run_all(max(1, args.repeats))
    path = write_json(RESULTS / "cli_startup.json", doc)
    print(f"wrote {path}", file=sys.stderr)
    if not args.no_doc:
        write_section(
            "cli-startup", "CLI start-up and `oogiri joke` (`bench/cli_startup.py`)", render(doc)
        )


if __name__ == "__main__":
    main()
