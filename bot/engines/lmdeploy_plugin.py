"""The LMDeploy plugin (entry point ``engine_lmdeploy_server``): its hooks, nothing else.

The engine and the managed server live in ``bot.engines.lmdeploy_server``, the ``oogiri engine …``
commands in ``bot.engines.cli``; this module wires both into oogiri, so neither imports the other's
plugin side (no import cycle).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bot.engines.cli import register as register_engine_commands
from bot.engines.lmdeploy_server import (
    ControlServer,
    LMDeployEngineSettings,
    ManagedLMDeploy,
    make_lmdeploy_engine,
    socket_path,
)
from bot.hookspecs import hookimpl


@hookimpl
def oogiri_register_settings(register: Callable[..., None]) -> None:
    register("engine", LMDeployEngineSettings)


@hookimpl
def oogiri_register_engines(register: Callable[..., Any], settings: Any) -> None:
    register("lmdeploy", make_lmdeploy_engine)


@hookimpl
async def oogiri_startup(app: Any) -> None:
    if not isinstance(app.engine, ManagedLMDeploy):
        return
    await app.engine.start()
    control = ControlServer(app, socket_path(app.settings))
    if await control.start():
        app.state["engine_control"] = control


@hookimpl
async def oogiri_shutdown(app: Any) -> None:
    control = app.state.pop("engine_control", None)
    if control is not None:
        await control.close()


@hookimpl
def oogiri_register_commands(cli: Any) -> None:
    register_engine_commands(cli)
