"""`oogiri joke a.png missing.png`: a review found that one missing (or unreadable, or directory)
argument made click refuse the whole batch with a usage error (exit 2, no joke at all). Like
`cat a b`, each bad argument now gets one `FILE: why` line on stderr, the others their jokes, and
the exit status is 1 at the end; the same against a running `oogiri serve` and with --local."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bot.models import message

sys.path.insert(0, str(Path(__file__).resolve().parent / "faults"))
from faultsupport import BotProcess, free_port

OOGIRI = shutil.which("oogiri", path=str(Path(sys.executable).parent)) or "oogiri"
NO_FILE = "cannot read the file: No such file or directory"
A_DIR = "cannot read the file: Is a directory"


def _env(data_dir: Path, **extra: str) -> dict[str, str]:
    """A clean OOGIRI_ environment: its own data dir, the instant engine, English, and a web port
    nobody listens on (so only --server, where given, is asked)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OOGIRI_", "LC_", "LANG"))}
    env.update(
        OOGIRI_DATA_DIR=str(data_dir),
        OOGIRI_ENGINE__NAME="instant",
        OOGIRI_WEB__PORT=str(free_port()),
        LANG="C.UTF-8",
        COLUMNS="200",
    )
    env.update(extra)
    return env


def oogiri(args: list[str], tmp_path: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [OOGIRI, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(tmp_path / "data", **extra),
        cwd=tmp_path,
    )


@pytest.fixture
def batch(tmp_path: Path, sample_dir: Path) -> list[Path]:
    """good, missing, a directory, good."""
    (tmp_path / "folder").mkdir()
    return [
        sample_dir / "chelsea.png",
        tmp_path / "missing.png",
        tmp_path / "folder",
        sample_dir / "coffee.png",
    ]


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BotProcess]:
    bot = BotProcess(tmp_path_factory.mktemp("serve") / "data").start(cli=True)
    try:
        yield bot
    finally:
        bot.stop()


def _check_plain(result: subprocess.CompletedProcess[str], batch: list[Path]) -> None:
    good1, missing, folder, good2 = batch
    assert result.returncode == 1, result.stderr
    assert "Usage:" not in result.stderr and "Traceback" not in result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(": ", 1)[0] for line in lines] == [str(good1), str(good2)]
    errors = [line for line in result.stderr.splitlines() if not line.startswith("asking")]
    assert errors == [f"{missing}: {NO_FILE}", f"{folder}: {A_DIR}"]


def _check_json(result: subprocess.CompletedProcess[str], batch: list[Path]) -> None:
    assert result.returncode == 1, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["image"] for line in lines] == list(map(str, batch))  # one per argument
    assert "text" in lines[0] and "text" in lines[3]
    for line, why in ((lines[1], NO_FILE), (lines[2], A_DIR)):
        assert line == {"image": line["image"], "error": "unreadable", "message": why}
    # the human lines still go to stderr, one per bad argument
    assert result.stderr.splitlines() == [f"{batch[1]}: {NO_FILE}", f"{batch[2]}: {A_DIR}"]


@pytest.mark.parametrize("as_json", [False, True])
def test_local_batch_answers_the_readable_images(
    tmp_path: Path, batch: list[Path], as_json: bool
) -> None:
    args = ["joke", "--local", *(["--json"] if as_json else []), *map(str, batch)]
    result = oogiri(args, tmp_path)
    (_check_json if as_json else _check_plain)(result, batch)


@pytest.mark.parametrize("as_json", [False, True])
def test_serve_batch_answers_the_readable_images(
    serve: BotProcess, tmp_path: Path, batch: list[Path], as_json: bool
) -> None:
    args = ["joke", "--server", serve.url, *(["--json"] if as_json else []), *map(str, batch)]
    result = oogiri(args, tmp_path)
    (_check_json if as_json else _check_plain)(result, batch)
    if as_json:
        assert all(
            line["server"] == serve.url
            for line in map(json.loads, result.stdout.splitlines())
            if "text" in line
        )
    assert not (tmp_path / "data").exists()  # the serve answered; nothing loaded here


def test_only_missing_files_load_nothing(tmp_path: Path) -> None:
    missing = [tmp_path / "a.png", tmp_path / "b.png"]
    result = oogiri(["joke", *map(str, missing)], tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [f"{p}: {NO_FILE}" for p in missing]
    assert not (tmp_path / "data").exists()


def test_an_unreadable_file_is_its_own_error_not_a_usage_error(
    tmp_path: Path, sample_dir: Path
) -> None:
    """A file without read permission. Tests run as root, where chmod 000 still reads, so the
    permission check click makes (os.access) and the read both see "denied" here."""
    secret = tmp_path / "secret.png"
    shutil.copy(sample_dir / "chelsea.png", secret)
    code = f"""
import os, sys
import bot.images as images
secret = {str(secret)!r}
real_read, real_access = images.read_limited, os.access
def read_limited(path, n):
    if str(path) == secret:
        raise PermissionError(13, "Permission denied", secret)
    return real_read(path, n)
images.read_limited = read_limited
os.access = lambda p, m, **kw: False if str(p) == secret else real_access(p, m, **kw)
sys.argv = ["oogiri", "joke", {str(sample_dir / "chelsea.png")!r}, secret]
from bot.cli import main
main()
"""
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(tmp_path / "data"),
        cwd=tmp_path,
    )
    assert result.returncode == 1, result.stderr
    assert result.stdout.startswith(f"{sample_dir / 'chelsea.png'}: ")
    assert result.stderr.splitlines() == [f"{secret}: cannot read the file: Permission denied"]


def test_bad_files_are_still_named_when_no_serve_answers(tmp_path: Path, batch: list[Path]) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    result = oogiri(["joke", "--json", "--server", dead, *map(str, batch)], tmp_path)
    assert result.returncode == 3
    assert result.stdout == ""  # nothing was answered
    assert result.stderr.splitlines()[:2] == [f"{batch[1]}: {NO_FILE}", f"{batch[2]}: {A_DIR}"]
    assert f"no oogiri serve answers at {dead}" in result.stderr


def test_an_engine_that_cannot_load_is_one_line_like_a_server_that_is_down(
    tmp_path: Path, batch: list[Path]
) -> None:
    """The --local twin of a serve that is down: exit 3 and one line, not a traceback."""
    result = oogiri(["joke", "--local", *map(str, batch)], tmp_path, OOGIRI_ENGINE__NAME="nope")
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines[:2] == [f"{batch[1]}: {NO_FILE}", f"{batch[2]}: {A_DIR}"]
    assert len(lines) == 3
    assert lines[2].startswith("error: cannot load the 'nope' engine: no engine named 'nope'")


def test_a_bad_picture_among_good_ones_is_said_once(
    tmp_path: Path, batch: list[Path], sample_dir: Path
) -> None:
    """Refused by the image checks (not a picture) rather than by the file system: the same
    shape, said on stderr once even with --json."""
    notes = tmp_path / "notes.jpg"
    notes.write_text("not a picture")
    result = oogiri(["joke", "--json", str(sample_dir / "chelsea.png"), str(notes)], tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"{notes}: {message('not_image', 'en')}"]
    assert json.loads(result.stdout.splitlines()[1])["error"] == "not_image"


def test_help_says_what_happens_to_a_bad_file(tmp_path: Path) -> None:
    result = oogiri(["joke", "--help"], tmp_path)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "missing, unreadable or not a picture" in text
    assert '{"image", "error", "message"}' in text
    assert "1 any image failed" in text and "3 no serve answers" in text
