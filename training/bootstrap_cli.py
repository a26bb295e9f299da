"""``oogiri model pull``, ``oogiri data oogiri-go`` and ``oogiri train bootstrap``.

Registered by ``training.cli``'s ``oogiri_register_commands`` (the training plugin); the work is
in ``training.hub``, ``training.oogiri_go`` and ``training.bootstrap``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from training.cli import (
    EXIT_BUSY,
    EXIT_FAILED,
    EXIT_STATUS_HELP,
    EXIT_USAGE,
    RichEvents,
    console,
    exit_status,
    load_settings,
    make_progress,
    open_store,
    plugin_manager,
    run_async,
    train_cli,
)

model_cli = typer.Typer(no_args_is_help=True, help="Fetch models from the Hugging Face hub.")
data_cli = typer.Typer(no_args_is_help=True, help="Fetch and build training data sets.")

OFFLINE_HELP = "use the copy already in DEST only (also: HF_HUB_OFFLINE=1)"


def _offline(flag: bool) -> bool | None:
    from training.hub import offline_env

    return True if flag or offline_env() else None


def _fail(message: str, code: int = EXIT_FAILED) -> None:
    console.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


@model_cli.command("pull")
def pull_cmd(
    repo: Annotated[str, typer.Argument(help="OWNER/NAME on the hub")] = "OpenGVLab/InternVL2-2B",
    revision: Annotated[str | None, typer.Option(help="branch, tag or commit")] = None,
    dest: Annotated[
        Path | None, typer.Option(help="folder (default: data_dir/models/OWNER--NAME)")
    ] = None,
    offline: Annotated[bool, typer.Option("--offline", help=OFFLINE_HELP)] = False,
) -> None:
    """Download a model folder (resumable, every file checked) and register it as a version.

    Honours HF_ENDPOINT (a mirror) and HF_TOKEN (gated or private repositories).
    """
    from training import hub

    settings = load_settings()
    target = dest or hub.default_dest(settings.data_dir / "models", repo)
    try:
        snap = hub.pull(repo, target, revision=revision, offline=_offline(offline))
    except hub.HubError as exc:
        _fail(str(exc))
        return

    async def register() -> tuple[str, bool]:
        async with open_store(settings) as store:
            return await hub.register_model(store, snap)

    version, new = run_async(register)
    print(json.dumps({**snap.as_dict(), "version": version}, indent=2))
    console.print(
        f"{'registered' if new else 'already registered'} {version}: {snap.path} "
        f"({len(snap.files)} files, {snap.bytes / 1e9:.2f} GB, checked)",
        highlight=False,
    )


@data_cli.command("oogiri-go")
def oogiri_go_cmd(
    lang: Annotated[str, typer.Option(help="cn, en or jp")] = "cn",
    n: Annotated[int, typer.Option("--n", help="training samples to keep")] = 2000,
    min_star: Annotated[
        float | None, typer.Option(help="drop answers with fewer likes (and unrated ones)")
    ] = None,
    heldout: Annotated[
        int | None, typer.Option(help="pictures held out for the gate (default: n/20, ≤ 64)")
    ] = None,
    repo: Annotated[str, typer.Option(help="the data set on the hub")] = "zhongshsh/CLoT-Oogiri-GO",
    revision: Annotated[str | None, typer.Option(help="branch, tag or commit")] = None,
    dest: Annotated[
        Path | None, typer.Option(help="output (default: data_dir/datasets/oogiri-go-LANG-N)")
    ] = None,
    offline: Annotated[bool, typer.Option("--offline", help=OFFLINE_HELP)] = False,
) -> None:
    """Fetch Oogiri-GO and build the seed's training set (XTuner InternVL JSON + pictures).

    Image-to-text jokes of one language, deduplicated by picture and by text, best-liked first,
    every picture checked like an upload; report.json says what was dropped and why. The result
    is the base data set of later `oogiri train run`s (unless settings name another).
    """
    from training import bootstrap, hub, oogiri_go

    try:  # bad options are a usage error (exit 2), found before anything is downloaded
        oogiri_go.check_params(lang, n)
    except oogiri_go.DataError as exc:
        _fail(str(exc), EXIT_USAGE)
    settings = load_settings()
    opts = bootstrap.BootstrapOptions(
        dataset=repo,
        dataset_revision=revision,
        lang=lang,
        n=n,
        min_star=min_star,
        heldout=heldout,
        offline=_offline(offline),
    )
    out = dest or bootstrap.dataset_out_dir(settings, opts)
    raw = bootstrap.dataset_raw_dir(settings, repo)
    with _build_progress() as progress:
        events = _BuildEvents(progress)
        try:
            built = run_async(bootstrap.fetch_and_build, settings, opts, raw, out, events)
        except (hub.HubError, oogiri_go.DataError) as exc:
            _fail(str(exc))
            return
    print(json.dumps({k: built.report[k] for k in ("params", "kept", "dropped")}, indent=2))
    for line in oogiri_go.summary_lines(built):
        console.print(line, highlight=False, markup=False)
    state = bootstrap.State(bootstrap.bootstrap_dir(settings) / bootstrap.STATE_FILE)
    # the newest build is what later runs mix in (apply_defaults), unless settings name one
    state.data["steps"].setdefault("data", {})["train"] = str(built.files["train"])
    state.save()
    console.print(f"base data set: {built.files['train']}", highlight=False)


def _build_progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description:<12}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


class _BuildEvents:
    """Phases as lines, downloads (bytes) and picture checking as bars."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, Any] = {}  # one bar per download, one for the pictures

    def phase(self, name: str, state: str, detail: str = "") -> None:
        colour = {"failed": "red", "rejected": "yellow", "done": "green"}.get(state, "bold")
        self.progress.console.print(
            f"[{colour}]{name} {state}[/{colour}] {detail}".rstrip(), highlight=False
        )

    def build_progress(self, done: int, total: int | None, what: str) -> None:
        task = self.tasks.get(what)
        if task is None:
            task = self.tasks[what] = self.progress.add_task(what, total=total, loss="-", eta="-")
        self.progress.update(task, completed=done, total=total)


