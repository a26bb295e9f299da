"""The evaluation gate: is the candidate better than the active model? (never promote a worse one)

A gate is a list of steps, each giving a ``Check`` (passed / failed / pending, with a reason and
metrics); the ``GateDecision`` passes only when every check passes. Today's steps work offline on
the held-out images:

- ``HeldoutLossStep``: mean per-token loss (and perplexity) of the well-rated held-out jokes
  under the candidate must not exceed the active model's by more than ``gate_loss_tolerance``.
- ``SanityStep``: the candidate's own jokes for the held-out images must be non-empty, in the
  expected language, of sane length and not repetitive, for at least ``gate_min_sanity`` of them.

- ``LiveAbStep`` (``ab.enabled``, the default): the users decide. Once the offline checks pass
  and there is an active model to compare with, it returns ``Check(pending=True)``; the decision
  is then ``pending``, the run registers the candidate as ``testing`` and starts a live A/B test
  (training/ab.py), and the run ends as "testing". The test is decided later, on real votes,
  by ``bot.abstats.decide`` (promote / reject / wait / timeout).

Losses come from an ``Evaluator``. ``SubprocessEvaluator`` runs ``evaluate_hf.py`` (transformers)
with the training venv's python, because InternVL2's remote code needs transformers 4.x; tests
use a double.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bot.ab_settings import AbSettings
from training.settings import TrainingSettings

EVALUATE_SCRIPT = Path(__file__).with_name("evaluate_hf.py")


# --------------------------------------------------------------------------- evaluation


@dataclass
class EvalResult:
    """A model's score on the held-out set."""

    model_dir: str
    samples: int
    tokens: int = 0
    loss: float | None = None  # mean negative log-likelihood per joke token
    generations: list[str] = field(default_factory=list)
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def perplexity(self) -> float | None:
        if self.loss is None or not math.isfinite(self.loss):
            return None
        return math.exp(min(self.loss, 700.0))

    def summary(self) -> dict[str, Any]:
        return {
            "model_dir": self.model_dir,
            "samples": self.samples,
            "tokens": self.tokens,
            "loss": self.loss,
            "perplexity": self.perplexity,
            "seconds": round(self.seconds, 3),
            "generations": self.generations[:8],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EvalResult:
        gens = [g["text"] if isinstance(g, dict) else str(g) for g in data.get("generations", [])]
        loss = data.get("loss")
        return cls(
            model_dir=str(data.get("model", "")),
            samples=int(data.get("samples", 0)),
            tokens=int(data.get("tokens", 0)),
            loss=None if loss is None else float(loss),
            generations=gens,
            seconds=float(data.get("seconds", 0.0)),
            extra={k: v for k, v in data.items() if k in ("device", "layout", "dtype")},
        )


class Evaluator(Protocol):
    async def evaluate(self, model_dir: Path, heldout: Path, image_root: Path) -> EvalResult:
        """Score ``model_dir`` on the XTuner-format ``heldout`` file (images under image_root)."""
        ...


LineSink = Callable[[str], None]
CommandRunner = Callable[[list[str], LineSink | None], Awaitable[int]]


class SubprocessEvaluator:
    """Runs ``evaluate_hf.py`` with ``python`` (the training venv's): loss + greedy generations."""

    def __init__(
        self,
        python: Path | str,
        runner: CommandRunner,
        device: str = "auto",
        max_samples: int = 64,
        max_new_tokens: int = 64,
        max_dynamic_patch: int = 6,
        script: Path = EVALUATE_SCRIPT,
        sink: LineSink | None = None,
    ) -> None:
        self.python = str(python)
        self.runner = runner
        self.device = device
        self.max_samples = max_samples
        self.max_new_tokens = max_new_tokens
        self.max_dynamic_patch = max_dynamic_patch
        self.script = script
        self.sink = sink

    def command(self, model_dir: Path, heldout: Path, image_root: Path, out: Path) -> list[str]:
        return [
            self.python,
            str(self.script),
            "--model",
            str(model_dir),
            "--data",
            str(heldout),
            "--image-root",
            str(image_root),
            "--out",
            str(out),
            "--device",
            self.device,
            "--max-samples",
            str(self.max_samples),
            "--max-new-tokens",
            str(self.max_new_tokens),
            "--max-dynamic-patch",
            str(self.max_dynamic_patch),
        ]

    async def evaluate(self, model_dir: Path, heldout: Path, image_root: Path) -> EvalResult:
        with tempfile.TemporaryDirectory(prefix="oogiri-eval-") as tmp:
            out = Path(tmp) / "eval.json"
            rc = await self.runner(self.command(model_dir, heldout, image_root, out), self.sink)
            if rc != 0 or not out.is_file():
                raise RuntimeError(f"evaluation of {model_dir} failed (exit code {rc})")
            return EvalResult.from_json(json.loads(out.read_text(encoding="utf-8")))


# --------------------------------------------------------------------------- sanity checks

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002a6df]")
_ASCII_LETTER = re.compile(r"[A-Za-z]")


