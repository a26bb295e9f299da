"""Moderation: block list, allow-list mode, removed jokes — stored so that every replica agrees.

Subjects are plain strings ``<channel>:<kind>:<id>`` (``telegram:user:123``,
``telegram:chat:-1001234``, ``discord:guild:…``), the ids as the platform shows them. The lists
are the union of the settings (``moderation.block`` / ``.allow``) and the database (changed at run
time by admins through a channel's commands or ``oogiri moderation``). Each replica keeps a copy of
the database lists for ``refresh_s`` seconds, so a change reaches every replica within that time.

No platform is known here: a channel passes its ids (``subjects_for``), the check runs before any
download through the ``oogiri_admit`` hook (``plugins/moderation.py`` registers it), and the export
leaves out removed jokes and every vote of a blocked user (``filter_rated``).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select

from bot.metrics import Metrics
from bot.models import JokeRequest, NotFound, Rejected
from bot.moderation_settings import ModerationSettings, check_subject
from bot.store import ChatMoveRow, JokeRemovalRow, JokeRow, ModerationRow, Store, utcnow

log = logging.getLogger(__name__)

STATE_KEY = "moderation"  # app.state[STATE_KEY] is the app's Moderation

# What an admin's block/unblock/delete answers, the same on every channel (each channel's TEXTS
# spreads it; channel-specific wording such as usage lines stays in the channel).
MODERATION_TEXTS: dict[str, dict[str, str]] = {
    "blocked": {"en": "Blocked {subject}.", "zh": "已屏蔽 {subject}。"},
    "already_blocked": {"en": "{subject} was already blocked.", "zh": "{subject} 已经被屏蔽了。"},
    "unblocked": {"en": "Unblocked {subject}.", "zh": "已解除屏蔽 {subject}。"},
    "not_blocked": {"en": "{subject} was not blocked.", "zh": "{subject} 没有被屏蔽。"},
    "joke_deleted": {
        "en": "Joke {joke_id} removed; it will never be used for training.",
        "zh": "笑话 {joke_id} 已删除，不会再用于训练。",
    },
    "mod_error": {"en": "Not changed: {error}", "zh": "未更改：{error}"},
    # the {error} of mod_error when an admin unblocks a subject the settings block
    "mod_in_settings": {
        "en": (
            "{subject} is blocked in the bot's settings (moderation.block); only the operator "
            "can remove it there."
        ),
        "zh": "{subject} 是在机器人的配置（moderation.block）里屏蔽的，只能由运营者在配置里移除。",
    },
}
BLOCK, ALLOW = "block", "allow"
_STORED_PREFIX = re.compile(r"^[a-z]{1,12}:")  # "tg:123" → "123" (channels namespace their ids)


def native_id(stored: str) -> str:
    """The platform's id from the id a channel stored (``tg:123`` → ``123``; ``456`` stays)."""
    return _STORED_PREFIX.sub("", stored, count=1)


def user_subject(channel: str, user_id: str) -> str:
    return f"{channel}:user:{native_id(user_id)}"


def chat_subject(channel: str, chat_id: str) -> str:
    return f"{channel}:chat:{native_id(chat_id)}"


def subjects_for(
    channel: str,
    user_id: str | None,
    chat_id: str | None = None,
    guild_id: str | int | None = None,
) -> list[str]:
    """Every subject a request is known by: its sender, its chat and (Discord) its server."""
    out = []
    if user_id:
        out.append(user_subject(channel, user_id))
    if chat_id:
        out.append(chat_subject(channel, chat_id))
    if guild_id:
        out.append(f"{channel}:guild:{guild_id}")
    return out


def request_subjects(request: JokeRequest) -> list[str]:
    return subjects_for(
        request.channel, request.user_id, request.chat_id, request.meta.get("guild_id")
    )


@dataclass(frozen=True, slots=True)
class Entry:
    list: str
    subject: str
    note: str | None
    created_by: str | None
    created_at: datetime | None
    source: str  # "database" or "settings"


