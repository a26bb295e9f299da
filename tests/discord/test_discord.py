"""The Discord channel against a fake Discord on 127.0.0.1.

discord.py's own HTTP client (REST, webhooks, CDN) and gateway client (HELLO, IDENTIFY, READY,
heartbeats, zlib-stream) run unmodified; only its REST base and gateway URL point at the fake.
"""

from __future__ import annotations

import asyncio
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from fakediscord import EPHEMERAL, LOADING, FakeDiscord

import plugins.discord_bot as discord_bot
import plugins.moderation as moderation_plugin
from bot.app import App
from bot.engines.instant import InstantEngine
from bot.models import message
from bot.plugins import make_manager
from bot.settings import LimitSettings, Settings
from plugins.discord_bot import DiscordSettings

ROOT = Path(__file__).resolve().parents[2]
GUILD = "81384788769906688"  # a snowflake whose shard is 1 of 2
CHANNEL = "381870553235193857"
WAIT = 10.0


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    server = await FakeDiscord().start()
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture
def chelsea(fake: FakeDiscord, chelsea_png: bytes) -> dict[str, Any]:
    return fake.add_file("chelsea.png", chelsea_png, "image/png", channel_id=CHANNEL)


AppFactory = Callable[..., Awaitable[App]]


class GatedEngine(InstantEngine):
    """Holds every generation until ``gate`` is set, to observe the deferred state."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def generate(self, image: Any, prompt: str, params: Any) -> Any:
        self.entered.set()
        await self.gate.wait()
        return await super().generate(image, prompt, params)


@pytest.fixture
async def make_app(tmp_path: Path, fake: FakeDiscord) -> AsyncIterator[AppFactory]:
    """Start an App with only the Discord channel (plugin registered as the entry point does)."""
    apps: list[App] = []

    async def factory(
        engine: InstantEngine | None = None,
        limits: LimitSettings | None = None,
        **discord: Any,
    ) -> App:
        config = {
            "token": fake.token,
            "api_base_url": fake.api_base,
            "sync_on_start": True,  # a single dev bot; see test_no_sync_at_start_by_default
            "outbox_poll_s": 0.1,
            **discord,
        }
        settings = Settings(
            data_dir=tmp_path,
            channels=["discord"],
            plugins=[],
            discord=DiscordSettings(**config),
            limits=limits or LimitSettings(),
        )
        pm = make_manager(only=[])
        pm.register(discord_bot, name="discord")
        pm.register(moderation_plugin, name="moderation")
        app = await App.create(settings, pm=pm, engine=engine or InstantEngine())
        apps.append(app)
        await asyncio.wait_for(app.start_channels(), WAIT)
        return app

    try:
        yield factory
    finally:
        for app in apps:
            await asyncio.wait_for(app.close(), WAIT)


def buttons(msg: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for row in msg["components"] for c in row["components"]]


def counts(msg: dict[str, Any]) -> tuple[str, str]:
    up, down = buttons(msg)
    return up["label"], down["label"]


async def joke_in_guild(fake: FakeDiscord, image: dict[str, Any]) -> Any:
    """A new user runs ``/joke image:<image>`` in the test guild's channel."""
    return await fake.slash(
        "joke",
        user=fake.new_user(),
        channel_id=CHANNEL,
        guild_id=GUILD,
        attachments={"image": image},
    )


async def answered(fake: FakeDiscord, interaction: Any) -> dict[str, Any]:
    """Wait for the joke (or error) message that finishes a deferred interaction."""

    def done() -> dict[str, Any] | None:
        for mid in [interaction.original_id, *interaction.followups]:
            msg = fake.messages.get(mid or "")
            if msg is not None and not msg["flags"] & LOADING:
                return msg
        return None

    return await fake.wait_until(done, WAIT)


# --------------------------------------------------------------------------- startup


