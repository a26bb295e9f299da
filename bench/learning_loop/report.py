"""Reports of the learning-loop experiment: summary, markdown, plot, the docs section."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import fmt, markdown_table, write_section
from bench.learning_loop.stats import bootstrap_diff, two_proportion_p

DOC = Path(__file__).resolve().parents[2] / "docs" / "learning-loop.md"
ROW_KEYS = ("answers", "ratings", "train", "ab", "export_check", "blocked", "served_expected")


def load_results(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _order(step: str) -> tuple[bool, int]:
    return step == "control", int(step.split("-")[1]) if step != "control" else 0


def _row(rec: dict[str, Any], base: dict[str, Any] | None) -> dict[str, Any]:
    """One step's row: its held-out measurement, the change since round 0, what it ran."""
    m = rec.get("measure") or {}
    row: dict[str, Any] = {"step": rec["step"], "seconds": rec.get("seconds")}
    if m:
        row |= {k: m[k] for k in ("rate", "liked", "n", "wilson95", "bootstrap95")}
        row["served"] = m["versions"]
        row |= {k: m.get(k) for k in ("per_photo", "distinct", "top_answers")}
        if base and rec["step"] != "round-0":
            row["delta"] = m["rate"] - base["rate"]
            row["delta95"] = list(bootstrap_diff(base["per_image"], m["per_image"]))
            row["p"] = two_proportion_p(base["liked"], base["n"], m["liked"], m["n"])
    return row | {k: rec[k] for k in ROW_KEYS if k in rec}


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-step rows, the margin test (last round vs round 0) and the control's verdict."""
    steps: dict[str, dict[str, Any]] = {}
    config: dict[str, Any] = {}
    calls = []
    for rec in records:
        if rec.get("kind") == "step":
            steps[rec["step"]] = rec
        elif rec.get("kind") == "config":
            config = rec["config"]
        elif rec.get("kind") == "call":
            calls.append(rec)
        elif rec.get("kind") == "serve" and calls:
            calls[-1]["serve_healthy_s"] = rec["seconds"]
    base = steps.get("round-0", {}).get("measure")
    rows = [_row(steps[name], base) for name in sorted(steps, key=_order)]
    rounds = [r for r in rows if r["step"] not in ("round-0", "control")]
    ended = ("succeeded", "rejected", "testing")
    verdicts: dict[str, Any] = {
        "rounds_end_to_end": sum(r.get("train", {}).get("status") in ended for r in rounds),
        "rounds_planned": config.get("rounds"),
        "promotions": sum(
            bool(r.get("train", {}).get("promoted"))
            or (r.get("ab") or {}).get("outcome") == "promoted"
            for r in rounds
        ),
        "ab_decisions": [
            {"step": r["step"], "outcome": r["ab"].get("outcome"), "votes": _votes(r["ab"])}
            for r in rows
            if r.get("ab")
        ],
    }
    last = rounds[-1] if rounds else None
    if last and "delta95" in last:
        verdicts["learned"] = {
            "from": base["rate"] if base else None,
            "to": last["rate"],
            "delta": last["delta"],
            "delta95": last["delta95"],
            "p": last.get("p"),
            "passed": last["delta95"][0] > 0,
        }
    control = steps.get("control")
    if control:
        ab = control.get("ab") or {}
        own = (ab.get("arms") or {}).get(ab.get("version") or "", {})
        train = control["train"]
        verdicts["control"] = {
            "mode": control.get("control"),
            "ab_outcome": ab.get("outcome"),
            "ab_reason": ab.get("reason"),
            "ab_votes": _votes(ab),
            **{k: own.get(k) for k in ("heldout_rate", "heldout_wilson95", "heldout_n")},
            **{k: train[k] for k in ("status", "gate_reasons", "active_before", "active_after")},
            "export_ok": control.get("export_check", {}).get("ok"),
            "passed": bool(control.get("blocked")),
        }
    mismatched = [
        r["step"]
        for r in rows
        if r.get("served")
        and r.get("served_expected")
        and set(r["served"]) != {r["served_expected"]}
    ]
    verdicts["served_matches_registry"] = {
        "passed": not mismatched,
        "mismatched": mismatched,
        # the instant engine reports one label whatever the registry promotes
        "applicable": not config.get("dry_run"),
    }
    return {"config": config, "rows": rows, "verdicts": verdicts, "calls": calls}


