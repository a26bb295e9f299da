"""Review of the path to a real model (setup, bootstrap, hub, Oogiri-GO, the step runner): each
test here showed a defect before its fix. Loopback hub (tests/fakes/fake_hub.py), no network."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import signal
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
from fake_hub import FakeHub  # pyright: ignore[reportMissingImports]  # tests/fakes, on sys.path by conftest.py
from PIL import Image
from trainhelp import DATA, MODEL, SECRET, hub_downloads, invoke

import training.cli as tcli
from training import hub, oogiri_go
from training.proc import run_command


@pytest.fixture
def env(fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.chdir(tmp_path)
    for var in list(os.environ):
        if var.startswith("OOGIRI_") or var.startswith("FAKE_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("OOGIRI_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv(
        "OOGIRI_STORE__URL", f"sqlite+aiosqlite:///{tmp_path / 'data' / 'oogiri.sqlite3'}"
    )
    monkeypatch.setenv("OOGIRI_PLUGINS", "training")
    return {"tmp": tmp_path, "data": tmp_path / "data", "hub": fake_hub}


def plain_settings() -> Any:
    from bot.settings import Settings

    return Settings(_env_file=None)  # pyright: ignore[reportCallIssue]


# --------------------------------------------------------------------------- downloads


def test_an_interrupted_pull_of_a_new_commit_is_not_taken_for_the_old_complete_copy(
    fake_hub: FakeHub, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The folder's proof of completeness (oogiri-pull.json) named the old commit while an
    interrupted pull of a new one had already replaced some of its files: bootstrap's resume
    (sizes only) then took the mixed folder for the complete old model."""
    import huggingface_hub

    dest = tmp_path / "m"
    old = hub.pull(MODEL, dest, progress=False)
    # the hub moves on: config.json changes, same size (a digit), so sizes cannot tell
    newer = tmp_path / "newer"
    shutil.copytree(tiny_model, newer)
    text = (newer / "config.json").read_text(encoding="utf-8")
    digit = next(c for c in text if c.isdigit() and c != "9")
    (newer / "config.json").write_text(text.replace(digit, str(int(digit) + 1), 1), "utf-8")
    assert fake_hub.add_model(MODEL, newer).commit != old.commit

    real = huggingface_hub.snapshot_download

    def interrupted(*args: Any, **kw: Any) -> Any:
        real(*args, **{**kw, "allow_patterns": ["config.json"]})  # one file arrives …
        raise ConnectionError("connection reset")  # … then the network goes

    monkeypatch.setattr(huggingface_hub, "snapshot_download", interrupted)
    with pytest.raises(hub.HubError, match="connection reset"):
        hub.pull(MODEL, dest, progress=False)
    assert hub.read_marker(dest) is None or hub.read_marker(dest)["commit"] != old.commit  # type: ignore[index]
    # what bootstrap's resume asks (check=False): not a complete copy any more
    assert hub.local_copy(dest, MODEL, check=False) is None
    monkeypatch.setattr(huggingface_hub, "snapshot_download", real)
    again = hub.pull(MODEL, dest, progress=False)  # online again: finished and checked
    assert hub.verify(dest, again.files) == [] and again.commit != old.commit


