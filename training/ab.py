"""Live A/B tests of model versions: start, decide, act (promote / reject / time out / roll back).

The life of a candidate that passes the offline gate (training/gate.py ``LiveAbStep``):

1. ``start_test``: the run registers it as ``testing`` and records a running ``ab_tests`` row with
   the rule fixed at that moment (alpha, minimum effect, minimum votes, maximum duration,
   per-voter cap, failure margin, web-vote policy): changing settings later never changes a
   running test's rule.
2. Every ``oogiri serve`` process sees the row (bot/ab_serving.py) and serves the candidate to
   ``share`` of its users, sticky per user.
3. ``decide_tests`` (the scheduler inside ``oogiri serve``, ``oogiri train run --if-due`` and
   ``oogiri models ab status --decide``) counts the votes per arm in the store and asks
   ``bot.abstats.decide``:
   - promote: the test ends, the candidate goes through the normal promotion path (engine swap,
     registry, ``oogiri_model_promoted``) and a *watch* starts: the previous model stays on a
     small arm (``ab.watch_share``) beside the new one;
   - reject: the test ends and the candidate is marked ``rejected``;
   - timeout: no decision within ``max_days``: the candidate is marked ``timeout``, the active
     model stays;
   - wait: the current numbers are saved for ``oogiri models ab status``.
4. The watch is decided by ``bot.abstats.rollback_check`` on the same kind of concurrent counts:
   "reject" rolls back to the previous model (the normal rollback path; logged, and counted as
   ``oogiri_model_rollbacks``), "promote" or "timeout" confirms the promotion.

Why the old model stays on a small arm rather than comparing with its votes before the
promotion: a before/after comparison mixes the model with everything else that changed (the
time of day and week, who is using the bot, novelty); two arms served at the same time to
randomly assigned users compare the models only.

Every action takes the training lock (the caller holds it), and ``end_ab_test`` only ends a test
that is still running, so two processes deciding at once cannot both act.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from bot.ab import Evaluation, aware, evaluate
from bot.settings import Settings
from bot.store import AbTestRow
from training.proc import run_command
from training.run import Promoter, promote_version, rollback

log = logging.getLogger(__name__)

DEFAULT_VOTER_CAP = 20
OnEnded = Callable[[AbTestRow], Awaitable[None] | None]


def voter_cap(settings: Settings) -> int:
    """Votes counted per voter per arm: ab.per_voter_cap, else training.per_voter_cap, else 20."""
    return settings.ab.per_voter_cap or settings.training.per_voter_cap or DEFAULT_VOTER_CAP


def rule_doc(settings: Settings, kind: str = "ab") -> dict[str, Any]:
    """The rule a new test is decided by, as stored on its row (pre-registered)."""
    ab = settings.ab
    days = ab.max_days if kind == "ab" else ab.watch_days
    doc: dict[str, Any] = {
        "alpha": ab.alpha,
        "min_effect": ab.min_effect,
        "min_votes": ab.min_votes,
        "max_duration_s": days * 86400.0,
        "per_voter_cap": voter_cap(settings),
        "failure_margin": ab.failure_margin,
        # who a web vote's voter is (bot.ab.web_voter): the export's policy, fixed on the row
        "web_votes": settings.training.web_votes,
    }
    if kind == "watch":
        doc["margin"] = ab.rollback_margin
    return doc


# --------------------------------------------------------------------------- commands


def _fill(template: list[str], values: Mapping[str, str]) -> list[str]:
    return [part.format(**values) for part in template]


async def run_hook_command(template: list[str], version: str, model_dir: str, what: str) -> None:
    """ab.start_command / ab.stop_command (e.g. scale a candidate Deployment); a failure is
    raised for start (the test cannot run) and logged for stop."""
    if not template:
        return
    cmd = _fill(template, {"python": sys.executable, "model_dir": model_dir, "version": version})
    lines: list[str] = []
    rc = await run_command(cmd, on_line=lines.append)
    if rc != 0:
        raise RuntimeError(f"ab {what} command exited with {rc}: {' | '.join(lines[-5:])}")


# --------------------------------------------------------------------------- start / end


async def start_test(
    store: Any,
    settings: Settings,
    candidate: str,
    control: str,
    *,
    kind: str = "ab",
    run_id: int | None = None,
    share: float | None = None,
) -> AbTestRow:
    """Record a running test (raises ``AbTestBusy`` while another runs) and run start_command."""
    row = await store.get_model_version(candidate)
    if row is None:
        raise LookupError(f"no model version {candidate!r}")
    if kind == "ab" and candidate == control:
        raise ValueError(f"{candidate} is the active model; nothing to compare it with")
    if share is None:
        share = settings.ab.share if kind == "ab" else settings.ab.watch_share
    if not 0.0 < share <= 0.5:
        raise ValueError(f"share must be in (0, 0.5], got {share}")
    test = await store.start_ab_test(
        kind=kind,
        control=control,
        candidate=candidate,
        share=share,
        rule=rule_doc(settings, kind),
        run_id=run_id,
    )
    if kind == "ab":
        await store.set_model_status(candidate, "testing")
    try:
        await run_hook_command(settings.ab.start_command, candidate, row.path, "start")
    except Exception as exc:
        await store.end_ab_test(test.id, "failed", f"could not start serving it: {exc}")
        if kind == "ab":
            await store.set_model_status(candidate, "candidate")
        raise
    log.info("A/B test #%d started: %s %s vs %s on %.0f%% of users", test.id, kind, candidate,
             control, share * 100)  # fmt: skip
    return test


async def _ended(test: AbTestRow, settings: Settings, store: Any, on_ended: OnEnded | None) -> None:
    """Stop serving the small arm before anything else changes (memory for a swap)."""
    if on_ended is not None:
        try:
            result = on_ended(test)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("A/B test #%d: telling the servers that it ended failed", test.id)
    if settings.ab.stop_command:
        row = await store.get_model_version(test.candidate)
        try:
            await run_hook_command(
                settings.ab.stop_command, test.candidate, row.path if row else "", "stop"
            )
        except Exception:
            log.exception("A/B test #%d: stop command failed", test.id)


@dataclass
class Outcome:
    test_id: int
    kind: str
    outcome: str  # wait, promoted, rejected, timeout, confirmed, rolled_back, stopped, failed
    reason: str
    evaluation: dict[str, Any] = field(default_factory=dict)
    watch_id: int | None = None


async def act(
    store: Any,
    settings: Settings,
    pm: Any,
    promoter: Promoter,
    ev: Evaluation,
    on_ended: OnEnded | None = None,
    force: str | None = None,
) -> Outcome:
    """Carry out what the rule (or the operator, ``force``) decided for a running test."""
    test = ev.test
    doc = ev.as_dict()
    doc["decided_at"] = datetime.now(UTC).isoformat()
    decision = ev.decision
    verdict = force or decision.outcome
    reason = decision.reason if force is None else f"operator: {force} ({decision.reason})"

    active = await store.active_model()
    if force is None and (active is None or active.version != test.control):
        why = f"the active model changed to {active.version if active else None} during the test"
        if await store.end_ab_test(test.id, "stopped", why, decision=doc):
            await _ended(test, settings, store, on_ended)
            if test.kind == "ab":
                await store.set_model_status(test.candidate, "candidate")
        return Outcome(test.id, test.kind, "stopped", why, doc)

    if verdict == "wait":
        await store.update_ab_test(test.id, decision=doc)
        return Outcome(test.id, test.kind, "wait", reason, doc)

    if test.kind == "ab":
        return await _act_ab(store, settings, pm, promoter, test, verdict, reason, doc, on_ended)
    return await _act_watch(store, settings, pm, promoter, test, verdict, reason, doc, on_ended)


async def _act_ab(
    store: Any,
    settings: Settings,
    pm: Any,
    promoter: Promoter,
    test: AbTestRow,
    verdict: str,
    reason: str,
    doc: dict[str, Any],
    on_ended: OnEnded | None,
) -> Outcome:
    status = {"promote": "promoted", "reject": "rejected", "timeout": "timeout"}.get(
        verdict, "stopped"
    )
    if not await store.end_ab_test(test.id, status, reason, decision=doc):
        return Outcome(test.id, test.kind, "stopped", "already ended elsewhere", doc)
    await _ended(test, settings, store, on_ended)
    if status == "promoted":
        try:
            _, previous = await promote_version(store, pm, promoter, test.candidate)
        except BaseException as exc:  # whatever broke (a shutdown too), the old model still serves
            why = f"promotion failed: {_what(exc)}; {test.control} stays active"
            log.error("A/B test #%d: %s", test.id, why)

            async def undo() -> None:
                await store.update_ab_test(test.id, status="failed", reason=why)
                await store.set_model_status(test.candidate, "candidate")

            await asyncio.shield(undo())
            if not isinstance(exc, Exception):  # cancelled: recorded, now go
                raise
            return Outcome(test.id, test.kind, "failed", why, doc)
        log.warning("A/B test #%d: promoted %s over %s: %s", test.id, test.candidate, previous,
                    reason)  # fmt: skip
        watch_id = None
        if settings.ab.watch and previous:
            try:
                watch = await start_test(
                    store, settings, previous, test.candidate, kind="watch", run_id=test.run_id
                )
                watch_id = watch.id
            except Exception:
                log.exception("A/B test #%d: could not start the watch after promotion", test.id)
        return Outcome(test.id, test.kind, "promoted", reason, doc, watch_id=watch_id)
    if status in ("rejected", "timeout"):
        await store.set_model_status(test.candidate, status)
    else:
        await store.set_model_status(test.candidate, "candidate")
    log.warning("A/B test #%d: %s %s: %s", test.id, status, test.candidate, reason)
    return Outcome(test.id, test.kind, status, reason, doc)


async def _act_watch(
    store: Any,
    settings: Settings,
    pm: Any,
    promoter: Promoter,
    test: AbTestRow,
    verdict: str,
    reason: str,
    doc: dict[str, Any],
    on_ended: OnEnded | None,
) -> Outcome:
    rolling_back = verdict == "reject"
    status = "rolled_back" if rolling_back else "confirmed" if verdict != "stop" else "stopped"
    if not await store.end_ab_test(test.id, status, reason, decision=doc):
        return Outcome(test.id, test.kind, "stopped", "already ended elsewhere", doc)
    await _ended(test, settings, store, on_ended)
    if not rolling_back:
        log.info("watch #%d: %s kept (%s)", test.id, test.control, reason)
        return Outcome(test.id, test.kind, status, reason, doc)
    try:
        await rollback(store, pm, promoter, to=test.candidate)
    except BaseException as exc:  # whatever broke (a shutdown too), the new model still serves
        why = f"rollback to {test.candidate} failed: {_what(exc)}; {test.control} stays active"
        log.error("watch #%d: %s", test.id, why)
        await asyncio.shield(store.update_ab_test(test.id, status="failed", reason=why))
        if not isinstance(exc, Exception):  # cancelled: recorded, now go
            raise
        return Outcome(test.id, test.kind, "failed", why, doc)
    log.warning("AUTO-ROLLBACK (watch #%d): %s → %s: %s", test.id, test.control, test.candidate,
                reason)  # fmt: skip
    return Outcome(test.id, test.kind, "rolled_back", reason, doc)


def _what(exc: BaseException) -> str:
    """An exception as the reason's words (a cancellation has no message of its own)."""
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    return str(exc) or type(exc).__name__