def _votes(ab: dict[str, Any]) -> dict[str, int] | None:
    """Counted votes per arm, as the product decided on them."""
    counted = ab.get("counted") or {}
    return {arm: int(c.get("votes", 0)) for arm, c in counted.items()} or None


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def _interval(iv: Sequence[float] | None, signed: bool = False) -> str:
    if not iv:
        return "–"
    spec = "+.1f" if signed else ".1f"
    return f"[{100 * iv[0]:{spec}}, {100 * iv[1]:{spec}}]"


def _ab_cell(row: dict[str, Any]) -> str:
    ab = row.get("ab")
    if not ab:
        return "–"
    if ab.get("outcome") == "not tested":
        return f"not tested (run {ab.get('run_status')})"
    votes = _votes(ab) or {}
    arms = ab.get("arms") or {}
    cand = arms.get(ab.get("version") or "", {})
    ctrl = arms.get(ab.get("control_version") or "") or next(
        (a for v, a in arms.items() if v != ab.get("version")), {}
    )
    d = ab.get("decision") or {}
    out = (
        f"**{ab.get('outcome')}** on {votes.get('control', '?')} + {votes.get('candidate', '?')} "
        f"counted votes (control {_pct(d.get('control_rate'))}, candidate "
        f"{_pct(d.get('candidate_rate'))}; lift {_interval(d.get('difference_interval'), True)})"
    )
    if ab.get("ab_arrivals"):
        out += f"; {ab['ab_arrivals']} people joined while it waited"
    if cand.get("heldout_n"):
        out += (
            f"; held-out: candidate {_pct(cand.get('heldout_rate'))}, control "
            f"{_pct(ctrl.get('heldout_rate'))}"
        )
    return out


def _train_cell(row: dict[str, Any]) -> str:
    t = row.get("train")
    if not t:
        return "–"
    text = t["status"] + (f" `{t['version']}`" if t.get("version") else "")
    loss = t.get("heldout_loss") or {}
    if loss.get("candidate") is not None:
        text += f"; held-out loss {loss['candidate']:.3f}"
        text += f" vs active {loss['active']:.3f}" if loss.get("active") is not None else ""
    text += "; promoted" if t.get("promoted") else ""
    return text + (f"; {t['error'][:80]}" if t.get("error") else "")


def _times(row: dict[str, Any]) -> str:
    parts = []
    if "answers" in row:
        parts += [
            f"answer {row['answers']['seconds']:.0f}",
            f"rate {row['ratings']['seconds']:.0f}",
        ]
    if t := row.get("train"):
        ts = t.get("timings_s") or {}
        inner = ", ".join(
            f"{k} {ts[k]:.0f}" for k in ("train", "convert", "evaluate", "promote") if k in ts
        )
        parts.append(f"train run {t['seconds']:.0f}" + (f" ({inner})" if inner else ""))
    return ", ".join([*parts, f"total {row['seconds']:.0f}"])


def _rated(row: dict[str, Any]) -> str:
    if row["step"] == "control":
        check = row.get("export_check") or {}
        tr, ho = check.get("train", {}), check.get("heldout", {})
        return (
            f"trained on {tr.get('disliked', '?')}/{tr.get('items', '?')} disliked; "
            f"held out {ho.get('liked', '?')}/{ho.get('items', '?')} liked"
        )
    if "answers" not in row:
        return "–"
    a, r = row["answers"], row["ratings"]
    return f"{a['answered']}: {r['audience_liked']} / {a['rule_liked']}"