def test_a_token_with_a_trailing_newline_works_and_never_reaches_an_error(
    fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HF_TOKEN read from a secrets file keeps its newline; httpx refused the header and quoted
    it, escaped (``b'Bearer hf_…\\n'``), so ``redact`` (the raw value only) let it through."""
    monkeypatch.setenv("HF_TOKEN", SECRET + "\n")
    snap = hub.pull("acme/private", tmp_path / "p", progress=False)
    assert snap.files
    # a token that cannot be repaired: the error names neither half of it
    head, tail = SECRET[:10], SECRET[10:]
    monkeypatch.setenv("HF_TOKEN", f"{head}\n{tail}")
    with pytest.raises(hub.HubError) as err:
        hub.pull("acme/private", tmp_path / "q", progress=False)
    assert head not in str(err.value) and tail not in str(err.value), str(err.value)
    quoted = f"Illegal header value b'Bearer {SECRET}\\r\\n'"
    assert SECRET not in hub.redact(quoted, SECRET + "\r\n")


# --------------------------------------------------------------------------- the data recipe


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), colour).save(buf, "JPEG")
    return buf.getvalue()


def _row(image: str, text: str) -> bytes:
    row = {"type": "I2T", "question": None, "image": image, "text": text, "star": 9}
    return json.dumps(row, ensure_ascii=False).encode() + b"\n"


def test_a_line_that_is_not_utf8_is_skipped_and_counted(tmp_path: Path) -> None:
    """One line with a byte that is not UTF-8 aborted the whole import (UnicodeDecodeError)."""
    src = tmp_path / "src"
    src.mkdir()
    with zipfile.ZipFile(src / oogiri_go.IMAGES_ZIP, "w") as z:
        z.writestr("images/1.jpg", _jpeg((200, 10, 10)))
        z.writestr("images/2.jpg", _jpeg((10, 200, 10)))
    bad = b'{"type": "I2T", "image": "1", "text": "\xff\xfe", "star": 99}\n'
    (src / "cn.jsonl").write_bytes(_row("1", "红色的") + bad + _row("2", "绿色的"))
    built = oogiri_go.build(src, tmp_path / "out", n=5, heldout=0, prompt="p")
    assert built.dropped == {"bad_line": 1}
    assert built.report["examples"]["bad_line"][0]["line"] == 2
    assert built.train == 2


def test_a_damaged_compressed_picture_is_skipped_and_counted(tmp_path: Path) -> None:
    """A deflated member with damaged data raised zlib.error, which ended the whole build."""
    src = tmp_path / "src"
    src.mkdir()
    with zipfile.ZipFile(src / oogiri_go.IMAGES_ZIP, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("images/1.jpg", _jpeg((200, 10, 10)))
        z.writestr("images/2.jpg", _jpeg((10, 200, 10)))
    raw = bytearray((src / oogiri_go.IMAGES_ZIP).read_bytes())
    with zipfile.ZipFile(src / oogiri_go.IMAGES_ZIP) as z:
        info = z.getinfo("images/1.jpg")
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    for i in range(start + 10, start + 60):
        raw[i] ^= 0x55
    (src / oogiri_go.IMAGES_ZIP).write_bytes(bytes(raw))
    (src / "cn.jsonl").write_bytes(_row("1", "红色的") + _row("2", "绿色的"))
    built = oogiri_go.build(src, tmp_path / "out", n=5, heldout=0, prompt="p")
    assert built.dropped == {"image_unreadable": 1}
    assert built.train == 1


# --------------------------------------------------------------------------- bad input, early


def test_bootstrap_refuses_bad_input_before_downloading_anything(env: dict[str, Any]) -> None:
    """--n 0 was found only after the 4.4 GB model and the 1.37 GB pictures were downloaded."""
    r = invoke("train", "bootstrap", "--n", "0")
    assert r.exit_code == 2 and "--n must be at least 1" in r.output, r.output  # usage error
    assert hub_downloads(env["hub"]) == []
    r = invoke("data", "oogiri-go", "--n", "0")
    assert r.exit_code == 2 and "--n must be at least 1" in r.output, r.output  # same convention
    r = invoke("data", "oogiri-go", "--lang", "fr")
    assert r.exit_code == 2 and "--lang must be one of" in r.output, r.output
    assert hub_downloads(env["hub"]) == []


def test_bootstrap_refuses_a_language_its_gate_would_reject(
    env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--lang en with the bot in Chinese trained for hours, then the sanity gate (zh) rejected
    every English joke. Said before the download now; a matching setting lets it through."""
    r = invoke("train", "bootstrap", "--lang", "en")
    assert r.exit_code == 2 and "OOGIRI_LANGUAGE" in r.output, r.output
    assert "Traceback" not in r.output and hub_downloads(env["hub"]) == []
    r = invoke("train", "bootstrap", "--lang", "jp")
    assert r.exit_code == 2 and "GATE_LANGUAGE" in r.output, r.output
    assert hub_downloads(env["hub"]) == []
    from training.bootstrap import BootstrapOptions, check_options

    monkeypatch.setenv("OOGIRI_LANGUAGE", "en")
    check_options(plain_settings(), BootstrapOptions(lang="en"))  # no error
    monkeypatch.setenv("OOGIRI_TRAINING__GATE_LANGUAGE", "any")
    check_options(plain_settings(), BootstrapOptions(lang="jp"))


def test_setup_with_a_missing_python_or_wheel_folder_is_one_line(
    env: dict[str, Any], tmp_path: Path
) -> None:
    r = invoke("train", "setup", "--python", "python9.99", "--venv", str(tmp_path / "v"))
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert "python9.99" in r.output and r.output.strip().count("\n") == 0
    assert not (tmp_path / "v").exists()
    r = invoke(
        "train", "setup", "--wheels", str(tmp_path / "nowheels"), "--reuse-system",
        "--venv", str(tmp_path / "v"),
    )  # fmt: skip
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert "nowheels" in r.output and r.output.strip().count("\n") == 0


# --------------------------------------------------------------------------- the step runner


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _wait_dead(pid: int, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def _end(pid: int) -> None:
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)


def test_what_a_dead_launcher_leaves_behind_is_ended(tmp_path: Path) -> None:
    """A launcher (torchrun) that dies leaves its workers running: they kept the GPUs."""
    pidfile = tmp_path / "pid"
    script = f"(sleep 300 >/dev/null 2>&1 & echo $! > {pidfile}); exit 3"
    rc = asyncio.run(run_command(["sh", "-c", script], timeout_s=60))
    pid = int(pidfile.read_text())
    try:
        assert rc == 3
        assert _wait_dead(pid), "the worker outlived its step"
    finally:
        _end(pid)


def test_a_worker_holding_the_output_does_not_keep_the_step_going(tmp_path: Path) -> None:
    """A worker still holding stdout kept the step waiting for its end of output: for ever, or
    until the timeout, which then reported a timeout instead of the launcher's exit code."""
    pidfile = tmp_path / "pid"
    script = f"sleep 300 & echo $! > {pidfile}; echo launched; exit 3"
    lines: list[str] = []
    started = time.monotonic()
    rc = asyncio.run(run_command(["sh", "-c", script], on_line=lines.append, timeout_s=60))
    pid = int(pidfile.read_text())
    try:
        assert rc == 3 and lines == ["launched"]
        assert time.monotonic() - started < 30
        assert _wait_dead(pid), "the worker outlived its step"
    finally:
        _end(pid)


# --------------------------------------------------------------------------- progress


def test_the_downloads_of_bootstrap_show_progress_in_its_display(env: dict[str, Any]) -> None:
    """Inside the command's live display (rich, on a terminal) huggingface_hub's tqdm bars showed
    nothing until a download had finished: rich holds a line until its newline, and a tqdm bar
    never ends one. 4.4 GB of model and 1.37 GB of pictures went by without a sign."""
    from rich.console import Console
    from rich.progress import Progress

    from training import bootstrap
    from training.bootstrap_cli import _events

    progress = Progress(console=Console(file=io.StringIO(), force_terminal=True, width=200))
    settings = plain_settings()

    async def main() -> bootstrap.BootstrapResult:
        async with tcli.open_store(settings) as store:
            opts = bootstrap.BootstrapOptions(n=4)
            return await bootstrap.bootstrap(settings, store, opts, events=_events(progress, False))

    with progress:
        result = asyncio.run(main())
    assert result.steps["pull"] == "done" and result.steps["data"] == "done", result.error
    downloads = {t.description.strip(): t for t in progress.tasks if "download" in t.description}
    model_bytes = result.model["bytes"]
    assert [t.completed for d, t in downloads.items() if MODEL in d] == [model_bytes], downloads
    data = [t for d, t in downloads.items() if DATA in d]
    assert len(data) == 1 and data[0].completed == data[0].total and data[0].completed > 0
    pictures = [t for t in progress.tasks if "pictures" in t.description]
    assert len(pictures) == 1 and pictures[0].completed == pictures[0].total


def test_a_listing_with_a_path_out_of_the_folder_is_refused_before_any_download(
    fake_hub: FakeHub, tiny_model: Path, tmp_path: Path
) -> None:
    """``../`` in a hub listing was left to huggingface_hub, which rejects it only in recent
    versions (pyproject allows >= 0.26) and only once the other files are downloaded; a file it
    wrote outside would then have been checked and, failing, deleted by ``_forget``."""
    repo = fake_hub.repo("model", MODEL)
    assert repo is not None
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me", encoding="utf-8")
    for bad in ("../victim.txt", "sub/../../victim.txt", "/etc/hostname"):
        repo.files = {k: v for k, v in repo.files.items() if "victim" not in k and "/etc" not in k}
        repo.files[bad] = dict(repo.files["config.json"])
        fake_hub.requests.clear()
        with pytest.raises(hub.HubError, match="outside") as err:
            hub.pull(MODEL, tmp_path / "dest" / "m", progress=False)
        assert bad in str(err.value) and "\n" not in str(err.value)
        assert hub_downloads(fake_hub) == [], bad
        assert victim.read_text(encoding="utf-8") == "keep me"
        assert not (tmp_path / "dest" / "m").exists()
