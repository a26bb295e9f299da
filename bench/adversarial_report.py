"""Regenerate docs/reliability.md's case tables from an actual run of the reliability suites.

Runs ``pytest tests/adversarial tests/faults`` with ``OOGIRI_RELIABILITY_JSON`` set, so the rows
are exactly what the tests recorded (case, what was tried, expected, observed, the real pytest
outcome, time and peak RSS around it: tests/adversarial/relreport.py), plus the security and
training-crash tests that live next to their code (``REFERENCED``: their JUnit outcome). Writes
bench/results/reliability-cases.json and the ``<!-- bench:reliability-… -->`` sections.

Usage:
  python -m bench.adversarial_report                 # run the suites, then write the doc
  python -m bench.adversarial_report --from FILE     # render a JSON an earlier run wrote
  python -m bench.adversarial_report -k bomb         # extra pytest args (a partial table!)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from bench.common import RESULTS, ROOT, tally, write_json, write_section

DOC = ROOT / "docs" / "reliability.md"
CASES = RESULTS / "reliability-cases.json"
SUITES = ["tests/adversarial", "tests/faults"]

TG = "tests/telegram/test_telegram.py"
LOGS = "tests/test_settings_limits_logs.py"
WEB = "tests/test_web.py"
TRAIN_RUN = "tests/training/test_training_run.py"
EXPORT = "tests/training/test_training_export.py"

#: Properties the issue asks for that are tested where the code lives: (property, node, shows).
REFERENCED: list[tuple[str, str, str]] = [
    ("tokens", f"{TG}::test_token_never_reaches_the_logs",
     "bot token absent from PTB/httpx logs at DEBUG"),
    ("tokens", f"{TG}::test_rejected_token_is_not_echoed",
     "a rejected token is not echoed in the error or the log"),
    ("tokens", f"{LOGS}::test_secrets_never_reach_logs",
     "RedactingFilter scrubs configured secrets and token shapes"),
    ("tokens", f"{LOGS}::test_config_show_masks_secrets",
     "`oogiri config show` masks every secret"),
    ("tokens", f"{LOGS}::test_mask_url_hides_password",
     "database URLs are logged without their password"),
    ("webhook", f"{TG}::test_webhook_rejects_wrong_secret_and_serves_right_one",
     "Telegram webhook: wrong/missing secret → 403"),
    ("buttons", f"{TG}::test_forged_and_stale_callbacks_are_refused_with_an_alert",
     "forged/stale/other-chat vote buttons refused, nothing stored"),
    ("buttons", "tests/discord/test_discord.py::test_vote_from_another_channel_is_refused",
     "Discord: a vote button replayed in another channel is refused"),
    ("buttons", f"{WEB}::test_jokes_of_other_channels_stay_private",
     "web: other channels' jokes cannot be read or voted on"),
    ("buttons", f"{WEB}::test_bad_votes",
     "web: non-existent joke 404; only ±1 votes"),
    ("admin", f"{TG}::test_help_privacy_languages_and_admin_stats",
     "/stats only for telegram.admin_ids"),
    ("web", f"{WEB}::test_cookie_tampering_gives_a_new_identity",
     "identity cookie is signed: tampering gives a new identity"),
    ("web", f"{WEB}::test_cookie_flags",
     "HttpOnly, SameSite cookies"),
    ("web", f"{WEB}::test_cross_site_form_post_is_refused",
     "CSRF: cross-site forms, missing/wrong token, Origin null refused"),
    ("web", f"{WEB}::test_oversize_by_content_length_is_413_without_reading",
     "upload refused from Content-Length before any body byte is pulled"),
    ("web", f"{WEB}::test_oversize_while_streaming_is_413",
     "chunked upload cut off at the limit"),
    ("engine", "tests/engines/test_openai_http.py::test_only_data_urls_may_leave",
     "only data: image URLs may be sent to the engine"),
    ("engine", "tests/engines/test_openai_http.py::test_a_non_data_url_is_never_sent",
     "a non-data: URL never leaves the process"),
    ("engine",
     "tests/test_transformers_engine.py::test_prompt_text_cannot_forge_image_or_turn_tokens",
     "hint text cannot forge <img>/turn tokens in the local engine"),
    ("training", f"{EXPORT}::test_per_user_cap_keeps_each_users_best",
     "per-user cap on exported examples"),
    ("training", f"{EXPORT}::test_per_voter_cap_limits_one_voters_influence",
     "per-voter cap on counted votes"),
    ("training crash",
     f"{TRAIN_RUN}::test_a_failure_at_any_step_leaves_the_active_model_untouched",
     "a training run failing at any step leaves the served model untouched"),
    ("training crash",
     f"{TRAIN_RUN}::test_cancellation_kills_the_trainer_and_records_the_run",
     "a cancelled run kills the trainer and is recorded"),
]  # fmt: skip


def run_suites(extra: list[str]) -> tuple[list[dict[str, Any]], dict[str, str], float]:
    """The suites in one run; the referenced tests one run per folder (some folders' tests import
    their own ``conftest`` by name, which only works when that folder is collected alone)."""
    outcomes: dict[str, str] = {}
    seconds = 0.0
    folders: dict[str, list[str]] = defaultdict(list)
    for _, node, _ in REFERENCED:
        folders[str(Path(node.split("::")[0]).parent)].append(node)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cases.json"
        for i, args in enumerate([[*SUITES, *extra], *folders.values()]):
            junit = Path(tmp) / f"junit-{i}.xml"
            env = {**os.environ, **({"OOGIRI_RELIABILITY_JSON": str(out)} if i == 0 else {})}
            print("+ pytest", " ".join(args), flush=True)
            argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
            code = subprocess.run([*argv, f"--junitxml={junit}"], cwd=ROOT, env=env).returncode
            if code not in (0, 1):
                raise SystemExit(f"pytest failed to run (exit {code}): {' '.join(args)}")
            found, took = junit_outcomes(junit)
            outcomes.update(found)
            seconds += took
        records = json.loads(out.read_text()) if out.exists() else []
    return records, outcomes, seconds


def junit_outcomes(path: Path) -> tuple[dict[str, str], float]:
    """node-id prefix → passed/failed/skipped (parametrized tests: the worst of their cases)."""
    found: dict[str, str] = {}
    total = 0.0
    for case in ET.parse(path).iter("testcase") if path.exists() else ():
        total += float(case.get("time", 0))
        module = (case.get("classname") or "").replace(".", "/") + ".py"
        key = f"{module}::{(case.get('name') or '').split('[', 1)[0]}"
        tags = {child.tag for child in case}
        outcome = (
            "failed" if tags & {"failure", "error"} else "skipped" if "skipped" in tags else ""
        )
        found[key] = max(outcome or "passed", found.get(key, "passed"), key=RANK.index)
    return found, total


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


def _fmt_mb(record: dict[str, Any]) -> str:
    """Peak RSS and, where the RSS right before is known, the rise above it."""
    peak, base = record.get("peak_mb"), record.get("base_mb")
    if peak is None:
        return "–"
    return f"{peak:.0f}" + ("" if base is None else f" (+{max(0.0, peak - base):.0f})")


def _cell(text: Any) -> str:
    text = str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("|", "\\|").replace("\n", " ")


RANK = ["passed", "skipped", "failed"]
MARK = {"passed": "✅ pass", "failed": "❌ FAIL", "skipped": "⏭ skipped", "not run": "–"}
SUITE_ORDER = [
    "hostile input (web)", "hostile input (web, PostgreSQL)", "hostile input (telegram)",
    "engine faults", "database faults", "storage faults", "crash faults", "security",
]  # fmt: skip


def render_cases(records: list[dict[str, Any]]) -> dict[str, str]:
    """One table per suite, its cases in recorded order."""
    by_suite: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_suite[r["suite"]].append(r)
    sections = {}
    for suite, rows in by_suite.items():
        lines = [
            "| Case | Kind | What was tried | Expected | Observed | Result | Time "
            "| Peak RSS MB (+Δ) |",
            "|---|---|---|---|---|---|---:|---:|",
            *(
                f"| `{r['case']}` | {r['kind']} | {_cell(r['what'])} | {_cell(r['expected'])} | "
                f"{_cell(r['observed'])} | {MARK.get(r['outcome'], r['outcome'])} | "
                f"{_fmt_s(r['seconds'])} | {_fmt_mb(r)} |"
                for r in rows
            ),
        ]
        if kinds := sorted({r["peak_kind"] for r in rows if r.get("peak_kind")}):
            lines += ["", "Peak RSS: " + "; ".join(kinds) + " (Δ: above the RSS right before)."]
        sections[suite] = "\n".join(lines)
    return sections


def render_referenced(outcomes: dict[str, str]) -> str:
    lines = ["| Property | Test | What it shows | Result |", "|---|---|---|---|"]
    for prop, node, what in REFERENCED:
        outcome = outcomes.get(node, "not run")
        lines.append(f"| {prop} | `{node}` | {_cell(what)} | {MARK.get(outcome, outcome)} |")
    return "\n".join(lines)


def render_summary(records: list[dict[str, Any]], outcomes: dict[str, str], seconds: float) -> str:
    referenced = (outcomes.get(node, "not run") for _, node, _ in REFERENCED)
    kinds = len({(r["suite"], r["kind"]) for r in records})
    cases = tally(Counter(r["outcome"] for r in records), "{v} {k}")
    parts = [
        f"- **{len(records)} recorded cases** in {kinds} kinds: {cases}",
        f"- **{len(REFERENCED)} referenced tests**: {tally(Counter(referenced), '{v} {k}')}",
    ]
    if peaks := [r["peak_mb"] for r in records if r.get("peak_mb") is not None]:
        parts.append(f"- highest peak RSS of any case: **{max(peaks):.0f} MB** (limit 1024 MB)")
    if records:
        slow = max(records, key=lambda r: r.get("seconds") or 0)
        parts.append(f"- slowest case: `{slow['case']}` {_fmt_s(slow['seconds'])}")
    parts.append(
        f"- whole run: {seconds:.0f} s of test time on {os.cpu_count()} CPUs "
        f"({platform.python_implementation()} {platform.python_version()}, {platform.machine()})"
    )
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", type=Path, help="render this JSON, run nothing")
    parser.add_argument("--no-docs", action="store_true", help="only write the JSON")
    args, extra = parser.parse_known_args()
    if args.source:
        saved = json.loads(args.source.read_text())
        records, outcomes, seconds = saved["cases"], saved["referenced"], saved["seconds"]
    else:
        records, outcomes, seconds = run_suites(extra)
        saved = {"cases": records, "referenced": outcomes, "seconds": seconds}
        write_json(CASES, saved, indent=1)
    if args.no_docs:
        return
    summary = render_summary(records, outcomes, seconds)
    write_section("reliability-summary", "Summary of the last run", summary, doc=DOC)
    cases = render_cases(records)
    for suite in sorted(cases, key=lambda s: [*SUITE_ORDER, s].index(s)):
        key = "-".join("".join(c if c.isalnum() else " " for c in suite).split())
        write_section(f"reliability-{key}", f"Cases: {suite}", cases[suite], doc=DOC)
    title = "Referenced tests (security, training crashes)"
    write_section("reliability-referenced", title, render_referenced(outcomes), doc=DOC)
    failed = [r["case"] for r in records if r["outcome"] == "failed"]
    print(f"{len(records)} cases, failed: {failed or 'none'}; wrote {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
