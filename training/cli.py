"""The training plugin: ``oogiri train …`` and ``oogiri models …`` commands, and the optional
retraining scheduler inside ``oogiri serve`` (settings.training.schedule_in_serve).

Registered through the ``oogiri`` entry point ``training = "training.cli"`` like any plugin.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Column, Table

from oogiri import hookimpl
from training.settings import TrainingSettings

if TYPE_CHECKING:
    from bot.app import App
    from bot.settings import Settings
    from training.run import Promoter, RunResult, TrainProgress

log = logging.getLogger(__name__)
T = TypeVar("T")

train_cli = typer.Typer(no_args_is_help=True, help="Retrain the model from users' ratings.")
models_cli = typer.Typer(no_args_is_help=True, help="The model registry: list, promote, roll back.")
console = Console(stderr=True, soft_wrap=True)  # paths and errors stay on one line

# The exit statuses of `oogiri train run` and `oogiri train bootstrap` (docs/training.md "Exit
# status"; deploy/systemd/oogiri-train.service counts EXIT_REJECTED as success).
EXIT_OK = 0  # succeeded (promoted, or passed with promotion off), A/B test started, nothing to do
EXIT_FAILED = 1  # a step failed, was cancelled or interrupted: see the log
EXIT_USAGE = 2  # bad options or settings, no/broken training venv: nothing was trained
EXIT_REJECTED = 3  # trained and registered, but the gate rejected it: the active model stays
EXIT_BUSY = 75  # EX_TEMPFAIL: another run holds the lock
EXIT_STATUS_HELP = (
    f"Exit status: {EXIT_OK} succeeded (promoted, or passed with --no-promote) or nothing to do; "
    f"{EXIT_FAILED} failed (see the log); "
    f"{EXIT_USAGE} usage or configuration error: bad options or settings, no training venv "
    "(nothing was trained); "
    f"{EXIT_REJECTED} ran to the end but the gate rejected the candidate (the active model "
    f"stays); {EXIT_BUSY} another run holds the lock."
)


# --------------------------------------------------------------------------- plugin hooks


@hookimpl
def oogiri_register_settings(register: Callable[..., None]) -> None:
    register("training", TrainingSettings)


@hookimpl
def oogiri_register_commands(cli: Any) -> None:
    from training.bootstrap_cli import data_cli, model_cli

    cli.add_typer(train_cli, name="train")
    cli.add_typer(models_cli, name="models")
    cli.add_typer(model_cli, name="model")
    cli.add_typer(data_cli, name="data")


@hookimpl
def oogiri_startup(app: App) -> Awaitable[None] | None:
    if not app.settings.training.schedule_in_serve:
        return None

    async def start() -> None:
        app.state["training_scheduler"] = asyncio.create_task(scheduler_loop(app))

    return start()


@hookimpl
def oogiri_shutdown(app: App) -> Awaitable[None] | None:
    task = app.state.pop("training_scheduler", None)
    if task is None:
        return None

    async def stop() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return stop()


def app_promoter(app: App) -> Promoter:
    """In ``oogiri serve``: a plugin that manages the engine may publish an in-process swap as
    ``app.state["promote_model"] = fn(version, model_dir)``; otherwise the swap command runs."""
    from training.run import CallablePromoter, CommandPromoter

    fn = app.state.get("promote_model")
    if callable(fn):
        return CallablePromoter(fn)  # pyright: ignore[reportArgumentType]  # fn(version, dir)
    return CommandPromoter(app.settings.training.promote_command)


async def scheduler_loop(app: App) -> None:
    from training.lock import LockBusy
    from training.run import run_guarded

    interval = app.settings.training.schedule_check_minutes * 60
    while True:
        await asyncio.sleep(interval)
        try:
            result = await run_guarded(
                app.settings, app.store, if_due=True, pm=app.pm, promoter=app_promoter(app)
            )
            log.info("training scheduler: %s", getattr(result, "status", result))
        except LockBusy:
            log.info("training scheduler: another run holds the lock")
        except Exception:
            log.exception("training scheduler: the check or run failed")


# --------------------------------------------------------------------------- helpers


def load_settings() -> Settings:
    """The settings, or the core CLI's message (each invalid OOGIRI_ variable, never its value)
    and exit status 2 (``EXIT_USAGE``) when they do not parse."""
    from bot.cli import load_settings as load_core_settings

    return load_core_settings()


def exit_status(status: str, *, config_error: bool = False) -> int:
    """The exit status of a finished run or bootstrap of ``status`` (``EXIT_STATUS_HELP``).

    ``config_error``: the run failed before training because of its settings or environment
    (``training.config.ConfigError``, e.g. no training venv).
    """
    if status == "failed":
        return EXIT_USAGE if config_error else EXIT_FAILED
    if status == "rejected":
        return EXIT_REJECTED
    return EXIT_OK  # succeeded, testing (a live A/B test decides), skipped (too little data)


def run_async(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    return asyncio.run(fn(*args))  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def open_store(settings: Settings) -> AsyncIterator[Any]:
    from bot.store import Store

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = Store(settings.database_url, settings.images_dir)
    try:
        await store.upgrade()
        yield store
    finally:
        await store.close()


def plugin_manager(settings: Settings) -> Any:
    from bot.plugins import make_manager

    return make_manager(settings.plugins)


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class RichEvents:
    """Shows the run: current step, then a bar of training iterations with loss and ETA."""

    def __init__(self, progress: Progress, verbose: bool = False) -> None:
        self.progress = progress
        self.verbose = verbose
        self.task = progress.add_task("starting", total=None, loss="-", eta="-")

    def step(self, name: str) -> None:
        self.progress.update(self.task, description=name)

    def progress_(self, p: TrainProgress) -> None:
        loss = f"{p.loss:.4f}" if p.loss is not None else "-"
        self.progress.update(
            self.task,
            description="train",
            total=p.total,
            completed=p.iteration,
            loss=loss,
            eta=_fmt_eta(p.eta_s),
        )

    def line(self, text: str) -> None:
        if self.verbose:
            self.progress.console.print(text, markup=False, highlight=False)

    def done(self, result: RunResult) -> None:
        self.progress.update(self.task, description=result.status)


def _events(progress: Progress, verbose: bool) -> Any:
    from training.run import RunEvents

    rich_events = RichEvents(progress, verbose)

    class Events(RunEvents):
        def step(self, name: str) -> None:
            rich_events.step(name)

        def progress(self, p: TrainProgress) -> None:
            rich_events.progress_(p)

        def line(self, text: str) -> None:
            rich_events.line(text)

        def done(self, result: RunResult) -> None:
            rich_events.done(result)

    return Events()


def make_progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description:<12}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("eta {task.fields[eta]}"),
        TimeElapsedColumn(),
        console=console,
    )


def print_result(result: RunResult) -> None:
    colour = {
        "succeeded": "green",
        "testing": "cyan",
        "rejected": "yellow",
        "skipped": "yellow",
    }.get(result.status, "red")
    console.print(f"run #{result.run_id}: [{colour}]{result.status}[/{colour}]", highlight=False)
    if result.version:
        promoted = "promoted" if result.promoted else "not promoted"
        if result.status == "testing":
            test = result.metrics.get("ab_test")
            promoted = f"live A/B test #{test}: `oogiri models ab status`"
        console.print(f"  model {result.version} ({promoted}) at {result.model_dir}")
    if result.decision is not None:
        for reason in result.decision.reasons:
            console.print(f"  gate {reason}", markup=False)
    if result.error:
        console.print(f"  error: {result.error}", markup=False)
    console.print(f"  log: {result.log_path}", markup=False)


# --------------------------------------------------------------------------- train commands


@train_cli.command("export")
def export_cmd(
    out: Annotated[
        Path | None, typer.Option(help="folder (default: work_dir/exports/<time>)")
    ] = None,
) -> None:
    """Write the XTuner data set (train/held-out/base mix/negatives, images, data card)."""
    from datetime import UTC, datetime

    from training.export import ExportError, export_dataset
    from training.run import work_dir_of

    settings = load_settings()
    target = out or work_dir_of(settings) / "exports" / datetime.now(UTC).strftime("%Y%m%d-%H%M%S")

    async def main() -> Any:
        async with open_store(settings) as store:
            return await export_dataset(
                store, settings.training, target, pm=plugin_manager(settings)
            )

    try:
        result = run_async(main)
    except ExportError as exc:
        console.print(f"[red]export failed:[/red] {exc}", highlight=False)
        raise typer.Exit(EXIT_FAILED) from exc
    print(json.dumps(result.data_card, ensure_ascii=False, indent=2))
    console.print(
        f"exported {result.train} train, {result.heldout} held-out, {result.base} base, "
        f"{result.negatives} negatives to {result.out_dir}",
        highlight=False,
    )


@train_cli.command("config")
def config_cmd(
    export_dir: Annotated[Path, typer.Argument(help="an export folder (oogiri train export)")],
    out: Annotated[
        Path | None, typer.Option(help="config file (default: beside the export)")
    ] = None,
) -> None:
    """Render and validate the XTuner config for an export; print the schedule it implies."""
    from training.config import ConfigError, TrainParams, write_config
    from training.export import ExportError, load_export
    from training.run import training_env, world_size

    settings = load_settings()
    target = out or Path(export_dir) / "xtuner_config.py"
    try:
        export = load_export(export_dir)
        params = TrainParams.from_settings(
            settings.training, export.data_paths, export.image_folders
        )
        env = training_env(settings.training)
        plan = write_config(
            target, params, export.train_samples, world_size(env), settings.training.template
        )
    except (ConfigError, ExportError) as exc:
        console.print(f"[red]{exc}[/red]", highlight=False)
        raise typer.Exit(EXIT_FAILED) from exc
    print(json.dumps({"config": str(target), **plan.as_dict()}, indent=2))


@train_cli.command("run", epilog=EXIT_STATUS_HELP)
def run_cmd(
    if_due: Annotated[
        bool, typer.Option("--if-due", help="only when the schedule says so (cron, CronJob)")
    ] = False,
    promote: Annotated[
        bool | None,
        typer.Option("--promote/--no-promote", help="promote a candidate that passes the gate"),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="stream the log")] = False,
) -> None:
    """Export → xtuner train → convert → evaluate → register → promote (if the gate passes).

    With --if-due, not due and another run holding the lock are "nothing to do" (0).
    """
    from training.lock import LockBusy
    from training.run import RunResult, run_guarded

    settings = load_settings()

    async def main() -> Any:
        async with open_store(settings) as store:
            with make_progress() as progress:
                return await run_guarded(
                    settings,
                    store,
                    if_due=if_due,
                    promote=promote,
                    pm=plugin_manager(settings),
                    events=_events(progress, verbose),
                )

    try:
        result = run_async(main)
    except LockBusy as exc:
        console.print(f"[yellow]{exc}[/yellow]", highlight=False)
        raise typer.Exit(0 if if_due else EXIT_BUSY) from exc
    if not isinstance(result, RunResult):
        console.print(str(result), highlight=False)
        return
    print_result(result)
    code = exit_status(result.status, config_error=result.config_error)
    if code:
        raise typer.Exit(code)


@train_cli.command("status")
def status_cmd(limit: int = 10) -> None:
    """Whether a run is due, and the latest runs."""
    from training.schedule import check_due

    settings = load_settings()

    async def main() -> tuple[Any, list[Any]]:
        async with open_store(settings) as store:
            return await check_due(store, settings.training), list(await store.training_runs())

    decision, runs = run_async(main)
    console.print(str(decision), highlight=False)
    table = Table("run", "status", "step", "started", "model", "error")
    for r in runs[-limit:]:
        table.add_row(
            str(r.id),
            r.status,
            r.step or "",
            str(r.started_at)[:19],
            r.model_version or "",
            (r.error or "")[:60],
        )
    Console().print(table)


@train_cli.command("setup")
def setup_cmd(
    venv: Annotated[Path | None, typer.Option(help="default: settings.training.venv")] = None,
    python: Annotated[str, typer.Option(help="a Python < 3.13 with CUDA torch")] = "python3",
    wheels: Annotated[
        Path | None, typer.Option(help="install offline from this folder of wheels")
    ] = None,
    system_site_packages: Annotated[
        bool, typer.Option(help="reuse the machine's torch (recommended)")
    ] = True,
    download: Annotated[
        Path | None, typer.Option(help="only print the pip download commands for --wheels")
    ] = None,
    print_only: Annotated[bool, typer.Option("--print", help="print the commands only")] = False,
    check_only: Annotated[
        bool, typer.Option("--check", help="only check an existing venv")
    ] = False,
    extra: Annotated[
        list[str] | None, typer.Option("--extra", help="one more package to install (repeatable)")
    ] = None,
    model: Annotated[
        Path | None,
        typer.Option(help="InternVL2 folder the check builds a one-sample data set from"),
    ] = None,
    reuse_system: Annotated[
        bool, typer.Option(help="with --wheels: take lock entries without a wheel from the system")
    ] = False,
) -> None:
    """Create the training venv (training/requirements-xtuner.txt) and check it."""
    import shutil
    import subprocess

    from training.bootstrap import apply_defaults
    from training.environment import (
        VenvMissing,
        check_venv,
        clean_env,
        download_steps,
        setup_steps,
        venv_python,
    )

    settings = load_settings()
    if download is not None:
        for step in download_steps(download):
            print(step.shell())
        return
    target = Path(venv or settings.training.venv or settings.data_dir / "xtuner-venv")
    # --print only names the folder (another machine may have it), unless it must read it
    needs_wheels = not check_only and (reuse_system or not print_only)
    if wheels is not None and needs_wheels and not Path(wheels).is_dir():
        console.print(f"[red]--wheels {wheels}: no such folder[/red]", highlight=False)
        raise typer.Exit(EXIT_FAILED)
    if not check_only and not print_only and shutil.which(python) is None:
        console.print(
            f"[red]--python {python}: not found (a Python < 3.13 with CUDA torch)[/red]",
            highlight=False,
        )
        raise typer.Exit(EXIT_FAILED)
    steps = setup_steps(
        target, python, wheels, system_site_packages, tuple(extra or ()), reuse_system
    )
    if print_only:
        for step in steps:
            print(step.shell())
        return
    if not check_only:
        for step in steps[:-1]:
            console.print(f"[bold]{step.description}[/bold]: {step.shell()}", highlight=False)
            try:
                if step.action is not None:
                    step.action()
                    continue
                assert step.argv is not None
                # no PYTHONPATH: pip would count the bot's own packages as installed in the venv
                env = {**clean_env(), **step.env}
                rc = subprocess.run(step.argv, env=env, check=False).returncode
            except (OSError, subprocess.CalledProcessError) as exc:
                console.print(f"[red]failed[/red]: {step.description}: {exc}", highlight=False)
                raise typer.Exit(EXIT_FAILED) from None
            if rc != 0:
                console.print(f"[red]failed ({rc})[/red]: {step.description}")
                raise typer.Exit(EXIT_FAILED)
    if check_only and venv is None and settings.training.xtuner_python is not None:
        target = Path(settings.training.xtuner_python).parent.parent
    check_model = model or apply_defaults(settings).training.base_model
    try:
        report, problems, warnings = check_venv(venv_python(target), check_model)
    except VenvMissing as exc:
        console.print(f"[red]{exc}[/red]", highlight=False)
        raise typer.Exit(EXIT_FAILED) from None
    print(json.dumps(report, indent=2))
    for w in warnings:
        console.print(f"[yellow]warning:[/yellow] {w}", highlight=False)
    for p in problems:
        console.print(f"[red]problem:[/red] {p}", highlight=False)
    if problems:
        raise typer.Exit(EXIT_FAILED)
    console.print(
        f"training venv ready: export OOGIRI_TRAINING__XTUNER_PYTHON={venv_python(target)}",
        highlight=False,
    )


# --------------------------------------------------------------------------- models commands


@models_cli.command("list")
def models_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Every registered model version, the active one marked."""
    settings = load_settings()

    async def main() -> list[Any]:
        async with open_store(settings) as store:
            return list(await store.model_versions())

    rows = run_async(main)
    if as_json:
        print(
            json.dumps(
                [
                    {
                        "version": r.version,
                        "status": r.status,
                        "parent": r.parent,
                        "path": r.path,
                        "created_at": str(r.created_at),
                        "promoted_at": str(r.promoted_at) if r.promoted_at else None,
                        "gate": (r.metrics or {}).get("gate", {}).get("verdict"),
                    }
                    for r in rows
                ],
                indent=2,
            )
        )
        return
    if not rows:  # a fresh install: say what is served and how a version comes to exist
        print(
            "no model versions yet — the bot serves the configured model (engine.model, or the "
            "demo model). A retrain registers one once users have rated jokes: run "
            "`oogiri train status` to see when one is due, `oogiri train run` to start it."
        )
        return
    table = Table(
        "",
        Column("version", no_wrap=True),
        "status",
        Column("parent", no_wrap=True),
        "held-out loss",
        "promoted",
        "path",
    )
    for r in rows:
        cand = ((r.metrics or {}).get("eval") or {}).get("candidate") or {}
        loss = cand.get("loss")
        table.add_row(
            "*" if r.status == "active" else "",
            r.version,
            r.status,
            r.parent or "",
            f"{loss:.4f}" if isinstance(loss, int | float) else "",
            str(r.promoted_at)[:19] if r.promoted_at else "",
            r.path,
        )
    Console().print(table)


