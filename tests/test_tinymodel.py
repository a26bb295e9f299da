"""The tiny random InternVL model: real files that transformers loads natively, built in seconds."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from bot.engines.internvl.tinymodel import IMAGE_TOKENS, MARKER, make_tiny_model, read_marker
from bot.settings import DEFAULT_PROMPT


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    import transformers  # noqa: F401  (imports are not what the build time measures)

    out = tmp_path_factory.mktemp("tiny")
    start = time.perf_counter()
    path = make_tiny_model(out / "model", seed=0)
    return path, time.perf_counter() - start


@pytest.fixture(scope="module")
def tiny(built: tuple[Path, float]) -> Path:
    return built[0]


def test_builds_in_seconds_with_every_file(built: tuple[Path, float]) -> None:
    path, seconds = built
    assert seconds < 15, f"building the tiny model took {seconds:.1f} s"
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "preprocessor_config.json",
        "processor_config.json",
        MARKER,
    ):
        assert (path / name).is_file(), name
    assert (path / "model.safetensors").stat().st_size < 20 * 1024 * 1024


def test_config_is_transformers_native_internvl(tiny: Path) -> None:
    config = json.loads((tiny / "config.json").read_text())
    assert config["architectures"] == ["InternVLForConditionalGeneration"]
    assert config["model_type"] == "internvl"
    assert config["text_config"]["model_type"] == "qwen2"
    assert config["text_config"]["num_hidden_layers"] == 2
    assert config["text_config"]["hidden_size"] == 64
    assert config["vision_config"]["hidden_size"] == 64
    assert 800 <= config["text_config"]["vocab_size"] <= 1100
    assert config["image_seq_length"] == 256
    assert json.loads((tiny / "processor_config.json").read_text())["image_seq_length"] == 256


def test_marker_names_the_version(tiny: Path) -> None:
    assert read_marker(tiny) == {
        "version": "tiny-random-0",
        "layout": "hf",
        "seed": 0,
        "tiny": True,
    }
    assert read_marker(tiny / "nowhere") is None


def test_loads_with_auto_classes(tiny: Path) -> None:
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModelForImageTextToText,
        AutoTokenizer,
        InternVLForConditionalGeneration,
    )

    config = AutoConfig.from_pretrained(tiny, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(tiny, local_files_only=True)
    assert isinstance(model, InternVLForConditionalGeneration)
    assert model.config.image_token_id == config.image_token_id
    assert sum(p.numel() for p in model.parameters()) < 2_000_000

    tok = AutoTokenizer.from_pretrained(tiny, local_files_only=True)
    assert tok.is_fast
    for attribute, text in IMAGE_TOKENS.items():
        assert getattr(tok, attribute) == text
        assert len(tok.encode(text, add_special_tokens=False)) == 1, text
    assert tok.convert_tokens_to_ids("<IMG_CONTEXT>") == config.image_token_id
    assert tok.eos_token == "<|im_end|>"
    for text in (DEFAULT_PROMPT, "Plot twist: the cat was the photographer.", "没见过的字🙂"):
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    # The default prompt is in the built-in corpus, so BPE learned it as a few tokens.
    assert len(tok.encode(DEFAULT_PROMPT, add_special_tokens=False)) <= 6

    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]},
    ]
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == "<|im_start|>user\n<IMG_CONTEXT>\nhi<|im_end|>\n<|im_start|>assistant\n"

    processor = AutoImageProcessor.from_pretrained(tiny, local_files_only=True)
    assert processor.crop_to_patches is True
    assert processor.size["height"] == processor.size["width"] == 448


def test_image_processor_tiles_by_max_patches(tiny: Path) -> None:
    from PIL import Image
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(tiny, local_files_only=True)
    wide = Image.new("RGB", (896, 448), "orange")
    counts = {
        n: int(processor(images=[wide], max_patches=n, return_tensors="pt")["num_patches"][0])
        for n in (1, 2, 12)
    }
    # 2:1 picture: one tile; or a 2×1 grid plus InternVL's thumbnail tile.
    assert counts == {1: 1, 2: 3, 12: 3}
    square = Image.new("RGB", (1000, 1000), "teal")
    out = processor(images=[square], max_patches=4, return_tensors="pt")
    assert tuple(out["pixel_values"].shape) == (5, 3, 448, 448)


def test_seed_decides_the_weights(tmp_path: Path, tiny: Path) -> None:
    from safetensors.torch import load_file

    again = make_tiny_model(tmp_path / "again", seed=0)
    other = make_tiny_model(tmp_path / "other", seed=1)
    base = load_file(tiny / "model.safetensors")
    same = load_file(again / "model.safetensors")
    different = load_file(other / "model.safetensors")
    assert base.keys() == same.keys() == different.keys()
    assert all((base[k] == same[k]).all() for k in base)
    assert any(not (base[k] == different[k]).all() for k in base)
    assert read_marker(other)["version"] == "tiny-random-1"


def test_generates_from_a_real_photo(tiny: Path) -> None:
    import skimage
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    model = AutoModelForImageTextToText.from_pretrained(tiny, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(tiny, local_files_only=True)
    processor = AutoImageProcessor.from_pretrained(tiny, local_files_only=True)
    photo = Image.open(Path(skimage.__file__).parent / "data" / "astronaut.png").convert("RGB")
    pixels = processor(images=[photo], max_patches=1, return_tensors="pt")
    text = "<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * 256 + "</img>\nhi<|im_end|>\n"
    text += "<|im_start|>assistant\n"
    ids = tok(text, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(
            **ids, pixel_values=pixels["pixel_values"], max_new_tokens=8, do_sample=False
        )
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_unknown_layout_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="layout"):
        make_tiny_model(tmp_path / "x", layout="gguf")
    assert not (tmp_path / "x").exists()
