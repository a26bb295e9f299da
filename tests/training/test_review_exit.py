"""Review: bootstrap checks its training environment before downloading, and one exit-status
convention for ``oogiri train run`` and ``oogiri train bootstrap``.

1. ``oogiri train bootstrap`` without the training venv pulled the 4.4 GB model and the 1.37 GB
   pictures, built the data set, and only then failed in the run's config step (exit 1). Now
   everything that can be checked in a second (options, settings, the folders it writes, the venv
   and its python) is checked first: one message naming ``oogiri train setup``, exit 2, nothing
   downloaded.
2. A candidate the gate rejected exited 0 from ``oogiri train run`` and 2 from bootstrap (the
   status click gives a usage error). Now both: 0 succeeded or nothing to do, 1 failed,
   2 usage or configuration error, 3 rejected, 75 busy (docs/training.md "Exit status").
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fake_hub import FakeHub  # pyright: ignore[reportMissingImports]
from trainhelp import (
    bootstrap_env,
    fake_venv,
    hub_downloads,
    invoke,
    seed_ratings,
    train_run_env,
)

from bot.settings import Settings
from bot.store import Store
from training.bootstrap import read_state
from training.cli import EXIT_BUSY, EXIT_FAILED, EXIT_REJECTED, EXIT_USAGE

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def boot(fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Bootstrap's settings as test_bootstrap.py has them, but no training venv yet."""
    bootstrap_env(tmp_path, monkeypatch, venv=False)
    return {"tmp": tmp_path, "data": tmp_path / "data", "hub": fake_hub}


def hub_calls(h: FakeHub) -> list[dict[str, Any]]:
    return [r for r in h.requests if "/api/" in r["path"] or "/resolve/" in r["path"]]


def assert_refused(r: Any, boot: dict[str, Any], *needles: str) -> None:
    assert r.exit_code == EXIT_USAGE, r.output
    assert "Traceback" not in r.output, r.output
    assert "nothing was downloaded" in r.output, r.output
    for needle in needles:
        assert needle in r.output, (needle, r.output)
    assert hub_calls(boot["hub"]) == [], "asked the hub before the checks"
    assert not (boot["data"] / "models").exists() and not (boot["data"] / "datasets").exists()
    assert not (boot["data"] / "training" / "bootstrap" / "state.json").exists()


# --------------------------------------------------------------------------- 1. checked first


def test_bootstrap_without_a_training_venv_downloads_nothing(boot: dict[str, Any]) -> None:
    """The defect as reported: no `oogiri train setup` yet. It downloaded everything, built the
    data set and then failed (exit 1) in the run's config step."""
    r = invoke("train", "bootstrap", "--n", "6", "--epochs", "2")
    assert_refused(r, boot, "oogiri train setup", str(boot["data"] / "xtuner-venv"))
    assert "OOGIRI_TRAINING__XTUNER_PYTHON" in r.output
    # the download-only commands need no training venv
    assert invoke("model", "pull").exit_code == 0
    r = invoke("data", "oogiri-go", "--n", "4")
    assert r.exit_code == 0, r.output


def _broken_python(venv: Path, how: str) -> Path:
    python = fake_venv(venv)
    if how == "missing":
        python.unlink()
    elif how == "not-executable":
        python.chmod(0o644)
    elif how == "does-not-run":  # e.g. its base interpreter was removed
        python.write_text("#!/bin/sh\necho 'libpython3.12.so.1.0: cannot open' >&2\nexit 127\n")
    elif how == "no-xtuner-command":
        (venv / "bin" / "xtuner").unlink()
    elif how == "no-xtuner-package":  # setup stopped before pip installed the pins
        python.write_text(f'#!/bin/sh\nPYTHONPATH= exec "{sys.executable}" "$@"\n')
    return python


@pytest.mark.parametrize(
    ("how", "says"),
    [
        ("missing", "does not exist"),
        ("not-executable", "does not run"),
        ("does-not-run", "cannot open"),
        ("no-xtuner-command", "no xtuner command"),
        ("no-xtuner-package", "xtuner is not installed"),
    ],
)
def test_bootstrap_with_a_broken_training_venv_downloads_nothing(
    boot: dict[str, Any], monkeypatch: pytest.MonkeyPatch, how: str, says: str
) -> None:
    python = _broken_python(boot["tmp"] / "venv", how)
    monkeypatch.setenv("OOGIRI_TRAINING__XTUNER_PYTHON", str(python))
    r = invoke("train", "bootstrap", "--n", "6", "--epochs", "2")
    assert_refused(r, boot, says, str(python), "oogiri train setup")


