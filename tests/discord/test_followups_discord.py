# ruff: noqa: F811  (the fixtures of test_discord.py are imported by name)
"""Follow-ups of a review of the Discord channel, pinned against the fake Discord on 127.0.0.1
(discord.py's real HTTP and gateway clients)."""

from __future__ import annotations

from typing import Any

from fakediscord import EPHEMERAL, FakeDiscord
from test_discord import (  # noqa: F401  (fixtures)
    CHANNEL,
    GUILD,
    WAIT,
    AppFactory,
    answered,
    chelsea,
    fake,
    joke_in_guild,
    make_app,
)

import plugins.discord_bot as discord_bot


async def test_a_command_that_fails_after_thinking_tells_only_the_user(
    fake: FakeDiscord, make_app: AppFactory, chelsea: dict[str, Any]
) -> None:
    """A slash command that failed after its public "thinking…" deferral used to have the error
    fill that public message: the whole channel saw "Something went wrong". It is for the user
    alone (an ephemeral follow-up), and the public deferral is removed."""
    app = await make_app()
    (channel,) = app.channels

    async def broken_download(url: str) -> bytes:
        raise RuntimeError("a bug after the deferral")

    channel.download = broken_download  # type: ignore[attr-defined]
    interaction = await joke_in_guild(fake, chelsea)
    msg = await answered(fake, interaction)
    assert interaction.callbacks[0]["type"] == 5  # deferred: "thinking…", public
    assert msg["content"] == discord_bot.text("failed", "en")
    assert msg["flags"] & EPHEMERAL
    await fake.wait_until(lambda: interaction.deleted_original, WAIT)
    assert fake.visible_messages(CHANNEL) == []


async def test_a_private_command_that_fails_after_thinking_keeps_its_private_answer(
    fake: FakeDiscord, make_app: AppFactory
) -> None:
    """``/mod`` thinks privately: its failure fills that private message, nothing is deleted."""
    from test_discord_flow import mod_block

    from bot.moderation import moderation_for

    app = await make_app()

    async def broken_block(subject: str, by: str | None = None) -> bool:
        raise RuntimeError("a bug after the deferral")

    moderation_for(app).block = broken_block  # type: ignore[method-assign]
    admin, troll = fake.new_user("admin"), fake.new_user("troll")
    interaction = await mod_block(fake, admin, troll, GUILD)
    msg = await answered(fake, interaction)
    assert interaction.callbacks[0]["type"] == 5
    assert msg["content"] == discord_bot.text("failed", "en") and msg["flags"] & EPHEMERAL
    assert msg["id"] == interaction.original_id and not interaction.deleted_original
    assert fake.visible_messages(CHANNEL) == []
