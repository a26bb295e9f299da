"""Alembic migrations, run programmatically (``oogiri db upgrade`` and at startup)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config

HERE = Path(__file__).parent


def alembic_config(connection: Any = None, url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    if url:
        cfg.set_main_option("sqlalchemy.url", url)
    cfg.attributes["connection"] = connection
    return cfg


def run_upgrade(connection: Any, revision: str = "heads") -> None:
    """Upgrade on an existing (sync) connection; called through ``AsyncConnection.run_sync``."""
    command.upgrade(alembic_config(connection), revision)
