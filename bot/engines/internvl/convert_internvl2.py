"""Convert an InternVL2 folder (OpenGVLab's ``InternVLChatModel``) to transformers' own InternVL.

Why: a real InternVL2-2B download (and what XTuner merges) runs only through its remote code, which
does not load on transformers 5 (FIELD-NOTES: ``rope_scaling`` KeyError), while transformers 5 has
InternVL natively (``InternVLForConditionalGeneration``). The two are the same network with other
names:

* InternLM2 is Llama with a fused ``wqkv`` whose rows are grouped per key/value head:
  ``[num_kv_heads, q_per_kv + 2, head_dim]`` (the group's query heads, then its key, then its
  value); ``w1/w3/w2`` are gate/up/down, ``attention_norm/ffn_norm`` the two RMSNorms;
* InternViT's fused ``qkv`` is ``[3, heads, head_dim]``; ``ls1/ls2`` are the layer scales;
* ``mlp1.{0,1,3}`` is the projector (LayerNorm, Linear, GELU, Linear) after pixel shuffle "v2",
  which is what transformers implements (a "v1" model is refused).

The tokenizer becomes a ``tokenizer.json`` built from the sentencepiece ``tokenizer.model`` with
transformers' converter (it follows the model's normalizer spec), keeping every added token of
``tokenizer_config.json`` / ``added_tokens.json`` at its id; the chat template is the bot's (from
the LMDeploy template JSON, so both engines prompt alike). Tensors are streamed: each output shard
is read, renamed/split and written before the next is read, so memory stays near one shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Bump when the output changes: cached automatic conversions are then redone.
FORMAT_VERSION = 1
SHARD_BYTES = 1 << 30
CONVERTED_DIR = Path("models") / "converted"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
IMAGE_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
}
# transformers' InternVLProcessor also needs ``tokenizer.video_token`` (LMDeploy builds that
# processor for this layout). InternVL2 has no video token and its vocabulary no spare row: a new
# "<video>" would get an id past the embedding. Naming the image context token keeps the vocabulary
# and makes the processor's video branch unreachable (its pattern tries the image token first).
VIDEO_TOKEN = {"video_token": IMAGE_TOKENS["context_image_token"]}
# Buffers some checkpoints carry that the model recomputes.
IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")

Progress = Callable[[int, int, str], None]  # (bytes done, bytes total, what)


class ConversionError(ValueError):
    """The source folder cannot be converted (the message says why)."""


def is_internvl2_folder(path: Path) -> bool:
    """True for an ``InternVLChatModel`` folder (InternVL2's own layout, remote code)."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    archs = cfg.get("architectures") or []
    return cfg.get("model_type") == "internvl_chat" or "InternVLChatModel" in archs


def default_chat_template_file() -> Path:
    from bot.engines.internvl import CHAT_TEMPLATE

    return CHAT_TEMPLATE


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class _Shapes:
    heads: int
    kv_heads: int
    head_dim: int
    vision_heads: int


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise ConversionError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConversionError(f"{path} is not a JSON object")
    return data


def read_source_config(src: Path) -> dict[str, Any]:
    """The source ``config.json``, checked for what the native model can represent."""
    cfg = _load_json(src / "config.json")
    if not cfg:
        raise ConversionError(f"{src} has no config.json")
    if not is_internvl2_folder(src):
        raise ConversionError(f"{src} is not an InternVL2 (InternVLChatModel) folder")
    llm, vision = cfg.get("llm_config") or {}, cfg.get("vision_config") or {}
    llm_arch = (llm.get("architectures") or [""])[0]
    if llm.get("model_type") != "internlm2" and llm_arch != "InternLM2ForCausalLM":
        raise ConversionError(
            f"only InternLM2 language models convert (InternVL2-1B/2B/8B/26B); this one is "
            f"{llm.get('model_type') or llm_arch!r}"
        )
    if cfg.get("ps_version", "v1") != "v2":
        raise ConversionError(
            f"ps_version {cfg.get('ps_version')!r}: transformers implements pixel shuffle v2 only"
        )
    size = int(cfg.get("force_image_size") or vision.get("image_size", 448))
    if size != int(vision.get("image_size", size)):
        raise ConversionError(
            f"force_image_size {size} differs from the vision model's {vision.get('image_size')}"
        )
    if cfg.get("dynamic_image_size", True) and not cfg.get("use_thumbnail", True):
        raise ConversionError("dynamic tiles without a thumbnail: transformers always adds one")
    if (vision.get("hidden_act") or "gelu") != "gelu":
        raise ConversionError(f"vision activation {vision.get('hidden_act')!r} is not gelu")
    return cfg


def _shapes(cfg: dict[str, Any]) -> _Shapes:
    llm, vision = cfg["llm_config"], cfg["vision_config"]
    heads = int(llm["num_attention_heads"])
    kv = int(llm.get("num_key_value_heads") or heads)
    if heads % kv:
        raise ConversionError(f"{heads} attention heads do not group into {kv} key/value heads")
    return _Shapes(
        heads=heads,
        kv_heads=kv,
        head_dim=int(llm["hidden_size"]) // heads,
        vision_heads=int(vision["num_attention_heads"]),
    )


def rope_parameters(llm: dict[str, Any]) -> dict[str, Any]:
    """InternLM2's ``rope_theta`` + ``rope_scaling`` as transformers 5's ``rope_parameters``.

    InternLM2's "dynamic" (NTK) and "linear" scaling use the same formulas as transformers'.
    """
    theta = float(llm.get("rope_theta", 10000.0))
    scaling = llm.get("rope_scaling")
    params = llm.get("rope_parameters")
    if scaling is None and isinstance(params, dict):  # written by a transformers-5 config class
        theta = float(params.get("rope_theta", theta))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if not scaling:
        return {"rope_type": "default", "rope_theta": theta}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return {"rope_type": "default", "rope_theta": theta}
    if kind not in ("dynamic", "linear"):
        raise ConversionError(f"rope scaling {kind!r} is not supported (dynamic, linear)")
    return {"rope_type": kind, "rope_theta": theta, "factor": float(scaling["factor"])}


def _first_id(value: Any) -> int | None:
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def hf_config(cfg: dict[str, Any], token_ids: dict[str, int]) -> Any:
    """The ``InternVLConfig`` (Llama text model) equivalent to an InternVLChatModel config."""
    from transformers import InternVLConfig

    llm, vision = cfg["llm_config"], cfg["vision_config"]
    shapes = _shapes(cfg)
    size = int(cfg.get("force_image_size") or vision.get("image_size", 448))
    patch = int(vision.get("patch_size", 14))
    ratio = float(cfg.get("downsample_ratio", 0.5))
    tie = bool(llm.get("tie_word_embeddings", False))
    text = {
        "model_type": "llama",
        # LMDeploy picks the language model's class from this (None crashes its lookup)
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": int(llm["vocab_size"]),
        "hidden_size": int(llm["hidden_size"]),
        "intermediate_size": int(llm["intermediate_size"]),
        "num_hidden_layers": int(llm["num_hidden_layers"]),
        "num_attention_heads": shapes.heads,
        "num_key_value_heads": shapes.kv_heads,
        "head_dim": shapes.head_dim,
        "hidden_act": llm.get("hidden_act", "silu"),
        "max_position_embeddings": int(llm.get("max_position_embeddings", 32768)),
        "rms_norm_eps": float(llm.get("rms_norm_eps", 1e-6)),
        "rope_parameters": rope_parameters(llm),
        "attention_bias": bool(llm.get("bias", False)),
        "mlp_bias": False,
        "tie_word_embeddings": tie,
        "bos_token_id": _first_id(llm.get("bos_token_id", 1)),
        "eos_token_id": llm.get("eos_token_id", 2),
        "pad_token_id": _first_id(llm.get("pad_token_id")),
    }
    vision_config = {
        "hidden_size": int(vision["hidden_size"]),
        "num_hidden_layers": int(vision["num_hidden_layers"]),
        "num_attention_heads": shapes.vision_heads,
        "intermediate_size": int(vision["intermediate_size"]),
        "hidden_act": "gelu",
        "attention_bias": bool(vision.get("qkv_bias", True)),
        "use_qk_norm": bool(vision.get("qk_normalization", False)),
        "norm_type": vision.get("norm_type", "layer_norm"),
        "layer_norm_eps": float(vision.get("layer_norm_eps", 1e-6)),
        "image_size": [size, size],
        "patch_size": [patch, patch],
        "num_channels": int(vision.get("num_channels", 3)),
        "use_mean_pooling": True,  # InternViT has no final norm
        "use_absolute_position_embeddings": True,
    }
    return InternVLConfig(
        vision_config=vision_config,
        text_config=text,
        image_token_id=token_ids["context"],
        image_seq_length=image_seq_length(cfg),
        downsample_ratio=ratio,
        projector_hidden_act="gelu",
        vision_feature_layer=int(cfg.get("select_layer", -1)),
        vision_feature_select_strategy="default",
        tie_word_embeddings=tie,
    )


def image_seq_length(cfg: dict[str, Any]) -> int:
    """Tokens per 448² tile: (448/14)² patches, pixel-shuffled ×0.5 → 256."""
    vision = cfg["vision_config"]
    size = int(cfg.get("force_image_size") or vision.get("image_size", 448))
    per_side = size // int(vision.get("patch_size", 14))
    return int(per_side * per_side * float(cfg.get("downsample_ratio", 0.5)) ** 2)


# --------------------------------------------------------------------------- weights


def split_wqkv(wqkv: Any, shapes: _Shapes) -> tuple[Any, Any, Any]:
    """InternLM2's fused ``wqkv`` (weight or bias) → Llama's q, k, v.

    Rows are ``[kv_heads, q_per_kv + 2, head_dim]``: per key/value head, its query heads, then its
    key, then its value. Query head ``h * q_per_kv + j`` belongs to key/value head ``h``, which is
    the order Llama's grouped attention expects.
    """
    per_kv = shapes.heads // shapes.kv_heads
    grouped = wqkv.reshape(shapes.kv_heads, per_kv + 2, shapes.head_dim, *wqkv.shape[1:])
    rest = wqkv.shape[1:]
    q = grouped[:, :per_kv].reshape(shapes.heads * shapes.head_dim, *rest)
    k = grouped[:, per_kv].reshape(shapes.kv_heads * shapes.head_dim, *rest)
    v = grouped[:, per_kv + 1].reshape(shapes.kv_heads * shapes.head_dim, *rest)
    return q, k, v


def fuse_wqkv(q: Any, k: Any, v: Any, shapes: _Shapes) -> Any:
    """Llama's q, k, v → InternLM2's fused ``wqkv``: the inverse of ``split_wqkv``."""
    import torch

    per_kv = shapes.heads // shapes.kv_heads
    rest = tuple(q.shape[1:])
    grouped = [
        q.reshape(shapes.kv_heads, per_kv, shapes.head_dim, *rest),
        k.reshape(shapes.kv_heads, 1, shapes.head_dim, *rest),
        v.reshape(shapes.kv_heads, 1, shapes.head_dim, *rest),
    ]
    return torch.cat(grouped, dim=1).reshape(-1, *rest)


def split_vision_qkv(qkv: Any) -> tuple[Any, Any, Any]:
    """InternViT's fused ``qkv`` rows are ``[3, heads, head_dim]``: all queries, keys, values."""
    q, k, v = qkv.chunk(3, dim=0)
    return q, k, v


_VISION = [
    (r"embeddings\.class_embedding", "embeddings.cls_token"),
    (r"embeddings\.patch_embedding\.(weight|bias)", r"embeddings.patch_embeddings.projection.\1"),
    (r"embeddings\.position_embedding", "embeddings.position_embeddings"),
    (
        r"encoder\.layers\.(\d+)\.attn\.proj\.(weight|bias)",
        r"encoder.layer.\1.attention.projection_layer.\2",
    ),
    (
        r"encoder\.layers\.(\d+)\.attn\.(q_norm|k_norm)\.weight",
        r"encoder.layer.\1.attention.\2.weight",
    ),
    (r"encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"encoder.layer.\1.mlp.\2.\3"),
    (r"encoder\.layers\.(\d+)\.norm1\.(weight|bias)", r"encoder.layer.\1.layernorm_before.\2"),
    (r"encoder\.layers\.(\d+)\.norm2\.(weight|bias)", r"encoder.layer.\1.layernorm_after.\2"),
    (r"encoder\.layers\.(\d+)\.ls1", r"encoder.layer.\1.lambda_1"),
    (r"encoder\.layers\.(\d+)\.ls2", r"encoder.layer.\1.lambda_2"),
]
_LLM = [
    (r"tok_embeddings\.weight", "embed_tokens.weight"),
    (r"norm\.weight", "norm.weight"),
    (r"layers\.(\d+)\.attention\.wo\.(weight|bias)", r"layers.\1.self_attn.o_proj.\2"),
    (r"layers\.(\d+)\.feed_forward\.w1\.weight", r"layers.\1.mlp.gate_proj.weight"),
    (r"layers\.(\d+)\.feed_forward\.w3\.weight", r"layers.\1.mlp.up_proj.weight"),
    (r"layers\.(\d+)\.feed_forward\.w2\.weight", r"layers.\1.mlp.down_proj.weight"),
    (r"layers\.(\d+)\.attention_norm\.weight", r"layers.\1.input_layernorm.weight"),
    (r"layers\.(\d+)\.ffn_norm\.weight", r"layers.\1.post_attention_layernorm.weight"),
]
_PROJECTOR = {"0": "layer_norm", "1": "linear_1", "3": "linear_2"}
_VISION_QKV = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)")
_LLM_QKV = re.compile(r"language_model\.model\.layers\.(\d+)\.attention\.wqkv\.(weight|bias)")


def _rename(name: str, prefix: str, rules: list[tuple[str, str]], out: str) -> str | None:
    if not name.startswith(prefix):
        return None
    rest = name[len(prefix) :]
    for pattern, target in rules:
        if re.fullmatch(pattern, rest):
            return out + re.sub(pattern, target, rest)
    return None


def map_tensor(name: str, tensor: Any, shapes: _Shapes) -> list[tuple[str, Any]]:
    """One source tensor as the native checkpoint's tensors (named as ``save_pretrained`` names)."""
    if IGNORED.fullmatch(name):
        return []
    if m := _VISION_QKV.fullmatch(name):
        parts = split_vision_qkv(tensor)
        base = f"vision_tower.encoder.layer.{m[1]}.attention"
        return [(f"{base}.{p}_proj.{m[2]}", t) for p, t in zip("qkv", parts, strict=True)]
    if m := _LLM_QKV.fullmatch(name):
        parts = split_wqkv(tensor, shapes)
        base = f"language_model.model.layers.{m[1]}.self_attn"
        return [(f"{base}.{p}_proj.{m[2]}", t) for p, t in zip("qkv", parts, strict=True)]
    if m := re.fullmatch(r"mlp1\.(\d+)\.(weight|bias)", name):
        if m[1] in _PROJECTOR:
            return [(f"multi_modal_projector.{_PROJECTOR[m[1]]}.{m[2]}", tensor)]
    if name == "language_model.output.weight":
        return [("language_model.lm_head.weight", tensor)]
    for prefix, rules, out in (
        ("vision_model.", _VISION, "vision_tower."),
        ("language_model.model.", _LLM, "language_model.model."),
    ):
        target = _rename(name, prefix, rules, out)
        if target:
            return [(target, tensor)]
    raise ConversionError(f"unknown tensor {name!r}: not part of InternVL2 (InternLM2 + InternViT)")


def unmap_tensor(name: str, tensor: Any, native: Mapping[str, Any], shapes: _Shapes) -> Any:
    """The source tensor ``name`` rebuilt from the native checkpoint's tensors ``native``.

    The inverse of ``map_tensor``, for writing a model fine-tuned in the native layout back in
    InternVL2's (what XTuner trains and LMDeploy serves). ``tensor`` is the source's own value:
    tensors the native model ignores are kept as they are.
    """
    import torch

    parts = map_tensor(name, tensor, shapes)
    if not parts:
        return tensor
    missing = [n for n, _ in parts if n not in native]
    if missing:
        raise ConversionError(f"{name!r} needs {', '.join(missing)}, missing from the native model")
    values = [native[n] for n, _ in parts]
    if _LLM_QKV.fullmatch(name):
        q, k, v = values
        return fuse_wqkv(q, k, v, shapes)
    if _VISION_QKV.fullmatch(name):
        return torch.cat(values, dim=0)
    return values[0]


def _expected_tensors(config: Any) -> dict[str, tuple[int, ...]]:
    """Every tensor the native model loads, by checkpoint name, from a model built on 'meta'."""
    import torch
    from transformers import InternVLForConditionalGeneration

    with torch.device("meta"):
        model = InternVLForConditionalGeneration(config)
    out: dict[str, tuple[int, ...]] = {}
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight":
            key = "language_model.lm_head.weight"
        elif key.startswith("model.language_model."):
            key = "language_model.model." + key[len("model.language_model.") :]
        elif key.startswith("model."):
            key = key[len("model.") :]
        out[key] = tuple(tensor.shape)
    if config.text_config.tie_word_embeddings:
        out.pop("language_model.lm_head.weight", None)
    return out


@dataclass
class _SourceTensor:
    file: Path
    name: str
    nbytes: int


def source_tensors(src: Path) -> list[_SourceTensor]:
    """The source's tensors in file order, read from the safetensors headers only."""
    from safetensors import safe_open

    index = src / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _load_json(index).get("weight_map") or {}
        files = list(dict.fromkeys(weight_map.values()))
    elif (src / "model.safetensors").is_file():
        files = ["model.safetensors"]
    elif any(src.glob("*.bin")):
        raise ConversionError(
            f"{src} has PyTorch .bin weights; save it with safetensors first "
            "(transformers 4.x: model.save_pretrained(dir, safe_serialization=True))"
        )
    else:
        raise ConversionError(f"{src} has no model.safetensors")
    out: list[_SourceTensor] = []
    for file in files:
        path = src / file
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                shape = f.get_slice(name).get_shape()
                dtype = f.get_slice(name).get_dtype()
                out.append(_SourceTensor(path, name, _numel(shape) * _dtype_bytes(dtype)))
    return out


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _dtype_bytes(dtype: str) -> int:
    sizes = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "I16": 2}
    return sizes.get(dtype.upper(), 1)


