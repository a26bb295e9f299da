"""Admission control: a bounded queue with a wait limit in front of each engine (issue 20)."""

from __future__ import annotations

import asyncio

import pytest

from bot.app import App
from bot.engines.instant import InstantEngine
from bot.limits import Admission
from bot.models import EngineBusy, JokeRequest
from bot.settings import Settings


async def test_the_queue_is_bounded_and_the_surplus_is_refused_at_once() -> None:
    reasons: list[str] = []
    gate = Admission(slots=2, max_queue=3, max_wait_s=10.0, on_reject=reasons.append)
    release = asyncio.Event()

    async def call() -> None:
        async with gate.slot():
            await release.wait()

    tasks = [asyncio.create_task(call()) for _ in range(5)]  # 2 running + 3 waiting
    await asyncio.sleep(0.01)
    assert (gate.running, gate.waiting) == (2, 3)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(EngineBusy) as info:
        async with gate.slot():
            raise AssertionError("a sixth request must not get a slot")
    assert loop.time() - t0 < 0.05  # fast: no waiting before "busy"
    assert info.value.params["reason"] == "queue_full"
    assert info.value.params["seconds"] >= 1
    release.set()
    await asyncio.gather(*tasks)
    assert (gate.running, gate.waiting) == (0, 0)
    async with gate.slot() as waited:  # free again, no wait
        assert waited < 0.05
    assert reasons == ["queue_full"]


async def test_a_request_waits_at_most_the_wait_limit() -> None:
    reasons: list[str] = []
    gate = Admission(slots=1, max_queue=0, max_wait_s=0.1, on_reject=reasons.append)
    release = asyncio.Event()

    async def hold() -> None:
        async with gate.slot():
            await release.wait()

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0.01)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(EngineBusy) as info:
        async with gate.slot():
            pass
    assert 0.09 <= loop.time() - t0 < 0.5
    assert info.value.params["reason"] == "wait_limit" and reasons == ["wait_limit"]
    assert gate.waiting == 0  # the refused request left the queue
    release.set()
    await holder


async def test_retry_after_follows_the_measured_engine_time() -> None:
    gate = Admission(slots=1, max_queue=1, max_wait_s=10.0)
    for _ in range(3):
        async with gate.slot():
            await asyncio.sleep(0.02)
    assert gate.retry_after_s() == 1  # 20 ms calls: the floor of one second
    gate._mean_s = 4.0  # four-second jokes with one waiting ahead: about 8 s
    gate.waiting = 1
    assert gate.retry_after_s() == 8


def req(data: bytes, user: str) -> JokeRequest:
    return JokeRequest(image_bytes=data, channel="test", user_id=user)


async def test_service_answers_busy_over_the_bound_and_counts_it(
    settings: Settings, chelsea_png: bytes
) -> None:
    settings.limits.per_user_per_minute = 0
    settings.limits.max_concurrency = 1
    settings.limits.max_queue = 1
    settings.limits.queue_timeout_s = 30
    app = await App.create(settings, engine=InstantEngine(delay_s=0.3))
    try:
        results = await asyncio.gather(
            *(app.service.tell(req(chelsea_png, f"u{i}")) for i in range(4)),
            return_exceptions=True,
        )
        busy = [r for r in results if isinstance(r, EngineBusy)]
        assert len(busy) == 2 and sum(not isinstance(r, Exception) for r in results) == 2
        assert {b.params["reason"] for b in busy} == {"queue_full"}
        assert (await app.store.request_outcomes()) == {"ok": 2, "busy": 2}
        metrics = app.service.metrics.render().decode()
        engine = app.engine.name
        assert (
            f'oogiri_admission_rejected_total{{engine="{engine}",reason="queue_full"}} 2.0'
            in metrics
        )
        assert f'oogiri_engine_queue_waiting{{engine="{engine}"}} 0.0' in metrics
        assert "oogiri_engine_queue_wait_seconds_count" in metrics
    finally:
        await app.close()


async def test_no_bound_lets_everyone_wait(settings: Settings, chelsea_png: bytes) -> None:
    settings.limits.per_user_per_minute = 0
    settings.limits.max_concurrency = 1
    settings.limits.max_queue = 0
    settings.limits.queue_timeout_s = 30
    app = await App.create(settings, engine=InstantEngine(delay_s=0.05))
    try:
        results = await asyncio.gather(
            *(app.service.tell(req(chelsea_png, f"u{i}")) for i in range(5)),
            return_exceptions=True,
        )
        assert not any(isinstance(r, Exception) for r in results)
    finally:
        await app.close()


def test_the_web_api_answers_busy_with_503_and_the_estimated_retry_after() -> None:
    from plugins.web.errors import oogiri_error_response

    r = oogiri_error_response(EngineBusy(seconds=7, reason="queue_full"), "en")
    assert r.status_code == 503 and r.headers["retry-after"] == "7"
    assert b"busy" in r.body
    assert oogiri_error_response(EngineBusy(), "en").headers["retry-after"] == "5"
