"""The web channel's own texts (the core's MESSAGES cover the rest) and language negotiation."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bot.models import Forms, message
from bot.models import counted as counted_forms

if TYPE_CHECKING:
    from fastapi import Request

    from bot.settings import Settings

# Texts that belong to this channel rather than to the core (the core's MESSAGES cover the rest).
WEB_MESSAGES: dict[str, dict[str, str]] = {
    "no_image": {"en": "Choose a picture first.", "zh": "请先选择一张图片。"},
    "bad_form": {
        "en": "The upload could not be read; please try again.",
        "zh": "上传的内容无法读取，请重试。",
    },
    "bad_request": {"en": "That request is not valid.", "zh": "请求无效。"},
    "unsupported_media_type": {
        "en": "Send the picture as multipart/form-data (field 'image').",
        "zh": "请用 multipart/form-data 上传图片（字段 image）。",
    },
    "json_required": {"en": "Send the vote as JSON.", "zh": "请用 JSON 提交投票。"},
    "csrf": {
        "en": "This page is out of date; reload it and try again.",
        "zh": "页面已过期，请刷新后重试。",
    },
    "cross_site": {
        "en": "Requests from other sites are not accepted.",
        "zh": "不接受来自其他网站的请求。",
    },
    "upload_timeout": {
        "en": "The upload took too long; please try again.",
        "zh": "上传超时，请重试。",
    },
    "rejected": {"en": "That request was refused.", "zh": "请求被拒绝了。"},
    "internal": {
        "en": "Something went wrong on our side; please try again.",
        "zh": "服务器出了点问题，请重试。",
    },
    "not_found": {"en": "Nothing here.", "zh": "这里什么都没有。"},
    "rate_network": {
        "en": "Many requests are coming from your network — try again in {seconds} s.",
        "zh": "你所在的网络请求太多了，请 {seconds} 秒后再试。",
    },
    "rate_sessions": {
        "en": "Too many new visitors from your network — try again in {seconds} s.",
        "zh": "你所在的网络新访客太多了，请 {seconds} 秒后再试。",
    },
    "untrusted_host": {"en": "Unknown host.", "zh": "未知的主机名。"},
    "metrics_auth": {"en": "A metrics token is required.", "zh": "需要监控令牌。"},
}

# Page texts, filled into the static HTML templates (always HTML-escaped).
PAGE_TEXTS: dict[str, dict[str, str]] = {
    "en": {
        "title": "oogiri — a joke for your picture",
        "heading": "A joke for your picture",
        "tagline": "Pick, drop or paste a picture and get a joke about it.",
        "pick": "Choose a picture",
        "drop": "or drop / paste it here",
        "hint_label": "Nudge (optional)",
        "hint_placeholder": "e.g. Monday morning",
        "submit": "Tell me a joke",
        "thinking": "Thinking of something funny…",
        "model": "model",
        "like": "Funny",
        "dislike": "Not funny",
        "vote_saved": "Thanks — your vote is saved. You can change it.",
        "network": "The server could not be reached; check the connection and try again.",
        "another": "Another picture",
        "stats": "Stats",
        "demo": (
            "Demo mode: this server runs the tiny built-in test model, so the jokes are random "
            "noise. Configure a real model with OOGIRI_ENGINE__MODEL."
        ),
        "stats_title": "oogiri — stats per model version",
        "stats_heading": "How funny is each model version?",
        "version": "Model version",
        "jokes": "Jokes",
        "up": "👍",
        "down": "👎",
        "like_rate": "Like rate",
        "no_votes": "no votes yet",
        "no_jokes": "No jokes yet.",
        "back": "Back to the upload page",
        "chart_label": "Like rate per model version",
        "demo_mark": "Demo model: this text is random noise, not a joke.",
        "demo_stats": (
            "Demo mode: this server runs the tiny built-in test model; these figures rate "
            "random noise, not jokes."
        ),
    },
    "zh": {
        "title": "oogiri — 给图片讲个梗",
        "heading": "给你的图片讲个梗",
        "tagline": "选择、拖入或粘贴一张图片，看看它有什么梗。",
        "pick": "选择图片",
        "drop": "或把图片拖到/粘贴到这里",
        "hint_label": "提示（可选）",
        "hint_placeholder": "比如：周一早上",
        "submit": "讲个梗",
        "thinking": "正在想梗…",
        "model": "模型",
        "like": "好笑",
        "dislike": "不好笑",
        "vote_saved": "谢谢，已记下你的投票，可以随时改。",
        "network": "连不上服务器，请检查网络后重试。",
        "another": "换一张图",
        "stats": "统计",
        "demo": (
            "演示模式：当前使用的是内置的微型测试模型，讲出来的梗只是随机噪声。"
            "请通过 OOGIRI_ENGINE__MODEL 配置真正的模型。"
        ),
        "stats_title": "oogiri — 各模型版本统计",
        "stats_heading": "每个模型版本有多好笑？",
        "version": "模型版本",
        "jokes": "梗数",
        "up": "👍",
        "down": "👎",
        "like_rate": "好评率",
        "no_votes": "还没有投票",
        "no_jokes": "还没有梗。",
        "back": "返回上传页面",
        "chart_label": "各模型版本的好评率",
        "demo_mark": "演示模型：这段文字是随机噪声，不是笑话。",
        "demo_stats": (
            "演示模式：当前使用的是内置的微型测试模型，这些数字评价的是随机噪声，不是笑话。"
        ),
    },
}

#: Texts with a count ``{n}``: one form per plural category the language has (CLDR): English
#: "one" (exactly 1) and "other"; Chinese has no plural, so only "other".
COUNT_TEXTS: dict[str, Forms] = {
    "jokes": {"en": {"one": "{n} joke", "other": "{n} jokes"}, "zh": {"other": "{n} 个梗"}},
    "votes": {"en": {"one": "{n} vote", "other": "{n} votes"}, "zh": {"other": "{n} 票"}},
}


def counted(key: str, n: int, lang: str) -> str:
    """``n`` with its noun in ``lang``: "1 vote", "2 votes"; "1 票", "2 票"."""
    return counted_forms(COUNT_TEXTS[key], n, lang)


def web_message(key: str, lang: str, **params: Any) -> str:
    table = WEB_MESSAGES.get(key)
    if table is None:
        return message(key, lang, **params)
    text = table.get(lang) or table["en"]
    try:
        return text.format(**params) if params else text
    except (KeyError, IndexError):
        return text


def pick_language(accept_language: str | None, default: str = "zh") -> str:
    """The best of zh/en for an Accept-Language header; ``default`` when neither is wanted."""
    if not accept_language:
        return default
    best: tuple[float, int, str] | None = None
    for index, part in enumerate(accept_language.split(",")):
        piece = part.strip()
        if not piece:
            continue
        tag, _, params = piece.partition(";")
        quality = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        primary = tag.strip().lower().split("-")[0]
        if primary not in ("zh", "en") or quality <= 0:
            continue
        key = (quality, -index, primary)
        if best is None or key > best:
            best = key
    return best[2] if best else default


def request_language(request: Request, settings: Settings) -> str:
    forced = request.query_params.get("lang")
    if forced in ("zh", "en"):
        return forced
    return pick_language(request.headers.get("accept-language"), settings.language)
