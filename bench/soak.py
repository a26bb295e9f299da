"""Soak: mixed Telegram + web traffic against a running bot, with faults injected — 0 lost.

Not a test: it measures; docs/reliability.md says what and why. The bot runs as ``oogiri serve``
would, in a child process (tests/faults/oogiri_testserver.py: web + Telegram channels, an engine a
control file can make fail), on a throwaway PostgreSQL cluster of its own (SQLite without server
binaries; the machine's server is never touched). Simulated web users (httpx) and Telegram users
(tests/telegram/fakebotapi.py) upload and vote while the engine fails for ``--engine-fault`` s
and then the cluster restarts (``pg_ctl restart -m fast``). Checked afterwards: every joke
delivered and every vote acknowledged (web 200, Telegram toast without alert) is in the database
with that value, every request was answered. Writes bench/results/soak-<engine>.json and the
"Soak (<engine>)" section of docs/reliability.md.

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
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.abuse import upload, vote
from bench.common import (
    LOOPBACK_WEB_ENV,
    RESULTS,
    ROOT,
    latency_summary,
    machine,
    photo_jpegs,
    tally,
    write_json,
    write_section,
)
from bench.telegram_load import read_store
from bot.models import message
from plugins.web import CSRF_HEADER, USER_COOKIE, Identities
from tests.faults.faultsupport import BotProcess, ThrowawayPostgres
from tests.telegram.fakebotapi import TOKEN, FakeBotAPI

DOC = ROOT / "docs" / "reliability.md"
COOKIE_SECRET = "soak-cookie-secret-0123456789abcdef"
ANSWER_TIMEOUT_S = 45.0
_NOT_TOLD = ("ok", "no answer")  # outcomes that are not an error the user was shown
ERRORS = "{k} ×{v}"  # one error key and its count in a table cell


@dataclass
class Op:
    """One request: when sent, how long until answered (None: never), what the user was told (ok,
    or the error's key) and the fault window it overlapped."""

    channel: str  # web / telegram
    kind: str  # picture / vote
    started: float = field(default_factory=time.monotonic)
    latency: float | None = None
    outcome: str = "no answer"
    phase: str = "normal"

    def answered(self, outcome: str) -> None:
        self.latency, self.outcome = time.monotonic() - self.started, outcome


@dataclass
class Ledger:
    """What users were told: every request, the jokes delivered, and per (joke, user) the vote
    acknowledged last and the values sent since then without an answer; the fault windows."""

    ops: list[Op] = field(default_factory=list)
    jokes: set[Any] = field(default_factory=set)
    votes: dict[tuple[Any, str], tuple[int | None, set[int]]] = field(default_factory=dict)
    phases: list[tuple[str, float, float]] = field(default_factory=list)

    def op(self, channel: str, kind: str) -> Op:
        self.ops.append(op := Op(channel, kind))
        return op

    def phase_of(self, op: Op) -> str:
        """The fault window the request overlapped (from its start to its answer), if any."""
        end = op.started + (op.latency if op.latency is not None else ANSWER_TIMEOUT_S)
        return next((name for name, a, b in self.phases if op.started <= b and end >= a), "normal")

    def vote_sent(self, key: tuple[Any, str], value: int) -> None:
        acked, pending = self.votes.get(key, (None, set()))
        self.votes[key] = (acked, pending | {value})

    def vote_acked(self, key: tuple[Any, str], value: int) -> None:
        self.votes[key] = (value, set())


async def web_user(
    n: int, url: str, ledger: Ledger, pics: list[bytes], rate: float, stop: float
) -> None:
    """Upload a picture, or (half the time, once it has jokes) vote on one of its last five."""
    rng = random.Random(n)
    async with httpx.AsyncClient(base_url=url, timeout=ANSWER_TIMEOUT_S) as client:
        session = await client.get("/api/session")
        headers = {CSRF_HEADER: session.json()["csrf_token"], "Origin": url}
        me = Identities(COOKIE_SECRET.encode()).verify(session.cookies.get(USER_COOKIE))
        assert me is not None
        mine: list[str] = []

        async def call(kind: str, request: Awaitable[httpx.Response]) -> httpx.Response | None:
            op = ledger.op("web", kind)
            with contextlib.suppress(httpx.HTTPError):
                r = await request
                op.answered(
                    "ok" if r.status_code < 300 else r.json().get("error", str(r.status_code))
                )
                return r
            return None

        while time.monotonic() < stop:
            if not mine or rng.random() < 0.5:
                r = await call("picture", upload(client, rng.choice(pics)))
                if r is not None and r.status_code == 201:
                    mine.append(r.json()["id"])
                    ledger.jokes.add(mine[-1])
            else:
                key, value = (rng.choice(mine[-5:]), me), rng.choice((1, -1))
                ledger.vote_sent(key, value)
                r = await call("vote", vote(client, key[0], value, headers))
                if r is not None and r.status_code == 200:
                    ledger.vote_acked(key, value)
            await asyncio.sleep(rng.expovariate(rate))


class TelegramSide:
    """Hands the bot's Bot API calls to the users waiting for them (one pass over the calls):
    a reply, keyed (chat, message replied to); a button's answer, keyed by its query id."""

    def __init__(self, api: FakeBotAPI) -> None:
        self.api = api
        self.waiting: dict[Any, asyncio.Future[dict[str, Any]]] = {}

    async def collect(self) -> None:
        seen = 0
        while True:
            calls = self.api.calls
            for call in calls[seen:]:
                p, key = call.params, None
                if call.status == 200 and call.method == "sendMessage":
                    to = (p.get("reply_parameters") or {}).get("message_id")
                    key = (int(p.get("chat_id", 0)), to)
                elif call.status == 200 and call.method == "answerCallbackQuery":
                    key = p.get("callback_query_id")
                fut = self.waiting.pop(key, None)
                if fut is not None and not fut.done():
                    fut.set_result(p)
            seen = len(calls)
            await asyncio.sleep(0.02)

    async def ask(self, key: Any, update: dict[str, Any]) -> dict[str, Any] | None:
        """Push ``update``; the bot's call keyed ``key``, or None if none came in time."""
        self.waiting[key] = fut = asyncio.get_running_loop().create_future()
        self.api.push(update)
        try:
            return await asyncio.wait_for(fut, ANSWER_TIMEOUT_S)
        except TimeoutError:
            return None


async def tg_user(
    n: int, side: TelegramSide, ledger: Ledger, pics: list[bytes], rate: float, stop: float
) -> None:
    """Send a photo; under a joke, press 👍 or 👎 a moment later."""
    rng = random.Random(1000 + n)
    api = side.api
    user = api.user(700000 + n, language_code="en")
    chat = api.private_chat(user)
    me = f"tg:{user['id']}"
    while time.monotonic() < stop:
        op = ledger.op("telegram", "picture")
        msg = api.message(chat, user, photo=api.photo(rng.choice(pics), 640, 426))
        reply = await side.ask((chat["id"], msg["message_id"]), api.update(message=msg))
        if reply is None:
            continue
        keyboard = (reply.get("reply_markup") or {}).get("inline_keyboard")
        op.answered("ok" if keyboard else _key_of(reply.get("text", "")))
        if keyboard:
            sent = next(
                m for (c, _), m in reversed(api.messages.items())
                if c == chat["id"] and m.get("reply_to_message", {}).get("message_id")
                == msg["message_id"]
            )  # fmt: skip
            data = keyboard[0][rng.randrange(2)]["callback_data"]
            key, value = (int(data.split(":")[1]), me), int(data.split(":")[2])
            ledger.jokes.add(key[0])
            await asyncio.sleep(rng.expovariate(rate))
            vote = ledger.op("telegram", "vote")
            ledger.vote_sent(key, value)
            update = api.callback_update(user, sent, data)
            answer = await side.ask(update["callback_query"]["id"], update)
            if answer is None:
                continue
            vote.answered(_key_of(answer.get("text", "")) if answer.get("show_alert") else "ok")
            if vote.outcome == "ok":
                ledger.vote_acked(key, value)
        await asyncio.sleep(rng.expovariate(rate))


def _key_of(text: str) -> str:
    for key in ("unavailable", "engine_error", "busy", "corrupt"):
        if text in (message(key, "en"), message(key, "zh")):
            return key
    return "other: " + text[:40]


async def faults(
    args: argparse.Namespace, ledger: Ledger, flag: Path, t0: float, pg: ThrowawayPostgres | None
) -> None:
    """The engine failing from 25 % of the run for ``--engine-fault`` s, then from 55 % a fast
    restart of the throwaway cluster (its window: until it is ready, + 1 s)."""
    if args.engine_fault > 0:
        await asyncio.sleep(max(0.0, t0 + 0.25 * args.duration - time.monotonic()))
        start = time.monotonic()
        await asyncio.to_thread(flag.write_text, "fail")
        await asyncio.sleep(args.engine_fault)
        await asyncio.to_thread(flag.unlink)
        ledger.phases.append(("engine down", start, time.monotonic()))
    if pg is not None and not args.no_db_restart:
        await asyncio.sleep(max(0.0, t0 + 0.55 * args.duration - time.monotonic()))
        start = time.monotonic()
        done = await asyncio.to_thread(pg.restart)
        if done.returncode != 0:
            print(f"throwaway PostgreSQL restart failed: {done.stderr.strip()}", file=sys.stderr)
            await asyncio.to_thread(pg.start)
        await asyncio.to_thread(pg.ready, 60)
        ledger.phases.append(("database restart", start, time.monotonic() + 1.0))


async def stored_state(store_url: str, data_dir: Path) -> tuple[set[Any], dict[Any, int]]:
    """Every joke and vote the database holds after the run; jokes by store id (Telegram's
    buttons) and by public id (the web API), votes keyed by both."""
    state = await read_store({"data_dir": str(data_dir), "store": {"url": store_url}})
    public, rows = state["public_ids"], state["ratings"]
    jokes = set(public) | {p for p in public.values() if p}
    votes = {(j, u): v for j, u, v in rows}
    return jokes, votes | {(public[j], u): v for j, u, v in rows if public.get(j)}


def _latency_ms(ops: list[Op], spread: bool = False) -> dict[str, Any]:
    """Percentiles (ms) of the answered requests among ``ops``."""
    answered = [o.latency for o in ops if o.latency is not None]
    return latency_summary(answered, unit="ms", spread=spread)


def summarise(ledger: Ledger, elapsed: float) -> dict[str, Any]:
    """Per kind of request (count, rate, answers, latency) and per fault window."""
    by: dict[str, list[Op]] = defaultdict(list)
    for op in ledger.ops:
        op.phase = ledger.phase_of(op)
        by[f"{op.channel} {op.kind}"].append(op)
    kinds = {}
    for name, ops in sorted(by.items()):
        lat = _latency_ms(ops, spread=True)
        kinds[name] = {
            "requests": len(ops),
            "ok": sum(o.outcome == "ok" for o in ops),
            "told_error": dict(Counter(o.outcome for o in ops if o.outcome not in _NOT_TOLD)),
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
    return {"by_kind": kinds, "by_phase": phases}


async def run(args: argparse.Namespace) -> dict[str, Any]:
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
    store_url = pg.url if pg else f"sqlite+aiosqlite:///{work / 'data' / 'oogiri.sqlite3'}"
    bot = BotProcess(work / "data", OOGIRI_STORE__URL=store_url, **env)
    ledger, side = Ledger(), TelegramSide(api)
    collector = asyncio.create_task(side.collect())
    try:
        await asyncio.to_thread(bot.start, False, 120.0)
        t0 = time.monotonic()
        stop = t0 + args.duration
        users = [web_user(i, bot.url, ledger, pics, args.rate, stop) for i in range(args.web_users)]
        users += [tg_user(i, side, ledger, pics, args.rate, stop) for i in range(args.tg_users)]
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

    lost_votes = [
        (key, acked, ratings.get(key))
        for key, (acked, pending) in ledger.votes.items()
        if acked is not None and ratings.get(key) not in {acked, *pending}
    ]
    ops = ledger.ops
    answered = sum(o.latency is not None for o in ops)
    result = {
        "engine": args.engine,
        "store": "postgresql (throwaway cluster)" if pg is not None else "sqlite",
        "duration_s": round(elapsed, 1),
        "web_users": args.web_users,
        "tg_users": args.tg_users,
        "requests": len(ops),
        "answered": answered,
        "throughput_per_s": round(len(ops) / elapsed, 1),
        "p95_ms": _latency_ms(ops)["p95_ms"],
        "ok": sum(o.outcome == "ok" for o in ops),
        "told_error": sum(o.outcome not in _NOT_TOLD for o in ops),
        "unanswered": len(ops) - answered,
        "jokes_delivered": len(ledger.jokes),
        "votes_acknowledged": sum(o.outcome == "ok" for o in ops if o.kind == "vote"),
        "votes_distinct": sum(a is not None for a, _ in ledger.votes.values()),
        "lost_jokes": len(ledger.jokes - jokes),
        "lost_votes": len(lost_votes),
        "lost_detail": [str(x) for x in lost_votes[:10]],
        "faults": [
            {"fault": name, "at_s": round(s - t0, 1), "for_s": round(e - s, 1)}
            for name, s, e in ledger.phases
        ],
        "bot_exit_code": code,
        **summarise(ledger, elapsed),
        "machine": machine(),
    }
    if lost_votes or result["lost_jokes"] or result["unanswered"]:
        print(log_tail, file=sys.stderr)
    return result


async def _throwaway_postgres() -> ThrowawayPostgres | None:
    """A PostgreSQL cluster of the soak's own, so that its restart drops nobody else's
    connections (issue 19); None (SQLite then) where it cannot be had."""
    pg = None
    try:  # no binaries; as root, no "postgres" user; or it does not start
        pg = ThrowawayPostgres()
        return await asyncio.to_thread(pg.start)
    except (OSError, KeyError, RuntimeError, subprocess.SubprocessError) as exc:
        if pg is not None:
            await asyncio.to_thread(pg.stop)
        print(f"no throwaway PostgreSQL ({exc}); soak on SQLite", file=sys.stderr)
        return None


def render(r: dict[str, Any]) -> str:
    faults = "; ".join(f"{f['fault']} at {f['at_s']} s for {f['for_s']} s" for f in r["faults"])
    lines = [
        f"{r['duration_s']} s, {r['web_users']} web + {r['tg_users']} Telegram users, engine "
        f"`{r['engine']}`, store {r['store']}, {r['machine']}; bot in a child process, users and "
        "the fake Bot API in the driver process, all loopback.",
        "",
        f"- **requests: {r['requests']}**, {r['throughput_per_s']}/s; answered {r['answered']}, "
        f"unanswered **{r['unanswered']}**",
        f"- jokes delivered {r['jokes_delivered']}, votes acknowledged {r['votes_acknowledged']} "
        f"(on {r['votes_distinct']} distinct joke × user); **lost: {r['lost_jokes']} jokes, "
        f"{r['lost_votes']} votes**",
        f"- p95 latency (all answered requests): {r['p95_ms']} ms; users told a clear error: "
        f"{r['told_error']}",
        f"- faults: {faults or 'none'}",
        "",
        "| Requests | Count | /s | OK | Told an error | Unanswered | p50 ms | p95 ms | p99 ms "
        "| max ms |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
        *(
            f"| {name} | {k['requests']} | {k['per_s']:.1f} | {k['ok']} | "
            f"{tally(k['told_error'], ERRORS, '–')} | {k['unanswered']} | {k['p50_ms']} | "
            f"{k['p95_ms']} | {k['p99_ms']} | {k['max_ms']} |"
            for name, k in r["by_kind"].items()
        ),
        "",
        "| Phase | Requests | OK | Errors shown | p95 ms |",
        "|---|---:|---:|---|---:|",
        *(
            f"| {name} | {p['requests']} | {p['ok']} | {tally(p['errors'], ERRORS, '–')} | "
            f"{p['p95_ms']} |"
            for name, p in r["by_phase"].items()
        ),
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
        write_section(f"soak-{args.engine}", f"Soak ({args.engine} engine)", render(result), DOC)
    if result["lost_votes"] or result["lost_jokes"] or result["unanswered"]:
        raise SystemExit("LOST OR UNANSWERED REQUESTS — see above")


if __name__ == "__main__":
    main()
