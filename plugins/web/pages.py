"""The HTML pages: the upload page and the stats page (chart + per-version table).

Pages are small templates filled with HTML-escaped values. The stats page is the chart, the
per-version table, and then any sections other plugins contribute (``plugin_sections``: async
functions in ``app.state["stats_sections"]`` returning escaped HTML), so a feature adds its own
section without touching these.
"""

from __future__ import annotations

import html
import json
import logging
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response

from bot.models import RateLimited, message
from plugins.web.errors import limit_mb
from plugins.web.texts import PAGE_TEXTS, counted, request_language, web_message

if TYPE_CHECKING:
    from bot.app import App
    from plugins.web.state import WebState

log = logging.getLogger(__name__)


class Template:
    """``{{name}}`` placeholders filled with HTML-escaped values (``{{{name}}}``: trusted HTML)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def render(self, values: dict[str, str], trusted: dict[str, str] | None = None) -> str:
        out = self.text
        for name, value in (trusted or {}).items():
            out = out.replace("{{{" + name + "}}}", value)
        for name, value in values.items():
            out = out.replace("{{" + name + "}}", html.escape(value, quote=True))
        return out


def fmt_rate(rate: float | None) -> str:
    return "–" if rate is None else f"{rate * 100:.0f}%"


#: Chart geometry (SVG user units). Narrow on purpose: the SVG scales to the card's width, so
#: a 420-unit chart keeps 16-unit labels at ≥ 12 CSS px on a 360 px phone; the label sits above
#: its bar rather than beside it, so long version names do not squeeze the bars.
CHART_W, CHART_PAD, LABEL_H, BAR_H, ROW_GAP = 420, 8, 22, 26, 14


def stats_svg(rows: list[dict[str, Any]], lang: str) -> str:
    """An accessible bar chart of like rate per model version, as inline SVG (phone first)."""
    texts = PAGE_TEXTS[lang]
    bar_w = CHART_W - 2 * CHART_PAD
    row_h = LABEL_H + BAR_H + ROW_GAP
    top = CHART_PAD + 22  # the 0–100 % scale
    height = top + max(1, len(rows)) * row_h
    esc = html.escape
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" '
        f'viewBox="0 0 {CHART_W} {height}" width="100%" aria-labelledby="chart-title">',
        f'<title id="chart-title">{esc(texts["chart_label"])}</title>',
    ]
    x0 = CHART_PAD
    for pct in (0, 25, 50, 75, 100):  # gridlines and the scale
        x = x0 + bar_w * pct / 100
        anchor = "start" if pct == 0 else ("end" if pct == 100 else "middle")
        parts.append(
            f'<line x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{height - ROW_GAP / 2:.1f}" '
            f'class="grid" stroke="#d0d4da" stroke-width="1"/>'
            f'<text class="muted" x="{x:.1f}" y="{top - 10}" font-size="14" '
            f'text-anchor="{anchor}" fill="#5b6470">{pct}%</text>'
        )
    for i, row in enumerate(rows):
        y = top + i * row_h
        version = str(row["model_version"])
        label = version if len(version) <= 36 else version[:35] + "…"
        rate = row["like_rate"]
        votes = row["up"] + row["down"]
        parts.append(
            f'<text class="label" x="{x0}" y="{y + 16}" font-size="16" font-weight="600" '
            f'fill="#1d232b"><title>{esc(version)}</title>{esc(label)}</text>'
        )
        bar_y = y + LABEL_H
        if rate is None:
            parts.append(
                f'<rect class="empty" x="{x0}" y="{bar_y}" width="{bar_w}" height="{BAR_H}" '
                f'fill="#eef0f3" rx="4"/><text class="muted" x="{x0 + 8}" '
                f'y="{bar_y + BAR_H * 0.7:.1f}" font-size="15" fill="#5b6470">'
                f"{esc(texts['no_votes'])} · "
                f"{esc(counted('jokes', row['jokes'], lang))}</text>"
            )
            continue
        w = max(3.0, bar_w * rate)
        tip = f"{version}: {fmt_rate(rate)} ({row['up']} 👍 / {row['down']} 👎)"
        value = f"{fmt_rate(rate)} · {counted('votes', votes, lang)}"
        inside = w > bar_w * 0.55  # the value goes inside a long bar, after a short one
        tx = x0 + w - 8 if inside else x0 + w + 8
        parts.append(
            f'<rect class="bar" x="{x0}" y="{bar_y}" width="{w:.1f}" height="{BAR_H}" '
            f'fill="#2f7d4f" rx="4"><title>{esc(tip)}</title></rect>'
            f'<text class="value{" inside" if inside else ""}" x="{tx:.1f}" '
            f'y="{bar_y + BAR_H * 0.7:.1f}" font-size="15" font-weight="600" '
            f'text-anchor="{"end" if inside else "start"}" '
            f'fill="{"#ffffff" if inside else "#1d232b"}">{esc(value)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def stats_table(rows: list[dict[str, Any]], texts: dict[str, str]) -> str:
    """The per-version table body; each cell names its column (``data-label``) so that on a
    phone the rows can wrap into small cards (style.css) instead of scrolling sideways."""
    if not rows:
        return f'<tr><td colspan="5">{html.escape(texts["no_jokes"])}</td></tr>'
    labels = [html.escape(texts[k], quote=True) for k in ("version", "jokes", "up", "down")]
    labels.append(html.escape(texts["like_rate"], quote=True))
    out = []
    for row in rows:
        cells = (
            html.escape(str(row["model_version"])),
            str(row["jokes"]),
            str(row["up"]),
            str(row["down"]),
            fmt_rate(row["like_rate"]),
        )
        out.append(
            "<tr>"
            + "".join(
                f'<td data-label="{label}">{cell}</td>'
                for label, cell in zip(labels, cells, strict=True)
            )
            + "</tr>"
        )
    return "".join(out)


async def stats_rows(app: App) -> list[dict[str, Any]]:
    """Per model version: jokes, votes, like rate (the store's aggregate is the one source)."""
    return [
        {
            "model_version": s.model_version,
            "jokes": s.jokes,
            "up": s.up,
            "down": s.down,
            "rated": s.rated,
            "like_rate": s.like_rate,
        }
        for s in await app.service.stats()
    ]


async def plugin_sections(app: App, lang: str) -> str:
    """HTML sections other plugins add to the stats page (``app.state["stats_sections"]``:
    async ``fn(lang) -> html``, escaped by the plugin); a failing one is left out, not fatal."""
    parts = []
    for section in app.state.get("stats_sections", []):
        try:
            parts.append(await section(lang))
        except Exception:
            log.exception("a stats page section failed")
    return "".join(parts)


def add_page_routes(api: FastAPI, app: App, state: WebState) -> None:
    """``GET /`` (the upload page) and ``GET /stats``."""
    settings = app.settings
    identities = state.identities
    max_bytes = settings.images.max_bytes

    @api.get("/", response_class=HTMLResponse)
    async def index(request: Request) -> Response:
        lang = request_language(request, settings)
        who = identities.visitor(request)
        texts = PAGE_TEXTS[lang]
        demo = await state.demo()
        i18n = {
            k: texts[k]
            for k in ("thinking", "model", "vote_saved", "network", "like", "dislike", "submit")
        }
        i18n["too_large"] = message("too_large", lang, limit_mb=limit_mb(max_bytes))
        i18n["no_image"] = web_message("no_image", lang)
        i18n["internal"] = web_message("internal", lang)
        values = {
            **{f"t.{k}": v for k, v in texts.items()},
            "lang": lang,
            "csrf": who.csrf,
            "max_bytes": str(max_bytes),
            "max_hint": str(settings.limits.max_hint_chars),
            "js": state.assets.url("app.js"),
            "css": state.assets.url("style.css"),
            "icon": state.assets.url("icon.svg"),
            "demo_hidden": "" if demo else "hidden",
            "stats_hidden": "" if settings.web.public_stats else "hidden",
        }
        # JSON inside <script type="application/json"> is data, not script (CSP-safe);
        # escaping "<" keeps "</script>" out of it.
        trusted = {"i18n": json.dumps(i18n, ensure_ascii=False).replace("<", "\\u003c")}
        page = state.index.render(values, trusted)
        response = HTMLResponse(page)
        if who.is_new:
            try:
                await state.guard.new_session(state.guard.network(request))
            except RateLimited:
                # The page still shows (monitors, crawlers); no identity is minted for it, so
                # an upload from it meets the same limit with its message.
                response.headers["Cache-Control"] = "no-store"
                return response
        return identities.remember(response, who, settings.web.secure_cookies)

    @api.get("/stats", response_class=HTMLResponse)
    async def stats_page(request: Request) -> Response:
        if not settings.web.public_stats:
            return HTMLResponse("Not found", status_code=404)
        lang = request_language(request, settings)
        texts = PAGE_TEXTS[lang]
        rows = await stats_rows(app)
        table = stats_table(rows, texts)
        values = {
            **{f"t.{k}": v for k, v in texts.items()},
            "lang": lang,
            "css": state.assets.url("style.css"),
            "icon": state.assets.url("icon.svg"),
            "demo_hidden": "" if await state.demo() else "hidden",
        }
        page = state.stats_page.render(
            values,
            {
                "rows": table,
                # no card at all without data (an empty framed box otherwise)
                "chart": (
                    f'<section class="card chart-card">{stats_svg(rows, lang)}</section>'
                    if rows
                    else ""
                ),
                "sections": await plugin_sections(app, lang),
            },
        )
        return HTMLResponse(page, headers={"Cache-Control": "no-store", "Vary": "Accept-Language"})