def _promoter(settings: Settings) -> Promoter:
    from training.run import CommandPromoter

    return CommandPromoter(settings.training.promote_command)


def _registry_call(
    what: Callable[[Any, Any, Promoter], Awaitable[tuple[str, str | None]]],
) -> tuple[str, str | None]:
    from training.lock import LockBusy, training_lock
    from training.run import PromotionError, ensure_registry, work_dir_of

    settings = load_settings()

    async def main() -> tuple[str, str | None]:
        async with open_store(settings) as store:
            # the training lock also serialises manual promotions with a run's promotion
            async with training_lock(store, work_dir_of(settings)):
                await ensure_registry(store, settings)
                return await what(store, plugin_manager(settings), _promoter(settings))

    try:
        return run_async(main)
    except (LookupError, PromotionError, LockBusy) as exc:
        console.print(f"[red]{exc}[/red]", highlight=False)
        raise typer.Exit(EXIT_FAILED) from exc


@models_cli.command("promote")
def models_promote(version: str) -> None:
    """Serve VERSION (engine swap) and mark it active — no gate: the operator decides."""
    from training.run import promote_version

    got, previous = _registry_call(lambda s, pm, p: promote_version(s, pm, p, version))
    console.print(f"active: {got} (was {previous})", highlight=False)


