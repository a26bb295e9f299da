"""The learning loop's pretrained tiny base (issue 15 C): pretrained on CPU in transformers' native
layout, written back in InternVL2's layout for XTuner and LMDeploy. A wrong inverse of the
converter's renames or of InternLM2's fused ``wqkv`` would serve a different model than the one
the proxy measured."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # bench/ is not an installed package
    sys.path.insert(0, str(ROOT))

pytest.importorskip("torch")
pytest.importorskip("transformers")

from bench.learning_loop.audience import KEYWORDS, NEUTRAL_ANSWERS, pretrain_items  # noqa: E402


def test_pretrain_items_name_the_picture_at_the_chosen_share() -> None:
    pictures = [Path(f"pretrain-{i:03d}--{src}.png") for i, src in enumerate(sorted(KEYWORDS) * 8)]
    items = pretrain_items(pictures, per_picture=25, p_named=0.4, seed=3)
    assert len(items) == 1000
    named = 0
    for picture, text in items:
        kw = KEYWORDS[picture.stem.split("--")[1]]
        others = [w for w in KEYWORDS.values() if w != kw]
        assert not any(w in text for w in others), (picture, text)  # never the wrong thing
        if kw in text:
            named += 1
        else:
            assert text in NEUTRAL_ANSWERS
    assert 0.35 < named / len(items) < 0.45
    assert pretrain_items(pictures, 25, 0.4, seed=3) == items  # reproducible


def test_written_back_weights_convert_to_the_trained_model(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    from bench.learning_loop.pretrain import native_state, save_internvl2
    from bench.learning_loop.proxy import Proxy
    from bot.engines.internvl.convert_internvl2 import convert_internvl2

    proxy = Proxy(tmp_path / "m", lora_r=4, seed=0)
    base = tmp_path / "m" / "base"
    # stand-in for pretraining: move every adapter off zero, then fold them into the weights
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in proxy.lora:
            m.b.copy_(torch.randn(m.b.shape, generator=gen) * 0.05)
    proxy.merge()
    trained = native_state(proxy.model)

    out = save_internvl2(base, proxy.model, tmp_path / "pretrained")
    again = load_file(str(convert_internvl2(out, tmp_path / "hf-again") / "model.safetensors"))
    original = load_file(str(base / "model.safetensors"))
    rewritten = load_file(str(out / "model.safetensors"))

    assert set(again) == set(trained)
    for name, value in trained.items():
        assert torch.equal(again[name].to(value.dtype), value), name
    # the language model changed, the vision side did not (only the LM carried adapters)
    changed = {n for n in original if not torch.equal(original[n], rewritten[n])}
    assert any("wqkv" in n for n in changed) and any("output" in n for n in changed)
    assert not any(n.startswith("vision_model.") for n in changed)
    assert all(rewritten[n].dtype == original[n].dtype for n in original)
    marker = (out / "oogiri-model.json").read_text()
    assert "pretrained" in marker and "pretrained_from" in marker


def test_fuse_wqkv_inverts_split_wqkv() -> None:
    import torch

    from bot.engines.internvl.convert_internvl2 import _Shapes, fuse_wqkv, split_wqkv

    shapes = _Shapes(heads=8, kv_heads=2, head_dim=4, vision_heads=2)
    for rest in ((), (16,)):
        wqkv = torch.randn((8 + 2 * 2) * 4, *rest)
        q, k, v = split_wqkv(wqkv, shapes)
        assert torch.equal(fuse_wqkv(q, k, v, shapes), wqkv)


def test_nf4_round_trip_is_what_a_4_bit_layer_computes_with() -> None:
    """The proxy's stand-in for XTuner's QLoRA: 16 levels per block of 64, each block's largest
    magnitude kept exactly, and the error of a normal weight matrix as NF4's (~10 %)."""
    import torch

    from bench.learning_loop.proxy import NF4, nf4_round_trip

    torch.manual_seed(0)
    weight = torch.randn(96, 130) * 0.02  # 12,480 values: the last block is padded
    q = nf4_round_trip(weight)
    assert q.shape == weight.shape and q.dtype == weight.dtype
    blocks = q.reshape(-1)[: 64 * (weight.numel() // 64)].reshape(-1, 64)
    source = weight.reshape(-1)[: blocks.numel()].reshape(-1, 64)
    scale = source.abs().amax(dim=1, keepdim=True)
    assert torch.allclose(blocks.abs().amax(dim=1, keepdim=True), scale)
    levels = torch.tensor(NF4)
    off_grid = (blocks / scale).unsqueeze(-1).sub(levels).abs().amin(-1)
    assert float(off_grid.max()) < 1e-6
    error = float((q - weight).norm() / weight.norm())
    assert 0.05 < error < 0.15, error
    assert torch.equal(nf4_round_trip(q), q)  # already on the grid


def test_proxy_exports_liked_answers_as_the_product_does() -> None:
    """Best-rated first, one copy of an answer per picture (case and spaces ignored), a cap per
    picture: without it the pictures the model already gets right dominate the training data."""
    from bench.learning_loop.proxy import export_like

    rocket, coffee = Path("train-004--rocket.png"), Path("train-002--coffee.png")
    liked = [
        (rocket, "火箭 飞", 1),
        (rocket, "火箭飞", 3),
        (rocket, "火箭!", 2),
        (rocket, "大火箭", 1),
    ]
    liked += [(coffee, "咖啡", 1)]
    assert export_like(liked, per_image=2) == [
        (rocket, "火箭飞"),
        (rocket, "火箭!"),
        (coffee, "咖啡"),
    ]
    assert len(export_like(liked, per_image=10)) == 4  # only the duplicate goes
