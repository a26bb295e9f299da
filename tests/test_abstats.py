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
    votes_to_decide,
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


# --- per-voter sums -------------------------------------------------------------------------


def test_from_voters_sums_and_validation() -> None:
    arm = Arm.from_voters([(2, 3), (0, 1), (0, 0), (5, 5)])
    assert (arm.likes, arm.votes, arm.voters) == (7, 9, 3)
    assert (arm.sum_likes_sq, arm.sum_likes_votes, arm.sum_votes_sq) == (29, 31, 35)
    with pytest.raises(ValueError):
        Arm.from_voters([(4, 3)])
    with pytest.raises(ValueError):
        Arm(3, 10, voters=2)  # sums must come together
    with pytest.raises(ValueError):
        Arm(3, 10, 20, 3, 3, 10)  # more voters than votes


def test_one_vote_per_voter_is_the_binomial_case() -> None:
    plain = confidence_sequence(Arm(300, 1000), Arm(340, 1000), 0.05, 0.03)
    single = confidence_sequence(
        Arm.from_voters([(1, 1)] * 300 + [(0, 1)] * 700),
        Arm.from_voters([(1, 1)] * 340 + [(0, 1)] * 660),
        0.05,
        0.03,
    )
    assert single == pytest.approx(plain, rel=5e-3)


def test_voters_who_differ_widen_the_sequence() -> None:
    # same totals; here 50 voters cast 20 votes each, half of them like everything
    clustered = Arm.from_voters([(20, 20)] * 15 + [(0, 20)] * 35)
    spread = Arm.from_voters([(6, 20)] * 50)
    ref = Arm(300, 1000)
    wide = confidence_sequence(ref, clustered, 0.05, 0.03)
    narrow = confidence_sequence(ref, spread, 0.05, 0.03)
    assert clustered.likes == spread.likes == 300
    assert wide[1] - wide[0] > 2 * (narrow[1] - narrow[0])
    # a lift carried by a few enthusiastic voters is not evidence of a better model
    lucky = Arm.from_voters([(20, 20)] * 20 + [(0, 20)] * 30)
    assert decide(ref, Arm(400, 1000), RULE, 0).outcome == "promote"
    assert decide(ref, lucky, RULE, 0).outcome == "wait"


# --- error rate under continuous peeking (the fast version of bench/ab_sim.py) --------------

N_SIMS = 200
ALPHA = 0.05
# A correct rule promotes an equal candidate in at most alpha of the tests: X ~ Binomial(200, 0.05)
# has mean 10; P(X >= 19) < 0.01, so a count of 19 or more means the rule is broken.
MAX_FALSE_PROMOTIONS = 18


def _bench_sims(effect: float, n: int, naive: bool = False, seed: int = 15) -> int:
    """Promotions in n tests with bench/ab_sim.py's bursty, heavy-tailed, capped traffic."""
    from bench.ab_sim import Traffic, run_one

    rng = np.random.default_rng(seed)
    rule = AbRule(alpha=ALPHA, min_effect=0.03, min_votes=100)
    return sum(
        run_one(rng, effect, rule, Traffic(), naive=naive).outcome == "promote" for _ in range(n)
    )


def test_aa_false_promotions_at_most_alpha_under_continuous_peeking() -> None:
    false = _bench_sims(0.0, N_SIMS)
    assert false <= MAX_FALSE_PROMOTIONS, f"{false}/{N_SIMS} equal candidates promoted"


def test_the_aa_assertion_has_teeth_a_naive_peeking_z_test_fails_it() -> None:
    false = _bench_sims(0.0, N_SIMS, naive=True)
    assert false > MAX_FALSE_PROMOTIONS, f"naive z-test promoted only {false}/{N_SIMS}: too lax"


def test_a_real_lift_is_found() -> None:
    """Power check so a rule that never promotes cannot pass the A/A test above."""
    assert _bench_sims(0.10, 50, seed=7) >= 40


def test_bench_scan_agrees_with_decide_on_simple_data() -> None:
    """bench/ab_sim.py's numpy copy of the rule finds the check decide() first decides at."""
    from bench.ab_sim import Counts, _first_decision

    rng = np.random.default_rng(3)
    rule = AbRule()
    for effect in (0.0, 0.08, -0.08):
        n = np.arange(1, 3001)
        la = (rng.random(3000) < 0.3).cumsum()
        lb = (rng.random(3000) < 0.3 + effect).cumsum()
        c = Counts([la, n, n, la, la, n], [lb, n, n, lb, lb, n])
        i = _first_decision(c, rule, per_voter=True)
        outcomes = [decide(c.arm("a", j), c.arm("b", j), rule, 0).outcome for j in range(3000)]
        first = next((j for j, o in enumerate(outcomes) if o != "wait"), -1)
        assert i == first


