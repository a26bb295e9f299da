"""``oogiri dev make-tiny-model`` and ``oogiri dev convert-internvl2``.

Added to the ``dev`` group of the ``oogiri`` command by the transformers engine plugin
(``oogiri_register_commands``), like any plugin's commands; the core's CLI knows nothing of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from bot.cli import no_progress_bars, spinner  # the core's: shown only on a terminal

console = Console(stderr=True)
dev = typer.Typer(no_args_is_help=True, help="Developer tools.")


def register(cli: Any) -> None:
    """Add the commands to ``cli``'s ``dev`` group (made here if no plugin made it yet)."""
    for group in cli.registered_groups:
        if group.name == "dev" and group.typer_instance is not None:
            group.typer_instance.registered_commands.extend(dev.registered_commands)
            return
    cli.add_typer(dev, name="dev")


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
    from bot.engines.internvl.tinymodel import make_tiny_model

    no_progress_bars()  # the spinner says what happens; transformers' bars would split it
    try:
        with spinner() as progress:
            progress.add_task(f"building {size} {layout} model …", total=None)
            path = make_tiny_model(
                out_dir, seed=seed, layout=layout, size=size, device=device, tokenizer=tokenizer
            )
    except (ValueError, RuntimeError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(code=2) from None
    console.print(f"model written to {path}", soft_wrap=True)  # a path, whole


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

    from bot.engines.internvl.convert_internvl2 import ConversionError, convert_internvl2

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
