"""``oogiri train run``: export → xtuner train → convert_to_official → restore remote code →
evaluate (gate) → register → promote.

Each step is recorded on the training-run row (``step``) and in the run's log
(``<work_dir>/runs/run-NNNNN/run.log``, every external command's output included). Any failure
stops the run, records it as failed with its error and log, and leaves the active model untouched:
the only thing that changes what is served is ``Promoter.promote`` succeeding, after which the
registry marks the new version active.

XTuner's CLI does not pass its trainer's exit status on (it runs ``python train.py`` or
``torchrun`` in a subprocess and ignores the result), so success is judged by what training left
behind: the final checkpoint of the planned number of iterations.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import math
import os
import re
import shutil
import sys
import time
import traceback
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TextIO

from bot.ab_settings import AbSettings
from bot.engines.internvl.tinymodel import MARKER, read_marker
from bot.plugins import call_hook
from bot.settings import Settings
from training.config import ConfigError, Plan, TrainParams, min_schedule_samples, write_config
from training.export import ExportResult, NotEnoughData, export_dataset
from training.gate import (
    EvalResult,
    Evaluator,
    Gate,
    GateContext,
    GateDecision,
    SubprocessEvaluator,
    default_gate,
)
from training.lock import training_lock
from training.proc import run_command
from training.schedule import DueDecision, check_due
from training.settings import TrainingSettings

log = logging.getLogger(__name__)

STEPS = (
    "export",
    "config",
    "train",
    "convert",
    "restore_code",
    "evaluate",
    "register",
    "promote",
    "ab_test",
)
PASSTHROUGH_ENV = ("NPROC_PER_NODE", "NNODES", "NODE_RANK", "ADDR", "PORT")
CONVERT_RELPATH = Path("configs/internvl/v1_5/convert_to_official.py")
WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.safetensors.index.json")


class StepFailed(RuntimeError):
    pass


class PromotionError(RuntimeError):
    pass


# --------------------------------------------------------------------------- progress


@dataclass
class TrainProgress:
    iteration: int
    total: int
    loss: float | None = None
    lr: float | None = None
    eta_s: float | None = None
    epoch: int | None = None
    # mmengine's seconds per iteration (averaged over the log interval) and peak GPU memory (MB)
    time_s: float | None = None
    memory_mb: float | None = None


_ITER = re.compile(
    r"(?:Epoch\(train\)\s*\[\s*(\d+)\s*\]\s*)?Iter\(train\)\s*\[\s*(\d+)\s*/\s*(\d+)\s*\]"
)
_EPOCH_ONLY = re.compile(r"Epoch\(train\)\s*\[\s*(\d+)\s*\]\s*\[\s*(\d+)\s*/\s*(\d+)\s*\]")
_ETA = re.compile(r"\beta:\s*((?:(\d+)\s+days?,\s*)?(\d+):(\d{2}):(\d{2}))")
_FIELD = re.compile(r"(?<![\w.])(loss|lr|time|memory):\s*([-+0-9.eE]+|nan|inf)\b")


def parse_progress(line: str) -> TrainProgress | None:
    """An mmengine training log line → progress; None for any other line.

    ``… - mmengine - INFO - Iter(train) [ 10/120]  lr: 2.0e-05  eta: 0:01:02  time: 0.5
    data_time: 0.01  memory: 9000  loss: 1.234``
    """
    m = _ITER.search(line)
    epoch = None
    if m:
        it, total = int(m.group(2)), int(m.group(3))
        epoch = int(m.group(1)) if m.group(1) else None
    else:
        m = _EPOCH_ONLY.search(line)
        if not m:
            return None
        epoch, it, total = int(m.group(1)), int(m.group(2)), int(m.group(3))
    fields = {k: float(v) for k, v in _FIELD.findall(line)}
    eta_s = None
    e = _ETA.search(line)
    if e:
        days = int(e.group(2) or 0)
        eta_s = days * 86400 + int(e.group(3)) * 3600 + int(e.group(4)) * 60 + int(e.group(5))
    return TrainProgress(
        it,
        total,
        fields.get("loss"),
        fields.get("lr"),
        eta_s,
        epoch,
        fields.get("time"),
        fields.get("memory"),
    )


class RunEvents:
    """Observer of a run (the CLI shows a progress bar); every method is optional."""

    def step(self, name: str) -> None: ...

    def progress(self, p: TrainProgress) -> None: ...

    def line(self, text: str) -> None: ...

    def done(self, result: RunResult) -> None: ...


# --------------------------------------------------------------------------- promotion


class Promoter(Protocol):
    async def promote(self, version: str, model_dir: Path) -> None:
        """Make ``model_dir`` the served model. Raise if it did not happen; when it raises, the
        old model must still be serving (blue/green)."""
        ...


class CommandPromoter:
    """Shells out to the engine swap command (default ``oogiri engine swap MODEL_DIR``)."""

    def __init__(self, template: list[str], env: Mapping[str, str] | None = None) -> None:
        self.template = list(template)
        self.env = env

    def command(self, version: str, model_dir: Path) -> list[str]:
        values = {"python": sys.executable, "model_dir": str(model_dir), "version": version}
        return [part.format(**values) for part in self.template]

    async def promote(self, version: str, model_dir: Path) -> None:
        lines: deque[str] = deque(maxlen=20)
        rc = await run_command(self.command(version, model_dir), env=self.env, on_line=lines.append)
        if rc != 0:
            tail = " | ".join(lines)
            raise PromotionError(f"engine swap exited with {rc}: {tail}")


class CallablePromoter:
    """Promotes through an in-process function ``fn(version, model_dir)`` (sync or async), e.g.
    one that builds an engine for the folder and calls ``App.swap_engine``."""

    def __init__(self, fn: Callable[[str, Path], Awaitable[None] | None]) -> None:
        self.fn = fn

    async def promote(self, version: str, model_dir: Path) -> None:
        result = self.fn(version, model_dir)
        if inspect.isawaitable(result):
            await result


async def ensure_registry(store: Any, settings: Settings) -> Any:
    """The active model version; registers the served base model as the first (active) version
    when the registry is empty, so that a later rollback can return to it."""
    active = await store.active_model()
    if active is not None:
        return active
    if await store.model_versions():
        return None
    base = settings.engine.model or settings.training.base_model
    if base is None:
        return None
    marker = read_marker(Path(base)) or {}
    label = str(marker.get("version") or settings.engine.model_version or "base")
    await store.add_model_version(label, str(base), data_card={"origin": "base model"})
    await store.set_model_status(label, "active")
    return await store.active_model()


async def promote_version(
    store: Any, pm: Any, promoter: Promoter, version: str
) -> tuple[str, str | None]:
    """Swap the engine to ``version`` then mark it active. Returns (version, previous)."""
    row = await store.get_model_version(version)
    if row is None:
        raise LookupError(f"no model version {version!r}")
    if not await asyncio.to_thread(Path(row.path).is_dir):
        raise PromotionError(f"model folder {row.path} of {version} is missing")
    active = await store.active_model()
    previous = active.version if active else None
    if previous == version:
        return version, previous
    await promoter.promote(version, Path(row.path))
    await store.set_model_status(version, "active")
    if pm is not None:
        try:
            await call_hook(pm, "oogiri_model_promoted", version=version, previous=previous)
        except Exception:  # observers never undo a promotion
            log.exception("an oogiri_model_promoted hook failed")
    return version, previous


async def rollback(
    store: Any, pm: Any, promoter: Promoter, to: str | None = None
) -> tuple[str, str | None]:
    """Return to ``to`` or else to the version that was active before the current one; the
    current one is marked ``rolled_back`` so that the next rollback goes further back."""
    active = await store.active_model()
    if active is None:
        raise LookupError("no active model version to roll back from")
    if to is None:
        earlier = [
            v
            for v in await store.model_versions()
            if v.status == "retired" and v.version != active.version
        ]
        if not earlier:
            raise LookupError("no earlier model version to roll back to")
        earlier.sort(key=lambda v: (v.promoted_at or v.created_at, v.id))
        to = earlier[-1].version
    assert to is not None  # the caller named it, or the latest retired version was found
    version, previous = await promote_version(store, pm, promoter, to)
    if previous and previous != version:
        await store.set_model_status(previous, "rolled_back")
    return version, previous


# --------------------------------------------------------------------------- environment


def work_dir_of(settings: Settings) -> Path:
    return Path(settings.training.work_dir or settings.data_dir / "training")


def training_env(t: TrainingSettings, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of the training venv's commands.

    The venv's bin comes first on PATH (XTuner runs a bare ``python``/``torchrun``);
    NPROC_PER_NODE, NNODES, NODE_RANK, ADDR, PORT pass through, NPROC_PER_NODE and NNODES
    defaulting to settings; the bot's PYTHONPATH is dropped (it could shadow the venv's pinned
    transformers) unless OOGIRI_XTUNER_PYTHONPATH gives one for training.
    """
    env = dict(os.environ if base is None else base)
    if t.xtuner_python is not None:
        bin_dir = str(Path(t.xtuner_python).parent)
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
        env["VIRTUAL_ENV"] = str(Path(t.xtuner_python).parent.parent)
    env.pop("PYTHONHOME", None)
    env.pop("PYTHONPATH", None)
    if env.get("OOGIRI_XTUNER_PYTHONPATH"):
        env["PYTHONPATH"] = env["OOGIRI_XTUNER_PYTHONPATH"]
    env.setdefault("NPROC_PER_NODE", str(t.nproc_per_node))
    env.setdefault("NNODES", str(t.nnodes))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def world_size(env: Mapping[str, str]) -> int:
    try:
        return int(env.get("NPROC_PER_NODE", "1")) * int(env.get("NNODES", "1"))
    except ValueError as exc:
        raise ConfigError(f"NPROC_PER_NODE/NNODES must be integers: {exc}") from exc