def _steps_table(rows: list[dict[str, Any]]) -> str:
    """The step table; version 1's runs had no distinct-answer share and no live A/B."""
    distinct = any(r.get("distinct") is not None for r in rows)
    live = any("ab" in r for r in rows)
    columns = ["step", "served model", "held-out like-rate", "95 % interval (Wilson; pictures)"]
    columns += ["Δ vs round 0 (95 %, p)"] + ["distinct answers"] * distinct
    columns += ["rated answers (👍 audience / rule)", "train run"]
    columns += ["live A/B"] * live + ["seconds"]
    table = []
    for row in rows:
        served = row.get("served") or {}
        delta = "–"
        if "delta" in row:
            delta = f"{100 * row['delta']:+.1f} {_interval(row['delta95'], True)}"
            delta += f", p={row['p']:.2g}" if row.get("p") is not None else ""
        cells = [
            row["step"],
            ", ".join(f"`{v}`" + (f" ×{n}" if len(served) > 1 else "") for v, n in served.items()),
            f"{_pct(row.get('rate'))} ({row.get('liked', '–')}/{row.get('n', '–')})",
            f"{_interval(row.get('wilson95'))}; {_interval(row.get('bootstrap95'))}",
            delta,
            *[_pct(row.get("distinct"))] * distinct,
            _rated(row),
            _train_cell(row),
            *[_ab_cell(row)] * live,
            _times(row),
        ]
        table.append([fmt(c) for c in cells])
    return markdown_table(columns, table)


def _photo_table(rows: list[dict[str, Any]]) -> list[str]:
    """Held-out like-rate per source photo: each served model, each candidate's A/B arm."""
    found: list[tuple[str, dict[str, Any]]] = []
    for row in rows:
        if row.get("per_photo"):
            found.append((f"{row['step']} (served)", row["per_photo"]))
        ab = row.get("ab") or {}
        arm = (ab.get("arms") or {}).get(ab.get("version") or "")
        if arm and arm.get("per_photo"):
            found.append((f"{row['step']} candidate's A/B arm", arm["per_photo"]))
    photos = sorted({src for _, pp in found for src in pp})
    if not photos:
        return []
    table = [
        [label]
        + [
            f"{_pct(pp[s][0] / pp[s][1])} ({pp[s][0]}/{pp[s][1]})" if pp.get(s, [0, 0])[1] else "–"
            for s in photos
        ]
        for label, pp in found
    ]
    intro = "Held-out like-rate per source photo (liked/answers):"
    return ["", intro, "", markdown_table(["step", *photos], table)]


def _verdict_lines(v: dict[str, Any]) -> list[str]:
    lines = []
    if learned := v.get("learned"):
        p = learned.get("p")
        lines.append(
            f"- {'PASS' if learned['passed'] else 'FAIL'} like-rate rose: {_pct(learned['from'])} "
            f"→ {_pct(learned['to'])}, Δ = {100 * learned['delta']:+.1f} points, 95 % interval "
            f"{_interval(learned['delta95'], True)} (bootstrap over pictures)"
            + (f", two-proportion p = {p:.2g}" if p is not None else "")
            + "; the test: the interval's lower end is above 0."
        )
    else:
        lines.append("- like-rate: no round measured yet")
    control = v.get("control")
    if control:
        mark = "PASS" if control["passed"] else "FAIL"
        active = f"active model `{control['active_before']}` → `{control['active_after']}`"
        export = "; export check " + ("ok" if control["export_ok"] else "FAILED")
        if control.get("ab_outcome"):
            lines.append(
                f"- {mark} control ({control['mode']}, trained on disliked answers) in the live "
                f"A/B: {control['ab_outcome']} on {control.get('ab_votes')} counted votes — "
                f"{control.get('ab_reason')}; {active}; its own held-out like-rate "
                f"{_pct(control.get('heldout_rate'))} {_interval(control.get('heldout_wilson95'))}"
                f" (n={control.get('heldout_n')}){export}"
            )
        else:
            lines.append(
                f"- {mark} control ({control['mode']}, trained on disliked answers): "
                f"{control['status']}; {active}{export}"
            )
            lines += [f"  - gate {reason}" for reason in control["gate_reasons"]]
    else:
        lines.append("- control: not run yet")
    served = v["served_matches_registry"]
    if served.get("applicable", True):
        mismatched = served["mismatched"]
        lines.append(
            f"- {'PASS' if served['passed'] else 'FAIL'} every measured answer came from the "
            "registry's active version"
            + (f" (mismatched: {', '.join(mismatched)})" if mismatched else "")
        )
    lines.append(
        f"- rounds end to end: {v['rounds_end_to_end']} of {v.get('rounds_planned')}, "
        f"{v['promotions']} promoted"
    )
    for d in v.get("ab_decisions", []):
        lines.append(f"- live A/B {d['step']}: {d['outcome']} on {d['votes']} counted votes")
    return lines


