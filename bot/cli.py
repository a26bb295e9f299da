"""The ``oogiri`` command line. Plugins add commands through ``oogiri_register_commands``."""

from __future__ import annotations

import asyncio
import getpass
import json
import sys
from collections.abc import Awaitable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from bot.logs import configure_logging
from bot.plugins import describe, make_manager
from bot.settings import Settings

T = TypeVar("T")

cli = typer.Typer(no_args_is_help=True, help="oogiri: a bot that tells jokes about pictures.")
dev = typer.Typer(no_args_is_help=True, help="Developer tools.")
config_cli = typer.Typer(no_args_is_help=True, help="Inspect settings.")
db_cli = typer.Typer(no_args_is_help=True, help="Database maintenance.")
cli.add_typer(dev, name="dev")
cli.add_typer(config_cli, name="config")
cli.add_typer(db_cli, name="db")

console = Console(stderr=True)


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


def one_line(text: str) -> str:
    """One joke per line, so scripts can pair lines with images (--json keeps exact text)."""
    return " ".join(text.splitlines())


def spinner() -> Progress:
    return Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console
    )


@cli.command()
def serve(
    channels: Annotated[
        str | None, typer.Option(help="comma-separated channels (default: settings.channels)")
    ] = None,
) -> None:
    """Run the bot: every enabled channel, on the configured engine and store."""
    from bot.app import App

    overrides: dict[str, Any] = {}
    if channels:
        overrides["channels"] = channels
    settings = Settings(**overrides)
    configure_logging(settings)

    async def main() -> None:
        with spinner() as progress:
            progress.add_task(f"loading engine {settings.engine.name!r} …", total=None)
            app = await App.create(settings)
        try:
            await app.serve_forever()
        finally:
            await app.close()

    run(main())


@cli.command()
def joke(
    images: Annotated[list[Path], typer.Argument(help="image files", exists=True, dir_okay=False)],
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
    hint: Annotated[str | None, typer.Option(help="a nudge for the joke")] = None,
) -> None:
    """Tell one joke per image (the CLI channel)."""
    from bot.app import App
    from bot.models import JokeRequest, OogiriError

    # The operator at the terminal is not a flood: no per-user limit for this channel.
    settings = Settings()
    settings.limits.per_user_per_minute = 0
    configure_logging(settings)
    failures = 0

    async def main() -> None:
        nonlocal failures
        with spinner() as progress:
            progress.add_task(f"loading engine {settings.engine.name!r} …", total=None)
            app = await App.create(settings)
        user = f"cli:{getpass.getuser()}"
        try:
            with Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                console=console,
                transient=True,
            ) as progress:
                task = progress.add_task("jokes", total=len(images))
                for path in images:
                    request = JokeRequest(
                        image_bytes=path.read_bytes(),
                        channel="cli",
                        user_id=user,
                        filename=path.name,
                        hint=hint,
                        language=settings.language,
                    )
                    try:
                        result = await app.service.tell(request)
                    except OogiriError as exc:
                        failures += 1
                        out: dict[str, Any] = {
                            "image": str(path),
                            "error": exc.key,
                            "message": exc.user_message(settings.language),
                        }
                        if as_json:
                            print(json.dumps(out, ensure_ascii=False), flush=True)
                        else:
                            console.print(f"[red]{path}[/red]: {out['message']}")
                    else:
                        if as_json:
                            print(
                                json.dumps(
                                    {
                                        "image": str(path),
                                        "joke_id": result.id,
                                        "text": result.text,
                                        "model_version": result.model_version,
                                        "engine": result.engine,
                                        "latency_ms": result.latency_ms,
                                    },
                                    ensure_ascii=False,
                                ),
                                flush=True,
                            )
                        else:
                            print(
                                f"{path}: {one_line(result.text)}  "
                                f"[model {result.model_version}, joke #{result.id}]",
                                flush=True,
                            )
                    progress.advance(task)
        finally:
            await app.close()

    run(main())
    if failures:
        raise typer.Exit(code=1)