def check_schedule_data(t: TrainingSettings, samples: int, gpus: int) -> None:
    """Too few samples for the schedule is a shortage of data: skip the run, do not fail it.

    Below ``min_schedule_samples`` the warm-up rounds to fewer than 2 iterations and the config
    check would refuse the run; on a new deployment that used to record failed runs (issue 15 D).
    """
    need = min_schedule_samples(
        t.batch_size, t.accumulative_counts, gpus, t.max_epochs, t.warmup_ratio
    )
    if samples < need:
        raise NotEnoughData(
            f"{samples} training sample(s) (rated + base mix), but the training schedule needs at "
            f"least {need} (batch_size {t.batch_size} × accumulative_counts "
            f"{t.accumulative_counts} × {gpus} GPU(s), {t.max_epochs} epoch(s), warmup_ratio "
            f"{t.warmup_ratio}: fewer round the warm-up below 2 iterations); waiting for more "
            "ratings"
        )


def check_launch(t: TrainingSettings, env: Mapping[str, str]) -> list[str]:
    problems = []
    if t.xtuner_python is None:
        problems.append(
            "settings.training.xtuner_python is not set: create the venv with `oogiri train "
            "setup` and set OOGIRI_TRAINING__XTUNER_PYTHON to its bin/python"
        )
    else:
        py = Path(t.xtuner_python)
        if not py.exists():
            problems.append(f"training python {py} does not exist (run `oogiri train setup`)")
        elif not (py.parent / "xtuner").exists():
            problems.append(f"no xtuner command beside {py} (run `oogiri train setup`)")
    if int(env.get("NNODES", "1") or 1) > 1 and not (env.get("ADDR") and env.get("PORT")):
        problems.append("NNODES > 1 needs ADDR and PORT set (the same on every node)")
    return problems


