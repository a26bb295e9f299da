"""``oogiri train …`` / ``oogiri models …`` end to end with the stand-in trainer, the training-venv
set-up (a command builder: it cannot run in CI) and the scheduler inside ``oogiri serve``."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from trainhelp import (
    invoke,
    seed_ratings,
    train_run_env,
)

import training.cli as tcli
from bot.settings import Settings
from bot.store import Store
from training.environment import (
    CHECK_SCRIPT,
    DEEPSPEED,
    PINS,
    check_problems,
    check_venv,
    download_steps,
    parse_check,
    setup_steps,
    write_torchrun_shim,
)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    return train_run_env(tmp_path, monkeypatch)


def seed(env: dict[str, Any], n: int = 8) -> None:
    async def main() -> None:
        store = Store(env["db"], env["tmp"] / "data" / "images")
        await store.upgrade()
        await seed_ratings(store, n)
        await store.close()

    asyncio.run(main())


def test_the_plugin_is_registered_through_its_entry_point() -> None:
    eps = {ep.name: ep.value for ep in entry_points(group="oogiri")}
    if "training" not in eps:
        pytest.skip("the installed metadata predates the training entry point (pip install -e .)")
    assert eps["training"] == "training.cli"


def test_export_and_config_commands(env: dict[str, Any]) -> None:
    seed(env)
    out = env["tmp"] / "export"
    r = invoke("train", "export", "--out", str(out))
    assert r.exit_code == 0, r.output
    card = json.loads(r.stdout)
    assert card["counts"]["train"] == 6 and (out / "train.json").is_file()
    r = invoke("train", "config", str(out))
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert plan["total_iters"] == 12 and Path(plan["config"]).is_file()
    r = invoke("train", "export", "--out", str(out))  # not empty any more
    assert r.exit_code == 1 and "not empty" in r.output


def test_run_list_rollback_promote(env: dict[str, Any]) -> None:
    seed(env)
    r = invoke("train", "run")
    assert r.exit_code == 0, r.output
    assert "succeeded" in r.output and "promoted" in r.output
    swaps = json.loads(env["swaps"].read_text())
    assert len(swaps) == 1 and "/models/ft-" in swaps[0][0]
    version = swaps[0][1]

    listed = json.loads(invoke("models", "list", "--json").stdout)
    assert [(m["version"], m["status"]) for m in listed] == [
        ("base-v0", "retired"),
        (version, "active"),
    ]
    assert listed[1]["parent"] == "base-v0" and listed[1]["gate"] == "passed"
    table = invoke("models", "list")
    assert table.exit_code == 0 and version in table.stdout

    r = invoke("models", "rollback")
    assert r.exit_code == 0 and "active base-v0" in r.output
    assert json.loads(env["swaps"].read_text())[-1] == [
        str(env["tmp"] / "InternVL2-2B"),
        "base-v0",
    ]
    r = invoke("models", "promote", version)
    assert r.exit_code == 0 and f"active: {version} (was base-v0)" in r.output
    r = invoke("models", "promote", "nope")
    assert r.exit_code == 1 and "no model version 'nope'" in r.output

    r = invoke("train", "run", "--if-due")  # period not over, not enough new ratings
    assert r.exit_code == 0 and "not due" in r.output
    r = invoke("train", "status")
    assert r.exit_code == 0 and "succeeded" in r.stdout


def test_failed_run_exits_non_zero(env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    seed(env)
    monkeypatch.setenv("FAKE_XTUNER", "rc")
    r = invoke("train", "run", "--verbose")
    assert r.exit_code == 1
    assert "failed" in r.output and "RuntimeError: NCCL error" in r.output
    assert not env["swaps"].exists()


def test_gate_rejection_via_the_cli(env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    seed(env)
    monkeypatch.setenv("FAKE_EVAL_CANDIDATE_LOSS", "3.0")
    r = invoke("train", "run")
    assert r.exit_code == tcli.EXIT_REJECTED, r.output  # 3, not 0: cron/systemd can tell
    assert "rejected" in r.output and "FAIL heldout_loss" in r.output
    assert not env["swaps"].exists()


# --------------------------------------------------------------------------- setup


def test_setup_print_builds_the_field_notes_recipe(env: dict[str, Any]) -> None:
    r = invoke("train", "setup", "--print", "--venv", "/opt/xt", "--python", "python3.12")
    assert r.exit_code == 0
    lines = r.stdout.strip().splitlines()
    assert lines[0] == "python3.12 -m venv --system-site-packages /opt/xt"
    assert lines[2].startswith("/opt/xt/bin/python -m pip install --no-deps ")
    pins = ("xtuner==0.2.0", "transformers==4.48.0", "mmengine==0.10.6", "peft==0.14.0")
    for pin in (
        *pins,
        "bitsandbytes==0.50.2",
        "scikit-image==",
        "timm==",
        "opencv-python-headless",
    ):
        assert pin in lines[2]
    assert lines[3] == (
        "DS_BUILD_OPS=0 /opt/xt/bin/python -m pip install --no-deps --no-build-isolation "
        "deepspeed==0.16.2"
    )
    assert lines[1].startswith("# see the creating python's packages")
    assert lines[4].startswith("# bind torchrun")
    offline = invoke(
        "train", "setup", "--print", "--venv", "/v", "--wheels", "/w", "--extra", "opencv-python"
    )
    assert "--no-index --find-links /w" in offline.stdout
    assert offline.stdout.splitlines()[2].endswith(f"{PINS[-1]} opencv-python")
    dl = invoke("train", "setup", "--download", "/w")
    assert "pip download --no-deps -d /w --only-binary=:all: --python-version 3.12" in dl.stdout
    assert "--no-binary=:all: deepspeed==0.16.2" in dl.stdout


def test_setup_steps_and_torchrun_shim(tmp_path: Path) -> None:
    steps = setup_steps(tmp_path / "v", "python3", None, system_site_packages=False)
    assert steps[0].argv == ["python3", "-m", "venv", str(tmp_path / "v")]
    assert steps[1].argv[-len(PINS) :] == list(PINS)
    assert steps[2].env == {"DS_BUILD_OPS": "0"} and steps[2].argv[-1] == DEEPSPEED
    (tmp_path / "v" / "bin").mkdir(parents=True)
    steps[3].action()
    shim = tmp_path / "v" / "bin" / "torchrun"
    assert os.access(shim, os.X_OK)
    assert shim.read_text().startswith(f"#!{tmp_path / 'v' / 'bin' / 'python'}\n")
    assert (
        "from torch.distributed.run import main" in write_torchrun_shim(tmp_path / "v").read_text()
    )
    assert steps[4].argv == [str(tmp_path / "v" / "bin" / "python"), "-c", CHECK_SCRIPT]
    assert download_steps(tmp_path)[0].argv[-1] == PINS[-1]


def test_a_venv_made_by_a_venv_python_sees_its_packages(tmp_path: Path) -> None:
    """The device's python3 is a venv holding CUDA torch; --system-site-packages alone missed it."""
    import subprocess
    import sys

    assert sys.prefix != sys.base_prefix  # the test suite runs in a venv: the device's situation
    steps = setup_steps(tmp_path / "xt", sys.executable, None)
    steps[0].argv = [*steps[0].argv[:-1], "--without-pip", steps[0].argv[-1]]  # fast, offline
    subprocess.run(steps[0].argv, check=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    base = [str(Path(sys.base_prefix) / "bin" / "python3"), "-c"]
    only_here = next(  # a test dependency of this venv that the base interpreter lacks
        (m for m in ("aiosqlite", "hypothesis", "pydantic_settings", "alembic", "pluggy")
         if subprocess.run([*base, f"import {m}"], env=env, capture_output=True).returncode),
        None,
    )  # fmt: skip
    if only_here is None:
        pytest.skip("the base interpreter has every probe module")
    probe = [
        str(tmp_path / "xt" / "bin" / "python"),
        "-c",
        f"import {only_here} as m; print(m.__file__)",
    ]
    assert subprocess.run(probe, env=env, capture_output=True).returncode != 0  # the old failure
    assert steps[1].action is not None and "creating python" in steps[1].description
    steps[1].action()
    seen = subprocess.run(probe, env=env, capture_output=True, text=True, check=True).stdout
    assert seen.startswith(sys.prefix)  # found in the creating venv's site-packages
    own_first = subprocess.run(
        [str(tmp_path / "xt" / "bin" / "python"), "-c", "import sys; print(sys.path)"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert own_first.index(str(tmp_path / "xt")) < own_first.index(sys.prefix + "/lib")


GOOD_REPORT = {
    "python": "3.12.3",
    "versions": {
        "torch": "2.11.0+cu130",
        "transformers": "4.48.0",
        "mmengine": "0.10.6",
        "xtuner": "0.2.0",
        "bitsandbytes": "0.50.2",
        "deepspeed": "0.16.2",
    },
    "errors": {},
    "xtuner_internvl": True,
    "convert_script": "/v/lib/xtuner/configs/internvl/v1_5/convert_to_official.py",
    "convert_script_exists": True,
    "cuda": True,
    "model": "/models/InternVL2-2B",
    "model_code": True,
    "dataset": {"samples": 1, "input_ids": 1300, "pixel_values": [7, 3, 448, 448]},
}


def test_check_problems() -> None:
    assert check_problems(GOOD_REPORT) == ([], [])
    bad = json.loads(json.dumps(GOOD_REPORT))
    bad["python"] = "3.13.1"
    bad["versions"]["bitsandbytes"] = "0.45.0"
    bad["versions"]["transformers"] = "4.56.1"
    bad["errors"]["deepspeed"] = "ModuleNotFoundError: No module named 'deepspeed'"
    bad["convert_script_exists"] = False
    bad["cuda"] = False
    problems, warnings = check_problems(bad)
    assert len(problems) == 5 and len(warnings) == 1
    assert "bitsandbytes 0.45.0 has no CUDA 13 build (needs >= 0.48)" in problems
    assert "transformers 4.56.1 (needs 4.48.0)" in problems
    assert parse_check('noise\nOOGIRI-CHECK {"python": "3.12"}\n') == {"python": "3.12"}


def test_check_runs_in_a_real_interpreter(tmp_path: Path) -> None:
    """This machine's python is not a training venv: the check says exactly why."""
    report, problems, _ = check_venv(Path(sys.executable))
    assert report["python"] == sys.version.split()[0]
    assert any(p.startswith("xtuner does not import") for p in problems)
    garbage = tmp_path / "python"
    garbage.write_text("#!/bin/sh\necho oops >&2\nexit 1\n")
    garbage.chmod(0o755)
    _, problems, _ = check_venv(garbage)
    assert problems == [f"{garbage} could not run the check: oops"]


def test_setup_check_exit_code(env: dict[str, Any]) -> None:
    venv = env["tmp"] / "realvenv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    r = invoke("train", "setup", "--check", "--venv", str(venv))
    assert r.exit_code == 1 and "problem:" in r.output and "xtuner" in r.output


def test_setup_runs_its_steps_in_order(
    env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    ran: list[list[str]] = []

    def fake_run(argv: list[str], env: dict[str, str], check: bool, **kw: Any) -> Any:
        ran.append(argv)
        if argv[1:3] == ["-m", "venv"]:
            (Path(argv[-1]) / "bin").mkdir(parents=True)
        if "sysconfig" in argv[-1]:  # link_parent_site asks the venv for its purelib
            (venv / "lib").mkdir(parents=True, exist_ok=True)
            return subprocess.CompletedProcess(argv, 0, stdout=str(venv / "lib") + "\n")
        if "getsitepackages" in argv[-1]:  # … and the creating python for its packages
            return subprocess.CompletedProcess(argv, 0, stdout="/opt/torch/site-packages\n")
        return subprocess.CompletedProcess(argv, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(
        "training.environment.check_venv", lambda python, model=None: (GOOD_REPORT, [], [])
    )
    venv = env["tmp"] / "newvenv"
    r = invoke("train", "setup", "--venv", str(venv))
    assert r.exit_code == 0, r.output
    assert [a[1:3] for a in ran if a[1] == "-m"] == [["-m", "venv"], ["-m", "pip"], ["-m", "pip"]]
    assert (venv / "lib" / "zz_oogiri_parent_site.pth").read_text() == "/opt/torch/site-packages\n"
    assert (venv / "bin" / "torchrun").is_file()
    assert f"OOGIRI_TRAINING__XTUNER_PYTHON={venv / 'bin' / 'python'}" in r.output


# --------------------------------------------------------------------------- inside oogiri serve


async def test_scheduler_inside_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []

    async def fake_run_guarded(settings: Any, store: Any, **kw: Any) -> Any:
        calls.append(kw)
        return SimpleNamespace(status="succeeded")

    monkeypatch.setattr("training.run.run_guarded", fake_run_guarded)
    settings = Settings(_env_file=None)
    swapped: list[str] = []
    app = SimpleNamespace(settings=settings, state={}, store=object(), pm=None)
    assert tcli.oogiri_startup(app=app) is None  # off by default
    settings.training.schedule_in_serve = True
    settings.training.schedule_check_minutes = 0.0005
    app.state["promote_model"] = lambda version, model_dir: swapped.append(version)
    await tcli.oogiri_startup(app=app)
    for _ in range(100):
        if len(calls) >= 2:
            break
        await asyncio.sleep(0.02)
    await tcli.oogiri_shutdown(app=app)
    assert "training_scheduler" not in app.state
    assert len(calls) >= 2 and all(c["if_due"] for c in calls)
    promoter = calls[0]["promoter"]
    await promoter.promote("v9", Path("/m"))
    assert swapped == ["v9"]
    assert tcli.oogiri_shutdown(app=app) is None


def test_seed_demo_then_export(env: dict[str, Any]) -> None:
    r = invoke("train", "seed-demo", "--jokes", "12")
    assert r.exit_code == 0, r.output
    assert "12 demo jokes" in r.output
    r = invoke("train", "export", "--out", str(env["tmp"] / "e"))
    assert r.exit_code == 0, r.output
    card = json.loads(r.stdout)
    assert card["counts"]["rated_jokes"] == 12 and card["counts"]["train"] >= 2
