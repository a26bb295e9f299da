"""Settings of the training loop: ``settings.training``, env ``OOGIRI_TRAINING__…``.

The training plugin (``training.cli``) contributes this section through
``oogiri_register_settings``, as any plugin would; the core knows nothing about it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from oogiri import PluginSettings


class TrainingSettings(PluginSettings):
    """Export, XTuner launch, evaluation gate, promotion and schedule of a retraining run."""

    base_model: Path | None = Field(default=None, description="model folder XTuner fine-tunes")
    xtuner_python: Path | None = Field(default=None, description="python of the training venv")
    work_dir: Path | None = Field(default=None, description="unset: data_dir/training")
    base_dataset: Path | None = Field(default=None, description="XTuner-format JSON to mix in")
    base_ratio: float = Field(default=1.0, ge=0.0, description="base samples per rated sample")
    min_votes: int = Field(default=1, ge=1)
    min_net_score: int = Field(default=1)
    per_user_cap: int = Field(default=50, ge=1)
    heldout_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    every_days: float | None = Field(
        default=7.0, description="retrain at least this often (None: never)"
    )
    min_new_ratings: int | None = Field(default=200, description="or after this many new ratings")
    nproc_per_node: int = 1
    nnodes: int = 1
    max_epochs: int = 1
    batch_size: int = 4
    accumulative_counts: int = 4
    lr: float = 2e-5
    max_length: int = 6656
    # --- export (training/export.py)
    base_image_folder: Path | None = Field(
        default=None, description="image folder of base_dataset; unset: the JSON's own folder"
    )
    per_voter_cap: int | None = Field(
        default=None, ge=1, description="votes counted per voter, earliest first (None: all)"
    )
    max_jokes_per_image: int = Field(default=1, ge=1, description="best-rated jokes kept per image")
    # Web votes come from free identities (a cookie): they count less than platform-verified
    # ones (Telegram, Discord). See docs/training.md "Votes from the web".
    web_votes: Literal["networks", "weight", "exclude", "equal"] = Field(
        default="networks",
        description="networks: weighted, and only from web_min_networks distinct networks; "
        "weight: each counts web_vote_weight; exclude: ignored; equal: like any vote",
    )
    web_vote_weight: float = Field(
        default=0.5, ge=0.0, le=1.0, description="one web vote counts this"
    )
    web_min_networks: int = Field(
        default=3, ge=1, description="distinct voter networks before a joke's web votes count"
    )
    min_examples: int = Field(
        default=257,
        ge=1,
        description="fewer training examples: the run is skipped; 257 is the fewest the default "
        "schedule (batch 4 x accumulation 4, warmup_ratio 0.03, 1 GPU) can train on",
    )
    seed: int = Field(default=0, description="seed of the base-dataset sampling")
    # --- XTuner config and launch (training/config.py, training/run.py)
    template: Path | None = Field(
        default=None, description="XTuner config template; unset: shipped QLoRA"
    )
    warmup_ratio: float = Field(default=0.03, gt=0.0, lt=1.0)
    weight_decay: float = Field(default=0.05, ge=0.0)
    max_norm: float = Field(default=1.0, gt=0.0, description="gradient clipping")
    dataloader_num_workers: int = Field(default=4, ge=0)
    save_steps: int = Field(default=1000, ge=1)
    save_total_limit: int = Field(default=1, description="checkpoints kept (-1: all)")
    quantization_llm: bool = Field(default=True, description="QLoRA: 4-bit LLM")
    lora_r: int = Field(default=128, ge=1)
    lora_alpha: int = Field(default=256, ge=1)
    lora_dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    deepspeed: str | None = Field(default="deepspeed_zero1", description="None: no DeepSpeed")
    convert_script: Path | None = Field(
        default=None,
        description="convert_to_official.py; unset: found in the training venv's xtuner",
    )
    timeout_hours: float | None = Field(
        default=None, gt=0, description="kill a step running longer"
    )
    venv: Path | None = Field(
        default=None, description="where `oogiri train setup` builds the venv"
    )
    # --- evaluation gate (training/gate.py)
    eval_python: Path | None = Field(
        default=None, description="python that evaluates; unset: xtuner's"
    )
    eval_device: str = Field(default="auto", description="auto, cuda, cpu")
    eval_max_samples: int = Field(default=64, ge=1)
    eval_max_new_tokens: int = Field(default=64, ge=1)
    eval_max_dynamic_patch: int = Field(default=6, ge=1)
    gate_loss_tolerance: float = Field(
        default=0.0,
        ge=0.0,
        description="candidate held-out loss may exceed the active one by this share",
    )
    gate_min_heldout: int = Field(
        default=8,
        ge=1,
        description="fewest held-out answers the loss comparison may decide on; fewer: rejected",
    )
    gate_min_sanity: float = Field(
        default=0.8, ge=0.0, le=1.0, description="share of sane generations"
    )
    gate_language: Literal["zh", "en", "any"] | None = Field(
        default=None, description="language generations must be in; unset: settings.language"
    )
    gate_min_chars: int = Field(default=2, ge=0)
    gate_max_chars: int = Field(default=200, ge=1)
    # --- promotion and schedule (training/run.py, training/schedule.py)
    auto_promote: bool = Field(default=True, description="promote a candidate that passes the gate")
    promote_command: list[str] = Field(
        default_factory=lambda: [
            "{python}",
            "-m",
            "bot.cli",
            "engine",
            "swap",
            "{model_dir}",
            "--label",
            "{version}",
        ],
        description="engine swap command; {python} {model_dir} {version} are substituted",
    )
    schedule_mode: Literal["any", "all"] = Field(
        default="any", description="due when any (or all) of every_days / min_new_ratings is met"
    )
    retry_failed_after_hours: float = Field(default=6.0, ge=0.0)
    schedule_in_serve: bool = Field(
        default=False, description="`oogiri serve` checks --if-due itself"
    )
    schedule_check_minutes: float = Field(default=10.0, gt=0.0)

    @model_validator(mode="after")
    def _gate_can_decide(self) -> TrainingSettings:
        if self.eval_max_samples < self.gate_min_heldout:
            raise ValueError(
                f"eval_max_samples ({self.eval_max_samples}) is below gate_min_heldout "
                f"({self.gate_min_heldout}): the gate could never promote a model"
            )
        return self
