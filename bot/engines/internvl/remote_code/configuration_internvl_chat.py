"""Configuration class for InternVL2-layout model folders built by oogiri (remote code).

Written for oogiri. LMDeploy and XTuner load an ``InternVLChatModel`` folder with
``trust_remote_code``; serving needs only this config class, so the project ships its own instead of
redistributing InternVL's. It turns the nested ``llm_config`` / ``vision_config`` dicts into config
objects with attribute access, which is all LMDeploy reads.
"""

from __future__ import annotations

import copy
from typing import Any

try:  # transformers >= 5
    from transformers import PreTrainedConfig as _Base
except ImportError:  # transformers 4.x
    from transformers import PretrainedConfig as _Base


class InternVisionConfig(_Base):
    model_type = "intern_vit_6b"

    def __init__(self, **kwargs: Any) -> None:
        defaults = {
            "num_channels": 3,
            "patch_size": 14,
            "image_size": 448,
            "qkv_bias": True,
            "hidden_size": 1024,
            "num_attention_heads": 16,
            "intermediate_size": 4096,
            "qk_normalization": False,
            "num_hidden_layers": 24,
            "use_flash_attn": False,
            "hidden_act": "gelu",
            "norm_type": "layer_norm",
            "layer_norm_eps": 1e-6,
            "dropout": 0.0,
            "drop_path_rate": 0.0,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "initializer_factor": 0.1,
        }
        defaults.update(kwargs)
        super().__init__(**defaults)


class InternLM2Config(_Base):
    model_type = "internlm2"

    def __init__(self, **kwargs: Any) -> None:
        defaults = {
            "vocab_size": 92553,
            "hidden_size": 2048,
            "intermediate_size": 8192,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "hidden_act": "silu",
            "max_position_embeddings": 32768,
            "initializer_range": 0.02,
            "rms_norm_eps": 1e-5,
            "use_cache": True,
            "bias": False,
            "rope_theta": 1000000,
            "rope_scaling": None,
            "attn_implementation": "eager",
            "tie_word_embeddings": False,
            "pad_token_id": 2,
            "bos_token_id": 1,
            "eos_token_id": 2,
        }
        defaults.update(kwargs)
        rope_scaling = defaults.pop("rope_scaling", None)
        defaults.pop("rope_parameters", None)
        super().__init__(**defaults)
        # transformers 5 (and LMDeploy on it) read rope settings from ``rope_parameters`` only;
        # transformers 4 (XTuner) reads ``rope_theta``/``rope_scaling``. Keep both in step.
        rope: dict[str, Any] = {"rope_type": "default"}
        if isinstance(rope_scaling, dict):
            rope = {k: v for k, v in rope_scaling.items() if k != "type"}
            rope["rope_type"] = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
        rope["rope_theta"] = defaults["rope_theta"]
        if not hasattr(type(self), "rope_parameters"):  # transformers 4: plain attributes
            self.rope_scaling = rope_scaling
        self.rope_parameters = rope
        self.rope_theta = defaults["rope_theta"]


class InternVLChatConfig(_Base):
    model_type = "internvl_chat"
    is_composition = True

    def __init__(
        self,
        vision_config: dict[str, Any] | None = None,
        llm_config: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        vision = vision_config.to_dict() if hasattr(vision_config, "to_dict") else vision_config
        llm = llm_config.to_dict() if hasattr(llm_config, "to_dict") else llm_config
        self.vision_config = InternVisionConfig(**(vision or {}))
        self.llm_config = InternLM2Config(**(llm or {"architectures": ["InternLM2ForCausalLM"]}))
        for key, default in {
            "use_backbone_lora": 0,
            "use_llm_lora": 0,
            "select_layer": -1,
            "force_image_size": 448,
            "downsample_ratio": 0.5,
            "template": "internlm2-chat",
            "dynamic_image_size": True,
            "use_thumbnail": True,
            "ps_version": "v2",
            "min_dynamic_patch": 1,
            "max_dynamic_patch": 12,
        }.items():
            kwargs.setdefault(key, default)
        super().__init__(**kwargs)
        self.tie_word_embeddings = self.llm_config.tie_word_embeddings

    def to_dict(self) -> dict[str, Any]:
        output = copy.deepcopy(super().to_dict())
        output["vision_config"] = self.vision_config.to_dict()
        output["llm_config"] = self.llm_config.to_dict()
        output["model_type"] = self.model_type
        return output


# transformers re-executes a remote-code module in place when it finds it imported without its own
# hash mark, as unpickling does in a worker process (LMDeploy's mp executor; tp > 1). New class
# objects would leave the instances unpickled earlier unpicklable ("not the same object"), and the
# worker dies. Every execution after the first keeps the first classes.
_FIRST: dict[str, type] = globals().get("_FIRST") or {
    cls.__name__: cls for cls in (InternVisionConfig, InternLM2Config, InternVLChatConfig)
}
InternVisionConfig = _FIRST["InternVisionConfig"]  # type: ignore[misc]
InternLM2Config = _FIRST["InternLM2Config"]  # type: ignore[misc]
InternVLChatConfig = _FIRST["InternVLChatConfig"]  # type: ignore[misc]
