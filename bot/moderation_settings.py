"""Settings of moderation (bot/moderation.py), kept apart so that bot.settings stays light."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator

SUBJECT_HELP = (
    "subjects are '<channel>:<kind>:<id>', kind user, chat or guild: telegram:user:123, "
    "telegram:chat:-1001234, discord:user:80351110224678912, discord:guild:…"
)


def check_subject(value: str) -> str:
    """``<channel>:<kind>:<id>`` with a known kind, stripped; ValueError otherwise."""
    value = value.strip()
    parts = value.split(":", 2)
    if len(parts) != 3 or not all(p.strip() for p in parts) or parts[1] not in SUBJECT_KINDS:
        raise ValueError(f"bad moderation subject {value!r}: {SUBJECT_HELP}")
    if len(value) > 160:
        raise ValueError(f"moderation subject longer than 160 characters: {value[:40]!r}…")
    return value


SUBJECT_KINDS = ("user", "chat", "guild")


class ModerationSettings(BaseModel):
    """Who may use the bot. The lists here hold in every replica; the admins' runtime changes
    (``/block``, ``oogiri moderation block``) live in the database and add to them."""

    mode: Literal["open", "allowlist"] = Field(
        default="open", description="allowlist: answer only subjects on an allow list"
    )
    allow: list[str] = Field(default_factory=list, description=SUBJECT_HELP)
    block: list[str] = Field(default_factory=list, description=SUBJECT_HELP)
    refresh_s: float = Field(
        default=5.0, ge=0.0, description="how long a replica trusts its copy of the database lists"
    )

    @field_validator("allow", "block")
    @classmethod
    def _subjects(cls, values: list[str]) -> list[str]:
        return [check_subject(v) for v in values]
