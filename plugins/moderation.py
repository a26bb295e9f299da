"""The moderation plugin: block list / allow-list checks before any download, and
``oogiri moderation …`` on the command line.

The storage and the rules live in the core (``bot/moderation.py``); this plugin only wires them
in through hooks, like any third-party plugin would: at startup it registers a per-app guard whose
``oogiri_admit`` refuses blocked (or, in allow-list mode, unlisted) senders, chats and servers.
Channels answer such a refusal with silence.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from bot.hookspecs import hookimpl
from bot.moderation import STATE_KEY, Moderation, moderation_for
from bot.moderation_settings import SUBJECT_HELP

if TYPE_CHECKING:
    from bot.app import App
    from bot.models import JokeRequest


class _Guard:
    """One app's admission check (registered on that app's plugin manager)."""

    def __init__(self, moderation: Moderation) -> None:
        self.moderation = moderation

    @hookimpl
    async def oogiri_admit(self, request: JokeRequest) -> None:
        await self.moderation.check(request)


@hookimpl
def oogiri_startup(app: App) -> None:
    moderation = moderation_for(app)
    guard = _Guard(moderation)
    app.pm.register(guard, name=f"moderation-guard-{id(app)}")
    app.state[f"{STATE_KEY}.guard"] = guard


@hookimpl
def oogiri_shutdown(app: App) -> None:
    guard = app.state.pop(f"{STATE_KEY}.guard", None)
    if guard is not None and app.pm.is_registered(guard):
        app.pm.unregister(guard)


@hookimpl
def oogiri_register_commands(cli: Any) -> None:
    import typer

    group = typer.Typer(
        help="Moderation: block list, allow list, removed jokes (shared by every replica).",
        no_args_is_help=True,
    )

    def _run(work: Any) -> Any:
        from bot.settings import Settings
        from bot.store import Store

        settings = Settings()

        async def main() -> Any:
            store = Store(settings.database_url, settings.images_dir)
            try:
                await store.upgrade()
                return await work(Moderation(store, settings.moderation))
            finally:
                await store.close()

        try:
            return asyncio.run(main())
        except ValueError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

    subject_arg = typer.Argument(..., help=SUBJECT_HELP)

    @group.command("list")
    def list_cmd() -> None:
        """Show the block and allow lists (database and settings) and the mode."""

        async def work(m: Moderation) -> None:
            typer.echo(f"mode: {m.settings.mode}")
            entries = await m.entries()
            if not entries:
                typer.echo("(no entries)")
            for e in entries:
                when = e.created_at.isoformat(timespec="seconds") if e.created_at else ""
                extra = " ".join(x for x in (e.created_by or "", when, e.note or "") if x)
                typer.echo(f"{e.list:5}  {e.subject}  [{e.source}] {extra}".rstrip())

        _run(work)

    @group.command("block")
    def block_cmd(
        subject: str = subject_arg, note: str = typer.Option(None, help="why (kept with it)")
    ) -> None:
        """Refuse a user, chat or server everywhere (jokes, and their votes in exports)."""

        async def work(m: Moderation) -> None:
            added = await m.block(subject, by="cli", note=note)
            typer.echo(f"blocked {subject}" if added else f"{subject} was already blocked")

        _run(work)

    @group.command("unblock")
    def unblock_cmd(subject: str = subject_arg) -> None:
        """Take a subject off the database block list."""

        async def work(m: Moderation) -> None:
            removed = await m.unblock(subject)
            typer.echo(f"unblocked {subject}" if removed else f"{subject} was not blocked")

        _run(work)

    @group.command("allow")
    def allow_cmd(
        subject: str = subject_arg, note: str = typer.Option(None, help="why (kept with it)")
    ) -> None:
        """Add to the allow list (used when moderation.mode is 'allowlist')."""

        async def work(m: Moderation) -> None:
            added = await m.add("allow", subject, by="cli", note=note)
            typer.echo(f"allowed {subject}" if added else f"{subject} was already allowed")

        _run(work)

    @group.command("disallow")
    def disallow_cmd(subject: str = subject_arg) -> None:
        """Take a subject off the database allow list."""

        async def work(m: Moderation) -> None:
            removed = await m.remove("allow", subject)
            typer.echo(f"disallowed {subject}" if removed else f"{subject} was not allowed")

        _run(work)

    @group.command("delete-joke")
    def delete_joke_cmd(
        joke_id: int = typer.Argument(..., help="the joke's id (shown in the web stats page)"),
        reason: str = typer.Option(None, help="why (kept with it)"),
    ) -> None:
        """Keep a joke out of every later training export (and never deliver it again)."""
        from bot.models import NotFound

        async def work(m: Moderation) -> None:
            try:
                removed = await m.remove_joke(joke_id, by="cli", reason=reason)
            except NotFound:
                typer.echo(f"error: no joke {joke_id}", err=True)
                raise typer.Exit(1) from None
            typer.echo(f"joke {joke_id} removed" if removed else f"joke {joke_id} already removed")

        _run(work)

    cli.add_typer(group, name="moderation")
