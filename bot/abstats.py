"""The live A/B decision rule: an always-valid sequential test on two like-rates.

Why this rule. An operator watches the test continuously (``oogiri models ab status``, the stats
page, the gate step polling every few minutes), so a fixed-horizon z-test would be peeked at
hundreds of times and promote an equal candidate far more often than its nominal alpha. We use the
**mixture sequential probability ratio test (mSPRT)** of Johari, Pekelis and Walsh ("Always valid
inference", 2017/2022) for the difference of two proportions, with a normal mixing distribution.
It gives an *always-valid confidence sequence* for ``delta = p_candidate - p_control``: with
probability at least ``1 - alpha`` the true ``delta`` lies inside the interval at *every* moment
the test is looked at, however often and whenever it is stopped. Both outcomes read that one
sequence, so both error rates are bounded by ``alpha`` at once:

* **promote** when the sequence's lower bound is above 0 (evidence the candidate is better) *and*
  the observed lift ``delta_hat`` is at least ``min_effect`` (the lift the operator cares about is
  what was actually seen). Under ``delta <= 0`` this happens with probability ``<= alpha``.
* **reject** when the sequence's upper bound is below ``min_effect``: the candidate is worse, or it
  cannot plausibly reach the lift the operator asked for. Under ``delta >= min_effect`` this happens
  with probability ``<= alpha``.
* **wait** otherwise (also always before ``min_votes`` per arm); **timeout** once ``max_duration_s``
  has passed without a decision: keep the active model.

A Bayesian beta-binomial rule with a fixed posterior threshold was the alternative; its frequentist
false-promotion rate under continuous peeking is not bounded by its threshold, and "at most alpha
of equal candidates get promoted" is the promise an operator can check (``bench/ab_sim.py``).

The mSPRT here uses the normal approximation of the two-sample difference (as Johari et al. do for
conversion rates), so its guarantee is asymptotic; ``min_votes`` keeps it away from tiny samples
and the A/A simulation measures the real rate. Pure Python (``math`` only), no I/O: the caller
counts votes (one per user and joke, per-user caps applied) and passes the totals.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Literal

__all__ = [
    "AbDecision",
    "AbRule",
    "Arm",
    "Outcome",
    "confidence_sequence",
    "decide",
    "interval",
    "rollback_check",
    "votes_to_decide",
]

Outcome = Literal["promote", "reject", "wait", "timeout"]


@dataclass(frozen=True, slots=True)
class Arm:
    """Counted votes of one arm (after per-user dedup and caps, done by the caller).

    The optional per-voter sums make the variance robust to voters who differ: one generous
    voter's 20 likes are not 20 independent coin flips. Without them the rule assumes independent
    votes, and ``bench/ab_sim.py`` shows that then promotes equal candidates far more often than
    alpha when voters differ. Build them with :meth:`from_voters`.
    """

    likes: int
    votes: int
    voters: int | None = None  # distinct voters with at least one counted vote
    sum_likes_sq: int | None = None  # sum over voters of likes_u ** 2
    sum_likes_votes: int | None = None  # sum over voters of likes_u * votes_u
    sum_votes_sq: int | None = None  # sum over voters of votes_u ** 2

    def __post_init__(self) -> None:
        fields = (
            self.likes,
            self.votes,
            self.voters,
            self.sum_likes_sq,
            self.sum_likes_votes,
            self.sum_votes_sq,
        )
        for value in fields:
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"Arm counts must be integers (got {value!r})")
        if self.votes < 0 or self.likes < 0:
            raise ValueError(
                f"Arm counts must be >= 0 (got likes={self.likes}, votes={self.votes})"
            )
        if self.likes > self.votes:
            raise ValueError(f"Arm has more likes ({self.likes}) than votes ({self.votes})")
        sums = fields[2:]
        if any(v is None for v in sums) and any(v is not None for v in sums):
            raise ValueError("Arm per-voter sums must be given all together (use Arm.from_voters)")
        if self.voters is not None:
            assert self.sum_votes_sq is not None and self.sum_likes_sq is not None
            bad = not (self.voters <= self.votes <= self.sum_votes_sq)
            if bad or (self.votes > 0) != (self.voters > 0) or self.sum_likes_sq < self.likes:
                raise ValueError(f"Arm per-voter sums are inconsistent: {self}")

    @classmethod
    def from_voters(cls, per_voter: Iterable[tuple[int, int]]) -> Arm:
        """An arm from each voter's counted ``(likes, votes)`` (caps already applied)."""
        likes = votes = voters = s_ll = s_lv = s_vv = 0
        for u_likes, u_votes in per_voter:
            if not 0 <= u_likes <= u_votes:
                raise ValueError(f"a voter's likes must be in [0, votes], got {u_likes}/{u_votes}")
            if u_votes == 0:
                continue
            likes += u_likes
            votes += u_votes
            voters += 1
            s_ll += u_likes * u_likes
            s_lv += u_likes * u_votes
            s_vv += u_votes * u_votes
        return cls(likes, votes, voters, s_ll, s_lv, s_vv)

    @property
    def rate(self) -> float | None:
        """The observed like-rate, or None before the first vote."""
        return self.likes / self.votes if self.votes else None


