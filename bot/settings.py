"""Every knob of oogiri, from env (OOGIRI_*, nested with __), a .env file or a TOML file.

Sections are grouped by concern so that a plugin reads only its own part. Secrets are SecretStr so
that printing settings (``oogiri config show``) or logging them never leaks a token.
"""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from bot.ab_settings import AbSettings
from bot.moderation_settings import ModerationSettings

DEFAULT_PROMPT = "请你根据这张图片，讲一个脑洞大开的梗"


class PluginSettings(BaseModel):
    """Base of a settings section: a plugin's own model, registered with
    ``oogiri_register_settings`` and read from ``OOGIRI_<SECTION>__<FIELD>`` (or ``[section]`` in
    oogiri.toml). Use ``SecretStr`` for secrets: ``oogiri config show`` masks them."""


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "oogiri"


class EngineSettings(BaseModel):
    """Which engine answers and how it samples."""

    name: str = Field("transformers", description="registered engine name")
    model: Path | None = Field(
        None, description="local model folder; unset: the tiny demo model is built in data_dir"
    )
    model_version: str | None = Field(None, description="label stored with every joke")
    device: str = "cpu"
    threads: int = Field(0, description="torch threads for the local engine (0: torch's default)")
    max_new_tokens: int = Field(64, ge=1, le=1024)
    temperature: float = Field(0.8, ge=0.0, le=2.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    max_dynamic_patch: int = Field(6, ge=1, le=40, description="InternVL tiles per image")
    timeout_s: float = Field(60.0, gt=0)
    # HTTP engines (lmdeploy / openai-compatible)
    base_urls: list[str] = Field(default_factory=lambda: ["http://127.0.0.1:23333"])
    api_key: SecretStr | None = None
    served_model_name: str | None = Field(None, description="unset: discovered from /v1/models")
    retries: int = Field(2, ge=0, le=10)
    empty_answer_retries: int = Field(
        1, ge=0, le=5, description="ask again when the model's answer is empty (sampling differs)"
    )
    min_new_tokens: int = Field(
        1,
        ge=0,
        le=1024,
        description="lmdeploy: tokens before the end token is allowed (0: off); no blank jokes",
    )
    max_in_flight: int = Field(64, ge=1)
    breaker_failures: int = Field(5, ge=1, description="consecutive failures that open the breaker")
    breaker_reset_s: float = Field(15.0, gt=0)
    presize_to_tiles: bool = Field(True, description="resize images to the tile grid before upload")
    # managed LMDeploy server
    manage: bool = False
    backend: Literal["pytorch", "turbomind"] = "pytorch"
    tp: int = Field(1, ge=1)
    session_len: int = 8192
    cache_max_entry_count: float = Field(0.2, gt=0, le=1)
    max_batch_size: int = 256
    max_prefill_token_num: int | None = Field(
        16384,
        ge=1,
        description="prompt tokens per engine step; LMDeploy's 8192 holds four 6-tile requests "
        "(16384: +11 % jokes/s on an H100, docs/benchmarks.md); unset: LMDeploy's default",
    )
    chat_template: Path | None = Field(None, description="unset: the shipped InternVL2 template")
    port: int = 23333
    server_threads: int = Field(2, ge=1, description="OMP/MKL threads of the managed server")
    extra_args: list[str] = Field(default_factory=list)
    # HTTP engine details (bot/engines/openai_http.py)
    connect_timeout_s: float = Field(5.0, gt=0)
    retry_backoff_s: float = Field(
        0.2, ge=0, description="first retry delay; doubles per retry, ±50% jitter, capped at 5 s"
    )
    request_extra: dict[str, Any] = Field(
        default_factory=dict,
        description="extra JSON fields for every chat request (e.g. ignore_eos for benchmarks)",
    )
    # managed server details (bot/engines/lmdeploy_server.py)
    server_command: list[str] = Field(
        default_factory=list,
        description="argv that runs lmdeploy's CLI; empty: [this python, -m, lmdeploy]",
    )
    server_host: str = Field("127.0.0.1", description="--server-name of the managed server")
    trust_remote_code: bool = Field(True, description="InternVL2 folders need remote config code")
    startup_timeout_s: float = Field(900.0, gt=0, description="wait this long for /health")
    drain_timeout_s: float = Field(
        180.0, gt=0, description="swap: wait this long for in-flight requests on the old server"
    )
    control_socket: Path | None = Field(
        None, description="admin socket of `oogiri serve`; unset: data_dir/run/engine.sock"
    )


class ImageSettings(BaseModel):
    """Limits applied to untrusted uploads before and during decoding."""

    max_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_pixels: int = Field(40_000_000, ge=1, description="width*height before decoding")
    max_side: int = Field(2048, ge=64, description="longest side after normalisation")
    max_aspect: float = Field(20.0, ge=1.0, description="longest/shortest side")
    jpeg_quality: int = Field(92, ge=50, le=100)
    # Memory, not pixels, is what a decode costs: a 16-bit or float picture needs more per pixel.
    max_decoded_bytes: int = Field(
        256 * 1024 * 1024, ge=1024 * 1024, description="estimated memory to decode one picture"
    )
    decode_budget_bytes: int = Field(
        512 * 1024 * 1024, ge=1024 * 1024, description="estimated decode memory of all at once"
    )
    decode_wait_s: float = Field(30.0, ge=0, description="wait for decode memory before 'busy'")


class LimitSettings(BaseModel):
    """Rate limits and the concurrency cap enforced by JokeService."""

    per_user_per_minute: int = Field(6, ge=0, description="0: unlimited")
    per_chat_per_minute: int = Field(30, ge=0, description="0: unlimited")
    max_concurrency: int = Field(4, ge=1, description="engine calls in flight per process")
    queue_timeout_s: float = Field(20.0, ge=0, description="wait for a slot before 'busy'")
    max_queue: int = Field(64, ge=0, description="waiting for a slot; more: busy now (0: no bound)")
    backend: str = Field("memory", description="'memory', or a redis:// URL shared by replicas")
    max_hint_chars: int = Field(200, ge=0)


class StoreSettings(BaseModel):
    url: str | None = Field(None, description="SQLAlchemy async URL; unset: SQLite in data_dir")
    echo: bool = False


class WebSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 8000
    cookie_secret: SecretStr | None = Field(
        None, description="unset: a random secret is created once in data_dir"
    )
    secure_cookies: bool = Field(False, description="set when served over HTTPS")
    public_stats: bool = True


class TelegramSettings(BaseModel):
    token: SecretStr | None = None
    mode: Literal["polling", "webhook"] = "polling"
    webhook_url: str | None = None
    webhook_secret: SecretStr | None = None
    webhook_path: str = "/telegram/webhook"
    admin_ids: list[int] = Field(default_factory=list)
    language: Literal["auto", "zh", "en"] = "auto"
    base_url: str | None = Field(None, description="Bot API base URL (tests, local Bot API server)")
    base_file_url: str | None = None
    # flow control and the outbox (docs/telegram.md)
    private_per_s: float = Field(1.0, gt=0, description="messages a second into one private chat")
    group_per_minute: float = Field(20.0, gt=0, description="messages a minute into one group")
    global_per_s: float = Field(30.0, gt=0, description="messages a second in all, every chat")
    flood_retries: int = Field(
        2, ge=0, le=10, description="429 answers waited out in a send before the outbox takes it"
    )
    outbox_max_age_s: float = Field(
        6 * 3600.0, gt=0, description="an undelivered reply is given up (counted, logged) after"
    )
    outbox_lease_s: float = Field(
        60.0, gt=0, description="a replica's claim on a reply; a killed one's lapses after this"
    )
    outbox_poll_s: float = Field(1.0, gt=0, description="how often pending replies are retried")
    slow_down_notice_s: float = Field(
        60.0, ge=0, description="at most one 'slow down' notice per user in this window"
    )
    edit_window_s: float = Field(
        1.0, ge=0, description="vote-count edits of one message are coalesced within this window"
    )


class DiscordSettings(BaseModel):
    token: SecretStr | None = None
    dev_guild_id: int | None = Field(None, description="sync commands here only (fast iteration)")
    clear_guild_ids: list[int] = Field(
        default_factory=list,
        description="remove the bot's server-only commands here at start (after dev_guild_id)",
    )
    max_attachment_bytes: int = 10 * 1024 * 1024
    shard_count: int | None = None
    shard_ids: list[int] | None = None
    api_base_url: str | None = Field(None, description="REST base (tests)")
    gateway_url: str | None = Field(None, description="gateway override (tests)")
    sync_on_start: bool | None = Field(
        None,
        description="sync slash commands when `serve` starts; unset: only with dev_guild_id "
        "(production: run `oogiri discord sync` once per release instead)",
    )
    admin_ids: list[int] = Field(
        default_factory=list, description="users who may use /mod besides server administrators"
    )
    outbox_max_age_s: float = Field(
        14 * 60.0,
        gt=0,
        le=15 * 60.0,
        description="an undelivered follow-up is given up after this (tokens last 15 min)",
    )
    outbox_lease_s: float = Field(60.0, gt=0)
    outbox_poll_s: float = Field(1.0, gt=0)


class TrainingSettings(BaseModel):
    base_model: Path | None = Field(None, description="model folder XTuner fine-tunes")
    xtuner_python: Path | None = Field(None, description="python of the training venv")
    work_dir: Path | None = Field(None, description="unset: data_dir/training")
    base_dataset: Path | None = Field(None, description="XTuner-format JSON to mix in")
    base_ratio: float = Field(1.0, ge=0.0, description="base samples per rated sample")
    min_votes: int = Field(1, ge=1)
    min_net_score: int = Field(1)
    per_user_cap: int = Field(50, ge=1)
    heldout_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    every_days: float | None = Field(7.0, description="retrain at least this often (None: never)")
    min_new_ratings: int | None = Field(200, description="or after this many new ratings")
    nproc_per_node: int = 1
    nnodes: int = 1
    max_epochs: int = 1
    batch_size: int = 4
    accumulative_counts: int = 4
    lr: float = 2e-5
    max_length: int = 6656
    # --- export (training/export.py)
    base_image_folder: Path | None = Field(
        None, description="image folder of base_dataset; unset: the JSON's own folder"
    )
    per_voter_cap: int | None = Field(
        None, ge=1, description="votes counted per voter, earliest first (None: all)"
    )
    max_jokes_per_image: int = Field(1, ge=1, description="best-rated jokes kept per image")
    min_examples: int = Field(
        257,
        ge=1,
        description="fewer training examples: the run is skipped; 257 is the fewest the default "
        "schedule (batch 4 x accumulation 4, warmup_ratio 0.03, 1 GPU) can train on",
    )
    seed: int = Field(0, description="seed of the base-dataset sampling")
    # --- XTuner config and launch (training/config.py, training/run.py)
    template: Path | None = Field(None, description="XTuner config template; unset: shipped QLoRA")
    warmup_ratio: float = Field(0.03, gt=0.0, lt=1.0)
    weight_decay: float = Field(0.05, ge=0.0)
    max_norm: float = Field(1.0, gt=0.0, description="gradient clipping")
    dataloader_num_workers: int = Field(4, ge=0)
    save_steps: int = Field(1000, ge=1)
    save_total_limit: int = Field(1, description="checkpoints kept (-1: all)")
    quantization_llm: bool = Field(True, description="QLoRA: 4-bit LLM")
    lora_r: int = Field(128, ge=1)
    lora_alpha: int = Field(256, ge=1)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    deepspeed: str | None = Field("deepspeed_zero1", description="None: no DeepSpeed")
    convert_script: Path | None = Field(
        None, description="convert_to_official.py; unset: found in the training venv's xtuner"
    )
    timeout_hours: float | None = Field(None, gt=0, description="kill a step running longer")
    venv: Path | None = Field(None, description="where `oogiri train setup` builds the venv")
    # --- evaluation gate (training/gate.py)
    eval_python: Path | None = Field(None, description="python that evaluates; unset: xtuner's")
    eval_device: str = Field("auto", description="auto, cuda, cpu")
    eval_max_samples: int = Field(64, ge=1)
    eval_max_new_tokens: int = Field(64, ge=1)
    eval_max_dynamic_patch: int = Field(6, ge=1)
    gate_loss_tolerance: float = Field(
        0.0, ge=0.0, description="candidate held-out loss may exceed the active one by this share"
    )
    gate_min_heldout: int = Field(
        8,
        ge=1,
        description="fewest held-out answers the loss comparison may decide on; fewer: rejected",
    )
    gate_min_sanity: float = Field(0.8, ge=0.0, le=1.0, description="share of sane generations")
    gate_language: Literal["zh", "en", "any"] | None = Field(
        None, description="language generations must be in; unset: settings.language"
    )
    gate_min_chars: int = Field(2, ge=0)
    gate_max_chars: int = Field(200, ge=1)
    # --- promotion and schedule (training/run.py, training/schedule.py)
    auto_promote: bool = Field(True, description="promote a candidate that passes the gate")
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
        "any", description="due when any (or all) of every_days / min_new_ratings is met"
    )
    retry_failed_after_hours: float = Field(6.0, ge=0.0)
    schedule_in_serve: bool = Field(False, description="`oogiri serve` checks --if-due itself")
    schedule_check_minutes: float = Field(10.0, gt=0.0)

    @model_validator(mode="after")
    def _gate_can_decide(self) -> TrainingSettings:
        if self.eval_max_samples < self.gate_min_heldout:
            raise ValueError(
                f"eval_max_samples ({self.eval_max_samples}) is below gate_min_heldout "
                f"({self.gate_min_heldout}): the gate could never promote a model"
            )
        return self