def xtuner_command(t: TrainingSettings, config: Path, work: Path) -> list[str]:
    assert t.xtuner_python is not None
    cmd = [
        str(Path(t.xtuner_python).parent / "xtuner"),
        "train",
        str(config),
        "--work-dir",
        str(work),
    ]
    if t.deepspeed:
        cmd += ["--deepspeed", t.deepspeed]
    return cmd


_CKPT = re.compile(r"iter_(\d+)\.pth$")


def find_checkpoint(work: Path) -> tuple[Path, int] | None:
    """The newest checkpoint XTuner/mmengine left in ``work`` (``last_checkpoint`` first).

    With DeepSpeed a checkpoint ``iter_N.pth`` is a folder; without, a file.
    """
    marker = work / "last_checkpoint"
    if marker.is_file():
        p = Path(marker.read_text().strip())
        p = p if p.is_absolute() else work / p
        m = _CKPT.search(p.name)
        if p.exists() and m:
            return p, int(m.group(1))
    found = [(int(m.group(1)), p) for p in work.glob("iter_*.pth") if (m := _CKPT.search(p.name))]
    if not found:
        return None
    it, p = max(found)
    return p, it


def has_weights(model_dir: Path) -> bool:
    return (model_dir / "config.json").is_file() and any(
        any(model_dir.glob(g)) for g in WEIGHT_GLOBS
    )


