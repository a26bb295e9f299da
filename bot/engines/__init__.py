"""Inference engines behind one async protocol (see ``base.Engine``)."""

from bot.engines.base import Engine, EngineHealth

__all__ = ["Engine", "EngineHealth"]
