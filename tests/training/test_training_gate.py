"""The evaluation gate: loss comparison, sanity checks, decisions, extension by a pending A/B."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from training.gate import (
    Check,
    EvalResult,
    Gate,
    GateContext,
    HeldoutLossStep,
    SanityRules,
    SanityStep,
    SubprocessEvaluator,
    default_gate,
    distinct_ngram_ratio,
    language_share,
    sanity_problems,
)
from training.proc import run_command
from training.settings import TrainingSettings

GOOD_ZH = [
    "这只猫刚刚发现冰箱是空的。",
    "科学家发现，咖啡喝多了会以为自己是火箭。",
    "老板说加班，我的摩托车先下班了。",
]


def ctx(
    cand_loss: float | None,
    active_loss: float | None = None,
    gens: list[str] | None = None,
    samples: int = 8,
    language: str = "zh",
    **settings: float,
) -> GateContext:
    active = None if active_loss is None else EvalResult("active", samples, 30, active_loss)
    return GateContext(
        candidate=EvalResult(
            "cand", samples, 30, cand_loss, list(GOOD_ZH if gens is None else gens)
        ),
        active=active,
        settings=TrainingSettings(**settings),
        language=language,
    )


async def test_better_candidate_passes_with_reasons() -> None:
    decision = await default_gate().decide(ctx(1.5, 2.0))
    assert decision.passed and decision.verdict == "passed" and not decision.pending
    assert decision.reasons[0] == "ok heldout_loss: held-out loss 1.5000 <= active 2.0000"
    assert decision.reasons[1].startswith("ok sanity: 3/3 generations sane")
    loss = decision.checks[0].metrics
    assert loss["delta"] == pytest.approx(-0.5)
    assert loss["candidate_perplexity"] == pytest.approx(math.exp(1.5))
    assert json.loads(json.dumps(decision.as_dict()))["verdict"] == "passed"


async def test_worse_candidate_fails_unless_within_tolerance() -> None:
    worse = await default_gate().decide(ctx(2.1, 2.0))
    assert not worse.passed and worse.verdict == "failed"
    assert "worse than the active model's 2.0000" in worse.reasons[0]
    tolerated = await default_gate().decide(ctx(2.1, 2.0, gate_loss_tolerance=0.1))
    assert tolerated.passed and "(+10%)" in tolerated.reasons[0]
    equal = await default_gate().decide(ctx(2.0, 2.0))
    assert equal.passed


async def test_loss_edge_cases() -> None:
    first = await default_gate().decide(ctx(3.0, None))
    assert first.passed and "no active model" in first.reasons[0]
    nan = await default_gate().decide(ctx(float("nan"), 2.0))
    assert not nan.passed and "candidate loss is nan" in nan.reasons[0]
    none = await default_gate().decide(ctx(None, 2.0))
    assert not none.passed
    empty = await default_gate().decide(ctx(1.0, 2.0, samples=0))
    assert not empty.passed and "no held-out examples" in empty.reasons[0]


async def test_too_few_held_out_answers_never_promote_even_a_better_loss() -> None:
    # The learning-loop proxy: a control trained on disliked answers passed on 1-2 held-out ones.
    few = await default_gate().decide(ctx(1.0, 2.0, samples=7))
    assert not few.passed and not few.pending
    assert few.reasons[0].startswith("FAIL heldout_loss: only 7 held-out answers")
    assert "gate_min_heldout is 8" in few.reasons[0]
    enough = await default_gate().decide(ctx(1.0, 2.0, samples=8))
    assert enough.passed
    lowered = await default_gate().decide(ctx(1.0, 2.0, samples=2, gate_min_heldout=2))
    assert lowered.passed
    # the first model has nothing to compare with, but a loss on 2 answers still decides nothing
    assert not (await default_gate().decide(ctx(1.0, None, samples=2))).passed


def test_settings_refuse_an_evaluation_smaller_than_the_gate_minimum() -> None:
    with pytest.raises(ValueError, match=r"eval_max_samples \(4\) is below gate_min_heldout \(8\)"):
        TrainingSettings(eval_max_samples=4)
    assert TrainingSettings(eval_max_samples=4, gate_min_heldout=4).eval_max_samples == 4


async def test_sanity_failures_are_counted_and_explained() -> None:
    gens = ["", "哈" * 30, "This is English, not Chinese.", "好", GOOD_ZH[0]]
    decision = await default_gate().decide(ctx(1.0, 2.0, gens=gens))
    sanity = decision.checks[1]
    assert not decision.passed and not sanity.passed
    assert sanity.metrics["sane"] == 1 and sanity.metrics["total"] == 5
    assert sanity.metrics["failures"] == {
        "empty": 1,
        "repetitive": 1,
        "repeats one character 30 times": 1,
        "not zh": 1,
        "too short": 1,
    }
    assert "1/5 generations sane (20% < 80%)" in sanity.reason
    lenient = await default_gate().decide(ctx(1.0, 2.0, gens=gens, gate_min_sanity=0.2))
    assert lenient.passed
    nothing = await SanityStep().check(ctx(1.0, gens=[]))
    assert not nothing.passed


def test_sanity_rules() -> None:
    zh = SanityRules(language="zh")
    en = SanityRules(language="en")
    anyl = SanityRules(language="any")
    assert sanity_problems(GOOD_ZH[1], zh) == []
    assert sanity_problems("Plot twist: the cat was the photographer.", en) == []
    assert sanity_problems("Plot twist: the cat was the photographer.", zh) == [
        "not zh (0% of letters)"
    ]
    assert sanity_problems("Plot twist: the cat was the photographer.", anyl) == []
    assert sanity_problems("   ", zh) == ["empty"]
    assert sanity_problems("长" * 201, SanityRules(language="zh", max_chars=200))[0].startswith(
        "too long"
    )
    assert sanity_problems("你的笑，你的笑，你的笑，你的笑，你的笑，你的笑", zh) == [
        "repetitive (20% distinct 4-grams)"
    ]
    assert language_share("猫cat", "zh") == pytest.approx(0.25)
    assert distinct_ngram_ratio("短") == 1.0


class PendingAB:
    """What a live A/B step looks like: pending until enough votes are in."""

    name = "live_ab"

    async def check(self, ctx: GateContext) -> Check:
        return Check(self.name, False, "12/200 votes on the candidate", pending=True)


class Crashing:
    name = "crashing"

    async def check(self, ctx: GateContext) -> Check:
        raise RuntimeError("boom")


async def test_a_pending_step_makes_the_decision_pending_not_failed() -> None:
    gate = Gate([HeldoutLossStep(), SanityStep(), PendingAB()])
    decision = await gate.decide(ctx(1.0, 2.0))
    assert not decision.passed and decision.pending and decision.verdict == "pending"
    assert decision.reasons[-1] == "pending live_ab: 12/200 votes on the candidate"
    worse = await gate.decide(ctx(3.0, 2.0))
    assert worse.verdict == "failed"  # a failed check beats a pending one


async def test_a_crashing_step_fails_the_gate() -> None:
    decision = await Gate([HeldoutLossStep(), Crashing()]).decide(ctx(1.0, 2.0))
    assert not decision.passed and "check crashed" in decision.reasons[1]


def test_eval_result_from_json() -> None:
    r = EvalResult.from_json(
        {
            "model": "m",
            "samples": 2,
            "tokens": 10,
            "loss": 1.0,
            "generations": [{"id": "1", "text": "t"}],
        }
    )
    assert r.generations == ["t"] and r.perplexity == pytest.approx(math.e)
    assert r.summary()["perplexity"] == pytest.approx(math.e)
    assert EvalResult("m", 0).perplexity is None


FAKE_EVAL = """
import json, sys
args = sys.argv[1:]
out = args[args.index("--out") + 1]
model = args[args.index("--model") + 1]
print("evaluating", model, flush=True)
if "broken" in model:
    sys.exit(3)
