"""Two real ``oogiri serve`` replicas on one PostgreSQL database and one Redis: the CPU proof that
the shared state of docs/operations.md ("What must be shared once there is more than one bot
process") really is shared.

Each replica is its own process (the installed ``oogiri`` console script) on its own loopback port,
with the web channel and the Telegram channel in webhook mode, the instant engine, the Redis rate
limiter and the retraining scheduler of ``oogiri serve``. They share only what production replicas
share: the database, Redis, the data volume (uploaded images) and the cookie secret; each has its
own training work folder, as on another host. Everything reaches them through real HTTP: the web
API, and Telegram updates POSTed to the webhook the way Telegram does (the fake Bot API of
tests/telegram answers the replicas' own Bot API calls).

Why each check exists:
1. votes land once: a joke told by one replica is voted on through the other, the same vote sent
   to both at once is stored once, and a re-vote through either replica changes the vote.
2. a per-user limit of N holds across replicas: with per-process counters a user would get N per
   replica. On Telegram the one "slow down" notice per window is shared too: later refused photos,
   on either replica, are neither downloaded nor answered.
3. only one retraining starts: both schedulers (checking every 0.6 s) find the run due as soon as
   the last vote lands; the PostgreSQL advisory lock lets one train (the stand-in trainer is held
   until the other replica has reported the lock as held) and the other does nothing. A lock that
   is not shared between processes shows up: the other replica would not report it held (and
   would mark the running run as interrupted).
4. the Redis limiter is a sliding window (the product fix that made check 2 hold at any moment,
   not only away from a minute boundary).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from http.cookiejar import CookieJar, DefaultCookiePolicy
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
for extra in (ROOT / "tests" / "telegram", ROOT / "tests" / "training"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from fakebotapi import TOKEN, FakeBotAPI, keyboard_counts  # noqa: E402
from tgsupport import free_port  # noqa: E402
from trainhelp import FAKES, fake_base_model, fake_eval_python, fake_venv, photo  # noqa: E402

from bot.limits import RedisLimiter  # noqa: E402
from bot.store import Store  # noqa: E402
from plugins.telegram import parse_vote, vote_data  # noqa: E402
from plugins.web import USER_COOKIE, Identities  # noqa: E402
from tests.conftest import _reset_pg  # noqa: E402

REDIS_URL = os.environ.get("OOGIRI_TEST_REDIS", "redis://127.0.0.1:6379/15")
PUBLIC_URL = "https://bot.example.test"  # what Telegram is told; the test posts to each replica
WEBHOOK_PATH = "/telegram/webhook"
COOKIE_SECRET = "replica-test-cookie-secret-0123456789"
LIMIT = 3  # jokes per user per minute
# Rating rows phase 1 creates (one per joke and user); the schedule is due at exactly this many,
# so both schedulers find the run due at the moment the last of them lands.
RATING_ROWS = 12
CHECK_MINUTES = 0.01  # each scheduler checks every 0.6 s
READY_S = 45.0
STEP_S = 15.0

LOCK_HELD = "training scheduler: another run holds the lock"
NOT_DUE = "training scheduler: not due"
TELEGRAM_UP = "running (webhook)"


async def eventually(probe: Callable[[], Any], within: float, failure: Callable[[], str]) -> Any:
    """Poll ``probe`` (plain or async) until it returns something truthy, and return that."""
    deadline = time.monotonic() + within
    while True:
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(failure())
        await asyncio.sleep(0.05)


# --------------------------------------------------------------------------- shared services


@pytest.fixture
async def redis_url() -> str:
    """Redis on loopback (the limiter's backend): required in CI, else the tests skip. The keys a
    test writes are its own random users', so concurrent runs cannot collide."""
    from redis.asyncio import Redis
    from redis.exceptions import RedisError

    client = Redis.from_url(REDIS_URL)
    try:
        up = bool(await client.ping())
    except (OSError, RedisError):
        up = False
    await client.aclose()
    if not up:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"no Redis at {REDIS_URL}")
    return REDIS_URL


# --------------------------------------------------------------------------- the stand-in trainer