@dataclass(frozen=True, slots=True)
class AbRule:
    """The pre-registered rule: set it before the test starts, never while watching it."""

    alpha: float = 0.05  # bound on false promotion (A/A promotes at most this often)
    min_effect: float = 0.03  # absolute like-rate lift the operator cares about
    min_votes: int = 100  # per arm before any decision
    max_duration_s: float = 14 * 86400
    # Standard deviation of the mSPRT's normal mixing distribution over delta. None: use
    # max(min_effect, 0.02), which makes the sequence tightest around the sample sizes where an
    # effect of min_effect becomes detectable (Johari et al. section 4 tune it to expected effects).
    mixture_sd: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if not 0.0 <= self.min_effect < 1.0:
            raise ValueError(f"min_effect must be in [0, 1), got {self.min_effect}")
        if self.min_votes < 1:
            raise ValueError(f"min_votes must be >= 1, got {self.min_votes}")
        if not self.max_duration_s > 0:
            raise ValueError(f"max_duration_s must be > 0, got {self.max_duration_s}")
        if self.mixture_sd is not None and not self.mixture_sd > 0:
            raise ValueError(f"mixture_sd must be > 0, got {self.mixture_sd}")

    @property
    def tau(self) -> float:
        """The mixing standard deviation actually used."""
        return self.mixture_sd if self.mixture_sd is not None else max(self.min_effect, 0.02)


@dataclass(frozen=True, slots=True)
class AbDecision:
    """What the rule says now, with the numbers an operator needs to check it."""

    outcome: Outcome
    reason: str  # one human sentence, shown by `oogiri models ab status`
    control_rate: float | None
    candidate_rate: float | None
    control_interval: tuple[float, float] | None  # 95 % Wilson interval
    candidate_interval: tuple[float, float] | None
    # log of the mSPRT mixture likelihood ratio against "no difference" (delta = 0); the sequence
    # excludes 0 exactly when it reaches log(1/alpha). 0.0 before min_votes.
    statistic: float
    # always-valid (1 - alpha) confidence sequence for candidate - control; None before min_votes
    difference_interval: tuple[float, float] | None = None
    threshold: float = 0.0  # log(1/alpha), for display beside statistic
    # while waiting: counted votes in all (both arms) at which the rule would decide if the rates
    # and the arm split seen so far held (:func:`votes_to_decide`); None when not projected
    votes_to_decide: int | None = None

    def to_dict(self) -> dict:
        """JSON-ready form (tuples become lists)."""
        out = asdict(self)
        for key in ("control_interval", "candidate_interval", "difference_interval"):
            if out[key] is not None:
                out[key] = list(out[key])
        return out


