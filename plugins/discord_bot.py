"""Discord channel: ``/joke``, the "Joke about this image" context menu, persistent 👍/👎 buttons.

The module is named ``discord_bot`` so that it can never shadow the ``discord`` package. It needs
the ``discord`` extra (discord.py 2.x); without it the plugin still loads, and starting the channel
says what to install.

Everything a user does goes through ``JokeService``: ``tell`` for a joke, ``rate`` for a vote. This
module only translates between Discord interactions and the core's requests and jokes.

Discord rules this channel follows:

* An interaction must be answered within 3 seconds. Cheap checks (attachment size and content type,
  both known from the interaction payload) are answered at once; everything else is deferred with a
  "thinking…" state first and finished with a follow-up.
* Rejections are ephemeral (only the person who asked sees them); jokes are public.
* Vote buttons are ``DynamicItem`` s whose ``custom_id`` carries the joke id, so a button on a
  message posted before a restart still works: nothing about it lives in memory.
* No privileged intents, no message-content intent, no member or message cache: application
  commands and components arrive through ``INTERACTION_CREATE`` whatever the intents.
* Nobody is pinged (``AllowedMentions.none()``).
"""

import asyncio
import io
import logging
import re
from collections.abc import Callable
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

from pydantic import Field, SecretStr

from bot.images import accepted_type
from bot.models import (
    ImageRejected,
    JokeRequest,
    NotFound,
    OogiriError,
    Rejected,
    message,
)
from bot.moderation import MODERATION_TEXTS, moderation_for
from bot.outbox import Outbox, OutboxItem, OutboxWorker, RetryLater, Undeliverable
from oogiri import PluginSettings, hookimpl

try:  # the `discord` extra
    import aiohttp
    import discord
    import yarl
    from discord import app_commands
except ModuleNotFoundError as exc:  # pragma: no cover - exercised only without the extra
    if not TYPE_CHECKING:  # type checkers see the installed extra, not these placeholders
        discord = None
        app_commands = None
    _IMPORT_ERROR: ModuleNotFoundError | None = exc
else:
    _IMPORT_ERROR = None

if TYPE_CHECKING:
    from bot.app import App

log = logging.getLogger(__name__)

CHANNEL = "discord"
CONTEXT_MENU_NAME = "Joke about this image"
#: custom_id of a vote button: ``oogiri:vote:<joke id>:<up|down>`` (at most 100 characters).
VOTE_TEMPLATE = r"oogiri:vote:(?P<joke_id>[0-9]{1,19}):(?P<value>up|down)"
VOTE_EMOJI = {"up": "👍", "down": "👎"}


class DiscordSettings(PluginSettings):
    """``settings.discord`` (OOGIRI_DISCORD__…): the bot token, command sync, shards, outbox."""

    token: SecretStr | None = None
    dev_guild_id: int | None = Field(
        default=None, description="sync commands here only (fast iteration)"
    )
    clear_guild_ids: list[int] = Field(
        default_factory=list,
        description="remove the bot's server-only commands here at start (after dev_guild_id)",
    )
    max_attachment_bytes: int = 10 * 1024 * 1024
    shard_count: int | None = None
    shard_ids: list[int] | None = None
    api_base_url: str | None = Field(default=None, description="REST base (tests)")
    gateway_url: str | None = Field(default=None, description="gateway override (tests)")
    sync_on_start: bool | None = Field(
        default=None,
        description="sync slash commands when `serve` starts; unset: only with dev_guild_id "
        "(production: run `oogiri discord sync` once per release instead)",
    )
    admin_ids: list[int] = Field(
        default_factory=list, description="users who may use /mod besides server administrators"
    )
    outbox_max_age_s: float = Field(
        default=14 * 60.0,
        gt=0,
        le=15 * 60.0,
        description="an undelivered follow-up is given up after this (tokens last 15 min)",
    )
    outbox_lease_s: float = Field(default=60.0, gt=0)
    outbox_poll_s: float = Field(default=1.0, gt=0)


#: The picture is re-attached to the joke only up to this size (Discord's default upload limit).
REUPLOAD_MAX_BYTES = 8 * 1024 * 1024
MAX_CONTENT_CHARS = 2000

