"""A reference InternVL2 (InternViT + InternLM2) written from the architecture's definition.

Used by the converter's tests to check that a converted folder computes what the original
architecture computes. Written for oogiri from the published architecture (not from OpenGVLab's
code): InternViT blocks (fused qkv = all queries | all keys | all values, optional qk RMSNorm over
the whole width, pre-norm with layer scales ls1/ls2), pixel shuffle (each output token is an f×f
block of patches; "v2" orders tokens row-major, "v1" column-major), the mlp1 projector (LayerNorm,
Linear, GELU, Linear) and InternLM2 (RMSNorm; fused ``wqkv`` grouped per key/value head as its
query heads, its key, its value; rotary embedding with InternLM2's dynamic-NTK or linear scaling;
SwiGLU w1/w3/w2). Also: InternLM2Tokenizer's encoding rule and source folders with lively random
weights (every tensor visibly matters to the output).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import sentencepiece
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from bot.engines.internvl.tiny_internvl2 import weight_shapes
from bot.engines.internvl.tinymodel import CORPUS, make_tiny_model

TILES = 2
MATCH = 2e-4  # max |Δlogit| allowed between the converted model and the reference
MISMATCH = 1e-2  # a broken mapping must move some logit at least this much
IMAGENET_TOL = 1e-5  # normalised pixels: the same PIL bicubic resampling (0.0 here)

VARIANTS: dict[str, dict[str, Any]] = {
    # InternVL2-2B's options; max_position_embeddings is cut to 512 so that a 2-tile prompt (~530
    # tokens) is long enough for dynamic NTK scaling to change the rotary base.
    "internvl2-2b": {
        "llm": {"rope_theta": 1000000, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
        "llm_max_positions": 512,
        "vision": {},
    },
    # InternViT-6B's options (RMSNorm, qk normalisation, no qkv bias), InternLM2 with biases and
    # linear rope scaling.
    "qk-norm-bias-linear": {
        "llm": {
            "rope_theta": 500000,
            "rope_scaling": {"type": "linear", "factor": 2.0},
            "bias": True,
        },
        "llm_max_positions": 4096,
        "vision": {"norm_type": "rms_norm", "qk_normalization": True, "qkv_bias": False},
    },
}


# --------------------------------------------------------------------------- source folders


def _source_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of an InternVLChatModel checkpoint for ``cfg``."""
    shapes = weight_shapes(cfg)
    v, lm = cfg["vision_config"], cfg["llm_config"]
    d, h = v["hidden_size"], lm["hidden_size"]
    for i in range(v["num_hidden_layers"]):
        p = f"vision_model.encoder.layers.{i}."
        if v.get("qk_normalization"):
            shapes[p + "attn.q_norm.weight"] = (d,)
            shapes[p + "attn.k_norm.weight"] = (d,)
        if v.get("norm_type") == "rms_norm":
            del shapes[p + "norm1.bias"], shapes[p + "norm2.bias"]
        if not v.get("qkv_bias", True):
            del shapes[p + "attn.qkv.bias"]
    if lm.get("bias"):
        for i in range(lm["num_hidden_layers"]):
            p = f"language_model.model.layers.{i}.attention."
            shapes[p + "wqkv.bias"] = (shapes[p + "wqkv.weight"][0],)
            shapes[p + "wo.bias"] = (h,)
    return shapes


