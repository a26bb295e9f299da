"""Issue 17: ``oogiri model pull``, ``oogiri data oogiri-go`` and ``oogiri train bootstrap`` against
a loopback hub (tests/fakes/fake_hub.py: the Hub HTTP API huggingface_hub really calls, reached
through HF_ENDPOINT) serving the project's tiny InternVL2 model and a tiny data set in
Oogiri-GO's exact shape; training with the stand-in XTuner. Nothing here reaches the internet."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fake_hub import FakeHub  # pyright: ignore[reportMissingImports]  # tests/fakes, on sys.path by conftest.py
from PIL import Image
from trainhelp import MODEL, SECRET, bootstrap_env, invoke

from bot.images import load
from bot.settings import DEFAULT_PROMPT, ImageSettings, Settings
from training import hub, oogiri_go
from training.bootstrap import apply_defaults, read_state
from training.cli import EXIT_REJECTED

ROOT = Path(__file__).resolve().parents[2]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- model pull


def test_pull_downloads_checks_and_is_idempotent(
    fake_hub: FakeHub, tiny_model: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "models" / "InternVL2-2B"
    snap = hub.pull(MODEL, dest, progress=False)
    source = sorted(p.name for p in tiny_model.iterdir())
    assert sorted(f.path for f in snap.files) == source
    for name in source:
        assert sha256(dest / name) == sha256(tiny_model / name), name
    assert snap.commit == fake_hub.repo("model", MODEL).commit
    marker = hub.read_marker(dest)
    assert marker is not None and marker["commit"] == snap.commit
    lfs = {f.path: f.sha256 for f in snap.files}
    assert lfs["model.safetensors"] == sha256(tiny_model / "model.safetensors")
    assert lfs["config.json"] is None  # a git file: checked by its blob id instead
    gets = len(fake_hub.downloads("model.safetensors"))
    assert gets == 1
    again = hub.pull(MODEL, dest, progress=False)
    assert again.commit == snap.commit
    assert len(fake_hub.downloads("model.safetensors")) == gets  # nothing downloaded twice


def test_pull_resumes_an_interrupted_file(
    fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    # huggingface_hub keeps what it received in 10 MB chunks; the tiny model is 1.6 MB
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    fake_hub.cut.add((MODEL, "model.safetensors"))
    dest = tmp_path / "m"
    try:
        hub.pull(MODEL, dest, progress=False)
    except hub.HubError:
        hub.pull(MODEL, dest, progress=False)  # a second pull finishes what the first began
    tries = fake_hub.downloads("model.safetensors")
    assert tries[0]["range"] is None
    resumed = [t["range"] for t in tries[1:]]
    assert resumed and resumed[-1].startswith("bytes=") and resumed[-1] != "bytes=0-"
    assert hub.verify(dest, hub.local_copy(dest, MODEL, check=False).files) == []  # type: ignore[union-attr]


def test_a_corrupted_download_is_caught_removed_and_fetched_again(
    fake_hub: FakeHub, tiny_model: Path, tmp_path: Path
) -> None:
    fake_hub.corrupt.add((MODEL, "model.safetensors"))
    dest = tmp_path / "m"
    with pytest.raises(hub.HubError) as err:
        hub.pull(MODEL, dest, progress=False)
    assert "model.safetensors: sha256 differs" in str(err.value)
    assert not (dest / "model.safetensors").exists() and hub.read_marker(dest) is None
    fake_hub.corrupt.clear()
    hub.pull(MODEL, dest, progress=False)
    assert sha256(dest / "model.safetensors") == sha256(tiny_model / "model.safetensors")


def test_token_revision_and_unreachable_errors_are_one_clear_line(
    fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(hub.HubError) as err:
        hub.pull("acme/private", tmp_path / "p", progress=False)
    assert "HF_TOKEN" in str(err.value)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    snap = hub.pull("acme/private", tmp_path / "p", progress=False)
    private = [r for r in fake_hub.requests if "acme/private" in r["path"]]
    assert snap.files and all(r["token"] for r in private[-3:])
    assert SECRET not in json.dumps(hub.read_marker(tmp_path / "p"))
    with pytest.raises(hub.HubError, match="no revision 'v9'"):
        hub.pull(MODEL, tmp_path / "r", revision="v9", progress=False)
    commit = fake_hub.repo("model", MODEL).commit
    assert hub.pull(MODEL, tmp_path / "c", revision=commit, progress=False).commit == commit
    with pytest.raises(hub.HubError, match="not found"):
        hub.pull("acme/nothing", tmp_path / "n", progress=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(hub.HubError) as err:
        hub.pull(MODEL, tmp_path / "u", progress=False)
    assert "127.0.0.1:9" in str(err.value) and SECRET not in str(err.value)
    assert "\n" not in str(err.value)


def test_offline_mode_uses_a_complete_copy_only(
    fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "m"
    hub.pull(MODEL, dest, progress=False)
    seen = len(fake_hub.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snap = hub.pull(MODEL, dest, progress=False)
    assert snap.offline and len(fake_hub.requests) == seen
    (dest / "tokenizer.json").write_text("{}", encoding="utf-8")  # damaged
    with pytest.raises(hub.HubError, match="offline: no complete copy"):
        hub.pull(MODEL, dest, progress=False)
    with pytest.raises(hub.HubError, match="offline"):
        hub.pull(MODEL, tmp_path / "empty", progress=False)
    assert len(fake_hub.requests) == seen


# --------------------------------------------------------------------------- the data recipe


def items(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text(encoding="utf-8"))


def answers(path: Path) -> list[str]:
    return [i["conversations"][1]["value"] for i in items(path)]


def test_the_oogiri_go_recipe(oogo: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    src, expected = oogo
    built = oogiri_go.build(src, tmp_path / "ds", n=100, prompt=DEFAULT_PROMPT)
    assert built.dropped == expected["dropped"]
    kept = answers(built.files["train"]) + answers(built.files["heldout"])
    assert sorted(kept) == sorted(expected["kept_texts"])
    assert built.train + built.heldout == len(expected["kept_texts"]) and built.heldout >= 1
    train_imgs = {i["image"][0] for i in items(built.files["train"])}
    held_imgs = {i["image"][0] for i in items(built.files["heldout"])}
    assert not train_imgs & held_imgs
    for item in items(built.files["train"]) + items(built.files["heldout"]):
        assert item["conversations"][0] == {"from": "human", "value": f"<image>\n{DEFAULT_PROMPT}"}
        picture = built.out_dir / item["image"][0]
        # stored exactly as the bot normalises an upload: loading it again changes nothing
        again = load(picture.read_bytes(), ImageSettings())
        assert picture.name == f"{sha256(picture)}.jpg" == f"{again.sha256}.jpg"
    assert sorted(p.name for p in (built.out_dir / "images").iterdir()) == sorted(
        Path(i).name for i in train_imgs | held_imgs
    )
    report = json.loads(built.files["report"].read_text(encoding="utf-8"))
    assert report["lines"]["types"] == {"I2T": 16, "T2T": 1, "IT2T": 1}
    assert report["examples"]["image_corrupt"][0]["line"] == 16
    assert report["kept"] == {"train": built.train, "heldout": built.heldout}
    lines = oogiri_go.summary_lines(built)
    assert any("image_corrupt" in line and "line 16" in line for line in lines)


def test_the_best_liked_jokes_come_first(oogo: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    src, expected = oogo
    best = expected["kept_texts"]  # file order is star order (20, 19, …, unstarred last)
    built = oogiri_go.build(src, tmp_path / "top", n=3, heldout=1, prompt="p")
    got = answers(built.files["train"]) + answers(built.files["heldout"])
    assert sorted(got) == sorted(best[:4]) and built.train == 3
    starred = oogiri_go.build(src, tmp_path / "star", n=100, min_star=15, heldout=1, prompt="p")
    got = answers(starred.files["train"]) + answers(starred.files["heldout"])
    assert sorted(got) == sorted(best[:6])  # stars 20..15
    assert starred.dropped["no_star"] == 1 and starred.dropped["below_min_star"] >= 3
    en = oogiri_go.build(src, tmp_path / "en", lang="en", n=5, heldout=0, prompt="p")
    assert answers(en.files["train"]) == ["It wasn't on purpose!"]
    with pytest.raises(oogiri_go.DataError, match="--lang"):
        oogiri_go.build(src, tmp_path / "x", lang="fr", prompt="p")
    with pytest.raises(oogiri_go.DataError, match="missing"):
        oogiri_go.build(tmp_path / "nothing", tmp_path / "y", prompt="p")
    assert not (tmp_path / "y").exists()


def test_a_picture_the_bot_refuses_is_never_trained_on(tmp_path: Path) -> None:
    import zipfile

    src = tmp_path / "src"
    src.mkdir()
    buf = io.BytesIO()
    Image.new("RGB", (1000, 20), (9, 9, 9)).save(buf, "PNG")  # aspect 50: the bot refuses it
    ok = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(ok, "JPEG")
    with zipfile.ZipFile(src / "images.zip", "w") as z:
        z.writestr("images/1.png", buf.getvalue())
        z.writestr("images/2.jpg", ok.getvalue())
    rows = [
        {"type": "I2T", "question": None, "image": "1", "text": "太长了", "star": 9},
        {"type": "I2T", "question": None, "image": "2", "text": "红色的", "star": 1},
    ]
    (src / "cn.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    built = oogiri_go.build(src, tmp_path / "out", n=5, heldout=0, prompt="p")
    assert built.dropped == {"image_bad_aspect": 1}
    assert answers(built.files["train"]) == ["红色的"]


# --------------------------------------------------------------------------- the commands


@pytest.fixture
def env(fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    bootstrap_env(tmp_path, monkeypatch)
    return {"tmp": tmp_path, "data": tmp_path / "data", "hub": fake_hub}


def registry() -> list[tuple[str, str]]:
    listed = json.loads(invoke("models", "list", "--json").stdout)
    return [(m["version"], m["status"]) for m in listed]


def test_model_pull_and_data_commands(env: dict[str, Any], tiny_model: Path) -> None:
    r = invoke("model", "pull")
    assert r.exit_code == 0, r.output
    pulled = json.loads(r.stdout)
    dest = env["data"] / "models" / "OpenGVLab--InternVL2-2B"
    assert pulled["path"] == str(dest) and pulled["version"].startswith("InternVL2-2B@")
    assert registry() == [(pulled["version"], "pulled")]
    assert "already registered" in invoke("model", "pull").output
    r = invoke("data", "oogiri-go", "--n", "4")
    assert r.exit_code == 0, r.output
    out = env["data"] / "datasets" / "oogiri-go-cn-4"
    assert "kept 4 training + 1 held-out" in r.output and "dropped" in r.output
    settings = apply_defaults(Settings(_env_file=None))
    assert settings.training.base_dataset == out / "train.json"
    r = invoke("model", "pull", "acme/nothing")
    assert r.exit_code == 1 and "not found" in r.output and "Traceback" not in r.output


def test_bootstrap_end_to_end_resumes_and_serves(
    env: dict[str, Any], tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_XTUNER", "rc")  # the first attempt dies in training
    r = invoke("train", "bootstrap", "--n", "6", "--epochs", "2", "-v")
    assert r.exit_code == 1, r.output
    assert "train failed" in r.output and "NCCL error" in r.output, r.output
    assert "run `oogiri train bootstrap` again" in r.output
    steps = read_state(Settings(_env_file=None))["steps"]
    assert set(steps) == {"pull", "data"}
    pictures = len(env["hub"].downloads("images.zip"))
    monkeypatch.delenv("FAKE_XTUNER")
    r = invoke("train", "bootstrap", "--n", "6", "--epochs", "2")
    assert r.exit_code == 0, r.output
    out = r.output
    assert "pull     skipped" in out and "data     skipped" in out and "train    done" in out
    assert len(env["hub"].downloads("images.zip")) == pictures  # nothing fetched again
    assert "trained on  6 Oogiri-GO jokes" in out and "ok sanity" in out
    versions = registry()
    assert versions[0][0].startswith("InternVL2-2B@") and versions[0][1] == "retired"
    assert versions[-1][0].startswith("ft-") and versions[-1][1] == "active"
    state = read_state(Settings(_env_file=None))["steps"]
    assert set(state) == {"pull", "data", "train", "promote"}
    # the run trained the pulled model on the built set with the seed's recipe
    run_dir = next((env["data"] / "training" / "runs").glob("run-*2"))
    config = (run_dir / "xtuner_config.py").read_text(encoding="utf-8")
    assert str(env["data"] / "models" / "OpenGVLab--InternVL2-2B") in config
    assert str(env["data"] / "datasets" / "oogiri-go-cn-6" / "train.json") in config
    card = json.loads((run_dir / "data" / "data_card.json").read_text(encoding="utf-8"))
    assert card["counts"]["train"] == 6 and card["origin"] == "oogiri-go"
    # bootstrap.env points at the merged model; no server ran, so nothing was swapped
    env_file = env["data"] / "training" / "bootstrap" / "bootstrap.env"
    lines = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
    model_dir = Path(lines["OOGIRI_ENGINE__MODEL"])
    assert (
        model_dir.parent.name == "models"
        and lines["OOGIRI_ENGINE__MODEL_VERSION"] == (versions[-1][0])
    )
    assert (model_dir / "configuration_internvl_chat.py").is_file()  # remote code restored
    assert not (env["tmp"] / "swaps.json").exists()
    # a third run has nothing left to do
    r = invoke("train", "bootstrap", "--n", "6", "--epochs", "2")
    assert r.exit_code == 0 and "train    skipped" in r.output
    assert len(registry()) == len(versions)
    # later ratings runs start from the bootstrapped base and data set
    later = apply_defaults(Settings(_env_file=None)).training
    assert later.base_model == env["data"] / "models" / "OpenGVLab--InternVL2-2B"
    # README's last step: the bot tells a joke with the bootstrapped model (transformers engine)
    photo = env["tmp"] / "cat.jpg"
    Image.new("RGB", (120, 90), (120, 80, 40)).save(photo, "JPEG")
    joke_env = {k: v for k, v in os.environ.items() if not k.startswith("OOGIRI_")}
    joke_env.update(lines)
    joke_env.update(
        OOGIRI_DATA_DIR=str(env["data"]),
        OOGIRI_ENGINE__NAME="transformers",
        OOGIRI_ENGINE__MAX_NEW_TOKENS="4",
        PYTHONPATH=str(ROOT),
    )
    proc = subprocess.run(
        [sys.executable, "-m", "bot.cli", "joke", "--json", str(photo)],
        env=joke_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    joke = json.loads(proc.stdout.strip().splitlines()[-1])
    assert joke["model_version"] == versions[-1][0]


def test_setup_check_without_a_venv_is_one_line(env: dict[str, Any], tmp_path: Path) -> None:
    r = invoke("train", "setup", "--check", "--venv", str(tmp_path / "nowhere"))
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.strip().count("\n") == 0 and "run `oogiri train setup`" in r.output


def test_one_lock_file_for_setup_and_the_image() -> None:
    from training.environment import DEEPSPEED, LOCK_FILE, PINS, read_lock

    lock = read_lock(LOCK_FILE)
    assert (*PINS, DEEPSPEED) == lock or set((*PINS, DEEPSPEED)) == set(lock)
    names = {line.split("==")[0] for line in lock}
    for need in ("xtuner", "scikit-image", "matplotlib", "opencv-python-headless", "timm",
                 "transformers", "mmengine", "bitsandbytes", "deepspeed", "pyarrow"):  # fmt: skip
        assert need in names, need
    assert not names & {"torch", "torchvision", "opencv-python", "triton"}
    assert all("==" in line for line in lock)  # every entry pinned
    dockerfile = (ROOT / "deploy" / "train.Dockerfile").read_text(encoding="utf-8")
    assert "COPY training/requirements-xtuner.txt" in dockerfile
    assert "pip install --no-deps -r" in dockerfile
    check = dockerfile.index("&& oogiri train setup --check --venv /opt/xtuner")
    assert check > dockerfile.index("pip install --no-deps -r")
    assert check > dockerfile.index("/opt/oogiri/bin/pip install .")
    r = invoke("train", "setup", "--print", "--venv", "/v")
    for pin in PINS:
        assert pin in r.stdout


def test_defaults_come_from_what_setup_and_bootstrap_made(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, data_dir=tmp_path / "data")
    assert apply_defaults(settings).training.xtuner_python is None  # nothing made yet
    python = tmp_path / "data" / "xtuner-venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\n")
    assert apply_defaults(settings).training.xtuner_python == python
    mine = Settings(_env_file=None, data_dir=tmp_path / "data", training={"xtuner_python": "/x"})
    assert apply_defaults(mine).training.xtuner_python == Path("/x")  # settings win


def test_pictures_are_found_by_id_and_a_language_folder_settles_a_clash(tmp_path: Path) -> None:
    import zipfile

    with zipfile.ZipFile(tmp_path / "images.zip", "w") as z:
        for name in ("images/1.jpg", "cn/2.jpg", "jp/2.jpg", "a/3.png", "b/3.png", "4.jpg"):
            z.writestr(name, name)
    with zipfile.ZipFile(tmp_path / "images.zip") as z:
        index = oogiri_go.ImageIndex(z, "cn")
        found = {
            k: (i.filename if (i := index.find(k)) else None)
            for k in ("1", "1.jpg", "images/1.jpg", "2", "3", "4", "5")
        }
    assert found == {
        "1": "images/1.jpg",
        "1.jpg": "images/1.jpg",
        "images/1.jpg": "images/1.jpg",
        "2": "cn/2.jpg",  # the language's own folder
        "3": None,  # two folders, neither the language's: not guessed
        "4": "4.jpg",
        "5": None,
    }


def test_a_fine_tune_that_fails_the_sanity_gate_is_not_promoted(
    env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OOGIRI_TRAINING__GATE_LANGUAGE", "en")  # the stand-in answers in Chinese
    r = invoke("train", "bootstrap", "--n", "6", "--epochs", "2")
    assert r.exit_code == EXIT_REJECTED, r.output  # as `train run`'s (test_review_exit.py)
    assert "bootstrap rejected" in r.output and "FAIL sanity" in r.output
    versions = registry()
    assert versions[0][1] == "active" and versions[-1][1] == "rejected"  # the base stays
    assert "train" not in read_state(Settings(_env_file=None))["steps"]  # a rerun trains again
    assert not (env["data"] / "training" / "bootstrap" / "bootstrap.env").exists()
