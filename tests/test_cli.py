"""The `oogiri` console script, run as a user would (a real subprocess, the tiny demo model or a
real `oogiri serve` child process on the instant engine)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bot.models import message

sys.path.insert(0, str(Path(__file__).resolve().parent / "faults"))
from faultsupport import BotProcess, free_port, running

OOGIRI = shutil.which("oogiri", path=str(Path(sys.executable).parent)) or "oogiri"
DEMO_PREFIX = "[demo model — random text]"


def run(
    args: list[str], data_dir: Path, timeout: float = 240, **env_extra: str
) -> subprocess.CompletedProcess[str]:
    """``oogiri ARGS`` in a clean environment: its own data dir, English locale, and a web port
    nobody listens on (so a serve someone runs on :8000 is never asked by accident)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OOGIRI_", "LC_", "LANG"))}
    env.update(
        OOGIRI_DATA_DIR=str(data_dir),
        OOGIRI_WEB__PORT=str(free_port()),
        LANG="C.UTF-8",
        COLUMNS="80",
    )
    env.update(env_extra)
    return subprocess.run(
        [OOGIRI, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=data_dir.parent,
    )


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli") / "data"


@pytest.fixture
def not_an_image(tmp_path: Path) -> Path:
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a picture at all")
    return bad


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BotProcess]:
    """A real `oogiri serve` (web channel, instant engine) on a free port."""
    bot = BotProcess(tmp_path_factory.mktemp("serve") / "data").start(cli=True)
    try:
        yield bot
    finally:
        bot.stop()


# --------------------------------------------------------------------------- jokes, in-process


def test_joke_loads_once_for_all_images_quietly_and_frames_the_demo(
    data_dir: Path, sample_dir: Path
) -> None:
    images = [sample_dir / n for n in ("chelsea.png", "astronaut.png", "coffee.png", "rocket.jpg")]
    result = run(["joke", *map(str, images)], data_dir)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(images)
    for image, line in zip(images, lines, strict=True):
        assert line.startswith(f"{image}: {DEMO_PREFIX} ")  # visibly not a joke
        assert "[model tiny-random-0, joke #" in line
    # Quiet by default: the demo warning, and the demo notice after the jokes; no INFO lines.
    assert "random noise" in result.stderr and "OOGIRI_ENGINE__MODEL" in result.stderr
    assert result.stderr.rstrip().splitlines()[-1].startswith("Note: the demo model answered")
    assert " INFO " not in result.stderr and "alembic" not in result.stderr
    assert "Loading weights" not in result.stderr

    # -v: the log lines are back, and they show one model load for two images.
    verbose = run(["joke", "-v", *map(str, images[:2])], data_dir)
    assert verbose.returncode == 0, verbose.stderr
    assert " INFO " in verbose.stderr
    assert verbose.stderr.count("transformers engine: tiny-random-0 on cpu") == 1


def test_joke_json_carries_demo_and_keeps_answering_after_bad_input(
    data_dir: Path, sample_dir: Path, not_an_image: Path
) -> None:
    result = run(["joke", "--json", str(sample_dir / "chelsea.png"), str(not_an_image)], data_dir)
    assert result.returncode == 1  # one failure → non-zero exit, the good image still answered
    good, err = (json.loads(line) for line in result.stdout.strip().splitlines())
    assert good["model_version"] == "tiny-random-0" and good["joke_id"] > 0
    assert good["demo"] is True and good["text"].startswith(DEMO_PREFIX)
    assert good["server"] is None and good["engine"] == "transformers"
    assert err["error"] == "not_image" and err["message"] == message("not_image", "en")


def test_a_bad_image_is_refused_before_anything_loads(tmp_path: Path, not_an_image: Path) -> None:
    data_dir = tmp_path / "fresh"
    result = run(["joke", str(not_an_image)], data_dir)
    assert result.returncode == 1
    assert result.stderr.strip() == f"{not_an_image}: {message('not_image', 'en')}"
    assert not data_dir.exists()  # no model built, no database opened


@pytest.mark.parametrize(
    ("env", "lang"),
    [
        ({"LANG": "zh_CN.UTF-8"}, "zh"),
        ({"LANG": "de_DE.UTF-8"}, "en"),  # no German texts: English is the fallback
        ({"LANG": "C.UTF-8"}, "en"),  # the settings' default (zh) is for chat users
        ({"LANG": "en_US.UTF-8", "LC_ALL": "zh_TW.UTF-8"}, "zh"),  # LC_ALL wins, as in libc
        ({"LANG": "en_US.UTF-8", "OOGIRI_LANGUAGE": "zh"}, "zh"),  # an explicit setting wins
    ],
)
def test_joke_messages_follow_the_locale(
    tmp_path: Path, not_an_image: Path, env: dict[str, str], lang: str
) -> None:
    result = run(["joke", "--json", str(not_an_image)], tmp_path / "data", **env)
    assert json.loads(result.stdout)["message"] == message("not_image", lang)


