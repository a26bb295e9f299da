"""The third-party plugin of docs/plugins.md, installed the way a stranger installs it and run
through ``oogiri``: its entry point is found, its settings come from the environment, its hooks
and command are called. The doc shows the fixture's files verbatim (checked here)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "example_plugin"
DOC = ROOT / "docs" / "plugins.md"
PIP_INSTALL = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
PIP_INSTALL += ["--no-index"]  # nothing is downloaded: the build uses the venv's setuptools
ANCHOR = re.compile(r"<!-- fixture: (\S+) -->\n```\w*\n(.*?)```\n", re.S)


def test_the_doc_shows_the_example_plugin_verbatim() -> None:
    shown = dict(ANCHOR.findall(DOC.read_text(encoding="utf-8")))
    files = sorted(str(p.relative_to(ROOT)) for p in FIXTURE.iterdir() if p.is_file())
    assert sorted(shown) == files, "docs/plugins.md must show every file of the example plugin"
    for path, text in shown.items():
        assert text == (ROOT / path).read_text(encoding="utf-8"), f"{path} differs from the doc"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The example plugin pip-installed into a folder of its own (no index, no build isolation),
    and an environment whose Python finds it there, as if installed into the venv."""
    tmp = tmp_path_factory.mktemp("example_plugin")
    src = shutil.copytree(FIXTURE, tmp / "src")  # the build writes beside the sources
    site = tmp / "site"
    subprocess.run(
        [*PIP_INSTALL, "-t", str(site), str(src)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OOGIRI_")}
    env |= {
        "PYTHONPATH": str(site),
        "OOGIRI_DATA_DIR": str(tmp / "data"),
        "OOGIRI_SHOUT__SIGN_OFF": " (｀・ω・´)",
        "OOGIRI_SHOUT__UPPER": "true",
        "OOGIRI_LOG_LEVEL": "WARNING",
    }
    return {"cwd": str(tmp), **env}


def oogiri(installed: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(installed)
    cwd = env.pop("cwd")
    exe = Path(sys.executable).with_name("oogiri")
    return subprocess.run(
        [str(exe), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_oogiri_finds_the_plugin_its_settings_and_its_command(installed: dict[str, str]) -> None:
    listed = oogiri(installed, "plugins")
    assert listed.returncode == 0, listed.stderr
    assert "shout  (oogiri_shout)" in listed.stdout
    shown = oogiri(installed, "config", "show", "--strict")
    assert shown.returncode == 0, shown.stderr  # OOGIRI_SHOUT__* are known keys now
    assert json.loads(shown.stdout)["shout"] == {"sign_off": " (｀・ω・´)", "upper": True}
    said = oogiri(installed, "shout", "hello")
    assert said.returncode == 0, said.stderr
    assert said.stdout.strip() == "HELLO (｀・ω・´)"


SCRIPT = """
import asyncio, io, json
from PIL import Image
from bot.app import App
from bot.engines.instant import InstantEngine
from bot.models import JokeRequest
from bot.settings import Settings
import oogiri_shout

async def main():
    app = await App.create(Settings(), engine=InstantEngine())
    try:
        png = io.BytesIO()
        Image.effect_noise((320, 240), 40).convert("RGB").save(png, "PNG")
        joke = await app.service.tell(JokeRequest(png.getvalue(), channel="test", user_id="t:1"))
        await app.service.rate(joke.id, "t:2", 1, "test")
        stored = await app.store.get_joke(joke.id)
        print(json.dumps({"text": joke.text, "stored": stored.text, "votes": oogiri_shout.votes}))
    finally:
        await app.close()

asyncio.run(main())
"""


def test_the_plugin_hooks_run_in_a_real_app(installed: dict[str, str]) -> None:
    env = dict(installed)
    cwd = env.pop("cwd")
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["text"].endswith(" (｀・ω・´)") and out["text"] == out["stored"]
    body = out["text"].removesuffix(" (｀・ω・´)")
    assert body == body.upper() and body  # upper = true
    assert out["votes"] == {"1": 1}
