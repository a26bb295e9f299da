"""The database going away: users get a clear 503 (never a hang or a 500), nothing a user was told
is stored gets lost, and serving resumes by itself when the database is back.

* a database that refuses connections (a dead URL swapped in under a running App);
* PostgreSQL really restarted (``pg_ctl restart``) in the middle of a bounded stream of uploads and
  votes through the web API — every vote answered 2xx must be in the database after. The server is
  a throwaway cluster of this test's own (initdb into a temp folder, a free port): the machine's
  PostgreSQL, and whoever else uses it, never notices.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from faultsupport import ThrowawayPostgres, free_port
from relreport import Reliability
from sqlalchemy import exc as sa_exc
from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from bot.app import App
from bot.engines.instant import InstantEngine
from bot.models import message
from bot.settings import Settings
from bot.store import JokeRow, RatingRow, is_unavailable
from plugins.web import CSRF_HEADER, USER_COOKIE, create_api, web_state

BASE = "http://testserver"


def _dbapi_error(sqlstate: str | None, invalidated: bool = False) -> sa_exc.DBAPIError:
    class Orig(Exception):
        pass

    orig = Orig("boom")
    orig.sqlstate = sqlstate  # type: ignore[attr-defined]
    return sa_exc.DBAPIError("INSERT …", {}, orig, connection_invalidated=invalidated)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (ConnectionRefusedError(111, "refused"), True),
        (TimeoutError(), True),
        (sa_exc.TimeoutError("QueuePool limit reached"), True),
        (_dbapi_error("57P01"), True),  # admin shutdown
        (_dbapi_error("57P03"), True),  # the database system is starting up
        (_dbapi_error("08006"), True),  # connection failure
        (_dbapi_error("53100"), True),  # disk full
        (_dbapi_error(None, invalidated=True), True),
        (sa_exc.OperationalError("x", {}, Exception("database is locked")), True),
        (_dbapi_error("22021"), False),  # bad data (e.g. NUL in text): a bug, not an outage
        (_dbapi_error("23505"), False),  # unique violation
        (_dbapi_error(None), False),
        (ValueError("x"), False),
    ],
)
def test_what_counts_as_the_database_being_unavailable(exc: BaseException, expected: bool) -> None:
    assert is_unavailable(exc) is expected


async def _vote(client: httpx.AsyncClient, joke_id: int, value: int, token: str) -> httpx.Response:
    return await client.post(
        f"/api/jokes/{joke_id}/rating",
        json={"value": value},
        headers={CSRF_HEADER: token, "Origin": BASE, "Accept-Language": "en"},
    )


async def test_a_database_that_refuses_connections_gives_503_then_recovers(
    tmp_path: Path, chelsea_png: bytes, reliability: Reliability
) -> None:
    reliability.case(
        "database faults", "database-refuses", "database",
        "every connection to the database refused (dead URL swapped in under a running App)",
        "503 unavailable for pictures, votes and stats; /livez 200; recovers",
    )  # fmt: skip
    settings = Settings(_env_file=None, data_dir=tmp_path / "data", plugins=[])
    app = await App.create(settings, engine=InstantEngine())
    good_sessions = app.store.sessions
    dead = create_async_engine(f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/gone")
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_api(app)), base_url=BASE
        ) as client:
            token = (await client.get("/api/session")).json()["csrf_token"]
            files = {"image": ("c.png", chelsea_png, "image/png")}
            joke = (await client.post("/api/jokes", files=files)).json()
            app.store.sessions = async_sessionmaker(dead, expire_on_commit=False)
            with reliability.measure(time_limit_s=10):
                up = await client.post(
                    "/api/jokes",
                    files={"image": ("c.png", chelsea_png, "image/png")},
                    headers={"Accept-Language": "en"},
                )
                vote = await _vote(client, joke["id"], 1, token)
                stats = await client.get("/api/stats", headers={"Accept-Language": "zh"})
                health = await client.get("/healthz")
                live = await client.get("/livez")
            expected = {"error": "unavailable", "message": message("unavailable", "en")}
            assert (up.status_code, up.json()) == (503, expected)
            assert (vote.status_code, vote.json()) == (503, expected)
            assert stats.status_code == 503
            assert stats.json()["message"] == message("unavailable", "zh")
            assert up.headers["retry-after"] == "5"
            assert health.status_code == 503 and health.json()["database"]["ok"] is False
            assert live.status_code == 200
            reliability.observe("503 unavailable ×3, /healthz 503, /livez 200; then 201/200")

            app.store.sessions = good_sessions  # the database is back
            assert (await _vote(client, joke["id"], 1, token)).status_code == 200
            again = await client.post(
                "/api/jokes", files={"image": ("c.png", chelsea_png, "image/png")}
            )
            assert again.status_code == 201
    finally:
        await dead.dispose()
        await app.close()


# --------------------------------------------------------------------------- a real restart


async def _machine_pg_started() -> str | None:
    """When the machine's own PostgreSQL started (None: not reachable)."""
    import asyncpg

    url = os.environ.get("OOGIRI_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
    try:
        conn = await asyncio.wait_for(asyncpg.connect(url), timeout=3)
    except Exception:
        return None
    try:
        return str(await conn.fetchval("SELECT pg_postmaster_start_time()"))
    finally:
        await conn.close()


@pytest.fixture
async def own_postgres() -> AsyncIterator[ThrowawayPostgres]:
    """A PostgreSQL server of this test's own, which it may restart (CI: required). The machine's
    server (if any) must not have restarted meanwhile."""
    before = await _machine_pg_started()
    try:
        server = await asyncio.to_thread(ThrowawayPostgres().start)
    except (FileNotFoundError, KeyError, RuntimeError) as exc:  # KeyError: no postgres user
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"no throwaway PostgreSQL: {exc}")
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)
    assert await _machine_pg_started() == before, "the machine's PostgreSQL was restarted"


