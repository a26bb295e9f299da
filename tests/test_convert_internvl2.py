"""``oogiri dev convert-internvl2``: InternVL2 (InternVLChatModel) folder → transformers' InternVL.

The converted model must compute what the original architecture computes: tests/
internvl2_reference.py is an independent reference written from the architecture's definition.
Weights are random but lively, so that a wrong mapping shows in the logits; the mutation tests
prove that it does for each mapping that could plausibly go wrong.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sentencepiece
import torch
from internvl2_reference import (
    IMAGENET_TOL,
    MATCH,
    MISMATCH,
    TEXTS,
    VARIANTS,
    converted_logits,
    make_source,
    max_diff,
    pixels_for,
    prompt_ids,
    ref_logits,
    slow_encode,
)
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import bot.engines.internvl.convert_internvl2 as conv
from bot.engines.internvl.tinymodel import (
    INTERNVL2_ADDED,
    make_tiny_model,
    train_sentencepiece,
    write_sentencepiece_tokenizer,
)

# XTuner 0.2.0's InternVL + InternLM2 training text (see tests/engines/test_chat_template.py).
XTUNER_SYSTEM = (
    "<|im_start|>system\nYou are an AI assistant whose name is InternLM (书生·浦语).<|im_end|>"
)
XTUNER_USER = "<|im_start|>user\n{input}<|im_end|><|im_start|>assistant\n"


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def source(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_source(tmp_path_factory.mktemp("src") / request.param, request.param)


@pytest.fixture(scope="module")
def iv2_2b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_source(tmp_path_factory.mktemp("src") / "internvl2-2b", "internvl2-2b")


@pytest.fixture(scope="module")
def reference_2b(iv2_2b: Path) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    ids, ctx = prompt_ids(iv2_2b)
    pixels = pixels_for()
    return ids, pixels, ref_logits(iv2_2b, ids, pixels, ctx)


@pytest.fixture(scope="module")
def converted_2b(iv2_2b: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return conv.convert_internvl2(iv2_2b, tmp_path_factory.mktemp("dst") / "hf")


# --------------------------------------------------------------------------- equivalence


def test_converted_model_computes_the_original_architecture(source: Path, tmp_path: Path) -> None:
    dst = conv.convert_internvl2(source, tmp_path / "hf", shard_bytes=200_000)  # several shards
    assert len(list(dst.glob("model-*-of-*.safetensors"))) > 1
    ids, ctx = prompt_ids(source)
    pixels = pixels_for()
    expected = ref_logits(source, ids, pixels, ctx)
    got = converted_logits(dst, ids, pixels)
    assert got.shape == expected.shape
    assert expected.std() > 0.5  # lively: the logits are not all about the same
    assert max_diff(got, expected) < MATCH


def _swap_targets(monkeypatch: pytest.MonkeyPatch, a: str, b: str) -> None:
    original = conv.map_tensor

    def swapped(name: str, tensor: Any, shapes: Any) -> list[tuple[str, Any]]:
        out = []
        for target, t in original(name, tensor, shapes):
            if a in target:
                target = target.replace(a, b)
            elif b in target:
                target = target.replace(b, a)
            out.append((target, t))
        return out

    monkeypatch.setattr(conv, "map_tensor", swapped)


def _naive_wqkv(wqkv: Any, shapes: Any) -> tuple[Any, Any, Any]:
    q_rows = shapes.heads * shapes.head_dim
    kv_rows = shapes.kv_heads * shapes.head_dim
    return wqkv[:q_rows], wqkv[q_rows : q_rows + kv_rows], wqkv[q_rows + kv_rows :]


def _theta(value: float) -> Callable[[dict[str, Any]], dict[str, Any]]:
    original = conv.rope_parameters

    def wrong(llm: dict[str, Any]) -> dict[str, Any]:
        return {**original(llm), "rope_theta": value}

    return wrong


def _no_scaling(llm: dict[str, Any]) -> dict[str, Any]:
    return {"rope_type": "default", "rope_theta": float(llm["rope_theta"])}


MUTATIONS: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    "wqkv split as [q | k | v]": lambda mp: mp.setattr(conv, "split_wqkv", _naive_wqkv),
    "vision qkv as k, q, v": lambda mp: mp.setattr(
        conv, "split_vision_qkv", lambda t: (t.chunk(3)[1], t.chunk(3)[0], t.chunk(3)[2])
    ),
    "ls1/ls2 swapped": lambda mp: _swap_targets(mp, "lambda_1", "lambda_2"),
    "attention/ffn norms swapped": lambda mp: _swap_targets(
        mp, "input_layernorm", "post_attention_layernorm"
    ),
    "vision norms swapped": lambda mp: _swap_targets(mp, "layernorm_before", "layernorm_after"),
    "w1/w3 swapped": lambda mp: _swap_targets(mp, "gate_proj", "up_proj"),
    "rope_theta not carried": lambda mp: mp.setattr(conv, "rope_parameters", _theta(10000.0)),
    "dynamic NTK dropped": lambda mp: mp.setattr(conv, "rope_parameters", _no_scaling),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_a_wrong_mapping_is_caught(
    mutation: str,
    iv2_2b: Path,
    reference_2b: tuple[list[int], torch.Tensor, torch.Tensor],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The equivalence test is sharp: each plausible mapping mistake moves the logits."""
    MUTATIONS[mutation](monkeypatch)
    ids, pixels, expected = reference_2b
    dst = conv.convert_internvl2(iv2_2b, tmp_path / "broken")
    assert max_diff(converted_logits(dst, ids, pixels), expected) > MISMATCH


