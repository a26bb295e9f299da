"""Review of the learning loop's CPU-side logic: each test here failed before its fix.

- export: the best-rated copy of a joke wins (and the data card's like-rates count) when web
  votes make the scores fractional;
- A/B: a promotion or an auto-rollback cancelled midway (``oogiri serve`` shutting down while
  the decider swaps) leaves the test and the registry agreeing with what serves;
- run: a cancelled run does not leave its unregistered model folder behind.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from trainhelp import fake_base_model, fake_venv, seed_ratings

from bot.models import NormalizedImage
from bot.settings import Settings
from bot.store import Store
from training.ab import decide_tests, start_test
from training.export import _like_rate, select
from training.gate import EvalResult
from training.run import TrainingPipeline, ensure_registry
from training.settings import TrainingSettings

# --------------------------------------------------------------------------- export


def _example(joke_id: int, up: float, down: float, sha: str = "a" * 64) -> dict[str, Any]:
    return {
        "id": f"oogiri-{joke_id}",
        "kind": "positive",
        "image_sha256": sha,
        "image_path": f"/nowhere/{sha}.jpg",
        "prompt": "讲个笑话",
        "text": f"笑话{joke_id}",
        "joke_id": joke_id,
        "user_id": f"test:asker-{joke_id}",
        "up": up,
        "down": down,
        "net": up - down,
        "source": "ratings",
    }


def test_the_best_rated_joke_of_a_picture_wins_with_fractional_web_votes() -> None:
    # web votes at weight 0.5 make scores like 1.5: it beats a joke with net 1 on the same picture
    settings = TrainingSettings(heldout_fraction=0.0, max_jokes_per_image=1)
    weaker = _example(1, up=1, down=0)  # one platform 👍
    better = _example(2, up=1.5, down=0)  # the same, plus a web 👍 at half weight
    train, heldout, _neg, counts = select([weaker, better], settings)
    assert [e["id"] for e in train + heldout] == ["oogiri-2"]
    assert counts["over_image_cap"] == 1


def test_the_data_cards_like_rate_counts_fractional_votes() -> None:
    # 1.5 likes and 0.5 dislikes: a like-rate of 75 %, not 1/1 = 100 %
    assert _like_rate([_example(1, up=1.5, down=0.5)]) == 0.75


# --------------------------------------------------------------------------- A/B: cancelled acts


def _image() -> NormalizedImage:
    return NormalizedImage.of(b"\xff\xd8" + b"x" * 50 + b"\xff\xd9", 4, 3, "PNG")


async def _seed(store: Store, version: str, votes: int, likes: int, tag: str) -> None:
    for i in range(votes):
        row = await store.add_joke(
            _image(),
            channel="test",
            user_id=f"asker-{tag}-{i % 7}",
            chat_id=None,
            prompt="讲个笑话",
            text="一个笑话",
            model_version=version,
            engine="lmdeploy",
            params={},
        )
        await store.rate(row.id, f"voter-{tag}-{i}", 1 if i < likes else -1, "test")


async def _registry(store: Store, tmp_path: Path, active: str, other: str) -> None:
    for version in (active, other):
        folder = tmp_path / "models" / version
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text("{}")
        await store.add_model_version(version, str(folder))
    await store.set_model_status(active, "active")


def _ab_settings(settings: Settings) -> Settings:
    ab = settings.ab
    ab.min_votes, ab.share, ab.max_days, ab.failure_margin = 50, 0.2, 14, 0.1
    return settings


async def _active(store: Store) -> str:
    row = await store.active_model()
    assert row is not None
    return row.version


async def _test_status(store: Store, test_id: int) -> tuple[str, str | None]:
    row = await store.get_ab_test(test_id)
    assert row is not None
    return row.status, row.reason


async def _version_status(store: Store, version: str) -> str:
    row = await store.get_model_version(version)
    assert row is not None
    return row.status


class CancelledPromoter:
    """The swap is cancelled midway (``oogiri serve`` shuts down); blue/green: the old model
    still serves."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def promote(self, version: str, model_dir: Path) -> None:
        self.calls.append(version)
        raise asyncio.CancelledError


async def test_a_promotion_cancelled_midway_leaves_the_test_and_registry_consistent(
    tstore: Store, tsettings: Settings, tmp_path: Path
) -> None:
    settings = _ab_settings(tsettings)
    await _registry(tstore, tmp_path, active="v1", other="v2")
    test = await start_test(tstore, settings, "v2", "v1")
    await _seed(tstore, "v1", 100, 30, "c")
    await _seed(tstore, "v2", 100, 70, "k")
    promoter = CancelledPromoter()
    with pytest.raises(asyncio.CancelledError):
        await decide_tests(tstore, settings, None, promoter)
    assert promoter.calls == ["v2"]
    assert await _active(tstore) == "v1"  # the swap did not happen
    # not "promoted" with the candidate stuck in "testing" for good: it can be promoted again
    status, reason = await _test_status(tstore, test.id)
    assert status == "failed" and reason and "cancelled" in reason, (status, reason)
    assert await _version_status(tstore, "v2") == "candidate"