async def test_startup_syncs_commands_minimal_intents_compressed_gateway(
    fake: FakeDiscord, make_app: AppFactory
) -> None:
    app = await make_app()
    [identify] = fake.identifies
    assert identify["intents"] == 0  # no intents at all, let alone privileged ones
    assert identify["token"] == fake.token
    import discord.utils

    expected = discord.utils._ActiveDecompressionContext.COMPRESSION_TYPE
    assert fake.gateway_queries[0]["compress"] == expected
    assert fake.gateway_queries[0]["encoding"] == "json"
    # no gateway_url in settings: discovered through GET /gateway/bot on the REST base
    assert ("GET", "/api/v10/gateway/bot") in fake.requests
    assert ("GET", "/api/v10/users/@me") in fake.requests

    [(scope, body)] = fake.command_puts
    assert scope is None  # global
    by_name = {c["name"]: c for c in body}
    assert set(by_name) == {"joke", "joke-help", "Joke about this image", "mod"}
    # /mod is hidden from everyone but administrators (Discord enforces default permissions)
    assert str(by_name["mod"]["default_member_permissions"]) == "8"
    assert {o["name"] for o in by_name["mod"]["options"]} == {"block", "unblock", "delete"}
    joke = by_name["joke"]
    assert joke["type"] == 1
    options = {o["name"]: o for o in joke["options"]}
    assert options["image"]["type"] == 11 and options["image"]["required"] is True
    assert options["hint"]["type"] == 3 and not options["hint"].get("required")
    assert options["hint"]["max_length"] == app.settings.limits.max_hint_chars
    assert sorted(joke["contexts"]) == [0, 1]  # guilds and bot DMs
    assert by_name["Joke about this image"]["type"] == 3
    assert joke["description_localizations"]["zh-CN"].startswith("根据图片")

    # heartbeats are acknowledged and the connection stays up
    await fake.wait_until(lambda: fake.sessions and fake.sessions[0].heartbeats >= 2, WAIT)
    if expected == "zlib-stream":  # discord.py without zstandard (this project's default)
        # READY arrived split over two frames: discord.py buffered until the Z_SYNC_FLUSH tail
        assert fake.sessions[0].split_messages >= 1
    assert fake.sessions[0].session_id == "session-1"


async def test_dev_guild_sync(fake: FakeDiscord, make_app: AppFactory, chelsea: dict) -> None:
    await make_app(dev_guild_id=int(GUILD))
    [(scope, body)] = fake.command_puts
    assert scope == GUILD
    assert {c["name"] for c in body} == {"joke", "joke-help", "Joke about this image", "mod"}
    assert None not in fake.commands
    user = fake.new_user()
    interaction = await fake.slash(
        "joke", user=user, channel_id=CHANNEL, guild_id=GUILD, attachments={"image": chelsea}
    )
    msg = await answered(fake, interaction)
    assert len(buttons(msg)) == 2


async def test_moving_from_a_dev_guild_to_global_clears_the_old_guild(
    fake: FakeDiscord, make_app: AppFactory
) -> None:
    """Guild commands outlive a move to global ones (every command shown twice) unless cleared."""
    names = {"joke", "joke-help", "Joke about this image", "mod"}
    app = await make_app(dev_guild_id=int(GUILD))
    await app.close()
    assert {c["name"] for c in fake.commands[GUILD]} == names
    fake.command_puts.clear()
    await make_app(clear_guild_ids=[int(GUILD)])
    scopes = {scope: body for scope, body in fake.command_puts}
    assert {c["name"] for c in scopes[None]} == names
    assert scopes[GUILD] == [] and fake.commands[GUILD] == []


async def test_dev_guild_is_never_cleared(fake: FakeDiscord, make_app: AppFactory) -> None:
    await make_app(dev_guild_id=int(GUILD), clear_guild_ids=[int(GUILD)])
    assert [scope for scope, _ in fake.command_puts] == [GUILD]
    assert len(fake.commands[GUILD]) == 4


# --------------------------------------------------------------------------- /joke