def _plan_shards(tensors: list[_SourceTensor], shard_bytes: int) -> list[list[_SourceTensor]]:
    shards: list[list[_SourceTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _write_weights(
    src: Path,
    dst: Path,
    shapes: _Shapes,
    expected: dict[str, tuple[int, ...]],
    shard_bytes: int,
    progress: Progress | None,
) -> int:
    """Stream the tensors shard by shard; returns the number of parameters written."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors = source_tensors(src)
    total = sum(t.nbytes for t in tensors)
    shards = _plan_shards(tensors, shard_bytes)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map: dict[str, str] = {}
    done = params = total_size = 0
    if progress:
        progress(0, total, "weights")
    for shard, filename in zip(shards, names, strict=True):
        out: dict[str, Any] = {}
        handles: dict[Path, Any] = {}
        try:
            for item in shard:
                if item.file not in handles:
                    handles[item.file] = safe_open(str(item.file), "pt").__enter__()
                tensor = handles[item.file].get_tensor(item.name)
                for target, part in map_tensor(item.name, tensor, shapes):
                    if target in weight_map or target in out:
                        raise ConversionError(f"two source tensors map to {target}")
                    if target not in expected:
                        raise ConversionError(
                            f"{item.name} maps to {target}, which the model lacks"
                        )
                    if tuple(part.shape) != expected[target]:
                        raise ConversionError(
                            f"{item.name} → {target}: shape {tuple(part.shape)}, "
                            f"the model expects {expected[target]}"
                        )
                    # A copy of its own: slices of a fused tensor must not share storage.
                    out[target] = part.contiguous().clone()
                del tensor
                done += item.nbytes
                if progress:
                    progress(done, total, item.name)
        finally:
            for handle in handles.values():
                handle.__exit__(None, None, None)
        save_file(out, str(dst / filename), metadata={"format": "pt"})
        for target, t in out.items():
            weight_map[target] = filename
            params += t.numel()
            total_size += t.numel() * t.element_size()
        del out
    missing = sorted(set(expected) - set(weight_map))
    if missing:
        shown = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "")
        raise ConversionError(f"the source lacks {len(missing)} tensors the model needs: {shown}")
    if len(names) > 1:
        index = {
            "metadata": {"total_size": total_size},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return params


# --------------------------------------------------------------------------- tokenizer


@dataclass(frozen=True)
class _Added:
    content: str
    special: bool
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False


def _added_tokens(src: Path, tcfg: dict[str, Any]) -> dict[int, _Added]:
    """Added tokens by id, from ``tokenizer_config.json`` and ``added_tokens.json``."""
    added: dict[int, _Added] = {}
    for key, spec in (tcfg.get("added_tokens_decoder") or {}).items():
        added[int(key)] = _Added(
            content=spec["content"],
            special=bool(spec.get("special", True)),
            lstrip=bool(spec.get("lstrip", False)),
            rstrip=bool(spec.get("rstrip", False)),
            single_word=bool(spec.get("single_word", False)),
        )
    for content, token_id in _load_json(src / "added_tokens.json").items():
        known = added.get(int(token_id))
        if known and known.content != content:
            raise ConversionError(
                f"id {token_id} is {known.content!r} in tokenizer_config.json but {content!r} in "
                "added_tokens.json"
            )
        added.setdefault(int(token_id), _Added(content=content, special=True))
    return added


def _sentencepiece_tokenizer(src: Path, specials: set[str]) -> tuple[Any, list[str]]:
    """A ``tokenizers.Tokenizer`` equal to InternLM2's slow sentencepiece tokenizer.

    Pieces that are also special added tokens (``<|im_end|>`` …) are built as control pieces,
    not sentencepiece "user-defined" ones: text is matched to them as added tokens all the same,
    but with ``split_special_tokens`` (the engine's treatment of user text) they stay plain text,
    where a user-defined piece would still come out whole and let a user forge a turn.
    """
    try:
        from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

        model_pb2 = import_protobuf()
    except ImportError as exc:
        raise ConversionError(
            "converting tokenizer.model needs sentencepiece and protobuf: "
            "pip install sentencepiece protobuf"
        ) from exc
    # protobuf generates ModelProto at run time: no static type to check against
    proto: Any = model_pb2.ModelProto()  # pyright: ignore[reportAttributeAccessIssue]
    proto.ParseFromString((src / "tokenizer.model").read_bytes())
    for piece in proto.pieces:
        if piece.type == 4 and piece.piece in specials:  # USER_DEFINED → CONTROL
            piece.type = 3
    if proto.trainer_spec.model_type == 2:  # BPE, as InternLM2's
        vocab: Any = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    else:
        vocab = [(piece.piece, piece.score) for piece in proto.pieces]
    # InternLM2Tokenizer encodes each stretch between added tokens with sentencepiece on its own:
    # transformers calls that "legacy" (a dummy prefix for every stretch, if the model has one).
    tokenizer = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)
    if tokenizer is None:
        raise ConversionError("tokenizer.model is neither a BPE nor a Unigram sentencepiece model")
    pieces = [piece.piece for piece in proto.pieces]
    return tokenizer, pieces


def build_tokenizer(src: Path, cfg: dict[str, Any], chat_template: str) -> Any:
    """The fast tokenizer of the converted folder, every added token at its original id."""
    from tokenizers import AddedToken, Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tcfg = _load_json(src / "tokenizer_config.json")
    added = _added_tokens(src, tcfg)
    if (src / "tokenizer.model").is_file():
        raw, pieces = _sentencepiece_tokenizer(
            src, {t.content for t in added.values() if t.special}
        )
    elif (src / "tokenizer.json").is_file():
        raw = Tokenizer.from_file(str(src / "tokenizer.json"))
        pieces = [raw.id_to_token(i) for i in range(raw.get_vocab_size(with_added_tokens=False))]
    else:
        raise ConversionError(f"{src} has neither tokenizer.model nor tokenizer.json")
    # In id order, in runs of equal "special" flag (one call per run: a call per token is
    # quadratic), each new token taking the next id.
    runs: list[tuple[bool, list[Any]]] = []
    expected_next = raw.get_vocab_size(with_added_tokens=True)
    for token_id in sorted(added):
        tok = added[token_id]
        if token_id < len(pieces):
            if pieces[token_id] != tok.content:
                raise ConversionError(
                    f"added token {tok.content!r} has id {token_id}, which the vocabulary gives "
                    f"to {pieces[token_id]!r}"
                )
        elif token_id != expected_next:
            raise ConversionError(f"added token ids skip to {token_id} ({tok.content!r})")
        else:
            expected_next += 1
        spec = AddedToken(
            tok.content,
            special=tok.special,
            normalized=False,
            lstrip=tok.lstrip,
            rstrip=tok.rstrip,
            single_word=tok.single_word,
        )
        if runs and runs[-1][0] == tok.special:
            runs[-1][1].append(spec)
        else:
            runs.append((tok.special, [spec]))
    for special, specs in runs:
        if special:
            raw.add_special_tokens(specs)
        else:
            raw.add_tokens(specs)
    for token_id, tok in added.items():
        if raw.token_to_id(tok.content) != token_id:
            raise ConversionError(f"{tok.content!r} did not keep id {token_id}")
    vocab_size = int(cfg["llm_config"]["vocab_size"])
    size = raw.get_vocab_size(with_added_tokens=True)
    if size > vocab_size:
        raise ConversionError(f"the tokenizer has {size} tokens, the model only {vocab_size}")
    if size < vocab_size:
        log.warning(
            "tokenizer has %d tokens, the model %d: higher ids decode to ''", size, vocab_size
        )

    def named(key: str, default: str | None) -> str | None:
        value = tcfg.get(key, default)
        if isinstance(value, dict):  # AddedToken serialised by transformers 4
            value = value.get("content")
        return value

    bos, eos = named("bos_token", "<s>"), named("eos_token", "</s>")
    unk, pad = named("unk_token", "<unk>"), named("pad_token", eos)
    if tcfg.get("add_bos_token", True) and bos and raw.token_to_id(bos) is not None:
        raw.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, raw.token_to_id(bos))]
        )
    for token in IMAGE_TOKENS.values():
        if raw.token_to_id(token) is None:
            raise ConversionError(f"the tokenizer lacks InternVL's {token}")
    llm = cfg["llm_config"]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        pad_token=pad,
        extra_special_tokens={**IMAGE_TOKENS, **VIDEO_TOKEN},
        model_max_length=int(llm.get("max_position_embeddings", 32768)),
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = chat_template
    return tokenizer


# --------------------------------------------------------------------------- chat template


def chat_template_from_json(path: Path) -> str:
    """A Jinja chat template that renders like LMDeploy does with the JSON template at ``path``.

    ``{system}{meta_instruction}{eosys}`` (a leading system message replaces the meta
    instruction), then ``{user}…{eoh}`` / ``{assistant}…{eoa}{separator}`` turns, ending with
    ``{assistant}``; the tokenizer's BOS first, as InternLM2 and XTuner add it. A picture becomes
    ``<IMG_CONTEXT>\\n``, which the engine expands to ``<img>`` + 256 × tiles + ``</img>``.
    """
    tpl = _load_json(path)
    if not tpl:
        raise ConversionError(f"no chat template at {path}")

    def lit(key: str) -> str:
        return json.dumps(tpl.get(key) or "", ensure_ascii=False)

    meta = tpl.get("meta_instruction")
    meta_lit = "none" if meta is None else json.dumps(meta, ensure_ascii=False)
    return (
        "{{- bos_token -}}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
        f"{{%- else -%}}{{%- set system = {meta_lit} -%}}{{%- set turns = messages -%}}"
        "{%- endif -%}"
        f"{{%- if system is not none -%}}{{{{- {lit('system')} + system + {lit('eosys')} -}}}}"
        "{%- endif -%}"
        "{%- for message in turns -%}"
        f"{{%- if message['role'] == 'user' -%}}{{{{- {lit('user')} -}}}}"
        f"{{%- else -%}}{{{{- {lit('assistant')} -}}}}{{%- endif -%}}"
        "{%- if message['content'] is string -%}{{- message['content'] -}}"
        "{%- else -%}{%- for item in message['content'] -%}"
        "{%- if item['type'] == 'image' -%}{{- '<IMG_CONTEXT>\\n' -}}"
        "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}"
        "{%- endif -%}{%- endfor -%}{%- endif -%}"
        f"{{%- if message['role'] == 'user' -%}}{{{{- {lit('eoh')} -}}}}"
        f"{{%- elif not loop.last -%}}{{{{- {lit('eoa')} + {lit('separator')} -}}}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{- {lit('assistant')} -}}}}{{%- endif -%}}"
    )


# --------------------------------------------------------------------------- the conversion


def _image_processor(cfg: dict[str, Any]) -> Any:
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
        GotOcr2ImageProcessorPil,
    )

    vision = cfg["vision_config"]
    size = int(cfg.get("force_image_size") or vision.get("image_size", 448))
    # GotOcr2's tiling is InternVL's dynamic_preprocess: the grid of at most max_dynamic_patch
    # tiles closest to the image's aspect ratio, plus a thumbnail when there is more than one.
    return GotOcr2ImageProcessorPil(
        size={"height": size, "width": size},
        crop_to_patches=bool(cfg.get("dynamic_image_size", True)),
        min_patches=int(cfg.get("min_dynamic_patch", 1)),
        max_patches=int(cfg.get("max_dynamic_patch", 12)),
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )


def _marker(src: Path, params: int, fingerprint: str | None) -> dict[str, Any]:
    from bot.engines.internvl.tinymodel import read_marker, version_label

    marker = {k: v for k, v in (read_marker(src) or {}).items() if k not in ("layout", "version")}
    marker |= {
        "version": version_label(src),
        "layout": "hf",
        "converted_from": str(src.resolve()),
        "source_layout": "internvl2",
        "converter_format": FORMAT_VERSION,
        "parameters": params,
    }
    if fingerprint:
        marker["source_fingerprint"] = fingerprint
    return marker


def convert_internvl2(
    src: Path,
    dst: Path,
    *,
    chat_template: Path | None = None,
    shard_bytes: int = SHARD_BYTES,
    progress: Progress | None = None,
    overwrite: bool = False,
    fingerprint: str | None = None,
) -> Path:
    """Convert ``src`` (InternVLChatModel) into ``dst`` (InternVLForConditionalGeneration).

    Written into a staging folder beside ``dst`` and renamed at the end, so ``dst`` is either
    absent or complete. Raises ``ConversionError`` with the reason when the source cannot be
    represented exactly.
    """
    src, dst = Path(src), Path(dst)
    if dst.exists() and not overwrite:
        raise ConversionError(f"{dst} exists (use --force to replace it)")
    if dst.resolve() == src.resolve():
        raise ConversionError("the destination must differ from the source")
    cfg = read_source_config(src)
    shapes = _shapes(cfg)
    template = chat_template_from_json(chat_template or default_chat_template_file())
    tokenizer = build_tokenizer(src, cfg, template)
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in IMAGE_TOKENS.items()}
    token_ids = {"context": ids["context_image_token"]}
    config = hf_config(cfg, token_ids)
    expected = _expected_tensors(config)

    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = dst.parent / f".{dst.name}.partial-{os.getpid()}-{threading.get_ident()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        started = time.perf_counter()
        params = _write_weights(src, staging, shapes, expected, shard_bytes, progress)
        config.architectures = ["InternVLForConditionalGeneration"]
        config.save_pretrained(staging)
        _write_generation_config(staging, cfg, tokenizer)
        tokenizer.save_pretrained(staging)
        _image_processor(cfg).save_pretrained(staging)
        processor = {
            "processor_class": "InternVLProcessor",
            "image_seq_length": image_seq_length(cfg),
        }
        (staging / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
        marker = _marker(src, params, fingerprint)
        marker["conversion_s"] = round(time.perf_counter() - started, 2)
        (staging / "oogiri-model.json").write_text(
            json.dumps(marker, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        if dst.exists():
            shutil.rmtree(dst)
        staging.rename(dst)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dst


def _write_generation_config(dst: Path, cfg: dict[str, Any], tokenizer: Any) -> None:
    llm = cfg["llm_config"]
    eos = llm.get("eos_token_id", 2)
    stops = (
        [tokenizer.convert_tokens_to_ids("<|im_end|>")]
        if "<|im_end|>" in tokenizer.get_vocab()
        else []
    )
    stops += eos if isinstance(eos, list) else [eos]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else llm.get("pad_token_id")
    generation = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": [int(i) for i in dict.fromkeys(stops) if i is not None],
        "pad_token_id": pad,
    }
    (dst / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


# --------------------------------------------------------------------------- automatic cache


def source_fingerprint(src: Path, chat_template: Path | None = None) -> str:
    """Changes when the source folder's files, the chat template or the converter change."""
    h = hashlib.sha256(f"format {FORMAT_VERSION}\n{Path(src).resolve()}\n".encode())
    for path in sorted(p for p in Path(src).iterdir() if p.is_file()):
        st = path.stat()
        h.update(f"{path.name} {st.st_size} {st.st_mtime_ns}\n".encode())
    template = chat_template or default_chat_template_file()
    h.update(Path(template).read_bytes())
    return h.hexdigest()


def _converted_dirs(root: Path) -> Iterator[Path]:
    if root.is_dir():
        yield from (p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def ensure_converted(
    src: Path,
    data_dir: Path,
    *,
    chat_template: Path | None = None,
    progress: Progress | None = None,
) -> Path:
    """The converted copy of ``src`` under ``data_dir/models/converted``, made once per source.

    Reused while the source's files (names, sizes, mtimes), the chat template and the converter
    format are unchanged; an older conversion of the same source folder is removed once a new one
    is complete.
    """
    from bot.engines.internvl.tinymodel import read_marker

    src = Path(src)
    root = Path(data_dir) / CONVERTED_DIR
    fingerprint = source_fingerprint(src, chat_template)
    target = root / f"{src.resolve().name}-{fingerprint[:12]}"
    marker = read_marker(target) or {}
    if marker.get("source_fingerprint") == fingerprint:
        return target
    log.warning(
        "%s is an InternVL2 (InternVLChatModel) folder: converting it once to transformers' "
        "layout in %s (InternVL2-2B: ~20 s on 2 CPU cores, 4.4 GB more disk)",
        src,
        target,
    )
    started = time.perf_counter()
    # Converted under a private name, then renamed: a process that loses the race uses the winner's.
    mine = root / f".{target.name}.{os.getpid()}.{threading.get_ident()}"
    try:
        convert_internvl2(
            src, mine, chat_template=chat_template, progress=progress, fingerprint=fingerprint
        )
        if target.exists() and (read_marker(target) or {}).get("source_fingerprint") != fingerprint:
            shutil.rmtree(target, ignore_errors=True)  # an interrupted or stale copy
        try:
            mine.rename(target)
        except OSError:
            if (read_marker(target) or {}).get("source_fingerprint") != fingerprint:
                raise
    finally:
        shutil.rmtree(mine, ignore_errors=True)
    log.info("converted %s in %.1f s", src, time.perf_counter() - started)
    resolved = str(src.resolve())
    for old in _converted_dirs(root):
        info = read_marker(old) or {}
        if old != target and info.get("converted_from") == resolved:
            shutil.rmtree(old, ignore_errors=True)
    return target
