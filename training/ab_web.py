"""The live-test section of the web stats page: who is winning and how sure we are, at a glance.

Rendered on the server as HTML + inline SVG (no script: the page's Content-Security-Policy
allows none), from :func:`training.ab_plugin.api_doc` — the same numbers as ``GET /api/ab`` and
``oogiri models ab status``:

* the running (else the latest) test: each arm's version, votes and like-rate with its 95 %
  interval drawn as a bar with whiskers, the share of users on the small arm, and the rule's
  decision with its reason;
* each version's like-rate per day (the last 30 days) with 95 % intervals, one colour per
  version, so a promotion's effect and its uncertainty show over time.

The web plugin shows what plugins put in ``app.state["stats_sections"]`` (async callables
``fn(lang) -> html``); every value here is escaped.
"""

from __future__ import annotations

import html
from typing import Any

TEXTS = {
    "en": {
        "title": "Live test",
        "none": "No live test yet: a candidate that passes the offline checks is tested here.",
        "arm": "Arm",
        "version": "Version",
        "votes": "Votes",
        "rate": "Like rate",
        "interval": "95 % interval",
        "control": "active",
        "candidate": "candidate",
        "new": "new (promoted)",
        "previous": "previous",
        "share": "{share} of users get the {small} arm",
        "status": "Test #{id} ({kind}): {status}",
        "decision": "Decision",
        "over_time": "Like rate per version and day (95 % intervals)",
        "no_series": "No votes in the last 30 days.",
        "outcome": {
            "promote": "promote the candidate",
            "reject": "keep the active model (candidate worse)",
            "wait": "keep waiting for votes",
            "timeout": "time is up: keep the active model",
        },
        "watch_outcome": {
            "promote": "the promotion holds",
            "reject": "roll back to the previous model",
            "wait": "keep watching",
            "timeout": "time is up: the promotion holds",
        },
    },
    "zh": {
        "title": "在线对比测试",
        "none": "还没有在线测试：通过离线检查的候选模型会在这里接受用户检验。",
        "arm": "分组",
        "version": "版本",
        "votes": "票数",
        "rate": "好评率",
        "interval": "95% 区间",
        "control": "当前模型",
        "candidate": "候选模型",
        "new": "新模型（已上线）",
        "previous": "上一个模型",
        "share": "{share} 的用户使用{small}",
        "status": "测试 #{id}（{kind}）：{status}",
        "decision": "结论",
        "over_time": "各版本每日好评率（95% 区间）",
        "no_series": "最近 30 天没有投票。",
        "outcome": {
            "promote": "上线候选模型",
            "reject": "保留当前模型（候选更差）",
            "wait": "继续收集投票",
            "timeout": "到期：保留当前模型",
        },
        "watch_outcome": {
            "promote": "新模型站稳了",
            "reject": "回滚到上一个模型",
            "wait": "继续观察",
            "timeout": "到期：保留新模型",
        },
    },
}
COLOURS = ("#2f6fb0", "#c0562b", "#2f7d4f", "#8a4fb0", "#b08a2f", "#4f8ab0")
esc = html.escape


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x * 100:.1f}%"