async def test_slash_command_real_image_defers_then_follows_up_with_buttons(
    fake: FakeDiscord, make_app: AppFactory, chelsea: dict
) -> None:
    engine = GatedEngine()
    app = await make_app(engine=engine)
    user = fake.new_user("alice")
    interaction = await fake.slash(
        "joke",
        user=user,
        channel_id=CHANNEL,
        guild_id=GUILD,
        attachments={"image": chelsea},
        options=[{"name": "hint", "type": 3, "value": "cats **rule**"}],
    )
    # deferred (thinking, public) while the engine is still working on it
    await fake.wait_until(lambda: interaction.callbacks, WAIT)
    await asyncio.wait_for(engine.entered.wait(), WAIT)
    assert interaction.callbacks[0]["type"] == 5
    thinking = fake.messages[interaction.original_id]
    assert thinking["flags"] & LOADING and not thinking["flags"] & EPHEMERAL
    assert interaction.callback_times[0] < 3.0  # Discord's deadline
    engine.gate.set()

    msg = await answered(fake, interaction)
    assert msg["id"] == interaction.original_id  # the thinking message became the joke
    assert not msg["flags"] & EPHEMERAL
    assert engine.calls == 1
    assert fake.hits_for(chelsea) == 1

    [joke_row] = [await app.service.get_joke(1)]
    assert msg["content"].startswith(joke_row.text)
    assert "cats \\*\\*rule\\*\\*" in msg["content"]  # the hint, markdown escaped
    assert "提示：cats **rule**" in joke_row.prompt
    assert joke_row.channel == "discord"
    assert joke_row.user_id == user["id"]
    assert joke_row.chat_id == CHANNEL

    up, down = buttons(msg)
    assert (up["emoji"]["name"], up["label"], up["custom_id"]) == ("👍", "0", "oogiri:vote:1:up")
    assert (down["emoji"]["name"], down["label"], down["custom_id"]) == (
        "👎",
        "0",
        "oogiri:vote:1:down",
    )
    # the picture travels with the joke (the slash-command attachment is not shown to others)
    [attachment] = msg["attachments"]
    assert attachment["filename"] == "chelsea.png"
    assert fake.file_bytes(attachment) == fake.file_bytes(chelsea)
    assert fake.visible_messages(CHANNEL) == [msg]


async def test_slash_command_in_a_dm(
    fake: FakeDiscord, make_app: AppFactory, chelsea: dict
) -> None:
    app = await make_app()
    user = fake.new_user("bob")
    dm = fake.snowflake()
    interaction = await fake.slash("joke", user=user, channel_id=dm, attachments={"image": chelsea})
    msg = await answered(fake, interaction)
    assert len(buttons(msg)) == 2
    joke = await app.service.get_joke(1)
    assert joke.chat_id == dm and joke.user_id == user["id"]


async def test_oversize_attachment_is_refused_without_downloading(
    fake: FakeDiscord, make_app: AppFactory, chelsea_png: bytes
) -> None:
    engine = InstantEngine()
    await make_app(engine=engine, max_attachment_bytes=1024 * 1024)
    big = fake.add_file("huge.png", chelsea_png, "image/png", size=50 * 1024 * 1024)
    interaction = await fake.slash(
        "joke", user=fake.new_user(), channel_id=CHANNEL, guild_id=GUILD, attachments={"image": big}
    )
    await fake.wait_until(lambda: interaction.callbacks, WAIT)
    [callback] = interaction.callbacks
    assert callback["type"] == 4
    assert callback["data"]["flags"] & EPHEMERAL
    assert callback["data"]["content"] == message("too_large", "en", limit_mb="1")
    assert fake.hits_for(big) == 0
    assert engine.calls == 0
    assert fake.visible_messages(CHANNEL) == []


async def test_download_is_capped_when_the_declared_size_lies(
    fake: FakeDiscord, make_app: AppFactory, chelsea_png: bytes
) -> None:
    engine = InstantEngine()
    await make_app(engine=engine, max_attachment_bytes=64 * 1024)
    assert len(chelsea_png) > 64 * 1024
    liar = fake.add_file("small.png", chelsea_png, "image/png", size=1000)
    interaction = await joke_in_guild(fake, liar)
    msg = await answered(fake, interaction)
    assert msg["flags"] & EPHEMERAL
    assert msg["content"] == message("too_large", "en", limit_mb="0.1")
    assert interaction.deleted_original
    assert engine.calls == 0
    assert fake.visible_messages(CHANNEL) == []


async def test_non_image_attachment_is_refused_before_download(
    fake: FakeDiscord, make_app: AppFactory
) -> None:
    await make_app()
    doc = fake.add_file("notes.txt", b"hello world", "text/plain; charset=utf-8")
    interaction = await fake.slash(
        "joke",
        user=fake.new_user(),
        channel_id=CHANNEL,
        guild_id=GUILD,
        attachments={"image": doc},
        locale="zh-CN",
    )
    await fake.wait_until(lambda: interaction.callbacks, WAIT)
    [callback] = interaction.callbacks
    assert callback["type"] == 4 and callback["data"]["flags"] & EPHEMERAL
    assert callback["data"]["content"] == message("not_image", "zh")
    assert fake.hits_for(doc) == 0


