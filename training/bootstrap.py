"""``oogiri train bootstrap``: from an empty GPU box to the seed's fine-tuned joke model.

The seed tutorial's manual steps, as one resumable command:

1. ``pull``: InternVL2-2B from the hub (``training.hub``), registered as a model version;
2. ``data``: the Oogiri-GO training set (``training.oogiri_go``: Chinese image-to-text jokes,
   deduplicated, best-liked first, the bot's instruction);
3. ``train``: ``training.run.TrainingPipeline`` with that set as its data step (the same config,
   ``xtuner train``, ``convert_to_official``, remote-code restore, evaluation and registration a
   ratings run uses; nothing is duplicated here) and a sanity-only gate: there is no earlier
   fine-tune to beat, only a model that must answer with sane jokes;
4. ``promote``: marks the new version active and swaps it in when an ``oogiri serve`` is running;
   either way it writes ``bootstrap.env``, the settings that serve it.

Each finished step leaves a marker in ``<work_dir>/bootstrap/state.json`` with the inputs it was
made from; a second run skips every step whose inputs are unchanged (an interrupted download
resumes inside the step). Changing ``--n`` rebuilds the data and retrains; ``--restart`` forgets
every marker.

The pulled folder and the data set also become the defaults of later ``oogiri train run``s
(``apply_defaults``): their base model and base data set, unless settings name others.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bot.settings import Settings
from training import hub, oogiri_go
from training.config import ConfigError, min_schedule_samples
from training.environment import probe_python
from training.export import FORMAT, ExportResult
from training.gate import Gate, SanityStep
from training.run import (
    CommandPromoter,
    Promoter,
    RunEvents,
    RunResult,
    TrainingPipeline,
    check_launch,
    promote_version,
    training_env,
    work_dir_of,
    world_size,
)
from training.settings import TrainingSettings

STEPS = ("pull", "data", "train", "promote")
STATE_FILE = "state.json"
ENV_FILE = "bootstrap.env"
SEED_EPOCHS = 6  # the tutorial's max_epochs; the rest of its recipe is the settings' default


class BootstrapError(Exception):
    """A step failed; the message names the step and what to do."""


@dataclass
class BootstrapOptions:
    model: str = hub.DEFAULT_MODEL
    revision: str | None = None
    model_dir: Path | None = None
    dataset: str = oogiri_go.REPO
    dataset_revision: str | None = None
    lang: str = "cn"
    n: int = 2000
    min_star: float | None = None
    heldout: int | None = None
    epochs: int | None = None
    promote: bool = True
    offline: bool | None = None
    restart: bool = False
    progress: bool = True


@dataclass
class BootstrapResult:
    status: str  # succeeded | rejected | failed
    steps: dict[str, str] = field(default_factory=dict)  # step -> done | skipped | failed
    error: str | None = None
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    run: RunResult | None = None
    version: str | None = None
    model_dir: Path | None = None
    promoted: bool = False
    swapped: bool = False
    env_file: Path | None = None
    state_file: Path | None = None


class BootstrapEvents(RunEvents):
    """Observer: the phase, download and data-building progress, plus the training run's own
    events."""

    def phase(self, name: str, state: str, detail: str = "") -> None: ...

    def build_progress(self, done: int, total: int | None, what: str) -> None:
        """``what``: ``download OWNER/NAME`` (bytes) or ``pictures`` (checked)."""


# The sanity gate's language for each Oogiri-GO file (it has no Japanese check).
GATE_LANGUAGE_OF = {"cn": "zh", "en": "en", "jp": None}


def check_options(settings: Settings, opts: BootstrapOptions) -> None:
    """Bad input, found before gigabytes are downloaded and hours trained."""
    try:
        oogiri_go.check_params(opts.lang, opts.n)
    except oogiri_go.DataError as exc:
        raise BootstrapError(str(exc)) from None
    if opts.epochs is not None and opts.epochs < 1:
        raise BootstrapError("--epochs must be at least 1")
    if settings.training.gate_language is not None:
        return  # the operator chose the gate's language
    gate = settings.language
    wanted = GATE_LANGUAGE_OF.get(opts.lang)
    if gate == wanted:
        return
    if wanted is None:
        raise BootstrapError(
            f"--lang {opts.lang}: the sanity gate has no check for that language and would "
            "reject every joke after training; set OOGIRI_TRAINING__GATE_LANGUAGE=any"
        )
    raise BootstrapError(
        f"--lang {opts.lang} trains on {wanted} jokes but the bot's language is {gate} "
        f"(OOGIRI_LANGUAGE): the sanity gate would reject them after training; set "
        f"OOGIRI_LANGUAGE={wanted} (and OOGIRI_PROMPT in that language) or use the --lang of "
        "the bot's language"
    )


# --------------------------------------------------------------------------- state


def bootstrap_dir(settings: Settings) -> Path:
    return work_dir_of(settings) / "bootstrap"


def model_dest(settings: Settings, opts: BootstrapOptions) -> Path:
    return Path(opts.model_dir or hub.default_dest(settings.data_dir / "models", opts.model))


def dataset_raw_dir(settings: Settings, repo: str) -> Path:
    return hub.default_dest(settings.data_dir / "datasets" / "raw", repo)


def dataset_out_dir(settings: Settings, opts: BootstrapOptions) -> Path:
    return oogiri_go.default_out(settings.data_dir / "datasets", opts.lang, opts.n, opts.min_star)


def pull_key(opts: BootstrapOptions, dest: Path) -> dict[str, Any]:
    """The inputs of the pull step (its marker's key)."""
    return {"repo": opts.model, "revision": opts.revision or "main", "dest": str(dest)}


def data_key(settings: Settings, opts: BootstrapOptions, out: Path) -> dict[str, Any]:
    return {
        "repo": opts.dataset,
        "revision": opts.dataset_revision or "main",
        "lang": opts.lang,
        "n": opts.n,
        "min_star": opts.min_star,
        "heldout": opts.heldout,
        "prompt": settings.prompt,
        "recipe": oogiri_go.RECIPE_VERSION,
        "out": str(out),
    }


def train_key(commit: str, built: oogiri_go.BuildResult, epochs: int) -> dict[str, Any]:
    return {"base": commit, "data": built.report.get("created_at"), "epochs": epochs}


class State:
    """Step markers: ``{"steps": {name: {"key": inputs, "done_at": …, …}}}``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.data = {}
        self.data.setdefault("steps", {})

    def done(self, step: str, key: dict[str, Any]) -> dict[str, Any] | None:
        mark = self.data["steps"].get(step)
        return mark if mark and mark.get("key") == key else None

    def mark(self, step: str, key: dict[str, Any], **info: Any) -> None:
        # later steps need no invalidation: their keys name what they were made from
        self.data["steps"][step] = {"key": key, "done_at": datetime.now(UTC).isoformat(), **info}
        self.save()

    def clear(self) -> None:
        self.data = {"steps": {}}
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, ensure_ascii=False) + "\n", "utf-8")
        tmp.replace(self.path)


def read_state(settings: Settings) -> dict[str, Any]:
    return State(bootstrap_dir(settings) / STATE_FILE).data


def apply_defaults(settings: Settings) -> Settings:
    """What settings leave unset, from what the operator's earlier commands made: the venv of
    ``oogiri train setup`` (its default place) as ``xtuner_python``, bootstrap's pulled model as
    ``base_model`` and its data set as ``base_dataset`` (later ratings runs mix it in)."""
    t = settings.training
    update: dict[str, Any] = {}
    if t.xtuner_python is None:
        venv_python = Path(t.venv or settings.data_dir / "xtuner-venv") / "bin" / "python"
        if venv_python.exists():
            update["xtuner_python"] = venv_python
    if t.base_model is not None and t.base_dataset is not None and not update:
        return settings
    steps = read_state(settings).get("steps", {})
    pulled = steps.get("pull", {}).get("path")
    if t.base_model is None and pulled and Path(pulled).is_dir():
        update["base_model"] = Path(pulled)
    train_file = steps.get("data", {}).get("train")
    if t.base_dataset is None and train_file and Path(train_file).is_file():
        update["base_dataset"] = Path(train_file)
    if not update:
        return settings
    training = t.model_copy(update=update)
    return settings.model_copy(update={"training": training})


# --------------------------------------------------------------------------- before any download


def preflight(settings: Settings, opts: BootstrapOptions) -> list[str]:
    """Every problem that can be found in a second, before gigabytes are downloaded and hours
    trained: the options, the training settings' schedule, the folders bootstrap writes and,
    unless these inputs were trained already (a rerun that only promotes), the training venv.
    Empty when bootstrap may start; each problem says what to do.

    No GPU check: training needs one, but nothing here decides on its presence (the venv's
    check only warns), and the CPU tests train with a stand-in.
    """
    problems: list[str] = []
    try:
        check_options(settings, opts)
        options_ok = True
    except BootstrapError as exc:
        problems.append(str(exc))
        options_ok = False
    problems += _unwritable(settings, opts)
    t = apply_defaults(settings).training
    if options_ok:
        problems += _schedule_problems(t, opts)
    if not training_done(settings, opts):
        problems += venv_problems(settings)
    return problems


def venv_problems(settings: Settings) -> list[str]:
    """The training venv (``oogiri train setup``'s, or settings'): there, runnable, with
    XTuner; and the evaluation python when settings name one."""
    t = apply_defaults(settings).training
    if t.xtuner_python is None:
        where = Path(t.venv or settings.data_dir / "xtuner-venv")
        return [
            f"no training venv: none at {where} and OOGIRI_TRAINING__XTUNER_PYTHON is not set; "
            f"run `oogiri train setup` (it makes {where}) or set OOGIRI_TRAINING__XTUNER_PYTHON "
            "to an existing training venv's bin/python"
        ]
    env = training_env(t)
    problems = check_launch(t, env)
    python = Path(t.xtuner_python)
    if python.exists():
        problems += probe_python(python, env)
    if t.eval_python is not None:
        eval_python = Path(t.eval_python)
        if not eval_python.is_file() or not os.access(eval_python, os.X_OK):
            problems.append(
                f"evaluation python {eval_python} (OOGIRI_TRAINING__EVAL_PYTHON) is not an "
                "executable file: fix the setting, or unset it to evaluate with the training venv"
            )
    return problems


def training_done(settings: Settings, opts: BootstrapOptions) -> bool:
    """Whether a run with these options would skip its train step (every marker up to it
    matches and the pulled model and built set are still there): it then needs no venv."""
    if opts.restart:
        return False
    state = State(bootstrap_dir(settings) / STATE_FILE)
    dest = model_dest(settings, opts)
    pulled = state.done("pull", pull_key(opts, dest))
    out = dataset_out_dir(settings, opts)
    if not pulled or not state.done("data", data_key(settings, opts, out)):
        return False
    snap = hub.local_copy(dest, opts.model, "model", check=False)
    built = oogiri_go.load_built(out)
    if snap is None or built is None:
        return False
    epochs = train_epochs(apply_defaults(settings).training, opts)
    mark = state.done("train", train_key(snap.commit, built, epochs))
    return bool(mark and mark.get("version"))


def _unwritable(settings: Settings, opts: BootstrapOptions) -> list[str]:
    """The folders bootstrap writes (data_dir, work_dir, the model's), each to be a folder this
    user can write, or to be creatable inside one."""
    problems: list[str] = []
    blocked: set[Path] = set()
    for folder in (settings.data_dir, work_dir_of(settings), model_dest(settings, opts)):
        there = Path(folder).absolute()
        while not there.exists() and there.parent != there:
            there = there.parent
        if there in blocked:
            continue
        if not there.is_dir():
            problems.append(
                f"cannot create {folder}: {there} is not a folder; set OOGIRI_DATA_DIR (or "
                "--model-dir) to a folder this user can write"
            )
        elif not os.access(there, os.W_OK | os.X_OK):
            problems.append(
                f"cannot write {folder}: {there} is not writable for this user; set "
                "OOGIRI_DATA_DIR (or --model-dir) to a folder it can write"
            )
        else:
            continue
        blocked.add(there)
    return problems


def _schedule_problems(t: TrainingSettings, opts: BootstrapOptions) -> list[str]:
    """The run's schedule, from --n alone: fewer samples than it needs end the run "skipped"
    after the downloads."""
    epochs = train_epochs(t, opts)
    problems = []
    if not t.lr > 0:
        problems.append(f"OOGIRI_TRAINING__LR must be > 0 (got {t.lr})")
    try:
        gpus = world_size(training_env(t))
        need = min_schedule_samples(
            t.batch_size, t.accumulative_counts, gpus, epochs, t.warmup_ratio
        )
    except (ConfigError, ValueError) as exc:
        return [*problems, f"the training settings make no schedule: {exc}"]
    if opts.n < need:
        problems.append(
            f"--n {opts.n}: the training schedule needs at least {need} samples (batch_size "
            f"{t.batch_size} × accumulative_counts {t.accumulative_counts} × {gpus} GPU(s), "
            f"{epochs} epoch(s), warmup_ratio {t.warmup_ratio}); use --n {need} or more"
        )
    return problems


# --------------------------------------------------------------------------- the data step of a run


def build_exporter(
    build: oogiri_go.BuildResult,
) -> Callable[[Path], Any]:
    """The pipeline's data step for bootstrap: the built Oogiri-GO set, as an export result.

    The pictures stay where the build put them (no 2,000-picture copy per run); the run's own
    data folder gets the data card.
    """

    async def export(run_data: Path) -> ExportResult:
        report = build.report
        card = {
            "format": FORMAT,
            "created_at": datetime.now(UTC).isoformat(),
            "origin": "oogiri-go",
            "counts": {
                "train": build.train,
                "heldout": build.heldout,
                "negatives": 0,
                "base": 0,
                "train_samples": build.train,
                "dropped": report.get("dropped", {}),
            },
            "sources": {
                "base": {"path": None, "used": 0},
                "oogiri_go": {
                    "folder": str(build.out_dir),
                    "source": report.get("source"),
                    "params": report.get("params"),
                    "prompt": report.get("prompt"),
                    "star": report.get("star"),
                },
            },
            "files": {"train": str(build.files["train"]), "heldout": str(build.files["heldout"])},
        }
        await asyncio.to_thread(run_data.mkdir, parents=True, exist_ok=True)
        card_path = run_data / "data_card.json"
        text = json.dumps(card, ensure_ascii=False, indent=2) + "\n"
        await asyncio.to_thread(card_path.write_text, text, "utf-8")
        return ExportResult(
            out_dir=build.out_dir,
            train=build.train,
            heldout=build.heldout,
            negatives=0,
            base=0,
            data_card=card,
            files={
                "train": build.files["train"],
                "heldout": build.files["heldout"],
                "card": card_path,
            },
        )

    return export


# --------------------------------------------------------------------------- promotion


class RegistryOnlyPromoter:
    """No ``oogiri serve`` is running: nothing to swap; the registry and bootstrap.env say
    what to serve when it starts."""

    async def promote(self, version: str, model_dir: Path) -> None:
        return None


def serve_running(settings: Settings) -> bool:
    """Whether an ``oogiri serve`` with a managed engine listens on its control socket."""
    from bot.engines.lmdeploy_server import ControlUnavailable, control_request, socket_path

    path = socket_path(settings)
    if not Path(path).exists():
        return False
    try:
        control_request(path, {"op": "status"}, timeout_s=10)
    except (ControlUnavailable, OSError, ValueError):
        return False  # a stale socket of a server that is gone
    return True


def write_env(settings: Settings, path: Path, version: str, model_dir: Path) -> Path:
    """``bootstrap.env``: the settings that serve (and keep retraining) the bootstrapped model."""
    lines = [
        "# written by `oogiri train bootstrap`: source it before `oogiri serve`",
        f"OOGIRI_ENGINE__MODEL={model_dir}",
        f"OOGIRI_ENGINE__MODEL_VERSION={version}",
    ]
    t = settings.training
    if t.xtuner_python:
        lines.append(f"OOGIRI_TRAINING__XTUNER_PYTHON={t.xtuner_python}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------- the command


async def bootstrap(
    settings: Settings,
    store: Any,
    opts: BootstrapOptions,
    *,
    pm: Any = None,
    events: BootstrapEvents | None = None,
    promoter: Promoter | None = None,
    evaluator: Any = None,
    env: dict[str, str] | None = None,
) -> BootstrapResult:
    """Run (or finish) the bootstrap; the caller holds the training lock."""
    events = events or BootstrapEvents()
    try:
        check_options(settings, opts)
    except BootstrapError as exc:
        events.phase("options", "failed", str(exc))
        return BootstrapResult(status="failed", error=str(exc))
    state = State(bootstrap_dir(settings) / STATE_FILE)
    if opts.restart:
        state.clear()
    result = BootstrapResult(status="running", state_file=state.path)
    step = "pull"
    try:
        # 1. pull
        dest = model_dest(settings, opts)
        key = pull_key(opts, dest)
        mark = state.done("pull", key)
        snap = None
        if mark:
            snap = hub.local_copy(dest, opts.model, "model", check=False)
        if snap is not None:
            events.phase("pull", "skipped", f"{opts.model}@{snap.commit[:8]} in {dest}")
            result.steps["pull"] = "skipped"
        else:
            events.phase("pull", "running", f"{opts.model} → {dest}")
            snap = await asyncio.to_thread(
                hub.pull,
                opts.model,
                dest,
                revision=opts.revision,
                offline=opts.offline,
                progress=opts.progress,
                on_progress=events.build_progress,
            )
            result.steps["pull"] = "done"
        base_version, _ = await hub.register_model(store, snap)
        if result.steps["pull"] == "done":
            state.mark("pull", key, path=str(dest), commit=snap.commit, version=base_version)
        result.model = {**snap.as_dict(), "version": base_version}
        events.phase("pull", "done", f"{base_version} ({snap.bytes / 1e9:.2f} GB)")

        # 2. data
        step = "data"
        out = dataset_out_dir(settings, opts)
        raw = dataset_raw_dir(settings, opts.dataset)
        dkey = data_key(settings, opts, out)
        built = oogiri_go.load_built(out) if state.done("data", dkey) else None
        if built is not None:
            events.phase("data", "skipped", f"{built.train} samples in {out}")
            result.steps["data"] = "skipped"
        else:
            built = await fetch_and_build(settings, opts, raw, out, events)
            state.mark("data", dkey, folder=str(out), train=str(built.files["train"]))
            result.steps["data"] = "done"
        result.data = {
            "folder": str(built.out_dir),
            "train": built.train,
            "heldout": built.heldout,
            "dropped": built.dropped,
        }
        events.phase("data", "done", f"{built.train} + {built.heldout} held out")

        # 3. train → merge → gate → register
        step = "train"
        train_settings = _train_settings(settings, opts, dest, built)
        tkey = train_key(snap.commit, built, train_settings.training.max_epochs)
        tmark = state.done("train", tkey)
        version: str | None = tmark.get("version") if tmark else None
        if version is not None and await store.get_model_version(version) is not None:
            events.phase("train", "skipped", f"{version} already trained")
            result.steps["train"] = "skipped"
            row = await store.get_model_version(version)
            result.version, result.model_dir = version, Path(row.path)
        else:
            if await store.active_model() is None:
                # the pulled model is the one to return to: the registry's first active version
                await store.set_model_status(base_version, "active")
            events.phase("train", "running", f"{train_settings.training.max_epochs} epoch(s)")
            pipeline = TrainingPipeline(
                train_settings,
                store,
                pm=pm,
                promoter=RegistryOnlyPromoter(),
                evaluator=evaluator,
                gate=Gate([SanityStep()]),
                events=events,
                env=env,
                exporter=build_exporter(built),
            )
            run = await pipeline.run(promote=False)
            result.run = run
            result.version, result.model_dir = run.version, run.model_dir
            if run.status in ("failed", "skipped"):
                # skipped: too few samples for the schedule (a small --n): the message says why
                raise BootstrapError(f"training run #{run.run_id} {run.status}: {run.error}")
            if run.status != "succeeded":
                result.steps["train"] = "done"
                result.status = "rejected"
                result.error = "the fine-tuned model failed the sanity gate: " + "; ".join(
                    run.decision.reasons if run.decision else []
                )
                events.phase("train", "rejected", result.error)
                return result
            state.mark("train", tkey, version=run.version, run=run.run_id)
            result.steps["train"] = "done"
        events.phase("train", "done", f"{result.version}")

        # 4. promote
        step = "promote"
        assert result.version is not None and result.model_dir is not None
        if opts.promote:
            active = await store.active_model()
            swap = promoter
            if swap is None:
                running = serve_running(settings)
                swap = (
                    CommandPromoter(settings.training.promote_command)
                    if running
                    else RegistryOnlyPromoter()
                )
            if active is None or active.version != result.version:
                await promote_version(store, pm, swap, result.version)
            result.promoted = True
            result.swapped = not isinstance(swap, RegistryOnlyPromoter)
            state.mark("promote", {"version": result.version}, swapped=result.swapped)
            result.steps["promote"] = "done"
            events.phase("promote", "done", result.version)
        else:
            result.steps["promote"] = "skipped"
        result.env_file = write_env(
            train_settings, bootstrap_dir(settings) / ENV_FILE, result.version, result.model_dir
        )
        result.status = "succeeded"
    except (hub.HubError, oogiri_go.DataError, BootstrapError) as exc:
        result.status, result.error = "failed", f"{step}: {exc}"
        result.steps[step] = "failed"
        events.phase(step, "failed", str(exc))
    except Exception as exc:
        result.status, result.error = "failed", f"{step}: {type(exc).__name__}: {exc}"
        result.steps[step] = "failed"
        events.phase(step, "failed", str(exc))
    return result


def train_epochs(t: TrainingSettings, opts: BootstrapOptions) -> int:
    """--epochs, else settings' max_epochs if the operator set it, else the seed's 6."""
    if opts.epochs is not None:
        return opts.epochs
    return t.max_epochs if "max_epochs" in t.model_fields_set else SEED_EPOCHS


def _train_settings(
    settings: Settings, opts: BootstrapOptions, base: Path, built: oogiri_go.BuildResult
) -> Settings:
    """The run's settings: the pulled model as the base, the seed's epochs unless set."""
    t = apply_defaults(settings).training
    update: dict[str, Any] = {"base_model": base, "max_epochs": train_epochs(t, opts)}
    if t.base_dataset is None:
        update["base_dataset"] = built.files["train"]
    return settings.model_copy(update={"training": t.model_copy(update=update)})


async def fetch_and_build(
    settings: Settings,
    opts: BootstrapOptions,
    raw: Path,
    out: Path,
    events: BootstrapEvents | None = None,
) -> oogiri_go.BuildResult:
    """Download the language's jsonl and the pictures, then build the training set."""
    events = events or BootstrapEvents()
    oogiri_go.check_params(opts.lang, opts.n)  # before 1.37 GB of pictures
    events.phase("data", "running", f"{opts.dataset} ({opts.lang}) → {raw}")
    snap = await asyncio.to_thread(
        hub.pull,
        opts.dataset,
        raw,
        repo_type="dataset",
        revision=opts.dataset_revision,
        patterns=[f"{opts.lang}.jsonl", oogiri_go.IMAGES_ZIP],
        offline=opts.offline,
        progress=opts.progress,
        on_progress=events.build_progress,
    )
    source = {"repo": snap.repo, "commit": snap.commit, "endpoint": snap.endpoint}
    return await asyncio.to_thread(
        oogiri_go.build,
        raw,
        out,
        lang=opts.lang,
        n=opts.n,
        min_star=opts.min_star,
        heldout=opts.heldout,
        prompt=settings.prompt,
        images=settings.images,
        source=source,
        progress=events.build_progress,
    )


def summary(result: BootstrapResult, settings: Settings) -> list[str]:
    """The end-of-run summary: what was trained on, where the model is, how to serve it."""
    lines = [f"bootstrap {result.status}"]
    for s in STEPS:
        if s in result.steps:
            lines.append(f"  {s:<8} {result.steps[s]}")
    if result.model:
        m = result.model
        lines.append(f"  base model  {m['repo']}@{m['commit'][:8]} in {m['path']}")
    if result.data:
        d = result.data
        dropped = sum(d.get("dropped", {}).values())
        lines.append(
            f"  trained on  {d['train']} Oogiri-GO jokes ({d['heldout']} held out, "
            f"{dropped} lines dropped: {d['folder']}/report.json)"
        )
    run = result.run
    if run is not None and run.metrics.get("train"):
        tr = run.metrics["train"]
        loss = tr.get("final_loss")
        lines.append(
            f"  training    {tr.get('iterations')} iterations in {tr.get('seconds', 0):.0f} s"
            + (f", final loss {loss:.4f}" if isinstance(loss, int | float) else "")
        )
    if run is not None and run.decision is not None:
        lines += [f"  gate        {r}" for r in run.decision.reasons]
    if result.version:
        lines.append(f"  model       {result.version} at {result.model_dir}")
    if result.error:
        lines.append(f"  error       {result.error}")
    if run is not None and run.log_path:
        lines.append(f"  log         {run.log_path}")
    if result.status == "succeeded" and result.env_file:
        how = "swapped into the running server" if result.swapped else "active in the registry"
        lines.append(f"  promoted    {how}")
        lines.append("  serve it:   set -a; . " + str(result.env_file) + "; set +a")
        lines.append("              OOGIRI_ENGINE__NAME=lmdeploy oogiri serve   # GPU")
    elif result.status == "failed":
        lines.append("  run `oogiri train bootstrap` again to resume from the failed step")
    return lines


def offline_default() -> bool | None:
    """``HF_HUB_OFFLINE`` set: never touch the network (None lets the hub module decide)."""
    return True if hub.offline_env() else None


__all__ = [
    "STEPS",
    "BootstrapError",
    "BootstrapEvents",
    "BootstrapOptions",
    "BootstrapResult",
    "apply_defaults",
    "bootstrap",
    "check_options",
    "fetch_and_build",
    "preflight",
    "summary",
]