# --------------------------------------------------------------------------- jokes from a serve


def test_joke_asks_the_running_serve_instead_of_loading_a_model(
    serve: BotProcess, tmp_path: Path, sample_dir: Path, not_an_image: Path
) -> None:
    data_dir = tmp_path / "client"
    images = [sample_dir / "chelsea.png", not_an_image, sample_dir / "coffee.png"]
    port = str(serve.port)
    result = run(["joke", "--json", *map(str, images)], data_dir, OOGIRI_WEB__PORT=port)
    assert result.returncode == 1, result.stderr  # the bad one is refused here, never sent
    first, bad, second = (json.loads(line) for line in result.stdout.strip().splitlines())
    assert bad["error"] == "not_image"
    for joke, image in ((first, images[0]), (second, images[2])):
        assert joke["image"] == str(image) and joke["server"] == serve.url
        assert joke["engine"] == "instant" and joke["demo"] is False
        stored = httpx.get(f"{serve.url}/api/jokes/{joke['joke_id']}").json()
        assert stored["text"] == joke["text"]  # told by, and stored on, the server
    assert not data_dir.exists()  # nothing loaded or stored on this side

    # Plain output says where the jokes come from; --local never asks the serve.
    plain = run(["joke", str(images[0])], data_dir, OOGIRI_WEB__PORT=port)
    assert plain.returncode == 0, plain.stderr
    assert f"asking the oogiri serve at {serve.url}" in plain.stderr


def test_joke_finds_the_serve_of_its_data_dir(tmp_path: Path, sample_dir: Path) -> None:
    """A serve leaves its address in its data dir while it runs: `oogiri joke` on that data dir
    asks it even where the web address in the settings differs (run() picks another port)."""
    bot = BotProcess(tmp_path / "data")
    marker = bot.data_dir / "run" / "serve.json"
    with running(bot, cli=True):
        assert json.loads(marker.read_text())["url"] == bot.url
        told = []
        for name in ("chelsea.png", "coffee.png"):
            result = run(["joke", "--json", str(sample_dir / name)], bot.data_dir)
            assert result.returncode == 0, result.stderr
            told.append(json.loads(result.stdout))
        assert [t["server"] for t in told] == [bot.url, bot.url]
    assert not marker.exists()  # a stopped serve is not advertised
    # Both calls were one web user (the cookie kept, owner-only), not two new visitors.
    cookies = bot.data_dir / "run" / "cli-web-cookies.json"
    assert cookies.stat().st_mode & 0o077 == 0
    with sqlite3.connect(bot.data_dir / "oogiri.sqlite3") as db:
        users = db.execute(
            "SELECT DISTINCT user_id FROM jokes WHERE public_id IN (?, ?)",
            [t["joke_id"] for t in told],
        ).fetchall()
    assert len(users) == 1


def test_joke_server_option_and_a_server_that_is_down(
    serve: BotProcess, tmp_path: Path, sample_dir: Path
) -> None:
    image = str(sample_dir / "chelsea.png")
    result = run(["joke", "--json", "--server", serve.url, image], tmp_path / "data")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["server"] == serve.url

    dead = f"http://127.0.0.1:{free_port()}"
    down = run(["joke", "--server", dead, image], tmp_path / "data")
    assert down.returncode == 3
    assert f"no oogiri serve answers at {dead}" in down.stderr
    assert down.stdout == ""

    both = run(["joke", "--server", dead, "--local", image], tmp_path / "data")
    assert both.returncode == 2 and "exclude each other" in both.stderr


def test_joke_server_answers_with_its_own_errors_in_our_language(
    tmp_path: Path, sample_dir: Path
) -> None:
    """A refusal from the serve (here: a server whose image limit the picture breaks) comes back
    as that image's error line, in the CLI's language."""
    bot = BotProcess(tmp_path / "srv", OOGIRI_IMAGES__MAX_PIXELS="1000")
    with running(bot, cli=True):
        result = run(
            ["joke", "--json", "--server", bot.url, str(sample_dir / "chelsea.png")],
            tmp_path / "data",
            LANG="zh_CN.UTF-8",
        )
    line = json.loads(result.stdout)
    assert result.returncode == 1
    assert line["error"] == "too_many_pixels"
    assert line["message"] == message("too_many_pixels", "zh", width=451, height=300)


