"""tests/gpu/test_lmdeploy_gpu.py's scenario, run on CPU against the fake server (OOGIRI_GPU_FAKE).

Device time is scarce: this keeps the GPU script from rotting between device runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_scenario_dry_run(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    out = tmp_path / "out"
    env = {
        **os.environ,
        "OOGIRI_GPU_FAKE": "1",
        "OOGIRI_GPU_MODEL": str(model),
        "OUT": str(out),
        "FAKE_LMDEPLOY_DELAY_S": "0.05",
    }
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "gpu" / "test_lmdeploy_gpu.py")],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["swap_under_load"]["ok"] and report["swap_under_load"]["failed"] == 0
    assert report["capture"]["ok"] and report["client_against_real_errors"]["ok"]
    assert "stopped tiny-a" in (out / "swap.log").read_text()
    assert (out / "fixtures" / "chat_success.json").exists()
    assert sorted(p.name for p in (out / "logs").glob("*.log"))
