"""The Telegram channel (python-telegram-bot v22): send a picture, get a joke, rate it.

Private chats: every photo, image file or still sticker gets a joke as a reply, with 👍/👎 buttons.
Groups: the bot speaks only when asked — a mention in a picture's caption, /joke (or a mention) in a
reply to a picture, or a picture sent in reply to the bot. Polling by default; webhook mode (behind
any number of replicas) through the web channel's server or, without one, a small server of its own.

Everything goes through ``JokeService``; this module only translates Telegram ⇄ oogiri.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from fastapi import Request, Response
from pydantic import Field, SecretStr

from bot.images import accepted_type
from bot.logs import RedactingFilter
from bot.models import JokeRequest, NotFound, OogiriError, RateLimited, Rejected, showable
from bot.models import message as core_message
from bot.moderation import moderation_for
from bot.moderation_settings import check_subject
from bot.outbox import Outbox, OutboxItem, OutboxWorker, RetryLater, Undeliverable
from oogiri import PluginSettings, hookimpl
from plugins.telegram_texts import counted, text

try:  # the ``telegram`` extra; without it the plugin loads but its channel refuses to start
    from telegram import (
        BotCommand,
        InlineKeyboardButton,
        InlineKeyboardMarkup,
        Message,
        ReplyParameters,
        Update,
    )
    from telegram.constants import ChatAction, ChatType, MessageEntityType, MessageLimit
    from telegram.error import (
        BadRequest,
        ChatMigrated,
        Forbidden,
        InvalidToken,
        RetryAfter,
        TelegramError,
    )
    from telegram.ext import (
        Application,
        ApplicationBuilder,
        CallbackQueryHandler,
        CommandHandler,
        ContextTypes,
        MessageHandler,
        filters,
    )

    from plugins.telegram_flow import ChatFlowLimiter, retry_seconds
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    _PTB_MISSING: ImportError | None = exc
else:
    _PTB_MISSING = None

if TYPE_CHECKING:
    from telegram import Bot, Update, User

    from bot.app import App
    from bot.settings import Settings

log = logging.getLogger(__name__)

CHANNEL = "telegram"
STATE_KEY = "telegram"  # app.state[STATE_KEY] is the running TelegramChannel
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
ALLOWED_UPDATES = ("message", "callback_query")
BOT_API_DOWNLOAD_LIMIT = 20 * 1024 * 1024  # getFile refuses bigger files on the public Bot API
POLL_TIMEOUT_S = 10  # long-poll duration of getUpdates
TYPING_EVERY_S = 4.5  # Telegram shows "typing…" for 5 s per chat action
CONCURRENT_UPDATES = 256  # handlers in flight; the service's own semaphore bounds engine calls
SHOWN_MAX = 50_000  # vote keyboards whose shown counts are remembered (no-op edits skipped)
MAX_WEBHOOK_BODY = 1 << 20
VOTE_RE = re.compile(r"v:([1-9][0-9]{0,17}):([+-]1)")
SECRET_RE = re.compile(r"[A-Za-z0-9_-]{1,256}")
SENSITIVE_LOGGERS = ("httpx", "httpcore")  # they print request URLs, which hold the token
# What ``/delete`` did with a removed joke's message, and the admin's answer for it.
DeleteOutcome = Literal["deleted", "kept", "upgraded", "unsent"]
DELETE_REPLIES: dict[DeleteOutcome, str] = {
    "deleted": "joke_deleted",
    "kept": "joke_deleted_kept",  # Telegram refused (older than 48 h, gone, no right)
    "upgraded": "joke_deleted_upgraded",  # in a group since upgraded to a supergroup
    "unsent": "joke_deleted_unsent",  # never delivered: no message anywhere
}


class TelegramSettings(PluginSettings):
    """``settings.telegram`` (OOGIRI_TELEGRAM__…): token, polling or webhook, flow control."""

    token: SecretStr | None = None
    mode: Literal["polling", "webhook"] = "polling"
    webhook_url: str | None = None
    webhook_secret: SecretStr | None = None
    webhook_path: str = "/telegram/webhook"
    admin_ids: list[int] = Field(default_factory=list)
    language: Literal["auto", "zh", "en"] = "auto"
    base_url: str | None = Field(
        default=None, description="Bot API base URL (tests, local Bot API server)"
    )
    base_file_url: str | None = None
    # flow control and the outbox (docs/telegram.md)
    private_per_s: float = Field(
        default=1.0, gt=0, description="messages a second into one private chat"
    )
    group_per_minute: float = Field(
        default=20.0, gt=0, description="messages a minute into one group"
    )
    global_per_s: float = Field(
        default=30.0, gt=0, description="messages a second in all, every chat"
    )
    flood_retries: int = Field(
        default=2,
        ge=0,
        le=10,
        description="429 answers waited out in a send before the outbox takes it",
    )
    outbox_max_age_s: float = Field(
        default=6 * 3600.0,
        gt=0,
        description="an undelivered reply is given up (counted, logged) after",
    )
    outbox_lease_s: float = Field(
        default=60.0,
        gt=0,
        description="a replica's claim on a reply; a killed one's lapses after this",
    )
    outbox_poll_s: float = Field(
        default=1.0, gt=0, description="how often pending replies are retried"
    )
    slow_down_notice_s: float = Field(
        default=60.0, ge=0, description="at most one 'slow down' notice per user in this window"
    )
    edit_window_s: float = Field(
        default=1.0,
        ge=0,
        description="vote-count edits of one message are coalesced within this window",
    )


# --------------------------------------------------------------------------- small pure helpers


def vote_data(joke_id: int, value: int) -> str:
    """Callback data of a vote button: ``v:<joke id>:<+1|-1>`` (well under Telegram's 64 bytes)."""
    return f"v:{joke_id}:{'+1' if value > 0 else '-1'}"


def parse_vote(data: str | None) -> tuple[int, int] | None:
    """``(joke_id, +1|-1)`` from callback data, or None for anything that is not a vote button."""
    if not data or len(data) > 64:
        return None
    match = VOTE_RE.fullmatch(data)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2))


def vote_keyboard(joke_id: int, up: int = 0, down: int = 0) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup(
        [
            [
                InlineKeyboardButton(f"👍 {up}", callback_data=vote_data(joke_id, 1)),
                InlineKeyboardButton(f"👎 {down}", callback_data=vote_data(joke_id, -1)),
            ]
        ]
    )


def bot_token(settings: Settings) -> str:
    token = settings.telegram.token
    value = token.get_secret_value().strip() if token is not None else ""
    if not value:
        raise RuntimeError(
            "the telegram channel needs a bot token: set OOGIRI_TELEGRAM__TOKEN "
            "(BotFather gives it; see docs/telegram.md)"
        )
    return value