@cli.command("plugins")
def plugins_cmd() -> None:
    """List loaded plugins and the hooks each implements."""
    settings = Settings()
    table = Table("plugin", "module", "hooks")
    for info in describe(make_manager(settings.plugins)):
        table.add_row(info.name, info.module, ", ".join(info.hooks))
    Console().print(table)


@config_cli.command("show")
def config_show() -> None:
    """Print the effective settings as JSON, secrets masked."""
    print(json.dumps(Settings().masked(), indent=2, ensure_ascii=False))


@db_cli.command("upgrade")
def db_upgrade(revision: str = "heads") -> None:
    """Create or migrate the database schema."""
    from bot.store import Store

    settings = Settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)

    async def main() -> None:
        store = Store(settings.database_url, settings.images_dir)
        try:
            await store.upgrade(revision)
        finally:
            await store.close()

    run(main())
    console.print(f"database at revision {revision}")


@dev.command("make-tiny-model")
def make_tiny_model_cmd(
    out_dir: Path,
    layout: Annotated[
        str, typer.Option(help="hf (transformers-native) or internvl2 (XTuner/LMDeploy layout)")
    ] = "hf",
    size: Annotated[
        str, typer.Option(help="tiny, or full (InternVL2-2B shapes; internvl2)")
    ] = "tiny",
    device: Annotated[str, typer.Option(help="where to build the weights (cuda for full)")] = "cpu",
    seed: int = 0,
    tokenizer: Annotated[
        str, typer.Option(help="fast, or sentencepiece (a real download's files; internvl2)")
    ] = "fast",
) -> None:
    """Build a randomly initialised InternVL model (no downloads; tiny in seconds)."""
    from bot.tinymodel import make_tiny_model

    try:
        with spinner() as progress:
            progress.add_task(f"building {size} {layout} model …", total=None)
            path = make_tiny_model(
                out_dir, seed=seed, layout=layout, size=size, device=device, tokenizer=tokenizer
            )
    except (ValueError, RuntimeError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(code=2) from None
    console.print(f"model written to {path}")


@dev.command("convert-internvl2")
def convert_internvl2_cmd(
    src: Annotated[
        Path,
        typer.Argument(help="InternVL2 folder (InternVLChatModel)", exists=True, file_okay=False),
    ],
    dst: Annotated[Path, typer.Argument(help="where to write the converted folder")],
    force: Annotated[bool, typer.Option(help="replace DST if it exists")] = False,
    chat_template: Annotated[
        Path | None,
        typer.Option(help="LMDeploy-style JSON template (default: the bot's InternVL2 template)"),
    ] = None,
    shard_mb: Annotated[
        int, typer.Option(help="output shard size (memory use ≈ one shard)")
    ] = 1024,
) -> None:
    """Convert an InternVL2 folder (e.g. InternVL2-2B) to transformers' native InternVL layout.

    transformers 5 cannot run InternVL2's remote code; the converted folder runs on the
    transformers engine (OOGIRI_ENGINE__MODEL=DST) without it.
    """
    from rich.progress import DownloadColumn, TimeRemainingColumn

    from bot.convert_internvl2 import ConversionError, convert_internvl2

    try:
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        ) as progress:
            task = progress.add_task("reading", total=None)

            def advance(done: int, total: int, what: str) -> None:
                name = what if len(what) <= 40 else "…" + what[-39:]
                progress.update(task, completed=done, total=total, description=name)

            path = convert_internvl2(
                src,
                dst,
                chat_template=chat_template,
                shard_bytes=max(1, shard_mb) << 20,
                progress=advance,
                overwrite=force,
            )
            progress.update(task, description="done")
    except ConversionError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(code=2) from None
    console.print(f"converted {src} → {path}; run it with OOGIRI_ENGINE__MODEL={path}")


def build_cli() -> typer.Typer:
    try:
        pm = make_manager(Settings().plugins)
    except Exception as exc:  # bad settings still deserve a readable message
        console.print(f"[red]settings error:[/red] {exc}")
        raise SystemExit(2) from exc
    pm.hook.oogiri_register_commands(cli=cli)
    return cli


def main() -> None:
    build_cli()(prog_name="oogiri")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
