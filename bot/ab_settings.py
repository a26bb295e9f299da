"""Knobs of the live A/B test (``settings.ab``, env ``OOGIRI_AB__…``); see docs/training.md.

Kept apart from ``bot/settings.py`` so that the A/B code owns its section; this module imports
nothing from the rest of the bot (``bot.settings`` imports it).
"""

from __future__ import annotations

from pydantic import BaseModel, Field, model_validator


class AbSettings(BaseModel):
    """Live A/B of every candidate that passes the offline gate (training/gate.py LiveAbStep)."""

    enabled: bool = Field(
        default=True,
        description="candidates that pass the offline gate are tested live before promotion; "
        "off: they are promoted at once (the offline gate alone decides)",
    )
    share: float = Field(
        default=0.2, gt=0.0, le=0.5, description="share of users served the candidate"
    )
    alpha: float = Field(default=0.05, gt=0.0, lt=0.5, description="bound on false promotions")
    min_effect: float = Field(
        default=0.03, gt=0.0, lt=1.0, description="absolute like-rate lift worth promoting"
    )
    min_votes: int = Field(
        default=100, ge=1, description="counted votes per arm before any decision"
    )
    max_days: float = Field(
        default=14.0, gt=0.0, description="undecided after this long: keep active"
    )
    per_voter_cap: int | None = Field(
        default=None,
        ge=1,
        description="votes counted per voter per arm, earliest first; "
        "unset: training.per_voter_cap, else 20",
    )
    failure_margin: float = Field(
        default=0.02,
        ge=0.0,
        lt=1.0,
        description="a candidate may fail (no usable answer) on at most this share of requests "
        "more than the active model; more, shown by the rule's sequence: rejected",
    )
    # --- when and where decisions are taken
    decide_in_serve: bool = Field(
        default=True, description="`oogiri serve` decides running tests itself"
    )
    check_minutes: float = Field(
        default=5.0, gt=0.0, description="how often running tests are decided"
    )
    poll_s: float = Field(
        default=10.0, gt=0.0, description="`oogiri serve` looks for a started/ended test this often"
    )
    # --- auto-rollback: after a promotion the previous model stays on a small arm
    watch: bool = Field(
        default=True, description="after an A/B promotion, watch for a disappointment"
    )
    watch_share: float = Field(
        default=0.1, gt=0.0, le=0.5, description="share kept on the old model"
    )
    rollback_margin: float = Field(
        default=0.03,
        ge=0.0,
        lt=1.0,
        description="roll back when the new model is worse by this much",
    )
    watch_days: float = Field(
        default=7.0, gt=0.0, description="the watch ends (promotion kept) after"
    )
    # --- serving the candidate arm
    candidate_base_url: str | None = Field(
        default=None,
        description="unmanaged engines (openai, lmdeploy without manage): URL of the server "
        "that serves the candidate",
    )
    candidate_served_model_name: str | None = Field(
        default=None, description="model name at candidate_base_url; unset: discovered"
    )
    candidate_gpu: str | None = Field(
        default=None,
        description="managed LMDeploy: CUDA_VISIBLE_DEVICES of the candidate server; "
        "unset: the active server's GPU(s)",
    )
    candidate_cache_max_entry_count: float = Field(
        default=0.1,
        gt=0.0,
        le=1.0,
        description="managed LMDeploy on the same GPU: KV-cache share of the candidate server",
    )
    start_command: list[str] = Field(
        default_factory=list,
        description="run when a test starts (e.g. scale a candidate Deployment); "
        "{model_dir} {version} {python} are substituted",
    )
    stop_command: list[str] = Field(
        default_factory=list, description="run when a test ends; same substitutions"
    )

    @model_validator(mode="after")
    def _url_scheme(self) -> AbSettings:
        url = self.candidate_base_url
        if url is not None and not url.startswith(("http://", "https://")):
            raise ValueError(f"ab.candidate_base_url must start with http(s)://: {url!r}")
        return self