def webhook_secret(settings: Settings) -> str:
    """The ``secret_token`` Telegram sends with every webhook call.

    Configured, or derived from the bot token so that every replica agrees without extra config.
    """
    configured = settings.telegram.webhook_secret
    if configured is not None and configured.get_secret_value():
        secret = configured.get_secret_value()
        if not SECRET_RE.fullmatch(secret):
            raise RuntimeError(
                "telegram.webhook_secret must be 1-256 characters of A-Z, a-z, 0-9, _ and -"
            )
        return secret
    digest = hashlib.sha256(b"oogiri telegram webhook\0" + bot_token(settings).encode())
    return digest.hexdigest()


def webhook_target(settings: Settings) -> str:
    """The public URL Telegram posts to: ``webhook_url``, plus ``webhook_path`` if it has none."""
    url = (settings.telegram.webhook_url or "").strip()
    if not url:
        raise RuntimeError(
            "telegram webhook mode needs OOGIRI_TELEGRAM__WEBHOOK_URL (public https)"
        )
    if urlsplit(url).path in ("", "/"):
        url = url.rstrip("/") + "/" + settings.telegram.webhook_path.lstrip("/")
    return url


def file_base_url(settings: Settings) -> str | None:
    """``base_file_url``, or one derived from a ``base_url`` ending in ``/bot`` (local servers)."""
    tg = settings.telegram
    if tg.base_file_url:
        return tg.base_file_url
    if tg.base_url:
        base = tg.base_url.rstrip("/")
        for tail in ("/bot{token}", "/bot"):
            if base.endswith(tail):
                return base[: -len(tail)] + "/file" + tail
    return None


def pick_language(settings: Settings, language_code: str | None) -> str:
    """zh or en: forced by ``telegram.language``, else from the user's Telegram language."""
    forced = settings.telegram.language
    if forced != "auto":
        return forced
    if language_code:
        return "zh" if language_code.lower().startswith("zh") else "en"
    return settings.language


def clean_hint(value: str | None, username: str | None) -> str | None:
    """A caption or command text without the bot's mention and the /joke command."""
    if not value:
        return None
    hint = value
    if username:
        hint = re.sub(rf"(?i)@{re.escape(username)}\b", " ", hint)
        hint = re.sub(rf"(?i)^\s*/joke(@{re.escape(username)})?(?=\s|$)", " ", hint)
    else:
        hint = re.sub(r"(?i)^\s*/joke(?=\s|$)", " ", hint)
    hint = " ".join(hint.split())
    return hint or None


@dataclass(frozen=True, slots=True)
class Picture:
    """A Telegram file that should be an image, and what Telegram told us about it."""

    file_id: str
    file_size: int | None
    filename: str | None
    content_type: str | None


def find_picture(message: Message, limit: int) -> tuple[Picture | None, bool]:
    """``(picture, unsupported)``: a message's image, or whether it held media we can't read."""
    if message.photo:
        sizes = sorted(message.photo, key=lambda p: p.width * p.height)
        fitting = [p for p in sizes if not p.file_size or p.file_size <= limit]
        best = (fitting or sizes)[-1]
        return Picture(best.file_id, best.file_size, "photo.jpg", "image/jpeg"), False
    if message.sticker:
        sticker = message.sticker
        if sticker.is_animated or sticker.is_video:
            return None, True
        return Picture(sticker.file_id, sticker.file_size, "sticker.webp", "image/webp"), False
    if message.animation:  # GIFs arrive as MP4 animations (with ``document`` set too)
        anim = message.animation
        if accepted_type(anim.mime_type, None):
            return Picture(anim.file_id, anim.file_size, anim.file_name, anim.mime_type), False
        return None, True
    if message.document:
        doc = message.document
        # the core's list of accepted types: an image/heic file is refused here, before a download
        if accepted_type(doc.mime_type, doc.file_name):
            return Picture(doc.file_id, doc.file_size, doc.file_name, doc.mime_type), False
        return None, True
    if (
        message.video
        or message.video_note
        or message.voice
        or message.audio
        or message.paid_media
        or message.story
    ):
        return None, True
    return None, False


def _mentions(message: Message, bot: Bot) -> bool:
    username = (bot.username or "").lower()
    kinds: list[str | None] = [MessageEntityType.MENTION, MessageEntityType.TEXT_MENTION]
    found = {**message.parse_entities(kinds), **message.parse_caption_entities(kinds)}
    for entity, value in found.items():
        if (
            entity.type == MessageEntityType.MENTION
            and username
            and value.lower() == f"@{username}"
        ):
            return True
        if (
            entity.type == MessageEntityType.TEXT_MENTION
            and entity.user
            and entity.user.id == bot.id
        ):
            return True
    return False


def _caption_command(message: Message, bot: Bot, command: str = "joke") -> bool:
    """A caption that starts with ``/joke`` or ``/joke@this_bot`` (not ``/joke@other_bot``)."""
    entities = message.parse_caption_entities([MessageEntityType.BOT_COMMAND])
    for entity, value in entities.items():
        if entity.offset != 0:
            continue
        name, _, target = value[1:].partition("@")
        if name.lower() == command and (
            not target or target.lower() == (bot.username or "").lower()
        ):
            return True
    return False


def _is_reply_to_me(message: Message, bot: Bot) -> bool:
    original = message.reply_to_message
    return bool(original and original.from_user and original.from_user.id == bot.id)


def _sender_id(message: Message) -> int:
    """Who asked: the chat a message was sent *as* (anonymous admins, "send as channel": Telegram
    puts a placeholder bot in ``from``), else the user."""
    sender = message.sender_chat or message.from_user
    return sender.id if sender is not None else message.chat.id


def _from_a_bot(message: Message) -> bool:
    """A real bot's message (ignored). A ``sender_chat`` post is a person behind a placeholder
    bot (GroupAnonymousBot, Channel_Bot), so it is not one."""
    return message.sender_chat is None and bool(message.from_user and message.from_user.is_bot)


def _quiet_sensitive_logs(token: str) -> None:
    """Keep the token (part of every Bot API URL) out of logs, whatever the log level."""
    redactor = RedactingFilter([token])
    for name in SENSITIVE_LOGGERS:
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < logging.WARNING:
            logger.setLevel(logging.WARNING)  # httpx logs every request URL at INFO
    names = [n for n in list(logging.Logger.manager.loggerDict) if n.split(".")[0] in ("telegram",)]
    for name in [*SENSITIVE_LOGGERS, "telegram", *names]:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) and token in f.secrets for f in logger.filters):
            logger.addFilter(redactor)