def _lively(name: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Random values whose every tensor matters to the output."""
    t = torch.randn(shape, generator=g)
    if name.endswith(("ls1", "ls2")):
        return 0.3 + 0.5 * torch.rand(shape, generator=g)
    if re.search(r"norm[12]?\.weight$|mlp1\.0\.weight$", name):
        return 1.0 + 0.3 * t
    if name.endswith(".bias"):
        return 0.1 * t
    if name.endswith(("class_embedding", "position_embedding")):
        return 0.5 * t
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
    return t / math.sqrt(fan_in)


def make_source(out: Path, variant: str, seed: int = 7) -> Path:
    """The tiny InternVL2 folder (sentencepiece tokenizer) with a variant's options and weights."""
    make_tiny_model(out, layout="internvl2", tokenizer="sentencepiece", seed=seed)
    spec = VARIANTS[variant]
    cfg = json.loads((out / "config.json").read_text())
    cfg["llm_config"].update(spec["llm"], max_position_embeddings=spec["llm_max_positions"])
    cfg["vision_config"].update(spec["vision"])
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    g = torch.Generator().manual_seed(seed)
    tensors = {n: _lively(n, s, g) for n, s in sorted(_source_shapes(cfg).items())}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


# --------------------------------------------------------------------------- the reference


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def ref_vision(
    sd: dict[str, torch.Tensor], v: dict[str, Any], pixels: torch.Tensor
) -> torch.Tensor:
    """InternViT: patch embedding, class token, positions; pre-norm blocks with layer scale."""
    p, eps = "vision_model.", v["layer_norm_eps"]
    d, heads = v["hidden_size"], v["num_attention_heads"]
    hd = d // heads
    rms = v.get("norm_type") == "rms_norm"

    def norm(x: torch.Tensor, key: str) -> torch.Tensor:
        if rms:
            return _rms(x, sd[key + ".weight"], eps)
        return F.layer_norm(x, (d,), sd[key + ".weight"], sd[key + ".bias"], eps)

    emb = p + "embeddings."
    x = F.conv2d(
        pixels,
        sd[emb + "patch_embedding.weight"],
        sd[emb + "patch_embedding.bias"],
        stride=v["patch_size"],
    )
    x = x.flatten(2).transpose(1, 2)
    b, n = x.shape[0], x.shape[1] + 1
    x = torch.cat([sd[emb + "class_embedding"].expand(b, 1, d), x], dim=1)
    x = x + sd[emb + "position_embedding"]
    for i in range(v["num_hidden_layers"]):
        q = f"{p}encoder.layers.{i}."
        h = norm(x, q + "norm1")
        qkv = F.linear(h, sd[q + "attn.qkv.weight"], sd.get(q + "attn.qkv.bias"))
        qs, ks, vs = qkv.split(d, dim=-1)  # [all queries | all keys | all values]
        if v.get("qk_normalization"):
            qs = _rms(qs, sd[q + "attn.q_norm.weight"], eps)
            ks = _rms(ks, sd[q + "attn.k_norm.weight"], eps)
        qs, ks, vs = (t.reshape(b, n, heads, hd).transpose(1, 2) for t in (qs, ks, vs))
        weights = torch.softmax(qs @ ks.transpose(-1, -2) / math.sqrt(hd), dim=-1)
        out = (weights @ vs).transpose(1, 2).reshape(b, n, d)
        x = x + F.linear(out, sd[q + "attn.proj.weight"], sd[q + "attn.proj.bias"]) * sd[q + "ls1"]
        h = norm(x, q + "norm2")
        h = F.linear(
            F.gelu(F.linear(h, sd[q + "mlp.fc1.weight"], sd[q + "mlp.fc1.bias"])),
            sd[q + "mlp.fc2.weight"],
            sd[q + "mlp.fc2.bias"],
        )
        x = x + h * sd[q + "ls2"]
    return x


def ref_pixel_shuffle(x: torch.Tensor, ratio: float, version: str = "v2") -> torch.Tensor:
    """(tiles, side, side, c) patches → (tiles, (side·r)², c/r²).

    Output token (i, j) concatenates the f×f block of patches (f·i + m, f·j + k), m major; "v2"
    orders tokens row-major over (i, j), "v1" column-major.
    """
    n, side, _, c = x.shape
    f = round(1 / ratio)
    blocks = x.reshape(n, side // f, f, side // f, f, c)  # (n, i, m, j, k, c)
    order = (0, 1, 3, 2, 4, 5) if version == "v2" else (0, 3, 1, 2, 4, 5)
    return blocks.permute(*order).reshape(n, (side // f) ** 2, f * f * c)


def ref_image_embeds(
    sd: dict[str, torch.Tensor], cfg: dict[str, Any], pixels: torch.Tensor, version: str = "v2"
) -> torch.Tensor:
    v = cfg["vision_config"]
    feats = ref_vision(sd, v, pixels)[:, 1:]  # select_layer -1, class token dropped
    side = math.isqrt(feats.shape[1])
    x = ref_pixel_shuffle(
        feats.reshape(feats.shape[0], side, side, -1), cfg["downsample_ratio"], version
    )
    x = F.layer_norm(x, (x.shape[-1],), sd["mlp1.0.weight"], sd["mlp1.0.bias"], 1e-5)
    x = F.linear(
        F.gelu(F.linear(x, sd["mlp1.1.weight"], sd["mlp1.1.bias"])),
        sd["mlp1.3.weight"],
        sd["mlp1.3.bias"],
    )
    return x.reshape(-1, x.shape[-1])


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def ref_llm(sd: dict[str, torch.Tensor], lm: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
    """InternLM2 over embeddings ``x`` (T, hidden) → logits (T, vocab)."""
    p, eps = "language_model.model.", lm["rms_norm_eps"]
    t_len, hidden = x.shape
    heads, kv = lm["num_attention_heads"], lm["num_key_value_heads"]
    hd, group = hidden // heads, heads // kv
    base = float(lm["rope_theta"])
    positions = torch.arange(t_len, dtype=torch.float32)
    scaling = lm.get("rope_scaling") or {}
    if scaling.get("type") == "dynamic" and t_len > lm["max_position_embeddings"]:
        f = scaling["factor"]
        base *= (f * t_len / lm["max_position_embeddings"] - (f - 1)) ** (hd / (hd - 2))
    if scaling.get("type") == "linear":
        positions = positions / scaling["factor"]
    inv_freq = 1.0 / base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    angles = torch.outer(positions, inv_freq)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    causal = torch.full((t_len, t_len), float("-inf")).triu(1)
    for i in range(lm["num_hidden_layers"]):
        q = f"{p}layers.{i}."
        h = _rms(x, sd[q + "attention_norm.weight"], eps)
        fused = F.linear(h, sd[q + "attention.wqkv.weight"], sd.get(q + "attention.wqkv.bias"))
        fused = fused.reshape(t_len, kv, group + 2, hd)
        out = torch.empty(t_len, heads, hd)
        for head in range(heads):
            g, j = divmod(head, group)  # query head g·group + j reads key/value head g
            qh, kh, vh = fused[:, g, j], fused[:, g, group], fused[:, g, group + 1]
            qh = qh * cos + _rotate_half(qh) * sin
            kh = kh * cos + _rotate_half(kh) * sin
            att = torch.softmax(qh @ kh.T / math.sqrt(hd) + causal, dim=-1)
            out[:, head] = att @ vh
        x = x + F.linear(
            out.reshape(t_len, hidden),
            sd[q + "attention.wo.weight"],
            sd.get(q + "attention.wo.bias"),
        )
        h = _rms(x, sd[q + "ffn_norm.weight"], eps)
        gate = F.silu(F.linear(h, sd[q + "feed_forward.w1.weight"]))
        x = x + F.linear(
            gate * F.linear(h, sd[q + "feed_forward.w3.weight"]), sd[q + "feed_forward.w2.weight"]
        )
    x = _rms(x, sd[p + "norm.weight"], eps)
    return F.linear(x, sd["language_model.output.weight"])


def ref_logits(
    src: Path, input_ids: list[int], pixels: torch.Tensor, context_id: int, version: str = "v2"
) -> torch.Tensor:
    cfg = json.loads((src / "config.json").read_text())
    sd = load_file(str(src / "model.safetensors"))
    x = sd["language_model.model.tok_embeddings.weight"][torch.tensor(input_ids)]
    image = ref_image_embeds(sd, cfg, pixels, version)
    where = torch.tensor(input_ids) == context_id
    assert int(where.sum()) == image.shape[0]
    x[where] = image
    return ref_llm(sd, cfg["llm_config"], x)


# --------------------------------------------------------------------------- helpers


def prompt_ids(src: Path) -> tuple[list[int], int]:
    """BOS, some text, <img> + 256 × TILES context tokens + </img>, more text."""
    added = json.loads((src / "added_tokens.json").read_text())
    start, end, ctx = added["<img>"], added["</img>"], added["<IMG_CONTEXT>"]
    sp = sentencepiece.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    text = sp.encode("Please tell a funny joke about this picture.")
    ids = [
        1,
        *text[:6],
        start,
        *[ctx] * (256 * TILES),
        end,
        *sp.encode("\n请你根据这张图片，讲一个脑洞大开的梗"),
    ]
    return ids, ctx


def converted_logits(dst: Path, ids: list[int], pixels: torch.Tensor) -> torch.Tensor:
    from transformers import InternVLForConditionalGeneration

    model, info = InternVLForConditionalGeneration.from_pretrained(
        dst, dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    model.eval()
    input_ids = torch.tensor([ids])
    with torch.inference_mode():
        out = model(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixels
        )
    return out.logits[0]


def pixels_for(seed: int = 0) -> torch.Tensor:
    return torch.randn(TILES, 3, 448, 448, generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def slow_encode(sp: Any, text: str, added: dict[str, int]) -> list[int]:
    """InternLM2Tokenizer's algorithm: split on added tokens, sentencepiece each stretch."""
    pattern = "(" + "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)) + ")"
    ids: list[int] = []
    for chunk in re.split(pattern, text):
        if chunk in added:
            ids.append(added[chunk])
        elif chunk:
            ids += sp.encode(chunk)
    return ids


# Texts the tokenizer must encode exactly as InternLM2's sentencepiece tokenizer does.
TEXTS = [
    *CORPUS,
    "",
    "\n",
    "  two leading spaces, two  inner, two trailing  ",
    "a\nb\n\nc\td",
    "emoji 😺 and 猫 and ÿ and \x00",
    "<|im_start|>user\n你好<|im_end|><|im_start|>assistant\n",
    "<img><IMG_CONTEXT></img>\n请你根据这张图片",
    " <s>x</s> <unk> <ref>box</ref><box>1</box>",
    "▁already ▁escaped",
]
