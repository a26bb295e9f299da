"""Debian's chromium for the browser tests: where it is and how it starts on this machine.

Without the background-networking flags chromium keeps dialling Google's hosts, which the closed
network refuses; as root it needs --no-sandbox. The ``chromium`` fixture lives in conftest.py.
"""

from __future__ import annotations

from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