async def decide_tests(
    store: Any,
    settings: Settings,
    pm: Any,
    promoter: Promoter,
    on_ended: OnEnded | None = None,
    now: datetime | None = None,
) -> list[Outcome]:
    """Decide the running test (if any) and act on it; the caller holds the training lock.

    A promotion starts a watch, which is decided on a later tick (it has no votes yet).
    """
    test = await store.running_ab_test()
    if test is None:
        return []
    ev = await evaluate(store, test, now)
    outcome = await act(store, settings, pm, promoter, ev, on_ended)
    return [outcome]


async def stop_test(
    store: Any,
    settings: Settings,
    pm: Any,
    promoter: Promoter,
    action: str = "stop",
    on_ended: OnEnded | None = None,
) -> Outcome:
    """The operator ends the running test: stop (keep the active model), promote or reject."""
    test = await store.running_ab_test()
    if test is None:
        raise LookupError("no A/B test is running")
    ev = await evaluate(store, test)
    return await act(store, settings, pm, promoter, ev, on_ended, force=action)


async def status_docs(store: Any, limit: int = 5) -> list[dict[str, Any]]:
    """The latest tests (newest first): a running test with its counts and the rule's verdict
    now; an ended one with the counts and verdict it was decided on (votes that come later on
    its jokes do not rewrite history)."""
    docs = []
    for test in await store.ab_tests(limit=limit):
        stored = test.decision or {}
        if test.status != "running" and stored.get("decision") and stored.get("arms"):
            doc = {**stored, "status": test.status, "reason": test.reason}
            doc["ended_at"] = _iso(test.ended_at)
        else:
            doc = (await evaluate(store, test)).as_dict()
        docs.append(doc)
    return docs


def _iso(dt: datetime | None) -> str | None:
    dt = aware(dt)
    return dt.isoformat() if dt else None


__all__ = [
    "Evaluation",
    "Outcome",
    "act",
    "decide_tests",
    "evaluate",
    "rule_doc",
    "start_test",
    "status_docs",
    "stop_test",
    "voter_cap",
]
