"""The live A/B plugin (entry point ``ab``): routing in serve, decisions, operator surface.

- ``oogiri_before_joke``: tells the A/B router who is asking (sticky arms; bot/ab.py);
- ``oogiri_startup``: starts :class:`bot.ab_serving.AbServing` (serve the small arm while the
  store says a test runs) and, with ``ab.decide_in_serve``, the decision loop (every
  ``ab.check_minutes``, under the training lock, so replicas never act twice);
- ``oogiri_register_commands``: ``oogiri models ab status|start|stop``;
- ``oogiri_web_routes``: ``GET /api/ab`` (the tests, their arms and decisions, and each version's
  like-rate over time with intervals) for the web stats page.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any

import typer

from bot.ab import ROUTING_KEY
from bot.hookspecs import hookimpl

if TYPE_CHECKING:
    from bot.app import App
    from bot.models import JokeRequest
    from bot.settings import Settings

log = logging.getLogger(__name__)

ab_cli = typer.Typer(no_args_is_help=True, help="Live A/B tests of model versions.")


# --------------------------------------------------------------------------- hooks


@hookimpl
def oogiri_before_joke(request: JokeRequest) -> None:
    # the engine protocol carries no user: the A/B router reads this (same task, same context)
    ROUTING_KEY.set(f"{request.channel}:{request.user_id}")


@hookimpl
def oogiri_startup(app: App) -> Awaitable[None]:
    async def start() -> None:
        from bot.ab_serving import AbServing

        serving = AbServing(app)
        app.state["ab_serving"] = serving

        async def sync(_request: dict[str, Any]) -> dict[str, Any]:
            return await serving.reconcile()

        app.state.setdefault("control_ops", {})["ab_sync"] = sync

        async def stats_section(lang: str) -> str:
            from training.ab_web import render_section

            return render_section(await api_doc(app.store), lang)

        # the web stats page shows what plugins put here (plugins/web/pages.py)
        app.state.setdefault("stats_sections", []).append(stats_section)
        serving.start()
        if app.settings.ab.decide_in_serve:
            app.state["ab_decider"] = asyncio.create_task(decider_loop(app), name="ab-decider")

    return start()


@hookimpl
def oogiri_shutdown(app: App) -> Awaitable[None]:
    async def stop() -> None:
        task = app.state.pop("ab_decider", None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        serving = app.state.pop("ab_serving", None)
        if serving is not None:
            await serving.stop()

    return stop()


@hookimpl
def oogiri_register_commands(cli: Any) -> None:
    from training.cli import models_cli

    if not any(group.typer_instance is ab_cli for group in models_cli.registered_groups):
        models_cli.add_typer(ab_cli, name="ab")


@hookimpl
def oogiri_web_routes(router: Any, app: App) -> None:
    from fastapi.responses import JSONResponse

    @router.get("/api/ab")
    async def ab_api() -> Any:
        web = getattr(app.settings, "web", None)
        if web is not None and not getattr(web, "public_stats", True):
            return JSONResponse({"error": "not_found"}, status_code=404)  # as /api/stats
        return JSONResponse(await api_doc(app.store), headers={"Cache-Control": "no-store"})


# --------------------------------------------------------------------------- deciding


async def decide_once(app: App) -> list[Any]:
    """One decision tick inside ``oogiri serve`` (skipped while a training run holds the lock)."""
    from training.ab import decide_tests
    from training.cli import app_promoter
    from training.lock import LockBusy, training_lock
    from training.run import work_dir_of

    if await app.store.running_ab_test() is None:
        # nothing to decide: never take the training lock for nothing (a run started now by
        # cron would find it taken and give up)
        return []
    serving = app.state.get("ab_serving")

    async def on_ended(_test: Any) -> None:
        if serving is not None:
            await serving.reconcile()

    try:
        async with training_lock(app.store, work_dir_of(app.settings)):
            return await decide_tests(
                app.store, app.settings, app.pm, app_promoter(app), on_ended=on_ended
            )
    except LockBusy:
        log.debug("A/B decision: a training run holds the lock; next time")
        return []


async def decider_loop(app: App) -> None:
    while True:
        await asyncio.sleep(app.settings.ab.check_minutes * 60)
        try:
            for outcome in await decide_once(app):
                level = logging.DEBUG if outcome.outcome == "wait" else logging.INFO
                log.log(level, "A/B test #%d: %s (%s)", outcome.test_id, outcome.outcome,
                        outcome.reason)  # fmt: skip
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("A/B decision failed")


def notify_serve(settings: Settings) -> Any:
    """``on_ended`` for processes other than ``oogiri serve``: ask a local managed ``oogiri
    serve`` to stop serving the ended test now (it would notice within ab.poll_s anyway)."""

    async def on_ended(_test: Any) -> None:
        from bot.engines.lmdeploy_server import (
            ControlUnavailable,
            control_request,
            server_settings,
            socket_path,
        )

        path = socket_path(settings)
        if not path.exists():
            return
        try:
            await asyncio.to_thread(
                control_request,
                path,
                {"op": "ab_sync"},
                None,
                server_settings(settings).drain_timeout_s,
            )
        except (ControlUnavailable, OSError, ValueError) as exc:
            log.info("A/B: could not reach oogiri serve at %s (%s); it will notice", path, exc)

    return on_ended


# --------------------------------------------------------------------------- JSON for the web


async def api_doc(store: Any, days: int = 30) -> dict[str, Any]:
    """Tests with arms and decisions, and per-version like-rate series with 95 % intervals."""
    from bot.abstats import interval
    from training.ab import status_docs

    tests = await status_docs(store, limit=5)
    since = datetime.now(UTC) - timedelta(days=days)
    series: dict[str, list[dict[str, Any]]] = {}
    for version, bucket, likes, votes in await store.like_rate_series(since=since, bucket="day"):
        low, high = interval(likes, votes) if votes else (0.0, 1.0)
        series.setdefault(version, []).append(
            {
                "day": bucket,
                "likes": likes,
                "votes": votes,
                "rate": likes / votes if votes else None,
                "low": low,
                "high": high,
            }
        )
    running = next((t for t in tests if t["status"] == "running"), None)
    return {"running": running, "tests": tests, "series": series}


# --------------------------------------------------------------------------- CLI


def _print_test(doc: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Console()
    d = doc["decision"]
    roles = ("active", "candidate") if doc["kind"] == "ab" else ("new (promoted)", "previous")
    elapsed_h = doc["elapsed_s"] / 3600
    out.print(
        f"[bold]test #{doc['id']}[/bold] ({doc['kind']}) {doc['status']}, "
        f"{doc['share']:.0%} of users on the small arm, {elapsed_h:.1f} h",
        highlight=False,
    )
    table = Table("arm", "version", "votes", "likes", "like-rate", "95 % interval", "voters",
                  "raw votes", "jokes", "failed answers")  # fmt: skip
    for arm, role, rate_key, int_key in (
        ("control", roles[0], "control_rate", "control_interval"),
        ("candidate", roles[1], "candidate_rate", "candidate_interval"),
    ):
        a = doc["arms"][arm]
        rate = d.get(rate_key)
        f = (doc.get("failures") or {}).get(arm)  # tests decided before failures were counted
        failed = f"{f['failed']}/{f['requests']}" if f else "-"
        ci = d.get(int_key)
        table.add_row(
            role,
            a["version"],
            str(a["votes"]),
            str(a["likes"]),
            f"{rate:.1%}" if rate is not None else "-",
            f"{ci[0]:.1%} – {ci[1]:.1%}" if ci else "-",
            str(a["voters"]),
            str(a["raw_votes"]),
            str(a["jokes"]),
            failed,
        )
    out.print(table)
    out.print(f"decision: [bold]{d['outcome']}[/bold] — {d['reason']}", highlight=False)
    if doc.get("reason") and doc["status"] != "running":
        out.print(f"ended: {doc['reason']}", highlight=False)


@ab_cli.command("status")
def ab_status(
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable")] = False,
    decide: Annotated[
        bool, typer.Option("--decide", help="also act on the decision (promote/reject/roll back)")
    ] = False,
    limit: Annotated[int, typer.Option(help="tests shown, newest first")] = 1,
) -> None:
    """Arms, votes, like-rates with 95 % intervals, the rule's decision and why."""
    from training.ab import decide_tests, status_docs
    from training.cli import _promoter, console, load_settings, open_store, plugin_manager
    from training.lock import LockBusy, training_lock
    from training.run import work_dir_of

    settings = load_settings()

    async def main() -> tuple[list[Any], list[dict[str, Any]]]:
        async with open_store(settings) as store:
            outcomes: list[Any] = []
            if decide:
                async with training_lock(store, work_dir_of(settings)):
                    outcomes = await decide_tests(
                        store,
                        settings,
                        plugin_manager(settings),
                        _promoter(settings),
                        on_ended=notify_serve(settings),
                    )
            return outcomes, await status_docs(store, limit=max(1, limit))

    try:
        outcomes, docs = asyncio.run(main())
    except LockBusy as exc:
        console.print(f"[yellow]{exc}[/yellow]", highlight=False)
        raise typer.Exit(75) from exc
    if as_json:
        print(json.dumps({"acted": [o.__dict__ for o in outcomes], "tests": docs}, indent=2,
                         ensure_ascii=False, default=str))  # fmt: skip
        return
    for o in outcomes:
        console.print(f"acted: test #{o.test_id} {o.outcome}: {o.reason}", highlight=False)
    if not docs:
        console.print("no A/B test yet", highlight=False)
    for doc in docs:
        _print_test(doc)