def test_pixel_shuffle_order_matters(
    iv2_2b: Path, converted_2b: Path, reference_2b: tuple[list[int], torch.Tensor, torch.Tensor]
) -> None:
    """The converted model matches pixel shuffle v2, and v1's token order would be caught."""
    ids, pixels, expected = reference_2b
    ctx = json.loads((iv2_2b / "added_tokens.json").read_text())["<IMG_CONTEXT>"]
    v1 = ref_logits(iv2_2b, ids, pixels, ctx, version="v1")
    got = converted_logits(converted_2b, ids, pixels)
    assert max_diff(got, expected) < MATCH and max_diff(got, v1) > MISMATCH


# --------------------------------------------------------------------------- folder and config


def test_converted_folder_layout_and_config(iv2_2b: Path, converted_2b: Path) -> None:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(converted_2b, local_files_only=True)
    assert cfg.model_type == "internvl" and cfg.architectures == [
        "InternVLForConditionalGeneration"
    ]
    text = cfg.text_config
    assert text.model_type == "llama" and text.vocab_size == 1024
    assert text.architectures == ["LlamaForCausalLM"]  # LMDeploy's text-model lookup
    assert text.rope_parameters["rope_type"] == "dynamic" and text.rope_parameters["factor"] == 2.0
    assert text.rope_parameters["rope_theta"] == 1000000
    assert (text.num_attention_heads, text.num_key_value_heads, text.head_dim) == (4, 2, 16)
    added = json.loads((iv2_2b / "added_tokens.json").read_text())
    assert cfg.image_token_id == added["<IMG_CONTEXT>"] and cfg.image_seq_length == 256
    assert cfg.downsample_ratio == 0.5 and cfg.vision_config.use_qk_norm is False
    pre = json.loads((converted_2b / "preprocessor_config.json").read_text())
    assert pre["size"] == {"height": 448, "width": 448} and pre["crop_to_patches"] is True
    assert (pre["min_patches"], pre["max_patches"]) == (1, 12)
    generation = json.loads((converted_2b / "generation_config.json").read_text())
    assert added.get("<|im_end|>") is None  # InternLM2's own piece, not an InternVL addition
    marker = json.loads((converted_2b / "oogiri-model.json").read_text())
    assert marker["version"] == "internvl2-tiny-spm-random-7" and marker["layout"] == "hf"
    assert marker["converted_from"] == str(iv2_2b.resolve())
    sp = sentencepiece.SentencePieceProcessor(model_file=str(iv2_2b / "tokenizer.model"))
    assert sp.piece_to_id("<|im_end|>") in generation["eos_token_id"]


