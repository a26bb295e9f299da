"""InternVL2's original folder layout (``InternVLChatModel``) with random weights.

The layout XTuner fine-tunes and LMDeploy serves (see FIELD-NOTES): ``config.json`` with nested
``llm_config`` (InternLM2) and ``vision_config`` (InternViT), the project's own config class as
remote code, a fast tokenizer with InternVL's special tokens, and ``model.safetensors`` with the
weight names LMDeploy loads (``vision_model.*``, ``mlp1.{0,1,3}.*``, ``language_model.model.*``,
``language_model.output.weight``). ``size="full"`` has InternVL2-2B's real shapes (2.2 B
parameters) and should be built on a GPU; ``size="tiny"`` builds in a second on a CPU.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

REMOTE_CODE = Path(__file__).parent / "remote_code" / "configuration_internvl_chat.py"

SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "vision": {
            "hidden_size": 64,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "intermediate_size": 128,
        },
        "llm": {
            "hidden_size": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "num_hidden_layers": 2,
            "intermediate_size": 128,
            "vocab_size": 1024,
            "max_position_embeddings": 16384,
        },
    },
    # InternVL2-2B: InternViT-300M-448px + InternLM2-chat-1.8B.
    "full": {
        "vision": {
            "hidden_size": 1024,
            "num_attention_heads": 16,
            "num_hidden_layers": 24,
            "intermediate_size": 4096,
        },
        "llm": {
            "hidden_size": 2048,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "num_hidden_layers": 24,
            "intermediate_size": 8192,
            "vocab_size": 92553,
            "max_position_embeddings": 32768,
            "rope_scaling": {"type": "dynamic", "factor": 2.0},
        },
    },
}


def build_config(size: str = "tiny", **llm_overrides: Any) -> dict[str, Any]:
    spec = SIZES[size]
    vision = {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
        "num_channels": 3,
        "patch_size": 14,
        "image_size": 448,
        "qkv_bias": True,
        "qk_normalization": False,
        "norm_type": "layer_norm",
        "layer_norm_eps": 1e-6,
        "hidden_act": "gelu",
        "use_flash_attn": False,
        **spec["vision"],
    }
    llm = {
        "architectures": ["InternLM2ForCausalLM"],
        "model_type": "internlm2",
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 1000000,
        "rope_scaling": None,
        "bias": False,
        "tie_word_embeddings": False,
        "attn_implementation": "eager",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "torch_dtype": "bfloat16",
        **spec["llm"],
        **llm_overrides,
    }
    return {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "auto_map": {
            "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
        },
        "torch_dtype": "bfloat16",
        "llm_config": llm,
        "vision_config": vision,
        "downsample_ratio": 0.5,
        "force_image_size": 448,
        "dynamic_image_size": True,
        "min_dynamic_patch": 1,
        "max_dynamic_patch": 12,
        "use_thumbnail": True,
        "ps_version": "v2",
        "select_layer": -1,
        "template": "internlm2-chat",
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
    }


def weight_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor LMDeploy's InternVLChatModel loads, with its shape."""
    v, lm = config["vision_config"], config["llm_config"]
    d, inter = v["hidden_size"], v["intermediate_size"]
    n_pos = (v["image_size"] // v["patch_size"]) ** 2 + 1
    shapes: dict[str, tuple[int, ...]] = {
        "vision_model.embeddings.class_embedding": (1, 1, d),
        "vision_model.embeddings.patch_embedding.weight": (d, 3, v["patch_size"], v["patch_size"]),
        "vision_model.embeddings.patch_embedding.bias": (d,),
        "vision_model.embeddings.position_embedding": (1, n_pos, d),
    }
    for i in range(v["num_hidden_layers"]):
        p = f"vision_model.encoder.layers.{i}."
        shapes |= {
            p + "attn.qkv.weight": (3 * d, d),
            p + "attn.qkv.bias": (3 * d,),
            p + "attn.proj.weight": (d, d),
            p + "attn.proj.bias": (d,),
            p + "mlp.fc1.weight": (inter, d),
            p + "mlp.fc1.bias": (inter,),
            p + "mlp.fc2.weight": (d, inter),
            p + "mlp.fc2.bias": (d,),
            p + "norm1.weight": (d,),
            p + "norm1.bias": (d,),
            p + "norm2.weight": (d,),
            p + "norm2.bias": (d,),
            p + "ls1": (d,),
            p + "ls2": (d,),
        }
    h, vocab = lm["hidden_size"], lm["vocab_size"]
    shuffled = d * int(1 / config["downsample_ratio"]) ** 2
    shapes |= {
        "mlp1.0.weight": (shuffled,),
        "mlp1.0.bias": (shuffled,),
        "mlp1.1.weight": (h, shuffled),
        "mlp1.1.bias": (h,),
        "mlp1.3.weight": (h, h),
        "mlp1.3.bias": (h,),
        "language_model.model.tok_embeddings.weight": (vocab, h),
        "language_model.model.norm.weight": (h,),
        "language_model.output.weight": (vocab, h),
    }
    head_dim = h // lm["num_attention_heads"]
    qkv = (lm["num_attention_heads"] + 2 * lm["num_key_value_heads"]) * head_dim
    for i in range(lm["num_hidden_layers"]):
        p = f"language_model.model.layers.{i}."
        shapes |= {
            p + "attention.wqkv.weight": (qkv, h),
            p + "attention.wo.weight": (h, lm["num_attention_heads"] * head_dim),
            p + "feed_forward.w1.weight": (lm["intermediate_size"], h),
            p + "feed_forward.w3.weight": (lm["intermediate_size"], h),
            p + "feed_forward.w2.weight": (h, lm["intermediate_size"]),
            p + "attention_norm.weight": (h,),
            p + "ffn_norm.weight": (h,),
        }
    return shapes


def _init_tensor(name: str, shape: tuple[int, ...], generator: Any, device: str, dtype: Any) -> Any:
    import torch

    if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "mlp1.0.weight")) or (
        name.endswith(("attention_norm.weight", "ffn_norm.weight"))
    ):
        return torch.ones(shape, device=device, dtype=dtype)
    if name.endswith(".bias"):
        return torch.zeros(shape, device=device, dtype=dtype)
    if name.endswith(("ls1", "ls2")):
        return torch.full(shape, 0.1, device=device, dtype=dtype)
    t = torch.empty(shape, device=device, dtype=torch.float32)
    t.normal_(0.0, 0.02, generator=generator)
    return t.to(dtype)


