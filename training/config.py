"""The XTuner config: rendered from a template with paths and hyperparameters, checked first.

The default template (``templates/internvl_v2_internlm2_2b_qlora.py.tmpl``) keeps the tutorial's
QLoRA config semantics. Placeholders are ``{{ name }}``; each becomes the Python literal of its
value (``repr``), so paths with quotes or non-ASCII characters stay valid Python.

``validate`` catches, before any GPU time is spent, what would otherwise fail minutes into a run:
missing paths, a ``max_length`` that cuts the joke off after the image tokens, and a warm-up that
mmengine truncates to 0 iterations on small data sets (which crashes its LR scheduler).
"""

from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from training.settings import TrainingSettings

TEMPLATES_DIR = Path(__file__).parent / "templates"
DEFAULT_TEMPLATE = TEMPLATES_DIR / "internvl_v2_internlm2_2b_qlora.py.tmpl"
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")

# Text around the image in one sample: XTuner's system prompt + chat markup + prompt + a short
# joke. A sequence shorter than image tokens + this loses (part of) the joke to truncation.
TEXT_TOKEN_MARGIN = 128


class ConfigError(ValueError):
    """The config cannot be rendered or would fail at launch; the message says how to fix it."""


@dataclass
class TrainParams:
    """Everything the template needs. ``from_settings`` fills it from settings + an export."""

    model_path: Path
    data_paths: list[Path]
    image_folders: list[Path]
    max_length: int = 6656
    batch_size: int = 4
    accumulative_counts: int = 4
    dataloader_num_workers: int = 4
    max_epochs: int = 6
    lr: float = 2e-5
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.05
    max_norm: float = 1.0
    warmup_ratio: float = 0.03
    save_steps: int = 1000
    save_total_limit: int = 1
    quantization_llm: bool = True
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    seed: int | None = None
    log_interval: int = 10
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_settings(
        cls,
        settings: TrainingSettings,
        data_paths: list[Path],
        image_folders: list[Path],
        **overrides: Any,
    ) -> TrainParams:
        if settings.base_model is None:
            raise ConfigError(
                "settings.training.base_model is not set (OOGIRI_TRAINING__BASE_MODEL)"
            )
        values: dict[str, Any] = dict(
            model_path=Path(settings.base_model),
            data_paths=list(data_paths),
            image_folders=list(image_folders),
            max_length=settings.max_length,
            batch_size=settings.batch_size,
            accumulative_counts=settings.accumulative_counts,
            dataloader_num_workers=settings.dataloader_num_workers,
            max_epochs=settings.max_epochs,
            lr=settings.lr,
            weight_decay=settings.weight_decay,
            max_norm=settings.max_norm,
            warmup_ratio=settings.warmup_ratio,
            save_steps=settings.save_steps,
            save_total_limit=settings.save_total_limit,
            quantization_llm=settings.quantization_llm,
            lora_r=settings.lora_r,
            lora_alpha=settings.lora_alpha,
            lora_dropout=settings.lora_dropout,
            seed=settings.seed,
        )
        values.update(overrides)
        return cls(**values)

    def context(self) -> dict[str, Any]:
        """Template values as plain Python data (paths as strings)."""
        ctx = asdict(self)
        extra = ctx.pop("extra")
        ctx["model_path"] = str(self.model_path)
        ctx["data_paths"] = [str(p) for p in self.data_paths]
        ctx["image_folders"] = [str(p) for p in self.image_folders]
        ctx["repeat_times"] = [1] * len(self.data_paths)
        ctx["betas"] = tuple(self.betas)
        ctx.update(extra)
        return ctx


def render(template: str, context: dict[str, Any]) -> str:
    """Replace every ``{{ name }}`` with ``repr(context[name])``; unknown names are an error."""
    missing = sorted({m.group(1) for m in PLACEHOLDER.finditer(template)} - set(context))
    if missing:
        raise ConfigError(f"template placeholders without a value: {', '.join(missing)}")

    def literal(match: re.Match[str]) -> str:
        value = context[match.group(1)]
        text = repr(value)
        try:  # only plain literals may reach the config
            ast.literal_eval(text)
        except (ValueError, SyntaxError) as exc:
            raise ConfigError(f"{match.group(1)}={value!r} is not a Python literal") from exc
        return text

    out = PLACEHOLDER.sub(literal, template)
    try:
        ast.parse(out)
    except SyntaxError as exc:
        raise ConfigError(f"rendered config is not valid Python: {exc}") from exc
    return out


def load_template(path: Path | None = None) -> str:
    path = Path(path) if path else DEFAULT_TEMPLATE
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config template {path}: {exc}") from exc


def render_config(params: TrainParams, template: Path | None = None) -> str:
    return render(load_template(template), params.context())