class Settings(BaseSettings):
    """The whole configuration. Precedence: init > env > .env > TOML file > defaults."""

    model_config = SettingsConfigDict(
        env_prefix="OOGIRI_",
        env_nested_delimiter="__",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        toml_file=os.environ.get("OOGIRI_CONFIG_FILE", "oogiri.toml"),
    )

    data_dir: Path = Field(default_factory=_default_data_dir)
    # NoDecode: the env value is split by the validator below instead of parsed as JSON first.
    channels: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["web"])
    plugins: Annotated[list[str] | None, NoDecode] = Field(
        None, description="load only these plugins (entry-point names); unset: all"
    )
    prompt: str = DEFAULT_PROMPT
    language: Literal["zh", "en"] = "zh"
    log_level: str = "INFO"

    engine: EngineSettings = Field(default_factory=EngineSettings)
    images: ImageSettings = Field(default_factory=ImageSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    web: WebSettings = Field(default_factory=WebSettings)
    telegram: TelegramSettings = Field(default_factory=TelegramSettings)
    discord: DiscordSettings = Field(default_factory=DiscordSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    ab: AbSettings = Field(default_factory=AbSettings)
    moderation: ModerationSettings = Field(default_factory=ModerationSettings)

    @field_validator("channels", "plugins", mode="before")
    @classmethod
    def _split_csv(cls, value: Any) -> Any:
        # OOGIRI_PLUGINS=web,telegram is friendlier than JSON for a list; both are accepted.
        if isinstance(value, str):
            if value.strip().startswith("["):
                return json.loads(value)
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            env_settings,
            dotenv_settings,
            TomlConfigSettingsSource(settings_cls),
            file_secret_settings,
        )

    @cached_property
    def database_url(self) -> str:
        if self.store.url:
            return self.store.url
        return f"sqlite+aiosqlite:///{self.data_dir / 'oogiri.sqlite3'}"

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    def masked(self) -> dict[str, Any]:
        """Effective settings as JSON-safe data with every secret replaced by '**********'."""
        return self.model_dump(mode="json")


def mask_url(url: str) -> str:
    """Hide the password in a database URL before it reaches a log line."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable url>"