def restore_remote_code(base: Path, model_dir: Path) -> list[str]:
    """Copy the base folder's remote-code ``*.py`` files that convert_to_official left out."""
    copied = []
    for src in sorted(Path(base).glob("*.py")):
        dest = model_dir / src.name
        if not dest.exists():
            shutil.copy2(src, dest)
            copied.append(src.name)
    return copied


# --------------------------------------------------------------------------- the pipeline


@dataclass
class RunResult:
    run_id: int
    status: str  # succeeded | testing | rejected | failed | skipped
    step: str | None = None
    version: str | None = None
    model_dir: Path | None = None
    promoted: bool = False
    error: str | None = None
    log_path: Path | None = None
    decision: GateDecision | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    config_error: bool = False  # failed on its settings or environment (ConfigError): exit 2


def live_ab_settings(settings: Settings, pm: Any) -> AbSettings | None:
    """``ab`` when the live A/B step can run, else None (the offline gate decides alone).

    The step only starts a test; the ``ab`` plugin serves the candidate and decides. Without the
    plugin (``OOGIRI_PLUGINS`` leaves it out) a started test would get no traffic and sit until
    its timeout, so the run falls back to the offline gate and says so.
    """
    if not settings.ab.enabled:
        return None
    if pm is not None and not pm.has_plugin("ab"):
        log.warning(
            "live A/B step off: the 'ab' plugin is not loaded (OOGIRI_PLUGINS), so nothing would "
            "serve the candidate or decide a test; the offline gate decides alone"
        )
        return None
    return settings.ab


