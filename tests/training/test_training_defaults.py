"""Defaults that work on a new deployment (issue 15 D): too little data skips, never fails; the
gate's held-out sample is random (seeded), not the best-rated head of the file."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from trainhelp import fake_base_model, fake_venv, seed_ratings

from bot.settings import Settings
from bot.store import Store
from training.config import ConfigError, TrainParams, min_schedule_samples, validate
from training.evaluate_hf import read_items
from training.run import TrainingPipeline
from training.settings import TrainingSettings


def _params(tmp_path: Path, t: TrainingSettings) -> TrainParams:
    data = tmp_path / "train.json"
    data.write_text("[]", encoding="utf-8")
    (tmp_path / "images").mkdir(exist_ok=True)
    t = t.model_copy(update={"base_model": fake_base_model(tmp_path / "base"), "max_length": 1024})
    return TrainParams.from_settings(t, [data], [tmp_path / "images"])


def test_min_schedule_samples_is_exactly_where_the_config_check_starts_passing(
    tmp_path: Path,
) -> None:
    t = TrainingSettings()
    for batch, accum, gpus, epochs, ratio in itertools.product(
        (1, 4), (1, 4), (1, 2), (1, 3), (0.03, 0.2)
    ):
        t2 = t.model_copy(
            update={
                "batch_size": batch,
                "accumulative_counts": accum,
                "max_epochs": epochs,
                "warmup_ratio": ratio,
            }
        )
        params = _params(tmp_path, t2)
        need = min_schedule_samples(batch, accum, gpus, epochs, ratio)
        validate(params, need, gpus)  # passes
        if need > 1:
            with pytest.raises(ConfigError, match="warm-up"):
                validate(params, need - 1, gpus)


def test_default_min_examples_matches_the_default_schedule() -> None:
    t = TrainingSettings()
    need = min_schedule_samples(
        t.batch_size, t.accumulative_counts, 1, t.max_epochs, t.warmup_ratio
    )
    assert t.min_examples == need == 257


def test_min_schedule_samples_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        min_schedule_samples(0, 4, 1, 1, 0.03)
    with pytest.raises(ValueError):
        min_schedule_samples(4, 4, 1, 1, 0.0)


async def test_too_few_samples_for_the_schedule_is_skipped_not_failed(
    tmp_path: Path, tsettings: Settings, tstore: Store
) -> None:
    """min_examples lowered by the operator, default schedule: skipped, with the reason."""
    t = tsettings.training
    t.base_model = fake_base_model(tmp_path / "InternVL2-2B")
    t.xtuner_python = fake_venv(tmp_path / "xtuner-venv")
    t.work_dir = tmp_path / "work"
    t.min_examples = 2
    t.heldout_fraction = 0.25
    t.max_length = 1024
    await seed_ratings(tstore, 8)
    result = await TrainingPipeline(tsettings, tstore, env={}).run()
    assert result.status == "skipped", result.error
    assert result.error is not None and "needs at least 257" in result.error
    assert "warmup_ratio 0.03" in result.error
    (run,) = await tstore.training_runs()
    assert run.status == "skipped" and run.step == "export"
    # two GPUs split the batch: the same data needs twice as much
    result = await TrainingPipeline(tsettings, tstore, env={"NPROC_PER_NODE": "2"}).run()
    assert result.status == "skipped" and "needs at least 513" in (result.error or "")


def _heldout(path: Path, n: int) -> Path:
    items = [
        {
            "id": f"h{i}",
            "image": [f"images/{i}.jpg"],
            "conversations": [
                {"from": "human", "value": "<image>\n讲个梗"},
                {"from": "gpt", "value": f"joke {i}"},
            ],
        }
        for i in range(n)
    ]
    path.write_text(json.dumps(items, ensure_ascii=False), encoding="utf-8")
    return path


def test_heldout_evaluation_samples_at_random_seeded(tmp_path: Path) -> None:
    data = _heldout(tmp_path / "heldout.json", 200)
    first = [i[0] for i in read_items(data, tmp_path, 20)]
    again = [i[0] for i in read_items(data, tmp_path, 20)]
    other = [i[0] for i in read_items(data, tmp_path, 20, seed=1)]
    assert first == again  # candidate and active model see the same items
    assert first != [f"h{i}" for i in range(20)]  # not the best-rated head of the file
    assert first != other and len(set(first)) == 20
    # spread over the whole file, kept in file order
    positions = [int(x[1:]) for x in first]
    assert positions == sorted(positions) and max(positions) >= 100
    # a limit at or above the size keeps everything, in order
    assert [i[0] for i in read_items(data, tmp_path, 500)] == [f"h{i}" for i in range(200)]