def arms_svg(doc: dict[str, Any], t: dict[str, Any]) -> str:
    """Two horizontal interval bars on a 0–100 % axis: rate as a dot, 95 % interval as whiskers."""
    d = doc["decision"]
    label_w, chart_w, row_h, pad = 200, 380, 34, 10
    width, height = label_w + chart_w + 110, pad * 2 + 22 + 2 * row_h
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart ab-arms" role="img" '
        f'viewBox="0 0 {width} {height}" width="100%" aria-labelledby="ab-arms-title">',
        f'<title id="ab-arms-title">{esc(t["rate"])} · {esc(t["interval"])}</title>',
    ]
    for pct in (0, 25, 50, 75, 100):
        x = label_w + chart_w * pct / 100
        parts.append(
            f'<line x1="{x:.1f}" y1="{pad + 14}" x2="{x:.1f}" y2="{height - pad}" '
            f'stroke="#d0d4da" stroke-width="1"/><text x="{x:.1f}" y="{pad + 8}" font-size="11" '
            f'text-anchor="middle" fill="#5b6470">{pct}%</text>'
        )
    roles = _roles(doc, t)
    for i, (arm, key) in enumerate((("control", "control"), ("candidate", "candidate"))):
        y = pad + 22 + i * row_h + row_h / 2
        a = doc["arms"][arm]
        rate, ci = d.get(f"{key}_rate"), d.get(f"{key}_interval")
        colour = COLOURS[i]
        parts.append(
            f'<text x="{label_w - 8}" y="{y + 4:.1f}" font-size="12" text-anchor="end" '
            f'fill="#1d232b">{esc(roles[i])}: {esc(a["version"][:24])}</text>'
        )
        if rate is None or not ci:
            continue
        lo, hi = (label_w + chart_w * v for v in ci)
        x = label_w + chart_w * rate
        tip = f"{a['version']}: {_pct(rate)} [{_pct(ci[0])}, {_pct(ci[1])}], n={a['votes']}"
        parts.append(
            f'<g class="ab-arm" data-arm="{arm}"><title>{esc(tip)}</title>'
            f'<line x1="{lo:.1f}" y1="{y:.1f}" x2="{hi:.1f}" y2="{y:.1f}" stroke="{colour}" '
            f'stroke-width="6" stroke-opacity="0.35" stroke-linecap="round"/>'
            f'<line x1="{lo:.1f}" y1="{y - 7:.1f}" x2="{lo:.1f}" y2="{y + 7:.1f}" '
            f'stroke="{colour}" stroke-width="2"/>'
            f'<line x1="{hi:.1f}" y1="{y - 7:.1f}" x2="{hi:.1f}" y2="{y + 7:.1f}" '
            f'stroke="{colour}" stroke-width="2"/>'
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="6" fill="{colour}"/></g>'
            f'<text x="{label_w + chart_w + 8}" y="{y + 4:.1f}" font-size="12" '
            f'fill="#1d232b">{_pct(rate)} (n={a["votes"]})</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def series_svg(series: dict[str, list[dict[str, Any]]], t: dict[str, Any]) -> str:
    """Like-rate per version and day: dots with 95 % whiskers, joined per version."""
    days = sorted({p["day"] for points in series.values() for p in points})
    if not days:
        return f'<p class="muted">{esc(t["no_series"])}</p>'
    left, top, chart_w, chart_h, legend_h = 44, 16, 560, 200, 22
    width = left + chart_w + 20
    height = top + chart_h + 30 + legend_h * ((len(series) + 2) // 3)
    step = chart_w / max(1, len(days) - 1) if len(days) > 1 else 0.0

    def x_of(day: str) -> float:
        return left + (days.index(day) * step if len(days) > 1 else chart_w / 2)

    def y_of(v: float) -> float:
        return top + chart_h * (1 - v)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart ab-series" role="img" '
        f'viewBox="0 0 {width} {height}" width="100%" aria-labelledby="ab-series-title">',
        f'<title id="ab-series-title">{esc(t["over_time"])}</title>',
    ]
    for pct in (0, 25, 50, 75, 100):
        y = y_of(pct / 100)
        parts.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{left + chart_w}" y2="{y:.1f}" stroke="#d0d4da" '
            f'stroke-width="1"/><text x="{left - 6}" y="{y + 4:.1f}" font-size="11" '
            f'text-anchor="end" fill="#5b6470">{pct}%</text>'
        )
    for day in (days[0], days[-1]) if len(days) > 1 else (days[0],):
        parts.append(
            f'<text x="{x_of(day):.1f}" y="{top + chart_h + 16}" font-size="11" '
            f'text-anchor="middle" fill="#5b6470">{esc(day)}</text>'
        )
    for i, (version, points) in enumerate(sorted(series.items())):
        colour = COLOURS[i % len(COLOURS)]
        rated = [p for p in points if p["rate"] is not None]
        if len(rated) > 1:
            path = " ".join(f"{x_of(p['day']):.1f},{y_of(p['rate']):.1f}" for p in rated)
            parts.append(
                f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.5"/>'
            )
        for p in rated:
            x = x_of(p["day"])
            tip = (
                f"{version} {p['day']}: {_pct(p['rate'])} "
                f"[{_pct(p['low'])}, {_pct(p['high'])}], n={p['votes']}"
            )
            parts.append(
                f'<g class="ab-point" data-version="{esc(version)}"><title>{esc(tip)}</title>'
                f'<line x1="{x:.1f}" y1="{y_of(p["low"]):.1f}" x2="{x:.1f}" '
                f'y2="{y_of(p["high"]):.1f}" stroke="{colour}" stroke-width="2" '
                f'stroke-opacity="0.5"/><circle cx="{x:.1f}" cy="{y_of(p["rate"]):.1f}" r="4" '
                f'fill="{colour}"/></g>'
            )
        lx = left + (i % 3) * (chart_w / 3)
        ly = top + chart_h + 34 + (i // 3) * legend_h
        parts.append(
            f'<circle cx="{lx + 5:.1f}" cy="{ly - 4}" r="5" fill="{colour}"/>'
            f'<text x="{lx + 14:.1f}" y="{ly}" font-size="12" fill="#1d232b">'
            f"{esc(version[:28])}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _roles(doc: dict[str, Any], t: dict[str, Any]) -> tuple[str, str]:
    if doc["kind"] == "watch":
        return t["new"], t["previous"]
    return t["control"], t["candidate"]


def render_section(doc: dict[str, Any], lang: str) -> str:
    """The whole section from an ``api_doc`` document."""
    t = TEXTS.get(lang, TEXTS["en"])
    test = doc.get("running") or (doc.get("tests") or [None])[0]
    out = [f'<section class="card ab-card" id="live-test"><h2>{esc(t["title"])}</h2>']
    if test is None:
        out.append(f'<p class="muted">{esc(t["none"])}</p>')
    else:
        d = test["decision"]
        roles = _roles(test, t)
        outcomes = t["watch_outcome"] if test["kind"] == "watch" else t["outcome"]
        share = t["share"].format(share=f"{test['share']:.0%}", small=roles[1])
        out.append(f'<p class="ab-status">{esc(t["status"].format(**test))} · {esc(share)}</p>')
        out.append(arms_svg(test, t))
        rows = []
        for i, (arm, key) in enumerate((("control", "control"), ("candidate", "candidate"))):
            a = test["arms"][arm]
            ci = d.get(f"{key}_interval")
            rows.append(
                f'<tr data-arm="{arm}"><td>{esc(roles[i])}</td><td>{esc(a["version"])}</td>'
                f"<td>{a['votes']}</td><td>{_pct(d.get(f'{key}_rate'))}</td>"
                f"<td>{_pct(ci[0]) + ' – ' + _pct(ci[1]) if ci else '–'}</td></tr>"
            )
        out.append(
            f'<table class="stats ab-arms-table"><thead><tr><th scope="col">{esc(t["arm"])}</th>'
            f'<th scope="col">{esc(t["version"])}</th><th scope="col">{esc(t["votes"])}</th>'
            f'<th scope="col">{esc(t["rate"])}</th><th scope="col">{esc(t["interval"])}</th>'
            f"</tr></thead><tbody>{''.join(rows)}</tbody></table>"
        )
        out.append(
            f'<p class="ab-decision" data-outcome="{esc(d["outcome"])}"><strong>'
            f"{esc(t['decision'])}: {esc(outcomes.get(d['outcome'], d['outcome']))}</strong>"
            f" — {esc(d['reason'])}</p>"
        )
    out.append(f"<h3>{esc(t['over_time'])}</h3>")
    out.append(series_svg(doc.get("series") or {}, t))
    out.append("</section>")
    return "".join(out)