class Moderation:
    def __init__(
        self, store: Store, settings: ModerationSettings, metrics: Metrics | None = None
    ) -> None:
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self._cache: tuple[float, frozenset[str], frozenset[str]] | None = None
        self._moved_from: dict[str, list[str]] = {}  # chat id → the chats that became it
        self._removed: tuple[float, set[int]] | None = None

    # ------------------------------------------------------------------ lists

    async def _lists(self) -> tuple[frozenset[str], frozenset[str]]:
        now = time.monotonic()
        if self._cache is not None and now - self._cache[0] < self.settings.refresh_s:
            return self._cache[1], self._cache[2]
        async with self.store.session() as s:
            rows = (await s.execute(select(ModerationRow.list, ModerationRow.subject))).all()
            moves = (await s.execute(select(ChatMoveRow.old_chat, ChatMoveRow.new_chat))).all()
        self._moved_from = {}
        for old, new in moves:
            self._moved_from.setdefault(new, []).append(old)
        block = frozenset({sub for lst, sub in rows if lst == BLOCK} | set(self.settings.block))
        allow = frozenset({sub for lst, sub in rows if lst == ALLOW} | set(self.settings.allow))
        self._cache = (now, block, allow)
        return block, allow

    def invalidate(self) -> None:
        self._cache = None
        self._removed = None

    async def verdict(self, subjects: Iterable[str]) -> str | None:
        """``"blocked"``, ``"not_allowed"`` (allow-list mode) or None (may be answered)."""
        subjects = list(subjects)
        block, allow = await self._lists()
        if any(s in block for s in subjects):
            return "blocked"
        if self.settings.mode == "allowlist" and not any(s in allow for s in subjects):
            return "not_allowed"
        return None

    async def earlier_chats(self, chat_id: str) -> list[str]:
        """The chats that became ``chat_id`` (a Telegram group upgraded to a supergroup gets a new
        id, ``Store.move_chat``), oldest last: a block or allow of the group holds for it."""
        await self._lists()
        found: list[str] = []
        pending = [chat_id]
        while pending and len(found) < 100:
            for old in self._moved_from.get(pending.pop(), []):
                if old not in found and old != chat_id:
                    found.append(old)
                    pending.append(old)
        return found

    async def check(self, request: JokeRequest) -> None:
        """Raise ``Rejected`` (key ``blocked`` / ``not_allowed``) for a refused request."""
        subjects = request_subjects(request)
        if request.chat_id:
            earlier = await self.earlier_chats(request.chat_id)
            subjects += [chat_subject(request.channel, old) for old in earlier]
        verdict = await self.verdict(subjects)
        if verdict is not None:
            if self.metrics is not None:
                self.metrics.moderated.labels(request.channel, verdict).inc()
            raise Rejected(reason=verdict, key=verdict)

    async def is_blocked(self, subject: str) -> bool:
        block, _ = await self._lists()
        return subject in block

    async def add(self, list_: str, subject: str, by: str | None = None, note: str | None = None):
        """Put ``subject`` on a list; False if it was there already."""
        if list_ not in (BLOCK, ALLOW):
            raise ValueError("list is 'block' or 'allow'")
        subject = check_subject(subject)
        async with self.store.session(write=True) as s:
            found = await s.scalar(
                select(ModerationRow.id).where(
                    ModerationRow.list == list_, ModerationRow.subject == subject
                )
            )
            if found is None:
                s.add(
                    ModerationRow(
                        list=list_,
                        subject=subject,
                        note=note,
                        created_by=by,
                        created_at=utcnow(),
                    )
                )
        self.invalidate()
        if found is None:
            log.info("moderation: %s added to the %s list by %s", subject, list_, by or "?")
        return found is None

    async def remove(self, list_: str, subject: str) -> bool:
        """Take ``subject`` off a database list; False if it was not on it.

        Raises ValueError for a subject listed in the settings (change it there).
        """
        subject = check_subject(subject)
        async with self.store.session(write=True) as s:
            result = await s.execute(
                delete(ModerationRow).where(
                    ModerationRow.list == list_, ModerationRow.subject == subject
                )
            )
        self.invalidate()
        in_settings = subject in (self.settings.block if list_ == BLOCK else self.settings.allow)
        if in_settings:
            raise ValueError(
                f"{subject} is on the {list_} list in the settings (moderation.{list_}); "
                "remove it there"
            )
        return bool(result.rowcount)  # pyright: ignore[reportAttributeAccessIssue]  # DML: a CursorResult

    async def block(self, subject: str, by: str | None = None, note: str | None = None) -> bool:
        return await self.add(BLOCK, subject, by, note)

    async def unblock(self, subject: str) -> bool:
        return await self.remove(BLOCK, subject)

    async def entries(self) -> list[Entry]:
        async with self.store.session() as s:
            rows = (
                (await s.execute(select(ModerationRow).order_by(ModerationRow.id))).scalars().all()
            )
        out = [
            Entry(r.list, r.subject, r.note, r.created_by, r.created_at, "database") for r in rows
        ]
        for list_, subjects in ((BLOCK, self.settings.block), (ALLOW, self.settings.allow)):
            out += [Entry(list_, sub, None, None, None, "settings") for sub in subjects]
        return out

    # ------------------------------------------------------------------ removed jokes

    async def remove_joke(
        self, joke_id: int, by: str | None = None, reason: str | None = None
    ) -> bool:
        """Mark a joke removed (False if it already was); ``NotFound`` for an unknown id."""
        async with self.store.session(write=True) as s:
            if await s.get(JokeRow, joke_id) is None:
                raise NotFound()
            if await s.get(JokeRemovalRow, joke_id) is not None:
                return False
            s.add(
                JokeRemovalRow(joke_id=joke_id, removed_by=by, reason=reason, removed_at=utcnow())
            )
        self.invalidate()
        log.info("moderation: joke %s removed by %s", joke_id, by or "?")
        return True

    async def removed_jokes(self) -> set[int]:
        async with self.store.session() as s:
            return set((await s.scalars(select(JokeRemovalRow.joke_id))).all())

    async def removed_jokes_cached(self) -> set[int]:
        """``removed_jokes`` as of at most ``refresh_s`` ago (checked before every delivery)."""
        now = time.monotonic()
        if self._removed is None or now - self._removed[0] >= self.settings.refresh_s:
            self._removed = (now, await self.removed_jokes())
        return self._removed[1]

    async def filter_rated(self, rated: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict]:
        """``Store.rated_jokes()`` without removed jokes and without blocked users' votes."""
        return await filter_rated(self.store, rated, self)


async def filter_rated(
    store: Store, rated: list[dict[str, Any]], moderation: Moderation | None = None
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """What a training export may learn from: removed jokes and blocked voters' votes left out.

    Uses the database lists only when no ``Moderation`` (with its settings) is given.
    """
    moderation = moderation or Moderation(store, ModerationSettings(refresh_s=0))
    removed = await moderation.removed_jokes()
    block, _ = await moderation._lists()
    counts = {"removed_jokes": 0, "blocked_votes": 0}
    out: list[dict[str, Any]] = []
    for entry in rated:
        joke = entry["joke"]
        if joke.id in removed:
            counts["removed_jokes"] += 1
            continue
        votes = [
            (voter, value)
            for voter, value in entry["votes"]
            if user_subject(joke.channel, voter) not in block
        ]
        counts["blocked_votes"] += len(entry["votes"]) - len(votes)
        if votes:
            out.append({**entry, "votes": votes})
    return out, counts


def moderation_for(app: Any) -> Moderation:
    """The app's ``Moderation`` (made on first use, so a channel works without the plugin)."""
    found = app.state.get(STATE_KEY)
    if found is None:
        found = Moderation(app.store, app.settings.moderation, app.metrics)
        app.state[STATE_KEY] = found
    return found