async def test_image_content_type_that_is_not_an_image(
    fake: FakeDiscord, make_app: AppFactory
) -> None:
    engine = InstantEngine()
    await make_app(engine=engine)
    fake_png = fake.add_file("cat.png", b"<html>not a picture</html>" * 10, "image/png")
    interaction = await joke_in_guild(fake, fake_png)
    msg = await answered(fake, interaction)
    assert interaction.callbacks[0]["type"] == 5
    assert interaction.deleted_original
    assert msg["flags"] & EPHEMERAL
    assert msg["content"] == message("not_image", "en")
    assert engine.calls == 0
    assert fake.visible_messages(CHANNEL) == []


async def test_picture_gone_from_the_cdn(fake: FakeDiscord, make_app: AppFactory) -> None:
    await make_app()
    gone = fake.add_file("gone.png", b"", "image/png", size=1234)
    del fake.files[gone["url"].split("/attachments/", 1)[1]]  # the CDN answers 404
    interaction = await joke_in_guild(fake, gone)
    msg = await answered(fake, interaction)
    assert interaction.deleted_original and msg["flags"] & EPHEMERAL
    assert msg["content"] == discord_bot.text("download_failed", "en")


async def test_engine_down_gives_a_friendly_ephemeral_error(
    fake: FakeDiscord, make_app: AppFactory, chelsea: dict
) -> None:
    await make_app(engine=InstantEngine(fail=True))
    interaction = await joke_in_guild(fake, chelsea)
    msg = await answered(fake, interaction)
    assert interaction.callbacks[0]["type"] == 5
    assert interaction.deleted_original
    assert msg["flags"] & EPHEMERAL
    assert msg["content"] == message("engine_error", "en")
    assert msg["components"] == []
    assert fake.visible_messages(CHANNEL) == []


async def test_rate_limit_from_the_core(
    fake: FakeDiscord, make_app: AppFactory, chelsea: dict
) -> None:
    engine = InstantEngine()
    await make_app(engine=engine, limits=LimitSettings(per_user_per_minute=1))
    user = fake.new_user()
    first = await fake.slash(
        "joke", user=user, channel_id=CHANNEL, guild_id=GUILD, attachments={"image": chelsea}
    )
    assert buttons(await answered(fake, first))
    second = await fake.slash(
        "joke", user=user, channel_id=CHANNEL, guild_id=GUILD, attachments={"image": chelsea}
    )
    msg = await answered(fake, second)
    assert msg["flags"] & EPHEMERAL
    assert msg["content"].startswith("Slow down a little")
    assert engine.calls == 1


async def test_help_is_ephemeral_and_localised(fake: FakeDiscord, make_app: AppFactory) -> None:
    await make_app()
    en = await fake.slash("joke-help", user=fake.new_user(), channel_id=CHANNEL, guild_id=GUILD)
    zh = await fake.slash("joke-help", user=fake.new_user(), channel_id=CHANNEL, locale="zh-CN")
    await fake.wait_until(lambda: en.callbacks and zh.callbacks, WAIT)
    for interaction in (en, zh):
        [callback] = interaction.callbacks
        assert callback["type"] == 4 and callback["data"]["flags"] & EPHEMERAL
    assert "/joke image:" in en.callbacks[0]["data"]["content"]
    assert "Joke about this image" in en.callbacks[0]["data"]["content"]
    assert "10 MB" in en.callbacks[0]["data"]["content"]
    assert "用这张图讲个梗" in zh.callbacks[0]["data"]["content"]


# --------------------------------------------------------------------------- context menu


async def test_context_menu_on_a_message_with_an_image(
    fake: FakeDiscord, make_app: AppFactory, chelsea_png: bytes
) -> None:
    app = await make_app()
    author = fake.new_user("poster")
    photo = fake.add_file("IMG_0001.png", chelsea_png, "image/png", channel_id=CHANNEL)
    doc = fake.add_file("readme.txt", b"text", "text/plain")
    target = fake.post_user_message(
        author=author, channel_id=CHANNEL, guild_id=GUILD, content="look", attachments=[doc, photo]
    )
    asker = fake.new_user("asker")
    interaction = await fake.message_command(
        "Joke about this image", target, user=asker, guild_id=GUILD
    )
    msg = await answered(fake, interaction)
    assert interaction.callbacks[0]["type"] == 5
    joke = await app.service.get_joke(1)
    assert msg["content"].startswith(joke.text)
    assert f"https://discord.com/channels/{GUILD}/{CHANNEL}/{target['id']}" in msg["content"]
    assert counts(msg) == ("0", "0")
    assert msg["attachments"] == []  # the picture is already in the channel
    assert fake.hits_for(photo) == 1 and fake.hits_for(doc) == 0
    assert joke.user_id == asker["id"]


