"""Measure the live A/B rule itself: false promotions, power and votes to a decision (CPU only).

``python -m bench.ab_sim [--sims 1000] [--out bench/results/ab-sim-DATE.json]``

Each simulated test runs for at most the rule's 14 days and is decided the way ``oogiri serve``
decides it: every ``check_minutes`` (5) the counted votes of both arms go through
``bot.abstats.decide``. The traffic is meant to look like a real chat bot's, not like coin flips:

* **bursty arrival**: voting sessions arrive as a Poisson process whose rate follows a day/night
  cycle (x0.2 at night, x1.8 in the evening) and random bursts (on average one every 2 days, x10
  for about an hour: the bot was shared in a busy group);
* **heavy-tailed users**: each session belongs to a user drawn from a Zipf law (exponent 1.2) over
  a population of 20,000, so a handful of users cast hundreds of votes; a session has a
  geometric number of votes (mean 3);
* **users differ**: a user's like-probability is ``logistic(logit(p_arm) + N(0, 0.8))``, fixed for
  the test, so a heavy voter's votes are correlated (the rule assumes independent votes: the cap
  is what keeps this honest);
* **arms by user**: a share of users (0.2, ``ab.share``) is served the candidate, the others the
  active model; one vote per (user, joke) is implied by each vote being a new joke;
* **per-voter cap as the product applies it**: a voter's earliest ``per_voter_cap`` (20) votes per
  arm are counted, later ones dropped (``ab.per_voter_cap``, like export's ``per_voter_cap``).

The effect is the absolute lift added to every candidate-arm user's probability (clipped to
[0, 1]); A/A means a lift of 0. For speed the scan over the 4,032 checks of a test uses a numpy
copy of the rule's confidence sequence; the decision it finds is then re-read with
``bot.abstats.decide`` itself at that check (and the check before it must say "wait"), so the
reported outcome is the real rule's. The naive row reads a one-sided fixed-horizon z-test at every
check (what the rule exists to prevent), to show what peeking costs.

What this does not prove: real voters may differ from this model (e.g. novelty effects, users
who see both arms); the figures hold for the traffic simulated here.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import norm

from bench.common import RESULTS, share_ci, write_json
from bot.abstats import AbRule, Arm, decide, votes_to_decide

MINUTES_PER_DAY = 1440


@dataclass(frozen=True)
class Traffic:
    """The simulated audience (see module doc)."""

    votes_per_day: float = 1000.0  # expected, before bursts
    share: float = 0.2  # of users served the candidate
    per_voter_cap: int | None = 20
    base_rate: float = 0.30  # active model's like-probability (population median)
    user_sd: float = 0.8  # spread of users' like-propensity on the logit scale
    zipf_s: float = 1.2
    population: int = 20_000
    votes_per_session: float = 3.0
    burst_every_days: float = 2.0
    burst_factor: float = 10.0
    burst_minutes: float = 60.0
    check_minutes: int = 5


@dataclass
class Result:
    outcome: str
    minutes: int  # when decided (max duration for a timeout)
    votes: int  # counted votes of both arms at the decision


def _rate_per_minute(rng: np.random.Generator, minutes: int, t: Traffic) -> np.ndarray:
    """Session arrival rate per minute: day/night cycle times random bursts."""
    day = (np.arange(minutes) % MINUTES_PER_DAY) / MINUTES_PER_DAY
    diurnal = 1.0 - 0.8 * np.cos(2 * math.pi * (day - 0.15))  # low at night, peak in the evening
    diurnal /= diurnal.mean()
    rate = np.full(minutes, t.votes_per_day / t.votes_per_session / MINUTES_PER_DAY) * diurnal
    n_bursts = rng.poisson(minutes / MINUTES_PER_DAY / t.burst_every_days)
    for start in rng.integers(0, minutes, size=n_bursts):
        rate[start : start + int(rng.exponential(t.burst_minutes)) + 1] *= t.burst_factor
    return rate


@dataclass
class Counts:
    """Counted votes of both arms, cumulative at each check (arrays of len(checks)).

    ``a`` is the control, ``b`` the candidate; each holds likes, votes and the per-voter sums
    ``bot.abstats.Arm`` takes (voters, sum likes^2, sum likes*votes, sum votes^2).
    """

    a: list[np.ndarray]
    b: list[np.ndarray]

    def arm(self, which: str, i: int, per_voter: bool = True) -> Arm:
        cols = [int(c[i]) for c in (self.a if which == "a" else self.b)]
        return Arm(*cols) if per_voter else Arm(cols[0], cols[1])


def simulate_votes(rng: np.random.Generator, effect: float, t: Traffic, minutes: int) -> Counts:
    """One test's votes, counted as the product counts them, cumulative at every check."""
    sessions_per_min = rng.poisson(_rate_per_minute(rng, minutes, t))
    n_sessions = int(sessions_per_min.sum())
    session_minute = np.repeat(np.arange(minutes), sessions_per_min)
    users = (rng.zipf(t.zipf_s, size=n_sessions) - 1) % t.population
    n_votes = rng.geometric(1.0 / t.votes_per_session, size=n_sessions)
    voter = np.repeat(users, n_votes)
    minute = np.repeat(session_minute, n_votes)
    # user-level arm assignment and propensity (fixed per user, drawn for the whole population)
    arm_of_user = rng.random(t.population) < t.share  # True: candidate
    logit = math.log(t.base_rate / (1 - t.base_rate)) + rng.normal(0.0, t.user_sd, t.population)
    p_user = 1.0 / (1.0 + np.exp(-logit))
    cand = arm_of_user[voter]
    p = np.clip(p_user[voter] + np.where(cand, effect, 0.0), 0.0, 1.0)
    like = (rng.random(voter.size) < p).astype(np.int64)
    # each vote's rank within its voter and the voter's likes before it (votes are in time order)
    order = np.argsort(voter, kind="stable")
    by_voter = voter[order]
    first = np.r_[True, by_voter[1:] != by_voter[:-1]]
    start = np.maximum.accumulate(np.where(first, np.arange(voter.size), 0))
    cum_like = np.r_[0, like[order].cumsum()]
    rank, y_before = np.empty_like(like), np.empty_like(like)
    rank[order] = np.arange(voter.size) - start
    y_before[order] = cum_like[:-1] - cum_like[start]
    keep = rank < (np.inf if t.per_voter_cap is None else t.per_voter_cap)
    # increments of the per-voter sums when a voter's (likes y, votes n) gain one vote l
    incs = [
        like,
        np.ones_like(like),
        (rank == 0).astype(np.int64),
        2 * y_before * like + like,
        y_before + like * rank + like,
        2 * rank + 1,
    ]
    checks = np.arange(t.check_minutes, minutes + 1, t.check_minutes) - 1

    def cumulative(sel: np.ndarray) -> list[np.ndarray]:
        sums = [np.bincount(minute[sel], weights=i[sel], minlength=minutes) for i in incs]
        return [s.cumsum()[checks].round().astype(np.int64) for s in sums]

    return Counts(cumulative(keep & ~cand), cumulative(keep & cand))


