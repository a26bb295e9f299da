# ruff: noqa: F811  (the fixtures of test_discord.py are imported by name)
"""Moderation defects found in a review: Discord's ``/mod`` errors in the admin's language, and a
Telegram group's block that held no more once the group became a supergroup."""

from __future__ import annotations

import pytest
from fakediscord import EPHEMERAL, FakeDiscord
from test_discord import (  # noqa: F401  (fixtures)
    CHANNEL,
    GUILD,
    AppFactory,
    answered,
    fake,
    make_app,
)

import plugins.discord_bot as discord_bot
from bot.models import JokeRequest, Rejected
from bot.moderation import Moderation, moderation_for
from bot.moderation_settings import ModerationSettings
from bot.store import Store


@pytest.mark.parametrize(("locale", "lang"), [("zh-CN", "zh"), ("en-US", "en")])
async def test_mod_unblock_of_a_settings_block_answers_in_the_admins_language(
    fake: FakeDiscord, make_app: AppFactory, locale: str, lang: str
) -> None:
    """``/mod unblock`` of someone the settings block showed ``str(ValueError)``: English, and
    "moderation.block … remove it there" to a Chinese-speaking admin."""
    app = await make_app()
    admin, troll = fake.new_user("admin"), fake.new_user("troll")
    subject = f"discord:user:{troll['id']}"
    moderation_for(app).settings.block.append(subject)
    interaction = await fake.slash(
        "mod",
        user=admin,
        channel_id=CHANNEL,
        guild_id=GUILD,
        options=[
            {
                "name": "unblock",
                "type": 1,
                "options": [{"name": "user", "type": 6, "value": troll["id"]}],
            }
        ],
        resolved={"users": {troll["id"]: troll}},
        locale=locale,
    )
    reply = await answered(fake, interaction)
    error = discord_bot.text("mod_in_settings", lang, subject=subject)
    assert reply["content"] == discord_bot.text("mod_error", lang, error=error)
    assert reply["flags"] & EPHEMERAL
    assert await moderation_for(app).is_blocked(subject)  # nothing changed


# --------------------------------------------------------------------------- Telegram chat moves


def telegram_request(chat_id: str) -> JokeRequest:
    return JokeRequest(image_bytes=b"", channel="telegram", user_id="tg:7", chat_id=chat_id)


@pytest.mark.parametrize("where", ["database", "settings"])
async def test_a_blocked_group_stays_blocked_as_the_supergroup_it_became(
    store: Store, where: str
) -> None:
    """Telegram gives a group a new id when it becomes a supergroup (``_chat_moved`` records it
    with ``Store.move_chat``): ``telegram:chat:<old id>`` no longer matched anything."""
    old, new = "telegram:chat:-123", "tg:-100456"
    settings = ModerationSettings(refresh_s=0, block=[old] if where == "settings" else [])
    moderation = Moderation(store, settings)
    if where == "database":
        await moderation.block(old)
    await moderation.check(telegram_request(new))  # not moved yet: a stranger's chat
    await store.move_chat("tg:-123", new)
    with pytest.raises(Rejected) as refused:
        await moderation.check(telegram_request(new))
    assert refused.value.key == "blocked"
    await moderation.check(telegram_request("tg:-999"))  # other chats are untouched
    if where == "database":
        await moderation.unblock(old)  # lifting the group's block lifts the supergroup's
        await moderation.check(telegram_request(new))


async def test_an_allowed_group_stays_allowed_as_the_supergroup_it_became(store: Store) -> None:
    settings = ModerationSettings(refresh_s=0, mode="allowlist", allow=["telegram:chat:-123"])
    moderation = Moderation(store, settings)
    with pytest.raises(Rejected):
        await moderation.check(telegram_request("tg:-100456"))
    await store.move_chat("tg:-123", "tg:-100456")
    await moderation.check(telegram_request("tg:-100456"))