@functools.lru_cache(maxsize=64)
def _z(confidence: float) -> float:
    """Two-sided normal quantile for ``confidence`` using only ``math.erf`` (bisection)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    target = 1.0 - (1.0 - confidence) / 2.0
    lo, hi = 0.0, 40.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if 0.5 * (1.0 + math.erf(mid / math.sqrt(2.0))) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2.0


def interval(likes: int, votes: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a like-rate; (0, 1) before any vote.

    Wilson rather than the normal (Wald) interval because like-rates near 0 or 1 with few votes are
    common early on and Wald then gives zero-width or out-of-range intervals.
    """
    Arm(likes, votes)  # validates
    z = _z(confidence)
    if votes == 0:
        return (0.0, 1.0)
    p = likes / votes
    z2 = z * z
    denom = 1.0 + z2 / votes
    centre = (p + z2 / (2 * votes)) / denom
    half = z * math.sqrt(p * (1 - p) / votes + z2 / (4 * votes * votes)) / denom
    lower = 0.0 if likes == 0 else max(0.0, centre - half)  # exact ends: no 1e-17 from rounding
    upper = 1.0 if likes == votes else min(1.0, centre + half)
    return (lower, upper)


def _variance(arm: Arm) -> float:
    """Variance of an arm's like-rate.

    Binomial, with the rate smoothed by half a like so 0/n or n/n never give 0; with per-voter
    sums, the larger of that and the voter-clustered (sandwich) variance
    ``G/(G-1) * sum_u (likes_u - p votes_u)^2 / votes^2`` over the arm's G voters. The larger of
    the two because the clustered estimate is noisy and biased low when there are few voters.
    """
    p = (arm.likes + 0.5) / (arm.votes + 1.0)
    binomial = p * (1.0 - p) / arm.votes
    if arm.voters is None or arm.voters < 2:
        return binomial
    assert arm.sum_likes_sq is not None and arm.sum_likes_votes is not None
    assert arm.sum_votes_sq is not None
    r = arm.likes / arm.votes
    resid = arm.sum_likes_sq - 2.0 * r * arm.sum_likes_votes + r * r * arm.sum_votes_sq
    clustered = arm.voters / (arm.voters - 1.0) * max(resid, 0.0) / (arm.votes * arm.votes)
    return max(binomial, clustered)


def confidence_sequence(
    control: Arm, candidate: Arm, alpha: float, tau: float
) -> tuple[float, float, float]:
    """Always-valid ``1 - alpha`` interval for ``candidate - control`` and log LR against 0.

    mSPRT with mixing N(theta0, tau^2) over the normal approximation of the difference
    ``d = p_b - p_a`` with variance ``V``:
    ``Lambda(theta0) = sqrt(V / (V + tau^2)) * exp(tau^2 (d - theta0)^2 / (2 V (V + tau^2)))``.
    The sequence is ``{theta0 : Lambda(theta0) < 1/alpha}`` = ``d +- r`` with
    ``r^2 = 2 V (V + tau^2) / tau^2 * (log(1/alpha) + 0.5 log((V + tau^2) / V))``.
    Returns (lower, upper, log Lambda(0)).
    """
    if control.votes == 0 or candidate.votes == 0:
        return (-1.0, 1.0, 0.0)
    d = candidate.likes / candidate.votes - control.likes / control.votes
    v = _variance(control) + _variance(candidate)
    t2 = tau * tau
    radius = _radius(v, alpha, tau)
    log_lr0 = 0.5 * math.log(v / (v + t2)) + t2 * d * d / (2.0 * v * (v + t2))
    return (max(-1.0, d - radius), min(1.0, d + radius), log_lr0)


def _radius(v: float, alpha: float, tau: float) -> float:
    """Half-width of the confidence sequence at variance ``v`` (grows with ``v``)."""
    t2 = tau * tau
    return math.sqrt(
        2.0 * v * (v + t2) / t2 * (math.log(1.0 / alpha) + 0.5 * math.log((v + t2) / v))
    )


