"""Serving two model versions at once: which user gets which arm, and the engine that routes.

A live A/B test (training/ab.py decides it, ``ab_tests`` in the store records it) serves the
candidate to a share of users beside the active model. :class:`ArmsEngine` wraps the served
engine and sends each request to one arm:

* **sticky per user**: the arm is a hash of (test id, channel:user) — the same person always sees
  the same model for the whole test, a new test reshuffles everyone, and no state is kept;
* the routing key comes from the request through a context variable that the A/B plugin sets in
  ``oogiri_before_joke`` (the engine protocol carries no user), so requests without one (warm-up)
  go to the active model;
* users never see which arm answered; each joke records the version that really answered
  (``Generation.model`` of the arm's engine);
* a candidate that is unavailable (down, overloaded) never fails the user: the active model
  answers instead, and the miss is counted. A candidate that answers with nothing usable (an
  empty answer, after the engine's own retry) is the model's own failure, not the
  infrastructure's: the user gets the same "try again" as from the active model, and neither
  arm gets a joke for it (a fallback answer would count for the active model and hide the
  candidate's failures from the test); it is counted too.

The store and the decision rule know nothing of engines; the engine knows nothing of votes.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from bot.abstats import AbDecision, AbRule, Arm, confidence_sequence, decide, rollback_check
from bot.engines.base import Engine, EngineHealth
from bot.models import EngineBusy, EngineError, Generation, GenerationParams, NormalizedImage
from bot.store import AbTestRow, ArmCount

log = logging.getLogger(__name__)

#: "channel:user_id" of the request being answered (set by the A/B plugin's oogiri_before_joke).
ROUTING_KEY: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "oogiri_ab_routing_key", default=None
)


def bucket(test_id: int, key: str) -> float:
    """A uniform number in [0, 1) fixed by (test, user): the user's place in the test."""
    digest = hashlib.sha256(f"oogiri-ab:{test_id}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign(test_id: int, key: str | None, share: float) -> str:
    """ "candidate" for a ``share`` of users (sticky), else "control"; no key: "control"."""
    if key is None or share <= 0:
        return "control"
    return "candidate" if bucket(test_id, key) < share else "control"


class AbMetrics:
    """Prometheus series of live tests (added to the app's registry once)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.routed = Counter(
            "oogiri_ab_requests",
            "Requests answered per A/B arm (a failed candidate request is answered by control)",
            ["test", "arm", "version"],
            registry=registry,
        )
        self.fallbacks = Counter(
            "oogiri_ab_candidate_failures",
            "Candidate-arm requests that failed: reason unavailable (the active model answered) "
            "or empty (the candidate's answer was unusable; the user was asked to try again)",
            ["test", "version", "reason"],
            registry=registry,
        )
        self.votes = Gauge(
            "oogiri_ab_votes",
            "Votes counted per arm of the running (or latest) test, after per-voter caps",
            ["test", "arm", "version"],
            registry=registry,
        )
        self.likes = Gauge(
            "oogiri_ab_likes",
            "Likes counted per arm",
            ["test", "arm", "version"],
            registry=registry,
        )
        self.like_rate = Gauge(
            "oogiri_ab_like_rate",
            "Like-rate per arm (NaN before the first vote)",
            ["test", "arm", "version"],
            registry=registry,
        )
        self.failure_rate = Gauge(
            "oogiri_ab_failure_rate",
            "Share of requests per arm that got no usable answer (the failure guard's rate; "
            "NaN before the first request)",
            ["test", "arm", "version"],
            registry=registry,
        )
        self.share = Gauge(
            "oogiri_ab_share", "Share of users served the small arm", ["test"], registry=registry
        )
        self.decision = Gauge(
            "oogiri_ab_decision",
            "1 for the test's current decision (promote, reject, wait, timeout)",
            ["test", "kind", "outcome"],
            registry=registry,
        )
        self.running = Gauge(
            "oogiri_ab_running", "1 while a live test is served by this process", registry=registry
        )
        self.rollbacks = Gauge(
            "oogiri_model_rollbacks",
            "Automatic rollbacks after a promotion disappointed (from the store)",
            registry=registry,
        )


def ab_metrics(metrics: Any) -> AbMetrics:
    """The A/B series of an app's ``Metrics`` (created on first use)."""
    existing = getattr(metrics, "_ab_metrics", None)
    if existing is None:
        existing = AbMetrics(metrics.registry)
        metrics._ab_metrics = existing
    return existing


def _unusable_answer(exc: Exception) -> bool:
    """The server answered, but with nothing usable (not down, not overloaded)."""
    from bot.engines.openai_http import _EmptyAnswer  # the HTTP engines' "empty answer"

    return isinstance(exc, _EmptyAnswer)


class ArmsEngine:
    """The served engine plus a candidate arm; see the module docstring."""

    def __init__(
        self,
        control: Engine,
        candidate: Engine,
        *,
        test_id: int,
        share: float,
        candidate_version: str,
        metrics: AbMetrics | None = None,
    ) -> None:
        self.control = control
        self.candidate = candidate
        self.test_id = test_id
        self.share = share
        self.candidate_version = candidate_version
        self.metrics = metrics
        self.name = control.name
        self.in_flight = {"control": 0, "candidate": 0}
        self.routed = {"control": 0, "candidate": 0, "fallback": 0, "empty": 0}

    @property
    def base_engine(self) -> Engine:
        """The engine this one wraps (the control socket swaps models on it)."""
        return getattr(self.control, "base_engine", self.control)

    def arm_for(self, key: str | None) -> str:
        return assign(self.test_id, key, self.share)

    async def generate(
        self, image: NormalizedImage, prompt: str, params: GenerationParams
    ) -> Generation:
        arm = self.arm_for(ROUTING_KEY.get())
        if arm == "candidate":
            self.in_flight["candidate"] += 1
            try:
                generation = await self.candidate.generate(image, prompt, params)
            except (EngineError, EngineBusy) as exc:
                if _unusable_answer(exc):  # the model's own failure: the test must not hide it
                    self.routed["empty"] += 1
                    if self.metrics is not None:
                        self.metrics.fallbacks.labels(
                            str(self.test_id), self.candidate_version, "empty"
                        ).inc()
                    raise
                # The user asked for a joke, not for an experiment: the active model answers.
                log.warning("A/B candidate %s failed (%s); the active model answers",
                            self.candidate_version, exc)  # fmt: skip
                self.routed["fallback"] += 1
                if self.metrics is not None:
                    self.metrics.fallbacks.labels(
                        str(self.test_id), self.candidate_version, "unavailable"
                    ).inc()
            else:
                self._count("candidate", generation.model)
                return generation
            finally:
                self.in_flight["candidate"] -= 1
        self.in_flight["control"] += 1
        try:
            generation = await self.control.generate(image, prompt, params)
        finally:
            self.in_flight["control"] -= 1
        self._count("control", generation.model)
        return generation

    def _count(self, arm: str, version: str) -> None:
        self.routed[arm] += 1
        if self.metrics is not None:
            self.metrics.routed.labels(str(self.test_id), arm, version).inc()

    async def drain_candidate(self, timeout_s: float, poll_s: float = 0.05) -> bool:
        """Wait for requests still out on the candidate (after routing moved away from it)."""
        import asyncio

        deadline = time.monotonic() + timeout_s
        while self.in_flight["candidate"]:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(poll_s)
        return True

    async def health(self) -> EngineHealth:
        health = await self.control.health()
        extra = dict(health.extra)
        extra["ab"] = self.status()
        return replace(health, extra=extra)  # every other field (demo, …) as the control says

    def status(self) -> dict[str, Any]:
        # the wrapped engine's own status, when it has one (managed LMDeploy does)
        status: Callable[[], dict[str, Any]] | None = getattr(self.control, "status", None)
        inner = status() if status is not None else {}
        return {
            **inner,
            "ab_test": self.test_id,
            "ab_share": self.share,
            "ab_candidate": self.candidate_version,
            "ab_routed": dict(self.routed),
        }

    async def close(self) -> None:
        try:
            await self.candidate.close()
        finally:
            await self.control.close()


# --------------------------------------------------------------------------- evaluation


def aware(dt: datetime | None) -> datetime | None:
    """SQLite hands datetimes back without a zone; they were written in UTC."""
    if dt is None:
        return None
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


def rule_of(test: AbTestRow) -> AbRule:
    names = {f.name for f in fields(AbRule)}
    return AbRule(**{k: v for k, v in (test.rule or {}).items() if k in names})


# --------------------------------------------------------------------------- evaluation


@dataclass
class Evaluation:
    """A test's counts and what the rule says about them now."""

    test: AbTestRow
    control: ArmCount
    candidate: ArmCount
    decision: AbDecision
    elapsed_s: float
    # failed requests (likes) out of requests (votes) per arm, and the failure guard's sequence
    failures: dict[str, Arm] = field(default_factory=dict)
    failure_interval: tuple[float, float] | None = None

    def as_dict(self) -> dict[str, Any]:
        t = self.test
        d = self.decision.to_dict()
        if t.kind == "watch":  # rollback_check names them previous (small arm) and current
            d["control_rate"], d["candidate_rate"] = d["candidate_rate"], d["control_rate"]
            d["control_interval"], d["candidate_interval"] = (
                d["candidate_interval"],
                d["control_interval"],
            )
        return {
            "id": t.id,
            "kind": t.kind,
            "status": t.status,
            "control": t.control,
            "candidate": t.candidate,
            "share": t.share,
            "rule": t.rule,
            "run_id": t.run_id,
            "started_at": _iso(t.started_at),
            "ended_at": _iso(t.ended_at),
            "elapsed_s": round(self.elapsed_s, 1),
            "reason": t.reason,
            "arms": {
                "control": {**asdict(self.control), "version": t.control},
                "candidate": {**asdict(self.candidate), "version": t.candidate},
            },
            "decision": d,
            "failures": {
                arm: {"failed": a.likes, "requests": a.votes, "rate": a.rate}
                for arm, a in self.failures.items()
            },
            "failure_interval": list(self.failure_interval) if self.failure_interval else None,
        }


def _iso(dt: datetime | None) -> str | None:
    dt = aware(dt)
    return dt.isoformat() if dt else None


def arm_of(count: ArmCount) -> Arm:
    """The rule's view of an arm, with the per-voter sums (votes of one person are not
    independent: the rule's variance accounts for it)."""
    if not count.votes:
        return Arm(0, 0)
    return Arm(
        count.likes,
        count.votes,
        count.voters,
        count.sum_likes_sq,
        count.sum_likes_votes,
        count.sum_votes_sq,
    )


#: Request outcomes that count as a failed answer of the arm the user was routed to: the model
#: answered with nothing usable, or errored (a busy queue, a rejected picture or a rate limit is
#: no model's doing). See docs/training.md "Failed answers".
FAILED_OUTCOMES = ("engine_error",)
DEFAULT_FAILURE_MARGIN = 0.02


def web_voter(policy: str | None) -> str:
    """Who the voter behind a web vote is in the A/B counts, from ``training.web_votes``.

    One policy for one idea: how far a web identity is trusted. ``networks`` (the default, a
    public page where cookies are free) makes the *network* the voter, so a flood of fresh
    sessions from one network is one voter with one cap and one cluster in the variance;
    ``weight`` and ``equal`` trust each session as a person (behind a login); ``exclude`` leaves
    web votes out. The export's 0.5 weight has no A/B counterpart: an arm's like-rate is a share
    of counted votes, and who may vote how often is what the cap and the voter decide.
    """
    return {"networks": "network", "exclude": "exclude"}.get(policy or "networks", "session")


async def failure_arms(store: Any, test: AbTestRow) -> dict[str, Arm]:
    """Per arm: failed requests out of all answered-or-failed requests, clustered per user.

    A failed request has no joke; it belongs to the arm its user is routed to (``assign``), which
    is the arm whose model failed (an unavailable candidate falls back to the active model, and
    that answer is counted for the control arm as a joke of its version)."""
    answered, failed = await store.ab_request_counts(test, FAILED_OUTCOMES)
    per_user: dict[tuple[str, str, str], list[int]] = {}
    for (arm, channel, user), n in answered.items():
        per_user.setdefault((arm, channel, user), [0, 0])[1] += n
    for (channel, user), n in failed.items():
        arm = assign(test.id, f"{channel}:{user}", test.share)
        entry = per_user.setdefault((arm, channel, user), [0, 0])
        entry[0] += n
        entry[1] += n
    return {
        name: Arm.from_voters((f, n) for (arm, _c, _u), (f, n) in per_user.items() if arm == name)
        for name in ("control", "candidate")
    }


def failure_guard(
    decision: AbDecision,
    worse: Arm,
    better: Arm,
    margin: float,
    rule: AbRule,
    elapsed_s: float,
    *,
    watch: bool = False,
) -> tuple[AbDecision, tuple[float, float] | None]:
    """Hold the like-rate verdict to the failure rates: ``worse`` is the arm that must not fail
    more than ``better`` by over ``margin`` (the candidate; on a watch the new model).

    The always-valid sequence of the rule (``confidence_sequence``, same alpha) on the failure
    rates' difference: its lower bound above ``margin`` rejects (rolls back, on a watch) whatever
    the votes say; a promotion (a confirmation) needs its upper bound at or below ``margin`` too,
    else the test waits (or times out). Returns the decision and the sequence (None before
    ``min_votes`` requests per arm).
    """
    if min(worse.votes, better.votes) < rule.min_votes:
        if decision.outcome != "promote":
            return decision, None
        return _held(decision, "too few requests to judge the failure rates", rule, elapsed_s), None
    tau = max(margin, 0.02)
    lower, upper, _ = confidence_sequence(better, worse, rule.alpha, tau)
    seq = f"always-valid interval for the failure-rate increase [{_pp(lower)}, {_pp(upper)}]"
    who, other = ("new model", "previous") if watch else ("candidate", "control")
    rates = f"the {who} fails {_pct(worse.rate or 0.0)} of requests vs {other} " + _pct(
        better.rate or 0.0
    )
    if lower > margin:
        verb = "roll back" if watch else "reject"
        reason = f"{verb}: {rates}, more than {_pp(margin)} worse ({seq})"
        return replace(decision, outcome="reject", reason=reason), (lower, upper)
    if decision.outcome == "promote" and upper > margin:
        why = f"{rates}; not yet shown within {_pp(margin)} ({seq})"
        return _held(decision, why, rule, elapsed_s), (lower, upper)
    return decision, (lower, upper)


def _held(decision: AbDecision, why: str, rule: AbRule, elapsed_s: float) -> AbDecision:
    if elapsed_s >= rule.max_duration_s:
        return replace(decision, outcome="timeout", reason=f"{why}: keeping the active model")
    return replace(decision, outcome="wait", reason=f"like-rates would decide, but {why}")


def _pct(x: float) -> str:
    return f"{100.0 * x:.1f} %"


def _pp(x: float) -> str:
    return f"{100.0 * x:+.1f} pp"


async def evaluate(store: Any, test: AbTestRow, now: datetime | None = None) -> Evaluation:
    """Count the arms (SQL, capped per voter; web votes per ``web_voter``), apply the test's
    rule to the like-rates and the failure guard to the failure rates; acts on nothing."""
    now = now or datetime.now(UTC)
    doc = test.rule or {}
    cap = doc.get("per_voter_cap")
    counts = await store.ab_arm_counts(test, cap, web_voter=web_voter(doc.get("web_votes")))
    control, candidate = counts["control"], counts["candidate"]
    end = aware(test.ended_at) or now
    elapsed = max(0.0, (end - (aware(test.started_at) or now)).total_seconds())
    rule = rule_of(test)
    c_arm, k_arm = arm_of(control), arm_of(candidate)
    fails = await failure_arms(store, test)
    margin_f = float(doc.get("failure_margin", DEFAULT_FAILURE_MARGIN))
    if test.kind == "watch":
        margin = float(doc.get("margin", 0.0))
        decision = rollback_check(k_arm, c_arm, margin, rule, elapsed)
        decision, f_seq = failure_guard(
            decision, fails["control"], fails["candidate"], margin_f, rule, elapsed, watch=True
        )
    else:
        decision = decide(c_arm, k_arm, rule, elapsed)
        decision, f_seq = failure_guard(
            decision, fails["candidate"], fails["control"], margin_f, rule, elapsed
        )
    if decision.outcome == "wait" and cap:
        decision = _note_capped(decision, (control, candidate), int(cap))
    return Evaluation(test, control, candidate, decision, elapsed, fails, f_seq)


def _note_capped(decision: AbDecision, arms: tuple[ArmCount, ...], cap: int) -> AbDecision:
    """Say so when every voter of an arm has used the cap: the test can then move only with new
    voters, and an operator waiting for a decision should know (issue 15's device run stalled
    so)."""
    full = [a for a in arms if a.voters and a.votes >= a.voters * cap]
    if not full:
        return decision
    names = " and ".join(f"the {a.arm} arm's {a.voters}" for a in full)
    note = f"; every voter ({names}) has used the cap of {cap} votes: only new voters add votes"
    return replace(decision, reason=decision.reason + note)
