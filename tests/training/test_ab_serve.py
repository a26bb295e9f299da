"""The live A/B test end to end in a serving app: the managed LMDeploy engine (a fake
``lmdeploy`` executable over loopback HTTP) serves both arms, users get sticky arms, votes go
through JokeService, the decision promotes through the real swap command and control socket,
the previous model stays on a small arm (the watch), and everything stops cleanly."""

from __future__ import annotations

import asyncio
import io
import json
import random
import sys
from pathlib import Path

import pytest
from PIL import Image

from bot.ab import ArmsEngine, assign
from bot.ab_serving import AbServing
from bot.app import App
from bot.engines import lmdeploy_server
from bot.engines.lmdeploy_server import ManagedLMDeploy, ServerProcess, control_request
from bot.models import JokeRequest
from bot.settings import Settings
from training.ab import start_test
from training.ab_plugin import decide_once
from training.run import ensure_registry

FAKES = Path(__file__).resolve().parents[1] / "fakes"
sys.path.insert(0, str(FAKES))
FAKE_CMD = [sys.executable, str(FAKES / "fake_lmdeploy.py")]


def free_port_block(n: int = 8) -> int:
    for _ in range(200):
        base = random.randint(20000, 60000)
        if all(lmdeploy_server.port_is_free("127.0.0.1", p) for p in range(base, base + n)):
            return base
    raise RuntimeError("no free port block")


def model_dir(root: Path, name: str) -> Path:
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"architectures": ["InternVLChatModel"]}))
    return path


def picture(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (96, 64), (i * 37 % 255, 90, 200 - i % 100)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(autouse=True)
def fast_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ServerProcess, "HEALTH_POLL_S", 0.05)
    monkeypatch.setattr(ServerProcess, "STOP_GRACE_S", 3.0)
    monkeypatch.setenv("FAKE_LMDEPLOY_STARTUP_S", "0.2")
    monkeypatch.setenv("FAKE_LMDEPLOY_DELAY_S", "0.0")


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    sock = tmp_path / "run" / "engine.sock"
    # the promotion runs `python -m bot.cli engine swap …`, which finds serve by this socket
    monkeypatch.setenv("OOGIRI_ENGINE__CONTROL_SOCKET", str(sock))
    return Settings(
        _env_file=None,
        data_dir=tmp_path / "data",
        plugins=["engine_lmdeploy_server", "engine_openai_http", "training", "ab"],
        limits={"per_user_per_minute": 0, "per_chat_per_minute": 0},
        engine={
            "name": "lmdeploy",
            "manage": True,
            "model": str(model_dir(tmp_path, "model-v1")),
            "model_version": "v1",
            "port": free_port_block(),
            "server_command": FAKE_CMD,
            "retry_backoff_s": 0.05,
            "startup_timeout_s": 30,
            "drain_timeout_s": 10,
            "max_dynamic_patch": 1,
            "control_socket": str(sock),
        },
        ab={
            "share": 0.5,
            "min_votes": 20,
            "failure_margin": 0.1,  # 20 requests per arm cannot show 2 pp (test_ab_honest.py)
            "watch_share": 0.25,
            "poll_s": 30,  # the test asks for each look itself
            "decide_in_serve": False,
        },
    )


async def ask(app: App, user: str, i: int) -> tuple[int, str, str]:
    joke = await app.service.tell(
        JokeRequest(image_bytes=picture(i), channel="web", user_id=user, language="zh")
    )
    return joke.id, joke.model_version, joke.text


