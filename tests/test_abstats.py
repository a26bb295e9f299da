"""The A/B decision rule (bot/abstats.py): outcomes, intervals, and its error rate under peeking."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bot.abstats import (
    AbDecision,
    AbRule,
    Arm,
    confidence_sequence,
    decide,
    interval,
    rollback_check,
)

RULE = AbRule(alpha=0.05, min_effect=0.03, min_votes=100, max_duration_s=1000.0)


# --- Wilson interval ---------------------------------------------------------------------------


def test_wilson_matches_textbook_values() -> None:
    # 81 of 263 (Wilson 1927 style example): computed by hand from the closed form.
    lo, hi = interval(81, 263)
    p, n, z = 81 / 263, 263, 1.959963984540054
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert lo == pytest.approx(centre - half, abs=1e-9)
    assert hi == pytest.approx(centre + half, abs=1e-9)


def test_wilson_edges_stay_inside_zero_one_and_are_not_degenerate() -> None:
    assert interval(0, 0) == (0.0, 1.0)
    lo, hi = interval(0, 10)
    assert lo == 0.0 and 0.2 < hi < 0.35  # Wald would give [0, 0]
    lo, hi = interval(10, 10)
    assert 0.65 < lo < 0.8 and hi == 1.0
    assert interval(5, 10, 0.99)[1] > interval(5, 10, 0.95)[1] > interval(5, 10, 0.8)[1]


@pytest.mark.parametrize("likes,votes", [(-1, 3), (4, 3), (1, -1)])
def test_bad_counts_are_refused(likes: int, votes: int) -> None:
    with pytest.raises(ValueError):
        interval(likes, votes)
    with pytest.raises(ValueError):
        Arm(likes, votes)


def test_bad_rule_and_elapsed_are_refused() -> None:
    for kwargs in (
        {"alpha": 0.0},
        {"alpha": 1.0},
        {"min_effect": -0.1},
        {"min_votes": 0},
        {"max_duration_s": 0},
    ):
        with pytest.raises(ValueError):
            AbRule(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        decide(Arm(1, 2), Arm(1, 2), RULE, -1.0)
    with pytest.raises(ValueError):
        decide(Arm(1, 2), Arm(1, 2), RULE, float("nan"))
    with pytest.raises(ValueError):
        interval(1, 2, confidence=1.5)


# --- outcomes --------------------------------------------------------------------------------


def test_wait_before_min_votes_even_with_a_huge_gap() -> None:
    d = decide(Arm(0, 99), Arm(99, 99), RULE, 10.0)
    assert d.outcome == "wait"
    assert "99" in d.reason and "100" in d.reason
    assert d.difference_interval is None and d.statistic == 0.0


def test_promote_on_a_clear_lift() -> None:
    d = decide(Arm(300, 1000), Arm(420, 1000), RULE, 10.0)
    assert d.outcome == "promote", d.reason
    assert d.difference_interval is not None and d.difference_interval[0] > 0
    assert d.statistic >= d.threshold == pytest.approx(math.log(20))
    assert d.control_rate == pytest.approx(0.3) and d.candidate_rate == pytest.approx(0.42)
    assert (
        d.candidate_interval is not None
        and d.candidate_interval[0] < 0.42 < d.candidate_interval[1]
    )


def test_significant_but_smaller_than_min_effect_is_not_promoted() -> None:
    # 200k votes per arm: the lift of 1 pp is certain, but the operator asked for 3 pp.
    d = decide(Arm(60000, 200000), Arm(62000, 200000), RULE, 10.0)
    assert d.difference_interval is not None and d.difference_interval[0] > 0
    assert d.outcome == "reject", d.reason
    assert "cannot reach" in d.reason


def test_reject_when_worse() -> None:
    d = decide(Arm(400, 1000), Arm(280, 1000), RULE, 10.0)
    assert d.outcome == "reject"
    assert "worse" in d.reason


def test_inconclusive_waits_then_times_out_keeping_the_active_model() -> None:
    c, k = Arm(60, 200), Arm(66, 200)
    assert decide(c, k, RULE, 999.0).outcome == "wait"
    d = decide(c, k, RULE, 1000.0)
    assert d.outcome == "timeout" and "keeping the active model" in d.reason
    assert decide(Arm(1, 5), Arm(2, 5), RULE, 5000.0).outcome == "timeout"


def test_to_dict_is_json_ready() -> None:
    import json

    d = decide(Arm(300, 1000), Arm(420, 1000), RULE, 10.0)
    back = json.loads(json.dumps(d.to_dict()))
    assert back["outcome"] == "promote" and len(back["difference_interval"]) == 2
    assert isinstance(decide(Arm(0, 0), Arm(0, 0), RULE, 0).to_dict(), dict)
    assert isinstance(d, AbDecision)


def test_sequence_widens_with_fewer_votes_and_smaller_alpha() -> None:
    small = confidence_sequence(Arm(30, 100), Arm(30, 100), 0.05, 0.03)
    big = confidence_sequence(Arm(3000, 10000), Arm(3000, 10000), 0.05, 0.03)
    strict = confidence_sequence(Arm(3000, 10000), Arm(3000, 10000), 0.01, 0.03)
    assert small[1] - small[0] > big[1] - big[0] > 0
    assert strict[1] - strict[0] > big[1] - big[0]
    # always wider than the fixed-horizon 95 % interval: that is the price of peeking freely
    se = math.sqrt(2 * 0.3 * 0.7 / 10000)
    assert (big[1] - big[0]) / 2 > 1.96 * se


# --- rollback --------------------------------------------------------------------------------


def test_rollback_when_the_new_model_disappoints() -> None:
    d = rollback_check(Arm(450, 1000), Arm(300, 1000), 0.02, RULE, 10.0)
    assert d.outcome == "reject" and "roll back" in d.reason


def test_rollback_confirms_an_equal_or_better_model() -> None:
    assert rollback_check(Arm(600, 4000), Arm(660, 4000), 0.02, RULE, 10.0).outcome == "promote"


def test_rollback_waits_times_out_and_checks_margin() -> None:
    assert rollback_check(Arm(30, 100), Arm(28, 100), 0.02, RULE, 10.0).outcome == "wait"
    assert rollback_check(Arm(30, 100), Arm(28, 100), 0.02, RULE, 2000.0).outcome == "timeout"
    assert rollback_check(Arm(3, 10), Arm(2, 10), 0.02, RULE, 10.0).outcome == "wait"
    with pytest.raises(ValueError):
        rollback_check(Arm(3, 10), Arm(2, 10), -0.1, RULE, 10.0)


# --- error rate under continuous peeking (the fast version of bench/ab_sim.py) --------------

N_SIMS = 200
ALPHA = 0.05
# A correct rule promotes an equal candidate in at most alpha of the tests: X ~ Binomial(200, 0.05)
# has mean 10; P(X >= 19) < 0.01, so a count of 19 or more means the rule is broken.
MAX_FALSE_PROMOTIONS = 18


def _peeking_sims(
    rule_fn, seed: int, p: float = 0.3, per_look: int = 25, max_votes: int = 3000
) -> int:
    """Count tests an equal candidate gets promoted in, looking after every batch of votes."""
    rng = np.random.default_rng(seed)
    looks = max_votes // per_look
    # bursty arrival: each look adds a random share of a batch to each arm
    promotions = 0
    for _ in range(N_SIMS):
        na = rng.integers(1, 2 * per_look, size=looks).cumsum()
        nb = rng.integers(1, 2 * per_look, size=looks).cumsum()
        va = (rng.random(int(na[-1])) < p).cumsum()
        vb = (rng.random(int(nb[-1])) < p).cumsum()
        for a, b in zip(na, nb, strict=True):
            outcome = rule_fn(Arm(int(va[a - 1]), int(a)), Arm(int(vb[b - 1]), int(b)))
            if outcome != "wait":
                promotions += outcome == "promote"
                break
    return promotions


def _naive_z(control: Arm, candidate: Arm) -> str:
    """The mistake the rule prevents: a fixed-horizon one-sided z-test read at every look."""
    if min(control.votes, candidate.votes) < RULE.min_votes:
        return "wait"
    pa, pb = control.likes / control.votes, candidate.likes / candidate.votes
    pool = (control.likes + candidate.likes) / (control.votes + candidate.votes)
    se = math.sqrt(max(pool * (1 - pool), 1e-12) * (1 / control.votes + 1 / candidate.votes))
    return "promote" if (pb - pa) / se > 1.6449 and pb - pa >= RULE.min_effect else "wait"


def test_aa_false_promotions_at_most_alpha_under_continuous_peeking() -> None:
    rule = AbRule(alpha=ALPHA, min_effect=0.03, min_votes=100)
    false = _peeking_sims(lambda c, k: decide(c, k, rule, 0.0).outcome, seed=15)
    assert false <= MAX_FALSE_PROMOTIONS, f"{false}/{N_SIMS} equal candidates promoted"


def test_the_aa_assertion_has_teeth_a_naive_peeking_z_test_fails_it() -> None:
    false = _peeking_sims(_naive_z, seed=15)
    assert false > MAX_FALSE_PROMOTIONS, (
        f"naive z-test promoted only {false}/{N_SIMS}: the check is too lax"
    )


def test_a_real_lift_is_found() -> None:
    """Power check so a rule that never promotes cannot pass the A/A test above."""
    rng = np.random.default_rng(7)
    rule = AbRule(alpha=ALPHA, min_effect=0.03, min_votes=100)
    promoted = 0
    for _ in range(50):
        a = (rng.random(3000) < 0.30).cumsum()
        b = (rng.random(3000) < 0.40).cumsum()
        for n in range(100, 3001, 50):
            d = decide(Arm(int(a[n - 1]), n), Arm(int(b[n - 1]), n), rule, 0.0)
            if d.outcome != "wait":
                promoted += d.outcome == "promote"
                break
    assert promoted >= 45