def _variance(c: list[np.ndarray], per_voter: bool) -> np.ndarray:
    """numpy copy of bot.abstats._variance."""
    likes, votes, voters, s_ll, s_lv, s_vv = (x.astype(float) for x in c)
    n = np.maximum(votes, 1.0)
    p = (likes + 0.5) / (n + 1.0)
    binomial = p * (1 - p) / n
    if not per_voter:
        return binomial
    r = likes / n
    resid = np.maximum(s_ll - 2 * r * s_lv + r * r * s_vv, 0.0)
    g = np.maximum(voters, 2.0)
    clustered = np.where(voters >= 2, g / (g - 1) * resid / (n * n), 0.0)
    return np.maximum(binomial, clustered)


def _first(hit: np.ndarray) -> int:
    idx = np.flatnonzero(hit)
    return int(idx[0]) if idx.size else -1


def _first_decision(c: Counts, rule: AbRule, per_voter: bool) -> int:
    """Index of the first check where the rule promotes or rejects (numpy copy), -1 if none."""
    va, vb = c.a[1], c.b[1]
    ok = np.minimum(va, vb) >= rule.min_votes
    if not ok.any():
        return -1
    d = c.b[0] / np.maximum(vb, 1) - c.a[0] / np.maximum(va, 1)
    v = _variance(c.a, per_voter) + _variance(c.b, per_voter)
    t2 = rule.tau**2
    r = np.sqrt(2 * v * (v + t2) / t2 * (math.log(1 / rule.alpha) + 0.5 * np.log((v + t2) / v)))
    return _first(ok & (((d - r > 0) & (d >= rule.min_effect)) | (d + r < rule.min_effect)))