async def test_live_ab_serves_both_arms_decides_promotes_and_watches(
    settings: Settings, tmp_path: Path
) -> None:
    app = await App.create(settings)
    try:
        base = app.engine
        assert isinstance(base, ManagedLMDeploy)
        store = app.store
        active = await ensure_registry(store, settings)
        assert active is not None and active.version == "v1"
        v2 = model_dir(tmp_path, "model-v2")
        await store.add_model_version("v2", str(v2), parent="v1")
        serving: AbServing = app.state["ab_serving"]

        test = await start_test(store, settings, "v2", "v1")
        # the control socket's ab_sync makes serve look now (as a CronJob's decision does)
        answer = await asyncio.to_thread(
            control_request, settings.engine.control_socket, {"op": "ab_sync"}, None, 60
        )
        assert answer["ok"] and answer["result"]["serving"]["test"] == test.id, answer
        arms = app.engine
        assert isinstance(arms, ArmsEngine) and arms.base_engine is base

        users = [f"u{i}" for i in range(60)]
        votes: list[tuple[int, str, int]] = []
        for i, user in enumerate(users):
            for k in range(2):
                joke_id, version, text = await ask(app, user, i * 2 + k)
                arm = assign(test.id, f"web:{user}", 0.5)
                assert version == ("v2" if arm == "candidate" else "v1")
                assert f"[{version}]" in text  # answered by that version's own server
                # the audience prefers the candidate; each user rates their own jokes
                liked = (version == "v2") == (k == 0 or i % 4 != 0)
                votes.append((joke_id, user, 1 if liked else -1))
        for joke_id, user, value in votes:
            # each from its own network: web votes of one network are one voter (web_votes)
            net = f"net-{user}"
            await app.service.rate(joke_id, f"web:{user}", value, "web", network=net)
            await app.service.rate(joke_id, f"web:{user}", value, "web", network=net)  # once

        metrics = app.metrics.render().decode()
        assert 'oogiri_ab_requests_total{arm="candidate"' in metrics

        outcomes = await decide_once(app)
        assert [o.outcome for o in outcomes] == ["promoted"], outcomes
        # promoted through the normal path: the swap command reached serve's socket
        assert (await store.active_model()).version == "v2"
        assert base.label == "v2" and base.model_dir == v2.resolve()
        watch = await store.running_ab_test()
        assert watch is not None and (watch.kind, watch.candidate) == ("watch", "v1")

        await serving.reconcile()
        arms = app.engine
        assert isinstance(arms, ArmsEngine) and arms.test_id == watch.id
        seen = set()
        for i, user in enumerate(users):
            _, version, text = await ask(app, user, 500 + i)
            arm = assign(watch.id, f"web:{user}", 0.25)
            assert version == ("v1" if arm == "candidate" else "v2") and f"[{version}]" in text
            seen.add(version)
        assert seen == {"v1", "v2"}

        await serving.reconcile()
        metrics = app.metrics.render().decode()
        assert f'oogiri_ab_votes{{arm="control",test="{watch.id}",version="v2"}}' in metrics
        # every request of the watch was answered: the failure guard's rate per arm is 0
        assert (
            f'oogiri_ab_failure_rate{{arm="control",test="{watch.id}",version="v2"}} 0.0' in metrics
        )
        assert "oogiri_model_rollbacks 0.0" in metrics
    finally:
        await app.close()
    # every server the test started is gone (the arm's and both models')
    for pid_file in (settings.data_dir / "logs").glob("lmdeploy-*.pid"):
        pytest.fail(f"a managed server was left behind: {pid_file}")


async def test_unmanaged_engine_serves_the_arm_from_the_candidate_url(tmp_path: Path) -> None:
    """openai/unmanaged: the small arm is ab.candidate_base_url, used once it answers."""
    from fake_lmdeploy import FakeLMDeploy

    control = FakeLMDeploy(model_name="served-v1").start()
    port = free_port_block(1)
    settings = Settings(
        _env_file=None,
        data_dir=tmp_path / "data",
        plugins=["engine_openai_http", "training", "ab"],
        limits={"per_user_per_minute": 0, "per_chat_per_minute": 0},
        engine={"name": "openai", "base_urls": [control.url], "model_version": "v1",
                "retry_backoff_s": 0.01},
        ab={"share": 0.5, "poll_s": 30, "decide_in_serve": False,
            "candidate_base_url": f"http://127.0.0.1:{port}"},
    )  # fmt: skip
    app = await App.create(settings)
    candidate = None
    try:
        await ensure_registry(app.store, settings)
        await app.store.add_model_version("v2", str(model_dir(tmp_path, "model-v2")))
        test = await start_test(app.store, settings, "v2", "v1")
        serving: AbServing = app.state["ab_serving"]
        status = await serving.reconcile()
        assert status["serving"] is None and "not serving yet" in status["error"]
        assert not isinstance(app.engine, ArmsEngine)  # nobody gets a broken arm

        candidate = FakeLMDeploy(model_name="served-v2", port=port).start()
        serving._failed.clear()  # the retry interval has passed
        status = await serving.reconcile()
        assert status["serving"]["test"] == test.id and status["error"] is None
        versions = set()
        for i in range(30):
            _, version, text = await ask(app, f"u{i}", i)
            assert f"[served-{version}]" in text
            versions.add(version)
        assert versions == {"v1", "v2"}

        await app.store.end_ab_test(test.id, "stopped", "operator")
        status = await serving.reconcile()
        assert status["serving"] is None and not isinstance(app.engine, ArmsEngine)
    finally:
        await app.close()
        control.stop()
        if candidate is not None:
            candidate.stop()


