"""The whole run with a stand-in trainer: export → xtuner train → convert → restore code →
evaluate → register → promote; a failure at any step leaves the active model untouched."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from trainhelp import FAKES, fake_base_model, fake_venv, seed_ratings

from bot.hookspecs import hookimpl
from bot.plugins import make_manager
from bot.settings import Settings
from bot.store import Store
from training.gate import EvalResult
from training.lock import LockBusy, training_lock
from training.run import (
    CallablePromoter,
    CommandPromoter,
    RunEvents,
    RunResult,
    TrainingPipeline,
    TrainProgress,
    ensure_registry,
    find_checkpoint,
    parse_progress,
    promote_version,
    rollback,
    run_guarded,
    training_env,
    work_dir_of,
)
from training.schedule import DueDecision

GOOD = ["这只猫刚刚发现冰箱是空的。", "科学家发现咖啡喝多了会以为自己是火箭。"]


def text_of(path: Path | str) -> str:
    return Path(path).read_text(encoding="utf-8")


def images_exist(heldout: Path, image_root: Path) -> list[dict[str, Any]]:
    items = json.loads(text_of(heldout))
    for item in items:
        assert (image_root / item["image"][0]).is_file()
    return items


class FakeEvaluator:
    """Test double: the candidate (a folder under work_dir/models) and the active model get the
    configured losses."""

    def __init__(self, cand: float = 1.0, active: float = 2.0, fail: bool = False) -> None:
        self.cand, self.active, self.fail = cand, active, fail
        self.calls: list[Path] = []

    async def evaluate(self, model_dir: Path, heldout: Path, image_root: Path) -> EvalResult:
        self.calls.append(model_dir)
        if self.fail:
            raise RuntimeError("CUDA error: device-side assert triggered")
        items = images_exist(heldout, image_root)
        loss = self.cand if "models" in model_dir.parts else self.active
        return EvalResult(str(model_dir), len(items), 10 * len(items), loss, GOOD * len(items))


class RecordingPromoter:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.calls: list[tuple[str, Path]] = []

    async def promote(self, version: str, model_dir: Path) -> None:
        self.calls.append((version, model_dir))
        if self.fail:
            raise RuntimeError("the new server never became healthy")


class Recorder(RunEvents):
    def __init__(self) -> None:
        self.steps: list[str] = []
        self.progress_seen: list[TrainProgress] = []
        self.lines: list[str] = []
        self.result: RunResult | None = None

    def step(self, name: str) -> None:
        self.steps.append(name)

    def progress(self, p: TrainProgress) -> None:
        self.progress_seen.append(p)

    def line(self, text: str) -> None:
        self.lines.append(text)

    def done(self, result: RunResult) -> None:
        self.result = result


class PromotedHook:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []

    @hookimpl
    def oogiri_model_promoted(self, version: str, previous: str | None) -> None:
        self.calls.append((version, previous))


@pytest.fixture
def rig(tmp_path: Path, tsettings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    for var in ("NPROC_PER_NODE", "NNODES", "NODE_RANK", "ADDR", "PORT", "FAKE_XTUNER"):
        monkeypatch.delenv(var, raising=False)
    t = tsettings.training
    t.base_model = fake_base_model(tmp_path / "InternVL2-2B")
    t.xtuner_python = fake_venv(tmp_path / "xtuner-venv")
    t.work_dir = tmp_path / "work"
    t.min_examples = 2
    t.heldout_fraction = 0.25
    t.batch_size = 1
    t.accumulative_counts = 1
    t.max_epochs = 2
    t.warmup_ratio = 0.2
    t.max_length = 1024
    t.dataloader_num_workers = 0
    return tsettings


def pipeline(settings: Settings, store: Store, **kw: Any) -> TrainingPipeline:
    kw.setdefault("evaluator", FakeEvaluator())
    kw.setdefault("promoter", RecordingPromoter())
    return TrainingPipeline(settings, store, **kw)


async def snapshot(store: Store) -> tuple[Any, list[tuple[str, str]]]:
    active = await store.active_model()
    versions = [(v.version, v.status) for v in await store.model_versions()]
    return (active.version, active.promoted_at, active.path) if active else None, versions


# --------------------------------------------------------------------------- the happy path


async def test_full_run_trains_converts_evaluates_registers_and_promotes(
    rig: Settings, tstore: Store
) -> None:
    await seed_ratings(tstore, 8)
    events = Recorder()
    hook = PromotedHook()
    promoter = RecordingPromoter()
    evaluator = FakeEvaluator(cand=1.2, active=2.0)
    p = pipeline(
        rig, tstore, events=events, promoter=promoter, evaluator=evaluator,
        pm=make_manager(only=[], extra=[hook]),
    )  # fmt: skip
    result = await p.run()

    assert result.status == "succeeded" and result.promoted, result.error
    assert events.steps == [
        "export", "config", "train", "convert", "restore_code", "evaluate", "register", "promote",
    ]  # fmt: skip
    version = result.version
    assert version and version.startswith("ft-") and version.endswith(f"-r{result.run_id}")

    # training: the xtuner command, its environment, live progress from its log
    work = rig.training.work_dir / "runs" / f"run-{result.run_id:05d}"
    call = json.loads((work / "xtuner" / "fake_xtuner_call.json").read_text())
    assert call["argv"] == [
        "train", str(work / "xtuner_config.py"), "--work-dir", str(work / "xtuner"),
        "--deepspeed", "deepspeed_zero1",
    ]  # fmt: skip
    assert call["env"]["PATH"].split(":")[0] == str(rig.training.xtuner_python.parent)
    assert call["env"]["NPROC_PER_NODE"] == "1" and call["env"]["NNODES"] == "1"
    plan = result.metrics["plan"]
    assert plan["total_iters"] == 12 and plan["samples"] == 6  # 8 images, 2 held out
    assert [p.iteration for p in events.progress_seen] == list(range(1, 13))
    assert events.progress_seen[-1].total == 12 and events.progress_seen[-1].loss is not None
    assert result.metrics["train"]["iterations"] == 12
    assert result.metrics["train"]["final_loss"] == pytest.approx(2.5 / 12**0.5, abs=1e-4)

    # the merged model: weights from convert, remote code restored, version marker
    model_dir = result.model_dir
    assert model_dir == rig.training.work_dir / "models" / version
    assert (model_dir / "model.safetensors").read_bytes() == b"base weights"
    assert sorted(p.name for p in model_dir.glob("*.py")) == [
        "configuration_internvl_chat.py", "conversation.py", "modeling_internvl_chat.py",
    ]  # fmt: skip
    marker = json.loads((model_dir / "oogiri-model.json").read_text())
    assert marker["version"] == version and marker["parent"] == "base-v0"
    assert marker["layout"] == "internvl2"
    assert not list((rig.training.work_dir / "models").glob(".*partial"))

    # evaluation: candidate and active on the held-out set
    assert evaluator.calls == [model_dir, rig.training.base_model]
    assert result.decision is not None and result.decision.passed

    # registry: the base registered first, the new version active with its lineage
    rows = {v.version: v for v in await tstore.model_versions()}
    assert rows["base-v0"].status == "retired"
    row = rows[version]
    assert row.status == "active" and row.parent == "base-v0" and row.path == str(model_dir)
    assert row.data_card["counts"]["train"] == 6 and row.data_card["counts"]["heldout"] == 2
    assert "InternVL_V1_5" in row.config and "deepspeed" not in row.config
    assert row.metrics["gate"]["verdict"] == "passed"
    assert row.metrics["eval"]["candidate"]["loss"] == 1.2
    assert promoter.calls == [(version, model_dir)]
    assert hook.calls == [(version, "base-v0")]

    # the run row and its log
    (run,) = await tstore.training_runs()
    assert run.status == "succeeded" and run.model_version == version and run.error is None
    assert run.finished_at is not None and run.metrics["promoted"] is True
    assert set(run.metrics["timings_s"]) >= {"export", "train", "convert", "evaluate", "promote"}
    log = text_of(run.log_path)
    assert "Iter(train) [12/12]" in log and "promoted " + version in log
    assert "$ " + str(rig.training.xtuner_python.parent / "xtuner") in log


async def test_gate_rejection_registers_but_keeps_the_active_model(
    rig: Settings, tstore: Store
) -> None:
    await seed_ratings(tstore)
    promoter = RecordingPromoter()
    result = await pipeline(
        rig, tstore, evaluator=FakeEvaluator(cand=2.5, active=2.0), promoter=promoter
    ).run()
    assert result.status == "rejected" and not result.promoted
    assert promoter.calls == []
    active, versions = await snapshot(tstore)
    assert active[0] == "base-v0"
    assert (result.version, "rejected") in versions
    assert "worse than the active model" in " ".join(result.decision.reasons)
    (run,) = await tstore.training_runs()
    assert run.status == "rejected"


async def test_no_promote_option(rig: Settings, tstore: Store) -> None:
    await seed_ratings(tstore)
    promoter = RecordingPromoter()
    result = await pipeline(rig, tstore, promoter=promoter).run(promote=False)
    assert result.status == "succeeded" and not result.promoted and promoter.calls == []
    assert (await tstore.active_model()).version == "base-v0"
    assert (await tstore.get_model_version(result.version)).status == "candidate"


async def test_too_little_data_skips_without_touching_anything(
    rig: Settings, tstore: Store
) -> None:
    rig.training.min_examples = 50
    await seed_ratings(tstore, 3)
    result = await pipeline(rig, tstore).run()
    assert result.status == "skipped" and "min_examples is 50" in result.error
    (run,) = await tstore.training_runs()
    assert run.status == "skipped" and run.step == "export"


# --------------------------------------------------------------------------- failures


def fail_restore(*args: Any) -> None:
    raise OSError("No space left on device")


FAILURES = {
    # name: (expected step, settings/env tweak, expected text in the error)
    "export-bad-base": ("export", {"base_dataset": "missing.json"}, "cannot read data set"),
    # too few samples for the warm-up is a skip now (test_training_defaults.py), not a failure
    "config-max-length": ("config", {"max_length": 300}, "cannot hold one image"),
    "config-no-venv": ("config", {"xtuner_python": "/nonexistent/bin/python"}, "does not exist"),
    "config-nnodes-without-port": ("config", {"env:NNODES": "2"}, "needs ADDR and PORT"),
    "train-exit-code": ("train", {"env:FAKE_XTUNER": "rc"}, "exited with 1: RuntimeError: NCCL"),
    "train-crash-swallowed": ("train", {"env:FAKE_XTUNER": "crash"}, "no checkpoint"),
    "train-stopped-early": ("train", {"env:FAKE_XTUNER": "early"}, "iteration 6 of 12"),
    "convert-exit-code": ("convert", {"env:FAKE_CONVERT": "rc"}, "ValueError: checkpoint"),
    "convert-no-model": ("convert", {"env:FAKE_CONVERT": "empty"}, "wrote no model"),
    "convert-script-missing": ("convert", {"convert_script": "/nope.py"}, "not found"),
    "restore-code": ("restore_code", {"patch:restore": True}, "No space left"),
    "evaluate": ("evaluate", {"evaluator_fail": True}, "device-side assert"),
    "register": ("register", {"patch:register": True}, "database is locked"),
    "promote": ("promote", {"promoter_fail": True}, "never became healthy"),
}


@pytest.mark.parametrize("case", list(FAILURES))
async def test_a_failure_at_any_step_leaves_the_active_model_untouched(
    case: str, rig: Settings, tstore: Store, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    step, tweak, text = FAILURES[case]
    await seed_ratings(tstore)
    await ensure_registry(tstore, rig)
    before = await snapshot(tstore)
    kw: dict[str, Any] = {}
    for key, value in tweak.items():
        if key.startswith("env:"):
            monkeypatch.setenv(key[4:], value)
        elif key == "patch:restore":
            monkeypatch.setattr("training.run.restore_remote_code", fail_restore)
        elif key == "patch:register":

            async def broken(*a: Any, **k: Any) -> None:
                raise RuntimeError("database is locked")

            monkeypatch.setattr(tstore, "add_model_version", broken)
        elif key == "evaluator_fail":
            kw["evaluator"] = FakeEvaluator(fail=True)
        elif key == "promoter_fail":
            kw["promoter"] = RecordingPromoter(fail=True)
        else:
            value = tmp_path / value if key == "base_dataset" else value
            setattr(rig.training, key, value)

    result = await pipeline(rig, tstore, **kw).run()

    assert result.status == "failed" and result.step == step, result.error
    assert result.error.startswith(f"{step}: ") and text in result.error
    after = await snapshot(tstore)
    assert after[0] == before[0]  # same active version, same promotion time, same path
    (run,) = await tstore.training_runs()
    assert run.status == "failed" and run.step == step and run.error == result.error
    assert run.finished_at is not None
    log = text_of(run.log_path)
    assert f"FAILED at {step}" in log and "Traceback" in log
    models = rig.training.work_dir / "models"
    if step == "promote":  # registered, kept for a manual `oogiri models promote`
        assert (result.version, "candidate") in after[1] and result.model_dir.is_dir()
    else:
        assert after[1] == before[1]
        assert not models.exists() or not any(models.iterdir())


async def test_cancellation_kills_the_trainer_and_records_the_run(
    rig: Settings, tstore: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_XTUNER", "sleep")
    await seed_ratings(tstore)
    events = Recorder()
    task = asyncio.create_task(pipeline(rig, tstore, events=events).run())
    for _ in range(200):
        if events.progress_seen:
            break
        await asyncio.sleep(0.05)
    assert events.progress_seen, events.lines
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (run,) = await tstore.training_runs()
    assert run.status == "failed" and run.error == "train: cancelled"
    assert (await tstore.active_model()).version == "base-v0"


# --------------------------------------------------------------------------- several GPUs / hosts


async def test_multi_gpu_environment_passes_through(
    rig: Settings, tstore: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in {"NPROC_PER_NODE": "2", "NNODES": "2", "NODE_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("ADDR", "10.0.0.1")
    monkeypatch.setenv("PORT", "29500")
    monkeypatch.setenv("PYTHONPATH", "/bot/site-packages")  # must not leak into training
    rig.training.warmup_ratio = 0.5
    await seed_ratings(tstore, 10)
    result = await pipeline(rig, tstore).run()
    assert result.status == "succeeded", result.error
    assert result.metrics["plan"]["world_size"] == 4
    work = Path(result.metrics["run_dir"]) / "xtuner"
    env = json.loads((work / "fake_xtuner_call.json").read_text())["env"]
    assert {k: env[k] for k in ("NPROC_PER_NODE", "NNODES", "NODE_RANK", "ADDR", "PORT")} == {
        "NPROC_PER_NODE": "2", "NNODES": "2", "NODE_RANK": "0", "ADDR": "10.0.0.1",
        "PORT": "29500",
    }  # fmt: skip
    assert env["PYTHONPATH"] is None
    log = text_of(result.log_path)
    assert "multi-node: on every other node run" in log


def test_training_env_defaults_from_settings(rig: Settings) -> None:
    rig.training.nproc_per_node = 8
    env = training_env(rig.training, {"PATH": "/usr/bin", "OOGIRI_XTUNER_PYTHONPATH": "/x"})
    assert env["NPROC_PER_NODE"] == "8" and env["NNODES"] == "1"
    assert env["PYTHONPATH"] == "/x"
    assert env["PATH"] == f"{rig.training.xtuner_python.parent}:/usr/bin"
    explicit = training_env(rig.training, {"NPROC_PER_NODE": "2"})
    assert explicit["NPROC_PER_NODE"] == "2"


# --------------------------------------------------------------------------- log parsing


def test_parse_progress_reads_mmengine_lines() -> None:
    line = (
        "11/25 18:30:01 - mmengine - INFO - Iter(train) [  10/1200]  base_lr: 1.9999e-05 "
        "lr: 1.9999e-05  eta: 1 day, 2:03:04  time: 0.5132  data_time: 0.0105  memory: 9512  "
        "loss: 2.3412  grad_norm: nan"
    )
    p = parse_progress(line)
    assert (p.iteration, p.total, p.loss, p.lr) == (10, 1200, 2.3412, 1.9999e-05)
    assert p.eta_s == 86400 + 2 * 3600 + 3 * 60 + 4
    assert (p.time_s, p.memory_mb) == (0.5132, 9512)  # not data_time's 0.0105
    swapped = parse_progress("Iter(train) [1/9]  data_time: 0.25  memory: 80  time: 1.5  loss: 1")
    assert (swapped.time_s, swapped.memory_mb) == (1.5, 80)
    epoch = parse_progress("Epoch(train) [2][ 5/50]  lr: 1e-05  eta: 0:00:09  loss: 0.5")
    assert (epoch.epoch, epoch.iteration, epoch.total, epoch.eta_s) == (2, 5, 50, 9)
    assert parse_progress("=======total 2000 samples=======") is None
    assert parse_progress("Iter(train) [3/9]").loss is None


def test_find_checkpoint(tmp_path: Path) -> None:
    assert find_checkpoint(tmp_path) is None
    (tmp_path / "iter_500.pth").mkdir()
    (tmp_path / "iter_1000.pth").write_bytes(b"x")
    assert find_checkpoint(tmp_path) == (tmp_path / "iter_1000.pth", 1000)
    (tmp_path / "last_checkpoint").write_text(str(tmp_path / "iter_500.pth"))
    assert find_checkpoint(tmp_path) == (tmp_path / "iter_500.pth", 500)


# --------------------------------------------------------------------------- registry


async def test_promote_and_rollback(rig: Settings, tstore: Store) -> None:
    await seed_ratings(tstore)
    hook = PromotedHook()
    pm = make_manager(only=[], extra=[hook])
    promoter = RecordingPromoter()
    first = await pipeline(rig, tstore, promoter=promoter, pm=pm).run()
    second = await pipeline(rig, tstore, promoter=promoter, pm=pm).run()
    assert first.promoted and second.promoted
    assert (await tstore.get_model_version(second.version)).parent == first.version

    version, previous = await rollback(tstore, pm, promoter)
    assert (version, previous) == (first.version, second.version)
    assert (await tstore.get_model_version(second.version)).status == "rolled_back"
    version, previous = await rollback(tstore, pm, promoter)  # further back: the base
    assert version == "base-v0" and promoter.calls[-1] == ("base-v0", rig.training.base_model)
    with pytest.raises(LookupError, match="no earlier"):
        await rollback(tstore, pm, promoter)
    await promote_version(tstore, pm, promoter, second.version)  # explicit promotion
    assert (await tstore.active_model()).version == second.version
    assert hook.calls[-1] == (second.version, "base-v0")
    with pytest.raises(LookupError):
        await promote_version(tstore, pm, promoter, "nope")


async def test_failed_swap_during_rollback_changes_nothing(rig: Settings, tstore: Store) -> None:
    await seed_ratings(tstore)
    result = await pipeline(rig, tstore).run()
    with pytest.raises(RuntimeError):
        await rollback(tstore, None, RecordingPromoter(fail=True))
    assert (await tstore.active_model()).version == result.version


async def test_command_promoter_runs_the_swap_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = tmp_path / "swaps.json"
    monkeypatch.setenv("FAKE_SWAP_RECORD", str(record))
    promoter = CommandPromoter(
        ["{python}", str(FAKES / "fake_swap.py"), "{model_dir}", "{version}"]
    )
    assert promoter.command("v1", Path("/m"))[0] == sys.executable
    await promoter.promote("v1", tmp_path / "m")
    assert json.loads(record.read_text()) == [[str(tmp_path / "m"), "v1"]]
    monkeypatch.setenv("FAKE_SWAP", "fail")
    with pytest.raises(RuntimeError, match="exited with 1: swap failed"):
        await promoter.promote("v2", tmp_path / "m")
    default = CommandPromoter(Settings(_env_file=None).training.promote_command)
    assert default.command("v", Path("/m")) == [
        sys.executable, "-m", "bot.cli", "engine", "swap", "/m", "--label", "v",
    ]  # fmt: skip


async def test_callable_promoter_sync_and_async() -> None:
    seen: list[str] = []

    async def swap(version: str, model_dir: Path) -> None:
        seen.append(version)

    await CallablePromoter(swap).promote("a", Path("/m"))
    await CallablePromoter(lambda v, d: seen.append(v)).promote("b", Path("/m"))
    assert seen == ["a", "b"]


# --------------------------------------------------------------------------- guarded entry


async def test_run_guarded_checks_the_schedule_under_the_lock(rig: Settings, tstore: Store) -> None:
    await seed_ratings(tstore)
    rig.training.every_days = 7
    rig.training.min_new_ratings = None
    kw = {"evaluator": FakeEvaluator(), "promoter": RecordingPromoter()}
    first = await run_guarded(rig, tstore, if_due=True, **kw)
    assert isinstance(first, RunResult) and first.status == "succeeded"
    second = await run_guarded(rig, tstore, if_due=True, **kw)
    assert isinstance(second, DueDecision) and not second.due
    async with training_lock(tstore, work_dir_of(rig)):
        with pytest.raises(LockBusy):
            await run_guarded(rig, tstore, **kw)


async def test_a_dead_runs_row_is_marked_interrupted(rig: Settings, tstore: Store) -> None:
    await seed_ratings(tstore)
    stale = await tstore.start_training_run()  # a process that died mid-run
    result = await run_guarded(rig, tstore, evaluator=FakeEvaluator(), promoter=RecordingPromoter())
    runs = {r.id: r for r in await tstore.training_runs()}
    assert runs[stale].status == "failed" and "interrupted" in runs[stale].error
    assert runs[result.run_id].status == "succeeded"


# --------------------------------------------------------------------------- real evaluator


async def test_end_to_end_with_the_real_transformers_evaluator(
    rig: Settings, tstore: Store, tmp_path: Path
) -> None:
    """A real (tiny, random) model as the base: the stand-in convert copies its files, and
    evaluate_hf.py scores candidate and active for real on the held-out photos (CPU)."""
    pytest.importorskip("torch")
    from bot.engines.internvl.tinymodel import make_tiny_model

    base = make_tiny_model(tmp_path / "tiny", seed=1)
    t = rig.training
    t.base_model = base
    t.eval_python = Path(sys.executable)
    t.eval_device = "cpu"
    t.eval_max_new_tokens = 4
    t.eval_max_dynamic_patch = 1
    t.max_length = 4096
    t.warmup_ratio = 0.25
    t.gate_language = "any"
    t.gate_min_sanity = 0.0  # a random model says random things
    await seed_ratings(tstore, 6)
    result = await TrainingPipeline(rig, tstore, promoter=RecordingPromoter()).run()
    assert result.status == "succeeded", (result.error, result.metrics.get("gate"))
    ev = result.metrics["eval"]
    assert ev["candidate"]["samples"] == ev["active"]["samples"] >= 1
    assert ev["candidate"]["loss"] == pytest.approx(ev["active"]["loss"], rel=1e-4)  # same weights
    assert ev["candidate"]["tokens"] > 0 and len(ev["candidate"]["generations"]) >= 1
    assert (await tstore.active_model()).version == result.version
    marker = json.loads((result.model_dir / "oogiri-model.json").read_text())
    assert marker["version"] == result.version and marker["layout"] == "hf"


async def test_non_finite_losses_are_stored_as_null(rig: Settings, tstore: Store) -> None:
    await seed_ratings(tstore)
    result = await pipeline(rig, tstore, evaluator=FakeEvaluator(cand=float("nan"))).run()
    assert result.status == "rejected"
    row = await tstore.get_model_version(result.version)
    assert row.metrics["eval"]["candidate"]["loss"] is None
    (run,) = await tstore.training_runs()
    assert run.metrics["gate"]["checks"][0]["metrics"]["candidate_loss"] is None
