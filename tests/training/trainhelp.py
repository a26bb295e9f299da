"""Helpers of the training tests: real photos (crops of scikit-image's sample images) and jokes
and votes seeded through the Store API."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner, Result

import training.cli as tcli
from bot.models import Joke, NormalizedImage
from bot.settings import DEFAULT_PROMPT
from bot.store import Store

PHOTOS = ("chelsea.png", "astronaut.png", "coffee.png", "rocket.jpg", "motorcycle_left.png")
FAKES = Path(__file__).parent / "fakes"
# what the fake Hugging Face Hub (conftest.py's ``fake_hub``) serves
MODEL = "OpenGVLab/InternVL2-2B"
DATA = "zhongshsh/CLoT-Oogiri-GO"
SECRET = "hf_s3cret_token_for_tests"


def skimage_dir() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data"


def photo(index: int, size: int = 96) -> NormalizedImage:
    """A distinct real photo per index: a crop of one of scikit-image's photos, as JPEG."""
    name = PHOTOS[index % len(PHOTOS)]
    img = Image.open(skimage_dir() / name).convert("RGB")
    step = index // len(PHOTOS)
    left = (step * 37) % max(img.width - size * 2, 1)
    top = (step * 23) % max(img.height - size * 2, 1)
    crop = img.crop((left, top, left + size * 2, top + size * 2)).resize((size, size))
    buf = io.BytesIO()
    crop.save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    return NormalizedImage.of(data, size, size, "PNG")


async def add_joke(
    store: Store,
    image: NormalizedImage,
    text: str,
    user: str = "test:alice",
    prompt: str = DEFAULT_PROMPT,
    channel: str = "test",
    version: str = "base-v0",
) -> Joke:
    fields = dict(
        channel=channel,
        user_id=user,
        chat_id=None,
        prompt=prompt,
        text=text,
        model_version=version,
        engine="instant",
        params={"max_new_tokens": 64},
    )
    return await store.add_joke(image, **fields)


async def vote(store: Store, joke_id: int, up: int = 0, down: int = 0, prefix: str = "v") -> None:
    for i in range(up):
        await store.rate(joke_id, f"{prefix}-up-{i}", 1, "test")
    for i in range(down):
        await store.rate(joke_id, f"{prefix}-down-{i}", -1, "test")


# --------------------------------------------------------------------------- a training rig


def fake_base_model(path: Path, max_dynamic_patch: int = 1) -> Path:
    """A base-model folder shaped like InternVL2-2B's (config, remote code, tokenizer, marker)."""
    import json

    path.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["InternVLChatModel"],
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig"},
        "force_image_size": 448,
        "downsample_ratio": 0.5,
        "max_dynamic_patch": max_dynamic_patch,
        "use_thumbnail": True,
        "vision_config": {"patch_size": 14, "image_size": 448},
        "llm_config": {"max_position_embeddings": 32768},
    }
    (path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    (path / "model.safetensors").write_bytes(b"base weights")
    (path / "tokenizer_config.json").write_text("{}", encoding="utf-8")
    for name in ("configuration_internvl_chat.py", "modeling_internvl_chat.py", "conversation.py"):
        (path / name).write_text(f"# {name}\n", encoding="utf-8")
    marker = {"version": "base-v0", "layout": "internvl2", "tiny": True}
    (path / "oogiri-model.json").write_text(json.dumps(marker), encoding="utf-8")
    return path


def fake_venv(path: Path) -> Path:
    """bin/python (this interpreter, seeing the stand-in ``xtuner`` package) and bin/xtuner."""
    import sys

    bin_dir = path / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    python = bin_dir / "python"
    python.write_text(
        f'#!/bin/sh\nPYTHONPATH="{FAKES / "site"}" exec "{sys.executable}" "$@"\n', encoding="utf-8"
    )
    xtuner = bin_dir / "xtuner"
    xtuner.write_text(
        f'#!/bin/sh\nexec "{sys.executable}" "{FAKES / "fake_xtuner.py"}" "$@"\n', encoding="utf-8"
    )
    python.chmod(0o755)
    xtuner.chmod(0o755)
    return python


async def seed_ratings(store: Store, n: int = 8) -> list[Joke]:
    """n well-rated jokes on n photos, plus one thumbs-down joke."""
    jokes = []
    for i in range(n):
        j = await add_joke(store, photo(i), f"第{i}个笑话：猫才是这个家真正的主人。")
        await vote(store, j.id, up=2 + i % 3)
        jokes.append(j)
    bad = await add_joke(store, photo(n), "不好笑的笑话")
    await vote(store, bad.id, down=2)
    return jokes


def fake_eval_python(path: Path) -> Path:
    """A "python" for the evaluator that runs the stand-in evaluation instead of evaluate_hf.py."""
    import sys

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f'#!/bin/sh\nexec "{sys.executable}" "{FAKES / "fake_eval.py"}" "$@"\n', encoding="utf-8"
    )
    path.chmod(0o755)
    return path