@dataclass
class HeldTrainer:
    """bin/xtuner of a fake training venv that records who started it and waits for a release
    file before it runs the stand-in XTuner: the run holds the lock as long as the test needs."""

    started: Path
    release: Path
    swap_record: Path  # fake_swap.py's record of promotions

    @classmethod
    def install(cls, python: Path) -> HeldTrainer:
        folder = python.parent
        trainer = cls(folder / "xtuner-started", folder / "xtuner-release", folder / "swaps.json")
        script = folder / "xtuner"
        script.write_text(
            f"#!{sys.executable}\n"
            "import os, sys, time\n"
            "parent = os.getppid()  # the replica that runs the training\n"
            f"with open({str(trainer.started)!r}, 'a') as fh:\n"
            "    fh.write(f'{parent}\\n')\n"
            "deadline = time.monotonic() + 120\n"
            f"while not os.path.exists({str(trainer.release)!r}):\n"
            "    if os.getppid() != parent or time.monotonic() > deadline:\n"
            "        sys.exit(1)  # the replica is gone (the run runs in its own session)\n"
            "    time.sleep(0.05)\n"
            f"os.execv(sys.executable, [sys.executable, {str(FAKES / 'fake_xtuner.py')!r},"
            " *sys.argv[1:]])\n",
            encoding="utf-8",
        )
        script.chmod(0o755)
        return trainer

    def starts(self) -> list[int]:
        """The pid of the replica behind every start of the trainer."""
        if not self.started.exists():
            return []
        return [int(line) for line in self.started.read_text().split()]

    def swaps(self) -> list[list[str]]:
        """Every promotion the run's swap command made."""
        if not self.swap_record.exists():
            return []
        return json.loads(self.swap_record.read_text())


def training_settings(tmp: Path) -> tuple[dict[str, Any], HeldTrainer]:
    """The ``training`` settings section of both replicas, and their held stand-in trainer."""
    python = fake_venv(tmp / "xtuner-venv")
    trainer = HeldTrainer.install(python)
    section = {
        "schedule_in_serve": True,
        "schedule_check_minutes": CHECK_MINUTES,
        "every_days": None,  # due on new ratings only: not before phase 1 has voted
        "min_new_ratings": RATING_ROWS,
        "base_model": str(fake_base_model(tmp / "InternVL2-2B")),
        "xtuner_python": str(python),
        "eval_python": str(fake_eval_python(tmp / "evalpy" / "python")),
        "min_examples": 1,
        # Every web voter here comes from 127.0.0.1, one network: under the default policy
        # ("networks", docs/training.md "Votes from the web") the four web jokes would not count
        # and the run would be skipped for too few samples. The lock is what is tested here.
        "web_votes": "equal",
        "heldout_fraction": 0.25,
        "gate_min_heldout": 1,  # a handful of rated jokes: 1-2 held out
        "batch_size": 1,
        "accumulative_counts": 1,
        "max_epochs": 2,  # a handful of examples, twice: at least one warm-up iteration
        "warmup_ratio": 0.2,
        "max_length": 1024,
        "promote_command": [
            "{python}",
            str(FAKES / "fake_swap.py"),
            "{model_dir}",
            "{version}",
        ],
    }
    return section, trainer


# --------------------------------------------------------------------------- replicas