TEXTS: dict[str, dict[str, str]] = {
    "no_image": {
        "en": "I can't find a picture in that message.",
        "zh": "这条消息里没有图片。",
    },
    "download_failed": {
        "en": "I couldn't fetch that picture from Discord; please try again.",
        "zh": "没能从 Discord 取到这张图片，请再试一次。",
    },
    "failed": {
        "en": "Something went wrong on my side; please try again.",
        "zh": "我这边出了点问题，请再试一次。",
    },
    "refused": {
        "en": "This bot is not available to you here.",
        "zh": "这个机器人在这里不对你开放。",
    },
    "admins_only": {
        "en": "Only the bot's admins may do that.",
        "zh": "只有机器人的管理员可以这样做。",
    },
    **MODERATION_TEXTS,
    "no_such_joke": {"en": "There is no joke {joke_id}.", "zh": "没有编号为 {joke_id} 的笑话。"},
    "joke_deleted_kept": {
        "en": "Joke {joke_id} removed from training, but its message could not be deleted.",
        "zh": "笑话 {joke_id} 已从训练数据中移除，但没能删除它的消息。",
    },
    "help": {
        "en": (
            "**Joke bot — how to use me**\n"
            "• `/joke image:<picture> [hint]` — I tell a joke about your picture "
            "(the hint nudges the joke).\n"
            "• On any message with a picture: *Apps → {menu}*.\n"
            "• Vote with 👍 / 👎 under a joke; press the other one to change your vote. "
            "Votes teach me better jokes.\n"
            "Limits: pictures up to {limit_mb} MB; jokes per person per minute: {per_minute}."
        ),
        "zh": (
            "**讲梗机器人 · 用法**\n"
            "• `/joke image:<图片> [hint]` —— 我根据图片讲一个梗（hint 可以给点提示）。\n"
            "• 在任何带图片的消息上：*应用 → {menu}*。\n"
            "• 在梗下面点 👍 / 👎 投票；点另一个可以改票。投票会让我越讲越好笑。\n"
            "限制：图片最大 {limit_mb} MB；每人每分钟 {per_minute} 个梗。"
        ),
    },
}

#: Localised names and descriptions sent with the commands (Discord shows them per user locale).
ZH_COMMAND_TEXT: dict[str, str] = {
    CONTEXT_MENU_NAME: "用这张图讲个梗",
    "Tell a joke about a picture": "根据图片讲一个脑洞大开的梗",
    "The picture (JPEG, PNG, WebP, GIF, BMP or TIFF)": "图片（JPEG、PNG、WebP、GIF、BMP 或 TIFF）",
    "Optional nudge for the joke": "可选：给梗一点提示",
    "How to use the joke bot": "讲梗机器人的用法",
}


def text(key: str, lang: str, **params: Any) -> str:
    table = TEXTS[key]
    return (table.get(lang) or table["en"]).format(**params)


def language_of(interaction: Any) -> str:
    """The user's Discord locale mapped onto the core's languages (``zh`` or ``en``)."""
    locale = getattr(interaction, "locale", None)
    value = getattr(locale, "value", locale) or ""
    return "zh" if str(value).lower().startswith("zh") else "en"


def vote_custom_id(joke_id: int, value: str) -> str:
    return f"oogiri:vote:{joke_id}:{value}"


def looks_like_image(content_type: str | None, filename: str | None) -> bool:
    """Decide from the metadata alone (before downloading) whether an attachment is a picture
    the core decodes: the core's one list of accepted types (``bot.images.accepted_type``)."""
    return accepted_type(content_type, filename)


def format_mb(limit: int) -> str:
    return f"{limit / (1024 * 1024):.1f}".removesuffix(".0")