@ab_cli.command("start")
def ab_start(
    version: Annotated[str, typer.Argument(help="a registered candidate version")],
    share: Annotated[float | None, typer.Option(help="default: ab.share")] = None,
) -> None:
    """Test VERSION live against the active model (e.g. a candidate registered earlier)."""
    from bot.store import AbTestBusy
    from training.ab import start_test
    from training.cli import EXIT_FAILED, console, load_settings, open_store
    from training.lock import LockBusy, training_lock
    from training.run import ensure_registry, work_dir_of

    settings = load_settings()

    async def main() -> Any:
        async with open_store(settings) as store:
            async with training_lock(store, work_dir_of(settings)):
                active = await ensure_registry(store, settings)
                if active is None:
                    raise LookupError("no active model to compare with")
                return await start_test(store, settings, version, active.version, share=share)

    try:
        test = asyncio.run(main())
    except (LookupError, ValueError, AbTestBusy, LockBusy, RuntimeError) as exc:
        console.print(f"[red]{exc}[/red]", highlight=False)
        raise typer.Exit(EXIT_FAILED) from exc
    console.print(
        f"A/B test #{test.id}: {test.candidate} vs {test.control} on {test.share:.0%} of users",
        highlight=False,
    )


@ab_cli.command("stop")
def ab_stop(
    promote: Annotated[bool, typer.Option("--promote", help="promote the candidate now")] = False,
    reject: Annotated[bool, typer.Option("--reject", help="reject (a watch: roll back)")] = False,
) -> None:
    """End the running test: keep the active model (default), --promote or --reject."""
    from training.ab import stop_test
    from training.cli import (
        EXIT_FAILED,
        _promoter,
        console,
        load_settings,
        open_store,
        plugin_manager,
    )
    from training.lock import LockBusy, training_lock
    from training.run import work_dir_of

    if promote and reject:
        console.print("[red]--promote and --reject exclude each other[/red]")
        raise typer.Exit(2)
    action = "promote" if promote else "reject" if reject else "stop"
    settings = load_settings()

    async def main() -> Any:
        async with open_store(settings) as store:
            async with training_lock(store, work_dir_of(settings)):
                return await stop_test(
                    store,
                    settings,
                    plugin_manager(settings),
                    _promoter(settings),
                    action,
                    on_ended=notify_serve(settings),
                )

    try:
        outcome = asyncio.run(main())
    except (LookupError, LockBusy) as exc:
        console.print(f"[red]{exc}[/red]", highlight=False)
        raise typer.Exit(EXIT_FAILED) from exc
    console.print(f"test #{outcome.test_id}: {outcome.outcome} — {outcome.reason}", highlight=False)
    if outcome.outcome == "failed":
        raise typer.Exit(EXIT_FAILED)