@dataclass
class Replica:
    """One ``oogiri serve`` process in its own process group. ``home`` plays its host: the
    working directory, its log and its training work folder (nothing there is shared)."""

    name: str
    home: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    url: str = field(init=False)
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.home / "serve.log"

    def runs_as(self, pid: int) -> bool:
        return self.proc is not None and self.proc.pid == pid

    def start(self, env: dict[str, str]) -> None:
        oogiri = Path(sys.executable).parent / "oogiri"  # the installed console script
        argv = [str(oogiri)] if oogiri.exists() else [sys.executable, "-m", "bot.cli"]
        own = {"OOGIRI_WEB__PORT": str(self.port)}
        own["OOGIRI_TRAINING__WORK_DIR"] = str(self.home / "training")
        self.home.mkdir(parents=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*argv, "serve"],
                cwd=self.home,
                env={**env, **own},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def wait_ready(self, client: httpx.AsyncClient) -> None:
        """Ready when /healthz answers 200 and the Telegram channel accepts webhook updates."""

        async def ready() -> bool:
            if not self.alive():
                raise AssertionError(f"replica {self.name} exited:\n{self.log()[-4000:]}")
            try:
                health = await client.get(self.url + "/healthz", timeout=2.0)
            except httpx.HTTPError:
                return False
            return health.status_code == 200 and TELEGRAM_UP in self.log()

        await eventually(ready, READY_S, lambda: f"{self.name} not ready:\n{self.log()[-4000:]}")

    async def wait_log(self, needle: str, after: int = 0, within: float = STEP_S) -> None:
        """Wait until ``needle`` is logged past offset ``after`` (a length of ``log()``)."""
        await eventually(
            lambda: self.log().find(needle, after) >= 0,
            within,
            lambda: f"{self.name} never logged {needle!r}:\n{self.log()[after:][-4000:]}",
        )

    async def stop(self) -> None:
        """SIGTERM to the whole process group, SIGKILL after 15 s; never blocks the event loop
        (the fake Bot API in this loop may still be answering the replica)."""
        proc = self.proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(AssertionError):
            await eventually(lambda: proc.poll() is not None, 15, lambda: "")
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def replica_env(
    tmp: Path,
    db_url: str,
    redis_url: str,
    api: FakeBotAPI,
    training: dict[str, Any],
    trainer: HeldTrainer,
) -> dict[str, str]:
    """What both replicas are configured with (the port is added per replica)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OOGIRI_", "FAKE_"))}
    env.update(
        PYTHONPATH=str(ROOT),
        OOGIRI_DATA_DIR=str(tmp / "shared-data"),  # the shared data volume
        OOGIRI_STORE__URL=db_url,
        OOGIRI_PLUGINS="web,telegram,training,engine_instant",
        OOGIRI_CHANNELS="web,telegram",
        OOGIRI_ENGINE__NAME="instant",
        OOGIRI_WEB__HOST="127.0.0.1",
        OOGIRI_WEB__COOKIE_SECRET=COOKIE_SECRET,
        OOGIRI_LIMITS__BACKEND=redis_url,
        OOGIRI_LIMITS__PER_USER_PER_MINUTE=str(LIMIT),
        OOGIRI_LIMITS__PER_CHAT_PER_MINUTE="0",
        # The web channel's per-network limits would count every run's 127.0.0.1 sessions and
        # uploads in the shared Redis for up to an hour: a second run would start rate-limited.
        OOGIRI_WEB__NEW_SESSIONS_PER_IP_PER_HOUR="0",
        OOGIRI_WEB__UPLOADS_PER_IP_PER_MINUTE="0",
        OOGIRI_WEB__VOTES_PER_IP_PER_MINUTE="0",
        OOGIRI_TELEGRAM__TOKEN=TOKEN,
        OOGIRI_TELEGRAM__MODE="webhook",
        OOGIRI_TELEGRAM__WEBHOOK_URL=PUBLIC_URL,
        OOGIRI_TELEGRAM__BASE_URL=api.base_url,
        OOGIRI_TELEGRAM__BASE_FILE_URL=api.base_file_url,
        OOGIRI_TRAINING=json.dumps(training),
        # The offline gate alone decides (no live A/B step, on by default: the run would end
        # 'testing' with no promotion), so the run's one promotion can be counted.
        OOGIRI_AB__ENABLED="false",
        FAKE_SWAP_RECORD=str(trainer.swap_record),
    )
    return env


@contextlib.asynccontextmanager
async def two_replicas(
    tmp: Path, env: dict[str, str], client: httpx.AsyncClient
) -> AsyncIterator[tuple[Replica, Replica]]:
    """Replicas A and B, started together (as a rollout does)."""
    replicas = [Replica(name, tmp / f"host-{name}") for name in "AB"]
    try:
        for replica in replicas:
            replica.start(env)
        await asyncio.gather(*(r.wait_ready(client) for r in replicas))
        yield replicas[0], replicas[1]
    finally:
        await asyncio.gather(*(r.stop() for r in replicas))


# --------------------------------------------------------------------------- web and Telegram users


@dataclass
class WebUser:
    """A browser identity: the signed cookie one replica issued, sent to any replica."""

    cookie: str
    csrf: str

    @property
    def user_id(self) -> str:
        user_id = Identities(COOKIE_SECRET.encode()).verify(self.cookie)
        assert user_id is not None
        return user_id

    def headers(self) -> dict[str, str]:
        return {"Cookie": f"{USER_COOKIE}={self.cookie}", "X-CSRF-Token": self.csrf}


def no_cookie_jar() -> CookieJar:
    """The test sends every cookie itself: a shared jar would mix the users up."""
    return CookieJar(DefaultCookiePolicy(allowed_domains=[]))


async def web_user(client: httpx.AsyncClient, replica: Replica) -> WebUser:
    response = await client.get(replica.url + "/api/session")
    assert response.status_code == 200, response.text
    return WebUser(response.cookies[USER_COOKIE], response.json()["csrf_token"])


async def web_tell(
    client: httpx.AsyncClient, replica: Replica, user: WebUser, image: bytes
) -> httpx.Response:
    return await client.post(
        replica.url + "/api/jokes",
        files={"image": ("photo.jpg", image, "image/jpeg")},
        headers={**user.headers(), "Accept-Language": "en"},
    )


async def web_joke(client: httpx.AsyncClient, replica: Replica, image: bytes) -> str:
    """A joke told on ``replica`` to a new visitor; its public id (what the web API shows)."""
    response = await web_tell(client, replica, await web_user(client, replica), image)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def web_rate(
    client: httpx.AsyncClient, replica: Replica, user: WebUser, joke_id: str, value: int
) -> dict[str, Any]:
    response = await client.post(
        f"{replica.url}/api/jokes/{joke_id}/rating", json={"value": value}, headers=user.headers()
    )
    assert response.status_code == 200, f"{replica.name}: {response.text}"
    return response.json()


@dataclass
class PostedJoke:
    """A joke told in a Telegram chat: its id, and the bot's message that carries its buttons
    (the fake Bot API edits that very dict when the bot updates the counts)."""

    id: int
    message: dict[str, Any]

    def buttons(self) -> tuple[str, ...]:
        return keyboard_counts(self.message.get("reply_markup"))


def is_reply_to(params: dict[str, Any], message: dict[str, Any]) -> bool:
    """Whether a sendMessage (its parameters) replies to the user's ``message``."""
    replied = (params.get("reply_parameters") or {}).get("message_id")
    return int(params["chat_id"]) == message["chat"]["id"] and replied == message["message_id"]