@models_cli.command("rollback")
def models_rollback(
    to: Annotated[str | None, typer.Option(help="version (default: the previous one)")] = None,
) -> None:
    """Go back to the previously active version (or --to VERSION)."""
    from training.run import rollback

    got, previous = _registry_call(lambda s, pm, p: rollback(s, pm, p, to))
    console.print(f"rolled back: active {got} (was {previous})", highlight=False)


# --------------------------------------------------------------------------- demo data

DEMO_JOKES = (
    "这只猫看起来很严肃，因为它刚刚发现冰箱是空的。",
    "科学家发现，咖啡喝多了会让人以为自己是火箭。",
    "宇航员说：我不是迷路了，我只是在找外星人的厕所。",
    "老板说今天加班，我的摩托车先下班了。",
    "当你以为周末到了，其实今天才星期一。",
    "这张图片告诉我们：猫才是这个家真正的主人。",
    "图片里的它在想什么？它在想晚饭吃什么。",
    "我不是懒，我只是进入了省电模式。",
)


@train_cli.command("seed-demo", hidden=True)
def seed_demo_cmd(
    images: Annotated[
        Path | None, typer.Option(help="folder of pictures (default: scikit-image's photos)")
    ] = None,
    jokes: Annotated[int, typer.Option(help="jokes to create")] = 32,
    seed: int = 0,
) -> None:
    """Demo/dev only: jokes with votes on crops of real photos, through the Store API."""
    import io
    import random

    from PIL import Image

    from bot.images import load
    from bot.settings import DEFAULT_PROMPT

    settings = load_settings()
    folder = images
    if folder is None:
        import skimage

        folder = Path(skimage.__file__).parent / "data"
    photos = sorted(
        p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")
    )
    if not photos:
        console.print(f"[red]no pictures in {folder}[/red]")
        raise typer.Exit(EXIT_FAILED)
    rng = random.Random(seed)

    def picture(i: int) -> Any:
        img = Image.open(photos[i % len(photos)]).convert("RGB")
        w, h = img.size
        cw, ch = int(w * rng.uniform(0.6, 0.95)), int(h * rng.uniform(0.6, 0.95))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        buf = io.BytesIO()
        img.crop((x, y, x + cw, y + ch)).save(buf, "PNG")
        return load(buf.getvalue(), settings.images)

    async def main() -> tuple[int, int]:
        async with open_store(settings) as store:
            active = await store.active_model()
            version = active.version if active else (settings.engine.model_version or "base")
            up_total = down_total = 0
            for i in range(jokes):
                image = await asyncio.to_thread(picture, i)
                joke = await store.add_joke(
                    image,
                    channel="demo",
                    user_id=f"demo:user{i % 5}",
                    chat_id=None,
                    prompt=DEFAULT_PROMPT,
                    text=DEMO_JOKES[i % len(DEMO_JOKES)],
                    model_version=version,
                    engine="demo",
                    params={},
                )
                good = rng.random() < 0.75
                ups, downs = (rng.randint(2, 4), rng.randint(0, 1)) if good else (0, 2)
                for k in range(ups):
                    await store.rate(joke.id, f"demo:voter{k}", 1, "demo")
                for k in range(downs):
                    await store.rate(joke.id, f"demo:critic{k}", -1, "demo")
                up_total += ups
                down_total += downs
            return up_total, down_total

    up, down = run_async(main)
    console.print(f"{jokes} demo jokes, {up} 👍 and {down} 👎", highlight=False)
