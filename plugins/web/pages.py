"""The HTML pages: the upload page and the stats page (chart + per-version table).

Pages are small templates filled with HTML-escaped values. The stats page is a list of sections
(``STATS_SECTIONS``), each an async function returning trusted HTML, so a feature adds its own
section without touching the others.
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
from plugins.web.texts import PAGE_TEXTS, request_language, web_message

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


def stats_svg(rows: list[dict[str, Any]], texts: dict[str, str]) -> str:
    """An accessible horizontal bar chart of like rate per model version, as inline SVG."""
    bar_h, gap, label_w, chart_w, pad = 26, 12, 190, 360, 8
    width = label_w + chart_w + 100
    height = pad * 2 + 20 + max(1, len(rows)) * (bar_h + gap)
    esc = html.escape
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" '
        f'viewBox="0 0 {width} {height}" width="100%" aria-labelledby="chart-title">',
        f'<title id="chart-title">{esc(texts["chart_label"])}</title>',
    ]
    x0 = label_w
    # gridlines at 0, 25, 50, 75, 100 %
    for pct in (0, 25, 50, 75, 100):
        x = x0 + chart_w * pct / 100
        parts.append(
            f'<line x1="{x:.1f}" y1="{pad + 14}" x2="{x:.1f}" y2="{height - pad}" '
            f'class="grid" stroke="#d0d4da" stroke-width="1"/>'
            f'<text class="muted" x="{x:.1f}" y="{pad + 8}" font-size="11" '
            f'text-anchor="middle" fill="#5b6470">{pct}%</text>'
        )
    for i, row in enumerate(rows):
        y = pad + 20 + i * (bar_h + gap)
        version = str(row["model_version"])
        label = version if len(version) <= 22 else version[:21] + "…"
        rate = row["like_rate"]
        parts.append(
            f'<text x="{x0 - 8}" y="{y + bar_h * 0.68:.1f}" font-size="12" text-anchor="end" '
            f'fill="#1d232b"><title>{esc(version)}</title>{esc(label)}</text>'
        )
        if rate is None:
            parts.append(
                f'<rect class="empty" x="{x0}" y="{y}" width="{chart_w}" height="{bar_h}" '
                f'fill="#eef0f3" rx="3"/><text class="muted" x="{x0 + 8}" '
                f'y="{y + bar_h * 0.68:.1f}" font-size="12" fill="#5b6470">'
                f"{esc(texts['no_votes'])} · "
                f"{esc(texts['n_jokes'].format(n=row['jokes']))}</text>"
            )
            continue
        w = max(2.0, chart_w * rate)
        tip = f"{version}: {fmt_rate(rate)} ({row['up']} 👍 / {row['down']} 👎)"
        parts.append(
            f'<rect class="bar" x="{x0}" y="{y}" width="{w:.1f}" height="{bar_h}" '
            f'fill="#2f7d4f" rx="3"><title>{esc(tip)}</title></rect>'
            f'<text x="{x0 + w + 6:.1f}" y="{y + bar_h * 0.68:.1f}" font-size="12" '
            f'fill="#1d232b">{fmt_rate(rate)} (n={row["up"] + row["down"]})</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


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
        body_rows = []
        for row in rows:
            body_rows.append(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>".format(
                    html.escape(row["model_version"]),
                    row["jokes"],
                    row["up"],
                    row["down"],
                    fmt_rate(row["like_rate"]),
                )
            )
        table = "".join(body_rows) or (
            f'<tr><td colspan="5">{html.escape(texts["no_jokes"])}</td></tr>'
        )
        values = {
            **{f"t.{k}": v for k, v in texts.items()},
            "lang": lang,
            "css": state.assets.url("style.css"),
            "icon": state.assets.url("icon.svg"),
        }
        page = state.stats_page.render(
            values,
            {
                "rows": table,
                "chart": stats_svg(rows, texts) if rows else "",
                "sections": await plugin_sections(app, lang),
            },
        )
        return HTMLResponse(page, headers={"Cache-Control": "no-store", "Vary": "Accept-Language"})