async def test_context_menu_on_an_embedded_image(
    fake: FakeDiscord, make_app: AppFactory, chelsea_png: bytes
) -> None:
    await make_app()
    hosted = fake.add_file("cat.png", chelsea_png, "image/png")
    embed = {
        "type": "image",
        "url": "https://example.com/cat.png",
        "thumbnail": {"url": "https://example.com/cat.png", "proxy_url": hosted["url"]},
    }
    target = fake.post_user_message(
        author=fake.new_user(), channel_id=CHANNEL, guild_id=GUILD, embeds=[embed]
    )
    interaction = await fake.message_command(
        "Joke about this image", target, user=fake.new_user(), guild_id=GUILD
    )
    msg = await answered(fake, interaction)
    assert len(buttons(msg)) == 2
    assert fake.hits_for(hosted) == 1


async def test_context_menu_on_a_message_without_an_image(
    fake: FakeDiscord, make_app: AppFactory
) -> None:
    await make_app()
    target = fake.post_user_message(
        author=fake.new_user(), channel_id=CHANNEL, guild_id=GUILD, content="just words"
    )
    interaction = await fake.message_command(
        "Joke about this image", target, user=fake.new_user(), guild_id=GUILD
    )
    await fake.wait_until(lambda: interaction.callbacks, WAIT)
    [callback] = interaction.callbacks
    assert callback["type"] == 4 and callback["data"]["flags"] & EPHEMERAL
    assert callback["data"]["content"] == discord_bot.text("no_image", "en")


# --------------------------------------------------------------------------- votes


async def tell_one(fake: FakeDiscord, chelsea: dict[str, Any]) -> dict[str, Any]:
    interaction = await joke_in_guild(fake, chelsea)
    msg = await answered(fake, interaction)
    assert counts(msg) == ("0", "0")
    return msg


async def press(
    fake: FakeDiscord, msg: dict[str, Any], which: int, user: dict[str, Any], **kw: Any
) -> Any:
    interaction = await fake.press(
        msg["id"], buttons(msg)[which]["custom_id"], user=user, guild_id=GUILD, **kw
    )
    await fake.wait_until(lambda: interaction.callbacks, WAIT)
    return interaction


async def shows(fake: FakeDiscord, msg: dict[str, Any], expected: tuple[str, str]) -> None:
    """Wait until the joke message's buttons show ``expected`` counts."""
    await fake.wait_until(lambda: counts(fake.messages[msg["id"]]) == expected, WAIT)


async def test_vote_and_change_vote(fake: FakeDiscord, make_app: AppFactory, chelsea: dict) -> None:
    app = await make_app()
    msg = await tell_one(fake, chelsea)
    alice, bob = fake.new_user("alice"), fake.new_user("bob")

    first = await press(fake, msg, 0, alice)
    # acknowledged first (a deferred update: never "This interaction failed"), then edited
    assert first.callbacks[0]["type"] == 6
    await shows(fake, msg, ("1", "0"))

    await press(fake, msg, 1, bob)
    await shows(fake, msg, ("1", "1"))

    await press(fake, msg, 1, alice)  # alice changes her mind
    await shows(fake, msg, ("0", "2"))

    again = await press(fake, msg, 1, alice)  # pressing again is not a second vote …
    await asyncio.sleep(0.3)
    assert counts(fake.messages[msg["id"]]) == ("0", "2")
    edited = [r for r in fake.requests if r[0] == "PATCH" and again.token in r[1]]
    assert edited == []  # … and no edit is sent for it

    assert sorted(await app.store.ratings_for(1)) == sorted([(alice["id"], -1), (bob["id"], -1)])
    assert fake.messages[msg["id"]]["content"] == msg["content"]  # text untouched


