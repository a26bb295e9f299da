"""The InternVL2 (InternVLChatModel) layout that LMDeploy and XTuner load, with random weights."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from bot.engines.internvl.tiny_internvl2 import build_config, weight_shapes
from bot.engines.internvl.tinymodel import make_tiny_model


@pytest.fixture(scope="module")
def iv2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("iv2") / "m", layout="internvl2", seed=3)


def test_config_loads_through_remote_code_with_attribute_access(iv2: Path) -> None:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(iv2, trust_remote_code=True, local_files_only=True)
    assert type(cfg).__name__ == "InternVLChatConfig"
    # What LMDeploy reads (FIELD-NOTES): nested configs must be objects, not dicts.
    assert cfg.llm_config.hidden_size == 64 and cfg.llm_config.architectures == [
        "InternLM2ForCausalLM"
    ]
    assert cfg.vision_config.image_size == 448 and cfg.vision_config.patch_size == 14
    assert (cfg.downsample_ratio, cfg.ps_version, cfg.select_layer) == (0.5, "v2", -1)
    raw = json.loads((iv2 / "config.json").read_text())
    assert raw["architectures"] == ["InternVLChatModel"]
    assert raw["auto_map"]["AutoConfig"] == "configuration_internvl_chat.InternVLChatConfig"


def test_config_survives_a_pickle_round_trip_into_a_fresh_process(
    iv2: Path, tmp_path: Path
) -> None:
    """LMDeploy's mp executor (also tp > 1) pickles the config into a worker, which loads the
    remote code again and pickles it back. transformers then re-executes the module in place; new
    class objects made the worker die with "not the same object" (device, 2026-11-26)."""
    import pickle

    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(iv2, trust_remote_code=True)
    blob = tmp_path / "config.pkl"
    blob.write_bytes(pickle.dumps(cfg))
    worker = f"""
import pickle
from transformers import AutoConfig
from transformers.dynamic_module_utils import init_hf_modules
init_hf_modules()
cfg = pickle.loads(open({str(blob)!r}, "rb").read())
again = AutoConfig.from_pretrained({str(iv2)!r}, trust_remote_code=True)
back = pickle.loads(pickle.dumps(cfg))
assert type(again) is type(cfg) is type(back)
assert type(back.llm_config) is type(again.llm_config)
print("worker ok", back.llm_config.hidden_size)
"""
    done = subprocess.run(
        [sys.executable, "-c", worker], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == f"worker ok {cfg.llm_config.hidden_size}"


def test_weights_have_lmdeploy_names_and_shapes(iv2: Path) -> None:
    config = json.loads((iv2 / "config.json").read_text())
    expected = weight_shapes(config)
    with safe_open(iv2 / "model.safetensors", "pt") as f:
        got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert got == expected
    assert "language_model.output.weight" in got and "mlp1.3.weight" in got
    assert got["mlp1.1.weight"] == (64, 4 * 64)  # pixel shuffle ×0.5 → 4× vision width


def test_tokenizer_has_internvl_special_tokens(iv2: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(iv2, trust_remote_code=True, local_files_only=True)
    for special in ("<img>", "</img>", "<IMG_CONTEXT>", "<|im_start|>", "<|im_end|>"):
        ids = tok.encode(special, add_special_tokens=False)
        assert len(ids) == 1, special
    cfg = json.loads((iv2 / "config.json").read_text())
    assert cfg["llm_config"]["eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
    assert max(tok.get_vocab().values()) < cfg["llm_config"]["vocab_size"]


def test_full_size_matches_internvl2_2b_parameter_count() -> None:
    """2.206 B parameters, as measured for InternVL2-2B's shapes in FIELD-NOTES."""
    n = sum(math.prod(s) for s in weight_shapes(build_config("full")).values())
    assert 2.20e9 < n < 2.21e9


def test_seed_is_reproducible_and_marker_written(tmp_path: Path, iv2: Path) -> None:
    again = make_tiny_model(tmp_path / "again", layout="internvl2", seed=3)
    assert (again / "model.safetensors").read_bytes() == (iv2 / "model.safetensors").read_bytes()
    marker = json.loads((iv2 / "oogiri-model.json").read_text())
    assert marker["version"] == "internvl2-tiny-random-3" and marker["layout"] == "internvl2"


def test_cli_builds_layout_and_reports_bad_layout(tmp_path: Path) -> None:
    from bot.cli import build_cli

    cli = build_cli()  # the dev commands come from the transformers engine plugin

    ok = CliRunner().invoke(
        cli, ["dev", "make-tiny-model", str(tmp_path / "m"), "--layout", "internvl2"]
    )
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "m" / "configuration_internvl_chat.py").exists()
    bad = CliRunner().invoke(
        cli, ["dev", "make-tiny-model", str(tmp_path / "x"), "--layout", "nope"]
    )
    assert bad.exit_code == 2 and "unknown tiny-model layout" in bad.output


def test_tokenizer_config_loads_in_transformers_4(iv2: Path) -> None:
    """XTuner's transformers 4.48 loads the tokenizer too: no 5.x-only class or keys."""
    cfg = json.loads((iv2 / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "backend" not in cfg and not isinstance(cfg.get("extra_special_tokens"), list)
    assert {"<img>", "</img>", "<IMG_CONTEXT>"} <= set(cfg["additional_special_tokens"])
    assert cfg["chat_template"].startswith("{%- for message in messages")


def test_every_model_id_decodes_to_text(iv2: Path) -> None:
    """A random model samples any id: none may decode to nothing (that gave empty answers)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(iv2, trust_remote_code=True, local_files_only=True)
    vocab = json.loads((iv2 / "config.json").read_text())["llm_config"]["vocab_size"]
    assert len(tok) == vocab
    assert tok.decode([vocab - 1]) and tok.decode([vocab - 50, vocab - 2])
    # the pads are vocabulary, not added tokens (thousands of those make each load take minutes)
    added = json.loads((iv2 / "tokenizer.json").read_text())["added_tokens"]
    assert not [t for t in added if t["content"].startswith("<|pad")]