def votes_to_decide(control: Arm, candidate: Arm, rule: AbRule) -> int | None:
    """About how many counted votes in all (both arms) the rule needs to decide, if the like-rates,
    the arm split and the votes per voter seen so far held.

    Why: a test that waits for weeks looks the same as one that is about to decide. With a per-voter
    cap and few voters it may never decide (issue 15's device run: 60 people at 20 votes could not
    show a 7-point lift), and the operator should see that from the numbers, not from the timeout.
    The variance is scaled as 1/n (more voters like these); the projection is a planning figure,
    not part of the rule, and reading it spends no error budget. None before votes on both arms,
    or when no number of votes decides (an observed lift of exactly 0 with ``min_effect`` 0).
    """
    if not control.votes or not candidate.votes:
        return None
    lift = candidate.likes / candidate.votes - control.likes / control.votes
    # promote needs the lower end above 0 (radius < lift, lift >= min_effect); reject needs the
    # upper end below min_effect (radius < min_effect - lift)
    gap = lift if lift >= rule.min_effect else rule.min_effect - lift
    if gap <= 0.0:
        return None
    v = _variance(control) + _variance(candidate)
    now = control.votes + candidate.votes
    factor = 1.0
    if _radius(v, rule.alpha, rule.tau) >= gap:
        lo, hi = v * 1e-12, v  # variance at which the radius reaches the gap, by bisection
        if _radius(lo, rule.alpha, rule.tau) >= gap:
            return None
        for _ in range(100):
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if _radius(mid, rule.alpha, rule.tau) < gap else (lo, mid)
        factor = v / lo
    factor = max(factor, rule.min_votes / control.votes, rule.min_votes / candidate.votes)
    return math.ceil(factor * now)  # factor >= 1: never fewer than the votes it has


def _pct(x: float) -> str:
    return f"{100.0 * x:.1f} %"


def _pp(x: float) -> str:
    return f"{100.0 * x:+.1f} pp"


def _votes(n: int) -> str:
    """'1 vote', '2 votes': operators read these reasons (English only)."""
    return f"{n:,} vote" if n == 1 else f"{n:,} votes"


def _base(
    control: Arm, candidate: Arm
) -> tuple[float | None, float | None, tuple[float, float] | None, tuple[float, float] | None]:
    return (
        control.rate,
        candidate.rate,
        interval(control.likes, control.votes) if control.votes else None,
        interval(candidate.likes, candidate.votes) if candidate.votes else None,
    )


def _check(control: Arm, candidate: Arm, rule: AbRule, elapsed_s: float) -> None:
    if not isinstance(control, Arm) or not isinstance(candidate, Arm):
        raise TypeError("control and candidate must be Arm instances")
    if not isinstance(rule, AbRule):
        raise TypeError("rule must be an AbRule")
    if not (isinstance(elapsed_s, (int, float)) and math.isfinite(elapsed_s)) or elapsed_s < 0:
        raise ValueError(f"elapsed_s must be a finite number >= 0, got {elapsed_s!r}")


def decide(control: Arm, candidate: Arm, rule: AbRule, elapsed_s: float) -> AbDecision:
    """The gate's verdict on a candidate now: promote, reject, wait or timeout (see module doc).

    Evidence is read before the clock: a conclusive sequence is valid whenever it is looked at, so
    a decision reached at the same check as the deadline stands; only an undecided test times out.
    """
    _check(control, candidate, rule, elapsed_s)
    c_rate, k_rate, c_int, k_int = _base(control, candidate)
    threshold = math.log(1.0 / rule.alpha)
    fewest = min(control.votes, candidate.votes)
    if fewest < rule.min_votes:
        timed_out = elapsed_s >= rule.max_duration_s
        reason = (
            f"only {_votes(fewest)} on the smaller arm (need {rule.min_votes}) after the maximum "
            "duration: keeping the active model"
            if timed_out
            else f"waiting for votes: {control.votes} control, {candidate.votes} candidate "
            f"(need {rule.min_votes} per arm)"
        )
        return AbDecision(
            "timeout" if timed_out else "wait",
            reason,
            c_rate,
            k_rate,
            c_int,
            k_int,
            0.0,
            None,
            threshold,
        )

    lower, upper, log_lr0 = confidence_sequence(control, candidate, rule.alpha, rule.tau)
    assert c_rate is not None and k_rate is not None
    diff = k_rate - c_rate
    seq = f"always-valid {_pct(1 - rule.alpha)} interval for the lift [{_pp(lower)}, {_pp(upper)}]"
    common = (c_rate, k_rate, c_int, k_int, log_lr0, (lower, upper), threshold)
    if lower > 0.0 and diff >= rule.min_effect:
        return AbDecision(
            "promote",
            f"candidate {_pct(k_rate)} vs control {_pct(c_rate)}: lift {_pp(diff)} >= minimum "
            f"{_pp(rule.min_effect)} and {seq} is above 0",
            *common,
        )
    if upper < rule.min_effect:
        why = (
            "the candidate is worse"
            if upper < 0.0
            else f"the lift cannot reach {_pp(rule.min_effect)}"
        )
        return AbDecision(
            "reject",
            f"candidate {_pct(k_rate)} vs control {_pct(c_rate)}: {why} ({seq})",
            *common,
        )
    if elapsed_s >= rule.max_duration_s:
        return AbDecision(
            "timeout",
            f"no decision after the maximum duration ({seq}): keeping the active model",
            *common,
        )
    needed = votes_to_decide(control, candidate, rule)
    outlook = (
        f"; at these rates about {needed:,} counted votes in all would decide" if needed else ""
    )
    return AbDecision(
        "wait",
        f"candidate {_pct(k_rate)} vs control {_pct(c_rate)}, "
        f"{_votes(control.votes + candidate.votes)}: {seq}, not yet decisive{outlook}",
        *common,
        votes_to_decide=needed,
    )