async def test_vote_from_another_channel_is_refused(
    fake: FakeDiscord, make_app: AppFactory, chelsea: dict
) -> None:
    app = await make_app()
    msg = await tell_one(fake, chelsea)
    forged = await press(fake, msg, 0, fake.new_user(), channel_id=fake.snowflake())
    [callback] = forged.callbacks
    assert callback["type"] == 6
    await fake.wait_until(lambda: forged.followups, WAIT)
    refusal = fake.messages[forged.followups[0]]
    assert refusal["flags"] & EPHEMERAL
    assert refusal["content"] == message("no_such_joke", "en")
    assert await app.store.ratings_for(1) == []


async def test_buttons_work_after_a_restart(
    fake: FakeDiscord, make_app: AppFactory, chelsea: dict
) -> None:
    first_app = await make_app()
    msg = await tell_one(fake, chelsea)
    await press(fake, msg, 0, fake.new_user("alice"))
    await asyncio.wait_for(first_app.close(), WAIT)
    await fake.wait_until(lambda: not fake.sessions, WAIT)

    second_app = await make_app()  # a new client, the same SQLite store
    assert len(fake.identifies) == 2
    interaction = await press(fake, fake.messages[msg["id"]], 0, fake.new_user("bob"))
    assert interaction.callbacks[0]["type"] == 6
    await shows(fake, msg, ("2", "0"))
    assert len(await second_app.store.ratings_for(1)) == 2


async def test_reconnects_and_resumes_after_the_gateway_drops(
    fake: FakeDiscord, make_app: AppFactory, chelsea: dict
) -> None:
    await make_app()
    await fake.drop_connections(code=4000)
    await fake.wait_until(lambda: fake.resumes and fake.ready_sessions(), WAIT)
    [resume] = fake.resumes
    assert resume["session_id"] == "session-1"
    assert len(fake.identifies) == 1  # resumed, not re-identified
    interaction = await joke_in_guild(fake, chelsea)
    assert len(buttons(await answered(fake, interaction))) == 2


# --------------------------------------------------------------------------- sharding and setup


async def test_sharded_client_identifies_its_shard(
    fake: FakeDiscord, make_app: AppFactory, chelsea: dict
) -> None:
    app = await make_app(shard_count=2, shard_ids=[1], gateway_url=fake.gateway_url)
    [channel] = app.channels
    import discord

    assert isinstance(channel.client, discord.AutoShardedClient)
    [identify] = fake.identifies
    assert identify["shard"] == [1, 2]
    assert ("GET", "/api/v10/gateway/bot") not in fake.requests  # gateway_url given
    assert (int(GUILD) >> 22) % 2 == 1
    interaction = await joke_in_guild(fake, chelsea)
    assert len(buttons(await answered(fake, interaction))) == 2


async def test_bad_token_fails_start(fake: FakeDiscord, make_app: AppFactory) -> None:
    import discord
    from discord.http import Route

    before = Route.BASE
    with pytest.raises(discord.LoginFailure):
        await make_app(token="wrong")
    assert Route.BASE == before  # endpoints restored


async def test_missing_token_is_a_clear_error(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path, plugins=[], channels=["discord"], discord=DiscordSettings(token=None)
    )
    pm = make_manager(only=[])
    pm.register(discord_bot, name="discord")
    app = await App.create(settings, pm=pm, engine=InstantEngine())
    try:
        with pytest.raises(RuntimeError, match="OOGIRI_DISCORD__TOKEN"):
            await app.start_channels()
    finally:
        await app.close()


def test_registered_as_the_discord_entry_point() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["entry-points"]["oogiri"]["discord"] == "plugins.discord_bot"
    pm = make_manager(only=[])
    pm.register(discord_bot, name="discord")
    registered: dict[str, Any] = {}
    pm.hook.oogiri_register_channels(register=registered.__setitem__, settings=Settings())
    assert registered == {"discord": discord_bot.DiscordChannel}


def test_looks_like_image() -> None:
    assert discord_bot.looks_like_image("image/png", "x.txt")
    assert discord_bot.looks_like_image("IMAGE/JPEG; q=1", None)
    assert not discord_bot.looks_like_image("text/plain", "x.png")
    assert discord_bot.looks_like_image(None, "photo.JPG")
    assert not discord_bot.looks_like_image(None, "archive.zip")
    assert discord_bot.format_mb(10 * 1024 * 1024) == "10"
    assert discord_bot.format_mb(1536 * 1024) == "1.5"
