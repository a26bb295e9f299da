"""The ``oogiri`` command line. Plugins add commands through ``oogiri_register_commands``."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from bot.logs import RedactingFilter, configure_logging, secret_values
from bot.plugins import describe, make_manager
from bot.settings import Settings, UnknownSettingsError, settings_error_message

T = TypeVar("T")
log = logging.getLogger(__name__)


def _tidy_help() -> None:
    """Typer 0.2x writes a type after every parameter (`--json <bool>`, `<list[Path]>`) and
    required arguments as `{images}...`; show the usual forms instead: flags bare, values as
    TEXT/INTEGER/PATH, arguments as `IMAGES...` or `[MODEL_DIR]` (tests/test_cli.py checks)."""
    from typer import core as tcore

    option, argument = tcore.TyperOption, tcore.TyperArgument
    if not hasattr(option, "display_type_rich") or not hasattr(argument, "_usage_display_name"):
        return  # another Typer: its own help is left as it is

    typer_type = option.display_type_rich
    names = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "Path": "PATH", "path": "PATH"}

    def option_type(self: Any, ctx: Any) -> str | None:
        if self.metavar is not None:
            return str(self.metavar)
        if getattr(self, "is_flag", False) or getattr(self, "count", False):
            return None
        label = typer_type(self, ctx)
        if not label or not label.startswith("<"):
            return label
        bare = label.split(">", 1)[0].strip("<")
        if "|" in bare:  # choices
            return f"[{bare}]"
        return names.get(bare, bare.upper())

    def argument_name(self: Any) -> str:
        return str(self.metavar or (self.name or "").upper())

    def argument_usage(self: Any) -> str:
        name = argument_name(self) + ("..." if self.nargs != 1 else "")
        return name if self.required else f"[{name}]"

    option.display_type_rich = option_type  # type: ignore[method-assign]
    argument.display_type_rich = lambda self, ctx: None  # type: ignore[method-assign]
    argument.display_name_raw = property(argument_name)  # type: ignore[assignment]
    argument._usage_display_name = argument_usage  # type: ignore[method-assign]


_tidy_help()

cli = typer.Typer(no_args_is_help=True, help="oogiri: a bot that tells jokes about pictures.")
dev = typer.Typer(no_args_is_help=True, help="Developer tools.")
config_cli = typer.Typer(no_args_is_help=True, help="Inspect settings.")
db_cli = typer.Typer(no_args_is_help=True, help="Database maintenance.")
cli.add_typer(dev, name="dev")
cli.add_typer(config_cli, name="config")
cli.add_typer(db_cli, name="db")

console = Console(stderr=True)


def settings_error(exc: BaseException) -> None:
    """Say which setting is wrong (its OOGIRI_ variable) on stderr, without a traceback."""
    console.print(  # one line in a log, however long
        f"[red]settings error:[/red] {escape(settings_error_message(exc))}", soft_wrap=True
    )


def load_settings(**overrides: Any) -> Settings:
    """``Settings(**overrides)``, or exit 2 with a message naming each invalid variable."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    try:
        return Settings(**overrides)
    except (ValidationError, SettingsError, UnknownSettingsError) as exc:
        settings_error(exc)
        raise typer.Exit(code=2) from None


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


def quiet_logs(settings: Settings, verbose: int) -> None:
    """Warnings only unless -v (-vv: debug) or OOGIRI_LOG_LEVEL asks for more; a one-off command
    has no use for alembic's and the store's start-up INFO lines."""
    configure_logging(settings)
    if verbose:
        level = "DEBUG" if verbose > 1 else "INFO"
    elif "log_level" in settings.model_fields_set:
        level = settings.log_level.upper()
    else:
        level = "WARNING"
    logging.getLogger().setLevel(level)
    if not verbose:
        no_progress_bars()
    if level != "DEBUG":
        logging.getLogger("alembic").setLevel(max(logging.getLevelName(level), logging.WARNING))


