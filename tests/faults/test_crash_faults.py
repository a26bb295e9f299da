"""The disk filling up under the image store, and the bot killed with SIGKILL mid-vote.

Disk full: a real 256 KB tmpfs is mounted on the images folder (root only; skipped where mount is
refused). The upload that does not fit gets a clear 503, leaves no partial file and no database
row, and everything that does not need new disk space keeps working; once there is room again the
next picture is stored — the bot itself was never restarted.

SIGKILL: the bot runs in a child process (the test wrapper with a fault plugin that holds the
answer to votes on one joke back *after* they are committed), on SQLite in WAL mode. One vote is
killed after its commit, another while it waits for the database's write lock (held by the test).
After a restart with the real ``oogiri serve``: every answered vote is there, each in-flight vote
is either there whole or not at all, and the client's retry of both is idempotent.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import sqlite3
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from faultsupport import BotProcess, tiny_tmpfs
from PIL import Image
from relreport import Reliability
from sqlalchemy import func, select

from bot.app import App
from bot.engines.instant import InstantEngine
from bot.models import message
from bot.settings import Settings
from bot.store import ImageRow, JokeRow
from plugins.web import CSRF_HEADER, create_api

BASE = "http://testserver"


def distinct_pngs(source: bytes, count: int) -> list[bytes]:
    base = Image.open(io.BytesIO(source)).convert("RGB")
    out = []
    for i in range(count):
        im = base.copy()
        im.putpixel((i % im.width, 0), (i % 256, 255 - i % 256, 7))
        buf = io.BytesIO()
        im.save(buf, "PNG")
        out.append(buf.getvalue())
    return out


async def test_disk_full_while_storing_an_image(
    tmp_path: Path, chelsea_png: bytes, reliability: Reliability
) -> None:
    reliability.case(
        "storage faults", "disk-full", "disk",
        "images folder on a 256 KB tmpfs; distinct pictures until it is full",
        "503 unavailable; no partial file; no row; votes and stored pictures still work",
    )  # fmt: skip
    settings = Settings(
        _env_file=None, data_dir=tmp_path / "data", plugins=[], limits={"per_user_per_minute": 0}
    )
    try:
        mount = tiny_tmpfs(settings.images_dir, "256k")
        mount.__enter__()
    except (PermissionError, FileNotFoundError) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    app = await App.create(settings, engine=InstantEngine())
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_api(app)), base_url=BASE
        ) as client:
            token = (await client.get("/api/session")).json()["csrf_token"]
            stored: list[dict] = []
            refused = None
            pngs = distinct_pngs(chelsea_png, 41)
            with reliability.measure(time_limit_s=30):
                for png in pngs[:40]:
                    r = await client.post(
                        "/api/jokes",
                        files={"image": ("c.png", png, "image/png")},
                        headers={"Accept-Language": "en"},
                    )
                    if r.status_code != 201:
                        refused = r
                        break
                    stored.append(r.json())
            assert stored, "not even one picture fitted"
            assert refused is not None, "the 256 KB disk never filled up"
            assert refused.status_code == 503
            assert refused.json() == {"error": "unavailable", "message": message("unavailable")}
            assert refused.headers["retry-after"] == "5"
            # no partial file: every file there is a complete picture named by its hash
            files = sorted(settings.images_dir.rglob("*"))
            assert not [f for f in files if f.name.startswith(".tmp-")]
            pictures = [f for f in files if f.is_file()]
            for f in pictures:
                assert hashlib.sha256(f.read_bytes()).hexdigest() == f.stem
                Image.open(f).load()
            # no row for the picture that did not fit, nor a joke
            async with app.store.session() as s:
                assert await s.scalar(select(func.count()).select_from(JokeRow)) == len(stored)
                assert await s.scalar(select(func.count()).select_from(ImageRow)) == len(pictures)
            assert (await app.store.request_outcomes()).get("unavailable") == 1
            # what needs no new disk space keeps working: votes, a picture already stored
            vote = await client.post(
                f"/api/jokes/{stored[0]['id']}/rating",
                json={"value": 1},
                headers={CSRF_HEADER: token, "Origin": BASE},
            )
            assert vote.status_code == 200
            known = {"image": ("c.png", pngs[0], "image/png")}
            again = await client.post("/api/jokes", files=known)
            assert again.status_code == 201
            # room again (an operator grows the volume): the next new picture is stored
            remount = ["mount", "-o", "remount,size=2m", str(settings.images_dir)]
            await asyncio.to_thread(subprocess.run, remount, check=True)
            ok = await client.post("/api/jokes", files={"image": ("c.png", pngs[40], "image/png")})
            assert ok.status_code == 201, ok.text
            reliability.observe(
                f"{len(stored)} pictures fitted, then 503 unavailable; no partial file; "
                "vote 200, stored picture 201; after remount 201",
                pictures_stored=len(pictures),
            )
    finally:
        await app.close()
        mount.__exit__(None, None, None)


# --------------------------------------------------------------------------- SIGKILL


def _ratings(db: Path) -> dict[tuple[int, str], int]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT joke_id, user_id, value FROM ratings").fetchall()
    return {(j, u): v for j, u, v in rows}


def _wait_for_line(path: Path, timeout_s: float = 10) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip().splitlines()[-1]
        time.sleep(0.02)
    raise AssertionError(f"nothing in {path} after {timeout_s} s")


async def test_sigkill_between_accepting_a_vote_and_answering_it(
    tmp_path: Path, chelsea_png: bytes, reliability: Reliability
) -> None:
    reliability.case(
        "crash faults", "sigkill-mid-vote", "crash",
        "SIGKILL with one vote committed but unanswered and one waiting for the DB write lock",
        "answered votes kept; in-flight votes whole or absent; retries idempotent; restarts",
    )  # fmt: skip
    data = tmp_path / "data"
    marker = tmp_path / "committed.txt"
    bot = BotProcess(
        data,
        OOGIRI_TEST_SLOW_RATING_S="60",
        OOGIRI_TEST_SLOW_RATING_JOKES="2",
        OOGIRI_TEST_MARKER=str(marker),
    ).start()
    db = data / "oogiri.sqlite3"
    alice = httpx.AsyncClient(base_url=bot.url, timeout=30)
    bob = httpx.AsyncClient(base_url=bot.url, timeout=30)
    lock: sqlite3.Connection | None = None
    try:
        tokens = {}
        for name, client in (("alice", alice), ("bob", bob)):
            tokens[name] = (await client.get("/api/session")).json()["csrf_token"]

        async def vote(client: httpx.AsyncClient, name: str, joke: str, value: int):
            return await client.post(
                f"/api/jokes/{joke}/rating",
                json={"value": value},
                headers={CSRF_HEADER: tokens[name], "Origin": bot.url},
            )

        files = {"image": ("c.png", chelsea_png, "image/png")}
        jokes = [(await alice.post("/api/jokes", files=files)).json()["id"] for _ in range(2)]
        # the API names jokes by public id; the store numbers them 1 and 2 (SLOW_RATING_JOKES)
        assert len(set(jokes)) == 2
        # answered before the crash
        assert (await vote(alice, "alice", jokes[0], 1)).status_code == 200
        assert (await vote(bob, "bob", jokes[0], -1)).status_code == 200
        answered = _ratings(db)
        assert sorted(answered.values()) == [-1, 1]

        with reliability.measure(time_limit_s=60):
            # 1. committed, answer held back by the plugin
            in_flight_a = asyncio.create_task(vote(alice, "alice", jokes[1], 1))
            await asyncio.to_thread(_wait_for_line, marker)
            # 2. the database's write lock is taken: bob's vote waits for it inside the server
            lock = sqlite3.connect(db, timeout=5, isolation_level=None)
            lock.execute("BEGIN IMMEDIATE")
            in_flight_b = asyncio.create_task(vote(bob, "bob", jokes[1], -1))
            await asyncio.sleep(0.5)
            assert not in_flight_a.done() and not in_flight_b.done()
            bot.kill()
            for task in (in_flight_a, in_flight_b):
                with pytest.raises(httpx.TransportError):
                    await task  # no answer ever came
            lock.rollback()
            lock.close()
            lock = None

            # restart with the real `oogiri serve`: no plugin, same data, same port
            restarted = BotProcess(data, port=bot.port).start(cli=True)
        try:
            after = _ratings(db)
            for key, value in answered.items():
                assert after[key] == value  # answered before the crash: kept
            in_flight = {k: v for k, v in after.items() if k not in answered}
            # alice's vote was committed before the kill, bob's never got the lock
            assert list(in_flight.values()) == [1], in_flight
            assert len(after) == 3
            # the clients retry what got no answer: idempotent, one vote per user per joke
            r_a = await vote(alice, "alice", jokes[1], 1)
            r_b = await vote(bob, "bob", jokes[1], -1)
            assert r_a.status_code == r_b.status_code == 200
            assert r_a.json()["previous"] == 1  # already there: the retry changed nothing
            assert r_b.json()["previous"] is None
            final = _ratings(db)
            assert len(final) == 4 and r_b.json()["up"] == 1 and r_b.json()["down"] == 1
            # and serving continues
            assert (await alice.post("/api/jokes", files=files)).status_code == 201
            reliability.observe(
                "2 answered votes kept; committed in-flight vote present once, "
                "lock-waiting one absent; retries 200 (previous=+1 / none); serving again"
            )
        finally:
            restarted.stop()
    finally:
        if lock is not None:
            lock.close()
        bot.kill()
        await alice.aclose()
        await bob.aclose()
