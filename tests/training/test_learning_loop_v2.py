"""The learning loop's version-2 audience: it likes an answer only when it names what is in the
picture (issue 15 C). A model that says 猫 to everything must score poorly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # bench/ is not an installed package
    sys.path.insert(0, str(ROOT))

from bench.learning_loop import KEYWORDS, PictureAudience, build_pool, source_of  # noqa: E402
from bench.learning_loop.stats import distinct_share  # noqa: E402

PICTURES = [f"heldout-{i:03d}--{src}.png" for i, src in enumerate(sorted(KEYWORDS) * 4)]


def _rate(answer_for: dict[str, str], audience: PictureAudience) -> float:
    liked = [audience.likes(answer_for[source_of(p)], p) for p in PICTURES]
    return sum(liked) / len(liked)


def test_a_cat_everywhere_model_scores_one_in_five() -> None:
    audience = PictureAudience()
    cat_everywhere = {src: "这只猫看起来很严肃" for src in KEYWORDS}
    assert _rate(cat_everywhere, audience) == pytest.approx(0.2)
    # v1's winning catchphrase is no better than chance here
    assert _rate({src: "图片里的狗在想什么" for src in KEYWORDS}, audience) == 0.0


def test_naming_each_picture_scores_everything() -> None:
    audience = PictureAudience()
    right = {src: f"这张图里有{kw}！" for src, kw in KEYWORDS.items()}
    assert _rate(right, audience) == 1.0
    # one keyword off by one photo: exactly that photo's pictures are lost
    shifted = dict(right, rocket="咖啡喝多了")
    assert _rate(shifted, audience) == pytest.approx(0.8)


def test_keywords_are_the_issues_and_need_the_whole_word() -> None:
    assert KEYWORDS == {
        "chelsea": "猫",
        "astronaut": "宇航员",
        "coffee": "咖啡",
        "rocket": "火箭",
        "motorcycle_left": "摩托",
    }
    a = PictureAudience()
    assert a.likes("宇航员说你好", "x-001--astronaut.png")
    assert not a.likes("宇航说你好", "x-001--astronaut.png")  # half a word is not the picture
    assert not a.likes(None, "x-001--astronaut.png") and not a.likes("", "x-001--rocket.png")


def test_source_of_reads_the_pool_name_and_refuses_others() -> None:
    assert source_of("train-007--motorcycle_left.png") == "motorcycle_left"
    assert source_of(Path("/x/heldout-000--chelsea.png")) == "chelsea"
    with pytest.raises(ValueError, match="source photo"):
        source_of("train-007.png")
    with pytest.raises(ValueError, match="no keyword"):
        PictureAudience().likes("猫", "train-000--hubble.png")


def test_votes_are_reproducible_and_noisy_at_the_stated_rate() -> None:
    a = PictureAudience(noise=0.1, voters=3, seed=5)
    picture = "train-000--rocket.png"
    assert a.votes(42, "火箭", picture) == a.votes(42, "火箭", picture)
    votes = [v for j in range(2000) for v in a.votes(j, "火箭", picture)]
    flipped = votes.count(-1) / len(votes)
    assert 0.08 < flipped < 0.12
    other = PictureAudience(noise=0.1, voters=3, seed=6)
    assert [a.votes(j, "火箭", picture) for j in range(50)] != [
        other.votes(j, "火箭", picture) for j in range(50)
    ]


def test_pools_name_their_source_and_cycle_over_photos(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    photos = []
    from PIL import Image

    for name in ("chelsea.png", "rocket.jpg"):
        Image.new("RGB", (64, 48), (200, 100, 50)).save(tmp_path / name)
        photos.append(tmp_path / name)
    pool = build_pool(tmp_path / "pool", photos, 5, 32, "train")
    assert [source_of(p) for p in pool] == ["chelsea", "rocket", "chelsea", "rocket", "chelsea"]


def test_distinct_share() -> None:
    assert distinct_share(["a", "a", "b", "c"]) == 0.75
    assert distinct_share(["猫"] * 10) == 0.1
    assert distinct_share([]) is None


def _dry_run(tmp_path: Path, *extra: str) -> tuple[list[dict], Path]:
    """Run ``bench.learning_loop --dry-run`` for one round on the CPU stand-ins and return its
    records and output folder; ``extra`` adds or overrides options."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OOGIRI_", "FAKE_"))}
    out = tmp_path / "out"
    args = [sys.executable, "-m", "bench.learning_loop", "--dry-run"]
    args += ["--state", str(tmp_path / "state"), "--out", str(out), "--rounds", "1"]
    args += ["--train-images", "12", "--heldout-images", "2", "--answers-per-image", "2"]
    args += ["--samples-per-image", "2", "--image-size", "96", "--heldout-fraction", "0.5"]
    done = subprocess.run(
        [*args, *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = (out / "results.jsonl").read_text("utf-8").splitlines()
    return [json.loads(x) for x in lines], out


def test_dry_run_the_live_ab_step_decides_each_candidate(tmp_path: Path) -> None:
    """The harness's A/B path on the CPU stand-ins: each trained candidate goes to the product's
    live A/B step (``testing``), simulated people on both arms vote through the web API, and the
    product's decision (``GET /api/ab``) is what is recorded. The instant engine answers alike on
    both arms, so with the dry run's large minimum effect every candidate is rejected."""
    records, out = _dry_run(tmp_path)
    rec = {r["step"]: r for r in records if r["kind"] == "step"}
    assert list(rec) == ["round-0", "round-1", "control"]
    for name in ("round-1", "control"):
        ab = rec[name]["ab"]
        assert rec[name]["train"]["status"] == "testing"  # the offline gate passed it on
        # rejected by the rule (the interval's upper end below min_effect; below 0 it says
        # "worse"), not timed out: which of the two depends on how the simulated votes fell
        assert ab["outcome"] == "rejected"
        assert "cannot reach" in ab["reason"] or "the candidate is worse" in ab["reason"]
        counted = ab["counted"]
        assert counted["control"]["votes"] >= 20 and counted["candidate"]["votes"] >= 20
        assert ab["active_after"] == ab["control_version"]  # the active model stayed
        # each arm's held-out answers were measured apart
        assert ab["version"] in ab["arms"] and len(ab["arms"]) == 2
    assert rec["control"]["blocked"]
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    v = summary["verdicts"]
    assert v["control"]["passed"] and v["control"]["ab_outcome"] == "rejected"
    assert [d["outcome"] for d in v["ab_decisions"]] == ["rejected", "rejected"]
    table = (out / "summary.md").read_text(encoding="utf-8")
    assert "live A/B" in table and "per source photo" in table


def test_dry_run_newcomers_join_a_test_that_waits(tmp_path: Path) -> None:
    """With a fixed audience a test can stall once everyone has used the vote cap (the seed-1
    device run: 1,200 of ~1,500 votes needed). ``--ab-arrivals`` lets new people join while the
    product still says "wait": their votes are counted under the same cap, and the product, not
    the harness, still decides (here the A/A dry run cannot reach 3 points within 0.004 days)."""
    extra = ["--control", "none", "--ab-min-effect", "0.03", "--ab-min-votes", "500"]
    # Each person's arm is a hash of their (random) session: with 4 people all landed on the
    # control arm about once in 8 runs and the candidate was never served; with 12, once in ~2,000.
    records, out = _dry_run(
        tmp_path, *extra, "--ab-users", "12", "--ab-cap", "3", "--ab-arrivals", "24"
    )
    ab = next(r for r in records if r.get("step") == "round-1")["ab"]
    assert ab["ab_arrivals"] == 24  # two groups of twelve joined
    counted = ab["counted"]
    voters = counted["control"]["voters"] + counted["candidate"]["voters"]
    assert voters == 36, counted  # the first twelve and the 24 newcomers
    for arm in ("control", "candidate"):  # the cap held for everyone
        assert counted[arm]["votes"] <= 3 * counted[arm]["voters"], counted
    assert ab["outcome"] == "stopped" and ab["active_after"] == ab["control_version"]
    assert "24 people joined while it waited" in (out / "summary.md").read_text("utf-8")