def write_internvl2(
    out_dir: Path,
    tokenizer: Any,
    *,
    size: str = "tiny",
    seed: int = 0,
    device: str = "cpu",
    version: str | None = None,
    token_ids: dict[str, int] | None = None,
) -> Path:
    """Write config, remote code and random weights; the caller saves the tokenizer files."""
    import torch
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = max(SIZES[size]["llm"]["vocab_size"], tokenizer.get_vocab_size())
    ids = token_ids or {}
    eos, pad = ids.get("eos", 2), ids.get("pad", 2)
    config = build_config(size, vocab_size=vocab, eos_token_id=eos, pad_token_id=pad)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    shutil.copy(REMOTE_CODE, out_dir / REMOTE_CODE.name)
    (out_dir / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [eos], "pad_token_id": pad}) + "\n"
    )

    dtype = torch.bfloat16 if size == "full" else torch.float32
    generator = torch.Generator(device=device).manual_seed(seed)
    tensors = {
        name: _init_tensor(name, shape, generator, device, dtype).contiguous()
        for name, shape in weight_shapes(config).items()
    }
    save_file(
        {k: t.cpu() for k, t in tensors.items()},
        str(out_dir / "model.safetensors"),
        metadata={"format": "pt"},
    )
    n_params = sum(t.numel() for t in tensors.values())
    del tensors
    (out_dir / "oogiri-model.json").write_text(
        json.dumps(
            {
                "version": version or f"internvl2-{size}-random-{seed}",
                "layout": "internvl2",
                "size": size,
                "parameters": n_params,
                "seed": seed,
                "note": "random weights built by oogiri: its answers are noise",
            },
            indent=2,
        )
        + "\n"
    )
    return out_dir
