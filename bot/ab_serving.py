"""``oogiri serve``'s side of a live A/B test: serve the small arm while the store says so.

The store's ``ab_tests`` table is the only coordination between the process that starts or ends
a test (a training run, a CronJob, the operator's CLI) and every serving replica: each replica
polls it (``ab.poll_s``; the control socket's ``ab_sync`` asks for an immediate look) and

* when a test is running and not yet served here: starts the small arm's engine and wraps the
  served engine in :class:`bot.ab.ArmsEngine` (new requests only; none is dropped);
* when the test ended (or another one started): routes everything back to the served engine,
  waits for the arm's requests in flight, then stops the arm.

How the small arm is served depends on the engine:

* managed LMDeploy (``engine.manage``): a second ``lmdeploy serve api_server`` for the arm's
  model folder, started, health-checked and warmed like a blue/green swap's new server, on the
  same GPU with ``ab.candidate_cache_max_entry_count`` of the free memory for its KV cache, or
  on ``ab.candidate_gpu`` (CUDA_VISIBLE_DEVICES) when set;
* unmanaged HTTP engines (``lmdeploy`` without manage, ``openai``): the server at
  ``ab.candidate_base_url``, which the operator (or ``ab.start_command``) points at the arm's
  model; jokes are labelled with the arm's registry version;
* any other engine (transformers, instant): a second instance from the same engine factory with
  ``engine.model`` set to the arm's folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

from bot.ab import ArmsEngine, ab_metrics, evaluate
from bot.engines.base import Engine
from bot.models import EngineError

log = logging.getLogger(__name__)

RETRY_FAILED_S = 300.0  # a small arm that failed to start is tried again after this long


class _ServerArm:
    """An HTTP engine bound to the managed server it talks to: closing it stops the server."""

    def __init__(self, http: Any, server: Any) -> None:
        self.http = http
        self.server = server
        self.name = http.name

    async def generate(self, image: Any, prompt: str, params: Any) -> Any:
        return await self.http.generate(image, prompt, params)

    async def health(self) -> Any:
        return await self.http.health()

    def status(self) -> dict[str, Any]:
        return self.server.status()

    async def close(self) -> None:
        try:
            await self.http.close()
        finally:
            await self.server.stop()


async def build_arm_engine(app: Any, version: str, model_path: str) -> Engine:
    """An engine that serves ``version`` (folder ``model_path``) beside the served engine."""
    from bot.engines.lmdeploy_server import ManagedLMDeploy
    from bot.engines.openai_http import OpenAIHTTPEngine, Upstream

    settings = app.settings
    ab = settings.ab
    base = getattr(app.engine, "base_engine", app.engine)
    if isinstance(base, ManagedLMDeploy):
        return await _managed_arm(app, base, version, model_path)
    if isinstance(base, OpenAIHTTPEngine):
        if not ab.candidate_base_url:
            raise EngineError(
                detail=f"engine {base.name!r} is not managed: set ab.candidate_base_url to a "
                f"server that serves {version}"
            )
        upstream = Upstream.of([ab.candidate_base_url], ab.candidate_served_model_name, version)
        arm = OpenAIHTTPEngine(settings.engine, flavor=base.flavor.name, upstream=upstream)
        health = await arm.health()
        if not health.ok:  # not up yet (ab.start_command, a pod starting): try again later
            await arm.close()
            raise EngineError(detail=f"{ab.candidate_base_url} is not serving yet: {health.detail}")
        return arm
    from bot.plugins import collect

    engine_settings = settings.engine.model_copy(
        update={"model": model_path, "model_version": version}
    )
    arm_settings = settings.model_copy(update={"engine": engine_settings})
    factory = collect(app.pm, "oogiri_register_engines", "engine", settings).get(base.name)
    return await asyncio.to_thread(factory, arm_settings)


async def _managed_arm(app: Any, base: Any, version: str, model_path: str) -> Engine:
    from bot.engines.lmdeploy_server import ServerProcess, build_env, model_folder
    from bot.engines.openai_http import OpenAIHTTPEngine, Upstream

    ab = app.settings.ab
    e = base.engine_settings
    update: dict[str, Any] = {}
    if ab.candidate_gpu is None:
        # same GPU: the active server already holds its share; the arm takes a part of the rest
        update["cache_max_entry_count"] = ab.candidate_cache_max_entry_count
    arm_settings = e.model_copy(update=update)
    env = build_env(arm_settings)
    if ab.candidate_gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = ab.candidate_gpu
    exclude = {base.active.port} if base.active is not None else set()
    await asyncio.to_thread(_end_stale_arms, base.log_dir, exclude)
    port = base._free_port(exclude=exclude)
    served = e.served_model_name or version
    server = ServerProcess(
        arm_settings, model_folder(model_path), port, served, version, base.log_dir, env=env
    )
    try:
        await server.start()
        await server.wait_healthy()
        await base._warm(server, None)
    except BaseException:
        await server.stop(grace_s=10)
        raise
    server.supervise()
    http = OpenAIHTTPEngine(
        arm_settings, flavor="lmdeploy", upstream=Upstream.of([server.url], served, version)
    )
    log.info("A/B arm %s serving on %s", version, server.url)
    return _ServerArm(http, server)


def _end_stale_arms(log_dir: Path, keep: set[int]) -> list[int]:
    """A small arm left running by a serve process that was killed would hold GPU memory for
    good: end every managed api_server whose pid file names a port other than ``keep`` (only if
    that process is still an ``api_server`` on that port). Returns the pids ended."""
    ended = []
    for pid_file in log_dir.glob("lmdeploy-*.pid"):
        try:
            port = int(pid_file.stem.removeprefix("lmdeploy-"))
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            continue
        if port in keep:
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            cmdline = ""
        if "api_server" in cmdline and f"--server-port {port}" in cmdline:
            log.warning("ending a stale lmdeploy api_server (pid %d, port %d)", pid, port)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            ended.append(pid)
        with contextlib.suppress(OSError):
            pid_file.unlink()
    return ended


class AbServing:
    """Keeps this process's routing in line with the store's running test (see module doc)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.settings = app.settings
        self.store = app.store
        self.metrics = ab_metrics(app.metrics)
        self.arms: ArmsEngine | None = None
        self.serving: tuple[int, str, float] | None = None  # (test id, small arm, share)
        self.error: str | None = None
        self._failed: dict[int, float] = {}
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._labels: set[tuple[str, str, str]] = set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="ab-serving")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        async with self._lock:
            await self._drop()

    async def _loop(self) -> None:
        while True:
            try:
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("A/B serving: reconcile failed")
            await asyncio.sleep(self.settings.ab.poll_s)

    async def reconcile(self) -> dict[str, Any]:
        """Look at the store once and serve accordingly; returns what is served now."""
        async with self._lock:
            test = await self.store.running_ab_test()
            want = (test.id, test.candidate, float(test.share)) if test is not None else None
            if want != self.serving:
                await self._drop()
                if test is not None:
                    await self._serve(test)
            await self._refresh_metrics(test)
            return self.status()

    async def _serve(self, test: Any) -> None:
        failed_at = self._failed.get(test.id)
        if failed_at is not None and time.monotonic() - failed_at < RETRY_FAILED_S:
            return
        row = await self.store.get_model_version(test.candidate)
        if row is None:
            self.error = f"test #{test.id}: no model version {test.candidate!r} in the registry"
            self._failed[test.id] = time.monotonic()
            log.error("A/B serving: %s", self.error)
            return
        try:
            arm = await build_arm_engine(self.app, test.candidate, row.path)
        except Exception as exc:
            detail = exc.detail if isinstance(exc, EngineError) else repr(exc)
            self.error = f"test #{test.id}: cannot serve {test.candidate}: {detail}"
            self._failed[test.id] = time.monotonic()
            log.error("A/B serving: %s (retrying in %.0f s)", self.error, RETRY_FAILED_S)
            return
        self.error = None
        self._failed.pop(test.id, None)
        arms = ArmsEngine(
            self.app.engine,
            arm,
            test_id=test.id,
            share=float(test.share),
            candidate_version=test.candidate,
            metrics=self.metrics,
        )
        self.app.swap_engine(arms)
        self.arms = arms
        self.serving = (test.id, test.candidate, float(test.share))
        self.metrics.running.set(1)
        self.metrics.share.labels(str(test.id)).set(test.share)
        log.info("A/B test #%d (%s): %s on %.0f%% of users beside %s", test.id, test.kind,
                 test.candidate, test.share * 100, test.control)  # fmt: skip

    async def _drop(self) -> None:
        arms, self.arms, self.serving = self.arms, None, None
        if arms is None:
            return
        if self.app.engine is arms:
            self.app.swap_engine(arms.control)
        drained = await arms.drain_candidate(self.settings.engine.drain_timeout_s)
        if not drained:
            log.warning("A/B serving: the small arm still had requests after the drain timeout")
        try:
            await arms.candidate.close()
        except Exception:
            log.exception("A/B serving: closing the small arm failed")
        self.metrics.running.set(0)
        log.info("A/B test #%d no longer served here (%s)", arms.test_id, arms.routed)

    async def _refresh_metrics(self, running: Any) -> None:
        """Per-arm gauges of the running (else the latest) test, from the store's counts."""
        m = self.metrics
        tests = list(await self.store.ab_tests(limit=200))
        m.rollbacks.set(sum(1 for t in tests if t.kind == "watch" and t.status == "rolled_back"))
        test = running or (tests[0] if tests else None)
        if test is None:
            return
        ev = await evaluate(self.store, test)
        doc = ev.as_dict()
        tid = str(test.id)
        for arm_name, count in (("control", ev.control), ("candidate", ev.candidate)):
            version = test.control if arm_name == "control" else test.candidate
            labels = (tid, arm_name, version)
            self._labels.add(labels)
            m.votes.labels(*labels).set(count.votes)
            m.likes.labels(*labels).set(count.likes)
            m.like_rate.labels(*labels).set(count.likes / count.votes if count.votes else math.nan)
            failed = ev.failures.get(arm_name)
            rate = failed.rate if failed is not None else None
            m.failure_rate.labels(*labels).set(math.nan if rate is None else rate)
        for outcome in ("promote", "reject", "wait", "timeout"):
            m.decision.labels(tid, test.kind, outcome).set(
                1.0 if doc["decision"]["outcome"] == outcome else 0.0
            )

    def status(self) -> dict[str, Any]:
        return {
            "serving": None
            if self.serving is None
            else {"test": self.serving[0], "candidate": self.serving[1], "share": self.serving[2]},
            "routed": dict(self.arms.routed) if self.arms is not None else None,
            "error": self.error,
        }