def test_a_stale_arm_left_by_a_killed_serve_is_ended(tmp_path: Path) -> None:
    """Only api_servers named by their pid file and port are ended; the active one is kept."""
    import subprocess
    import time

    from bot.ab_serving import _end_stale_arms

    logs = tmp_path / "logs"
    logs.mkdir()
    port, active_port = free_port_block(1), free_port_block(1)
    folder = model_dir(tmp_path, "old-arm")
    stale = subprocess.Popen(
        [*FAKE_CMD, "serve", "api_server", str(folder), "--server-port", str(port)],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    other = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        (logs / f"lmdeploy-{port}.pid").write_text(str(stale.pid))
        (logs / f"lmdeploy-{port + 1}.pid").write_text(str(other.pid))  # not an api_server
        (logs / f"lmdeploy-{active_port}.pid").write_text(str(other.pid))
        time.sleep(0.3)
        assert _end_stale_arms(logs, keep={active_port}) == [stale.pid]
        assert stale.wait(timeout=10) != 0
        assert other.poll() is None
        assert (logs / f"lmdeploy-{active_port}.pid").exists()
    finally:
        for proc in (stale, other):
            proc.kill()
            proc.wait()


async def test_a_decision_elsewhere_asks_serve_to_drop_the_arm_first(
    settings: Settings,
) -> None:
    """``notify_serve`` (CLI, CronJob) reaches a local serve's control socket: ab_sync."""
    from bot.engines.lmdeploy_server import ControlServer
    from training.ab_plugin import notify_serve

    synced: list[dict[str, object]] = []

    async def ab_sync(request: dict[str, object]) -> dict[str, object]:
        synced.append(request)
        return {"serving": None}

    class FakeApp:
        def __init__(self) -> None:
            self.engine = None
            self.state = {"control_ops": {"ab_sync": ab_sync}}

    on_ended = notify_serve(settings)
    await on_ended(None)  # no serve listening: nothing to do, no error
    path = settings.engine.control_socket
    assert path is not None
    control = ControlServer(FakeApp(), path)
    assert await control.start()
    try:
        await on_ended(None)
    finally:
        await control.close()
    assert synced == [{"op": "ab_sync"}]


async def test_serve_takes_the_training_lock_only_when_a_test_runs(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deciding nothing must not hold the lock a cron-started training run needs."""
    from training import lock
    from training.lock import training_lock
    from training.run import work_dir_of

    asked: list[object] = []

    def counting_lock(*args: object, **kwargs: object) -> object:
        asked.append(args)
        return training_lock(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(lock, "training_lock", counting_lock)
    settings.engine.name = "openai"
    settings.engine.manage = False
    app = await App.create(settings)
    try:
        assert await decide_once(app) == [] and asked == []  # no test: the lock is not taken
        await ensure_registry(app.store, settings)
        await app.store.add_model_version("v2", str(model_dir(tmp_path, "model-v2")))
        await start_test(app.store, settings, "v2", "v1")
        async with training_lock(app.store, work_dir_of(settings)):
            assert await decide_once(app) == []  # a run holds it: next time
        (out,) = await decide_once(app)
        assert out.outcome == "wait" and len(asked) == 2
    finally:
        await app.close()