@train_cli.command("bootstrap", epilog=EXIT_STATUS_HELP)
def bootstrap_cmd(
    model: Annotated[str, typer.Option(help="base model on the hub")] = "OpenGVLab/InternVL2-2B",
    revision: Annotated[str | None, typer.Option(help="base model revision")] = None,
    model_dir: Annotated[Path | None, typer.Option(help="where the base model goes")] = None,
    lang: Annotated[str, typer.Option(help="Oogiri-GO language: cn, en or jp")] = "cn",
    n: Annotated[int, typer.Option("--n", help="training samples")] = 2000,
    min_star: Annotated[float | None, typer.Option(help="fewest likes a joke needs")] = None,
    epochs: Annotated[
        int | None, typer.Option(help="default: the seed's 6 (or settings' max_epochs if set)")
    ] = None,
    promote: Annotated[
        bool, typer.Option("--promote/--no-promote", help="make the new model the active one")
    ] = True,
    offline: Annotated[bool, typer.Option("--offline", help="no network: earlier copies")] = False,
    restart: Annotated[bool, typer.Option(help="forget finished steps, redo everything")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="stream the log")] = False,
) -> None:
    """Pull InternVL2-2B and Oogiri-GO, fine-tune with the seed's recipe, merge, check, promote.

    Resumable: a second run skips the finished steps. Ends with where the model is and how to
    serve it. Before any download it checks the options, the settings, the folders it writes and
    the training venv (`oogiri train setup`).
    """
    from training import bootstrap
    from training.lock import LockBusy, training_lock
    from training.run import mark_interrupted, work_dir_of

    settings = load_settings()
    opts = bootstrap.BootstrapOptions(
        model=model,
        revision=revision,
        model_dir=model_dir,
        lang=lang,
        n=n,
        min_star=min_star,
        epochs=epochs,
        promote=promote,
        offline=_offline(offline),
        restart=restart,
    )
    problems = bootstrap.preflight(settings, opts)
    if problems:
        # one message, every problem, before gigabytes are downloaded (exit 2: nothing started)
        console.print(
            "[red]error:[/red] `oogiri train bootstrap` cannot start; nothing was downloaded:",
            highlight=False,
        )
        for problem in problems:
            console.print(f"  - {problem}", highlight=False, markup=False)
        raise typer.Exit(EXIT_USAGE)

    async def main() -> bootstrap.BootstrapResult:
        async with open_store(settings) as store:
            async with training_lock(store, work_dir_of(settings)):
                await mark_interrupted(store)
                with make_progress() as progress:
                    events = _events(progress, verbose)
                    return await bootstrap.bootstrap(
                        settings, store, opts, pm=plugin_manager(settings), events=events
                    )

    try:
        result = run_async(main)
    except LockBusy as exc:
        console.print(f"[yellow]{exc}[/yellow]", highlight=False)
        raise typer.Exit(EXIT_BUSY) from exc
    for line in bootstrap.summary(result, settings):
        console.print(line, highlight=False, markup=False)
    run = result.run
    config_error = run is not None and run.status == "failed" and run.config_error
    code = exit_status(result.status, config_error=config_error)
    if code:
        raise typer.Exit(code)


def _events(progress: Progress, verbose: bool) -> Any:
    """The training run's bar (``training.cli.RichEvents``) plus bootstrap's phases."""
    from training.bootstrap import BootstrapEvents

    rich_events = RichEvents(progress, verbose)
    build = _BuildEvents(progress)

    class Events(BootstrapEvents):
        def phase(self, name: str, state: str, detail: str = "") -> None:
            build.phase(name, state, detail)
            rich_events.step(f"{name}")

        def build_progress(self, done: int, total: int | None, what: str) -> None:
            build.build_progress(done, total, what)

        def step(self, name: str) -> None:
            rich_events.step(name)

        def progress(self, p: Any) -> None:
            rich_events.progress_(p)

        def line(self, text: str) -> None:
            rich_events.line(text)

        def done(self, result: Any) -> None:
            rich_events.done(result)

    return Events()
