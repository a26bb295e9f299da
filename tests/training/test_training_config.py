"""XTuner config: the template renders to the tutorial's semantics; validation catches bad plans."""

from __future__ import annotations

import json
import math
import re
import sys
import types
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from training.config import (
    DEFAULT_TEMPLATE,
    WARMUP_START_FACTOR,
    ConfigError,
    TrainParams,
    log_interval_for,
    read_geometry,
    render,
    render_config,
    schedule_plan,
    validate,
    warmup_peak,
    write_config,
)
from training.settings import TrainingSettings

TUTORIAL = "internvl-xtuner-lmdeploy-tutorial.md"
TUTORIAL_CANDIDATES = [
    Path("/work/shared/seed") / TUTORIAL,
    Path(__file__).resolve().parents[2] / "shared" / "seed" / TUTORIAL,
]


class Sym:
    """Stands for anything the config imports (a class, a function): compared by name."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __getattr__(self, attr: str) -> Sym:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return Sym(f"{self.name}.{attr}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sym) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return f"<{self.name}>"


STUBBED = [
    "mmengine",
    "mmengine.hooks",
    "mmengine.optim",
    "peft",
    "torch",
    "torch.optim",
    "transformers",
    "xtuner",
    "xtuner.dataset",
    "xtuner.dataset.collate_fns",
    "xtuner.dataset.samplers",
    "xtuner.engine",
    "xtuner.engine.hooks",
    "xtuner.engine.runner",
    "xtuner.model",
    "xtuner.utils",
]


def exec_config(text: str) -> dict[str, Any]:
    """Execute a config with every import stubbed; return its top-level values."""
    modules = {}
    for name in STUBBED:
        mod = types.ModuleType(name)
        mod.__path__ = []  # type: ignore[attr-defined]
        mod.__getattr__ = lambda attr, _n=name: Sym(f"{_n.split('.')[0]}.{attr}")  # type: ignore[attr-defined]
        modules[name] = mod
    ns: dict[str, Any] = {}
    with mock.patch.dict(sys.modules, modules):
        exec(compile(text, "<config>", "exec"), ns)
    return {k: v for k, v in ns.items() if not k.startswith("__")}


def tutorial_params(tmp: Path | None = None) -> TrainParams:
    return TrainParams(
        model_path=Path("/root/model/InternVL2-2B"),
        data_paths=[Path("/root/InternLM/datasets/CLoT_cn_2000/ex_cn.json")],
        image_folders=[Path("/root/InternLM/datasets/CLoT_cn_2000/")],
        max_length=6656,
        batch_size=4,
        accumulative_counts=4,
        dataloader_num_workers=4,
        max_epochs=6,
        lr=2e-5,
        betas=(0.9, 0.999),
        weight_decay=0.05,
        max_norm=1,
        warmup_ratio=0.03,
        save_steps=1000,
        save_total_limit=1,
        quantization_llm=True,
        lora_r=128,
        lora_alpha=256,
        lora_dropout=0.05,
        seed=None,
        log_interval=10,
    )


SEMANTIC_KEYS = [
    "model",
    "llava_dataset",
    "train_dataloader",
    "optim_wrapper",
    "param_scheduler",
    "train_cfg",
    "tokenizer",
    "custom_hooks",
    "default_hooks",
    "env_cfg",
    "visualizer",
    "log_level",
    "load_from",
    "resume",
    "randomness",
    "log_processor",
]


def normalise(cfg: dict[str, Any]) -> dict[str, Any]:
    """Data paths as lists with explicit repeat_times 1 (what XTuner does with a single path)."""
    out = {k: cfg[k] for k in SEMANTIC_KEYS}
    for d in (out["llava_dataset"], out["train_dataloader"]["dataset"]):
        for key in ("data_paths", "image_folders"):
            if isinstance(d[key], str):
                d[key] = [d[key]]
        d.setdefault("repeat_times", [1] * len(d["data_paths"]))
        d["image_folders"] = [p.rstrip("/") for p in d["image_folders"]]
    return out


def test_rendered_default_has_the_tutorial_semantics() -> None:
    cfg = exec_config(render_config(tutorial_params()))
    model = cfg["model"]
    assert model["type"] == Sym("xtuner.InternVL_V1_5")
    assert model["model_path"] == "/root/model/InternVL2-2B"
    assert model["freeze_llm"] is True and model["freeze_visual_encoder"] is True
    assert model["quantization_llm"] is True and model["quantization_vit"] is False
    assert model["llm_lora"] == {
        "type": Sym("peft.LoraConfig"),
        "r": 128,
        "lora_alpha": 256,
        "lora_dropout": 0.05,
        "target_modules": None,
        "task_type": "CAUSAL_LM",
    }
    ds = cfg["llava_dataset"]
    assert ds["type"] == Sym("xtuner.InternVL_V1_5_Dataset")
    assert ds["template"] == Sym("xtuner.PROMPT_TEMPLATE.internlm2_chat")
    assert ds["repeat_times"] == [1] and ds["max_length"] == 6656
    dl = cfg["train_dataloader"]
    assert dl["batch_size"] == 4 and dl["num_workers"] == 4 and dl["dataset"] is ds
    assert dl["sampler"]["per_device_batch_size"] == 16
    assert dl["sampler"]["length_property"] == "modality_length"
    opt = cfg["optim_wrapper"]
    assert opt["type"] == Sym("mmengine.AmpOptimWrapper") and opt["dtype"] == "float16"
    assert opt["optimizer"] == {
        "type": Sym("torch.AdamW"),
        "lr": 2e-5,
        "betas": (0.9, 0.999),
        "weight_decay": 0.05,
    }
    assert opt["accumulative_counts"] == 4 and opt["loss_scale"] == "dynamic"
    assert opt["clip_grad"] == {"max_norm": 1, "error_if_nonfinite": False}
    warm, cos = cfg["param_scheduler"]
    assert warm["type"] == Sym("mmengine.LinearLR") and warm["start_factor"] == 1e-5
    assert warm["begin"] == 0 and warm["end"] == pytest.approx(0.18)
    assert cos["begin"] == pytest.approx(0.18) and cos["end"] == 6 and cos["eta_min"] == 0.0
    assert all(s["by_epoch"] and s["convert_to_iter_based"] for s in (warm, cos))
    assert cfg["train_cfg"] == {"type": Sym("xtuner.TrainLoop"), "max_epochs": 6}
    hooks = cfg["default_hooks"]
    assert hooks["logger"]["interval"] == 10 and hooks["logger"]["log_metric_by_epoch"] is False
    assert hooks["checkpoint"]["interval"] == 1000 and hooks["checkpoint"]["max_keep_ckpts"] == 1
    assert hooks["checkpoint"]["by_epoch"] is False and not hooks["checkpoint"]["save_optimizer"]
    assert cfg["log_processor"] == {"by_epoch": False}
    assert cfg["randomness"] == {"seed": None, "deterministic": False}


def _tutorial_config() -> str | None:
    for path in TUTORIAL_CANDIDATES:
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            blocks = re.findall(r"```python\n(.*?)```", text, re.S)
            return next(b for b in blocks if "InternVL_V1_5_Dataset" in b)
    return None


def test_rendered_default_equals_the_tutorials_config_object_for_object() -> None:
    """Where the tutorial is available (the shared seed), compare every config object."""
    source = _tutorial_config()
    if source is None:
        pytest.skip("the tutorial (shared/seed) is not in this checkout")
    ours = normalise(exec_config(render_config(tutorial_params())))
    theirs = normalise(exec_config(source))
    for key in SEMANTIC_KEYS:
        assert ours[key] == theirs[key], key


def test_settings_reach_the_rendered_config(tmp_path: Path) -> None:
    s = TrainingSettings(
        base_model=tmp_path / "m'odel 模型",
        batch_size=2,
        accumulative_counts=8,
        max_epochs=3,
        lr=1e-4,
        lora_r=16,
        lora_alpha=32,
        quantization_llm=False,
        warmup_ratio=0.1,
        seed=7,
    )
    params = TrainParams.from_settings(
        s, [tmp_path / "a.json", tmp_path / "b.json"], [tmp_path / "a", tmp_path / "b"]
    )
    cfg = exec_config(render_config(params))
    assert cfg["path"] == str(tmp_path / "m'odel 模型")  # quotes and CJK survive
    expected = [str(tmp_path / "a.json"), str(tmp_path / "b.json")]
    assert cfg["llava_dataset"]["data_paths"] == expected
    assert cfg["llava_dataset"]["repeat_times"] == [1, 1]
    assert cfg["train_dataloader"]["sampler"]["per_device_batch_size"] == 16
    assert cfg["model"]["llm_lora"]["r"] == 16 and cfg["model"]["quantization_llm"] is False
    assert cfg["optim_wrapper"]["optimizer"]["lr"] == 1e-4
    assert cfg["randomness"]["seed"] == 7
    with pytest.raises(ConfigError, match="base_model"):
        TrainParams.from_settings(TrainingSettings(), [], [])


def test_render_refuses_unknown_placeholders_and_non_literals() -> None:
    with pytest.raises(ConfigError, match="nope"):
        render("x = {{ nope }}\n", {})
    with pytest.raises(ConfigError, match="not a Python literal"):
        render("x = {{ v }}\n", {"v": object()})
    assert render("x = {{v}}\ny = {{ v }}\n", {"v": [1, "二"]}) == "x = [1, '二']\ny = [1, '二']\n"


def test_custom_template(tmp_path: Path) -> None:
    tpl = tmp_path / "t.py.tmpl"
    tpl.write_text("lr = {{ lr }}\nmax_epochs = {{ max_epochs }}\n", encoding="utf-8")
    assert render_config(tutorial_params(), tpl) == "lr = 2e-05\nmax_epochs = 6\n"
    with pytest.raises(ConfigError, match="cannot read"):
        render_config(tutorial_params(), tmp_path / "missing.tmpl")


def test_default_template_is_packaged() -> None:
    assert DEFAULT_TEMPLATE.is_file() and DEFAULT_TEMPLATE.suffix == ".tmpl"


# --------------------------------------------------------------------------- schedule math


def simulate(samples: int, bs: int, acc: int, world: int, epochs: int, ratio: float) -> tuple:
    """XTuner's LengthGroupedSampler + DataLoader + mmengine's epoch→iter conversion."""
    group = bs * acc
    num_iters = math.ceil(samples / world / group)
    per_rank = num_iters * group
    loader_len = math.ceil(per_rank / bs)
    return loader_len, int(epochs * loader_len), int(ratio * epochs * loader_len)


@pytest.mark.parametrize(
    "case",
    [
        (2000, 4, 4, 1, 6, 0.03),
        (2000, 4, 4, 2, 6, 0.03),
        (10, 4, 4, 1, 1, 0.03),
        (33, 2, 3, 4, 2, 0.5),
        (1, 1, 1, 1, 1, 0.9),
    ],
)
def test_schedule_plan_matches_xtuner(case: tuple) -> None:
    assert schedule_plan(*case) == simulate(*case)


def test_schedule_plan_tutorial_numbers() -> None:
    # CLoT_cn_2000 on one GPU: 125 groups of 16 → 500 iterations per epoch, 3000 in 6 epochs
    # (the tutorial's "iter_3000.pth"), 90 warm-up iterations.
    assert schedule_plan(2000, 4, 4, 1, 6, 0.03) == (500, 3000, 90)


# --------------------------------------------------------------------------- validation


def fake_model(tmp_path: Path, **cfg: Any) -> Path:
    model = tmp_path / "base"
    model.mkdir(exist_ok=True)
    config = {
        "architectures": ["InternVLChatModel"],
        "force_image_size": 448,
        "downsample_ratio": 0.5,
        "max_dynamic_patch": 12,
        "use_thumbnail": True,
        "vision_config": {"patch_size": 14, "image_size": 448},
        "llm_config": {"max_position_embeddings": 32768},
    }
    config.update(cfg)
    (model / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return model


def valid_params(tmp_path: Path, **kw: Any) -> TrainParams:
    data = tmp_path / "train.json"
    data.write_text("[]", encoding="utf-8")
    values: dict[str, Any] = dict(
        model_path=kw.pop("model_path", None) or fake_model(tmp_path),
        data_paths=[data],
        image_folders=[tmp_path],
        max_epochs=1,
        warmup_ratio=0.03,
    )
    values.update(kw)
    return TrainParams(**values)


def test_validate_accepts_a_sane_plan(tmp_path: Path) -> None:
    plan = validate(valid_params(tmp_path, max_epochs=6), samples=2000)
    assert (plan.iters_per_epoch, plan.total_iters, plan.warmup_iters) == (500, 3000, 90)
    assert plan.image_tokens == 13 * 256
    assert read_geometry(tmp_path / "base").tokens_per_tile == 256


def test_validate_explains_a_warmup_rounded_to_zero(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        validate(valid_params(tmp_path), samples=40)  # 12 iterations × 0.03 → 0
    msg = str(err.value)
    assert "warm-up rounds to 0 iterations" in msg and "raise warmup_ratio to >= 0.1667" in msg
    plan = validate(valid_params(tmp_path, warmup_ratio=0.1667), samples=40)
    assert plan.warmup_iters == 2 and plan.total_iters == 12
    assert plan.peak_lr_fraction == pytest.approx(0.5, abs=1e-4)
    # more GPUs → fewer iterations per epoch → the same warm-up ratio can round down again
    with pytest.raises(ConfigError, match="4 GPU"):
        validate(valid_params(tmp_path, warmup_ratio=0.1667), samples=40, world_size=4)


def test_validate_refuses_a_one_iteration_warmup(tmp_path: Path) -> None:
    """The device run's schedule: 8 iterations, warm-up 1 → trained at lr × 1e-5 throughout."""
    with pytest.raises(ConfigError) as err:
        validate(valid_params(tmp_path, warmup_ratio=0.0834), samples=40)  # 12 × 0.0834 → 1
    msg = str(err.value)
    assert "rounds to 1 iteration" in msg and "raise warmup_ratio to >= 0.1667" in msg