# --- the projection: how many votes would decide -----------------------------------------------


def scaled(arm: Arm, factor: float) -> Arm:
    """The same like-rate on ``factor`` times the votes (binomial arms: variance scales as 1/n)."""
    votes = round(arm.votes * factor)
    return Arm(round(votes * arm.likes / arm.votes), votes)


@pytest.mark.parametrize(
    ("control", "candidate", "decides_as"),
    [
        (Arm(130, 200), Arm(146, 200), "promote"),  # +8 pp, undecided at 400 votes
        (Arm(60, 150), Arm(57, 150), "reject"),  # -2 pp: the lift cannot reach +3 pp
        (Arm(484, 740), Arm(335, 460), "promote"),  # the device run's round 2, binomial
    ],
)
def test_the_projected_votes_decide_and_fewer_do_not(
    control: Arm, candidate: Arm, decides_as: str
) -> None:
    now = control.votes + candidate.votes
    assert decide(control, candidate, RULE, 1.0).outcome == "wait"
    needed = votes_to_decide(control, candidate, RULE)
    assert needed is not None and needed > now
    at = needed / now
    assert decide(scaled(control, at * 1.1), scaled(candidate, at * 1.1), RULE, 1.0).outcome == (
        decides_as
    )
    assert decide(scaled(control, at * 0.9), scaled(candidate, at * 0.9), RULE, 1.0).outcome == (
        "wait"
    )


def test_a_waiting_decision_says_how_many_votes_would_decide() -> None:
    d = decide(Arm(130, 200), Arm(146, 200), RULE, 1.0)
    assert d.votes_to_decide == votes_to_decide(Arm(130, 200), Arm(146, 200), RULE)
    assert f"about {d.votes_to_decide:,} counted votes in all would decide" in d.reason
    assert d.to_dict()["votes_to_decide"] == d.votes_to_decide
    decided = decide(Arm(60, 200), Arm(120, 200), RULE, 1.0)
    assert decided.outcome == "promote" and decided.votes_to_decide is None


def test_the_projection_where_no_number_of_votes_decides_or_none_is_needed() -> None:
    assert votes_to_decide(Arm(0, 0), Arm(5, 10), RULE) is None
    no_effect = AbRule(min_effect=0.0, min_votes=100)
    assert votes_to_decide(Arm(50, 100), Arm(50, 100), no_effect) is None  # lift 0 vs bound 0
    # already decisive: the votes it has; below min_votes: at least min_votes per arm
    assert votes_to_decide(Arm(60, 200), Arm(120, 200), RULE) == 400
    assert votes_to_decide(Arm(3, 10), Arm(9, 10), RULE) == 200


def test_the_projection_foretells_the_votes_to_a_decision_in_simulated_traffic() -> None:
    """The fast version of ``python -m bench.ab_sim --projection``: read at 3,000 counted votes,
    the projected votes are close to where a +10 pp test really decides."""
    from bench.ab_sim import Traffic, projection_check, summarise_projection

    rng = np.random.default_rng(7)
    rule = AbRule()
    checks = [projection_check(rng, 0.10, rule, Traffic(), 3000) for _ in range(60)]
    s = summarise_projection([c for c in checks if c])
    assert s["decided"] >= 15
    assert 0.6 <= s["ratio_median"] <= 1.4 and s["within_half_to_double"] >= 0.75


def test_reasons_say_1_vote_not_1_votes() -> None:
    """Operators read these reasons: a count of one takes the singular."""
    rule = AbRule(min_votes=5, max_duration_s=100.0)
    one, many = Arm(likes=1, votes=1), Arm(likes=3, votes=1200)
    reasons = [
        decide(one, many, rule, elapsed_s=1.0).reason,
        decide(one, many, rule, elapsed_s=500.0).reason,
        rollback_check(one, many, 0.05, rule, elapsed_s=1.0).reason,
        rollback_check(one, many, 0.05, rule, elapsed_s=500.0).reason,
    ]
    assert all("1 votes" not in r for r in reasons), reasons
    assert "only 1 vote on the smaller arm" in reasons[1]
    assert "watching the promotion: 1 vote before, 1200 after" in reasons[2]