@dataclass
class Telegram:
    """Telegram's side: users' updates POSTed to a replica's webhook with the secret token that
    the replicas registered, and the bot's answers as the fake Bot API saw them."""

    api: FakeBotAPI

    async def deliver(self, replica: Replica, update: dict[str, Any]) -> None:
        secret = self.api.webhook.get("secret_token")
        status = await self.api.post_webhook(replica.url + WEBHOOK_PATH, update, secret)
        assert status == 200, f"{replica.name} answered the webhook with {status}"

    async def post(
        self, replica: Replica, chat: dict[str, Any], user: dict[str, Any], **content: Any
    ) -> dict[str, Any]:
        """A user's message (``content``: photo, text, …) delivered to ``replica``; the webhook
        only queues it, so this returns before the bot has handled it."""
        message = self.api.message(chat, user, **content)
        await self.deliver(replica, self.api.update(message=message))
        return message

    def answers(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        """Every sendMessage so far that replies to ``message``."""
        return [p for p in self.api.sent("sendMessage") if is_reply_to(p, message)]

    async def answer(self, message: dict[str, Any]) -> dict[str, Any]:
        """The bot's one reply to ``message`` (the sendMessage parameters), once it is sent."""
        (reply,) = await self.api.wait_for(
            "sendMessage", lambda params: is_reply_to(params, message), within=STEP_S
        )
        return reply

    def downloads(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        """getFile calls for the pictures of ``message`` (made only once a photo is admitted)."""
        ids = {size["file_id"] for size in message.get("photo", [])}
        return [p for p in self.api.sent("getFile", ok_only=False) if p.get("file_id") in ids]

    async def send_photo(
        self,
        replica: Replica,
        chat: dict[str, Any],
        user: dict[str, Any],
        image: bytes,
        **extra: Any,
    ) -> tuple[int, dict[str, Any]]:
        """A photo message delivered to ``replica``: its id, and the bot's reply to it (the
        sendMessage parameters)."""
        message = await self.post(replica, chat, user, photo=self.api.photo(image), **extra)
        return message["message_id"], await self.answer(message)

    async def joke_in_group(
        self, replica: Replica, chat: dict[str, Any], user: dict[str, Any], image: bytes
    ) -> PostedJoke:
        """``/joke`` with a picture in a group, told by ``replica``."""
        command = {"type": "bot_command", "offset": 0, "length": 5}
        asked, reply = await self.send_photo(
            replica, chat, user, image, caption="/joke", caption_entities=[command]
        )
        vote = parse_vote(reply["reply_markup"]["inline_keyboard"][0][0]["callback_data"])
        assert vote is not None
        return PostedJoke(vote[0], self.bot_message(chat["id"], asked))

    def bot_message(self, chat_id: int, to_message_id: int) -> dict[str, Any]:
        for (chat, _), message in self.api.messages.items():
            if (
                chat == chat_id
                and message["from"]["id"] == self.api.me["id"]
                and message.get("reply_to_message", {}).get("message_id") == to_message_id
            ):
                return message
        raise AssertionError(f"no bot reply to message {to_message_id} in chat {chat_id}")

    async def vote(
        self, replica: Replica, user: dict[str, Any], joke: PostedJoke, value: int
    ) -> str:
        """A press of 👍/👎 delivered to ``replica``; the toast the bot answered it with."""
        update = self.api.callback_update(user, joke.message, vote_data(joke.id, value))
        query_id = update["callback_query"]["id"]
        await self.deliver(replica, update)
        (answer,) = await self.api.wait_for(
            "answerCallbackQuery", lambda p: p.get("callback_query_id") == query_id, within=STEP_S
        )
        return str(answer.get("text"))

    async def wait_counts(self, joke: PostedJoke, expected: tuple[str, str]) -> None:
        """The buttons under the joke end up showing the stored totals."""
        await eventually(
            lambda: joke.buttons() == expected, STEP_S, lambda: f"buttons show {joke.buttons()}"
        )


def picture(index: int) -> bytes:
    """A distinct real photo per index (a crop of a scikit-image sample): the training export
    keeps one example per image, so every rated joke needs its own."""
    return photo(index, size=128).jpeg


# --------------------------------------------------------------------------- the three checks


async def check_votes_land_once(
    client: httpx.AsyncClient, tg: Telegram, store: Store, a: Replica, b: Replica
) -> None:
    # Web: jokes told on A, voted through B (and A); cookies issued by B work on A.
    jokes = [await web_joke(client, a, picture(i)) for i in range(4)]
    v1, v2, v3 = [await web_user(client, b) for _ in range(3)]
    same_time = await asyncio.gather(
        web_rate(client, a, v1, jokes[0], 1), web_rate(client, b, v1, jokes[0], 1)
    )
    assert [r["vote"] for r in same_time] == [1, 1]
    for joke in jokes[1:]:
        assert (await web_rate(client, b, v1, joke, 1))["previous"] is None
    for joke in jokes[:2]:
        await web_rate(client, a, v2, joke, 1)
    await web_rate(client, b, v3, jokes[0], 1)
    changed = await web_rate(client, b, v2, jokes[0], -1)  # first cast through A
    assert (changed["vote"], changed["previous"], changed["up"], changed["down"]) == (-1, 1, 2, 1)

    expected: dict[int | str, dict[str, int]] = {
        jokes[0]: {v1.user_id: 1, v2.user_id: -1, v3.user_id: 1},
        jokes[1]: {v1.user_id: 1, v2.user_id: 1},
        jokes[2]: {v1.user_id: 1},
        jokes[3]: {v1.user_id: 1},
    }
    for joke, votes in expected.items():
        up = sum(1 for v in votes.values() if v > 0)
        for replica in (a, b):
            shown = (await client.get(f"{replica.url}/api/jokes/{joke}")).json()
            assert (shown["up"], shown["down"]) == (up, len(votes) - up), replica.name

    # Telegram: a group; jokes told by either replica, button presses delivered to either.
    group = tg.api.group_chat(-1000000000000 - int(uuid.uuid4().int % 10**9))
    base = 700000 + int(uuid.uuid4().int % 10**6) * 10  # Redis keys of its own
    u1, u2, u3 = (tg.api.user(base + i, f"User{i}") for i in range(3))
    t0 = await tg.joke_in_group(a, group, u1, picture(4))
    t1 = await tg.joke_in_group(b, group, u2, picture(5))
    assert await tg.vote(b, u1, t0, 1) == "👍 Thanks!"
    assert await tg.vote(a, u2, t0, 1) == "👍 Thanks!"
    assert await tg.vote(b, u3, t0, 1) == "👍 Thanks!"
    assert await tg.vote(a, u1, t1, 1) == "👍 Thanks!"
    assert await tg.vote(b, u2, t1, 1) == "👍 Thanks!"
    assert await tg.vote(a, u3, t0, -1) == "Changed to 👎"  # first cast through B
    assert await tg.vote(b, u1, t1, 1) == "You already voted that."  # first cast through A
    await tg.wait_counts(t0, ("👍 2", "👎 1"))
    await tg.wait_counts(t1, ("👍 2", "👎 0"))
    expected[t0.id] = {f"tg:{base}": 1, f"tg:{base + 1}": 1, f"tg:{base + 2}": -1}
    expected[t1.id] = {f"tg:{base}": 1, f"tg:{base + 1}": 1}

    # The store: exactly one row per (joke, user), holding the latest vote.
    for joke, votes in expected.items():
        if isinstance(joke, str):  # a web joke: the API's public id → the store's id
            joke = (await store.get_joke_by_public_id(joke)).id
        rows = await store.ratings_for(joke)
        assert len(rows) == len({user for user, _ in rows}), rows
        assert dict(rows) == votes, joke
    assert await store.count_ratings() == sum(map(len, expected.values())) == RATING_ROWS


async def check_limit_holds_across_replicas(
    client: httpx.AsyncClient, tg: Telegram, a: Replica, b: Replica
) -> list[dict[str, Any]]:
    """The limit holds on the web and on Telegram; returns the Telegram photos that must stay
    unanswered and undownloaded (the test checks them again once much later)."""
    # Web: one browser, requests alternating between the replicas.
    user = await web_user(client, a)
    image = picture(6)
    first = time.monotonic()
    answers = [await web_tell(client, (a, b)[i % 2], user, image) for i in range(2 * LIMIT)]
    elapsed = time.monotonic() - first
    assert [r.status_code for r in answers] == [201] * LIMIT + [429] * LIMIT
    for response in answers[LIMIT:]:  # refused by A and by B
        assert response.json()["error"] == "rate_user", response.text
        assert response.json()["message"].startswith("Slow down")
        # sliding window: free again one minute after the first counted request, whichever
        # replica is asked (a fixed window would say "until the minute ends": anything 1–60 s)
        assert 60 - elapsed - 1 <= int(response.headers["Retry-After"]) <= 60

    # Telegram: one user's photos delivered alternately to the replicas. The first refusal (B,
    # which has seen only one of the user's photos) gets the one "slow down" notice of the
    # window; the later ones (A, then B) are silent (docs/telegram.md, "Admission before work"):
    # with per-process counters A would tell a joke, with a per-process notice window it would
    # send a second notice.
    person = tg.api.user(900000000 + int(uuid.uuid4().int % 10**8), "Quick")
    chat = tg.api.private_chat(person)
    replies = [
        (await tg.send_photo((a, b)[i % 2], chat, person, image))[1] for i in range(LIMIT + 1)
    ]
    told = ["reply_markup" in r for r in replies]
    assert told == [True] * LIMIT + [False], [r["text"] for r in replies]
    assert replies[LIMIT]["text"].startswith("Slow down"), replies[LIMIT]["text"]
    silent = [
        await tg.post((a, b)[i % 2], chat, person, photo=tg.api.photo(image))
        for i in range(LIMIT + 1, 2 * LIMIT)
    ]
    # Each replica answers a later /help: by then it has long handled the photo before it (a
    # refusal is two Redis round trips; the reply waits for the chat's 1/s pacing), and an
    # admitted photo would have been downloaded at once.
    command = [{"type": "bot_command", "offset": 0, "length": 5}]
    for replica in (a, b):
        await tg.answer(await tg.post(replica, chat, person, text="/help", entities=command))
    assert_unanswered(tg, silent)
    return silent


def assert_unanswered(tg: Telegram, photos: list[dict[str, Any]]) -> None:
    """Refused photos: never downloaded, never replied to (neither a joke nor a notice)."""
    for message in photos:
        assert tg.downloads(message) == [], message["message_id"]
        assert tg.answers(message) == [], [p["text"] for p in tg.answers(message)]


async def check_one_training_run(
    store: Store, trainer: HeldTrainer, a: Replica, b: Replica
) -> None:
    await eventually(trainer.starts, STEP_S, lambda: "no replica started the training")
    (winner_pid,) = trainer.starts()
    assert a.runs_as(winner_pid) or b.runs_as(winner_pid)
    winner, loser = (a, b) if a.runs_as(winner_pid) else (b, a)
    # While the trainer runs, the other replica's scheduler finds the lock held.
    await loser.wait_log(LOCK_HELD, after=len(loser.log()))
    runs = await store.training_runs()
    assert [(r.status, r.step) for r in runs] == [("running", "train")]

    trainer.release.touch()

    async def finished() -> Any:
        runs = await store.training_runs()
        return runs if runs[0].status != "running" else None

    runs = await eventually(
        finished, 30, lambda: f"the run never finished:\n{winner.log()[-4000:]}"
    )
    assert [r.status for r in runs] == ["succeeded"], runs[0].error
    # Both schedulers keep checking, and neither starts a second run.
    for replica in (winner, loser):
        await replica.wait_log(NOT_DUE, after=len(replica.log()))
    assert len(await store.training_runs()) == 1
    assert trainer.starts() == [winner_pid]
    assert len(trainer.swaps()) == 1


async def test_two_replicas_share_votes_limits_and_the_training_lock(
    tmp_path: Path, pg_database: str, redis_url: str
) -> None:
    await _reset_pg(pg_database)
    training, trainer = training_settings(tmp_path / "train")
    store = Store(pg_database, tmp_path / "shared-data" / "images")
    try:
        async with (
            FakeBotAPI() as botapi,
            httpx.AsyncClient(timeout=STEP_S, cookies=no_cookie_jar()) as client,
            two_replicas(
                tmp_path,
                replica_env(tmp_path, pg_database, redis_url, botapi, training, trainer),
                client,
            ) as (a, b),
        ):
            tg = Telegram(botapi)
            # Whichever started first told Telegram where to post, with the secret both accept.
            assert botapi.webhook["url"] == PUBLIC_URL + WEBHOOK_PATH
            await check_votes_land_once(client, tg, store, a, b)
            refused = await check_limit_holds_across_replicas(client, tg, a, b)
            await check_one_training_run(store, trainer, a, b)
            assert_unanswered(tg, refused)  # still, many seconds later
            for replica in (a, b):
                assert re.search(r"Traceback|ERROR", replica.log()) is None, replica.log()[-4000:]
    finally:
        trainer.release.touch()  # a trainer still waiting may go (and exits on its own anyway)
        await store.close()


async def test_the_redis_limit_is_a_sliding_window(redis_url: str) -> None:
    """One hit per second, allowed just before a whole second: a hit 0.3 s later, in the next
    second, is still refused. (A fixed one-second window would have started afresh.)"""
    limiter = RedisLimiter(redis_url)
    key = f"test-sliding-{uuid.uuid4().hex}"
    try:
        await asyncio.sleep(1.85 - time.time() % 1)  # at x.85 s
        assert await limiter.hit(key, 1, 1.0) is None
        await asyncio.sleep(0.3)
        wait = await limiter.hit(key, 1, 1.0)
        assert wait is not None and 0 < wait < 0.75
        await asyncio.sleep(wait + 0.05)
        assert await limiter.hit(key, 1, 1.0) is None
    finally:
        await limiter.close()