def test_serve_on_its_defaults_logs_plain_lines(tmp_path: Path) -> None:
    """README's first command (`oogiri serve`, no model): the demo is said plainly, and a log file
    gets log lines only, no spinner or tqdm bars ("Loading weights 0%|…")."""
    bot = BotProcess(
        tmp_path / "data",
        OOGIRI_ENGINE__NAME="transformers",
        OOGIRI_PLUGINS="web,engine_transformers",
    )
    bot.env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)  # the serve must switch the bars off itself
    with running(bot, cli=True):
        assert httpx.get(bot.url + "/healthz", timeout=10).json()["engine"]["demo"] is True
    log = bot.log_path.read_text()
    assert "NO MODEL CONFIGURED" in log and "web: serving on" in log, log
    assert re.search(r"engine 'transformers' loaded in \d+\.\d s", log), log
    assert not re.search(r"it/s\]|\d+%\||[\u2800-\u28ff]", log), log  # tqdm, rich's spinner


def test_make_tiny_model_prints_one_line_when_piped(tmp_path: Path) -> None:
    """No tqdm bars ("Writing model shards 0%|…") or spinner between the command and its result."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    made = subprocess.run(
        [OOGIRI, "dev", "make-tiny-model", str(tmp_path / "m")],
        capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert made.stderr.strip() == f"model written to {tmp_path / 'm'}", made.stderr


# --------------------------------------------------------------------------- other commands


def test_help_is_clean(data_dir: Path) -> None:
    joke_help = run(["joke", "--help"], data_dir)
    assert joke_help.returncode == 0
    assert "Usage: oogiri joke [OPTIONS] IMAGES..." in joke_help.stdout
    top = run(["--help"], data_dir)
    for text in (joke_help.stdout, top.stdout, run(["train", "run", "--help"], data_dir).stdout):
        assert not re.search(r"<(bool|str|int|list\[[^]]*\]|Path)>", text), text
    assert re.search(r"--hint\s+TEXT", joke_help.stdout)
    assert "[default: 0]" not in joke_help.stdout


def test_plugins_wrap_instead_of_cutting(data_dir: Path) -> None:
    plugins = run(["plugins"], data_dir)
    assert plugins.returncode == 0
    assert "…" not in plugins.stdout
    assert max(map(len, plugins.stdout.splitlines())) <= 80
    from bot.plugins import describe, make_manager

    listed = plugins.stdout.splitlines()
    infos = describe(make_manager(None))
    assert {"web", "engine_transformers", "engine_instant"} <= {i.name for i in infos}
    for info in infos:  # every name and module whole on its line, every hook whole below it
        head = f"{info.name}  ({info.module})"
        assert head in listed
        below = listed[listed.index(head) + 1 :]
        assert set(info.hooks) <= set(" ".join(below).replace(",", " ").split())


def test_db_upgrade_config_and_an_empty_model_registry(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    assert run(["db", "upgrade"], data_dir).returncode == 0
    assert (data_dir / "oogiri.sqlite3").exists()
    shown = json.loads(run(["config", "show"], data_dir).stdout)
    assert shown["data_dir"] == str(data_dir)
    models = run(["models", "list"], data_dir)
    assert models.returncode == 0
    assert models.stdout.startswith("no model versions yet — ")
    assert "oogiri train run" in models.stdout


def test_engine_status_says_what_it_knows(serve: BotProcess, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    alone = run(["engine", "status"], data_dir)
    assert alone.returncode == 0, alone.stderr
    assert "engine: transformers (no model set: the tiny demo model)" in alone.stdout
    assert "managed LMDeploy server" in alone.stdout
    assert "oogiri serve: nothing answers at http://127.0.0.1:" in alone.stdout

    beside = run(["engine", "status"], data_dir, OOGIRI_WEB__PORT=str(serve.port))
    assert f"oogiri serve: reachable at {serve.url} — engine instant healthy" in beside.stdout

    managed = run(
        ["engine", "status"],
        data_dir,
        OOGIRI_ENGINE__NAME="lmdeploy",
        OOGIRI_ENGINE__MANAGE="true",
        OOGIRI_WEB__PORT=str(serve.port),
    )
    assert managed.returncode == 3  # no control socket: this serve does not manage LMDeploy
    assert "no running `oogiri serve` is listening on" in managed.stderr
    assert f"reachable at {serve.url}" in managed.stderr


# --------------------------------------------------------------------------- the test run itself


def test_the_run_header_names_each_optional_service(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "header_conftest", Path(__file__).parent / "conftest.py"
    )
    assert spec is not None and spec.loader is not None
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        up = listener.getsockname()[1]
        monkeypatch.setattr(conftest, "REDIS_URL", f"redis://127.0.0.1:{up}/0")
        monkeypatch.setattr(conftest, "PG_ADMIN_URL", f"postgresql://x@127.0.0.1:{free_port()}/y")
        header = conftest.pytest_report_header(None)  # type: ignore[arg-type]
    assert header.startswith("optional services: ")
    assert "Redis yes" in header and "PostgreSQL NO" in header
    for name in ("Chromium", "Compose plugin", "initdb"):
        assert name in header
    assert "skip" in header  # something is missing: the header says what that means