def test_warmup_peak_follows_mmengine_linear_lr() -> None:
    """mmengine's chained LinearLR factors, multiplied out step by step as it applies them."""
    for warmup in (1, 2, 4, 30):
        lr, start = 1.0, WARMUP_START_FACTOR
        for step in range(warmup):  # LinearLR acts only inside [0, warmup)
            if step == 0:
                lr *= start
            else:
                lr *= 1 + (1 - start) / (warmup * start + (step - 1) * (1 - start))
        assert warmup_peak(warmup) == pytest.approx(lr, rel=1e-9)
    assert warmup_peak(1) == WARMUP_START_FACTOR  # the device run: 1e-3 × 1e-5 = 1e-8
    assert warmup_peak(4) == pytest.approx(0.75, abs=1e-4)


def test_validate_rejects_warmup_that_eats_the_whole_run(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="leaves no iteration"):
        validate(valid_params(tmp_path, warmup_ratio=1.0), samples=16, world_size=1)


def test_validate_lists_every_problem(tmp_path: Path) -> None:
    params = valid_params(
        tmp_path,
        data_paths=[tmp_path / "missing.json"],
        image_folders=[tmp_path / "nowhere"],
        max_length=1000,
        batch_size=0,
    )
    with pytest.raises(ConfigError) as err:
        validate(params, samples=100)
    msg = str(err.value)
    assert "missing.json does not exist" in msg
    assert "nowhere does not exist" in msg
    assert "max_length 1000 cannot hold one image of up to 13 tiles (3328 tokens)" in msg
    assert "batch_size must be >= 1" in msg
    with pytest.raises(ConfigError, match="does not exist"):
        validate(valid_params(tmp_path, model_path=tmp_path / "no-model"), samples=100)
    with pytest.raises(ConfigError, match="empty"):
        validate(valid_params(tmp_path), samples=0)