@pytest.mark.postgres
async def test_postgres_restart_mid_traffic_loses_no_acknowledged_vote(
    own_postgres: ThrowawayPostgres, tmp_path: Path, chelsea_png: bytes, reliability: Reliability
) -> None:
    reliability.case(
        "database faults", "postgres-restart", "database",
        "pg_ctl restart (a throwaway cluster) during 8 s of uploads + votes (6 web users, ASGI)",
        "no 500/hang; 503 during the outage; every 2xx vote stored; serving resumes",
    )  # fmt: skip
    pg = own_postgres
    settings = Settings(
        _env_file=None,
        data_dir=tmp_path / "data",
        plugins=[],
        store={"url": pg.url},
        limits={"per_user_per_minute": 0, "per_chat_per_minute": 0},
        # Six users on one loopback address: the web channel's per-network limits stay out of it.
        web={
            "uploads_per_ip_per_minute": 0,
            "votes_per_ip_per_minute": 0,
            "new_sessions_per_ip_per_hour": 0,
            "inflight_uploads_per_ip": 0,
        },
    )
    app = await App.create(settings, engine=InstantEngine())
    api = create_api(app)
    rng = random.Random(8)
    acked_votes: dict[tuple[int | str, str], int] = {}  # (joke, user) → last value answered 2xx
    acked_jokes: set[int | str] = set()  # the ids the API showed
    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    restart_window: list[float] = []
    stop_at = time.monotonic() + 8.0

    async def user(n: int) -> None:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=api), base_url=BASE, timeout=30
        ) as client:
            session = await client.get("/api/session")
            token = session.json()["csrf_token"]
            me = web_state(app).identities.verify(session.cookies.get(USER_COOKIE))
            assert me is not None
            while time.monotonic() < stop_at:
                started = time.monotonic()
                if not acked_jokes or rng.random() < 0.3:
                    r = await client.post(
                        "/api/jokes", files={"image": ("c.png", chelsea_png, "image/png")}
                    )
                    if r.status_code == 201:
                        acked_jokes.add(r.json()["id"])
                else:
                    joke_id = rng.choice(sorted(acked_jokes))
                    value = rng.choice((1, -1))
                    r = await _vote(client, joke_id, value, token)
                    if r.status_code == 200:
                        acked_votes[(joke_id, me)] = value
                latencies.append(time.monotonic() - started)
                statuses[f"{r.status_code} {r.json().get('error', 'ok')}"] += 1
                await asyncio.sleep(0.01 if r.status_code < 500 else 0.1)

    async def restart() -> None:
        await asyncio.sleep(2.0)
        began = time.monotonic()
        done = await asyncio.to_thread(pg.restart)
        assert done.returncode == 0, f"pg_ctl restart failed: {done.stderr}\n{pg.log()}"
        assert await asyncio.to_thread(pg.ready, 60), "PostgreSQL did not come back"
        restart_window.extend([began, time.monotonic()])

    try:
        with reliability.measure(time_limit_s=60):
            await asyncio.gather(restart(), *(user(n) for n in range(6)))
        # PostgreSQL is back: serving continues without anyone stepping in
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url=BASE) as c:
            token = (await c.get("/api/session")).json()["csrf_token"]
            r = await c.post("/api/jokes", files={"image": ("c.png", chelsea_png, "image/png")})
            assert r.status_code == 201, r.text
            assert (await _vote(c, r.json()["id"], 1, token)).status_code == 200
        # every vote a user was told about is stored, with the value they were told
        async with app.store.session() as s:
            # The API shows a joke's public id where the store has one (else the row id).
            shown = {
                row.id: getattr(row, "public_id", row.id)
                for row in (await s.execute(select(JokeRow))).scalars()
            }
            stored = {
                (shown[row.joke_id], row.user_id): row.value
                for row in (await s.execute(select(RatingRow))).scalars()
            }
            jokes = set(shown.values())
        web_ids = {u for (_, u) in stored}
        assert acked_jokes <= jokes
        lost = [key for key, value in acked_votes.items() if stored.get(key) != value]
        assert lost == []
        bad = {k: v for k, v in statuses.items() if not k.startswith(("200", "201", "503"))}
        assert not bad, statuses  # no 500s, no other surprises
        assert max(latencies) < 15, max(latencies)  # an outage is answered, not hung
        outage = restart_window[1] - restart_window[0] if restart_window else None
        reliability.observe(
            f"{sum(statuses.values())} requests: "
            + ", ".join(f"{k} ×{v}" for k, v in sorted(statuses.items()))
            + f"; {len(acked_votes)} acknowledged votes, lost {len(lost)}",
            restart_s=round(outage, 2) if outage else None,
            max_latency_s=round(max(latencies), 2),
            voters=len(web_ids),
        )
    finally:
        with contextlib.suppress(Exception):
            await app.close()