# --------------------------------------------------------------------------- webhook


class NotRunning(RuntimeError):
    """The channel is starting or stopping; the webhook answers 503 and Telegram retries."""


async def ensure_webhook(
    bot: Bot, settings: Settings, *, force: bool = False, **extra: Any
) -> bool:
    """Point Telegram at our webhook, only when it isn't already (idempotent, replica-safe).

    Never drops pending updates and never deletes a webhook, so replicas starting or stopping in
    any order cannot lose updates. It is re-sent when Telegram reports that our endpoint answered
    403 (a changed secret), or always with ``force`` (``oogiri telegram set-webhook``).
    """
    url = webhook_target(settings)
    if not force:
        info = await bot.get_webhook_info()
        rejected = "403" in (info.last_error_message or "")  # e.g. the secret was changed
        if (
            info.url == url
            and set(info.allowed_updates or ()) == set(ALLOWED_UPDATES)
            and not rejected
        ):
            log.info("telegram webhook already set")
            return False
    await bot.set_webhook(
        url=url,
        secret_token=webhook_secret(settings),
        allowed_updates=list(ALLOWED_UPDATES),
        **extra,
    )
    log.info("telegram webhook set to %s", url)
    return True


def mount_webhook(router: Any, app: App) -> None:
    """Add ``POST telegram.webhook_path`` to a FastAPI router; updates go to the running channel."""
    settings = app.settings
    secret = webhook_secret(settings).encode()

    async def telegram_webhook(request: Request) -> Response:
        given = request.headers.get(SECRET_HEADER, "").encode()
        if not hmac.compare_digest(given, secret):
            return Response(status_code=403)
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_WEBHOOK_BODY):
            return Response(status_code=413)
        body = await request.body()
        if len(body) > MAX_WEBHOOK_BODY:
            return Response(status_code=413)
        channel = app.state.get(STATE_KEY)
        if not isinstance(channel, TelegramChannel):
            return Response(status_code=503)
        try:
            channel.feed(body)
        except NotRunning:
            # Starting or stopping: Telegram delivers it again later, so nothing is lost.
            return Response(status_code=503)
        except ValueError:
            return Response(status_code=400)
        return Response(status_code=200)

    router.add_api_route(
        settings.telegram.webhook_path,
        telegram_webhook,
        methods=["POST"],
        include_in_schema=False,
        name="telegram_webhook",
    )


class _WebhookServer:
    """A minimal uvicorn server for the webhook route when the web channel isn't running."""

    def __init__(self, app: App) -> None:
        import uvicorn
        from fastapi import APIRouter, FastAPI

        api = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
        router = APIRouter()
        mount_webhook(router, app)
        api.include_router(router)
        web = app.settings.web
        config = uvicorn.Config(
            api,
            host=web.host,
            port=web.port,
            log_level="warning",
            access_log=False,
            lifespan="off",
        )

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):  # the App owns SIGINT/SIGTERM
                yield

        self.server = Server(config)
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            if self.task.done():
                self.task.result()
                raise RuntimeError("the telegram webhook server did not start")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        if self.task is None:
            return
        self.server.should_exit = True
        try:
            await asyncio.wait_for(self.task, timeout=10)
        except TimeoutError:
            self.task.cancel()


# --------------------------------------------------------------------------- the channel