async def test_an_auto_rollback_cancelled_midway_does_not_say_rolled_back(
    tstore: Store, tsettings: Settings, tmp_path: Path
) -> None:
    settings = _ab_settings(tsettings)
    await _registry(tstore, tmp_path, active="v2", other="v1")
    watch = await start_test(tstore, settings, "v1", "v2", kind="watch")
    await _seed(tstore, "v2", 200, 50, "k")
    await _seed(tstore, "v1", 200, 130, "c")
    with pytest.raises(asyncio.CancelledError):
        await decide_tests(tstore, settings, None, CancelledPromoter())
    assert await _active(tstore) == "v2"  # still the new model
    status, reason = await _test_status(tstore, watch.id)
    assert status == "failed" and reason and "cancelled" in reason, (status, reason)


# --------------------------------------------------------------------------- run: cancelled


class CancelledEvaluator:
    """Cancelled while evaluating: the model folder exists, nothing is registered yet."""

    async def evaluate(self, model_dir: Path, heldout: Path, image_root: Path) -> EvalResult:
        raise asyncio.CancelledError


class NoPromoter:
    async def promote(self, version: str, model_dir: Path) -> None:  # pragma: no cover
        raise AssertionError("nothing is promoted here")


@pytest.fixture
def rig(tmp_path: Path, tsettings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    for var in ("NPROC_PER_NODE", "NNODES", "NODE_RANK", "ADDR", "PORT", "FAKE_XTUNER"):
        monkeypatch.delenv(var, raising=False)
    t = tsettings.training
    t.base_model = fake_base_model(tmp_path / "InternVL2-2B")
    t.xtuner_python = fake_venv(tmp_path / "xtuner-venv")
    t.work_dir = tmp_path / "work"
    t.min_examples = 2
    t.heldout_fraction = 0.25
    t.batch_size = 1
    t.accumulative_counts = 1
    t.max_epochs = 2
    t.warmup_ratio = 0.2
    t.max_length = 1024
    t.dataloader_num_workers = 0
    return tsettings


async def test_a_cancelled_run_removes_its_unregistered_model_folder(
    rig: Settings, tstore: Store
) -> None:
    await seed_ratings(tstore)
    await ensure_registry(tstore, rig)
    before = [(v.version, v.status) for v in await tstore.model_versions()]
    pipeline = TrainingPipeline(rig, tstore, evaluator=CancelledEvaluator(), promoter=NoPromoter())
    with pytest.raises(asyncio.CancelledError):
        await pipeline.run()
    (run,) = await tstore.training_runs()
    assert run.status == "failed" and run.error == "evaluate: cancelled"
    assert [(v.version, v.status) for v in await tstore.model_versions()] == before
    models = rig.training.work_dir / "models"
    assert not models.exists() or not any(models.iterdir()), list(models.iterdir())


# --------------------------------------------------------------------------- rollout


def test_a_failed_first_rollout_leaves_no_link_behind(tmp_path: Path) -> None:
    # ab.start_command points /models/candidate (absent between tests) at the arm: when the arm
    # never serves, the link must go again, or compose's candidate server keeps serving it
    from training import rollout

    model = tmp_path / "ft-2"
    model.mkdir()
    (model / "config.json").write_text("{}")
    link = tmp_path / "candidate"
    argv = [str(model), "ft-2", "--link", str(link), "--url", "http://127.0.0.1:9"]
    assert rollout.main([*argv, "--timeout", "0", "--poll", "0"]) == 1
    assert not link.is_symlink() and not link.exists()


async def test_a_cancellation_during_the_advisory_unlock_does_not_keep_the_lock(
    pg_database: str,
) -> None:
    """A shutdown landing while ``pg_advisory_unlock`` is awaited returned the connection to the
    pool with the session lock still held: no training could run again in this process's
    lifetime, nor on any other replica."""
    from sqlalchemy.ext.asyncio import create_async_engine

    from training.lock import LockBusy, pg_advisory_lock

    engine = create_async_engine(pg_database)
    unlocking = asyncio.Event()

    class SlowUnlock:
        """The pooled connection, but its unlock takes long enough to be cancelled."""

        def __init__(self, conn: Any) -> None:
            self._conn = conn

        def __getattr__(self, name: str) -> Any:
            return getattr(self._conn, name)

        async def execute(self, statement: Any, *args: Any) -> Any:
            if "unlock" in str(statement):
                unlocking.set()
                await asyncio.sleep(30)
            return await self._conn.execute(statement, *args)

    class Engine:
        async def connect(self) -> SlowUnlock:
            return SlowUnlock(await engine.connect())

    async def hold() -> None:
        async with pg_advisory_lock(Engine()):
            pass

    try:
        task = asyncio.create_task(hold())
        await asyncio.wait_for(unlocking.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # another replica's session (the pool would hand back the holder's, where the lock
        # is re-entrant): LockBusy while the cancelled holder's session keeps it
        other = create_async_engine(pg_database)
        try:
            async with pg_advisory_lock(other):
                pass
        finally:
            await other.dispose()
    except LockBusy:
        pytest.fail("the advisory lock outlived a cancelled unlock")
    finally:
        await engine.dispose()
