"""``oogiri engine …``: clients of a running ``oogiri serve``'s control socket.

Registered through ``bot.engines.lmdeploy_plugin``'s ``oogiri_register_commands`` hook.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from bot.engines.lmdeploy_server import (
    STATE_FILE,
    ControlUnavailable,
    build_command,
    control_request,
    redact,
    server_settings,
    socket_path,
)
from bot.settings import Settings


def serve_summary(settings: Settings) -> str:
    """One line on the `oogiri serve` at the configured web address: reachable, and its engine."""
    import httpx

    from bot.cli_joke import local_server_url

    url = local_server_url(settings)
    try:
        r = httpx.get(url + "/healthz", timeout=3.0)
        engine = dict(r.json().get("engine") or {})
    except (httpx.HTTPError, ValueError, AttributeError):
        return f"oogiri serve: nothing answers at {url}"
    state = "healthy" if engine.get("ok") else f"NOT healthy ({engine.get('detail') or '?'})"
    demo = ", demo model" if engine.get("demo") else ""
    model = engine.get("model") or "?"
    name = engine.get("name")
    return f"oogiri serve: reachable at {url} — engine {name} {state}, model {model}{demo}"


def register(cli: typer.Typer) -> None:
    """Add ``oogiri engine swap|status|command`` (see ``bot.engines.lmdeploy_server``)."""
    engine_cli = typer.Typer(no_args_is_help=True, help="The managed LMDeploy server.")
    cli.add_typer(engine_cli, name="engine")

    def err(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    @engine_cli.command("swap")
    def swap_cmd(
        model_dir: Annotated[Path, typer.Argument(help="model folder to serve")],
        label: Annotated[str | None, typer.Option(help="model_version for jokes")] = None,
    ) -> None:
        """Blue/green: start MODEL_DIR beside the running model, switch, drain, stop the old."""
        settings = Settings()
        try:
            answer = control_request(
                socket_path(settings),
                {"op": "swap", "model": str(model_dir.expanduser().resolve()), "label": label},
                on_event=lambda doc: err(f"… {doc.get('message')}"),
            )
        except ControlUnavailable as exc:
            err(str(exc))
            raise typer.Exit(3) from None
        if not answer.get("ok"):
            err(f"swap failed: {answer.get('error')}")
            raise typer.Exit(1)
        print(json.dumps(answer["result"], indent=2, ensure_ascii=False))

    @engine_cli.command("status")
    def status_cmd() -> None:
        """The managed LMDeploy server (model, server, health, swaps); for any other engine,
        which one is configured and whether a running `oogiri serve` answers."""
        settings = Settings()
        e = server_settings(settings)
        if e.name == "lmdeploy":
            what = f"LMDeploy servers at {', '.join(e.base_urls)}, not managed"
        else:
            what = f"model {e.model}" if e.model else "no model set: the tiny demo model"
        explain = (
            f"engine: {e.name} ({what}). `oogiri engine status` and `swap` are for the managed "
            "LMDeploy server (OOGIRI_ENGINE__NAME=lmdeploy, OOGIRI_ENGINE__MANAGE=true)."
        )
        managed = e.name == "lmdeploy" and e.manage
        state = settings.data_dir / STATE_FILE
        # A managed serve on this data dir (now, or before: its socket or state file) knows best,
        # even where these settings name another engine.
        if managed or socket_path(settings).exists() or state.exists():
            try:
                answer = control_request(socket_path(settings), {"op": "status"}, timeout_s=30)
            except ControlUnavailable as exc:
                err(str(exc))
                if state.exists():
                    err(f"last swapped-in model ({state}): {state.read_text(encoding='utf-8')}")
                if not managed:
                    err(explain)
                err(serve_summary(settings))
                raise typer.Exit(3) from None
            print(json.dumps(answer.get("result"), indent=2, ensure_ascii=False))
            return
        print(explain)
        print(serve_summary(settings))

    @engine_cli.command("command")
    def command_cmd(
        model_dir: Annotated[Path | None, typer.Argument(help="default: engine.model")] = None,
    ) -> None:
        """Print the lmdeploy command line managed mode runs (API key hidden)."""
        settings = Settings()
        e = server_settings(settings)
        model = model_dir or e.model
        if model is None:
            err("no model: pass MODEL_DIR or set engine.model")
            raise typer.Exit(2)
        label = e.model_version or Path(model).name
        cmd = build_command(e, model, e.port, e.served_model_name or label)
        env = f"OMP_NUM_THREADS={e.server_threads} MKL_NUM_THREADS={e.server_threads}"
        print(env, " ".join(redact(cmd)))
