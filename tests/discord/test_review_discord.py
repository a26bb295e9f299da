# ruff: noqa: F811  (the fixtures of test_discord.py are imported by name)
"""Defects found in a review of the Discord channel, each pinned by a test against the fake Discord
on 127.0.0.1 (discord.py's real HTTP and gateway clients)."""

from __future__ import annotations

from fakediscord import EPHEMERAL, FakeDiscord
from test_discord import (  # noqa: F401  (fixtures)
    CHANNEL,
    GUILD,
    WAIT,
    AppFactory,
    fake,
    make_app,
)

from bot.engines.instant import InstantEngine
from bot.models import message


async def test_a_huge_file_that_is_no_picture_is_called_no_picture(
    fake: FakeDiscord, make_app: AppFactory
) -> None:
    """A 50 MB video used to get "That file is too big (limit 10 MB)": the user shrinks it, tries
    again, and only then hears it was never a picture. The type is the first thing to say."""
    engine = InstantEngine()
    await make_app(engine=engine)
    video = fake.add_file("clip.mp4", b"\x00" * 64, "video/mp4", size=50 * 1024 * 1024)
    interaction = await fake.slash(
        "joke",
        user=fake.new_user(),
        channel_id=CHANNEL,
        guild_id=GUILD,
        attachments={"image": video},
        locale="zh-CN",
    )
    await fake.wait_until(lambda: interaction.callbacks, WAIT)
    [callback] = interaction.callbacks
    assert callback["type"] == 4 and callback["data"]["flags"] & EPHEMERAL
    assert callback["data"]["content"] == message("not_image", "zh")
    assert fake.hits_for(video) == 0 and engine.calls == 0
