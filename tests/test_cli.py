"""The `oogiri` console script, run as a user would (a real subprocess, the tiny demo model)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

OOGIRI = shutil.which("oogiri", path=str(Path(sys.executable).parent)) or "oogiri"


def run(args: list[str], data_dir: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OOGIRI_")}
    env["OOGIRI_DATA_DIR"] = str(data_dir)
    return subprocess.run(
        [OOGIRI, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=data_dir.parent,
    )


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli") / "data"


def test_joke_prints_one_joke_per_skimage_image(data_dir: Path, sample_dir: Path) -> None:
    images = [sample_dir / n for n in ("chelsea.png", "astronaut.png", "coffee.png", "rocket.jpg")]
    result = run(["joke", *map(str, images)], data_dir)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(images)
    for image, line in zip(images, lines, strict=True):
        assert line.startswith(f"{image}: ")
        assert "[model tiny-random-0, joke #" in line
    # The demo model announces itself as noise.
    assert "random noise" in result.stderr and "OOGIRI_ENGINE__MODEL" in result.stderr


def test_joke_json_and_bad_input(data_dir: Path, sample_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a picture at all")
    result = run(["joke", "--json", str(sample_dir / "chelsea.png"), str(bad)], data_dir)
    assert result.returncode == 1  # one failure → non-zero exit, the good image still answered
    good, err = (json.loads(line) for line in result.stdout.strip().splitlines())
    assert good["model_version"] == "tiny-random-0" and good["joke_id"] > 0 and "text" in good
    assert err["error"] == "not_image" and err["message"]


def test_plugins_db_upgrade_and_config(data_dir: Path) -> None:
    plugins = run(["plugins"], data_dir)
    assert plugins.returncode == 0
    for name in ("web", "engine_transformers", "engine_instant"):
        assert name in plugins.stdout
    assert run(["db", "upgrade"], data_dir).returncode == 0
    assert (data_dir / "oogiri.sqlite3").exists()
    shown = json.loads(run(["config", "show"], data_dir).stdout)
    assert shown["data_dir"] == str(data_dir)