def _first_naive(c: Counts, rule: AbRule) -> int:
    """A one-sided z-test at level alpha read at every check: index of the first 'promote'."""
    (la, va), (lb, vb) = c.a[:2], c.b[:2]
    va1, vb1 = np.maximum(va, 1), np.maximum(vb, 1)
    d = lb / vb1 - la / va1
    pool = (la + lb) / (va1 + vb1)
    se = np.sqrt(np.maximum(pool * (1 - pool), 1e-12) * (1 / va1 + 1 / vb1))
    ok = np.minimum(va, vb) >= rule.min_votes
    return _first(ok & (d / se > float(norm.isf(rule.alpha))) & (d >= rule.min_effect))


def run_one(
    rng: np.random.Generator,
    effect: float,
    rule: AbRule,
    t: Traffic,
    naive: bool = False,
    per_voter: bool = True,
) -> Result:
    """One A/B test, decided as ``oogiri serve`` decides it (every check_minutes).

    ``per_voter`` False passes only (likes, votes) to the rule, as a caller that drops the
    per-voter sums would.
    """
    minutes = int(rule.max_duration_s // 60)
    c = simulate_votes(rng, effect, t, minutes)
    i = _first_naive(c, rule) if naive else _first_decision(c, rule, per_voter)
    if i < 0:
        return Result("timeout", minutes, int(c.a[1][-1] + c.b[1][-1]))
    result = Result("promote", (i + 1) * t.check_minutes, int(c.a[1][i] + c.b[1][i]))
    if naive:
        return result
    elapsed = float(result.minutes * 60)
    verdict = decide(c.arm("a", i, per_voter), c.arm("b", i, per_voter), rule, elapsed)
    if verdict.outcome not in ("promote", "reject"):
        raise AssertionError(f"numpy scan and bot.abstats disagree at check {i}: {verdict}")
    if i > 0:
        before = decide(c.arm("a", i - 1, per_voter), c.arm("b", i - 1, per_voter), rule, 0.0)
        if before.outcome != "wait":
            raise AssertionError(f"numpy scan missed an earlier decision at {i - 1}: {before}")
    return replace(result, outcome=verdict.outcome)


def _median(values: Sequence[float], per: float = 1.0) -> float | None:
    return float(np.median(values)) / per if values else None


def summarise(results: list[Result], minutes_max: int) -> dict[str, Any]:
    n = len(results)
    count = Counter(r.outcome for r in results)
    decided = [r for r in results if r.outcome != "timeout"]
    lo, hi = share_ci(count["promote"], n) or (0.0, 1.0)  # Wilson interval on the promote rate
    return {
        "sims": n,
        **{o: count[o] for o in ("promote", "reject", "timeout")},
        "promote_rate": count["promote"] / n,
        "promote_rate_95": [lo, hi],
        "median_votes_to_decision": _median([r.votes for r in decided]),
        "median_days_to_decision": _median([r.minutes for r in decided], MINUTES_PER_DAY),
        "median_votes_at_timeout": _median([r.votes for r in results if r.outcome == "timeout"]),
        "max_days": minutes_max / MINUTES_PER_DAY,
    }


def run_grid(
    sims: int, seed: int, scenarios: list[dict[str, Any]], rule: AbRule
) -> list[dict[str, Any]]:
    rows = []
    for k, sc in enumerate(scenarios):
        t = replace(Traffic(), **sc.get("traffic", {}))
        rng = np.random.default_rng([seed, k])
        t0 = time.perf_counter()
        naive, per_voter = sc.get("naive", False), sc.get("per_voter", True)
        res = [run_one(rng, sc["effect"], rule, t, naive, per_voter) for _ in range(sims)]
        row = {
            "name": sc["name"],
            "effect": sc["effect"],
            "naive_z": naive,
            "per_voter_sums": per_voter,
            "traffic": asdict(t),
            **summarise(res, int(rule.max_duration_s // 60)),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        rows.append(row)
        shown = ("name", "promote", "reject", "timeout", "median_votes_to_decision")
        print(json.dumps({key: row[key] for key in shown}))
    return rows


def projection_check(
    rng: np.random.Generator, effect: float, rule: AbRule, t: Traffic, at_votes: int
) -> dict[str, Any] | None:
    """How well a waiting test's "about N counted votes would decide" (``votes_to_decide``, read at
    the first check with ``at_votes`` counted votes) foretells the votes at which the rule really
    decided. None for a test that decided before (or never reached) that check."""
    c = simulate_votes(rng, effect, t, int(rule.max_duration_s // 60))
    total = c.a[1] + c.b[1]
    j = _first(total >= at_votes)
    i = _first_decision(c, rule, True)
    if j < 0 or 0 <= i <= j:
        return None
    return {
        "projected": votes_to_decide(c.arm("a", j), c.arm("b", j), rule),
        "decided_at": int(total[i]) if i >= 0 else None,  # None: timed out (censored)
        "votes_at_end": int(total[-1]),
    }


def summarise_projection(checks: list[dict[str, Any]]) -> dict[str, Any]:
    """Ratio actual/projected for decided tests; for timed-out ones, whether the projection had
    already said more votes than the test went on to get (it then warned correctly)."""
    decided = [c for c in checks if c["decided_at"] is not None and c["projected"]]
    ratio = np.array([c["decided_at"] / c["projected"] for c in decided])
    timed_out = [c for c in checks if c["decided_at"] is None and c["projected"]]
    some = bool(ratio.size)
    return {
        "tests": len(checks),
        "decided": len(decided),
        "ratio_median": float(np.median(ratio)) if some else None,
        "ratio_10_90": [float(v) for v in np.quantile(ratio, [0.1, 0.9])] if some else None,
        "within_half_to_double": float(np.mean((ratio >= 0.5) & (ratio <= 2))) if some else None,
        "timed_out": len(timed_out),
        "timed_out_projected_beyond_votes_got": sum(
            c["projected"] > c["votes_at_end"] for c in timed_out
        ),
    }


def run_projection(sims: int, seed: int, rule: AbRule, at_votes: int) -> list[dict[str, Any]]:
    rows = []
    for k, (name, effect) in enumerate(PROJECTION_SCENARIOS):
        rng = np.random.default_rng([seed, 100 + k])
        checks = [projection_check(rng, effect, rule, Traffic(), at_votes) for _ in range(sims)]
        row = {"name": name, "effect": effect, "at_votes": at_votes}
        rows.append(row | summarise_projection([c for c in checks if c]))
        print(json.dumps(rows[-1]))
    return rows


PROJECTION_SCENARIOS = [("A/A", 0.0), ("A/B +5 pp", 0.05), ("A/B +10 pp", 0.10), ("-3 pp", -0.03)]
BUSY = {"votes_per_day": 5000.0}
SCENARIOS: list[dict[str, Any]] = [
    # the default rule and traffic: 1,000 votes/day, 20 % of users on the candidate, cap 20
    {"name": "A/A", "effect": 0.0},
    {"name": "A/B +3 pp (= min_effect)", "effect": 0.03},
    {"name": "A/B +5 pp", "effect": 0.05},
    {"name": "A/B +10 pp", "effect": 0.10},
    {"name": "A/B -3 pp (worse)", "effect": -0.03},
    # a busier bot, and an even split of users
    {"name": "busy bot (5,000 votes/day): A/A", "effect": 0.0, "traffic": BUSY},
    {"name": "busy bot: A/B +3 pp", "effect": 0.03, "traffic": BUSY},
    {"name": "busy bot: A/B +5 pp", "effect": 0.05, "traffic": BUSY},
    {"name": "share 0.5: A/B +5 pp", "effect": 0.05, "traffic": {"share": 0.5}},
    # what the parts of the rule buy
    {"name": "A/A, no per-voter cap", "effect": 0.0, "traffic": {"per_voter_cap": None}},
    {"name": "A/A, totals only (no per-voter sums)", "effect": 0.0, "per_voter": False},
    {
        "name": "A/A, no cap and totals only",
        "effect": 0.0,
        "per_voter": False,
        "traffic": {"per_voter_cap": None},
    },
    {"name": "A/A, naive z-test read every 5 min", "effect": 0.0, "naive": True},
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--sims", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=15)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--projection",
        type=int,
        metavar="VOTES",
        help="instead of the grid: check votes_to_decide read at VOTES counted votes",
    )
    args = ap.parse_args(argv)
    rule = AbRule()
    t0 = time.perf_counter()
    if args.projection:
        rows = run_projection(args.sims, args.seed, rule, args.projection)
        name = f"ab-sim-projection-{datetime.now(UTC):%Y-%m-%d}.json"
    else:
        rows = run_grid(args.sims, args.seed, SCENARIOS, rule)
        name = f"ab-sim-{datetime.now(UTC):%Y-%m-%d}.json"
    doc = {
        "bench": "ab_sim",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "rule": asdict(rule)
        | {"tau": rule.tau, "test": "mSPRT confidence sequence (bot/abstats.py)"},
        "sims_per_scenario": args.sims,
        "seed": args.seed,
        "python": platform.python_version(),
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": rows,
    }
    print(f"wrote {write_json(args.out or RESULTS / name, doc)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
