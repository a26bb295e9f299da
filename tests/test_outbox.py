"""The durable outbox and moderation storage on SQLite and PostgreSQL (``store`` runs both)."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from bot.metrics import Metrics
from bot.models import JokeRequest, NormalizedImage, NotFound, Rejected
from bot.moderation import Moderation, filter_rated, subjects_for
from bot.moderation_settings import ModerationSettings
from bot.outbox import Outbox, OutboxItem, OutboxWorker, RetryLater, Undeliverable
from bot.store import OutboxRow, Store, utcnow


def fake_image(seed: bytes = b"x") -> NormalizedImage:
    return NormalizedImage.of(b"\xff\xd8" + seed * 100 + b"\xff\xd9", 4, 3, "PNG")


async def joke_with_delivery(
    store: Store, outbox: Outbox, chat: str, seed: bytes = b"x", user: str = "tg:1"
):
    return await store.add_joke(
        fake_image(seed),
        delivery=outbox.delivery(chat, {"chat_id": chat}),
        channel="telegram",
        user_id=user,
        chat_id=chat,
        prompt="p",
        text="a joke",
        model_version="v1",
        engine="instant",
        params={},
    )


async def test_reply_row_is_written_with_the_joke_and_claimed(store: Store) -> None:
    box = Outbox(store, "telegram", owner="me")
    joke = await joke_with_delivery(store, box, "tg:1")
    item = await box.for_joke(joke.id)
    assert item is not None and item.chat_key == "tg:1" and item.payload == {"chat_id": "tg:1"}
    # claimed by its writer: nobody else may take it while the lease holds
    other = Outbox(store, "telegram", owner="other")
    assert await other.claim_due() == []
    await box.delivered(item, {"message_id": 7})
    assert await box.delivered_result(joke.id) == {"message_id": 7}
    assert await box.counts() == {"delivered": 1}


async def test_one_sender_per_row_across_replicas(store: Store) -> None:
    writer = Outbox(store, "telegram", owner="dead", lease_s=60)
    for n in range(6):
        await joke_with_delivery(store, writer, f"tg:{n}", seed=bytes([65 + n]))
    async with store.session(write=True) as s:  # the writer was killed: its leases lapse
        await s.execute(update(OutboxRow).values(lease_until=utcnow() - timedelta(seconds=1)))
    replicas = [Outbox(store, "telegram", owner=f"r{i}") for i in range(3)]
    claimed = await asyncio.gather(*(r.claim_due() for r in replicas))
    ids = [item.id for batch in claimed for item in batch]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 6  # each row exactly once


async def test_order_per_chat_only_the_oldest_pending_row_is_due(store: Store) -> None:
    box = Outbox(store, "telegram", owner="me")
    first = await box.add("tg:9", {"n": 1})
    second = await box.add("tg:9", {"n": 2})
    other_chat = await box.add("tg:8", {"n": 3})
    assert not await box.is_head(second) and await box.is_head(first)
    await box.failed(first, "429", seconds=0)
    await box.release(second)
    await box.release(other_chat)
    due = await box.claim_due()
    assert [i.payload["n"] for i in due] == [1, 3]  # not 2: 1 is still pending in its chat
    await box.delivered(due[0])
    due = await box.claim_due()
    assert [i.payload["n"] for i in due] == [2]


async def test_worker_retries_after_retry_later_and_drops_undeliverable(store: Store) -> None:
    metrics = Metrics()
    box = Outbox(store, "telegram", owner="me", metrics=metrics)
    answers: list[Any] = [RetryLater("429", 0.0), {"message_id": 1}]
    sent: list[int] = []

    async def deliver(item: OutboxItem) -> dict[str, Any] | None:
        if item.payload.get("gone"):
            raise Undeliverable("Forbidden: bot was blocked by the user")
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        sent.append(item.id)
        return answer

    worker = OutboxWorker(box, deliver, poll_s=0.05)
    item = await box.add("tg:1", {})
    assert await worker.send_now(item) is False
    assert await box.counts() == {"pending": 1}
    assert await worker.run_once() == 1
    assert sent == [item.id] and await box.counts() == {"delivered": 1}
    gone = await box.add("tg:2", {"gone": True})
    await worker.send_now(gone)
    assert await box.counts() == {"delivered": 1, "dropped": 1}
    got = {
        s.labels["event"]: s.value
        for m in metrics.outbox.collect()
        for s in m.samples
        if s.name.endswith("_total")
    }
    assert got["delivered"] == 1 and got["retried"] == 1 and got["dropped"] == 1


async def test_old_rows_expire_counted_never_silently(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    box = Outbox(store, "telegram", owner="me", max_age_s=30, metrics=metrics)
    item = await box.add("tg:1", {})
    await box.failed(item, "5xx", seconds=0)
    assert await box.expire() == 0  # young
    async with store.session(write=True) as s:
        await s.execute(update(OutboxRow).values(created_at=utcnow() - timedelta(seconds=31)))
    assert await box.expire() == 1
    assert await box.counts() == {"expired": 1}
    assert await box.claim_due() == []
    assert "expired undelivered" in caplog.text
    total = [
        s.value for m in metrics.outbox.collect() for s in m.samples if s.name.endswith("total")
    ]
    assert sum(total) >= 1


async def test_worker_loop_delivers_what_a_killed_replica_left(store: Store) -> None:
    dead = Outbox(store, "telegram", owner="dead", lease_s=0.2)
    for n in range(3):
        await joke_with_delivery(store, dead, "tg:5", seed=bytes([70 + n]))
    order: list[int] = []

    async def deliver(item: OutboxItem) -> dict[str, Any]:
        order.append(item.joke_id or 0)
        return {"message_id": len(order)}

    worker = OutboxWorker(Outbox(store, "telegram", owner="alive"), deliver, poll_s=0.05)
    worker.start()
    try:
        for _ in range(100):
            if len(order) == 3:
                break
            await asyncio.sleep(0.05)
    finally:
        await worker.stop()
    assert order == sorted(order) and len(order) == 3


# --------------------------------------------------------------------------- moderation


def _request(user: str = "tg:1", chat: str = "tg:-100", guild: Any = None) -> JokeRequest:
    meta = {"guild_id": guild} if guild else {}
    return JokeRequest(b"", channel="telegram", user_id=user, chat_id=chat, meta=meta)


async def test_block_list_in_settings_and_database_shared_by_replicas(store: Store) -> None:
    settings = ModerationSettings(block=["telegram:user:666"], refresh_s=0)
    a, b = Moderation(store, settings), Moderation(store, settings)
    with pytest.raises(Rejected) as info:
        await a.check(_request(user="tg:666"))
    assert info.value.key == "blocked"
    await a.check(_request(user="tg:7"))
    assert await a.block("telegram:user:7", by="telegram:user:1", note="spam")
    assert not await a.block("telegram:user:7")
    with pytest.raises(Rejected):
        await b.check(_request(user="tg:7"))  # the other replica agrees
    assert await b.unblock("telegram:user:7")
    await a.check(_request(user="tg:7"))
    with pytest.raises(ValueError, match="settings"):
        await a.unblock("telegram:user:666")
    with pytest.raises(ValueError, match="subject"):
        await a.block("just-an-id")
    subjects = [e.subject for e in await a.entries()]
    assert subjects == ["telegram:user:666"]


async def test_allowlist_mode_answers_only_listed_users_chats_or_guilds(store: Store) -> None:
    m = Moderation(store, ModerationSettings(mode="allowlist", refresh_s=0))
    with pytest.raises(Rejected) as info:
        await m.check(_request())
    assert info.value.key == "not_allowed"
    await m.add("allow", "telegram:chat:-100")
    await m.check(_request(user="tg:99"))  # anyone in the allowed chat
    await m.add("allow", "telegram:guild:5")
    await m.check(_request(chat="tg:-200", guild=5))
    await m.block("telegram:user:99")  # a block wins over an allowed chat
    with pytest.raises(Rejected):
        await m.check(_request(user="tg:99"))


async def test_export_filter_drops_removed_jokes_and_blocked_voters(store: Store) -> None:
    box = Outbox(store, "telegram", owner="me")
    j1 = await joke_with_delivery(store, box, "tg:1", seed=b"a")
    j2 = await joke_with_delivery(store, box, "tg:1", seed=b"b")
    await store.rate(j1.id, "tg:10", 1, "telegram")
    await store.rate(j1.id, "tg:11", 1, "telegram")
    await store.rate(j2.id, "tg:10", 1, "telegram")
    m = Moderation(store, ModerationSettings(refresh_s=0))
    await m.block("telegram:user:11")
    assert await m.remove_joke(j2.id, by="telegram:user:1")
    assert not await m.remove_joke(j2.id)
    with pytest.raises(NotFound):
        await m.remove_joke(j2.id + 100)
    rated, counts = await filter_rated(store, await store.rated_jokes())
    assert [(e["joke"].id, e["votes"]) for e in rated] == [(j1.id, [("tg:10", 1)])]
    assert counts == {"removed_jokes": 1, "blocked_votes": 1}


def test_subjects_use_the_platform_ids() -> None:
    assert subjects_for("telegram", "tg:5", "tg:-100", None) == [
        "telegram:user:5",
        "telegram:chat:-100",
    ]
    assert subjects_for("discord", "42", "7", 9) == [
        "discord:user:42",
        "discord:chat:7",
        "discord:guild:9",
    ]


def test_moderation_cli_changes_the_shared_lists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import typer
    from typer.testing import CliRunner

    import plugins.moderation as moderation_plugin

    monkeypatch.setenv("OOGIRI_DATA_DIR", str(tmp_path / "data"))
    (tmp_path / "empty.toml").write_text("")  # not the working directory's oogiri.toml
    monkeypatch.setenv("OOGIRI_CONFIG_FILE", str(tmp_path / "empty.toml"))
    monkeypatch.delenv("OOGIRI_STORE__URL", raising=False)
    cli = typer.Typer()
    moderation_plugin.oogiri_register_commands(cli=cli)
    run = CliRunner().invoke
    assert run(cli, ["moderation", "block", "telegram:user:5", "--note", "spam"]).exit_code == 0
    again = run(cli, ["moderation", "block", "telegram:user:5"])
    assert "already blocked" in again.output
    listing = run(cli, ["moderation", "list"])
    assert "block  telegram:user:5  [database] cli" in listing.output and "spam" in listing.output
    bad = run(cli, ["moderation", "block", "5"])
    assert bad.exit_code == 2 and "bad moderation subject" in bad.output
    assert "unblocked" in run(cli, ["moderation", "unblock", "telegram:user:5"]).output
    missing = run(cli, ["moderation", "delete-joke", "999"])
    assert missing.exit_code == 1 and "no joke 999" in missing.output


async def test_a_slow_send_keeps_its_claim(store: Store) -> None:
    """A send waiting out flood control longer than the lease is not sent a second time."""
    box = Outbox(store, "telegram", owner="me", lease_s=0.3)
    other = Outbox(store, "telegram", owner="other", lease_s=0.3)
    item = await box.add("tg:1", {})
    sends = 0
    release = asyncio.Event()

    async def slow(_item: OutboxItem) -> dict[str, Any]:
        nonlocal sends
        sends += 1
        await release.wait()
        return {}

    worker = OutboxWorker(box, slow, poll_s=0.05)
    sending = asyncio.create_task(worker.send_now(item))
    await asyncio.sleep(0.9)  # three leases long
    assert await other.claim_due() == []  # renewed: nobody else may take it
    assert await worker.run_once() == 0 and sends == 1
    release.set()
    assert await sending is True
    assert await box.counts() == {"delivered": 1}


async def test_training_export_leaves_out_removed_jokes_and_blocked_voters(
    store: Store, tmp_path: Path
) -> None:
    import json

    from training.export import export_dataset
    from training.settings import TrainingSettings

    async def joke(seed: bytes) -> Any:
        return await store.add_joke(
            fake_image(seed),
            channel="telegram",
            user_id="tg:1",
            chat_id="tg:1",
            prompt="p",
            text=f"joke {seed.decode()}",
            model_version="v1",
            engine="instant",
            params={},
        )

    kept, removed, only_troll = await joke(b"k"), await joke(b"r"), await joke(b"t")
    for j in (kept, removed):
        await store.rate(j.id, "tg:10", 1, "telegram")
    await store.rate(only_troll.id, "tg:66", 1, "telegram")  # liked by the troll alone
    m = Moderation(store, ModerationSettings(refresh_s=0))
    await m.block("telegram:user:66")
    await m.remove_joke(removed.id)
    settings = TrainingSettings(min_examples=1, heldout_fraction=0.0, base_ratio=0.0)
    await export_dataset(store, settings, tmp_path / "export")
    items = json.loads((tmp_path / "export" / "train.json").read_text(encoding="utf-8"))
    assert [i["id"] for i in items] == [f"oogiri-{kept.id}"]