def test_internvl_processor_accepts_the_converted_tokenizer(
    converted_2b: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LMDeploy serves this layout through transformers' InternVLProcessor, which reads the image
    and video tokens off the tokenizer (the device failed with "no attribute video_token")."""
    from transformers import AutoConfig, AutoTokenizer, ProcessorMixin
    from transformers.models.internvl.processing_internvl import InternVLProcessor

    tokenizer = AutoTokenizer.from_pretrained(converted_2b, local_files_only=True)
    # ProcessorMixin's own checks need torchvision's video processor; the reads under test don't.
    monkeypatch.setattr(ProcessorMixin, "__init__", lambda self, *a, **k: None)
    processor = InternVLProcessor(image_processor=None, tokenizer=tokenizer, image_seq_length=256)
    cfg = AutoConfig.from_pretrained(converted_2b, local_files_only=True)
    assert processor.image_token_id == cfg.image_token_id
    assert tokenizer.decode(processor.image_token_ids) == "<IMG_CONTEXT><img></img>"
    # InternVL2 has no video token: none is added past the model's embedding rows
    assert len(tokenizer) <= cfg.text_config.vocab_size
    assert processor.multimodal_pattern.match("<IMG_CONTEXT>").lastgroup == "image"


def test_autoprocessor_loads_the_converted_folder_where_torchvision_exists(
    converted_2b: Path,
) -> None:
    pytest.importorskip("torchvision")
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(converted_2b, local_files_only=True)
    assert type(processor).__name__ == "InternVLProcessor"


def test_bfloat16_stays_bfloat16(iv2_2b: Path, tmp_path: Path) -> None:
    src = tmp_path / "bf16"
    shutil.copytree(iv2_2b, src)
    sd = load_file(str(src / "model.safetensors"))
    save_file({k: t.to(torch.bfloat16) for k, t in sd.items()}, str(src / "model.safetensors"))
    dst = conv.convert_internvl2(src, tmp_path / "hf")
    out = load_file(str(dst / "model.safetensors"))
    assert {t.dtype for t in out.values()} == {torch.bfloat16}
    assert sum(t.numel() for t in out.values()) == sum(t.numel() for t in sd.values())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.update(ps_version="v1"), "pixel shuffle v2"),
        (
            lambda c: c["llm_config"].update(
                architectures=["Qwen2ForCausalLM"], model_type="qwen2"
            ),
            "InternLM2",
        ),
        (lambda c: c["llm_config"].update(rope_scaling={"type": "yarn", "factor": 2.0}), "yarn"),
        (lambda c: c.update(use_thumbnail=False), "thumbnail"),
    ],
)
def test_refuses_what_it_cannot_represent(
    iv2_2b: Path, tmp_path: Path, change: Callable[[dict[str, Any]], None], message: str
) -> None:
    src = tmp_path / "src"
    shutil.copytree(iv2_2b, src)
    cfg = json.loads((src / "config.json").read_text())
    change(cfg)
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(conv.ConversionError, match=message):
        conv.convert_internvl2(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists() and not list(tmp_path.glob(".dst*"))


def test_unknown_or_missing_tensors_fail(iv2_2b: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(iv2_2b, src)
    sd = load_file(str(src / "model.safetensors"))
    save_file({**sd, "vision_model.extra.weight": torch.zeros(2)}, str(src / "model.safetensors"))
    with pytest.raises(conv.ConversionError, match=r"unknown tensor 'vision_model\.extra\.weight'"):
        conv.convert_internvl2(src, tmp_path / "a")
    del sd["language_model.model.layers.1.ffn_norm.weight"]
    save_file(sd, str(src / "model.safetensors"))
    with pytest.raises(conv.ConversionError, match="lacks 1 tensors"):
        conv.convert_internvl2(src, tmp_path / "b")


# --------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("dummy_prefix", [True, False])
def test_fast_tokenizer_equals_internlm2_sentencepiece(tmp_path: Path, dummy_prefix: bool) -> None:
    model = train_sentencepiece(add_dummy_prefix=dummy_prefix)
    write_sentencepiece_tokenizer(tmp_path, model, 1024)
    tok = conv.build_tokenizer(tmp_path, {"llm_config": {"vocab_size": 1024}}, "{{ bos_token }}")
    sp = sentencepiece.SentencePieceProcessor(model_proto=model)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    added = {v["content"]: int(k) for k, v in cfg["added_tokens_decoder"].items()}
    assert len(tok) == 1024 and all(tok.convert_tokens_to_ids(t) == i for t, i in added.items())
    assert added["<IMG_CONTEXT>"] == sp.get_piece_size() + INTERNVL2_ADDED.index("<IMG_CONTEXT>")
    for text in TEXTS:
        assert tok(text, add_special_tokens=False)["input_ids"] == slow_encode(sp, text, added), (
            text
        )
        if not re.search("|".join(map(re.escape, added)), text):
            ids = sp.encode(text)
            assert tok.decode(ids) == sp.decode(ids), text
    assert tok("x")["input_ids"][0] == 1  # InternLM2 adds BOS


def test_tokenizer_refuses_conflicting_ids(iv2_2b: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(iv2_2b, src)
    added = json.loads((src / "added_tokens.json").read_text())
    added["<img>"] += 100
    (src / "added_tokens.json").write_text(json.dumps(added))
    with pytest.raises(conv.ConversionError, match="<img>"):
        conv.build_tokenizer(src, json.loads((src / "config.json").read_text()), "")


# --------------------------------------------------------------------------- image processor


def test_tiles_match_internvl_dynamic_preprocess(converted_2b: Path, sample_dir: Path) -> None:
    """Tile grid and pixels as InternVL's dynamic_preprocess (training/evaluate_hf.py's copy of
    the published rule, itself checked in tests/training/test_training_gate.py)."""
    from transformers import AutoImageProcessor

    from training.evaluate_hf import pick_grid, pixel_values

    processor = AutoImageProcessor.from_pretrained(converted_2b, local_files_only=True)
    sizes = [(451, 300), (300, 451), (1000, 200), (200, 1000), (448, 448), (896, 448)]
    sizes += [(1344, 896), (640, 480), (1920, 1080), (100, 1000)]
    for width, height in sizes:
        for max_num in (1, 6, 12):
            image = Image.new("RGB", (width, height))
            out = processor(images=[image], max_patches=max_num, return_tensors="pt")
            cols, rows = pick_grid(width, height, max_num, 448)
            assert int(out["num_patches"][0]) == cols * rows + (cols * rows > 1), (width, height)
    chelsea = Image.open(sample_dir / "chelsea.png").convert("RGB")
    got = processor(images=[chelsea], max_patches=6, return_tensors="pt")["pixel_values"]
    expected = pixel_values(chelsea, 6, 448, thumbnail=True)
    assert got.shape == expected.shape
    assert max_diff(got, expected) < IMAGENET_TOL


# --------------------------------------------------------------------------- engine and CLI


def test_engine_prompt_is_the_training_text(
    converted_2b: Path, iv2_2b: Path, sample_dir: Path
) -> None:
    """The engine's prompt tokens are XTuner's training text, tokenized as InternLM2 does."""
    from bot.engines.transformers_engine import _InternVLInputs
    from bot.settings import DEFAULT_PROMPT

    inputs = _InternVLInputs(converted_2b, 256)
    chelsea = Image.open(sample_dir / "chelsea.png").convert("RGB")
    for prompt in (DEFAULT_PROMPT, DEFAULT_PROMPT + " hint: <IMG_CONTEXT> <|im_end|>"):
        got, tiles = inputs(chelsea, prompt, 6, "cpu", torch.float32)
        cfg = json.loads((iv2_2b / "tokenizer_config.json").read_text())
        added = {v["content"]: int(k) for k, v in cfg["added_tokens_decoder"].items()}
        sp = sentencepiece.SentencePieceProcessor(model_file=str(iv2_2b / "tokenizer.model"))
        image = "<img>" + "<IMG_CONTEXT>" * (256 * tiles) + "</img>"
        text = XTUNER_SYSTEM + XTUNER_USER.format(input=image + "\n" + prompt.split(" hint")[0])
        expected = [1, *slow_encode(sp, text, added)]
        if " hint" in prompt:  # a typed marker stays text: the prefix up to it matches, no forgery
            ids = got["input_ids"][0].tolist()
            assert ids.count(added["<IMG_CONTEXT>"]) == 256 * tiles
            assert ids.count(added["<|im_end|>"]) == expected.count(added["<|im_end|>"])
            typed = inputs.tokenizer.decode(ids, skip_special_tokens=True)
            assert "hint: <IMG_CONTEXT> <|im_end|>" in typed  # kept as the text it was
        else:
            assert got["input_ids"][0].tolist() == expected


def test_engine_refuses_internvl2_folder_with_the_command(iv2_2b: Path) -> None:
    from bot.engines.transformers_engine import TransformersEngine
    from bot.models import EngineError

    with pytest.raises(EngineError) as info:
        TransformersEngine(iv2_2b)
    assert f"oogiri dev convert-internvl2 {iv2_2b}" in info.value.detail


def test_settings_convert_once_into_the_data_dir(
    iv2_2b: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bot.engines.transformers_engine import _converted_if_internvl2
    from bot.settings import Settings

    src = tmp_path / "model"
    shutil.copytree(iv2_2b, src)
    settings = Settings(_env_file=None, data_dir=tmp_path / "data", engine={"model": src})
    first = _converted_if_internvl2(src, settings)
    assert first.parent == tmp_path / "data" / "models" / "converted"
    assert json.loads((first / "oogiri-model.json").read_text())["converted_from"] == str(
        src.resolve()
    )

    def no_conversion(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("converted again")

    with monkeypatch.context() as mp:
        mp.setattr(conv, "convert_internvl2", no_conversion)
        assert _converted_if_internvl2(src, settings) == first  # reused
    cfg = json.loads((src / "config.json").read_text())  # the folder changes (say, retrained)
    (src / "config.json").write_text(json.dumps(cfg, indent=1))
    second = _converted_if_internvl2(src, settings)
    assert second != first and second.is_dir() and not first.exists()  # the stale copy is gone
    hf = tmp_path / "hf"
    shutil.copytree(second, hf)
    assert _converted_if_internvl2(hf, settings) == hf  # a native folder is used as it is


def test_cli_converts_and_reports_errors(iv2_2b: Path, tmp_path: Path) -> None:
    from bot.cli import build_cli

    cli = build_cli()  # the dev commands come from the transformers engine plugin

    runner = CliRunner()
    ok = runner.invoke(cli, ["dev", "convert-internvl2", str(iv2_2b), str(tmp_path / "hf")])
    assert ok.exit_code == 0, ok.output
    assert "converted" in ok.output and (tmp_path / "hf" / "model.safetensors").is_file()
    again = runner.invoke(cli, ["dev", "convert-internvl2", str(iv2_2b), str(tmp_path / "hf")])
    assert again.exit_code == 2 and "exists" in again.output
    forced = runner.invoke(
        cli, ["dev", "convert-internvl2", "--force", str(iv2_2b), str(tmp_path / "hf")]
    )
    assert forced.exit_code == 0, forced.output
    wrong = runner.invoke(
        cli, ["dev", "convert-internvl2", str(tmp_path / "hf"), str(tmp_path / "x")]
    )
    assert wrong.exit_code == 2 and "not an InternVL2" in " ".join(wrong.output.split())


OOGIRI = shutil.which("oogiri", path=str(Path(sys.executable).parent)) or "oogiri"


def _oogiri(args: list[str], data_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OOGIRI_")}
    clean |= {"OOGIRI_DATA_DIR": str(data_dir), **env}
    return subprocess.run(
        [OOGIRI, *args], capture_output=True, text=True, timeout=300, env=clean, cwd=data_dir.parent
    )


def test_oogiri_joke_on_a_converted_and_an_internvl2_folder(
    tmp_path: Path, sample_dir: Path
) -> None:
    """As a user would: convert with the console script and tell a joke; then auto-convert."""
    src = make_tiny_model(
        tmp_path / "InternVL2-tiny", layout="internvl2", tokenizer="sentencepiece", seed=5
    )
    data = tmp_path / "data"
    data.mkdir()
    converted = _oogiri(["dev", "convert-internvl2", str(src), str(tmp_path / "hf")], data)
    assert converted.returncode == 0, converted.stderr
    chelsea = str(sample_dir / "chelsea.png")
    for model in (tmp_path / "hf", src):
        # --local: this model, loaded here, even if an `oogiri serve` runs on this machine
        result = _oogiri(
            ["joke", "--local", "--json", chelsea], data, OOGIRI_ENGINE__MODEL=str(model)
        )
        assert result.returncode == 0, result.stderr
        joke = json.loads(result.stdout)
        assert joke["image"] == chelsea and joke["engine"] == "transformers"
        assert joke["model_version"] == "internvl2-tiny-spm-random-5" and joke["joke_id"] > 0
        assert isinstance(joke["text"], str)
    assert len(list((data / "models" / "converted").iterdir())) == 1