class _QuietIrrelevantWarnings(logging.Filter):
    """Drop discord.py's "Guilds intent seems to be disabled" warning.

    It assumes a cache-driven bot; this channel uses no intents on purpose (interactions carry all
    the guild, channel and member data it needs), so the warning would only alarm operators.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Guilds intent seems to be disabled")


_QUIET = _QuietIrrelevantWarnings()


def _require_discord() -> None:
    if discord is None:
        raise RuntimeError(
            "the Discord channel needs discord.py: pip install 'oogiri[discord]'"
        ) from _IMPORT_ERROR


class _Source:
    """Where the picture of a request lives, and what Discord told us about it."""

    __slots__ = ("content_type", "embedded", "filename", "size", "spoiler", "url")

    def __init__(
        self,
        url: str,
        filename: str | None,
        content_type: str | None,
        size: int | None,
        spoiler: bool = False,
        embedded: bool = False,
    ) -> None:
        self.url = url
        self.filename = filename
        self.content_type = content_type
        self.size = size
        self.spoiler = spoiler
        self.embedded = embedded  # an embed's image: Discord already knows it is a picture


class DiscordChannel:
    """The Discord channel: one ``discord.Client`` (or ``AutoShardedClient``) per app."""

    name = CHANNEL
    #: How long ``start`` waits for login, command sync and the gateway's READY.
    connect_timeout_s = 60.0
    #: How long ``stop`` waits for the client to close.
    close_timeout_s = 10.0
    #: Bound on fetching one picture from Discord's CDN.
    download_timeout_s = 30.0

    def __init__(self, app: "App") -> None:
        self.app = app
        self.settings = app.settings
        self.config = app.settings.discord
        self.client: Any = None
        self.tree: Any = None
        self.vote_item: Any = None
        self._runner: asyncio.Task[None] | None = None
        self._http: Any = None
        self._saved_endpoints: tuple[str, Any] | None = None
        #: sync the command list inside ``login`` (serve: ``sync_on_start``; the CLI: always)
        sync = self.config.sync_on_start
        self.sync_on_login: bool = bool(self.config.dev_guild_id) if sync is None else sync
        self.sync_guild_id: int | None = self.config.dev_guild_id
        self.synced: list[Any] | None = None
        self.outbox: Outbox | None = None
        self.worker: OutboxWorker | None = None
        self._fresh: dict[int, bytes] = {}  # joke id → the picture, for the first send only

    # ------------------------------------------------------------------ limits

    @property
    def service(self) -> Any:
        # Always the app's current service (never a copy taken at construction).
        return self.app.service

    @property
    def max_bytes(self) -> int:
        return min(self.config.max_attachment_bytes, self.settings.images.max_bytes)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        _require_discord()
        if self.config.token is None:
            raise RuntimeError("the Discord channel needs a bot token: set OOGIRI_DISCORD__TOKEN")
        if self.config.shard_ids and self.config.shard_count is None:
            raise ValueError("discord.shard_ids needs discord.shard_count")

        self._apply_endpoints()
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.download_timeout_s)
        )
        self.client = self._make_client()
        connected = asyncio.Event()
        expected = self._expected_shards()
        seen: set[int | None] = set()

        async def on_shard_connect(shard_id: int) -> None:
            seen.add(shard_id)
            if expected is not None and expected <= seen:
                connected.set()

        async def on_connect() -> None:
            if expected is None:
                connected.set()

        self.client.event(on_connect)
        self.client.event(on_shard_connect)
        try:
            await asyncio.wait_for(
                self.client.login(self.config.token.get_secret_value()),
                timeout=self.connect_timeout_s,
            )
            self._runner = asyncio.create_task(
                self.client.connect(reconnect=True), name="oogiri-discord-gateway"
            )
            self._runner.add_done_callback(self._gateway_ended)
            waiter = asyncio.create_task(connected.wait())
            done, _ = await asyncio.wait(
                {self._runner, waiter},
                timeout=self.connect_timeout_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
            waiter.cancel()
            if self._runner in done:
                self._runner.result()  # raises what stopped the gateway (bad token, intents…)
                raise RuntimeError("the Discord gateway closed before it was ready")
            if not connected.is_set():
                raise TimeoutError(
                    f"Discord gateway not ready after {self.connect_timeout_s:.0f} s"
                )
        except BaseException:
            await self.stop()
            raise
        self.outbox = Outbox(
            self.app.store,
            CHANNEL,
            lease_s=self.config.outbox_lease_s,
            max_age_s=self.config.outbox_max_age_s,
            metrics=self.app.metrics,
        )
        self.worker = OutboxWorker(self.outbox, self._deliver, poll_s=self.config.outbox_poll_s)
        self.worker.start()
        log.info(
            "discord: connected as %s (application %s)",
            self.client.user,
            self.client.application_id,
        )

    async def sync_commands(self, guild_id: int | None = None) -> list[Any]:
        """Publish the command list (globally, or to one server) and disconnect: what
        ``oogiri discord sync`` runs once per release instead of every replica at every start."""
        _require_discord()
        if self.config.token is None:
            raise RuntimeError("the Discord channel needs a bot token: set OOGIRI_DISCORD__TOKEN")
        self.sync_on_login = True
        self.sync_guild_id = guild_id
        self._apply_endpoints()
        try:
            self.client = self._make_client()
            await asyncio.wait_for(
                self.client.login(self.config.token.get_secret_value()),
                timeout=self.connect_timeout_s,
            )
            return list(self.synced or [])
        finally:
            if self.client is not None:
                await self.client.close()
                self.client = None
            self._restore_endpoints()

    async def stop(self) -> None:
        worker, self.worker = self.worker, None
        if worker is not None:  # what is still pending stays in the outbox for later
            await worker.stop()
        client, self.client = self.client, None
        runner, self._runner = self._runner, None
        try:
            if client is not None:
                try:
                    await asyncio.wait_for(client.close(), timeout=self.close_timeout_s)
                except TimeoutError:
                    log.warning("discord: client did not close within %.0f s", self.close_timeout_s)
            if runner is not None:
                try:
                    await asyncio.wait_for(runner, timeout=self.close_timeout_s)
                except (TimeoutError, asyncio.CancelledError):
                    pass
                except Exception:
                    log.debug("discord: the gateway task ended with an error", exc_info=True)
            if self._http is not None:
                await self._http.close()
                self._http = None
        finally:
            self._restore_endpoints()

    def _gateway_ended(self, task: asyncio.Task[None]) -> None:
        if task is not self._runner:  # stopped on purpose
            return
        if task.cancelled():
            log.error("discord: the gateway task was cancelled; the bot is offline")
        elif (error := task.exception()) is not None:
            log.error("discord: the gateway stopped; the bot is offline", exc_info=error)
        else:
            log.error("discord: the gateway closed; the bot is offline")

    def _expected_shards(self) -> set[int | None] | None:
        if self.config.shard_ids:
            return set(self.config.shard_ids)
        if self.config.shard_count is not None:
            return set(range(self.config.shard_count))
        return None

    def _apply_endpoints(self) -> None:
        """Point discord.py at another REST base / gateway (tests, proxies).

        Both are class attributes in discord.py, so they hold for the whole process; they are put
        back when the channel stops.
        """
        from discord.gateway import DiscordWebSocket
        from discord.http import Route

        self._saved_endpoints = (Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY)
        if self.config.api_base_url:
            Route.BASE = self.config.api_base_url.rstrip("/")
        if self.config.gateway_url:
            DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(self.config.gateway_url)

    def _restore_endpoints(self) -> None:
        if self._saved_endpoints is None or discord is None:
            return
        from discord.gateway import DiscordWebSocket
        from discord.http import Route

        Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY = self._saved_endpoints
        self._saved_endpoints = None

    def _make_client(self) -> Any:
        state_log = logging.getLogger("discord.state")
        if _QUIET not in state_log.filters:
            state_log.addFilter(_QUIET)
        # A text-only bot: no voice libraries needed, so no warnings about their absence.
        discord.VoiceClient.warn_nacl = False
        discord.VoiceClient.warn_dave = False
        options: dict[str, Any] = {
            "intents": discord.Intents.none(),
            "max_messages": None,
            "chunk_guilds_at_startup": False,
            "member_cache_flags": discord.MemberCacheFlags.none(),
            "allowed_mentions": discord.AllowedMentions.none(),
        }
        if self.config.shard_count is not None or self.config.shard_ids:
            client = discord.AutoShardedClient(
                shard_count=self.config.shard_count,
                shard_ids=self.config.shard_ids,
                **options,
            )
        else:
            client = discord.Client(**options)
        self.tree = app_commands.CommandTree(client)
        self.tree.on_error = self._on_tree_error
        self.vote_item = self._make_vote_item()
        client.setup_hook = self._setup_hook
        return client

    async def _setup_hook(self) -> None:
        """Runs inside ``Client.login``: find the gateway, register handlers, sync commands."""
        client = self.client
        if self.config.api_base_url and not self.config.gateway_url:
            # A non-default REST base means a non-default gateway too; ask it where that is.
            from discord.gateway import DiscordWebSocket

            _, url, _ = await client.http.get_bot_gateway()
            DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(url).with_query(None)
        client.add_dynamic_items(self.vote_item)
        guild = discord.Object(id=self.sync_guild_id) if self.sync_guild_id else None
        self._add_commands(guild)
        await self.tree.set_translator(_make_translator())
        if not self.sync_on_login:
            # Discord keeps the command list; replicas need not (and should not) re-send it on
            # every start. `oogiri discord sync` does it once per release.
            log.info("discord: commands not synced at start (run `oogiri discord sync`)")
            return
        try:
            synced = await self.tree.sync(guild=guild)
            self.synced = list(synced)
        except discord.Forbidden:
            log.error(
                "discord: not allowed to sync commands%s; invite the bot with the "
                "'applications.commands' scope (see docs/discord.md)",
                f" to guild {guild.id}" if guild else "",
            )
            raise
        log.info(
            "discord: synced %d commands %s",
            len(synced),
            f"to guild {guild.id}" if guild else "globally",
        )
        await self._clear_guild_commands(guild)

    async def _clear_guild_commands(self, active: Any) -> None:
        """Empty the server-only command lists of ``clear_guild_ids``.

        Commands synced to a dev guild stay there after the bot moves to global commands, so that
        server shows every command twice. Discord keeps them until the bot replaces the list.
        """
        for gid in self.config.clear_guild_ids:
            if active is not None and gid == active.id:
                log.warning("discord: not clearing guild %s: it is dev_guild_id", gid)
                continue
            target = discord.Object(id=gid)
            self.tree.clear_commands(guild=target)
            try:
                await self.tree.sync(guild=target)
            except discord.HTTPException as exc:  # a server the bot left: say so, keep going
                log.warning("discord: could not clear commands in guild %s: %s", gid, exc)
                continue
            log.info("discord: cleared this bot's commands in guild %s", gid)

    # ------------------------------------------------------------------ commands

    def _add_commands(self, guild: Any) -> None:
        channel = self
        hint_max = max(1, min(self.settings.limits.max_hint_chars, 6000))
        contexts = app_commands.AppCommandContext(guild=True, dm_channel=True)
        installs = app_commands.AppInstallationType(guild=True)

        @app_commands.describe(
            image="The picture (JPEG, PNG, WebP, GIF, BMP or TIFF)",
            hint="Optional nudge for the joke",
        )
        async def joke(
            interaction: discord.Interaction,
            image: discord.Attachment,
            hint: app_commands.Range[str, 1, hint_max] | None = None,
        ) -> None:
            await channel.on_joke_command(interaction, image, hint)

        async def joke_about_message(
            interaction: discord.Interaction, target: discord.Message
        ) -> None:
            await channel.on_joke_context_menu(interaction, target)

        async def joke_help(interaction: discord.Interaction) -> None:
            await channel.on_help(interaction)

        commands = [
            app_commands.Command(
                name="joke",
                description="Tell a joke about a picture",
                callback=joke,
                allowed_contexts=contexts,
                allowed_installs=installs,
            ),
            app_commands.Command(
                name="joke-help",
                description="How to use the joke bot",
                callback=joke_help,
                allowed_contexts=contexts,
                allowed_installs=installs,
            ),
            app_commands.ContextMenu(
                name=CONTEXT_MENU_NAME,
                callback=joke_about_message,
                allowed_contexts=contexts,
                allowed_installs=installs,
            ),
        ]
        commands.append(self._mod_group())
        for command in commands:
            self.tree.add_command(command, guild=guild, override=True)

    def _mod_group(self) -> Any:
        """``/mod block|unblock|delete``: admin-only (hidden from others by Discord through
        ``default_permissions``, and checked again here: ``is_admin``)."""
        channel = self
        group = app_commands.Group(
            name="mod",
            description="Moderation (admins only)",
            default_permissions=discord.Permissions(administrator=True),
            allowed_contexts=app_commands.AppCommandContext(guild=True, dm_channel=True),
            allowed_installs=app_commands.AppInstallationType(guild=True),
        )

        @group.command(name="block", description="Refuse this user's requests everywhere")
        async def block(interaction: discord.Interaction, user: discord.User) -> None:
            await channel.on_mod(interaction, "block", f"{CHANNEL}:user:{user.id}")

        @group.command(name="unblock", description="Answer this user again")
        async def unblock(interaction: discord.Interaction, user: discord.User) -> None:
            await channel.on_mod(interaction, "unblock", f"{CHANNEL}:user:{user.id}")

        @group.command(name="delete", description="Delete a joke and keep it out of training")
        @app_commands.describe(joke="The joke's id (the number in its vote buttons)")
        async def delete(
            interaction: discord.Interaction, joke: app_commands.Range[int, 1, 2**62]
        ) -> None:
            await channel.on_mod_delete(interaction, joke)

        return group

    def is_admin(self, interaction: Any) -> bool:
        """An admin: listed in ``discord.admin_ids``, or an administrator of this server."""
        if interaction.user.id in self.config.admin_ids:
            return True
        permissions = getattr(interaction, "permissions", None)
        return bool(interaction.guild_id and permissions and permissions.administrator)

    async def on_mod(self, interaction: Any, action: str, subject: str) -> None:
        lang = language_of(interaction)
        if not self.is_admin(interaction):
            await interaction.response.send_message(text("admins_only", lang), ephemeral=True)
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        moderation = moderation_for(self.app)
        by = f"{CHANNEL}:user:{interaction.user.id}"
        try:
            if action == "block":
                done = await moderation.block(subject, by=by)
                key = "blocked" if done else "already_blocked"
            else:
                done = await moderation.unblock(subject)
                key = "unblocked" if done else "not_blocked"
            reply = text(key, lang, subject=subject)
        except ValueError:
            # the subject is a Discord user's (always valid): what moderation refuses is taking a
            # subject of the settings' block list off it, in English; say it in the admin's language
            if action != "unblock" or subject not in moderation.settings.block:
                raise
            error = text("mod_in_settings", lang, subject=subject)
            reply = text("mod_error", lang, error=error)
        except OogiriError as exc:
            reply = exc.user_message(lang)
        await interaction.followup.send(reply, ephemeral=True)

    async def on_mod_delete(self, interaction: Any, joke_id: int) -> None:
        lang = language_of(interaction)
        if not self.is_admin(interaction):
            await interaction.response.send_message(text("admins_only", lang), ephemeral=True)
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        by = f"{CHANNEL}:user:{interaction.user.id}"
        try:
            await moderation_for(self.app).remove_joke(joke_id, by=by)
            sent = await self.outbox.delivered_result(joke_id) if self.outbox else None
        except NotFound:
            await interaction.followup.send(
                text("no_such_joke", lang, joke_id=joke_id), ephemeral=True
            )
            return
        except OogiriError as exc:
            await interaction.followup.send(exc.user_message(lang), ephemeral=True)
            return
        deleted = False
        if sent and sent.get("channel_id") and sent.get("message_id"):
            try:
                await self.client.http.delete_message(sent["channel_id"], sent["message_id"])
                deleted = True
            except discord.HTTPException as exc:  # no right to delete there, or already gone
                log.warning("discord: could not delete joke %s's message: %s", joke_id, exc)
        key = "joke_deleted" if deleted else "joke_deleted_kept"
        await interaction.followup.send(text(key, lang, joke_id=joke_id), ephemeral=True)

    async def on_joke_command(self, interaction: Any, image: Any, hint: str | None = None) -> None:
        lang = language_of(interaction)
        source = _Source(
            url=image.url,
            filename=image.filename,
            content_type=image.content_type,
            size=image.size,
            spoiler=image.is_spoiler(),
        )
        problem = self._precheck(source, lang)
        if problem is not None:
            await interaction.response.send_message(problem, ephemeral=True)
            return
        await self._tell(interaction, source, lang, hint=hint, reupload=True)

    async def on_joke_context_menu(self, interaction: Any, target: Any) -> None:
        lang = language_of(interaction)
        source, too_large = find_image(target, self.max_bytes)
        if source is None:
            reason = (
                message("too_large", lang, limit_mb=format_mb(self.max_bytes))
                if too_large
                else text("no_image", lang)
            )
            await interaction.response.send_message(reason, ephemeral=True)
            return
        problem = self._precheck(source, lang)
        if problem is not None:
            await interaction.response.send_message(problem, ephemeral=True)
            return
        guild = interaction.guild_id or "@me"
        link = f"https://discord.com/channels/{guild}/{target.channel.id}/{target.id}"
        await self._tell(interaction, source, lang, reupload=False, footer=f"-# ↪ {link}")

    async def on_help(self, interaction: Any) -> None:
        lang = language_of(interaction)
        menu = ZH_COMMAND_TEXT[CONTEXT_MENU_NAME] if lang == "zh" else CONTEXT_MENU_NAME
        per_minute = self.settings.limits.per_user_per_minute or "∞"
        body = text(
            "help", lang, menu=menu, limit_mb=format_mb(self.max_bytes), per_minute=per_minute
        )
        await interaction.response.send_message(body, ephemeral=True)

    def _precheck(self, source: _Source, lang: str) -> str | None:
        """What can be refused from the interaction payload alone, before any download. The type
        first: a huge video is "not a picture", not "too big" (shrinking it would not help)."""
        if not source.embedded and not looks_like_image(source.content_type, source.filename):
            return message("not_image", lang)
        if source.size is not None and source.size > self.max_bytes:
            return message("too_large", lang, limit_mb=format_mb(self.max_bytes))
        return None

    async def _tell(
        self,
        interaction: Any,
        source: _Source,
        lang: str,
        *,
        hint: str | None = None,
        reupload: bool,
        footer: str | None = None,
    ) -> None:
        """Defer, admit (limits, moderation: before the download), download, tell; the joke's
        follow-up is stored with the joke (the outbox) and sent at once, or later if that fails."""
        await interaction.response.defer(thinking=True)
        request = JokeRequest(
            image_bytes=b"",
            channel=CHANNEL,
            user_id=str(interaction.user.id),
            chat_id=str(interaction.channel_id) if interaction.channel_id else None,
            hint=hint,
            language=lang,
            filename=source.filename,
            content_type=source.content_type,
            meta={
                "guild_id": interaction.guild_id,
                "interaction_id": interaction.id,
                "command": interaction.command.name if interaction.command else None,
            },
        )
        try:
            await self.service.admit(request)
        except Rejected as exc:
            refused = exc.key in ("blocked", "not_allowed")
            await self._fail(
                interaction, text("refused", lang) if refused else exc.user_message(lang)
            )
            return
        except OogiriError as exc:
            await self._fail(interaction, exc.user_message(lang))
            return
        try:
            request.image_bytes = data = await self.download(source.url)
            if self.outbox is not None:
                request.delivery = self.outbox.delivery(
                    f"discord:{interaction.id}",  # follow-ups answer their own interaction
                    {
                        "application_id": str(interaction.application_id),
                        "token": interaction.token,
                        "channel_id": str(interaction.channel_id or ""),
                        "hint": hint,
                        "footer": footer,
                        "filename": source.filename if reupload else None,
                        "spoiler": source.spoiler,
                    },
                )
            joke = await self.service.tell(request)
        except OogiriError as exc:
            await self._fail(interaction, exc.user_message(lang))
            return
        except (aiohttp.ClientError, TimeoutError, discord.HTTPException):
            log.warning("discord: could not fetch %s", source.url, exc_info=True)
            await self._fail(interaction, text("download_failed", lang))
            return
        if self.outbox is None or self.worker is None:  # stopping: nothing else can send it
            return
        if reupload and len(data) <= REUPLOAD_MAX_BYTES:
            self._fresh[joke.id] = data
        try:
            item = await self.outbox.for_joke(joke.id)
            if item is not None:
                await self.worker.send_now(item)
        except OogiriError:
            log.warning("discord: joke %s stored, its follow-up left to the outbox", joke.id)
        finally:
            self._fresh.pop(joke.id, None)

    async def _deliver(self, item: OutboxItem) -> dict[str, Any] | None:
        """Send one stored follow-up (the outbox's callback): the joke with its vote buttons."""
        payload = item.payload
        if item.joke_id is None:
            raise Undeliverable("an outbox row without a joke")
        if self.client is None:
            raise RetryLater("the discord channel is not running", 1.0)
        try:
            joke = await self.service.get_joke(item.joke_id)
        except NotFound:
            raise Undeliverable(f"joke {item.joke_id} no longer exists") from None
        if item.joke_id in await moderation_for(self.app).removed_jokes_cached():
            raise Undeliverable(f"joke {item.joke_id} was removed by an admin")
        lines = [joke.text]
        if payload.get("hint"):
            lines.append(f"-# 💡 {discord.utils.escape_markdown(payload['hint'])}")
        if payload.get("footer"):
            lines.append(payload["footer"])
        content = "\n".join(lines)
        if len(content) > MAX_CONTENT_CHARS:
            content = content[: MAX_CONTENT_CHARS - 1] + "…"
        files = []
        if payload.get("filename"):
            data = self._fresh.get(joke.id)
            name = PurePath(payload["filename"] or "image").name or "image"
            if data is None:  # a later attempt: the stored (normalised) picture
                data = await asyncio.to_thread(self.app.store.read_image, joke.image_sha256)
                name = PurePath(name).stem + ".jpg"
            if len(data) <= REUPLOAD_MAX_BYTES:
                spoiler = bool(payload.get("spoiler"))
                files.append(discord.File(io.BytesIO(data), filename=name, spoiler=spoiler))
        webhook = discord.Webhook.partial(
            int(payload["application_id"]), payload["token"], client=self.client
        )
        try:
            sent = await webhook.send(
                content=content,
                files=files,
                view=self.vote_view(joke.id, joke.up, joke.down),
                allowed_mentions=discord.AllowedMentions.none(),
                wait=True,
            )
        except (discord.NotFound, discord.Forbidden) as exc:  # the token expired (15 min)
            raise Undeliverable(f"{type(exc).__name__}: {exc}") from None
        except discord.HTTPException as exc:
            if exc.status >= 500 or exc.status == 429:
                raise RetryLater(f"HTTP {exc.status}: {exc}") from None
            raise Undeliverable(f"HTTP {exc.status}: {exc}") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RetryLater(f"{type(exc).__name__}: {exc}") from None
        return {"channel_id": str(sent.channel.id), "message_id": str(sent.id)}

    async def _fail(self, interaction: Any, reason: str) -> None:
        """Replace the public "thinking…" message with an ephemeral explanation."""
        try:
            await interaction.delete_original_response()
        except discord.HTTPException:
            log.debug("discord: could not delete the deferred response", exc_info=True)
        await interaction.followup.send(reason, ephemeral=True)

    async def download(self, url: str) -> bytes:
        """Fetch a picture, refusing (without reading on) anything over the byte limit."""
        limit = self.max_bytes
        too_large = ImageRejected("too_large", limit_mb=format_mb(limit))
        async with self._http.get(url) as response:
            response.raise_for_status()
            if response.content_length is not None and response.content_length > limit:
                raise too_large
            buffer = bytearray()
            async for chunk in response.content.iter_chunked(64 * 1024):
                buffer += chunk
                if len(buffer) > limit:
                    raise too_large
        return bytes(buffer)

    async def _on_tree_error(self, interaction: Any, error: Exception) -> None:
        log.error("discord: command failed", exc_info=error)
        reason = text("failed", language_of(interaction))
        try:
            if not interaction.response.is_done():
                await interaction.response.send_message(reason, ephemeral=True)
            elif await self._thinking_in_public(interaction):
                # The first follow-up would fill the public "thinking…" message (its flag ignored)
                # for the whole channel to see: remove that message, then tell the user alone.
                await self._fail(interaction, reason)
            else:
                await interaction.followup.send(reason, ephemeral=True)
        except discord.HTTPException:
            log.debug("discord: could not report the failure", exc_info=True)

    async def _thinking_in_public(self, interaction: Any) -> bool:
        """Whether the response is still a public "thinking…" (a deferral nothing filled in)."""
        if interaction.response.type != discord.InteractionResponseType.deferred_channel_message:
            return False
        try:
            original = await interaction.original_response()
        except discord.DiscordException:  # unknown: never delete what may already be the joke
            log.debug("discord: could not read the deferred response", exc_info=True)
            return False
        return bool(original.flags.loading and not original.flags.ephemeral)

    # ------------------------------------------------------------------ votes

    def vote_view(self, joke_id: int, up: int = 0, down: int = 0) -> Any:
        view = discord.ui.View(timeout=None)
        view.add_item(self.vote_item(joke_id, "up", up))
        view.add_item(self.vote_item(joke_id, "down", down))
        return view

    async def on_vote(self, interaction: Any, joke_id: int, value: str) -> None:
        """Acknowledge first (a deferred update, well inside Discord's 3 s), then write the vote,
        then edit the buttons — only when the counts changed."""
        lang = language_of(interaction)
        await interaction.response.defer()
        try:
            rating = await self.service.rate(
                joke_id,
                str(interaction.user.id),
                1 if value == "up" else -1,
                CHANNEL,
                chat_id=str(interaction.channel_id) if interaction.channel_id else None,
            )
        except OogiriError as exc:
            await interaction.followup.send(exc.user_message(lang), ephemeral=True)
            return
        except Exception:
            log.exception("discord: could not record a vote on joke %s", joke_id)
            await interaction.followup.send(text("failed", lang), ephemeral=True)
            return
        if rating.previous == rating.value:
            return  # the same vote again: nothing to show
        try:
            await interaction.edit_original_response(
                view=self.vote_view(joke_id, rating.up, rating.down)
            )
        except discord.HTTPException as exc:  # the vote is stored; stale counts are cosmetic
            log.warning("discord: could not update the counts of joke %s: %s", joke_id, exc)

    def _make_vote_item(self) -> type:
        channel = self

        class VoteButton(
            discord.ui.DynamicItem[discord.ui.Button], template=re.compile(VOTE_TEMPLATE)
        ):
            """👍 n / 👎 n; the custom_id is all the state there is."""

            def __init__(self, joke_id: int, value: str, count: int = 0) -> None:
                super().__init__(
                    discord.ui.Button(
                        style=(
                            discord.ButtonStyle.success
                            if value == "up"
                            else discord.ButtonStyle.secondary
                        ),
                        label=str(count),
                        emoji=VOTE_EMOJI[value],
                        custom_id=vote_custom_id(joke_id, value),
                    )
                )
                self.joke_id = joke_id
                self.value = value

            @classmethod
            async def from_custom_id(
                cls, interaction: Any, item: Any, match: re.Match[str], /
            ) -> "VoteButton":
                count = int(item.label) if (item.label or "").isdigit() else 0
                return cls(int(match["joke_id"]), match["value"], count)

            async def callback(self, interaction: Any) -> None:
                await channel.on_vote(interaction, self.joke_id, self.value)

        return VoteButton


def find_image(target: Any, max_bytes: int | None = None) -> tuple[_Source | None, bool]:
    """``(picture, too_large)``: the first attachment of an accepted type that fits
    ``max_bytes``, else an embed's image or thumbnail; ``too_large`` when only oversized
    pictures were attached."""
    too_large = False
    for attachment in target.attachments:
        if not looks_like_image(attachment.content_type, attachment.filename):
            continue
        if max_bytes is not None and attachment.size and attachment.size > max_bytes:
            too_large = True
            continue
        return (
            _Source(
                url=attachment.url,
                filename=attachment.filename,
                content_type=attachment.content_type,
                size=attachment.size,
                spoiler=attachment.is_spoiler(),
            ),
            False,
        )
    for embed in target.embeds:
        for media in (embed.image, embed.thumbnail):
            # Discord's media proxy first: it fetched the picture already and serves it publicly;
            # otherwise only a public https URL (never a plain-http or internal address).
            url = getattr(media, "proxy_url", None)
            if not url:
                url = getattr(media, "url", None)
                if not (url and url.startswith("https://")):
                    continue
            if url.startswith(("https://", "http://")):
                name = PurePath(yarl.URL(url).path).name or None
                embedded = _Source(
                    url=url, filename=name, content_type=None, size=None, embedded=True
                )
                return embedded, False
    return None, too_large


def _make_translator() -> Any:
    class Translator(app_commands.Translator):
        async def translate(self, string: Any, locale: Any, context: Any) -> str | None:
            if str(getattr(locale, "value", locale)).startswith("zh"):
                return ZH_COMMAND_TEXT.get(string.message)
            return None

    return Translator()


@hookimpl
def oogiri_register_settings(register: Callable[..., None]) -> None:
    register("discord", DiscordSettings)


@hookimpl
def oogiri_register_channels(register: Callable[..., None], settings: Any) -> None:
    register(CHANNEL, DiscordChannel)


class _SettingsOnly:
    """What ``DiscordChannel`` needs of an app to sync commands: the settings."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings


@hookimpl
def oogiri_register_commands(cli: Any) -> None:
    import typer

    group = typer.Typer(
        help="Discord: publish the slash commands (once per release, not per replica).",
        no_args_is_help=True,
    )

    @group.command("sync")
    def sync(
        guild: int | None = typer.Option(
            None, "--guild", help="this server only (shows at once; for testing)"
        ),
    ) -> None:
        """Send the bot's command list to Discord (global lists can take a while to show)."""
        from bot.settings import Settings

        settings = Settings()
        channel = DiscordChannel(_SettingsOnly(settings))  # type: ignore[arg-type]
        try:
            synced = asyncio.run(channel.sync_commands(guild))
        except RuntimeError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        names = ", ".join(sorted(c.name for c in synced))
        where = f"to server {guild}" if guild else "globally"
        typer.echo(f"synced {len(synced)} commands {where}: {names}")

    cli.add_typer(group, name="discord")