def no_progress_bars() -> None:
    """No tqdm bars from transformers and the hub ("Loading weights 0%|…"): both read this
    variable when they are first imported, which the CLI does only after its options are read."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def spinner(transient: bool = False) -> Progress:
    """A spinner for a person at a terminal; nothing in a log file (the log says what happens)."""
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        transient=transient,
        disable=not console.is_terminal,
    )


@cli.command()
def serve(
    channels: Annotated[
        str | None, typer.Option(help="comma-separated channels (default: settings.channels)")
    ] = None,
    strict: Annotated[
        bool, typer.Option("--strict", help="refuse to start on an unknown OOGIRI_ setting")
    ] = False,
) -> None:
    """Run the bot: every enabled channel, on the configured engine and store."""
    from bot.app import App

    overrides: dict[str, Any] = {}
    if channels:
        overrides["channels"] = channels
    settings = load_settings(**overrides)
    configure_logging(settings)
    check_unknown_settings(settings, strict)
    logging.getLogger("alembic").setLevel(logging.WARNING)  # 7 lines of "context impl" noise

    from bot.plugins import collect

    pm = make_manager(settings.plugins)
    known = collect(pm, "oogiri_register_channels", "channel", settings).names()
    unknown = [name for name in settings.channels if name not in known]
    if unknown:  # before the engine loads (minutes for a large model), not after
        names, installed = ", ".join(map(repr, unknown)), ", ".join(known)
        console.print(
            f"[red]error:[/red] no channel named {escape(names)} (installed: {installed})"
        )
        raise typer.Exit(code=1)

    async def main() -> None:
        from bot.cli_joke import write_serve_marker

        started = time.perf_counter()
        log.info("loading engine %r …", settings.engine.name)  # minutes for a large model
        with spinner() as progress:
            progress.add_task(f"loading engine {settings.engine.name!r} …", total=None)
            app = await App.create(settings, pm=pm)
        log.info("engine %r loaded in %.1f s", app.engine.name, time.perf_counter() - started)
        marker = write_serve_marker(settings)  # `oogiri joke` finds this serve without probing
        try:
            await app.serve_forever()
        finally:
            if marker is not None:
                marker.unlink(missing_ok=True)
            await app.close()

    try:
        run(main())
    except Exception as exc:  # a channel that cannot start: its reason, through the redacting log
        log.error("oogiri serve stopped: %s", exc)
        log.debug("what stopped oogiri serve", exc_info=True)
        raise typer.Exit(code=1) from None


#: `oogiri joke --help`. Typer 0.29 keeps a docstring's line breaks inside a paragraph, so each
#: paragraph is one line here and the terminal wraps it.
JOKE_HELP = (
    "Tell one joke per image (the CLI channel).\n\n"
    "Images are checked first; a running `oogiri serve` (its web address from the settings, or "
    "--server) answers without loading a model here; otherwise the model is loaded once.\n\n"
    "Like `cat a b`: an image that is missing, unreadable or not a picture gets one line on "
    "stderr (FILE: why) and the other images are still answered; with --json its stdout line "
    'is {"image", "error", "message"}.\n\n'
    "Exit status: 0 every image answered, 1 any image failed, 2 bad usage, 3 no serve answers "
    "at --server or the engine cannot be loaded."
)


class _EngineUnavailable(Exception):
    """`oogiri joke` could not load the engine here: the --local twin of ``ServerDown``."""


@cli.command(no_args_is_help=True, help=JOKE_HELP)
def joke(
    images: Annotated[
        list[Path],
        # No existence/readability checks here: click would refuse the whole batch for one
        # missing file. ``cli_joke.validate`` reports each bad file and the others go on.
        typer.Argument(
            help="image files; one that is missing, unreadable or not a picture is reported on "
            "stderr and the others still get their jokes",
            readable=False,
            show_default=False,
        ),
    ],
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="one JSON object per image on stdout, in argument order; a failed image's has "
            "image, error and message",
        ),
    ] = False,
    hint: Annotated[str | None, typer.Option(help="a nudge for the joke")] = None,
    server: Annotated[
        str | None,
        typer.Option(help="ask the oogiri serve at this URL (default: the local one, if running)"),
    ] = None,
    local: Annotated[
        bool, typer.Option("--local", help="load the model here even if a serve is running")
    ] = False,
    verbose: Annotated[
        int,
        typer.Option(
            "--verbose", "-v", count=True, show_default=False, help="more log lines (-vv: debug)"
        ),
    ] = 0,
) -> None:
    """Tell one joke per image (the CLI channel); the help text is ``JOKE_HELP``."""
    from contextlib import contextmanager

    from bot import cli_joke as cj

    if server and local:
        console.print("[red]error:[/red] --server and --local exclude each other")
        raise typer.Exit(code=2)
    # The core's settings (no plugin imported) serve the checks and a running serve; the full
    # settings are built only to find a serve at the web address or to load the model here.
    core = cj.core_settings()
    settings = core or load_settings()
    quiet_logs(settings, verbose)

    def full_settings() -> Settings:
        if settings is not core:
            return settings
        complete = load_settings()
        quiet_logs(complete, verbose)  # every plugin's secrets redacted too
        return complete

    lang = cj.cli_language(settings)
    checked = cj.validate(images, settings, lang)
    refused = [item.failure for item in checked if item.failure is not None]
    # Each bad file is said on stderr now, before a serve is asked or a model loads (a typo
    # should not cost a minute of loading); its --json line still comes in argument order.
    for failure in refused:
        cj.stderr(cj.render(failure, lang, as_json=False))
    failures = len(refused)
    demo = False

    def emit(outcome: cj.Outcome) -> None:
        """Print one image's outcome: a joke on stdout; a failure on stderr, and with --json
        also as its stdout line, so every argument has exactly one line there."""
        nonlocal failures, demo
        if outcome.joke is None:
            if not any(outcome is failure for failure in refused):  # not already said
                failures += 1
                cj.stderr(cj.render(outcome, lang, as_json=False))
            if not as_json:
                return
        else:
            demo = demo or bool(outcome.joke["demo"])
        print(cj.render(outcome, lang, as_json), flush=True)

    if len(refused) == len(checked):
        for failure in refused:  # nothing to ask a model about: load nothing
            emit(failure)
        raise typer.Exit(code=1)

    url = server
    if url is None and not local:
        url = cj.marked_server(settings.data_dir)
        if url is None or not cj.serve_answers(url):
            settings = full_settings()  # the web address is a plugin's setting
            url = cj.local_server_url(settings)
            if not cj.serve_answers(url):
                url = None
    if url is not None:
        cookies = settings.data_dir / cj.COOKIE_FILE
        remote = cj.RemoteJokes(url, lang, on_wait=cj.stderr, cookie_file=cookies)
        try:
            remote.connect()
        except cj.ServerDown as exc:
            cj.stderr(cj.text("server_down", lang, url=url, error=exc))
            raise typer.Exit(code=3) from None
        if not as_json:
            cj.stderr(cj.text("using_server", lang, url=remote.url))
        try:
            for item in checked:
                emit(item.failure or remote.tell(item, hint))
        finally:
            remote.close()
    else:
        settings = full_settings()
        # The operator at the terminal is not a flood: no per-user limit for this channel.
        settings.limits.per_user_per_minute = 0

        @contextmanager
        def loading(description: str) -> Iterator[None]:
            # spinner() shows only on a terminal: piped, rich would leave an empty line among
            # the FILE: why lines on stderr.
            with spinner(transient=True) as progress:
                progress.add_task(description, total=None)
                try:
                    yield
                except Exception as exc:  # only the engine's start-up runs in here
                    raise _EngineUnavailable(str(exc) or type(exc).__name__) from exc

        try:
            run(cj.local_jokes(settings, checked, hint, lang, emit, loading))
        except _EngineUnavailable as exc:  # as a serve that is down: one line, exit 3
            log.debug("what stopped the engine", exc_info=exc.__cause__)
            reason = RedactingFilter(secret_values(settings)).redact(str(exc))  # e.g. API keys
            cj.stderr(f"error: cannot load the {settings.engine.name!r} engine: {reason}")
            raise typer.Exit(code=3) from None
    if demo:
        cj.stderr(cj.text("demo", lang))
    if failures:
        raise typer.Exit(code=1)


@cli.command("plugins")
def plugins_cmd() -> None:
    """List loaded plugins and the hooks each implements."""
    import shutil
    import textwrap

    settings = load_settings()
    # Names are never cut or split: each plugin on a line, its hooks wrapped below at commas
    # (any terminal width; 80 columns when piped).
    width = max(40, shutil.get_terminal_size((80, 24)).columns)
    for info in describe(make_manager(settings.plugins)):
        print(f"{info.name}  ({info.module})")
        hooks = ", ".join(info.hooks) or "-"
        indent = " " * 4
        print(
            textwrap.fill(
                hooks,
                width=width,
                initial_indent=indent,
                subsequent_indent=indent,
                break_long_words=False,
                break_on_hyphens=False,
            )
        )


@config_cli.command("show")
def config_show(
    strict: Annotated[
        bool, typer.Option("--strict", help="exit 2 on an unknown OOGIRI_ setting")
    ] = False,
) -> None:
    """Print the effective settings as JSON, secrets masked; unknown keys warned on stderr."""
    settings = load_settings()
    if strict:  # refused before anything is printed, as OOGIRI_STRICT refuses
        check_unknown_settings(settings, strict)
    print(json.dumps(settings.masked(), indent=2, ensure_ascii=False))
    check_unknown_settings(settings, strict=False)  # after the JSON, where they are seen


def check_unknown_settings(settings: Settings, strict: bool) -> None:
    """Unknown OOGIRI_ keys (typos, settings of plugins not installed): warn (never the value),
    or exit 2 with the message strict mode gives (``OOGIRI_STRICT`` refuses in ``Settings()``)."""
    keys = settings.unknown_keys()
    if strict and keys:
        settings_error(UnknownSettingsError(keys))
        raise typer.Exit(code=2)
    for key in keys:
        console.print(f"[yellow]warning:[/yellow] unknown setting {key}: nothing reads it")


@db_cli.command("upgrade")
def db_upgrade(revision: str = "heads") -> None:
    """Create or migrate the database schema."""
    from bot.store import Store

    settings = load_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)

    async def main() -> None:
        store = Store(settings.database_url, settings.images_dir)
        try:
            await store.upgrade(revision)
        finally:
            await store.close()

    run(main())
    console.print(f"database at revision {revision}")


def build_cli() -> typer.Typer:
    try:
        pm = make_manager(Settings().plugins)
    except Exception as exc:  # bad settings still deserve a readable message
        settings_error(exc)
        raise SystemExit(2) from exc
    pm.hook.oogiri_register_commands(cli=cli)
    return cli


#: Core commands that need no plugin's commands: they skip loading every plugin at start-up
#: (Telegram, Discord, FastAPI … ≈ 0.7 s), which is most of `oogiri joke`'s time against a serve.
NO_PLUGIN_COMMANDS = frozenset({"joke"})


def main() -> None:
    if not console.is_terminal:  # a pipe or a service's log: no tqdm bars in it, any command
        no_progress_bars()
    args = sys.argv[1:]
    if args and args[0] in NO_PLUGIN_COMMANDS:
        cli(prog_name="oogiri")
    else:
        build_cli()(prog_name="oogiri")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
