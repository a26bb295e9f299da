#!/usr/bin/env python3
"""Register oogiri's plugins for a tree that is not pip-installed (the device's copy).

The bot finds its plugins (web, engines, training …) through entry points; on the device the tree
runs from PYTHONPATH, so nothing declares them and ``oogiri serve`` would start without a web
channel. This writes a small distribution into SITE (a ``--target`` folder on PYTHONPATH) whose
``entry_points.txt`` lists pyproject.toml's, minus any Python already sees:

    python3 scripts/device/entry_points.py SITE
"""

from __future__ import annotations

import sys
import tomllib
from importlib.metadata import entry_points
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def register(site: Path) -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    wanted: dict[str, str] = dict(project.get("entry-points", {}).get("oogiri", {}))
    seen = {ep.value for ep in entry_points(group="oogiri")}
    extra = {k: v for k, v in wanted.items() if v not in seen}
    dist = site / "oogiri_device_entry_points-0.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: oogiri-device-entry-points\nVersion: 0\n", encoding="utf-8"
    )
    lines = "".join(f"{k} = {v}\n" for k, v in extra.items())
    (dist / "entry_points.txt").write_text("[oogiri]\n" + lines, encoding="utf-8")
    print(f"oogiri plugins: {', '.join(sorted(wanted))} ({len(extra)} registered here)")
    return extra


if __name__ == "__main__":
    register(Path(sys.argv[1]))