class TrainingPipeline:
    def __init__(
        self,
        settings: Settings,
        store: Any,
        pm: Any = None,
        promoter: Promoter | None = None,
        evaluator: Evaluator | None = None,
        gate: Gate | None = None,
        events: RunEvents | None = None,
        env: Mapping[str, str] | None = None,
        exporter: Callable[[Path], Awaitable[ExportResult]] | None = None,
    ) -> None:
        self.settings = settings
        # the data step: ratings by default; `oogiri train bootstrap` trains on a prepared set
        self.exporter = exporter
        self.t = settings.training
        self.store = store
        self.pm = pm
        self.promoter = promoter or CommandPromoter(self.t.promote_command)
        self.evaluator = evaluator
        self.gate = gate or default_gate(live_ab_settings(settings, pm))
        self.events = events or RunEvents()
        self.env = training_env(self.t, env)
        self.work_dir = work_dir_of(settings)
        self.models_dir = self.work_dir / "models"
        self._log: TextIO | None = None
        self._tail: deque[str] = deque(maxlen=40)

    # -- helpers

    def _say(self, text: str) -> None:
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
        line = f"[oogiri {stamp}] {text}"
        if self._log:
            self._log.write(line + "\n")
            self._log.flush()
        self._tail.append(line)
        self.events.line(line)
        log.info("%s", text)

    def _on_line(self, line: str) -> None:
        self._tail.append(line)
        self.events.line(line)

    async def _cmd(self, cmd: list[str], on_line: Callable[[str], None] | None = None) -> int:
        def sink(line: str) -> None:
            self._on_line(line)
            if on_line is not None:
                on_line(line)

        timeout = self.t.timeout_hours * 3600 if self.t.timeout_hours else None
        return await run_command(cmd, env=self.env, log=self._log, on_line=sink, timeout_s=timeout)

    def _last_error(self) -> str:
        for line in reversed(self._tail):
            if re.search(r"(Error|Exception|error:|Traceback)", line):
                return line.strip()[:300]
        return ""

    async def _capture(self, cmd: list[str]) -> list[str]:
        lines: list[str] = []
        rc = await self._cmd(cmd, lines.append)
        if rc != 0:
            raise StepFailed(f"{cmd[0]} exited with {rc}: {' | '.join(lines[-5:])}")
        return lines

    async def convert_script(self) -> Path:
        if self.t.convert_script:
            path = Path(self.t.convert_script)
        else:
            assert self.t.xtuner_python is not None
            code = (
                "import importlib.util; s = importlib.util.find_spec('xtuner'); "
                "print(s.submodule_search_locations[0] if s else '')"
            )
            lines = await self._capture([str(self.t.xtuner_python), "-c", code])
            root = lines[-1].strip() if lines else ""
            if not root:
                raise StepFailed("xtuner is not installed in the training venv")
            path = Path(root) / CONVERT_RELPATH
        if not path.is_file():
            raise StepFailed(f"convert_to_official.py not found at {path}")
        return path

    def default_evaluator(self) -> Evaluator:
        python = self.t.eval_python or self.t.xtuner_python
        if python is None:
            raise StepFailed("no python to evaluate with (settings.training.eval_python)")

        async def runner(cmd: list[str], sink: Callable[[str], None] | None) -> int:
            return await self._cmd(cmd, sink)

        return SubprocessEvaluator(
            python,
            runner,
            device=self.t.eval_device,
            max_samples=self.t.eval_max_samples,
            max_new_tokens=self.t.eval_max_new_tokens,
            max_dynamic_patch=self.t.eval_max_dynamic_patch,
        )

    # -- the run

    async def run(self, promote: bool | None = None) -> RunResult:
        promote = bool(self.t.auto_promote) if promote is None else promote
        store = self.store
        run_id = await store.start_training_run()
        run_dir = self.work_dir / "runs" / f"run-{run_id:05d}"
        run_dir.mkdir(parents=True, exist_ok=True)
        log_path = run_dir / "run.log"
        await store.update_training_run(run_id, log_path=str(log_path))
        result = RunResult(run_id=run_id, status="running", log_path=log_path)
        timings: dict[str, float] = {}
        metrics: dict[str, Any] = {"run_dir": str(run_dir), "timings_s": timings}
        with log_path.open("a", encoding="utf-8") as fh:
            self._log = fh
            try:
                return await self._run(fh, result, run_dir, promote, metrics, timings)
            finally:
                self._log = None

    async def _run(
        self,
        fh: TextIO,
        result: RunResult,
        run_dir: Path,
        promote: bool,
        metrics: dict[str, Any],
        timings: dict[str, float],
    ) -> RunResult:
        store = self.store
        run_id = result.run_id
        step = "export"
        started = time.perf_counter()
        t0 = started
        registered = False
        testing = False

        async def enter(name: str) -> None:
            nonlocal step, t0
            now = time.perf_counter()
            timings[step] = round(now - t0, 3)
            step, t0 = name, now
            self.events.step(name)
            self._say(f"step {name}")
            await store.update_training_run(run_id, step=name)

        try:
            self.events.step("export")
            self._say(f"training run #{run_id} in {run_dir}")
            await store.update_training_run(run_id, step="export")
            active = await ensure_registry(store, self.settings)
            parent = active.version if active else None
            active_dir = Path(active.path) if active else None

            # 1. export
            try:
                if self.exporter is not None:
                    export = await self.exporter(run_dir / "data")
                else:
                    export = await export_dataset(store, self.t, run_dir / "data", pm=self.pm)
                if not check_launch(self.t, self.env):  # a broken setup fails in "config"
                    check_schedule_data(self.t, export.train_samples, world_size(self.env))
            except NotEnoughData as exc:
                self._say(f"skipped: {exc}")
                timings[step] = round(time.perf_counter() - t0, 3)
                result.status, result.step, result.error = "skipped", step, str(exc)
                metrics["skipped"] = str(exc)
                await self._finish(result, metrics)
                return result
            metrics["export"] = export.data_card["counts"]
            self._say(
                f"exported {export.train} training + {export.base} base samples, "
                f"{export.heldout} held out, {export.negatives} negatives"
            )

            # 2. config
            await enter("config")
            problems = check_launch(self.t, self.env)
            if problems:
                raise ConfigError("cannot launch training:\n  - " + "\n  - ".join(problems))
            config_path = run_dir / "xtuner_config.py"
            params = TrainParams.from_settings(self.t, export.data_paths, export.image_folders)
            plan = write_config(
                config_path, params, export.train_samples, world_size(self.env), self.t.template
            )
            metrics["plan"] = plan.as_dict()
            peak = plan.peak_lr_fraction
            self._say(
                f"config {config_path}: {plan.total_iters} iterations "
                f"({plan.iters_per_epoch}/epoch, warm-up {plan.warmup_iters}) on "
                f"{plan.world_size} GPU(s)"
                + (f"; the warm-up reaches only {peak:.0%} of lr" if peak < 0.95 else "")
            )

            # 3. train
            await enter("train")
            metrics["train"] = await self._train(config_path, run_dir / "xtuner", plan, export)
            checkpoint = Path(metrics["train"]["checkpoint"])

            # 4. convert
            await enter("convert")
            now = datetime.now(UTC)
            version = f"ft-{now:%Y%m%d-%H%M%S}-r{run_id}"
            result.version = version
            partial = self.models_dir / f".{version}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            partial.parent.mkdir(parents=True, exist_ok=True)
            script = await self.convert_script()
            assert self.t.xtuner_python is not None
            rc = await self._cmd(
                [
                    str(self.t.xtuner_python),
                    str(script),
                    str(config_path),
                    str(checkpoint),
                    str(partial),
                ]
            )
            if rc != 0:
                raise StepFailed(f"convert_to_official exited with {rc}: {self._last_error()}")
            if not has_weights(partial):
                raise StepFailed(f"convert_to_official wrote no model to {partial}")

            # 5. restore remote code, version marker
            await enter("restore_code")
            assert self.t.base_model is not None
            copied = restore_remote_code(Path(self.t.base_model), partial)
            self._say(f"restored remote code: {', '.join(copied) or 'nothing missing'}")
            base_marker = read_marker(Path(self.t.base_model)) or {}
            marker = {
                "version": version,
                "layout": base_marker.get("layout", "internvl2"),
                "parent": parent,
                "base": str(self.t.base_model),
                "run": run_id,
                "tiny": bool(base_marker.get("tiny", False)),
            }
            (partial / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
            model_dir = self.models_dir / version
            partial.rename(model_dir)
            result.model_dir = model_dir

            # 6. evaluate
            await enter("evaluate")
            evaluator = self.evaluator or self.default_evaluator()
            heldout = export.files["heldout"]
            candidate = await evaluator.evaluate(model_dir, heldout, export.out_dir)
            baseline: EvalResult | None = None
            if active_dir is not None and active_dir.is_dir():
                baseline = await evaluator.evaluate(active_dir, heldout, export.out_dir)
            metrics["eval"] = {
                "candidate": candidate.summary(),
                "active": baseline.summary() if baseline else None,
            }
            language = self.t.gate_language or self.settings.language
            decision = await self.gate.decide(
                GateContext(
                    candidate=candidate,
                    active=baseline,
                    settings=self.t,
                    language=language,
                    candidate_version=version,
                    active_version=parent,
                )
            )
            result.decision = decision
            metrics["gate"] = decision.as_dict()
            for reason in decision.reasons:
                self._say(f"gate: {reason}")

            # 7. register
            await enter("register")
            await store.add_model_version(
                version,
                str(model_dir),
                parent=parent,
                status="candidate" if decision.passed or decision.pending else "rejected",
                metrics=_jsonable({k: metrics[k] for k in ("plan", "train", "eval", "gate")}),
                data_card=_jsonable(export.data_card),
                config=config_path.read_text(encoding="utf-8"),
            )
            registered = True

            # 8. promote
            if decision.passed and promote:
                await enter("promote")
                await promote_version(store, self.pm, self.promoter, version)
                result.promoted = True
                self._say(f"promoted {version} (previous: {parent})")
            elif decision.pending and promote:
                # the live A/B step: the users decide (training/ab.py); the run ends "testing"
                await enter("ab_test")
                testing = await self._start_ab_test(version, parent, run_id, metrics)
            elif decision.passed or decision.pending:
                self._say(f"{version} passed the gate; not promoted (auto_promote off)")
            else:
                self._say(f"{version} rejected by the gate; {parent} stays active")
            timings[step] = round(time.perf_counter() - t0, 3)
            if decision.passed or (decision.pending and not testing):
                result.status = "succeeded"
            else:
                result.status = "testing" if testing else "rejected"
            result.step = step
        except Exception as exc:
            timings[step] = round(time.perf_counter() - t0, 3)
            fh.write(traceback.format_exc())
            message = str(exc) or type(exc).__name__
            self._say(f"FAILED at {step}: {message}")
            result.status, result.step = "failed", step
            result.error = f"{step}: {message}"
            result.config_error = isinstance(exc, ConfigError)
            if not registered:
                self._remove_unregistered(result)
        except BaseException:  # cancelled (Ctrl-C, shutdown): record it, then go
            timings[step] = round(time.perf_counter() - t0, 3)
            result.status, result.step, result.error = "failed", step, f"{step}: cancelled"
            if not registered:
                self._remove_unregistered(result)
            metrics["total_s"] = round(time.perf_counter() - started, 3)
            await asyncio.shield(self._finish(result, metrics))
            raise
        metrics["total_s"] = round(time.perf_counter() - started, 3)
        await self._finish(result, metrics)
        return result

    def _remove_unregistered(self, result: RunResult) -> None:
        """An unregistered model folder is of no use to anyone: don't leave gigabytes behind."""
        if not result.version:
            return
        shutil.rmtree(self.models_dir / f".{result.version}.partial", ignore_errors=True)
        if result.model_dir is not None:
            shutil.rmtree(result.model_dir, ignore_errors=True)
            self._say(f"removed unregistered {result.model_dir}")
            result.model_dir = None

    async def _start_ab_test(
        self, version: str, parent: str | None, run_id: int, metrics: dict[str, Any]
    ) -> bool:
        """Start the candidate's live test; False (and the candidate stays registered) when
        another test is still running."""
        from bot.store import AbTestBusy
        from training.ab import start_test

        assert parent is not None  # LiveAbStep passes when there is no active model
        try:
            test = await start_test(self.store, self.settings, version, parent, run_id=run_id)
        except AbTestBusy as exc:
            self._say(
                f"{version} passed the offline gate, but {exc}: start its test later with "
                f"`oogiri models ab start {version}`"
            )
            return False
        metrics["ab_test"] = test.id
        self._say(
            f"{version} passed the offline gate; live A/B test #{test.id} started: "
            f"{test.share:.0%} of users get it beside {parent}, which stays active until the "
            "users decide (`oogiri models ab status`)"
        )
        return True

    async def _train(
        self, config: Path, work: Path, plan: Plan, export: ExportResult
    ) -> dict[str, Any]:
        await asyncio.to_thread(work.mkdir, parents=True, exist_ok=True)
        last: dict[str, Any] = {}

        def on_line(line: str) -> None:
            p = parse_progress(line)
            if p is not None:
                last.update(iteration=p.iteration, total=p.total, loss=p.loss)
                self.events.progress(p)

        if self.t.nnodes > 1 or int(self.env.get("NNODES", "1")) > 1:
            command = " ".join(xtuner_command(self.t, config, work))
            self._say(
                "multi-node: on every other node run, with the same export and config on shared "
                f"storage: NODE_RANK=k ADDR=… PORT=… {command}"
            )
        started = time.perf_counter()
        rc = await self._cmd(xtuner_command(self.t, config, work), on_line)
        seconds = time.perf_counter() - started
        if rc != 0:
            raise StepFailed(f"xtuner train exited with {rc}: {self._last_error()}")
        found = find_checkpoint(work)
        if found is None:
            raise StepFailed(
                f"xtuner train left no checkpoint in {work}"
                + (f": {self._last_error()}" if self._last_error() else "")
            )
        checkpoint, iteration = found
        if iteration < plan.total_iters:
            raise StepFailed(
                f"training stopped at iteration {iteration} of {plan.total_iters}"
                + (f": {self._last_error()}" if self._last_error() else "")
            )
        samples = export.train_samples * self.t.max_epochs
        return {
            "checkpoint": str(checkpoint),
            "iterations": iteration,
            "final_loss": last.get("loss"),
            "seconds": round(seconds, 3),
            "samples_per_s": round(samples / seconds, 3) if seconds > 0 else None,
        }

    async def _finish(self, result: RunResult, metrics: dict[str, Any]) -> None:
        metrics["promoted"] = result.promoted
        if result.version:
            metrics["version"] = result.version
        result.metrics = metrics
        await self.store.update_training_run(
            result.run_id,
            status=result.status,
            step=result.step,
            finished_at=datetime.now(UTC),
            model_version=result.version,
            metrics=_jsonable(metrics),
            error=result.error,
        )
        self.events.done(result)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):  # NaN/inf are not JSON
        return None
    return value


