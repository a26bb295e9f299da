"""The value types that cross the plugin contract (channels, engines, hooks).

They are plain dataclasses so that a plugin needs nothing but this module to speak to the core.
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image as PILImage


# --------------------------------------------------------------------------- messages

MESSAGES: dict[str, dict[str, str]] = {
    "empty": {"en": "The file is empty.", "zh": "文件是空的。"},
    "too_large": {
        "en": "That file is too big (limit {limit_mb} MB).",
        "zh": "文件太大了（上限 {limit_mb} MB）。",
    },
    "not_image": {
        "en": "That doesn't look like a picture. Send a JPEG, PNG, WebP, GIF, BMP or TIFF.",
        "zh": "这看起来不是图片。请发送 JPEG、PNG、WebP、GIF、BMP 或 TIFF。",
    },
    "unsupported": {
        "en": "That image format isn't supported ({format}).",
        "zh": "不支持这种图片格式（{format}）。",
    },
    "corrupt": {
        "en": "The picture is damaged or incomplete; please send it again.",
        "zh": "图片已损坏或不完整，请重新发送。",
    },
    "too_many_pixels": {
        "en": "That picture is too large ({width}×{height} pixels).",
        "zh": "图片尺寸太大了（{width}×{height} 像素）。",
    },
    "bad_aspect": {
        "en": "That picture is too long and thin ({width}×{height}).",
        "zh": "图片太细长了（{width}×{height}）。",
    },
    "rate_user": {
        "en": "Slow down a little — try again in {seconds} s.",
        "zh": "慢一点～请 {seconds} 秒后再试。",
    },
    "rate_chat": {
        "en": "This chat is asking a lot — try again in {seconds} s.",
        "zh": "这个群太热闹了，请 {seconds} 秒后再试。",
    },
    "busy": {
        "en": "I'm busy thinking up jokes for others; try again in a moment.",
        "zh": "正忙着给别人讲笑话，请稍后再试。",
    },
    "engine_error": {
        "en": "The joke engine is not answering right now; try again later.",
        "zh": "笑话引擎暂时没有响应，请稍后再试。",
    },
    "hint_too_long": {
        "en": "The hint is too long (at most {limit}).",  # {limit}: "1 character", "200 characters"
        "zh": "提示太长了（最多 {limit}）。",
    },
    "no_such_joke": {"en": "That joke no longer exists.", "zh": "这个笑话不存在了。"},
    "unavailable": {
        "en": "I can't save anything right now; please try again in a minute.",
        "zh": "暂时无法保存，请稍后再试。",
    },
    "bad_vote": {"en": "A vote is 👍 or 👎.", "zh": "只能投 👍 或 👎。"},
    # moderation (bot/moderation.py); chat channels answer these with silence
    "blocked": {"en": "This bot is not available to you.", "zh": "这个机器人不对你开放。"},
    "not_allowed": {"en": "This bot is not available to you.", "zh": "这个机器人不对你开放。"},
}


# A number with its noun, by language: {"one": …, "other": …} in English; Chinese has one form.
Forms = dict[str, dict[str, str]]
CHARACTERS: Forms = {
    "en": {"one": "{n} character", "other": "{n} characters"},
    "zh": {"other": "{n} 个字"},
}
# Message parameters that are counts of a noun: key -> {parameter: the noun's forms}.
COUNTED_PARAMS: dict[str, dict[str, Forms]] = {"hint_too_long": {"limit": CHARACTERS}}


def counted(forms: Forms, n: int, lang: str = "en") -> str:
    """``n`` with its noun in ``lang``: "1 character", "2 characters", "0 characters"; "1 个字"."""
    by_count = forms.get(lang) or forms["en"]
    return by_count.get("one" if n == 1 else "other", by_count["other"]).format(n=n)


def message(key: str, lang: str = "en", **params: Any) -> str:
    table = MESSAGES.get(key) or {"en": key, "zh": key}
    text = table.get(lang) or table["en"]
    for name, forms in COUNTED_PARAMS.get(key, {}).items():
        if isinstance(params.get(name), int):
            params[name] = counted(forms, params[name], lang)
    try:
        return text.format(**params)
    except (KeyError, IndexError):
        return text


class OogiriError(Exception):
    """Base of every rejection a user may see. ``user_message(lang)`` is safe to show."""

    code = "error"

    def __init__(self, key: str | None = None, detail: str = "", **params: Any) -> None:
        self.key = key or self.code
        self.params = params
        self.detail = detail
        super().__init__(detail or message(self.key, "en", **params))

    def user_message(self, lang: str = "en") -> str:
        return message(self.key, lang, **self.params)


class ImageRejected(OogiriError):
    code = "image_rejected"


class Rejected(OogiriError):
    """Raised by ``oogiri_before_joke`` implementations (quotas, allow-lists, moderation)."""

    code = "rejected"

    def __init__(self, reason: str = "", key: str | None = None, **params: Any) -> None:
        super().__init__(key or "rejected", detail=reason, **params)
        self.reason = reason

    def user_message(self, lang: str = "en") -> str:
        if self.key == "rejected":
            return self.reason or message("busy", lang)
        return super().user_message(lang)


class RateLimited(OogiriError):
    code = "rate_limited"


class EngineBusy(OogiriError):
    code = "busy"


class EngineError(OogiriError):
    code = "engine_error"


class NotFound(OogiriError):
    code = "no_such_joke"


class StoreUnavailable(OogiriError):
    """The database (or the image disk) cannot be reached or written right now: try again later.

    Nothing was stored by the operation that raised it (or, for a commit whose answer was lost,
    all of it was: every write is one transaction and idempotent on retry).
    """

    code = "unavailable"


# --------------------------------------------------------------------------- images


@dataclass(frozen=True, slots=True)
class NormalizedImage:
    """What the model sees: RGB JPEG bytes, content-addressed by sha256."""

    jpeg: bytes
    sha256: str
    width: int
    height: int
    source_format: str

    @classmethod
    def of(cls, jpeg: bytes, width: int, height: int, source_format: str) -> NormalizedImage:
        """The image for these JPEG bytes; its address is always their sha256."""
        return cls(jpeg, hashlib.sha256(jpeg).hexdigest(), width, height, source_format)

    def to_pil(self) -> PILImage.Image:
        from PIL import Image

        img = Image.open(io.BytesIO(self.jpeg))
        img.load()
        return img.convert("RGB")


# --------------------------------------------------------------------------- requests


# C0 control characters other than tab and line breaks, and DEL: PostgreSQL cannot store NUL in
# text, and no chat shows them. U+FFFD is what a decoder leaves of a token that was only part of a
# UTF-8 character: shown it is garbage, and stored it becomes training data that teaches the next
# model to break characters (the learning loop's models did, docs/learning-loop.md).
_UNSHOWABLE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffd]")


def showable(text: str) -> str:
    """``text`` without what can be neither stored nor shown (the one rule for jokes and hints)."""
    return _UNSHOWABLE.sub("", text)


@dataclass(slots=True)
class JokeRequest:
    """One ask from a channel. ``user_id``/``chat_id`` are namespaced by the channel."""

    image_bytes: bytes
    channel: str
    user_id: str
    chat_id: str | None = None
    hint: str | None = None
    language: str = "zh"
    filename: str | None = None
    content_type: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    #: an outbox row for the reply that will carry the joke (``bot.outbox.Outbox.delivery``),
    #: stored in the joke's own transaction: a crash between storing and sending loses nothing
    delivery: dict[str, Any] | None = None
    #: set by ``JokeService.admit``: rate limits and moderation were checked before the download
    admitted: bool = False
    # filled by the service as the request moves along
    image: NormalizedImage | None = None
    prompt: str | None = None


@dataclass(frozen=True, slots=True)
class GenerationParams:
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_p: float = 0.9
    max_dynamic_patch: int = 6
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Generation:
    text: str
    model: str
    usage: Usage = Usage()
    latency_s: float = 0.0


@dataclass(slots=True)
class Joke:
    id: int
    text: str
    model_version: str
    engine: str
    image_sha256: str
    channel: str
    user_id: str
    chat_id: str | None = None
    prompt: str = ""
    latency_ms: int = 0
    up: int = 0
    down: int = 0
    created_at: datetime | None = None
    public_id: str | None = None  # what public APIs show instead of the sequential id


@dataclass(frozen=True, slots=True)
class Rating:
    joke_id: int
    user_id: str
    value: int  # +1 or -1
    previous: int | None  # the user's earlier vote on this joke, if any
    up: int
    down: int
    channel: str = ""

    @property
    def changed(self) -> bool:
        return self.previous is not None and self.previous != self.value
