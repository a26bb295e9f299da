"""bench/serve.py runs end to end on CPU against the fake api_server (tiny counts)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pydantic
import pytest
from enginesupport import FAKES
from test_lmdeploy_server import free_port_block, model_dir

ROOT = Path(__file__).resolve().parents[2]


def test_serve_bench_smoke(tmp_path: Path) -> None:
    plan = {
        "model": str(model_dir(tmp_path, "model")),
        "warmup_s": 0.3,
        "measure_s": 1.0,
        "max_new_tokens": 16,
        "port": free_port_block(),
        "configs": [
            {
                "name": "seed",
                "launch": {
                    "servers": 1,
                    "server_threads": None,
                    "server_command": [sys.executable, str(FAKES / "fake_lmdeploy.py")],
                },
                "cells": [
                    {"path": "raw", "inflight": 1, "mdp": 6, "presize": False, "baseline": True}
                ],
            },
            {
                "name": "two servers",
                "launch": {
                    "servers": 2,
                    "server_threads": 2,
                    "server_command": [sys.executable, str(FAKES / "fake_lmdeploy.py")],
                },
                "cells": [
                    {"path": ["raw", "service"], "inflight": [1, 4], "mdp": [1, 6]},
                ],
            },
            {
                "name": "bot processes",
                "launch": {
                    "servers": 1,
                    "server_command": [sys.executable, str(FAKES / "fake_lmdeploy.py")],
                },
                "cells": [{"path": "web", "inflight": 4, "mdp": 6, "bots": 2}],
            },
        ],
    }
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(plan))
    out = tmp_path / "out"
    env = {
        **os.environ,
        "FAKE_LMDEPLOY_DELAY_S": "0.02",
        "FAKE_LMDEPLOY_STARTUP_S": "0.2",
        "PYTHONPATH": str(ROOT),  # python -m bench.serve from another folder
    }
    result = subprocess.run(
        [sys.executable, "-m", "bench.serve", "--plan", str(plan_path),
         "--no-phone-size", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads((out / "serve-results.json").read_text())
    rows = doc["rows"]
    assert len(rows) == 1 + 2 * 2 * 2 + 1
    assert len((out / "serve-results.jsonl").read_text().splitlines()) == len(rows)
    for row in rows:
        assert "skipped" not in row, row
        assert row["ok"] > 0 and row["errors"] == {} and row["jokes_per_s"] > 0, row
        assert row["completion_tokens"] == 16  # ignore_eos reached the server
        assert row["p50_s"] <= row["p95_s"] <= row["p99_s"]
    by = {(r["config"], r["path"], r["inflight"], r["mdp"]): r for r in rows}
    assert (
        by[("two servers", "raw", 4, 6)]["prompt_tokens"]
        > by[("two servers", "raw", 4, 1)]["prompt_tokens"]
    )
    seed = by[("seed", "raw", 1, 6)]
    assert seed["baseline"] and seed["server_threads"] is None and not seed["presize"]
    web = by[("bot processes", "web", 4, 6)]
    assert web["bots"] == 2
    # both real `oogiri serve` processes answered and stored jokes
    stored = []
    for db in sorted((out / "bots").glob("*/bot-*/oogiri.sqlite3")):
        with sqlite3.connect(db) as conn:
            stored.append(conn.execute("select count(*) from jokes").fetchone()[0])
    assert len(stored) == 2 and min(stored) > 0, stored
    md = (out / "serve.md").read_text()
    assert "| web (2 bots) | 4 | 6 |" in md
    assert "| two servers | 2 | 2 | service | 4 | 6 | yes |" in md
    assert "raw (seed)" in md and "Best through the bot at 6 tiles" in md
    assert (out / "logs" / f"lmdeploy-{plan['port']}.log").exists()
    log = (out / "logs" / f"lmdeploy-{plan['port'] + 1}.log").read_text()
    assert "OMP_NUM_THREADS=2" in log  # the second config set the thread env
    # re-rendering saved results needs no server
    again = subprocess.run(
        [sys.executable, "-m", "bench.serve", "--render",
         str(out / "serve-results.json")],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert again.returncode == 0 and "| two servers |" in again.stdout


def test_a_failed_config_renders_as_one_table_row_with_its_cause() -> None:
    from bench.serve import failure_summary, render_markdown

    log_tail = (
        "lmdeploy api_server for bench-0 not healthy after 170 s; log /x/lmdeploy-23333.log:\n"
        '  File "/x/patch.py", line 184, in _get_model_class\n'
        "    assert getattr(config.language_config, 'architectures', []) is not None\n"
        "AttributeError: 'LlamaConfig' object has no attribute 'language_config'\n"
        "2026-11-26 01:36:42,919 - lmdeploy - ERROR - exiting | bye\n"
    )
    reason = failure_summary(RuntimeError(log_tail))
    assert reason.startswith("lmdeploy api_server for bench-0 not healthy after 170 s")
    assert reason.endswith(
        "AttributeError: 'LlamaConfig' object has no attribute 'language_config'"
    )
    doc = {
        "meta": {"gpu": ["GPU"], "cpus": 1, "lmdeploy": "0", "model": "m", "max_new_tokens": 1},
        "rows": [{"config": "fp8", "skipped": "failed: " + reason + "\n| and | more"}],
    }
    table = [ln for ln in render_markdown(doc).splitlines() if ln.startswith("| fp8")]
    assert len(table) == 1 and table[0].count(" | ") == table[0].replace("\\|", "").count(" | ")
    assert table[0].count("|") - table[0].count("\\|") == 16  # 15 columns
    assert "'LlamaConfig' object has no attribute" in table[0]


def test_a_plan_expands_its_sweeps_in_order_and_refuses_typos() -> None:
    from bench.serve import Plan

    doc = {
        "model": "/m",
        "configs": [
            {
                "name": "c",
                "launch": {"servers": 1},
                "cells": [
                    {"path": ["raw", "service"], "inflight": [1, 8], "mdp": 6, "baseline": True},
                    {"path": "web", "bots": [1, 2]},
                ],
            }
        ],
    }
    cells = Plan.model_validate(doc).configs[0].cells
    assert [(c.path, c.inflight, c.bots) for c in cells] == [
        ("raw", 1, 1), ("raw", 8, 1), ("service", 1, 1), ("service", 8, 1),
        ("web", 1, 1), ("web", 1, 2),
    ]  # fmt: skip
    assert all(c.baseline for c in cells[:4]) and not cells[4].baseline
    doc["configs"][0]["cells"][0]["infligth"] = [64]
    with pytest.raises(pydantic.ValidationError):
        Plan.model_validate(doc)


def test_every_committed_plan_validates() -> None:
    from bench.serve import Plan

    plans = sorted((ROOT / "bench" / "plans").glob("serve-*.json"))
    assert plans
    for path in plans:
        Plan.model_validate_json(path.read_text(encoding="utf-8"))