# --------------------------------------------------------------------------- guarded entry


async def mark_interrupted(store: Any) -> list[int]:
    """Runs still 'running' while we hold the lock belong to a process that died."""
    stale = [r.id for r in await store.training_runs() if r.status == "running"]
    for run_id in stale:
        await store.update_training_run(
            run_id,
            status="failed",
            finished_at=datetime.now(UTC),
            error="interrupted: the process running it stopped",
        )
    return stale


async def tick_ab_tests(settings: Settings, store: Any, kwargs: Mapping[str, Any]) -> Any:
    """Decide the running A/B test (the CronJob's tick); returns the test still running."""
    if await store.running_ab_test() is None:
        return None
    from training.ab import decide_tests
    from training.ab_plugin import notify_serve

    promoter = kwargs.get("promoter") or CommandPromoter(settings.training.promote_command)
    for outcome in await decide_tests(
        store, settings, kwargs.get("pm"), promoter, on_ended=notify_serve(settings)
    ):
        log.info("A/B test #%d: %s (%s)", outcome.test_id, outcome.outcome, outcome.reason)
    return await store.running_ab_test()


async def run_guarded(
    settings: Settings,
    store: Any,
    *,
    if_due: bool = False,
    promote: bool | None = None,
    **pipeline_kwargs: Any,
) -> RunResult | DueDecision:
    """Take the training lock, optionally check the schedule, run. Raises ``LockBusy``."""
    async with training_lock(store, work_dir_of(settings)):
        await mark_interrupted(store)
        if if_due:
            # a running live A/B test is decided first; while it runs, no new candidate
            running = await tick_ab_tests(settings, store, pipeline_kwargs)
            if running is not None:
                return DueDecision(
                    False, [f"A/B test #{running.id} of {running.candidate} is still running"]
                )
            decision = await check_due(store, settings.training)
            if not decision.due:
                return decision
        from training.bootstrap import apply_defaults  # bootstrap imports this module

        pipeline = TrainingPipeline(apply_defaults(settings), store, **pipeline_kwargs)
        return await pipeline.run(promote=promote)