def training_cli() -> typer.Typer:
    """The training plugin's commands on an app of their own, as ``oogiri`` registers them."""
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """oogiri (test)"""

    tcli.oogiri_register_commands(cli=app)
    return app


def invoke(*args: str) -> Result:
    return CliRunner().invoke(
        training_cli(), list(args), catch_exceptions=False, env={"COLUMNS": "200"}
    )


# --------------------------------------------------------------------------- command environments


def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No OOGIRI_/FAKE_ variable or launcher variable of the machine reaches a command."""
    for var in list(os.environ):
        if var.startswith(("OOGIRI_", "FAKE_")) or var in ("NNODES", "PORT", "NPROC_PER_NODE"):
            monkeypatch.delenv(var)


def _small_schedule(tmp_path: Path) -> dict[str, str]:
    """A one-sample batch and the stand-in swap: what every command test trains with."""
    return {
        "OOGIRI_DATA_DIR": str(tmp_path / "data"),
        "OOGIRI_STORE__URL": f"sqlite+aiosqlite:///{tmp_path / 'data' / 'oogiri.sqlite3'}",
        "OOGIRI_PLUGINS": "training",
        "OOGIRI_TRAINING__EVAL_PYTHON": str(fake_eval_python(tmp_path / "evalpy" / "python")),
        "OOGIRI_TRAINING__BATCH_SIZE": "1",
        "OOGIRI_TRAINING__ACCUMULATIVE_COUNTS": "1",
        "OOGIRI_TRAINING__WARMUP_RATIO": "0.2",
        "OOGIRI_TRAINING__PROMOTE_COMMAND": json.dumps(
            ["{python}", str(FAKES / "fake_swap.py"), "{model_dir}", "{version}"]
        ),
        "FAKE_SWAP_RECORD": str(tmp_path / "swaps.json"),
    }


def bootstrap_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, venv: bool = True) -> None:
    """`oogiri train bootstrap`'s environment in ``tmp_path`` (the hub is conftest's
    ``fake_hub``); ``venv=False``: no training venv set up yet."""
    monkeypatch.chdir(tmp_path)
    clean_env(monkeypatch)
    values = _small_schedule(tmp_path)
    if venv:
        values["OOGIRI_TRAINING__XTUNER_PYTHON"] = str(fake_venv(tmp_path / "venv"))
    for k, v in values.items():
        monkeypatch.setenv(k, v)


def train_run_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """`oogiri train run`'s environment in ``tmp_path``: the stand-in trainer, converter and
    evaluator, 1-2 answers held out, the offline path (the live A/B step: test_ab_live.py)."""
    monkeypatch.chdir(tmp_path)
    clean_env(monkeypatch)
    values = _small_schedule(tmp_path) | {
        "OOGIRI_TRAINING__BASE_MODEL": str(fake_base_model(tmp_path / "InternVL2-2B")),
        "OOGIRI_TRAINING__XTUNER_PYTHON": str(fake_venv(tmp_path / "venv")),
        "OOGIRI_TRAINING__MIN_EXAMPLES": "2",
        "OOGIRI_TRAINING__GATE_MIN_HELDOUT": "1",
        "OOGIRI_TRAINING__HELDOUT_FRACTION": "0.25",
        "OOGIRI_TRAINING__MAX_EPOCHS": "2",
        "OOGIRI_TRAINING__MAX_LENGTH": "1024",
        "OOGIRI_AB__ENABLED": "false",
    }
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    return {
        "db": values["OOGIRI_STORE__URL"],
        "swaps": tmp_path / "swaps.json",
        "tmp": tmp_path,
        "venv": tmp_path / "venv",
    }


def hub_downloads(hub: Any) -> list[dict[str, Any]]:
    """The file downloads among the requests ``hub`` (conftest's ``FakeHub``) answered."""
    return [r for r in hub.requests if r["method"] == "GET" and "/resolve/" in r["path"]]
