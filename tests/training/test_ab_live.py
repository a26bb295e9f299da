"""The live A/B step: store counts (SQLite and PostgreSQL), sticky routing over loopback HTTP,
the decisions and what they do (promote → watch, reject, wait, timeout, auto-rollback), the
run that ends "testing", and the operator command."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from bot.ab import ROUTING_KEY, ArmsEngine, assign, bucket, evaluate
from bot.abstats import AbRule
from bot.engines.openai_http import OpenAIHTTPEngine, Upstream
from bot.models import GenerationParams, NormalizedImage
from bot.settings import Settings
from bot.store import AbTestBusy, Store
from training.ab import decide_tests, start_test, status_docs, stop_test, voter_cap

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fakes"))
from fake_lmdeploy import FakeLMDeploy

PARAMS = GenerationParams(max_new_tokens=16, max_dynamic_patch=1)


def tiny_image(seed: bytes = b"x") -> NormalizedImage:
    return NormalizedImage.of(b"\xff\xd8" + seed * 50 + b"\xff\xd9", 4, 3, "PNG")


async def joke(store: Store, version: str, user: str = "test:asker") -> int:
    row = await store.add_joke(
        tiny_image(),
        channel="test",
        user_id=user,
        chat_id=None,
        prompt="讲个笑话",
        text="一个笑话",
        model_version=version,
        engine="lmdeploy",
        params={},
    )
    return row.id


async def seed_arm(store: Store, version: str, votes: int, likes: int, tag: str) -> None:
    """``votes`` jokes of ``version``, each rated by a different voter; ``likes`` of them 👍."""
    for i in range(votes):
        jid = await joke(store, version, user=f"test:asker-{tag}-{i % 7}")
        await store.rate(jid, f"voter-{tag}-{i}", 1 if i < likes else -1, "test")


class Promoter:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[str] = []
        self.fail = fail

    async def promote(self, version: str, model_dir: Path) -> None:
        self.calls.append(version)
        if self.fail:  # what a managed swap raises (an EngineError, not a RuntimeError)
            from bot.engines.lmdeploy_server import SwapError

            raise SwapError(detail="the new server never became healthy; still serving v1")


def ab_settings(tmp_path: Path, **ab: Any) -> Settings:
    # The arms here have one request per vote (50-200): too few to show that failure rates
    # agree within the default 2 pp; the failure guard has its own tests (test_ab_honest.py).
    values = {"min_votes": 50, "share": 0.2, "watch_share": 0.1, "max_days": 14,
              "failure_margin": 0.1, **ab}  # fmt: skip
    return Settings(
        _env_file=None,
        data_dir=tmp_path / "data",
        store={"url": f"sqlite+aiosqlite:///{tmp_path / 'db' / 'oogiri.sqlite3'}"},
        ab=values,
    )


async def registry(store: Store, tmp_path: Path, active: str = "v1", cand: str = "v2") -> None:
    for version in (active, cand):
        folder = tmp_path / "models" / version
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text("{}")
        await store.add_model_version(version, str(folder))
    await store.set_model_status(active, "active")


# --------------------------------------------------------------------------- store counts


async def test_arm_counts_count_each_vote_once_cap_each_voter_and_keep_to_the_window(
    store: Store,
) -> None:
    before = await joke(store, "v2")  # served before the test: not part of it
    await store.rate(before, "early", 1, "test")
    test = await store.start_ab_test(
        kind="ab", control="v1", candidate="v2", share=0.2, rule={"per_voter_cap": 3}
    )
    with pytest.raises(AbTestBusy):
        await store.start_ab_test(kind="ab", control="v1", candidate="v3", share=0.2, rule={})
    cand = [await joke(store, "v2") for _ in range(6)]
    ctrl = [await joke(store, "v1") for _ in range(2)]
    # a user who changes their mind counts once, with the last vote
    await store.rate(cand[0], "fickle", 1, "test")
    await store.rate(cand[0], "fickle", -1, "test")
    await store.rate(cand[0], "fickle", 1, "test")
    # one enthusiast likes all six candidate jokes: only the first three count
    for jid in cand:
        await store.rate(jid, "fan", 1, "test")
    await store.rate(ctrl[0], "fan", -1, "test")  # their cap is per arm
    await store.rate(ctrl[1], "critic", -1, "test")
    await store.rate(ctrl[1], "friend", 1, "test")

    counts = await store.ab_arm_counts(test, cap=3)
    k, c = counts["candidate"], counts["control"]
    assert (k.likes, k.votes, k.voters, k.raw_votes, k.jokes) == (4, 4, 2, 7, 6)
    assert (c.likes, c.votes, c.voters, c.raw_votes, c.jokes) == (1, 3, 3, 3, 2)
    # per-voter sums for the rule's clustered variance: fickle (1, 1) and fan (3, 3) ...
    assert (k.sum_likes_sq, k.sum_likes_votes, k.sum_votes_sq) == (10, 10, 10)
    # ... fan (0, 1), critic (0, 1), friend (1, 1)
    assert (c.sum_likes_sq, c.sum_likes_votes, c.sum_votes_sq) == (1, 1, 3)
    uncapped = await store.ab_arm_counts(test, cap=None)
    assert (uncapped["candidate"].likes, uncapped["candidate"].votes) == (7, 7)

    # the test's end closes the window: later jokes are not counted
    assert await store.end_ab_test(test.id, "stopped", "test over")
    assert not await store.end_ab_test(test.id, "rejected", "twice")  # only a running test ends
    ended = await store.get_ab_test(test.id)
    late = await joke(store, "v2")
    await store.rate(late, "late-voter", 1, "test")
    after = await store.ab_arm_counts(ended, cap=3)
    assert after["candidate"].jokes == 6 and after["candidate"].votes == 4
    assert ended.status == "stopped" and ended.reason == "test over"


async def test_like_rate_series_groups_by_version_and_day(store: Store) -> None:
    for version, values in (("v1", (1, -1, -1)), ("v2", (1, 1))):
        for i, value in enumerate(values):
            await store.rate(await joke(store, version), f"u{i}", value, "test")
    rows = await store.like_rate_series(bucket="day")
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    assert rows == [("v1", today, 1, 3), ("v2", today, 2, 2)]
    hours = await store.like_rate_series(bucket="hour")
    assert {r[0] for r in hours} == {"v1", "v2"} and all("T" in r[1] for r in hours)
    with pytest.raises(ValueError):
        await store.like_rate_series(bucket="week")


# --------------------------------------------------------------------------- routing


def test_assignment_is_sticky_per_user_and_close_to_the_share() -> None:
    users = [f"web:user{i}" for i in range(20000)]
    arms = [assign(7, u, 0.2) for u in users]
    share = arms.count("candidate") / len(users)
    assert 0.19 < share < 0.21
    assert arms == [assign(7, u, 0.2) for u in users]  # same user, same arm
    # a new test reshuffles: the candidate users of test 7 are not those of test 8
    moved = sum(a != assign(8, u, 0.2) for u, a in zip(users, arms, strict=True))
    assert moved > 0.2 * len(users)
    assert assign(7, None, 0.5) == "control"  # no user (warm-up): the active model
    assert 0.0 <= bucket(1, "x") < 1.0


async def test_arms_engine_routes_users_to_two_servers_and_labels_the_real_version() -> None:
    control_srv = FakeLMDeploy(model_name="served-v1").start()
    cand_srv = FakeLMDeploy(model_name="served-v2").start()
    settings = Settings(_env_file=None).engine.model_copy(update={"retry_backoff_s": 0.01})
    control = OpenAIHTTPEngine(
        settings, flavor="lmdeploy", upstream=Upstream.of([control_srv.url], None, "v1")
    )
    cand = OpenAIHTTPEngine(
        settings, flavor="lmdeploy", upstream=Upstream.of([cand_srv.url], None, "v2")
    )
    arms = ArmsEngine(control, cand, test_id=3, share=0.3, candidate_version="v2")
    image = tiny_jpeg()
    try:
        seen: dict[str, set[str]] = {}
        for i in range(40):
            user = f"web:u{i}"
            ROUTING_KEY.set(user)
            for _ in range(2):  # a user asks twice: same arm both times
                gen = await arms.generate(image, "讲个笑话", PARAMS)
                seen.setdefault(user, set()).add(gen.model)
                expected = "v2" if assign(3, user, 0.3) == "candidate" else "v1"
                assert gen.model == expected
                assert f"[served-{expected}]" in gen.text  # it really came from that server
        assert all(len(v) == 1 for v in seen.values())
        assert arms.routed["candidate"] == 2 * sum(
            assign(3, f"web:u{i}", 0.3) == "candidate" for i in range(40)
        )
        chats = [r for r in cand_srv.requests if r["path"].endswith("/chat/completions")]
        assert len(chats) == arms.routed["candidate"]

        # the candidate goes down: its users still get a joke, from the active model
        cand_srv.stop()
        user = next(f"web:u{i}" for i in range(40) if assign(3, f"web:u{i}", 0.3) == "candidate")
        ROUTING_KEY.set(user)
        gen = await arms.generate(image, "讲个笑话", PARAMS)
        assert gen.model == "v1" and arms.routed["fallback"] == 1
    finally:
        ROUTING_KEY.set(None)
        await arms.close()
        control_srv.stop()
        cand_srv.stop()


def tiny_jpeg() -> NormalizedImage:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 100, 50)).save(buf, "JPEG")
    return NormalizedImage.of(buf.getvalue(), 64, 48, "JPEG")


# --------------------------------------------------------------------------- decisions


async def test_a_better_candidate_is_promoted_and_watched(tstore: Store, tmp_path: Path) -> None:
    settings = ab_settings(tmp_path)
    await registry(tstore, tmp_path)
    test = await start_test(tstore, settings, "v2", "v1", run_id=4)
    assert test.rule["per_voter_cap"] == voter_cap(settings) == 20
    assert (await tstore.get_model_version("v2")).status == "testing"
    await seed_arm(tstore, "v1", 200, 60, "c")
    await seed_arm(tstore, "v2", 200, 120, "k")
    unrated = await joke(tstore, "v2")
    promoter = Promoter()
    ended: list[int] = []
    (out,) = await decide_tests(
        tstore, settings, None, promoter, on_ended=lambda t: ended.append(t.id)
    )
    assert out.outcome == "promoted" and "lift" in out.reason
    assert promoter.calls == ["v2"] and ended == [test.id]
    assert (await tstore.active_model()).version == "v2"
    row = await tstore.get_ab_test(test.id)
    assert row.status == "promoted" and row.decision["decision"]["outcome"] == "promote"
    assert row.decision["arms"]["candidate"]["votes"] == 200
    # the previous model stays on a small arm: the watch
    watch = await tstore.running_ab_test()
    assert watch is not None and watch.id == out.watch_id
    assert (watch.kind, watch.control, watch.candidate, watch.share) == ("watch", "v2", "v1", 0.1)
    assert watch.rule["margin"] == settings.ab.rollback_margin
    # later votes on the test's jokes do not rewrite what it was decided on
    (ended,) = [d for d in await status_docs(tstore) if d["id"] == test.id]
    assert ended["arms"]["candidate"]["votes"] == 200 and ended["status"] == "promoted"
    await tstore.rate(unrated, "late-voter", -1, "test")  # a joke served during the test
    assert (await evaluate(tstore, await tstore.get_ab_test(test.id))).candidate.votes == 201
    (ended,) = [d for d in await status_docs(tstore) if d["id"] == test.id]
    assert ended["arms"]["candidate"]["votes"] == 200
    assert ended["decision"]["outcome"] == "promote"


async def test_a_worse_candidate_is_rejected(tstore: Store, tmp_path: Path) -> None:
    settings = ab_settings(tmp_path)
    await registry(tstore, tmp_path)
    test = await start_test(tstore, settings, "v2", "v1")
    await seed_arm(tstore, "v1", 200, 120, "c")
    await seed_arm(tstore, "v2", 200, 60, "k")
    promoter = Promoter()
    (out,) = await decide_tests(tstore, settings, None, promoter)
    assert out.outcome == "rejected" and "worse" in out.reason
    assert promoter.calls == []
    assert (await tstore.active_model()).version == "v1"
    assert (await tstore.get_model_version("v2")).status == "rejected"
    assert (await tstore.get_ab_test(test.id)).status == "rejected"
    assert await tstore.running_ab_test() is None


async def test_too_few_votes_waits_and_one_voter_cannot_decide(
    tstore: Store, tmp_path: Path
) -> None:
    settings = ab_settings(tmp_path, per_voter_cap=5)
    await registry(tstore, tmp_path)
    test = await start_test(tstore, settings, "v2", "v1")
    await seed_arm(tstore, "v1", 80, 20, "c")
    # one person likes 300 candidate jokes and 40 others vote: counted 5 + 40 < 50
    for _ in range(300):
        await tstore.rate(await joke(tstore, "v2"), "superfan", 1, "test")
    await seed_arm(tstore, "v2", 40, 10, "k")
    promoter = Promoter()
    (out,) = await decide_tests(tstore, settings, None, promoter)
    assert out.outcome == "wait" and "need 50" in out.reason
    ev = await evaluate(tstore, await tstore.get_ab_test(test.id))
    assert ev.candidate.votes == 45 and ev.candidate.raw_votes == 340
    assert promoter.calls == [] and (await tstore.running_ab_test()).id == test.id
    saved = (await tstore.get_ab_test(test.id)).decision
    assert saved["decision"]["outcome"] == "wait"


async def test_a_waiting_test_says_what_would_decide_it_and_when_voters_are_spent(
    tstore: Store, tmp_path: Path
) -> None:
    settings = ab_settings(tmp_path, per_voter_cap=5)
    await registry(tstore, tmp_path)
    test = await start_test(tstore, settings, "v2", "v1")

    async def voters(version: str, tag: str, people: int, likes_each: int, votes_each: int) -> None:
        for u in range(people):
            for i in range(votes_each):
                jid = await joke(tstore, version)
                await tstore.rate(jid, f"voter-{tag}-{u}", 1 if i < likes_each else -1, "test")

    await voters("v1", "c", 20, 3, 5)  # 60 % on the control
    await voters("v2", "k", 10, 3, 5)  # candidate voters with 5 votes each: all at the cap
    await voters("v2", "k2", 10, 4, 4)  # and 10 who could still vote once more
    ev = await evaluate(tstore, await tstore.get_ab_test(test.id))
    d = ev.decision
    assert d.outcome == "wait" and d.votes_to_decide and d.votes_to_decide > 180
    assert f"about {d.votes_to_decide:,} counted votes in all would decide" in d.reason
    assert "every voter (the control arm's 20) has used the cap of 5 votes" in d.reason
    # ten candidate voters more, each at the cap too: now both arms are spent
    await voters("v2", "k3", 10, 3, 5)
    await tstore.rate(await joke(tstore, "v2"), "voter-k2-0", 1, "test")
    for u in range(1, 10):
        await tstore.rate(await joke(tstore, "v2"), f"voter-k2-{u}", -1, "test")
    d = (await evaluate(tstore, await tstore.get_ab_test(test.id))).decision
    assert d.outcome == "wait", d.reason
    assert "(the control arm's 20 and the candidate arm's 30) has used the cap" in d.reason


async def test_an_undecided_test_times_out_and_keeps_the_active_model(
    tstore: Store, tmp_path: Path
) -> None:
    settings = ab_settings(tmp_path, max_days=2)
    await registry(tstore, tmp_path)
    test = await start_test(tstore, settings, "v2", "v1")
    await seed_arm(tstore, "v1", 60, 30, "c")
    await seed_arm(tstore, "v2", 60, 31, "k")
    later = datetime.now(UTC) + timedelta(days=2, minutes=1)
    (out,) = await decide_tests(tstore, settings, None, Promoter(), now=later)
    assert out.outcome == "timeout"
    assert (await tstore.active_model()).version == "v1"
    assert (await tstore.get_model_version("v2")).status == "timeout"
    assert (await tstore.get_ab_test(test.id)).status == "timeout"


async def test_auto_rollback_when_the_promoted_model_disappoints(
    tstore: Store, tmp_path: Path
) -> None:
    settings = ab_settings(tmp_path)
    await registry(tstore, tmp_path)
    await start_test(tstore, settings, "v2", "v1")
    await seed_arm(tstore, "v1", 100, 30, "c1")
    await seed_arm(tstore, "v2", 100, 70, "k1")
    promoter = Promoter()
    (out,) = await decide_tests(tstore, settings, None, promoter)
    assert out.outcome == "promoted"
    # the watch: the users now like the new model much less than the old one
    await seed_arm(tstore, "v2", 200, 50, "k2")
    await seed_arm(tstore, "v1", 200, 130, "c2")
    (back,) = await decide_tests(tstore, settings, None, promoter)
    assert back.outcome == "rolled_back" and "roll back" in back.reason
    assert promoter.calls == ["v2", "v1"]
    assert (await tstore.active_model()).version == "v1"
    assert (await tstore.get_model_version("v2")).status == "rolled_back"
    assert (await tstore.get_ab_test(out.watch_id)).status == "rolled_back"
    assert await tstore.running_ab_test() is None


async def test_a_failed_rollback_leaves_the_new_model_serving_and_says_so(
    tstore: Store, tmp_path: Path
) -> None:
    settings = ab_settings(tmp_path)
    await registry(tstore, tmp_path, active="v2", cand="v1")
    watch = await start_test(tstore, settings, "v1", "v2", kind="watch")
    await seed_arm(tstore, "v2", 200, 50, "k")
    await seed_arm(tstore, "v1", 200, 130, "c")
    (out,) = await decide_tests(tstore, settings, None, Promoter(fail=True))
    assert out.outcome == "failed" and "rollback to v1 failed" in out.reason
    assert (await tstore.active_model()).version == "v2"
    assert (await tstore.get_ab_test(watch.id)).status == "failed"


async def test_a_watch_that_stays_undecided_confirms_the_promotion(
    tstore: Store, tmp_path: Path
) -> None:
    settings = ab_settings(tmp_path, watch_days=1)
    await registry(tstore, tmp_path, active="v2", cand="v1")
    watch = await start_test(tstore, settings, "v1", "v2", kind="watch")
    later = datetime.now(UTC) + timedelta(days=1, seconds=1)
    (out,) = await decide_tests(tstore, settings, None, Promoter(), now=later)
    assert out.outcome == "confirmed"
    assert (await tstore.get_ab_test(watch.id)).status == "confirmed"
    assert (await tstore.active_model()).version == "v2"


async def test_a_failed_promotion_keeps_the_active_model(tstore: Store, tmp_path: Path) -> None:
    settings = ab_settings(tmp_path)
    await registry(tstore, tmp_path)
    test = await start_test(tstore, settings, "v2", "v1")
    await seed_arm(tstore, "v1", 200, 60, "c")
    await seed_arm(tstore, "v2", 200, 120, "k")
    (out,) = await decide_tests(tstore, settings, None, Promoter(fail=True))
    assert out.outcome == "failed" and "never became healthy" in out.reason
    assert (await tstore.active_model()).version == "v1"
    assert (await tstore.get_model_version("v2")).status == "candidate"
    assert (await tstore.get_ab_test(test.id)).status == "failed"


async def test_a_manual_promotion_during_the_test_stops_it(tstore: Store, tmp_path: Path) -> None:
    settings = ab_settings(tmp_path)
    await registry(tstore, tmp_path)
    await tstore.add_model_version("v3", str(tmp_path / "models" / "v2"))
    test = await start_test(tstore, settings, "v2", "v1")
    await tstore.set_model_status("v3", "active")
    (out,) = await decide_tests(tstore, settings, None, Promoter())
    assert out.outcome == "stopped" and "changed to v3" in out.reason
    assert (await tstore.get_ab_test(test.id)).status == "stopped"
    assert (await tstore.get_model_version("v2")).status == "candidate"


async def test_the_rule_is_fixed_when_the_test_starts(tstore: Store, tmp_path: Path) -> None:
    settings = ab_settings(tmp_path, min_votes=300, alpha=0.01, min_effect=0.05)
    await registry(tstore, tmp_path)
    test = await start_test(tstore, settings, "v2", "v1")
    settings.ab.min_votes = 10  # a later change of settings does not move the goalposts
    ev = await evaluate(tstore, await tstore.get_ab_test(test.id))
    assert ev.test.rule["min_votes"] == 300
    from bot.ab import rule_of

    assert rule_of(ev.test) == AbRule(alpha=0.01, min_effect=0.05, min_votes=300,
                                      max_duration_s=14 * 86400.0)  # fmt: skip


async def test_operator_stop_promote_and_reject(tstore: Store, tmp_path: Path) -> None:
    settings = ab_settings(tmp_path)
    await registry(tstore, tmp_path)
    await start_test(tstore, settings, "v2", "v1")
    out = await stop_test(tstore, settings, None, Promoter(), "stop")
    assert out.outcome == "stopped" and (await tstore.active_model()).version == "v1"
    assert (await tstore.get_model_version("v2")).status == "candidate"
    with pytest.raises(LookupError):
        await stop_test(tstore, settings, None, Promoter(), "stop")
    await start_test(tstore, settings, "v2", "v1")
    promoter = Promoter()
    out = await stop_test(tstore, settings, None, promoter, "promote")
    assert out.outcome == "promoted" and promoter.calls == ["v2"]
    # the watch started by that promotion; --reject on a watch rolls back
    out = await stop_test(tstore, settings, None, promoter, "reject")
    assert out.outcome == "rolled_back" and (await tstore.active_model()).version == "v1"


async def test_start_refuses_bad_input(tstore: Store, tmp_path: Path) -> None:
    settings = ab_settings(tmp_path)
    await registry(tstore, tmp_path)
    with pytest.raises(LookupError):
        await start_test(tstore, settings, "nope", "v1")
    with pytest.raises(ValueError, match="active model"):
        await start_test(tstore, settings, "v1", "v1")
    with pytest.raises(ValueError, match="share"):
        await start_test(tstore, settings, "v2", "v1", share=0.9)


# --------------------------------------------------------------------------- the operator command


def test_models_ab_status_and_stop_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    import typer

    from training import ab_plugin
    from training import cli as tcli

    cli = typer.Typer()

    @cli.callback()
    def main() -> None:
        """oogiri (test)"""

    tcli.oogiri_register_commands(cli=cli)
    ab_plugin.oogiri_register_commands(cli=cli)
    ab_plugin.oogiri_register_commands(cli=cli)  # twice (two apps in one process): one group
    monkeypatch.setenv("OOGIRI_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("OOGIRI_AB__MIN_VOTES", "50")
    monkeypatch.setenv("OOGIRI_AB__FAILURE_MARGIN", "0.1")  # 80 requests per arm (ab_settings)
    monkeypatch.setenv("OOGIRI_TRAINING__PROMOTE_COMMAND", '["true"]')
    settings = Settings(_env_file=None)

    async def seed() -> None:
        store = Store(settings.database_url, settings.images_dir)
        await store.upgrade()
        await registry(store, tmp_path)
        await start_test(store, settings, "v2", "v1")
        await seed_arm(store, "v1", 80, 20, "c")
        await seed_arm(store, "v2", 80, 60, "k")
        await store.close()

    asyncio.run(seed())
    runner = CliRunner(env={"COLUMNS": "200"})
    result = runner.invoke(cli, ["models", "ab", "status", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    (test,) = doc["tests"]
    assert test["status"] == "running" and test["arms"]["candidate"]["votes"] == 80
    assert test["decision"]["outcome"] == "promote" and doc["acted"] == []
    low, high = test["decision"]["candidate_interval"]
    assert low < 0.75 < high

    result = runner.invoke(cli, ["models", "ab", "status"])
    assert result.exit_code == 0
    assert "candidate" in result.stdout and "75.0%" in result.stdout and "promote" in result.stdout

    result = runner.invoke(cli, ["models", "ab", "stop", "--promote", "--reject"])
    assert result.exit_code == 2
    result = runner.invoke(cli, ["models", "ab", "status", "--decide", "--json"])
    assert result.exit_code == 0, result.output
    acted = json.loads(result.stdout)["acted"]
    assert acted[0]["outcome"] == "promoted"
    result = runner.invoke(cli, ["models", "ab", "stop"])  # ends the watch, keeps v2
    assert result.exit_code == 0 and "stopped" in result.output
    result = runner.invoke(cli, ["models", "ab", "stop"])
    assert result.exit_code == 1 and "no A/B test is running" in result.output

    async def check() -> list[dict[str, Any]]:
        store = Store(settings.database_url, settings.images_dir)
        try:
            assert (await store.active_model()).version == "v2"
            return await status_docs(store, limit=5)
        finally:
            await store.close()

    docs = asyncio.run(check())
    assert [(d["kind"], d["status"]) for d in docs] == [("watch", "stopped"), ("ab", "promoted")]


# --------------------------------------------------------------------------- the training run


def text_of(path: Path | str) -> str:
    return Path(path).read_text(encoding="utf-8")


class HeldoutEvaluator:
    """The candidate (a folder under work_dir/models) scores better than the active model."""

    async def evaluate(self, model_dir: Path, heldout: Path, image_root: Path) -> Any:
        from training.gate import EvalResult

        n = len(json.loads(text_of(heldout)))
        loss = 1.0 if "models" in model_dir.parts else 2.0
        return EvalResult(str(model_dir), n, 10 * n, loss, ["这只猫刚刚发现冰箱是空的。"] * n)


@pytest.fixture
def run_rig(tmp_path: Path, tsettings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    from trainhelp import fake_base_model, fake_venv

    for var in ("NPROC_PER_NODE", "NNODES", "NODE_RANK", "ADDR", "PORT", "FAKE_XTUNER"):
        monkeypatch.delenv(var, raising=False)
    t = tsettings.training
    t.base_model = fake_base_model(tmp_path / "InternVL2-2B")
    t.xtuner_python = fake_venv(tmp_path / "xtuner-venv")
    t.work_dir = tmp_path / "work"
    t.min_examples = 2
    t.heldout_fraction = 0.25
    t.batch_size = t.accumulative_counts = 1
    t.max_epochs = 2
    t.warmup_ratio = 0.2
    t.max_length = 1024
    t.dataloader_num_workers = 0
    t.every_days = None
    t.min_new_ratings = 1
    tsettings.ab.enabled = True
    tsettings.ab.min_votes = 50
    tsettings.ab.failure_margin = 0.1  # 120 requests per arm (see ab_settings)
    return tsettings


async def test_a_run_that_passes_offline_ends_testing_and_the_schedule_waits_for_the_test(
    run_rig: Settings, tstore: Store
) -> None:
    from trainhelp import seed_ratings

    from training.run import RunResult, TrainingPipeline, run_guarded
    from training.schedule import DueDecision

    await seed_ratings(tstore, 8)
    promoter = Promoter()
    kw: dict[str, Any] = {"evaluator": HeldoutEvaluator(), "promoter": promoter}
    result = await TrainingPipeline(run_rig, tstore, **kw).run()
    assert result.status == "testing" and not result.promoted, result.error
    assert result.decision is not None and result.decision.verdict == "pending"
    assert [c.name for c in result.decision.checks if c.pending] == ["live_ab"]
    assert promoter.calls == []
    version = result.version
    assert (await tstore.get_model_version(version)).status == "testing"
    test = await tstore.running_ab_test()
    assert (test.kind, test.candidate, test.control, test.run_id) == (
        "ab", version, "base-v0", result.run_id,
    )  # fmt: skip
    assert result.metrics["ab_test"] == test.id
    (run,) = await tstore.training_runs()
    assert run.status == "testing"
    assert f"live A/B test #{test.id} started" in text_of(run.log_path)

    # the CronJob's tick decides the test first; while it runs, no new training starts
    tick = await run_guarded(run_rig, tstore, if_due=True, **kw)
    assert isinstance(tick, DueDecision) and not tick.due
    assert f"A/B test #{test.id}" in str(tick)
    # the users decide: the candidate wins, the tick promotes it and the schedule goes on
    await seed_arm(tstore, "base-v0", 120, 30, "c")
    await seed_arm(tstore, version, 120, 90, "k")
    tick = await run_guarded(run_rig, tstore, if_due=True, **kw)
    assert promoter.calls == [version]
    assert (await tstore.active_model()).version == version
    watch = await tstore.running_ab_test()
    assert watch is not None and watch.kind == "watch"
    assert isinstance(tick, DueDecision)  # the watch runs: still no new candidate
    await stop_test(tstore, run_rig, None, promoter, "stop")
    again = await run_guarded(run_rig, tstore, if_due=True, **kw)
    assert isinstance(again, RunResult) and again.status == "testing"


async def test_a_second_candidate_waits_while_a_test_runs(run_rig: Settings, tstore: Store) -> None:
    from trainhelp import seed_ratings

    from training.run import TrainingPipeline

    await seed_ratings(tstore, 8)
    kw: dict[str, Any] = {"evaluator": HeldoutEvaluator(), "promoter": Promoter()}
    first = await TrainingPipeline(run_rig, tstore, **kw).run()
    second = await TrainingPipeline(run_rig, tstore, **kw).run()
    assert first.status == "testing" and second.status == "succeeded"
    assert (await tstore.get_model_version(second.version)).status == "candidate"
    assert (await tstore.running_ab_test()).candidate == first.version


async def test_the_router_reports_the_active_engines_health_and_the_test() -> None:
    from bot.engines.base import EngineHealth

    class Stub:
        name = "stub"

        def __init__(self, label: str, demo: bool) -> None:
            self.label, self.demo, self.closed = label, demo, False

        async def health(self) -> EngineHealth:
            return EngineHealth(ok=True, model=self.label, detail="fine", demo=self.demo)

        async def close(self) -> None:
            self.closed = True

    control, cand = Stub("v1", demo=True), Stub("v2", demo=False)
    arms = ArmsEngine(control, cand, test_id=9, share=0.1, candidate_version="v2")  # type: ignore[arg-type]
    health = await arms.health()
    assert (health.ok, health.model, health.demo) == (True, "v1", True)
    assert health.extra["ab"]["ab_test"] == 9 and health.extra["ab"]["ab_candidate"] == "v2"
    await arms.close()
    assert control.closed and cand.closed


async def test_an_unusable_candidate_answer_is_not_hidden_by_the_active_model(
    tmp_path: Path,
) -> None:
    """Empty answers are the candidate's own failure: no fallback (it would count for the active
    model), the user is asked to try again as with any model; an unreachable one falls back."""
    from fake_lmdeploy import FIXTURES

    from bot.ab import AbMetrics
    from bot.models import EngineError

    fixtures = tmp_path / "fixtures"
    fixtures.mkdir()
    for path in FIXTURES.glob("*.json"):
        (fixtures / path.name).write_text(path.read_text())
    empty = json.loads((FIXTURES / "chat_success.json").read_text())
    empty["response"]["body"]["choices"][0]["message"]["content"] = ""
    (fixtures / "chat_empty.json").write_text(json.dumps(empty))

    control_srv = FakeLMDeploy(model_name="served-v1").start()
    cand_srv = FakeLMDeploy(model_name="served-v2", fixtures_dir=fixtures,
                            script=["chat_empty", "chat_empty"]).start()  # fmt: skip
    settings = Settings(_env_file=None).engine.model_copy(update={"retry_backoff_s": 0.01})
    control = OpenAIHTTPEngine(
        settings, flavor="lmdeploy", upstream=Upstream.of([control_srv.url], None, "v1")
    )
    cand = OpenAIHTTPEngine(
        settings, flavor="lmdeploy", upstream=Upstream.of([cand_srv.url], None, "v2")
    )
    from prometheus_client import CollectorRegistry

    metrics = AbMetrics(CollectorRegistry())
    arms = ArmsEngine(control, cand, test_id=3, share=0.3, candidate_version="v2",
                      metrics=metrics)  # fmt: skip
    user = next(f"web:u{i}" for i in range(100) if assign(3, f"web:u{i}", 0.3) == "candidate")
    try:
        ROUTING_KEY.set(user)
        with pytest.raises(EngineError, match="empty answer"):
            await arms.generate(tiny_jpeg(), "讲个笑话", PARAMS)
        assert arms.routed["empty"] == 1 and arms.routed["control"] == 0
        assert [r for r in control_srv.requests if r["path"].endswith("/completions")] == []
        # the script is used up: the candidate answers normally again
        assert (await arms.generate(tiny_jpeg(), "讲个笑话", PARAMS)).model == "v2"
        cand_srv.stop()  # down: infrastructure, the active model answers
        assert (await arms.generate(tiny_jpeg(), "讲个笑话", PARAMS)).model == "v1"
        failures = {
            s.labels["reason"]: s.value
            for m in metrics.fallbacks.collect()
            for s in m.samples
            if s.name.endswith("_total")
        }
        assert failures == {"empty": 1.0, "unavailable": 1.0}
    finally:
        ROUTING_KEY.set(None)
        await arms.close()
        control_srv.stop()
        cand_srv.stop()


def test_without_the_ab_plugin_the_offline_gate_decides_alone(
    run_rig: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A test nobody serves or decides would sit until its timeout: no live step without 'ab'."""
    from bot.plugins import make_manager
    from training.gate import LiveAbStep
    from training.run import TrainingPipeline, live_ab_settings

    with_ab = make_manager(only=["training", "ab"])
    without = make_manager(only=["training"])
    assert live_ab_settings(run_rig, with_ab) is run_rig.ab
    assert live_ab_settings(run_rig, None) is run_rig.ab  # a caller that passes no manager
    with caplog.at_level("WARNING"):
        assert live_ab_settings(run_rig, without) is None
    assert "'ab' plugin is not loaded" in caplog.text
    pipeline = TrainingPipeline(run_rig, None, pm=without)
    assert not any(isinstance(step, LiveAbStep) for step in pipeline.gate.steps)
    run_rig.ab.enabled = False
    assert live_ab_settings(run_rig, with_ab) is None