json.dump({"model": model, "samples": 1, "tokens": 4, "loss": 0.5,
           "generations": [{"id": "1", "text": "好笑的笑话"}]}, open(out, "w"))
"""


async def test_subprocess_evaluator_runs_a_script_and_reads_its_json(tmp_path: Path) -> None:
    script = tmp_path / "fake_eval.py"
    script.write_text(FAKE_EVAL, encoding="utf-8")
    lines: list[str] = []

    async def runner(cmd: list[str], sink) -> int:
        return await run_command(cmd, on_line=sink)

    ev = SubprocessEvaluator(sys.executable, runner, script=script, sink=lines.append)
    result = await ev.evaluate(tmp_path / "model", tmp_path / "h.json", tmp_path)
    assert result.loss == 0.5 and result.generations == ["好笑的笑话"]
    assert lines == [f"evaluating {tmp_path / 'model'}"]
    cmd = ev.command(Path("m"), Path("h.json"), Path("r"), Path("o.json"))
    assert cmd[1].endswith("fake_eval.py") and "--max-dynamic-patch" in cmd
    with pytest.raises(RuntimeError, match="exit code 3"):
        await ev.evaluate(tmp_path / "broken", tmp_path / "h.json", tmp_path)


def test_evaluate_hf_tiling_matches_internvl_dynamic_resolution() -> None:
    from PIL import Image

    from training.evaluate_hf import image_tiles, pick_grid

    assert pick_grid(896, 448, 12, 448) == (2, 1)
    assert pick_grid(448, 1344, 12, 448) == (1, 3)
    assert pick_grid(100, 100, 12, 448) == (1, 1)  # small square: one tile
    assert pick_grid(1000, 1000, 12, 448) == (3, 3)  # enough pixels for a larger square grid
    assert pick_grid(600, 600, 12, 448) == (1, 1)  # not enough for 2×2
    assert pick_grid(896, 448, 1, 448) == (1, 1)
    tiles = image_tiles(Image.new("RGB", (896, 448)), 12, 448, thumbnail=True)
    assert len(tiles) == 3 and all(t.size == (448, 448) for t in tiles)
    assert len(image_tiles(Image.new("RGB", (300, 300)), 12, 448, thumbnail=True)) == 1
