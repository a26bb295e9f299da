"""When to retrain: every N days and/or after K new ratings (``oogiri train run --if-due``).

The decision is taken while holding the training lock (see ``training.run.run_guarded``), so two
replicas that wake up together cannot both decide a run is due.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from training.settings import TrainingSettings

# Runs that count as "we trained (or tried on enough data)" for the period.
COMPLETED = ("succeeded", "testing", "rejected", "skipped")


def aware(dt: datetime | None) -> datetime | None:
    """SQLite hands datetimes back without a zone; they were written in UTC."""
    if dt is None:
        return None
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


@dataclass
class DueDecision:
    due: bool
    reasons: list[str] = field(default_factory=list)
    new_ratings: int = 0
    last_run_at: datetime | None = None

    def __str__(self) -> str:
        return ("due: " if self.due else "not due: ") + "; ".join(self.reasons)


def _fmt(delta: timedelta) -> str:
    hours = delta.total_seconds() / 3600
    return f"{hours / 24:.1f} days" if hours >= 48 else f"{hours:.1f} h"


async def check_due(
    store: Any, settings: TrainingSettings, now: datetime | None = None
) -> DueDecision:
    now = aware(now) or datetime.now(UTC)
    runs = list(await store.training_runs())
    last_any = runs[-1] if runs else None
    done = [r for r in runs if r.status in COMPLETED]
    last_done = done[-1] if done else None
    last_at = aware(last_done.started_at) if last_done else None

    if last_any is not None and last_any.status == "running":
        return DueDecision(False, [f"run #{last_any.id} is still running"], last_run_at=last_at)
    if last_any is not None and last_any.status == "failed":
        since = now - (aware(last_any.started_at) or now)
        wait = timedelta(hours=settings.retry_failed_after_hours)
        if since < wait:
            return DueDecision(
                False,
                [f"run #{last_any.id} failed {_fmt(since)} ago; retrying after {_fmt(wait)}"],
                last_run_at=last_at,
            )

    triggers: list[tuple[bool, str]] = []
    if settings.every_days is not None:
        period = timedelta(days=settings.every_days)
        if last_at is None:
            triggers.append((True, "never trained"))
        else:
            age = now - last_at
            verdict = ">=" if age >= period else "<"
            triggers.append((age >= period, f"last run {_fmt(age)} ago {verdict} {_fmt(period)}"))
    new = await store.count_ratings(since=last_at)
    if settings.min_new_ratings is not None:
        ok = new >= settings.min_new_ratings
        triggers.append(
            (ok, f"{new} new rating(s) {'>=' if ok else '<'} {settings.min_new_ratings}")
        )
    if not triggers:
        return DueDecision(False, ["no schedule (every_days and min_new_ratings unset)"], new)
    hits = [ok for ok, _ in triggers]
    due = any(hits) if settings.schedule_mode == "any" else all(hits)
    return DueDecision(due, [why for _, why in triggers], new, last_at)
