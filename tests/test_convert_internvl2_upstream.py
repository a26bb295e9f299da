"""The converted model against OpenGVLab's own InternVL2 code, where it has been staged.

``python3 scripts/prepare_internvl_code.py`` extracts InternVL's remote code (modeling_*,
tokenization_internlm2*) from a local mirror into ``ext/internvl2-code/`` (git-ignored: OpenGVLab's
code, never committed here). Where it exists, this builds OpenGVLab's ``InternVLChatModel`` and
``InternLM2Tokenizer`` on the tiny source folders and checks that the converted folder (and the
project's own reference) agree with them; elsewhere it is skipped. It needs einops; timm and peft
are replaced by stand-ins while the code is imported where they are missing (only timm's DropPath,
an identity at inference, and names peft's LoRA wrapping would use are touched).
"""

from __future__ import annotations

import importlib
import json
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CODE = Path(__file__).resolve().parents[1] / "ext" / "internvl2-code"
if not (CODE / "modeling_internvl_chat.py").is_file():
    pytest.skip(
        "OpenGVLab's code is not staged (python3 scripts/prepare_internvl_code.py)",
        allow_module_level=True,
    )
pytest.importorskip("einops")

import internvl2_reference as ref  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import bot.engines.internvl.convert_internvl2 as conv  # noqa: E402

PACKAGE = "oogiri_upstream_internvl2"


@contextmanager
def _stand_ins() -> Iterator[None]:
    """timm's DropPath and peft's names, only for the import and only where they are missing."""
    added: list[str] = []
    if importlib.util.find_spec("timm") is None:

        class DropPath(torch.nn.Identity):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__()

        layers = types.ModuleType("timm.models.layers")
        layers.DropPath = DropPath  # type: ignore[attr-defined]
        for name, module in (
            ("timm", types.ModuleType("timm")),
            ("timm.models", types.ModuleType("timm.models")),
            ("timm.models.layers", layers),
        ):
            sys.modules[name] = module
            added.append(name)
    if importlib.util.find_spec("peft") is None:
        peft = types.ModuleType("peft")
        peft.LoraConfig = None  # type: ignore[attr-defined]
        peft.get_peft_model = None  # type: ignore[attr-defined]
        sys.modules["peft"] = peft
        added.append("peft")
    try:
        yield
    finally:
        for name in added:  # transformers probes these packages later: leave no fakes behind
            sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def upstream() -> types.ModuleType:
    package = types.ModuleType(PACKAGE)
    package.__path__ = [str(CODE)]
    sys.modules[PACKAGE] = package
    with _stand_ins():
        for name in (
            "configuration_internvl_chat",
            "modeling_internvl_chat",
            "tokenization_internlm2",
        ):
            setattr(package, name, importlib.import_module(f"{PACKAGE}.{name}"))
    return package


@pytest.mark.parametrize("variant", sorted(ref.VARIANTS))
def test_converted_equals_opengvlab_internvlchatmodel(
    variant: str, upstream: types.ModuleType, tmp_path: Path
) -> None:
    src = ref.make_source(tmp_path / "src", variant)
    raw = json.loads((src / "config.json").read_text())
    config = upstream.configuration_internvl_chat.InternVLChatConfig(**raw)
    model = upstream.modeling_internvl_chat.InternVLChatModel(config, use_flash_attn=False)
    model.load_state_dict(load_file(str(src / "model.safetensors")), strict=True)
    model.eval()
    ids, ctx = ref.prompt_ids(src)
    pixels = ref.pixels_for()
    model.img_context_token_id = ctx
    with torch.inference_mode():
        out = model(
            pixel_values=pixels,
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            image_flags=torch.ones(pixels.shape[0], 1, dtype=torch.long),
        )
    theirs = out.logits[0].float()
    dst = conv.convert_internvl2(src, tmp_path / "hf")
    assert ref.max_diff(ref.converted_logits(dst, ids, pixels), theirs) < ref.MATCH
    assert (
        ref.max_diff(ref.ref_logits(src, ids, pixels, ctx), theirs) < ref.MATCH
    )  # the reference, checked


def test_fast_tokenizer_equals_opengvlab_internlm2tokenizer(
    upstream: types.ModuleType, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    src = ref.make_source(tmp_path / "src", "internvl2-2b")
    slow = upstream.tokenization_internlm2.InternLM2Tokenizer.from_pretrained(str(src))
    fast = AutoTokenizer.from_pretrained(conv.convert_internvl2(src, tmp_path / "hf"))
    assert len(slow) == len(fast) == 1024
    for text in ref.TEXTS:
        assert fast(text)["input_ids"] == slow(text)["input_ids"], text