def rollback_check(
    previous: Arm, current: Arm, margin: float, rule: AbRule, elapsed_s: float
) -> AbDecision:
    """After a promotion: is the new model worse than the old one by more than ``margin``?

    Same always-valid sequence on ``current - previous``. ``reject`` = ROLL BACK: its upper bound is
    below ``-margin`` (current worse by more than the margin). ``promote`` = promotion confirmed:
    its lower bound is above ``-margin`` (current not worse by more than the margin). Each wrong
    call happens with probability <= alpha. ``wait`` otherwise; ``timeout`` keeps the current model.
    """
    _check(previous, current, rule, elapsed_s)
    if not (math.isfinite(margin) and 0.0 <= margin < 1.0):
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    p_rate, c_rate, p_int, c_int = _base(previous, current)
    threshold = math.log(1.0 / rule.alpha)
    fewest = min(previous.votes, current.votes)
    if fewest < rule.min_votes:
        timed_out = elapsed_s >= rule.max_duration_s
        reason = (
            f"only {_votes(fewest)} on the smaller side after the maximum duration: "
            "keeping the current model"
            if timed_out
            else f"watching the promotion: {_votes(previous.votes)} before, {current.votes} after "
            f"(need {rule.min_votes} each)"
        )
        return AbDecision(
            "timeout" if timed_out else "wait",
            reason,
            p_rate,
            c_rate,
            p_int,
            c_int,
            0.0,
            None,
            threshold,
        )
    lower, upper, log_lr0 = confidence_sequence(previous, current, rule.alpha, rule.tau)
    assert p_rate is not None and c_rate is not None
    seq = (
        f"always-valid {_pct(1 - rule.alpha)} interval for the change [{_pp(lower)}, {_pp(upper)}]"
    )
    common = (p_rate, c_rate, p_int, c_int, log_lr0, (lower, upper), threshold)
    if upper < -margin:
        return AbDecision(
            "reject",
            f"roll back: the new model's {_pct(c_rate)} is below the previous {_pct(p_rate)} "
            f"by more than the margin {_pp(margin)} ({seq})",
            *common,
        )
    if lower > -margin:
        return AbDecision(
            "promote",
            f"promotion confirmed: the new model's {_pct(c_rate)} is not worse than the previous "
            f"{_pct(p_rate)} by more than {_pp(margin)} ({seq})",
            *common,
        )
    if elapsed_s >= rule.max_duration_s:
        return AbDecision(
            "timeout",
            f"no verdict after the maximum duration ({seq}): keeping the current model",
            *common,
        )
    return AbDecision("wait", f"watching the promotion: {seq}, not yet decisive", *common)