# --------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class ModelGeometry:
    """What the base model's config.json says about images (InternVL2 defaults when absent)."""

    image_size: int = 448
    patch_size: int = 14
    downsample_ratio: float = 0.5
    max_dynamic_patch: int = 12
    use_thumbnail: bool = True
    max_positions: int | None = None

    @property
    def tokens_per_tile(self) -> int:
        return int((self.image_size // self.patch_size) ** 2 * self.downsample_ratio**2)

    @property
    def max_tiles(self) -> int:
        return self.max_dynamic_patch + (
            1 if self.use_thumbnail and self.max_dynamic_patch > 1 else 0
        )

    @property
    def max_image_tokens(self) -> int:
        return self.tokens_per_tile * self.max_tiles


def _first(*values: Any) -> Any:
    for v in values:
        if v is not None:
            return v[0] if isinstance(v, list | tuple) else v
    return None


def read_geometry(model_path: Path) -> ModelGeometry:
    cfg_file = Path(model_path) / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"base model config {cfg_file} unreadable: {exc}") from exc
    vision = cfg.get("vision_config") or {}
    llm = cfg.get("llm_config") or cfg.get("text_config") or {}
    d = ModelGeometry()
    return ModelGeometry(
        image_size=int(_first(cfg.get("force_image_size"), vision.get("image_size"), d.image_size)),
        patch_size=int(_first(vision.get("patch_size"), d.patch_size)),
        downsample_ratio=float(_first(cfg.get("downsample_ratio"), d.downsample_ratio)),
        max_dynamic_patch=int(_first(cfg.get("max_dynamic_patch"), d.max_dynamic_patch)),
        use_thumbnail=bool(_first(cfg.get("use_thumbnail"), d.use_thumbnail)),
        max_positions=llm.get("max_position_embeddings"),
    )


@dataclass(frozen=True)
class Plan:
    """What mmengine will do with this config and data set (checked by ``validate``)."""

    samples: int
    world_size: int
    iters_per_epoch: int
    total_iters: int
    warmup_iters: int
    image_tokens: int

    @property
    def peak_lr_fraction(self) -> float:
        """The share of ``lr`` the run actually reaches (see ``warmup_peak``)."""
        return warmup_peak(self.warmup_iters)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


WARMUP_START_FACTOR = 1e-5  # the template's LinearLR start_factor (the tutorial's)


def warmup_peak(warmup_iters: int, start: float = WARMUP_START_FACTOR) -> float:
    """The learning-rate factor mmengine's warm-up leaves behind for the cosine decay.

    LinearLR steps only inside [begin, end), so its last applied factor is the one for iteration
    ``warmup_iters - 1``: start + (T-1)/T × (1 - start). The cosine schedule then decays from
    there. With a one-iteration warm-up the whole run trains at 1e-5 × lr (seen on the device:
    8 iterations at lr 1e-8 instead of 1e-3, held-out loss unchanged); with 4, at 75 % of it.
    """
    if warmup_iters < 1:
        return start
    return start + (warmup_iters - 1) / warmup_iters * (1.0 - start)


def schedule_plan(
    samples: int,
    batch_size: int,
    accumulative_counts: int,
    world_size: int,
    max_epochs: int,
    warmup_ratio: float,
) -> tuple[int, int, int]:
    """(iterations per epoch, total iterations, warm-up iterations) as XTuner/mmengine count them.

    XTuner's LengthGroupedSampler rounds each rank's share up to whole groups of
    ``batch_size × accumulative_counts``; the dataloader then yields ``batch_size`` per iteration;
    mmengine converts the epoch-based warm-up with ``int()`` (truncation).
    """
    group = batch_size * accumulative_counts
    per_rank = math.ceil(samples / world_size / group) * group
    iters_per_epoch = per_rank // batch_size
    total = int(max_epochs * iters_per_epoch)
    warmup = int(warmup_ratio * max_epochs * iters_per_epoch)
    return iters_per_epoch, total, warmup


def min_schedule_samples(
    batch_size: int,
    accumulative_counts: int,
    world_size: int,
    max_epochs: int,
    warmup_ratio: float,
) -> int:
    """The fewest training samples whose schedule ``validate`` accepts (warm-up >= 2 iterations
    and at least one iteration after it).

    Fewer samples than this is a shortage of data, not a broken config: the run is skipped with
    this number in its reason instead of failing (issue 15 D). With the default settings on one
    GPU (batch 4 x accumulation 4, 1 epoch, warm-up ratio 0.03) it is 257.
    """
    if min(batch_size, accumulative_counts, world_size, max_epochs) < 1 or not warmup_ratio > 0:
        raise ValueError("batch_size, accumulative_counts, world_size, max_epochs >= 1, ratio > 0")
    group = batch_size * accumulative_counts * world_size

    def ok(samples: int) -> bool:
        _, total, warmup = schedule_plan(
            samples, batch_size, accumulative_counts, world_size, max_epochs, warmup_ratio
        )
        return 2 <= warmup < total

    # warm-up and total iterations only grow with the samples: double, then bisect
    hi = group
    while not ok(hi):
        hi *= 2
        if hi > 10**12:
            raise ValueError(f"warm-up ratio {warmup_ratio} can never reach 2 iterations")
    lo = 1 if hi == group else hi // 2 + 1
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi


def validate(params: TrainParams, samples: int, world_size: int = 1) -> Plan:
    """Check paths, lengths and the schedule; raise ``ConfigError`` listing every problem."""
    problems: list[str] = []
    model = Path(params.model_path)
    geometry = ModelGeometry()
    if not model.is_dir():
        problems.append(f"base model folder {model} does not exist")
    elif not (model / "config.json").is_file():
        problems.append(f"base model folder {model} has no config.json")
    else:
        try:
            geometry = read_geometry(model)
        except ConfigError as exc:
            problems.append(str(exc))
    if len(params.data_paths) != len(params.image_folders):
        problems.append("data_paths and image_folders differ in length")
    for p in params.data_paths:
        if not Path(p).is_file():
            problems.append(f"data file {p} does not exist")
    for p in params.image_folders:
        if not Path(p).is_dir():
            problems.append(f"image folder {p} does not exist")

    for name in ("batch_size", "accumulative_counts", "max_epochs", "save_steps"):
        if getattr(params, name) < 1:
            problems.append(f"{name} must be >= 1 (got {getattr(params, name)})")
    if not params.lr > 0:
        problems.append(f"lr must be > 0 (got {params.lr})")
    if world_size < 1:
        problems.append(f"world size must be >= 1 (got {world_size})")
    if samples < 1:
        problems.append("the data set is empty")

    need = geometry.max_image_tokens + TEXT_TOKEN_MARGIN
    if params.max_length < need:
        problems.append(
            f"max_length {params.max_length} cannot hold one image of up to {geometry.max_tiles} "
            f"tiles ({geometry.max_image_tokens} tokens) plus the prompt and the joke: XTuner "
            f"would cut the joke off; use max_length >= {need}"
        )
    if geometry.max_positions and params.max_length > geometry.max_positions:
        problems.append(
            f"max_length {params.max_length} exceeds the model's max_position_embeddings "
            f"{geometry.max_positions}"
        )

    ipe = total = warmup = 0
    positive = (
        samples,
        params.batch_size,
        params.accumulative_counts,
        world_size,
        params.max_epochs,
    )
    if min(positive) >= 1:
        ipe, total, warmup = schedule_plan(
            samples,
            params.batch_size,
            params.accumulative_counts,
            world_size,
            params.max_epochs,
            params.warmup_ratio,
        )
        if warmup < 1:
            need_ratio = 2.0 / (params.max_epochs * ipe)  # 1 iteration is not enough either
            problems.append(
                f"warm-up rounds to 0 iterations ({samples} samples, batch {params.batch_size} × "
                f"accumulation {params.accumulative_counts} × {world_size} GPU(s) → {ipe} "
                f"iteration(s) per epoch × {params.max_epochs} epoch(s) × warmup_ratio "
                f"{params.warmup_ratio}), which crashes mmengine's scheduler: raise warmup_ratio "
                f"to >= {need_ratio:.4g}, train more epochs, or add data"
            )
        elif warmup == 1:
            need_ratio = 2.0 / (params.max_epochs * ipe)
            problems.append(
                f"warm-up rounds to 1 iteration: mmengine's LinearLR then never leaves its start "
                f"factor ({WARMUP_START_FACTOR:g}) and the whole run trains at lr × "
                f"{WARMUP_START_FACTOR:g}, i.e. learns nothing; raise warmup_ratio to >= "
                f"{need_ratio:.4g} (2 iterations reach 50 % of lr, 4 reach 75 %), train more "
                "epochs, or add data"
            )
        elif total <= warmup:
            problems.append(
                f"warm-up ({warmup} iterations) leaves no iteration for the cosine decay "
                f"({total} in all): lower warmup_ratio"
            )
    if problems:
        raise ConfigError("invalid training config:\n  - " + "\n  - ".join(problems))
    return Plan(
        samples=samples,
        world_size=world_size,
        iters_per_epoch=ipe,
        total_iters=total,
        warmup_iters=warmup,
        image_tokens=geometry.max_image_tokens,
    )


def log_interval_for(total_iters: int) -> int:
    """The tutorial logs every 10 iterations; short runs log every iteration for live progress."""
    return 10 if total_iters >= 200 else 1


def write_config(
    out_file: Path,
    params: TrainParams,
    samples: int,
    world_size: int = 1,
    template: Path | None = None,
) -> Plan:
    """Validate, render and write the config; returns the schedule plan."""
    plan = validate(params, samples, world_size)
    params.log_interval = log_interval_for(plan.total_iters)
    text = render_config(params, template)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(text, encoding="utf-8")
    return plan