def language_share(text: str, language: str) -> float:
    """Share of the letters of ``text`` that belong to ``language`` (zh: CJK ideographs)."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return 0.0
    pattern = _CJK if language == "zh" else _ASCII_LETTER
    return sum(1 for c in letters if pattern.match(c)) / len(letters)


def distinct_ngram_ratio(text: str, n: int = 4) -> float:
    """Distinct character n-grams / all n-grams (1.0 for text too short to judge)."""
    chars = "".join(text.split())
    if len(chars) < 3 * n:
        return 1.0
    grams = [chars[i : i + n] for i in range(len(chars) - n + 1)]
    return len(set(grams)) / len(grams)


def longest_run(text: str) -> int:
    best = run = 0
    prev = None
    for ch in text:
        run = run + 1 if ch == prev else 1
        prev = ch
        best = max(best, run)
    return best


@dataclass(frozen=True)
class SanityRules:
    language: str = "zh"  # zh, en or any
    min_chars: int = 2
    max_chars: int = 200
    min_language_share: float = 0.5
    min_distinct_ngrams: float = 0.5
    max_char_run: int = 8


def sanity_problems(text: str, rules: SanityRules) -> list[str]:
    """Why ``text`` is not a sane joke (empty list: it is)."""
    stripped = text.strip()
    if not stripped:
        return ["empty"]
    problems = []
    if len(stripped) < rules.min_chars:
        problems.append(f"too short ({len(stripped)} chars)")
    if len(stripped) > rules.max_chars:
        problems.append(f"too long ({len(stripped)} chars)")
    if rules.language != "any":
        share = language_share(stripped, rules.language)
        if share < rules.min_language_share:
            problems.append(f"not {rules.language} ({share:.0%} of letters)")
    ratio = distinct_ngram_ratio(stripped)
    if ratio < rules.min_distinct_ngrams:
        problems.append(f"repetitive ({ratio:.0%} distinct 4-grams)")
    if longest_run(stripped) > rules.max_char_run:
        problems.append(f"repeats one character {longest_run(stripped)} times")
    return problems


# --------------------------------------------------------------------------- gate


@dataclass
class Check:
    name: str
    passed: bool
    reason: str
    pending: bool = False
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class GateContext:
    candidate: EvalResult
    active: EvalResult | None
    settings: TrainingSettings
    language: str
    candidate_version: str | None = None
    active_version: str | None = None


class GateStep(Protocol):
    name: str

    async def check(self, ctx: GateContext) -> Check: ...


class HeldoutLossStep:
    name = "heldout_loss"

    async def check(self, ctx: GateContext) -> Check:
        cand = ctx.candidate
        tol = ctx.settings.gate_loss_tolerance
        metrics: dict[str, Any] = {
            "candidate_loss": cand.loss,
            "candidate_perplexity": cand.perplexity,
            "samples": cand.samples,
            "tolerance": tol,
        }
        if cand.samples < 1:
            return Check(self.name, False, "no held-out examples to evaluate on", metrics=metrics)
        least = ctx.settings.gate_min_heldout
        if cand.samples < least:
            # A loss over one or two answers is noise: a candidate trained on the wrong labels
            # passed that way. Wait for more ratings rather than promote on a coin toss.
            return Check(
                self.name,
                False,
                f"only {cand.samples} held-out answers (gate_min_heldout is {least}): "
                "too few to tell the models apart; collect more ratings",
                metrics=metrics,
            )
        if cand.loss is None or not math.isfinite(cand.loss):
            return Check(self.name, False, f"candidate loss is {cand.loss}", metrics=metrics)
        active = ctx.active
        if active is None or active.loss is None:
            return Check(
                self.name, True, "no active model to compare with; loss is finite", metrics=metrics
            )
        metrics |= {"active_loss": active.loss, "active_perplexity": active.perplexity}
        if not math.isfinite(active.loss):
            return Check(self.name, True, "active model's loss is not finite", metrics=metrics)
        limit = active.loss * (1 + tol) if active.loss >= 0 else active.loss
        metrics["delta"] = cand.loss - active.loss
        if cand.loss <= limit:
            return Check(
                self.name,
                True,
                f"held-out loss {cand.loss:.4f} <= active {active.loss:.4f}"
                + (f" (+{tol:.0%})" if tol else ""),
                metrics=metrics,
            )
        return Check(
            self.name,
            False,
            f"held-out loss {cand.loss:.4f} is worse than the active model's {active.loss:.4f}"
            + (f" (+{tol:.0%} allowed)" if tol else ""),
            metrics=metrics,
        )


class SanityStep:
    name = "sanity"

    async def check(self, ctx: GateContext) -> Check:
        s = ctx.settings
        rules = SanityRules(
            language=ctx.language, min_chars=s.gate_min_chars, max_chars=s.gate_max_chars
        )
        gens = ctx.candidate.generations
        if not gens:
            return Check(self.name, False, "the candidate generated nothing to check")
        failures: dict[str, int] = {}
        examples: list[dict[str, Any]] = []
        sane = 0
        for text in gens:
            problems = sanity_problems(text, rules)
            if not problems:
                sane += 1
                continue
            for p in problems:
                key = p.split(" (")[0]
                failures[key] = failures.get(key, 0) + 1
            if len(examples) < 3:
                examples.append({"text": text[:120], "problems": problems})
        share = sane / len(gens)
        metrics = {"sane": sane, "total": len(gens), "share": round(share, 4), "failures": failures}
        if examples:
            metrics["examples"] = examples
        ok = share >= s.gate_min_sanity
        verdict = ">=" if ok else "<"
        reason = (
            f"{sane}/{len(gens)} generations sane ({share:.0%} {verdict} {s.gate_min_sanity:.0%})"
        )
        if failures and not ok:
            reason += ": " + ", ".join(f"{k} ×{v}" for k, v in sorted(failures.items()))
        return Check(self.name, ok, reason, metrics=metrics)


@dataclass
class GateDecision:
    passed: bool
    pending: bool
    checks: list[Check]

    @property
    def reasons(self) -> list[str]:
        return [
            f"{'ok' if c.passed else 'pending' if c.pending else 'FAIL'} {c.name}: {c.reason}"
            for c in self.checks
        ]

    @property
    def verdict(self) -> str:
        return "passed" if self.passed else "pending" if self.pending else "failed"

    def as_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "passed": self.passed,
            "reasons": self.reasons,
            "checks": [asdict(c) for c in self.checks],
        }


class Gate:
    def __init__(self, steps: Sequence[GateStep]) -> None:
        self.steps = list(steps)

    async def decide(self, ctx: GateContext) -> GateDecision:
        checks = []
        for step in self.steps:
            try:
                checks.append(await step.check(ctx))
            except Exception as exc:  # a broken check never lets a model through
                checks.append(Check(step.name, False, f"check crashed: {exc!r}"))
        passed = all(c.passed for c in checks)
        pending = not passed and all(c.passed or c.pending for c in checks)
        return GateDecision(passed=passed, pending=pending, checks=checks)


class LiveAbStep:
    """Pending: the candidate goes to a live A/B test on a share of users (see the module doc).

    Without an active model there is nothing to compare with: it passes (the first model is
    promoted on the offline checks). If an earlier check failed the gate fails anyway (a
    pending decision needs every other check passed), so no test starts.
    """

    name = "live_ab"

    def __init__(self, share: float, min_votes: int, min_effect: float, max_days: float) -> None:
        self.share = share
        self.min_votes = min_votes
        self.min_effect = min_effect
        self.max_days = max_days

    async def check(self, ctx: GateContext) -> Check:
        metrics = {
            "share": self.share,
            "min_votes": self.min_votes,
            "min_effect": self.min_effect,
            "max_days": self.max_days,
        }
        if ctx.active_version is None:
            return Check(
                self.name, True, "no active model to compare with: nothing to test", metrics=metrics
            )
        return Check(
            self.name,
            False,
            f"live A/B test: {self.share:.0%} of users get the candidate beside "
            f"{ctx.active_version}; decided on at least {self.min_votes} votes per arm "
            f"(minimum lift {self.min_effect:.0%}, at most {self.max_days:g} days)",
            pending=True,
            metrics=metrics,
        )


def default_gate(ab: AbSettings | None = None) -> Gate:
    """The offline checks, then (when ``ab.enabled``) the live A/B step."""
    steps: list[GateStep] = [HeldoutLossStep(), SanityStep()]
    if ab is not None and ab.enabled:
        steps.append(LiveAbStep(ab.share, ab.min_votes, ab.min_effect, ab.max_days))
    return Gate(steps)