def test_the_default_venv_of_setup_is_found_and_checked(
    boot: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`oogiri train setup` without --venv makes data_dir/xtuner-venv: no setting needed."""
    python = _broken_python(boot["data"] / "xtuner-venv", "does-not-run")
    r = invoke("train", "bootstrap", "--n", "6", "--epochs", "2")
    assert_refused(r, boot, str(python), "cannot open")


def test_bootstrap_checks_folders_settings_and_schedule_first(
    boot: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OOGIRI_TRAINING__XTUNER_PYTHON", str(fake_venv(boot["tmp"] / "venv")))
    # a data folder that cannot be made (a file is in the way; root ignores permissions)
    blocked = boot["tmp"] / "blocked"
    blocked.write_text("a file, not a folder")
    monkeypatch.setenv("OOGIRI_DATA_DIR", str(blocked / "data"))
    r = invoke("train", "bootstrap", "--n", "6", "--epochs", "2")
    assert r.exit_code == EXIT_USAGE and "nothing was downloaded" in r.output, r.output
    assert str(blocked) in r.output and hub_calls(boot["hub"]) == []
    monkeypatch.setenv("OOGIRI_DATA_DIR", str(boot["data"]))
    # --n 4 with batch 1 × 1, 2 epochs, warm-up ratio 0.2: the schedule needs 5 samples; this
    # used to download, build, then end "training run skipped" (exit 1)
    r = invoke("train", "bootstrap", "--n", "4", "--epochs", "2")
    assert_refused(r, boot, "--n 4", "at least 5")
    # every problem in one message, with the venv's
    monkeypatch.delenv("OOGIRI_TRAINING__XTUNER_PYTHON")
    r = invoke("train", "bootstrap", "--n", "0", "--lang", "jp")
    assert_refused(r, boot, "--n must be at least 1", "oogiri train setup")
    # settings that do not parse: one line, not a pydantic traceback
    monkeypatch.setenv("OOGIRI_TRAINING__BATCH_SIZE", "four")
    r = invoke("train", "bootstrap")
    assert r.exit_code == EXIT_USAGE and "Traceback" not in r.output, r.output
    assert "invalid settings" in r.output and "OOGIRI_TRAINING__BATCH_SIZE" in r.output
    assert "valid integer" in r.output and "four" not in r.output, r.output  # never the value
    assert hub_calls(boot["hub"]) == []
    r = invoke("train", "run")
    assert r.exit_code == EXIT_USAGE and "invalid settings" in r.output, r.output


def test_a_bootstrap_that_already_trained_needs_no_venv_to_finish(
    boot: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The venv is needed to train, not to promote what an earlier run trained."""
    monkeypatch.setenv("OOGIRI_TRAINING__XTUNER_PYTHON", str(fake_venv(boot["tmp"] / "venv")))
    r = invoke("train", "bootstrap", "--n", "6", "--epochs", "2", "--no-promote")
    assert r.exit_code == 0, r.output
    assert "promote  skipped" in r.output
    monkeypatch.delenv("OOGIRI_TRAINING__XTUNER_PYTHON")
    before = len(hub_downloads(boot["hub"]))
    r = invoke("train", "bootstrap", "--n", "6", "--epochs", "2")
    assert r.exit_code == 0, r.output
    assert "train    skipped" in r.output and "promote  done" in r.output
    assert set(read_state(Settings(_env_file=None))["steps"]) >= {"train", "promote"}
    # new inputs mean training again: refused before the new data set is fetched
    r = invoke("train", "bootstrap", "--n", "7", "--epochs", "2")
    assert r.exit_code == EXIT_USAGE and "oogiri train setup" in r.output, r.output
    assert len(hub_downloads(boot["hub"])) == before
    assert not (boot["data"] / "datasets" / "oogiri-go-cn-7").exists()


# --------------------------------------------------------------------------- 2. exit statuses


@pytest.fixture
def run_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """`oogiri train run` with the stand-in trainer and 8 rated jokes."""
    env = train_run_env(tmp_path, monkeypatch)

    async def seed() -> None:
        store = Store(env["db"], tmp_path / "data" / "images")
        await store.upgrade()
        await seed_ratings(store, 8)
        await store.close()

    asyncio.run(seed())
    return env


def test_train_run_exit_statuses(run_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_EVAL_CANDIDATE_LOSS", "3.0")  # worse than the base: rejected
    r = invoke("train", "run")
    assert r.exit_code == EXIT_REJECTED, r.output
    assert "rejected" in r.output and "FAIL heldout_loss" in r.output
    # --no-promote changes nothing about the verdict
    r = invoke("train", "run", "--no-promote")
    assert r.exit_code == EXIT_REJECTED, r.output
    monkeypatch.delenv("FAKE_EVAL_CANDIDATE_LOSS")
    # a run that cannot start (no training venv) is a configuration error, recorded as failed
    monkeypatch.setenv("OOGIRI_TRAINING__XTUNER_PYTHON", str(run_env["tmp"] / "nowhere" / "py"))
    r = invoke("train", "run")
    assert r.exit_code == EXIT_USAGE and "oogiri train setup" in r.output, r.output
    monkeypatch.setenv("OOGIRI_TRAINING__XTUNER_PYTHON", str(run_env["venv"] / "bin" / "python"))
    monkeypatch.setenv("FAKE_XTUNER", "rc")
    r = invoke("train", "run")
    assert r.exit_code == EXIT_FAILED and "NCCL error" in r.output, r.output
    monkeypatch.delenv("FAKE_XTUNER")
    r = invoke("train", "run")
    assert r.exit_code == 0 and "succeeded" in r.output, r.output
    r = invoke("train", "run", "--if-due")
    assert r.exit_code == 0 and "not due" in r.output, r.output
    r = invoke("train", "run", "--bogus")
    assert r.exit_code == EXIT_USAGE


def test_train_run_with_too_few_samples_has_nothing_to_do(
    run_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OOGIRI_TRAINING__MIN_EXAMPLES", "500")
    r = invoke("train", "run")
    assert r.exit_code == 0 and "skipped" in r.output, r.output


def test_the_convention_is_in_both_commands_help_and_the_docs() -> None:
    codes = {0: "promoted", EXIT_FAILED: "failed", EXIT_USAGE: "usage", EXIT_REJECTED: "rejected"}
    for command in ("run", "bootstrap"):
        r = invoke("train", command, "--help")
        text = " ".join(r.output.split())
        assert "Exit status" in text, text
        for code, word in codes.items():
            assert re.search(rf"\b{code}\b[^.;]*{word}", text), (command, code, text)
        assert str(EXIT_BUSY) in text
    docs = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    section = docs[docs.index("### Exit status") :]
    section = section[: section.index("\n## ")]
    for code in (0, EXIT_FAILED, EXIT_USAGE, EXIT_REJECTED, EXIT_BUSY):
        assert f"| {code} |" in section, code
    assert "SuccessExitStatus" in section


def test_the_deploy_files_do_not_count_a_rejection_as_a_failure(tmp_path: Path) -> None:
    """A rejected candidate is the gate doing its job: the timer's service (or the CronJob's Job)
    must not end up failed, alerting operators, for it; a real failure still must."""
    import yaml

    unit = (ROOT / "deploy" / "systemd" / "oogiri-train.service").read_text(encoding="utf-8")
    success = re.findall(r"^SuccessExitStatus=(.*)$", unit, re.M)
    assert success and success[0].split() == [str(EXIT_REJECTED)], unit
    cron = (ROOT / "deploy" / "kubernetes" / "base" / "train-cronjob.yaml").read_text("utf-8")
    job = yaml.safe_load(cron)["spec"]["jobTemplate"]["spec"]
    (container,) = job["template"]["spec"]["containers"]
    assert container["args"] == ["train", "run", "--if-due"] and job["backoffLimit"] == 0
    # the container's command, run with a stand-in oogiri that exits as told
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "oogiri"
    fake.write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/argv"\nexit "$FAKE_RC"\n')
    fake.chmod(0o755)
    got = {}
    for rc in (0, EXIT_FAILED, EXIT_USAGE, EXIT_REJECTED, EXIT_BUSY):
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_RC": str(rc)}
        proc = subprocess.run([*container["command"], *container["args"]], env=env, check=False)
        got[rc] = proc.returncode
        assert (bin_dir / "argv").read_text().split() == ["train", "run", "--if-due"]
    assert got == {0: 0, EXIT_FAILED: EXIT_FAILED, EXIT_USAGE: EXIT_USAGE, EXIT_REJECTED: 0,
                   EXIT_BUSY: EXIT_BUSY}  # fmt: skip
