"""Soak: mixed Telegram + web traffic against a running bot, with faults injected — 0 lost.

Not a test: it measures. The bot runs as ``oogiri serve`` would, in a child process
(tests/faults/oogiri_testserver.py: the real App with the web and Telegram channels, the engine
wrapped so that a control file can make it fail), on a throwaway PostgreSQL cluster of its own
(tests/faults/faultsupport.py's ``ThrowawayPostgres``: initdb into a temp folder, a free loopback
port, deleted afterwards) when the server binaries are installed, else SQLite. The machine's own
PostgreSQL is never touched. This process plays the users:

* web users (httpx against the real uvicorn server): upload a picture, vote on the joke, sometimes
  change the vote;
* Telegram users (python-telegram-bot in the bot polls the fake Bot API of
  tests/telegram/fakebotapi.py served here): send a photo, press 👍/👎 under the joke;

and injects faults on a schedule: the engine failing for a while (``--engine-fault``), then a real
restart of that throwaway PostgreSQL (``pg_ctl restart -m fast``: every connection dropped).
Afterwards it checks that nothing a user was told
is lost — every joke delivered and every vote acknowledged (web 200, Telegram toast without alert)
is in the database with that value — that every request got an answer, and it reports
throughput, latency percentiles and the error answers per phase. Bounded in time and count,
loopback only.

Writes bench/results/soak-<engine>.json and the "Soak (<engine>)" section of docs/reliability.md.

Usage:
  python -m bench.soak                                 # 60 s, instant engine
  python -m bench.soak --engine transformers --duration 30 --web-users 2 --tg-users 2
  python -m bench.soak --duration 20 --no-docs --out /tmp/soak.json   # quick check, results kept
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    LOOPBACK_WEB_ENV,
    RESULTS,
    ROOT,
    latency_summary,
    machine,
    photo_jpegs,
    write_json,
    write_section,
)
from bot.models import message
from plugins.web import CSRF_HEADER, USER_COOKIE, Identities
from tests.faults.faultsupport import BotProcess, ThrowawayPostgres
from tests.telegram.fakebotapi import TOKEN, FakeBotAPI

DOC = ROOT / "docs" / "reliability.md"
COOKIE_SECRET = "soak-cookie-secret-0123456789abcdef"
ANSWER_TIMEOUT_S = 45.0


# --------------------------------------------------------------------------- bookkeeping


@dataclass
class Op:
    channel: str  # web / telegram
    kind: str  # picture / vote
    started: float
    latency: float | None = None  # None: never answered
    outcome: str = ""  # ok, or the error key the user was shown
    phase: str = "normal"


@dataclass
class Ledger:
    ops: list[Op] = field(default_factory=list)
    jokes: set[int] = field(default_factory=set)  # delivered to a user
    #: (joke, user) → (acknowledged value, values tried since then without an answer)
    votes: dict[tuple[int, str], tuple[int | None, set[int]]] = field(default_factory=dict)
    phases: list[tuple[str, float, float]] = field(default_factory=list)

    def phase_of(self, op: Op) -> str:
        """The fault window the request overlapped (from its start to its answer), if any."""
        end = op.started + (op.latency if op.latency is not None else ANSWER_TIMEOUT_S)
        for name, start, stop in self.phases:
            if op.started <= stop and end >= start:
                return name
        return "normal"

    def vote_sent(self, key: tuple[int, str], value: int) -> None:
        acked, pending = self.votes.get(key, (None, set()))
        self.votes[key] = (acked, pending | {value})

    def vote_acked(self, key: tuple[int, str], value: int) -> None:
        self.votes[key] = (value, set())


# --------------------------------------------------------------------------- users


async def web_user(n: int, url: str, ledger: Ledger, pics: list[bytes], args, stop: float) -> None:
    rng = random.Random(n)
    identities = Identities(COOKIE_SECRET.encode())
    async with httpx.AsyncClient(base_url=url, timeout=ANSWER_TIMEOUT_S) as client:
        session = await client.get("/api/session")
        token = session.json()["csrf_token"]
        me = identities.verify(session.cookies.get(USER_COOKIE))
        assert me is not None
        mine: list[int] = []

        async def call(kind: str, coro) -> httpx.Response | None:
            op = Op("web", kind, time.monotonic())
            ledger.ops.append(op)
            try:
                r = await coro
            except httpx.HTTPError:
                op.outcome = "no answer"
                return None
            op.latency = time.monotonic() - op.started
            op.outcome = "ok" if r.status_code < 300 else r.json().get("error", str(r.status_code))
            return r

        while time.monotonic() < stop:
            if not mine or rng.random() < 0.5:
                files = {"image": ("p.jpg", rng.choice(pics), "image/jpeg")}
                r = await call("picture", client.post("/api/jokes", files=files))
                if r is not None and r.status_code == 201:
                    mine.append(r.json()["id"])
                    ledger.jokes.add(r.json()["id"])
            else:
                joke = rng.choice(mine[-5:])
                value = rng.choice((1, -1))
                key = (joke, me)
                ledger.vote_sent(key, value)
                r = await call(
                    "vote",
                    client.post(
                        f"/api/jokes/{joke}/rating",
                        json={"value": value},
                        headers={CSRF_HEADER: token, "Origin": url},
                    ),
                )
                if r is not None and r.status_code == 200:
                    ledger.vote_acked(key, value)
            await asyncio.sleep(rng.expovariate(args.rate))


class TelegramSide:
    """Matches the bot's Bot API calls to the users' pending requests (one pass over calls)."""

    def __init__(self, api: FakeBotAPI) -> None:
        self.api = api
        self.replies: dict[tuple[int, int], asyncio.Future[dict]] = {}
        self.answers: dict[str, asyncio.Future[dict]] = {}
        self._seen = 0

    async def collect(self) -> None:
        while True:
            calls = self.api.calls
            for call in calls[self._seen :]:
                if call.status != 200:
                    continue
                p = call.params
                if call.method == "sendMessage":
                    to = (p.get("reply_parameters") or {}).get("message_id")
                    fut = self.replies.pop((int(p.get("chat_id", 0)), to), None)
                    if fut is not None and not fut.done():
                        fut.set_result(p)
                elif call.method == "answerCallbackQuery":
                    fut = self.answers.pop(p.get("callback_query_id"), None)
                    if fut is not None and not fut.done():
                        fut.set_result(p)
            self._seen = len(calls)
            await asyncio.sleep(0.02)


async def tg_user(n: int, side: TelegramSide, ledger: Ledger, pics: list[bytes], args, stop):
    rng = random.Random(1000 + n)
    api = side.api
    user = api.user(700000 + n, language_code="en")
    chat = api.private_chat(user)
    me = f"tg:{user['id']}"
    loop = asyncio.get_running_loop()
    while time.monotonic() < stop:
        op = Op("telegram", "picture", time.monotonic())
        ledger.ops.append(op)
        msg = api.message(chat, user, photo=api.photo(rng.choice(pics), 640, 426))
        fut: asyncio.Future[dict] = loop.create_future()
        side.replies[(chat["id"], msg["message_id"])] = fut
        api.push(api.update(message=msg))
        try:
            reply = await asyncio.wait_for(fut, ANSWER_TIMEOUT_S)
        except TimeoutError:
            op.outcome = "no answer"
            continue
        op.latency = time.monotonic() - op.started
        keyboard = (reply.get("reply_markup") or {}).get("inline_keyboard")
        if not keyboard:
            op.outcome = _key_of(reply.get("text", ""))
            await asyncio.sleep(rng.expovariate(args.rate))
            continue
        op.outcome = "ok"
        sent = next(
            m for (c, _), m in reversed(api.messages.items())
            if c == chat["id"] and m.get("reply_to_message", {}).get("message_id")
            == msg["message_id"]
        )  # fmt: skip
        data = keyboard[0][rng.randrange(2)]["callback_data"]
        joke_id, value = int(data.split(":")[1]), int(data.split(":")[2])
        ledger.jokes.add(joke_id)
        await asyncio.sleep(rng.expovariate(args.rate))
        vote = Op("telegram", "vote", time.monotonic())
        ledger.ops.append(vote)
        ledger.vote_sent((joke_id, me), value)
        qfut: asyncio.Future[dict] = loop.create_future()
        update = api.callback_update(user, sent, data)
        side.answers[update["callback_query"]["id"]] = qfut
        api.push(update)
        try:
            answer = await asyncio.wait_for(qfut, ANSWER_TIMEOUT_S)
        except TimeoutError:
            vote.outcome = "no answer"
            continue
        vote.latency = time.monotonic() - vote.started
        if answer.get("show_alert"):
            vote.outcome = _key_of(answer.get("text", ""))
        else:
            vote.outcome = "ok"
            ledger.vote_acked((joke_id, me), value)
        await asyncio.sleep(rng.expovariate(args.rate))


def _key_of(text: str) -> str:
    for key in ("unavailable", "engine_error", "busy", "corrupt"):
        if text in (message(key, "en"), message(key, "zh")):
            return key
    return "other: " + text[:40]


# --------------------------------------------------------------------------- faults


async def faults(args, ledger: Ledger, flag: Path, t0: float, pg: ThrowawayPostgres | None) -> None:
    duration = args.duration
    if args.engine_fault > 0:
        await asyncio.sleep(max(0.0, t0 + 0.25 * duration - time.monotonic()))
        start = time.monotonic()
        await asyncio.to_thread(flag.write_text, "fail")
        await asyncio.sleep(args.engine_fault)
        await asyncio.to_thread(flag.unlink)
        ledger.phases.append(("engine down", start, time.monotonic()))
    if pg is not None and not args.no_db_restart:
        await asyncio.sleep(max(0.0, t0 + 0.55 * duration - time.monotonic()))
        start = time.monotonic()
        done = await asyncio.to_thread(pg.restart)
        if done.returncode != 0:
            print(f"throwaway PostgreSQL restart failed: {done.stderr.strip()}", file=sys.stderr)
            await asyncio.to_thread(pg.start)
        await asyncio.to_thread(pg.ready, 60)
        ledger.phases.append(("database restart", start, time.monotonic() + 1.0))


# --------------------------------------------------------------------------- checks


async def stored_state(store_url: str, data_dir: Path) -> tuple[set[int], dict]:
    """What the database holds after the run: every joke id and public id, every vote."""
    from sqlalchemy import select

    from bot.store import JokeRow, RatingRow, Store

    store = Store(store_url, data_dir / "images")
    try:
        async with store.session() as s:
            ids = (await s.execute(select(JokeRow.id, JokeRow.public_id))).all()
            rows = (
                await s.execute(select(RatingRow.joke_id, RatingRow.user_id, RatingRow.value))
            ).all()
    finally:
        await store.close()
    # The web API names jokes by public id, Telegram's buttons by the store's id: both count.
    public = {joke_id: public_id for joke_id, public_id in ids}
    jokes = {joke_id for joke_id, _ in ids} | {p for _, p in ids if p}
    votes = {(r[0], r[1]): r[2] for r in rows}
    votes |= {(public[r[0]], r[1]): r[2] for r in rows if public.get(r[0])}
    return jokes, votes


def summarise(ledger: Ledger, elapsed: float) -> dict[str, Any]:
    for op in ledger.ops:
        op.phase = ledger.phase_of(op)
    by: dict[str, list[Op]] = defaultdict(list)
    for op in ledger.ops:
        by[f"{op.channel} {op.kind}"].append(op)
    rows = {}
    for name, ops in sorted(by.items()):
        lat = _latency_ms(ops, spread=True)
        rows[name] = {
            "requests": len(ops),
            "ok": sum(o.outcome == "ok" for o in ops),
            "told_error": dict(
                Counter(o.outcome for o in ops if o.outcome not in ("ok", "no answer"))
            ),
            "unanswered": sum(o.outcome == "no answer" for o in ops),
            "per_s": len(ops) / elapsed,
            **{k: lat[k] for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms")},
        }
    phases = {}
    for phase in ["normal", *[p for p, _, _ in ledger.phases]]:
        ops = [o for o in ledger.ops if o.phase == phase]
        phases[phase] = {
            "requests": len(ops),
            "ok": sum(o.outcome == "ok" for o in ops),
            "errors": dict(Counter(o.outcome for o in ops if o.outcome != "ok")),
            "p95_ms": _latency_ms(ops)["p95_ms"],
        }
    return {"by_kind": rows, "by_phase": phases}


def _latency_ms(ops: list[Op], spread: bool = False) -> dict[str, Any]:
    """Percentiles (ms) of the answered requests among ``ops``."""
    return latency_summary(
        [o.latency for o in ops if o.latency is not None], unit="ms", spread=spread
    )


# --------------------------------------------------------------------------- main


async def run(args) -> dict[str, Any]:
    pics = photo_jpegs(24, size=(640, 426))
    work = Path(tempfile.mkdtemp(prefix="oogiri-soak-"))
    flag = work / "engine-fault"
    api = await FakeBotAPI().start()
    env = {
        "OOGIRI_CHANNELS": "web,telegram",
        "OOGIRI_PLUGINS": f"web,telegram,engine_{args.engine}",
        "OOGIRI_ENGINE__NAME": args.engine,
        "OOGIRI_TELEGRAM__TOKEN": TOKEN,
        "OOGIRI_TELEGRAM__BASE_URL": api.base_url,
        "OOGIRI_TELEGRAM__BASE_FILE_URL": api.base_file_url,
        "OOGIRI_TELEGRAM__LANGUAGE": "en",
        "OOGIRI_WEB__COOKIE_SECRET": COOKIE_SECRET,
        **LOOPBACK_WEB_ENV,
        "OOGIRI_TEST_ENGINE_FAULT_FILE": str(flag),
        "OOGIRI_LOG_LEVEL": "WARNING",
    }
    if args.engine == "transformers":
        model = work / "tiny-model"
        make = [sys.executable, "-m", "bot.cli", "dev", "make-tiny-model", str(model)]
        await asyncio.to_thread(subprocess.run, make, cwd=ROOT, check=True, capture_output=True)
        env["OOGIRI_ENGINE__MODEL"] = str(model)
        env["OOGIRI_ENGINE__MODEL_VERSION"] = "tiny-random"
        env["OOGIRI_ENGINE__MAX_NEW_TOKENS"] = "16"
    pg = None if args.sqlite else await _throwaway_postgres()
    # Its own cluster, so the bot may use the "postgres" database.
    sqlite = f"sqlite+aiosqlite:///{work / 'data' / 'oogiri.sqlite3'}"
    store_url = pg.url if pg is not None else sqlite
    env["OOGIRI_STORE__URL"] = store_url
    bot = BotProcess(work / "data", **env)
    ledger = Ledger()
    side = TelegramSide(api)
    collector = asyncio.create_task(side.collect())
    try:
        await asyncio.to_thread(bot.start, False, 120.0)
        t0 = time.monotonic()
        stop = t0 + args.duration
        users = [web_user(i, bot.url, ledger, pics, args, stop) for i in range(args.web_users)]
        users += [tg_user(i, side, ledger, pics, args, stop) for i in range(args.tg_users)]
        await asyncio.gather(*users, faults(args, ledger, flag, t0, pg))
        elapsed = time.monotonic() - t0
        code = await asyncio.to_thread(bot.stop, 30.0)
        jokes, ratings = await stored_state(store_url, work / "data")
    finally:
        collector.cancel()
        with contextlib.suppress(BaseException):
            await collector
        bot.kill()
        await api.stop()
        if pg is not None:
            await asyncio.to_thread(pg.stop)
        log_tail = bot.log()[-3000:]
        shutil.rmtree(work, ignore_errors=True)

    lost_jokes = sorted(ledger.jokes - jokes)
    lost_votes = []
    for key, (acked, pending) in ledger.votes.items():
        if acked is None:
            continue
        if ratings.get(key) not in {acked, *pending}:
            lost_votes.append((key, acked, ratings.get(key)))
    summary = summarise(ledger, elapsed)
    total = len(ledger.ops)
    answered = sum(o.latency is not None for o in ledger.ops)
    result = {
        "engine": args.engine,
        "store": "postgresql (throwaway cluster)" if pg is not None else "sqlite",
        "duration_s": round(elapsed, 1),
        "web_users": args.web_users,
        "tg_users": args.tg_users,
        "requests": total,
        "answered": answered,
        "throughput_per_s": round(total / elapsed, 1),
        "p95_ms": _latency_ms(ledger.ops)["p95_ms"],
        "ok": sum(o.outcome == "ok" for o in ledger.ops),
        "told_error": sum(o.outcome not in ("ok", "no answer") for o in ledger.ops),
        "unanswered": total - answered,
        "jokes_delivered": len(ledger.jokes),
        "votes_acknowledged": sum(o.outcome == "ok" for o in ledger.ops if o.kind == "vote"),
        "votes_distinct": sum(a is not None for a, _ in ledger.votes.values()),
        "lost_jokes": len(lost_jokes),
        "lost_votes": len(lost_votes),
        "lost_detail": [str(x) for x in lost_votes[:10]],
        "faults": [
            {"fault": name, "at_s": round(s - t0, 1), "for_s": round(e - s, 1)}
            for name, s, e in ledger.phases
        ],
        "bot_exit_code": code,
        **summary,
        "machine": machine(),
    }
    if lost_votes or lost_jokes or result["unanswered"]:
        print(log_tail, file=sys.stderr)
    return result


async def _throwaway_postgres() -> ThrowawayPostgres | None:
    """A PostgreSQL cluster of the soak's own, so that its restart drops nobody else's
    connections (issue 19); None (SQLite then) where no server binaries are installed."""
    try:
        pg = ThrowawayPostgres()
    except (FileNotFoundError, KeyError) as exc:  # no binaries; as root, no "postgres" user
        print(f"no throwaway PostgreSQL ({exc}); the soak runs on SQLite", file=sys.stderr)
        return None
    try:
        return await asyncio.to_thread(pg.start)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        await asyncio.to_thread(pg.stop)
        print(
            f"throwaway PostgreSQL did not start ({exc}); the soak runs on SQLite", file=sys.stderr
        )
        return None


def render(result: dict[str, Any]) -> str:
    lines = [
        f"{result['duration_s']} s, {result['web_users']} web + {result['tg_users']} Telegram "
        f"users, engine `{result['engine']}`, store {result['store']}, {result['machine']}; "
        "bot in a child process, users and the fake Bot API in the driver process, all loopback.",
        "",
        f"- **requests: {result['requests']}**, {result['throughput_per_s']}/s; "
        f"answered {result['answered']}, unanswered **{result['unanswered']}**",
        f"- jokes delivered {result['jokes_delivered']}, votes acknowledged "
        f"{result['votes_acknowledged']} (on {result['votes_distinct']} distinct joke × user); "
        f"**lost: {result['lost_jokes']} jokes, {result['lost_votes']} votes**",
        f"- p95 latency (all answered requests): {result['p95_ms']} ms; "
        f"users told a clear error: {result['told_error']}",
        "- faults: "
        + (
            "; ".join(f"{f['fault']} at {f['at_s']} s for {f['for_s']} s" for f in result["faults"])
            or "none"
        ),
        "",
        "| Requests | Count | /s | OK | Told an error | Unanswered | p50 ms | p95 ms | p99 ms "
        "| max ms |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in result["by_kind"].items():
        told = ", ".join(f"{k} ×{v}" for k, v in sorted(r["told_error"].items())) or "–"
        lines.append(
            f"| {name} | {r['requests']} | {r['per_s']:.1f} | {r['ok']} | {told} | "
            f"{r['unanswered']} | {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | {r['max_ms']} |"
        )
    lines += ["", "| Phase | Requests | OK | Errors shown | p95 ms |", "|---|---:|---:|---|---:|"]
    for name, r in result["by_phase"].items():
        errors = ", ".join(f"{k} ×{v}" for k, v in sorted(r["errors"].items())) or "–"
        lines.append(f"| {name} | {r['requests']} | {r['ok']} | {errors} | {r['p95_ms']} |")
    lines += [
        "",
        "Phase: the fault window a request overlapped between sending it and its answer (votes "
        "need no engine, so they succeed while it is down). Lost: a joke a user received, or a "
        "vote acknowledged to them, missing from the database after the run (a vote may instead "
        "hold a later value the same user sent whose answer was lost in the outage).",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="instant", choices=["instant", "transformers"])
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--web-users", type=int, default=8)
    parser.add_argument("--tg-users", type=int, default=6)
    parser.add_argument("--rate", type=float, default=2.0, help="actions per second per user")
    parser.add_argument("--engine-fault", type=float, default=5.0, help="seconds of engine errors")
    parser.add_argument("--no-db-restart", action="store_true")
    parser.add_argument(
        "--sqlite", action="store_true", help="SQLite even where PostgreSQL is installed"
    )
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument(
        "--out", type=Path, help="result JSON (default bench/results/soak-<engine>.json)"
    )
    args = parser.parse_args()
    if args.duration > 600:
        parser.error("--duration is bounded to 600 s")
    result = asyncio.run(run(args))
    write_json(args.out or RESULTS / f"soak-{args.engine}.json", result, indent=1)
    print(render(result))
    if not args.no_docs:
        write_section(
            f"soak-{args.engine}", f"Soak ({args.engine} engine)", render(result), doc=DOC
        )
    if result["lost_votes"] or result["lost_jokes"] or result["unanswered"]:
        raise SystemExit("LOST OR UNANSWERED REQUESTS — see above")


if __name__ == "__main__":
    main()
