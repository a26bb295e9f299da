# ruff: noqa: F811  (the fixtures of test_discord.py are imported by name)
"""Discord under its limits: votes deferred first, follow-ups kept in the outbox, the context
menu's first picture that fits, the core's list of image types, commands synced on demand,
admin-only moderation — against the fake Discord on 127.0.0.1."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from fakediscord import EPHEMERAL, FakeDiscord
from test_discord import (  # noqa: F401  (fixtures)
    CHANNEL,
    GUILD,
    WAIT,
    AppFactory,
    DiscordSettings,
    answered,
    buttons,
    chelsea,
    fake,
    make_app,
)
from typer.testing import CliRunner

import plugins.discord_bot as discord_bot
from bot.outbox import Outbox
from bot.settings import LimitSettings, Settings


async def outbox_counts(app: Any) -> dict[str, int]:
    return await Outbox(app.store, "discord").counts()


# --------------------------------------------------------------------------- command sync


async def test_no_sync_at_start_by_default_and_sync_on_demand(
    fake: FakeDiscord, make_app: AppFactory, tmp_path: Path
) -> None:
    await make_app(sync_on_start=None)  # production default: no dev guild, no sync
    assert fake.command_puts == []
    settings = Settings(
        data_dir=tmp_path / "cli",
        plugins=[],
        discord=DiscordSettings(token=fake.token, api_base_url=fake.api_base),
    )
    channel = discord_bot.DiscordChannel(discord_bot._SettingsOnly(settings))  # type: ignore[arg-type]
    synced = await channel.sync_commands()
    assert {c.name for c in synced} == {"joke", "joke-help", "Joke about this image", "mod"}
    assert [scope for scope, _ in fake.command_puts] == [None]
    await channel.sync_commands(int(GUILD))
    assert [scope for scope, _ in fake.command_puts] == [None, GUILD]


def test_discord_sync_cli_needs_a_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import typer

    monkeypatch.delenv("OOGIRI_DISCORD__TOKEN", raising=False)
    (tmp_path / "empty.toml").write_text("")  # not the working directory's oogiri.toml
    monkeypatch.setenv("OOGIRI_CONFIG_FILE", str(tmp_path / "empty.toml"))
    cli = typer.Typer()
    discord_bot.oogiri_register_commands(cli=cli)
    result = CliRunner().invoke(cli, ["discord", "sync", "--guild", "5"])
    assert result.exit_code == 2
    assert "OOGIRI_DISCORD__TOKEN" in result.output


# --------------------------------------------------------------------------- the outbox


async def test_follow_up_lost_on_the_network_is_delivered_later_once(
    fake: FakeDiscord, make_app: AppFactory, chelsea: dict
) -> None:
    app = await make_app()
    fake.drop_followups = 1
    interaction = await fake.slash(
        "joke",
        user=fake.new_user(),
        channel_id=CHANNEL,
        guild_id=GUILD,
        attachments={"image": chelsea},
    )
    await fake.wait_until(
        lambda: (
            ("DROPPED", f"/api/v10/webhooks/{fake.app_id}/{interaction.token}") in fake.requests
        ),
        WAIT,
    )
    msg = await answered(fake, interaction)
    assert len(buttons(msg)) == 2
    await fake.wait_until(lambda: True, WAIT)
    for _ in range(100):
        if await outbox_counts(app) == {"delivered": 1}:
            break
        await asyncio.sleep(0.05)
    assert await outbox_counts(app) == {"delivered": 1}
    jokes = [m for m in fake.visible_messages(CHANNEL) if m.get("components")]
    assert len(jokes) == 1  # delivered once
    assert jokes[0]["attachments"]  # the picture came along (the stored copy)


# --------------------------------------------------------------------------- image types


async def test_context_menu_takes_the_first_picture_that_fits(
    fake: FakeDiscord, make_app: AppFactory, chelsea_png: bytes
) -> None:
    await make_app(max_attachment_bytes=1024 * 1024)
    big = fake.add_file("huge.png", chelsea_png, "image/png", size=50 * 1024 * 1024)
    heic = fake.add_file("IMG_1.heic", b"\x00\x00\x00\x18ftypheic", "image/heic")
    small = fake.add_file("small.png", chelsea_png, "image/png")
    target = fake.post_user_message(
        author=fake.new_user("poster"),
        channel_id=CHANNEL,
        guild_id=GUILD,
        attachments=[big, heic, small],
    )
    interaction = await fake.message_command(
        "Joke about this image", target, user=fake.new_user(), guild_id=GUILD
    )
    msg = await answered(fake, interaction)
    assert len(buttons(msg)) == 2
    assert fake.hits_for(small) == 1 and fake.hits_for(big) == 0 and fake.hits_for(heic) == 0

    only_big = fake.post_user_message(
        author=fake.new_user("poster"), channel_id=CHANNEL, guild_id=GUILD, attachments=[big]
    )
    refused = await fake.message_command(
        "Joke about this image", only_big, user=fake.new_user(), guild_id=GUILD
    )
    await fake.wait_until(lambda: refused.callbacks, WAIT)
    assert "too big" in refused.callbacks[0]["data"]["content"]


async def test_types_the_core_cannot_read_are_refused_before_download(
    fake: FakeDiscord, make_app: AppFactory
) -> None:
    await make_app()
    for name, ctype in (("IMG_2.heic", "image/heic"), ("x.avif", None)):
        photo = fake.add_file(name, b"\x00\x00\x00\x18ftypheic", ctype)
        interaction = await fake.slash(
            "joke",
            user=fake.new_user(),
            channel_id=CHANNEL,
            guild_id=GUILD,
            attachments={"image": photo},
        )
        await fake.wait_until(lambda i=interaction: i.callbacks, WAIT)
        assert interaction.callbacks[0]["data"]["flags"] & EPHEMERAL
        assert fake.hits_for(photo) == 0


async def test_rate_limit_is_checked_before_the_download(
    fake: FakeDiscord, make_app: AppFactory, chelsea: dict
) -> None:
    await make_app(limits=LimitSettings(per_user_per_minute=1))
    user = fake.new_user()
    for _ in range(3):
        interaction = await fake.slash(
            "joke", user=user, channel_id=CHANNEL, guild_id=GUILD, attachments={"image": chelsea}
        )
        await answered(fake, interaction)
    assert fake.hits_for(chelsea) == 1


# --------------------------------------------------------------------------- moderation


def _mod(sub: str, option: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"name": sub, "type": 1, "options": [option]}]


async def mod_block(fake: FakeDiscord, admin: dict, target: dict, guild: str | None, sub="block"):
    option = {"name": "user", "type": 6, "value": target["id"]}
    return await fake.slash(
        "mod",
        user=admin,
        channel_id=CHANNEL,
        guild_id=guild,
        options=_mod(sub, option),
        resolved={"users": {target["id"]: target}},
    )


async def test_admin_blocks_and_unblocks_with_mod_and_others_may_not(
    fake: FakeDiscord, make_app: AppFactory, chelsea: dict
) -> None:
    await make_app()
    admin, troll = fake.new_user("admin"), fake.new_user("troll")
    # outside a server nobody is an administrator (and admin_ids is empty)
    denied = await mod_block(fake, admin, troll, None)
    await fake.wait_until(lambda: denied.callbacks, WAIT)
    assert "admins" in denied.callbacks[0]["data"]["content"]
    done = await mod_block(fake, admin, troll, GUILD)  # a server administrator
    reply = await answered(fake, done)
    assert reply["content"] == f"Blocked discord:user:{troll['id']}." and reply["flags"] & EPHEMERAL
    refused = await fake.slash(
        "joke", user=troll, channel_id=CHANNEL, guild_id=GUILD, attachments={"image": chelsea}
    )
    msg = await answered(fake, refused)
    assert msg["flags"] & EPHEMERAL and "not available" in msg["content"]
    assert fake.hits_for(chelsea) == 0  # refused before the download
    await answered(fake, await mod_block(fake, admin, troll, GUILD, sub="unblock"))
    again = await fake.slash(
        "joke", user=troll, channel_id=CHANNEL, guild_id=GUILD, attachments={"image": chelsea}
    )
    assert len(buttons(await answered(fake, again))) == 2


async def test_admin_deletes_a_joke_message_and_keeps_it_out_of_training(
    fake: FakeDiscord, make_app: AppFactory, chelsea: dict
) -> None:
    from bot.moderation import moderation_for

    app = await make_app()
    interaction = await fake.slash(
        "joke",
        user=fake.new_user(),
        channel_id=CHANNEL,
        guild_id=GUILD,
        attachments={"image": chelsea},
    )
    joke_msg = await answered(fake, interaction)
    joke_id = int(buttons(joke_msg)[0]["custom_id"].split(":")[2])
    for _ in range(100):
        if await outbox_counts(app) == {"delivered": 1}:
            break
        await asyncio.sleep(0.05)
    delete = await fake.slash(
        "mod",
        user=fake.new_user("admin"),
        channel_id=CHANNEL,
        guild_id=GUILD,
        options=_mod("delete", {"name": "joke", "type": 4, "value": joke_id}),
    )
    reply = await answered(fake, delete)
    assert reply["content"].startswith(f"Joke {joke_id} removed;")
    assert joke_msg["id"] in fake.deleted_messages
    assert joke_id in await moderation_for(app).removed_jokes()