class TelegramChannel:
    name = CHANNEL

    def __init__(self, app: App) -> None:
        if _PTB_MISSING is not None:
            raise RuntimeError(
                "the telegram channel needs python-telegram-bot: pip install 'oogiri[telegram]'"
            ) from _PTB_MISSING
        self.app = app
        self.settings = app.settings
        self.application: Application | None = None
        self.running = False
        self._server: _WebhookServer | None = None
        tg = self.settings.telegram
        self.outbox = Outbox(
            app.store,
            CHANNEL,
            lease_s=tg.outbox_lease_s,
            max_age_s=tg.outbox_max_age_s,
            metrics=app.metrics,
        )
        self.worker = OutboxWorker(self.outbox, self._deliver, poll_s=tg.outbox_poll_s)
        self.flow: ChatFlowLimiter | None = None
        # vote keyboards: the counts a message shows, the last edit, the pending refresh
        self._shown: OrderedDict[tuple[int, int], tuple[int, int]] = OrderedDict()
        self._last_edit: dict[tuple[int, int], float] = {}
        self._refreshing: dict[tuple[int, int], bool] = {}  # message → "counts changed again"
        self._tasks: set[asyncio.Task[None]] = set()
        self._moved: dict[int, int] = {}  # groups upgraded to supergroups: old id → new id

    # ------------------------------------------------------------------ lifecycle

    def build_application(self) -> Application:
        tg = self.settings.telegram
        token = bot_token(self.settings)
        self.flow = ChatFlowLimiter(
            private_per_s=tg.private_per_s,
            group_per_minute=tg.group_per_minute,
            global_per_s=tg.global_per_s,
            max_retries=tg.flood_retries,
        )
        builder = (
            ApplicationBuilder()
            .token(token)
            .rate_limiter(self.flow)
            .concurrent_updates(CONCURRENT_UPDATES)
            .pool_timeout(30.0)  # under load, wait for a pooled connection rather than fail
            .get_updates_pool_timeout(30.0)
        )
        if tg.base_url:
            builder = builder.base_url(tg.base_url)
        files = file_base_url(self.settings)
        if files:
            builder = builder.base_file_url(files)
        if tg.mode == "webhook":
            builder = builder.updater(None)
        application = builder.build()
        message_only = filters.UpdateType.MESSAGE
        application.add_handler(CommandHandler(("start", "help"), self.on_help, message_only))
        application.add_handler(CommandHandler("privacy", self.on_privacy, message_only))
        application.add_handler(CommandHandler("stats", self.on_stats, message_only))
        application.add_handler(CommandHandler("joke", self.on_joke_command, message_only))
        application.add_handler(CommandHandler("block", self.on_block, message_only))
        application.add_handler(CommandHandler("unblock", self.on_unblock, message_only))
        application.add_handler(CommandHandler("delete", self.on_delete, message_only))
        application.add_handler(
            MessageHandler(message_only & filters.StatusUpdate.MIGRATE, self.on_migrate)
        )
        application.add_handler(
            MessageHandler(message_only & filters.COMMAND & filters.ChatType.PRIVATE, self.on_help)
        )
        application.add_handler(MessageHandler(message_only & ~filters.COMMAND, self.on_message))
        application.add_handler(CallbackQueryHandler(self.on_callback))
        application.add_error_handler(self.on_error)
        return application

    async def start(self) -> None:
        tg = self.settings.telegram
        token = bot_token(self.settings)
        if tg.mode == "webhook":
            webhook_target(self.settings)  # fail early on a missing URL or a bad secret
            webhook_secret(self.settings)
        _quiet_sensitive_logs(token)
        application = self.build_application()
        self.application = application
        try:
            try:
                await application.initialize()  # getMe: checks the token
            except InvalidToken:
                # PTB's message quotes the token; this one doesn't (and hides PTB's).
                raise RuntimeError(
                    "Telegram rejected the bot token: check OOGIRI_TELEGRAM__TOKEN"
                ) from None
            await self._set_commands(application.bot)
            await application.start()
            self.worker.start()  # replies left pending (by a failed send or a killed replica)
            self.app.state[STATE_KEY] = self
            if tg.mode == "polling":
                assert application.updater is not None
                await application.updater.start_polling(
                    timeout=POLL_TIMEOUT_S,
                    allowed_updates=list(ALLOWED_UPDATES),
                    drop_pending_updates=False,
                    bootstrap_retries=3,
                )
            else:
                if "web" not in self.settings.channels:
                    self._server = _WebhookServer(self.app)
                    await self._server.start()
                self.running = True  # accept updates before Telegram is told where we are
                await ensure_webhook(application.bot, self.settings)
            self.running = True
        except BaseException:
            await self.stop()
            raise
        log.info("telegram bot @%s running (%s)", application.bot.username or "?", tg.mode)

    async def stop(self) -> None:
        self.running = False  # webhook calls now get 503 and are retried by Telegram
        application, self.application = self.application, None
        if self._server is not None:
            await self._server.stop()
            self._server = None
        if application is not None:
            with contextlib.suppress(Exception):
                if application.updater is not None and application.updater.running:
                    await application.updater.stop()
            if application.running:
                await application.stop()  # handles what is already queued
            await self.worker.stop()  # what is still pending stays in the outbox for later
            await application.shutdown()
        else:
            await self.worker.stop()
        if self.app.state.get(STATE_KEY) is self:
            self.app.state.pop(STATE_KEY, None)

    def feed(self, body: bytes | dict[str, Any]) -> None:
        """Queue one webhook update (raw JSON body or decoded dict) for processing.

        Raises ``NotRunning`` unless the channel accepts updates, ``ValueError`` for a body that is
        not an update. Synchronous on purpose: nothing can stop the channel between the check and
        the queueing, so an accepted update is always processed (``Application.stop`` drains).
        """
        import json

        application = self.application
        if application is None or not self.running:
            raise NotRunning("the telegram channel is not accepting updates")
        try:
            data = body if isinstance(body, dict) else json.loads(body)
        except ValueError as exc:
            raise ValueError("not JSON") from exc
        if not isinstance(data, dict) or not isinstance(data.get("update_id"), int):
            raise ValueError("not a Telegram update")
        try:
            update = Update.de_json(data, application.bot)
        except Exception as exc:  # malformed nested objects: a client error, not ours
            raise ValueError("not a Telegram update") from exc
        application.update_queue.put_nowait(update)  # unbounded: never blocks

    async def _set_commands(self, bot: Bot) -> None:
        try:
            for lang, code in (("en", None), ("zh", "zh")):
                commands = [
                    BotCommand("joke", text("cmd_joke", lang)),
                    BotCommand("help", text("cmd_help", lang)),
                    BotCommand("privacy", text("cmd_privacy", lang)),
                ]
                await bot.set_my_commands(commands, language_code=code)
        except TelegramError as exc:  # cosmetic: never a reason not to start
            log.warning("could not set the bot's command list: %s", exc)

    # ------------------------------------------------------------------ helpers

    def language(self, user: User | None) -> str:
        return pick_language(self.settings, user.language_code if user else None)

    @property
    def download_limit(self) -> int:
        return min(self.settings.images.max_bytes, BOT_API_DOWNLOAD_LIMIT)

    def _too_large(self, lang: str) -> str:
        return core_message("too_large", lang, limit_mb=max(1, self.download_limit // (1 << 20)))

    async def _reply(
        self,
        bot: Bot,
        to: Message,
        body: str,
        markup: InlineKeyboardMarkup | None = None,
    ) -> Message | None:
        try:
            try:
                return await bot.send_message(
                    chat_id=to.chat.id,
                    text=body[: MessageLimit.MAX_TEXT_LENGTH],
                    reply_parameters=ReplyParameters(
                        message_id=to.message_id, allow_sending_without_reply=True
                    ),
                    reply_markup=markup,
                    message_thread_id=to.message_thread_id if to.is_topic_message else None,
                )
            except ChatMigrated as exc:  # the group is a supergroup now: say it there
                new_chat_id = int(exc.new_chat_id)
                await self._chat_moved(to.chat.id, new_chat_id)
                # (its message ids are its own: the old message cannot be quoted)
                return await bot.send_message(
                    chat_id=new_chat_id,
                    text=body[: MessageLimit.MAX_TEXT_LENGTH],
                    reply_markup=markup,
                )
        except TelegramError as exc:
            log.warning("telegram: could not reply in a chat: %s", exc)
            return None

    async def _chat_moved(self, old_chat_id: int, new_chat_id: int) -> None:
        """Remember that group ``old_chat_id`` became supergroup ``new_chat_id``: its pending
        replies go there, and votes from there count on the jokes told in the group."""
        if self._moved.get(old_chat_id) == new_chat_id:
            return
        if len(self._moved) > SHOWN_MAX:  # bounded; a forgotten move costs one refused send
            self._moved.clear()
        self._moved[old_chat_id] = new_chat_id
        log.info("telegram: chat %s became supergroup %s", old_chat_id, new_chat_id)
        try:
            await self.app.store.move_chat(f"tg:{old_chat_id}", f"tg:{new_chat_id}")
        except OogiriError as exc:  # the database is down: Telegram's next refusal tells again
            self._moved.pop(old_chat_id, None)
            log.warning("telegram: could not record that chat %s moved: %s", old_chat_id, exc)
            return
        moderation_for(self.app).invalidate()  # a block of the group holds for it at once

    @contextlib.asynccontextmanager
    async def _typing(self, bot: Bot, message: Message) -> AsyncIterator[None]:
        """Show "typing…" while the body runs: renewed in private chats, once in a group (whose
        flood budget of 20 messages a minute is better spent on jokes and vote counts)."""
        thread = message.message_thread_id if message.is_topic_message else None
        renew = message.chat.type == ChatType.PRIVATE

        async def keep_typing() -> None:
            while True:
                with contextlib.suppress(TelegramError):
                    await bot.send_chat_action(
                        message.chat.id, ChatAction.TYPING, message_thread_id=thread
                    )
                if not renew:
                    return
                await asyncio.sleep(TYPING_EVERY_S)

        task = asyncio.create_task(keep_typing())
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def tell(
        self,
        bot: Bot,
        asking: Message,
        picture: Picture,
        hint: str | None,
        user: User | None,
    ) -> None:
        """Admit, download ``picture``, ask the service for a joke, reply to ``asking`` with it.

        Admission (rate limits, moderation) comes before any Telegram call: a flooder costs a
        counter, not a getFile and a download. The joke's reply is stored with the joke (the
        outbox) and sent at once; if that send fails it is delivered later, in order.
        """
        lang = self.language(user)
        limit = self.download_limit
        if picture.file_size and picture.file_size > limit:
            await self._reply(bot, asking, self._too_large(lang))
            return
        max_hint = self.settings.limits.max_hint_chars
        if hint and len(showable(hint)) > max_hint:  # the core's own test, before the download
            refusal = Rejected(key="hint_too_long", limit=max_hint)
            await self._reply(bot, asking, refusal.user_message(lang))
            return
        sender = _sender_id(asking)
        request = JokeRequest(
            image_bytes=b"",
            channel=CHANNEL,
            user_id=f"tg:{sender}",
            chat_id=f"tg:{asking.chat.id}",
            hint=hint,
            language=lang,
            filename=picture.filename,
            content_type=picture.content_type,
            meta={"chat_type": asking.chat.type, "message_id": asking.message_id},
        )
        try:
            await self.app.service.admit(request)
        except RateLimited as exc:
            # a busy group gets one notice per window, not one per member who asks
            who = request.chat_id if exc.key == "rate_chat" else request.user_id
            await self._slow_down(bot, asking, f"{exc.key}:{who}", exc, lang)
            return
        except Rejected as exc:
            if exc.key not in ("blocked", "not_allowed"):  # moderation refusals get silence
                await self._reply(bot, asking, exc.user_message(lang))
            return
        except OogiriError as exc:
            await self._reply(bot, asking, exc.user_message(lang))
            return
        async with self._typing(bot, asking):
            try:
                tg_file = await bot.get_file(picture.file_id)
                if tg_file.file_size and tg_file.file_size > limit:
                    await self._reply(bot, asking, self._too_large(lang))
                    return
                request.image_bytes = bytes(await tg_file.download_as_bytearray())
            except BadRequest as exc:
                too_big = "too big" in str(exc).lower()
                await self._reply(
                    bot, asking, self._too_large(lang) if too_big else text("download_failed", lang)
                )
                return
            except TelegramError as exc:  # a 429 on getFile too: never silence
                log.warning("telegram: download failed: %s", exc)
                await self._reply(bot, asking, text("download_failed", lang))
                return
            thread = asking.message_thread_id if asking.is_topic_message else None
            request.delivery = self.outbox.delivery(
                f"tg:{asking.chat.id}",
                {
                    "chat_id": asking.chat.id,
                    "reply_to": asking.message_id,
                    "thread_id": thread,
                    "lang": lang,
                },
            )
            try:
                joke = await self.app.service.tell(request)
            except OogiriError as exc:
                await self._reply(bot, asking, exc.user_message(lang))
                return
        await self._send_joke(joke.id)

    async def _send_joke(self, joke_id: int) -> None:
        """Send a just-stored joke's reply now (its outbox row is already ours)."""
        try:
            item = await self.outbox.for_joke(joke_id)
        except OogiriError:
            log.warning("telegram: joke %s stored, its reply left to the outbox", joke_id)
            return  # the claim lapses and the worker sends it
        if item is not None:
            await self.worker.send_now(item)

    async def _slow_down(
        self, bot: Bot, asking: Message, user_key: str, exc: RateLimited, lang: str
    ) -> None:
        """One "slow down" per user (or per chat, for the chat's limit) per window; later
        refusals in it are silent."""
        window = self.settings.telegram.slow_down_notice_s
        first = window <= 0 or (
            await self.app.limiter.hit(f"notice:{CHANNEL}:{user_key}", 1, window) is None
        )
        if first:
            await self._reply(bot, asking, exc.user_message(lang))

    async def _deliver(self, item: OutboxItem) -> dict[str, Any] | None:
        """Send one outbox reply (a joke with its current vote counts) — the outbox's callback."""
        application = self.application
        if application is None:
            raise RetryLater("the telegram channel is not running", 1.0)
        payload = item.payload
        if item.joke_id is None:
            raise Undeliverable("an outbox row without a joke")
        try:
            joke = await self.app.service.get_joke(item.joke_id)
        except NotFound:
            raise Undeliverable(f"joke {item.joke_id} no longer exists") from None
        if item.joke_id in await moderation_for(self.app).removed_jokes_cached():
            raise Undeliverable(f"joke {item.joke_id} was removed by an admin")
        chat_id = int(payload["chat_id"])
        reply_to, thread = payload.get("reply_to"), payload.get("thread_id")
        if chat_id in self._moved:  # the group became a supergroup, whose message ids differ
            chat_id, reply_to, thread = self._moved[chat_id], None, None
        try:
            try:
                sent = await self._send_joke_message(
                    application.bot, chat_id, joke, reply_to, thread
                )
            except ChatMigrated as exc:  # found out now: the reply goes to the supergroup
                await self._chat_moved(chat_id, int(exc.new_chat_id))
                chat_id = int(exc.new_chat_id)
                sent = await self._send_joke_message(application.bot, chat_id, joke, None, None)
        except RetryAfter as exc:
            raise RetryLater(f"flood control: {exc}", retry_seconds(exc) + 0.1) from None
        except (Forbidden, ChatMigrated) as exc:
            raise Undeliverable(f"{type(exc).__name__}: {exc}") from None
        except BadRequest as exc:
            raise Undeliverable(f"BadRequest: {exc}") from None
        except TelegramError as exc:  # 5xx, timeouts, the network: worth another try
            raise RetryLater(f"{type(exc).__name__}: {exc}") from None
        self._remember_shown((chat_id, sent.message_id), (joke.up, joke.down))
        return {"chat_id": chat_id, "message_id": sent.message_id}

    async def _send_joke_message(
        self, bot: Bot, chat_id: int, joke: Any, reply_to: Any, thread: Any
    ) -> Message:
        return await bot.send_message(
            chat_id=chat_id,
            text=joke.text[: MessageLimit.MAX_TEXT_LENGTH],
            reply_parameters=ReplyParameters(
                message_id=int(reply_to), allow_sending_without_reply=True
            )
            if reply_to
            else None,
            reply_markup=vote_keyboard(joke.id, joke.up, joke.down),
            message_thread_id=thread,
        )

    async def _joke_on_reply(
        self, bot: Bot, message: Message, hint: str | None, private: bool
    ) -> None:
        """``/joke`` or a mention: a joke about the picture this message replies to."""
        lang = self.language(message.from_user)
        original = message.reply_to_message
        if original is not None:
            picture, unsupported = find_picture(original, self.download_limit)
            if picture is not None:
                await self.tell(bot, message, picture, hint, message.from_user)
                return
            if unsupported:
                await self._reply(bot, message, text("send_picture", lang))
                return
        # /joke with a picture of its own can only be a caption, handled in on_message
        await self._reply(bot, message, text("send_picture" if private else "group_usage", lang))

    # ------------------------------------------------------------------ handlers

    async def on_help(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.effective_message
        if message is None:
            return
        await self._reply(context.bot, message, text("help", self.language(update.effective_user)))

    async def on_privacy(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.effective_message
        if message is None:
            return
        lang = self.language(update.effective_user)
        await self._reply(context.bot, message, text("privacy", lang))

    async def on_stats(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message, user = update.effective_message, update.effective_user
        if message is None:
            return
        lang = self.language(user)
        if user is None or user.id not in self.settings.telegram.admin_ids:
            await self._reply(context.bot, message, text("admin_only", lang))
            return
        rows = await self.app.service.stats()
        if not rows:
            await self._reply(context.bot, message, text("stats_empty", lang))
            return
        lines = [text("stats_header", lang)]
        for row in rows:
            rate = f"{row.like_rate:.0%}" if row.like_rate is not None else text("no_votes", lang)
            lines.append(
                text(
                    "stats_line",
                    lang,
                    version=row.model_version,
                    jokes=counted("jokes", row.jokes, lang),
                    up=row.up,
                    down=row.down,
                    rate=rate,
                )
            )
        await self._reply(context.bot, message, "\n".join(lines))

    async def on_joke_command(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.effective_message
        if message is None or _from_a_bot(message):
            return
        hint = " ".join(context.args or ()) or None
        private = message.chat.type == ChatType.PRIVATE
        await self._joke_on_reply(context.bot, message, hint, private)

    async def on_message(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.message
        if message is None or _from_a_bot(message):
            return
        bot = context.bot
        user = message.from_user
        lang = self.language(user)
        picture, unsupported = find_picture(message, self.download_limit)
        own_text = message.caption if picture is not None or unsupported else message.text

        if message.chat.type == ChatType.PRIVATE:
            if picture is not None:
                await self.tell(bot, message, picture, clean_hint(own_text, bot.username), user)
            elif message.text and message.reply_to_message is not None:
                # a text reply to a picture: a joke about it, nudged by the text
                await self._joke_on_reply(
                    bot, message, clean_hint(message.text, bot.username), True
                )
            elif unsupported or message.text or message.effective_attachment:
                await self._reply(bot, message, text("send_picture", lang))
            return

        # Groups: speak only when spoken to.
        asked = _mentions(message, bot) or _caption_command(message, bot)
        if picture is not None:
            if asked or _is_reply_to_me(message, bot):
                await self.tell(bot, message, picture, clean_hint(own_text, bot.username), user)
            return
        if unsupported:
            if asked or _is_reply_to_me(message, bot):
                await self._reply(bot, message, text("send_picture", lang))
            return
        if message.text and asked:
            await self._joke_on_reply(
                bot, message, clean_hint(message.text, bot.username), private=False
            )

    async def on_migrate(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Telegram's service messages of a group upgraded to a supergroup: one in the old group
        (``migrate_to_chat_id``), one in the new supergroup (``migrate_from_chat_id``)."""
        message = update.effective_message
        if message is None:
            return
        if message.migrate_to_chat_id:
            await self._chat_moved(message.chat.id, message.migrate_to_chat_id)
        elif message.migrate_from_chat_id:
            await self._chat_moved(message.migrate_from_chat_id, message.chat.id)

    async def on_callback(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        query = update.callback_query
        if query is None:
            return
        lang = self.language(query.from_user)
        answered = False
        try:
            vote = parse_vote(query.data)
            if vote is None or query.message is None:
                answered = True
                await query.answer(text("bad_button", lang), show_alert=True)
                return
            joke_id, value = vote
            chat_id = query.message.chat.id
            try:
                # A callback query always names the person who pressed (anonymous admins too),
                # so one vote per person per joke holds however they post.
                rating = await self.app.service.rate(
                    joke_id,
                    f"tg:{query.from_user.id}",
                    value,
                    CHANNEL,
                    chat_id=f"tg:{chat_id}",
                )
            except NotFound:
                answered = True
                await query.answer(text("bad_button", lang), show_alert=True)
                return
            except OogiriError as exc:
                answered = True
                await query.answer(exc.user_message(lang), show_alert=True)
                return
            if rating.previous is None:
                toast = text("vote_up" if value > 0 else "vote_down", lang)
            elif rating.previous == value:
                toast = text("vote_same", lang)
            else:
                toast = text("vote_changed_up" if value > 0 else "vote_changed_down", lang)
            if rating.previous != value:  # the same vote again changes no count: no edit
                # scheduled before the toast: a failed answer must not leave stale counts
                self._schedule_refresh(context.bot, joke_id, chat_id, query.message.message_id)
            answered = True
            await query.answer(toast)
        finally:
            if not answered:  # whatever failed, the user's spinner must stop
                with contextlib.suppress(Exception):
                    await query.answer()

    def _remember_shown(self, key: tuple[int, int], counts: tuple[int, int]) -> None:
        self._shown[key] = counts
        self._shown.move_to_end(key)
        while len(self._shown) > SHOWN_MAX:
            old, _ = self._shown.popitem(last=False)
            self._last_edit.pop(old, None)

    def _schedule_refresh(self, bot: Bot, joke_id: int, chat_id: int, message_id: int) -> None:
        """Coalesce keyboard refreshes: one edit per message per ``edit_window_s``, last state
        wins; a refresh already waiting for this message reads the counts when it runs."""
        key = (chat_id, message_id)
        if key in self._refreshing:
            self._refreshing[key] = True
            return
        self._refreshing[key] = False
        task = asyncio.create_task(self._refresh_counts(bot, joke_id, chat_id, message_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refresh_counts(self, bot: Bot, joke_id: int, chat_id: int, message_id: int) -> None:
        """Show the current 👍/👎 counts, unless the message shows them already."""
        key = (chat_id, message_id)
        window = self.settings.telegram.edit_window_s
        try:
            while True:
                wait = self._last_edit.get(key, 0.0) + window - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                self._refreshing[key] = False
                try:
                    joke = await self.app.service.get_joke(joke_id)
                except OogiriError as exc:
                    # The vote is stored and answered; stale counts are cosmetic, an error reply
                    # in the chat would not be.
                    log.warning("telegram: vote counts not refreshed: %s", exc)
                    break
                counts = (joke.up, joke.down)
                if self._shown.get(key) != counts:
                    if len(self._last_edit) > SHOWN_MAX:  # bounded; forgetting only costs a wait
                        self._last_edit.clear()
                    self._last_edit[key] = time.monotonic()
                    try:
                        await bot.edit_message_reply_markup(
                            chat_id=chat_id,
                            message_id=message_id,
                            reply_markup=vote_keyboard(joke.id, *counts),
                        )
                        self._remember_shown(key, counts)
                    except BadRequest as exc:
                        if "not modified" in str(exc).lower():
                            self._remember_shown(key, counts)
                        else:
                            log.warning("telegram: could not update vote counts: %s", exc)
                    except ChatMigrated as exc:
                        # A button of the old group's message pressed after the group became a
                        # supergroup, and Telegram refused the edit for that reason. The message
                        # stays in the old group; its id means nothing in the supergroup (see
                        # _delete_joke_message), so nothing is edited there: the move is recorded.
                        await self._chat_moved(chat_id, int(exc.new_chat_id))
                        log.info(
                            "telegram: vote counts not refreshed in upgraded group %s", chat_id
                        )
                    except TelegramError as exc:
                        log.warning("telegram: could not update vote counts: %s", exc)
                if not self._refreshing[key]:
                    break
        finally:
            self._refreshing.pop(key, None)

    # ------------------------------------------------------------------ moderation (admins)

    def _is_admin(self, update: Update) -> bool:
        user = update.effective_user
        return bool(
            user is not None
            and update.effective_message is not None
            and update.effective_message.sender_chat is None  # an anonymous admin is nobody
            and user.id in self.settings.telegram.admin_ids
        )

    def _subject(self, message: Message, args: list[str], lang: str) -> str | None:
        """Whom ``/block``/``/unblock`` means: the replied-to sender, or an id or subject.

        Raises ValueError with a reason in ``lang`` (shown to the admin) for anything else."""
        if args:
            value = args[0].strip()
            if ":" in value:
                try:
                    return check_subject(value)
                except ValueError:
                    raise ValueError(text("mod_bad_subject", lang, value=value[:60])) from None
            if re.fullmatch(r"-?[0-9]{1,20}", value):
                kind = "chat" if value.startswith("-") else "user"
                return f"{CHANNEL}:{kind}:{value}"
            raise ValueError(text("mod_not_an_id", lang, value=value[:40]))
        original = message.reply_to_message
        if original is None:
            return None
        if original.sender_chat is not None:
            # posts *as* that chat (a channel, or the group's anonymous admins) are keyed like a
            # user (tg:<sender chat id>); a chat subject would silence the whole group
            return f"{CHANNEL}:user:{original.sender_chat.id}"
        if original.from_user is not None:
            return f"{CHANNEL}:user:{original.from_user.id}"
        return None

    async def _moderate(self, update: Update, context: Any, command: str) -> None:
        message = update.effective_message
        if message is None:
            return
        lang = self.language(update.effective_user)
        if not self._is_admin(update):
            await self._reply(context.bot, message, text("admins_only", lang))
            return
        moderation = moderation_for(self.app)
        try:
            subject = self._subject(message, list(context.args or ()), lang)
        except ValueError as exc:
            await self._reply(context.bot, message, text("mod_error", lang, error=str(exc)))
            return
        if subject is None:
            await self._reply(context.bot, message, text("mod_usage", lang, command=command))
            return
        try:
            by = f"{CHANNEL}:user:{update.effective_user.id}"  # type: ignore[union-attr]
            if command == "block":
                done = await moderation.block(subject, by=by)
                key = "blocked" if done else "already_blocked"
            else:
                done = await moderation.unblock(subject)
                key = "unblocked" if done else "not_blocked"
        except ValueError:
            # the subject is valid (checked above): what moderation refuses is taking a subject
            # of the settings' block list off it; its own message is English, so say it here
            if command != "unblock" or subject not in moderation.settings.block:
                raise
            error = text("mod_in_settings", lang, subject=subject)
            await self._reply(context.bot, message, text("mod_error", lang, error=error))
            return
        except OogiriError as exc:
            await self._reply(context.bot, message, exc.user_message(lang))
            return
        await self._reply(context.bot, message, text(key, lang, subject=subject))

    async def on_block(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        await self._moderate(update, context, "block")

    async def on_unblock(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        await self._moderate(update, context, "unblock")

    async def on_delete(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """``/delete`` in reply to one of the bot's jokes (or ``/delete <joke id>``): the joke is
        removed from the chat and from every later training export."""
        message = update.effective_message
        if message is None:
            return
        bot = context.bot
        lang = self.language(update.effective_user)
        if not self._is_admin(update):
            await self._reply(bot, message, text("admins_only", lang))
            return
        target: tuple[int, int] | None = None
        joke_id: int | None = None
        original = message.reply_to_message
        if context.args and context.args[0].isdigit():
            joke_id = int(context.args[0])
        elif original is not None and original.from_user and original.from_user.id == bot.id:
            markup = original.reply_markup
            for row in markup.inline_keyboard if markup else ():
                for button in row:
                    data = button.callback_data if button else None
                    vote = parse_vote(data if isinstance(data, str) else None)
                    if vote is not None:
                        joke_id = vote[0]
            target = (original.chat.id, original.message_id)
        if joke_id is None:
            # A reply to a message of another chat (``external_reply``; e.g. the old group's
            # history shown above a supergroup's) carries neither the buttons nor, for a basic
            # group, the message id: there is no telling which joke it was.
            external = original is None and message.external_reply is not None
            key = "delete_external" if external else "delete_usage"
            await self._reply(bot, message, text(key, lang))
            return
        by = f"{CHANNEL}:user:{update.effective_user.id}"  # type: ignore[union-attr]
        try:
            await moderation_for(self.app).remove_joke(joke_id, by=by)
            if target is None:
                sent = await self.outbox.delivered_result(joke_id)
                if sent and sent.get("message_id"):
                    target = (int(sent["chat_id"]), int(sent["message_id"]))
        except NotFound:
            await self._reply(bot, message, text("no_such_joke", lang, joke_id=joke_id))
            return
        except OogiriError as exc:
            await self._reply(bot, message, exc.user_message(lang))
            return
        # the joke is removed (never sent again, out of training) whatever happens to its message
        outcome = await self._delete_joke_message(bot, joke_id, target)
        await self._reply(bot, message, text(DELETE_REPLIES[outcome], lang, joke_id=joke_id))

    async def _delete_joke_message(
        self, bot: Bot, joke_id: int, target: tuple[int, int] | None
    ) -> DeleteOutcome:
        """Delete the message that showed a removed joke, where Telegram still lets the bot.

        ``target`` is where the message really is: the message an admin replied to, or the chat
        and message id Telegram answered when the outbox delivered the joke. It is never mapped to
        another chat. What this relies on about a group upgraded to a supergroup:

        - Message ids are per chat (Bot API ``Message.message_id``: "Unique message identifier
          inside this chat", python-telegram-bot's ``telegram/_message.py``): the supergroup is a
          new chat with ids of its own, so the old group's message id names nothing there, or
          another message — possibly one of the bot's, which it may delete. Never try it there.
        - The upgrade creates a new supergroup and deactivates the basic group (TDLib's
          ``upgradeBasicGroupChatToSupergroupChat``; Bot API ``migrate_to_chat_id``: "The group
          has been migrated to a supergroup with the specified identifier"); the group's messages
          are not moved into the supergroup. The Bot API server refuses every call needing write
          access to a deactivated group with 400 "group chat was upgraded to a supergroup chat" and
          ``parameters.migrate_to_chat_id`` (tdlib/telegram-bot-api ``Client::check_chat_access``;
          ``deleteMessage`` checks ``AccessRights::Write``), which python-telegram-bot raises as
          ``ChatMigrated``. So no bot can delete the old group's messages any more: the admin is
          told so, and the move is recorded like any other refusal that reveals it.
        """
        if target is None:  # never delivered (pending, expired, dropped): nothing in any chat
            return "unsent"
        chat_id, message_id = target
        if chat_id in self._moved:  # known upgraded: Telegram would refuse, as described above
            return "upgraded"
        try:
            deleted = await bot.delete_message(chat_id=chat_id, message_id=message_id)
        except ChatMigrated as exc:
            await self._chat_moved(chat_id, int(exc.new_chat_id))
            log.info(
                "telegram: joke %s's message is in group %s, upgraded to a supergroup: kept",
                joke_id,
                chat_id,
            )
            return "upgraded"
        except TelegramError as exc:  # older than 48 h, already gone, or no right to delete
            log.warning("telegram: could not delete joke %s's message: %s", joke_id, exc)
            return "kept"
        return "deleted" if deleted else "kept"

    async def on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        error = context.error
        if isinstance(error, RetryAfter):
            log.warning("telegram: flood control still active after retries: %s", error)
            return
        log.error("telegram: an update failed: %r", error, exc_info=error)
        if isinstance(update, Update) and update.effective_message is not None:
            message = update.effective_message
            if message.chat.type == ChatType.PRIVATE:
                lang = self.language(update.effective_user)
                await self._reply(context.bot, message, text("internal_error", lang))


# --------------------------------------------------------------------------- hooks


@hookimpl
def oogiri_register_settings(register: Callable[..., None]) -> None:
    register("telegram", TelegramSettings)


@hookimpl
def oogiri_register_channels(register: Callable[..., None], settings: Settings) -> None:
    register(CHANNEL, TelegramChannel)


@hookimpl
def oogiri_web_routes(router: Any, app: App) -> None:
    tg = app.settings.telegram
    if tg.mode == "webhook" and tg.token is not None and _PTB_MISSING is None:
        mount_webhook(router, app)


@hookimpl
def oogiri_register_commands(cli: Any) -> None:
    import typer

    group = typer.Typer(
        help="Telegram: manage the webhook (run once per deployment, not per replica).",
        no_args_is_help=True,
    )

    def _bot(settings: Settings) -> Bot:
        from telegram import Bot

        tg = settings.telegram
        kwargs: dict[str, Any] = {}
        if tg.base_url:
            kwargs["base_url"] = tg.base_url
        files = file_base_url(settings)
        if files:
            kwargs["base_file_url"] = files
        return Bot(bot_token(settings), **kwargs)

    def _run(work: Callable[[Bot, Settings], Any]) -> Any:
        from bot.settings import Settings

        settings = Settings()
        _quiet_sensitive_logs(bot_token(settings))

        async def main() -> Any:
            async with _bot(settings) as bot:
                return await work(bot, settings)

        try:
            return asyncio.run(main())
        except InvalidToken:
            # PTB's message quotes the token: never let it reach a deploy job's output
            typer.echo(
                "error: Telegram rejected the bot token: check OOGIRI_TELEGRAM__TOKEN", err=True
            )
            raise typer.Exit(2) from None

    @group.command("set-webhook")
    def set_webhook(
        drop_pending_updates: bool = typer.Option(
            False, "--drop-pending-updates", help="discard updates Telegram is holding"
        ),
    ) -> None:
        """Point Telegram at telegram.webhook_url with the secret token (always re-sends)."""

        async def work(bot: Bot, settings: Settings) -> None:
            extra = {"drop_pending_updates": True} if drop_pending_updates else {}
            await ensure_webhook(bot, settings, force=True, **extra)
            typer.echo(f"webhook set: {webhook_target(settings)}")

        _run(work)

    @group.command("delete-webhook")
    def delete_webhook() -> None:
        """Remove the webhook (needed before running in polling mode again)."""

        async def work(bot: Bot, settings: Settings) -> None:
            await bot.delete_webhook(drop_pending_updates=False)
            typer.echo("webhook deleted")

        _run(work)

    @group.command("webhook-info")
    def webhook_info() -> None:
        """What Telegram knows about the webhook: URL, pending updates, last error."""

        async def work(bot: Bot, settings: Settings) -> None:
            info = await bot.get_webhook_info()
            typer.echo(f"url: {info.url or '(none: polling)'}")
            typer.echo(f"pending updates: {info.pending_update_count}")
            typer.echo(f"allowed updates: {', '.join(info.allowed_updates or ()) or 'default'}")
            if info.last_error_message:
                typer.echo(f"last error: {info.last_error_message} ({info.last_error_date})")

        _run(work)

    cli.add_typer(group, name="telegram")