def render_markdown(summary: dict[str, Any], plot: str | None = None) -> str:
    """The results table and verdicts, as markdown."""
    cfg, rows = summary["config"], summary["rows"]
    lines = []
    if cfg.get("dry_run"):
        lines += [
            "**Dry run with stand-ins** (instant engine, fake XTuner, unigram evaluator): the "
            "bookkeeping only. The served answers never change, so the like-rate cannot move.",
            "",
        ]
    lines += [_steps_table(rows), *_photo_table(rows), "", "**Verdicts**", ""]
    lines += _verdict_lines(summary["verdicts"])
    if plot:
        lines += ["", f"![held-out like-rate per round]({plot})"]
    if cfg:
        shown = json.dumps({k: cfg[k] for k in sorted(cfg)}, ensure_ascii=False)
        lines += ["", f"Configuration: `{shown}`"]
    for call in summary.get("calls", []):
        serve = call.get("serve_healthy_s")
        started = f" (oogiri serve healthy after {serve:.0f} s)" if serve is not None else ""
        lines.append(f"- call at {call['at']}{started}: `{call['argv']}`")
    return "\n".join(lines) + "\n"


def plot_png(summary: dict[str, Any], path: Path) -> bool:
    """Held-out like-rate with its interval per step; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in summary["rows"] if "rate" in r]
    if not rows:
        return False
    xs = list(range(len(rows)))
    rates = [100 * r["rate"] for r in rows]
    lo = [100 * (r["rate"] - r["wilson95"][0]) for r in rows]
    hi = [100 * (r["wilson95"][1] - r["rate"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    colours = ["tab:red" if r["step"] == "control" else "tab:blue" for r in rows]
    ax.errorbar(xs, rates, yerr=[lo, hi], fmt="none", ecolor="gray", capsize=4)
    ax.scatter(xs, rates, c=colours, zorder=3)
    n_rounds = sum(1 for r in rows if r["step"] != "control")
    ax.plot(xs[:n_rounds], rates[:n_rounds], alpha=0.4)
    ax.set_xticks(xs, [r["step"] for r in rows])
    ax.set_ylabel("held-out like-rate (%)")
    ax.set_ylim(0, max(100.0, max(rates) + 5))
    ax.set_title("Simulated audience: like-rate on held-out pictures (95 % Wilson)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_reports(records: list[dict[str, Any]], out_dir: Path) -> dict[str, Any]:
    summary = summarize(records)
    plotted = plot_png(summary, out_dir / "like-rate.png")
    (out_dir / "summary.json").write_text(
        json.dumps(summary, ensure_ascii=False, indent=1, default=str), encoding="utf-8"
    )
    (out_dir / "summary.md").write_text(
        render_markdown(summary, "like-rate.png" if plotted else None), encoding="utf-8"
    )
    return summary


def render_doc(
    results_dir: Path,
    doc: Path = DOC,
    section: str = "learning-loop-results",
    title: str = "Results",
) -> None:
    """Rewrite a results section of docs/learning-loop.md from a results folder."""
    records = load_results(results_dir / "results.jsonl")
    if not records:
        raise SystemExit(f"no results in {results_dir}")
    summary = summarize(records)
    png = results_dir / "like-rate.png"
    # linked where it lies, not copied next to the doc
    plot = Path(os.path.relpath(png.resolve(), doc.resolve().parent)).as_posix()
    kind = "dry run (stand-ins)" if summary["config"].get("dry_run") else "device"
    first = summary["calls"][0]["at"] if summary["calls"] else "?"
    head = f"From `{results_dir}` ({kind}, first call {first}).\n\n"
    body = head + render_markdown(summary, plot if png.is_file() else None)
    write_section(section, title, body, doc=doc)