def test_validate_max_length_against_model_limits(tmp_path: Path) -> None:
    fake_model(tmp_path, llm_config={"max_position_embeddings": 4096})
    with pytest.raises(ConfigError, match="exceeds the model's max_position_embeddings 4096"):
        validate(valid_params(tmp_path, max_length=6656, model_path=tmp_path / "base"), 2000)
    fake_model(tmp_path, max_dynamic_patch=1, use_thumbnail=True)
    plan = validate(valid_params(tmp_path, max_length=512, model_path=tmp_path / "base"), 2000)
    assert plan.image_tokens == 256  # one tile, no thumbnail for a single tile


def test_write_config_validates_then_writes(tmp_path: Path) -> None:
    out = tmp_path / "cfg" / "xtuner_config.py"
    plan = write_config(out, valid_params(tmp_path, max_epochs=2, warmup_ratio=0.1), samples=64)
    cfg = exec_config(out.read_text(encoding="utf-8"))
    assert cfg["max_epochs"] == 2 and plan.total_iters == 32
    assert cfg["default_hooks"]["logger"]["interval"] == log_interval_for(32) == 1
    with pytest.raises(ConfigError):
        write_config(tmp_path / "bad.py", valid_params(tmp_path), samples=1)
    assert not (tmp_path / "bad.py").exists()
