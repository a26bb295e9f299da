"""A stand-in for LMDeploy's ``api_server`` on loopback: standard library (+ Pillow if present).

Two ways to use it:

* in-process (tests): ``FakeLMDeploy(...).start()`` serves on 127.0.0.1 in a thread; ``script``
  is a queue of recorded exchanges (``tests/fixtures/lmdeploy/<name>.json``) or actions replayed
  one per chat request; when the queue is empty it answers like a healthy server. Every request is
  recorded (``requests``) with a summary of its picture, and any image URL that is not a
  ``data:`` URL is flagged in ``violations`` (the real server would read it from its own disk).
* as the ``lmdeploy`` executable (managed-mode tests, the serving benchmark's CPU smoke run):
  ``python fake_lmdeploy.py serve api_server MODEL --server-port P [--model-name N] [--api-keys K]``
  accepts (and ignores) every other flag of the real CLI. Environment knobs:
  FAKE_LMDEPLOY_STARTUP_S (seconds before it listens, like a model load), FAKE_LMDEPLOY_DELAY_S
  (seconds per chat request), FAKE_LMDEPLOY_CAPACITY (requests served at once; 0: no cap),
  FAKE_LMDEPLOY_LOG (append one JSON line per request to this file).
  A model folder containing a file named ``FAKE_BROKEN`` makes it exit with status 3 at start.
  SIGTERM stops accepting connections and finishes the requests in flight, as uvicorn does.

Fixture format (what ``bench/capture_lmdeploy.py`` records from a real server)::

    {"name": ..., "source": "synthetic" | "captured", "lmdeploy_version": ..., "note": ...,
     "request": {"method", "path", ...summary...},
     "response": {"status": int, "headers": {...},
                  "body": <JSON> | "body_text": str | "sse": [str]}}
"""

from __future__ import annotations

import argparse
import base64
import binascii
import collections
import io
import json
import os
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "lmdeploy"
TEXT_TOKENS = 89  # InternVL2 template + the default prompt, as measured on the device
TILE = 448


def load_fixture(name: str, fixtures_dir: Path = FIXTURES) -> dict[str, Any]:
    return json.loads((fixtures_dir / f"{name}.json").read_text(encoding="utf-8"))


def _grid_tiles(width: int, height: int, max_tiles: int) -> int:
    """InternVL's tile count (the same rule as bot.engines.tiling, written out independently)."""
    aspect = width / height
    pairs = {
        (c, r)
        for n in range(1, max_tiles + 1)
        for c in range(1, n + 1)
        for r in range(1, n + 1)
        if 1 <= c * r <= max_tiles
    }
    best, best_diff = (1, 1), float("inf")
    for c, r in sorted(pairs, key=lambda p: p[0] * p[1]):
        diff = abs(aspect - c / r)
        if diff < best_diff:
            best, best_diff = (c, r), diff
        elif diff == best_diff and width * height > 0.5 * TILE * TILE * c * r:
            best = (c, r)
    return best[0] * best[1]


def summarize_image(url: Any, max_dynamic_patch: Any) -> dict[str, Any]:
    info: dict[str, Any] = {"scheme": str(url)[:30] if not isinstance(url, str) else url[:23]}
    if not isinstance(url, str) or not url.startswith("data:"):
        info["data_url"] = False
        return info
    info["data_url"] = True
    try:
        raw = base64.b64decode(url.split(",", 1)[1], validate=True)
    except (binascii.Error, IndexError):
        info["decodable"] = False
        return info
    info["bytes"] = len(raw)
    try:
        from PIL import Image

        with Image.open(io.BytesIO(raw)) as im:
            info["size"] = list(im.size)
            im.verify()
        info["decodable"] = True
    except Exception:
        info["decodable"] = False
        return info
    mdp = max_dynamic_patch if isinstance(max_dynamic_patch, int) else 12
    tiles = _grid_tiles(info["size"][0], info["size"][1], mdp)
    info["tiles"] = tiles
    info["on_grid"] = info["size"][0] % TILE == 0 and info["size"][1] % TILE == 0
    info["image_tokens"] = (tiles + (1 if tiles > 1 else 0)) * 256
    return info


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        with self.server.fake.lock:
            self.server.fake.connections[self.connection] = False

    def finish(self) -> None:
        with self.server.fake.lock:
            self.server.fake.connections.pop(self.connection, None)
        super().finish()

    def _busy(self, busy: bool) -> None:
        fake = self.server.fake
        with fake.lock:
            fake.connections[self.connection] = busy
        if not busy and fake.stopping:
            self.close_connection = True  # graceful stop: no keep-alive after this answer

    def log_message(self, fmt: str, *args: Any) -> None:  # quiet; the fake keeps its own log
        if self.server.fake.verbose:
            sys.stderr.write("fake-lmdeploy: " + (fmt % args) + "\n")

    # ---------------------------------------------------------------- plumbing

    def _read_json(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            return json.loads(raw or b"null")
        except ValueError:
            return None

    def _send(self, status: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
        if isinstance(body, bytes):
            payload = body
        elif isinstance(body, str):
            payload = body.encode()
        elif body is None:
            payload = b""
        else:
            payload = json.dumps(body, ensure_ascii=False).encode()
        self.send_response(status)
        hdrs = {"content-type": "application/json"}
        hdrs.update({k.lower(): v for k, v in (headers or {}).items()})
        hdrs.pop("content-length", None)
        hdrs.pop("transfer-encoding", None)
        for key, value in hdrs.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _replay(self, fixture: dict[str, Any], substitute: dict[str, str] | None = None) -> None:
        resp = fixture["response"]
        if "sse" in resp:
            text = "".join(c if c.endswith("\n\n") else c + "\n\n" for c in resp["sse"])
            headers = dict(resp.get("headers") or {})
            headers.setdefault("content-type", "text/event-stream")
            self._send(resp["status"], text, headers)
            return
        body: Any = resp.get("body") if "body" in resp else resp.get("body_text", "")
        if substitute and isinstance(body, (dict, list)):
            text = json.dumps(body, ensure_ascii=False)
            for old, new in substitute.items():
                text = text.replace(old, new)
            body = json.loads(text)
        self._send(resp["status"], body, resp.get("headers"))

    def _authorized(self) -> bool:
        keys = self.server.fake.api_keys
        if not keys:
            return True
        value = self.headers.get("Authorization") or ""
        scheme, _, token = value.partition(" ")
        return scheme.lower() == "bearer" and token in keys

    # ---------------------------------------------------------------- routes

    def do_GET(self) -> None:
        self._busy(True)
        try:
            self._get()
        finally:
            self._busy(False)

    def do_POST(self) -> None:
        self._busy(True)
        try:
            self._post()
        finally:
            self._busy(False)

    def _get(self) -> None:
        fake = self.server.fake
        fake.record({"method": "GET", "path": self.path, "auth": self._auth_summary()})
        if self.path == "/health":
            if not fake.healthy:
                self._send(503, {"status": "unhealthy"})
            else:
                self._replay(fake.fixture("health"))
        elif self.path == "/v1/models":
            if not self._authorized():
                self._replay(fake.fixture("models_unauthorized"))
                return
            doc = fake.fixture("models")
            body = doc["response"].get("body")
            if isinstance(body, dict) and isinstance(body.get("data"), list):
                for card in body["data"]:  # a captured list names the captured model
                    if isinstance(card, dict):
                        card["id"] = card["root"] = fake.model_name
            self._replay(doc)
        else:
            self._send(404, {"detail": "Not Found"})

    def _post(self) -> None:
        fake = self.server.fake
        body = self._read_json()
        entry = fake.summarize_chat(self.path, body, self._auth_summary())
        fake.record(entry)
        if self.path != "/v1/chat/completions":
            self._send(404, {"detail": "Not Found"})
            return
        with fake.lock:
            fake.active += 1
            fake.max_active = max(fake.max_active, fake.active)
        try:
            action = fake.next_action()
            if isinstance(action, dict) and action.get("sleep"):
                time.sleep(float(action["sleep"]))
            elif fake.delay_s and fake.capacity is not None:
                with fake.capacity:
                    time.sleep(fake.delay_s)
            elif fake.delay_s:
                time.sleep(fake.delay_s)
            if isinstance(action, dict) and action.get("close"):
                # Drop the connection without an answer (a crash mid-request).
                self.close_connection = True
                self.connection.shutdown(2)
                return
            if not self._authorized():
                self._replay(fake.fixture("chat_unauthorized"))
                return
            if not entry.get("images_ok", True):
                self._replay(fake.fixture("chat_bad_image"))
                return
            name = action.get("fixture") if isinstance(action, dict) else action
            if name:
                self._replay(fake.fixture(name), {"fake-internvl2": fake.model_name})
            else:
                self._send(200, fake.success_body(entry, stream=bool((body or {}).get("stream"))))
        finally:
            with fake.lock:
                fake.active -= 1
                fake.served += 1

    def _auth_summary(self) -> str:
        value = self.headers.get("Authorization")
        if not value:
            return "none"
        return "good" if self._authorized() and self.server.fake.api_keys else "bearer"


class _Server(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True  # server_close() waits for requests in flight (graceful stop)
    allow_reuse_address = True
    request_queue_size = 256  # bursts (goodput bench, caching check) must not be reset at accept
    fake: FakeLMDeploy


class FakeLMDeploy:
    def __init__(
        self,
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        model_name: str = "fake-internvl2",
        api_keys: list[str] | None = None,
        delay_s: float = 0.0,
        capacity: int = 0,
        fixtures_dir: Path = FIXTURES,
        script: list[Any] | None = None,
        log_path: Path | None = None,
        verbose: bool = False,
    ) -> None:
        self.host, self.port = host, port
        self.model_name = model_name
        self.api_keys = [k for k in (api_keys or []) if k]
        self.delay_s = delay_s
        # capacity > 0: at most this many requests are served at once (a GPU's batch); the rest
        # wait inside the server, so throughput is capped at capacity / delay_s (goodput bench)
        self.capacity = threading.Semaphore(capacity) if capacity > 0 else None
        self.fixtures_dir = fixtures_dir
        self.script: collections.deque[Any] = collections.deque(script or [])
        self.log_path = log_path
        self.verbose = verbose
        self.healthy = True
        self.requests: list[dict[str, Any]] = []
        self.violations: list[str] = []
        self.lock = threading.Lock()
        self.active = 0
        self.max_active = 0
        self.served = 0
        self.stopping = False
        self.connections: dict[socket.socket, bool] = {}  # connection → answering a request now
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- behaviour

    def fixture(self, name: str) -> dict[str, Any]:
        return load_fixture(name, self.fixtures_dir)

    def next_action(self) -> Any:
        with self.lock:
            return self.script.popleft() if self.script else None

    def record(self, entry: dict[str, Any]) -> None:
        with self.lock:
            self.requests.append(entry)
        if self.log_path:
            with self.lock, open(self.log_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry, ensure_ascii=False) + "\n")

    def summarize_chat(self, path: str, body: Any, auth: str) -> dict[str, Any]:
        entry: dict[str, Any] = {"method": "POST", "path": path, "auth": auth, "t": time.time()}
        if not isinstance(body, dict):
            entry["images_ok"] = False
            return entry
        entry.update(
            {k: body.get(k) for k in ("model", "max_tokens", "temperature", "top_p", "stream")}
        )
        entry["extra"] = {
            k: v
            for k, v in body.items()
            if k not in ("model", "messages", "max_tokens", "temperature", "top_p", "stream")
        }
        images, texts, order = [], [], []
        for message in body.get("messages") or []:
            content = message.get("content")
            if isinstance(content, str):
                texts.append(content)
                order.append("text")
                continue
            for item in content or []:
                kind = item.get("type")
                order.append(kind)
                if kind == "image_url":
                    image_url = item.get("image_url")
                    is_dict = isinstance(image_url, dict)
                    url = image_url.get("url") if is_dict else image_url
                    mdp = image_url.get("max_dynamic_patch") if is_dict else None
                    info = summarize_image(url, mdp)
                    info["max_dynamic_patch"] = mdp
                    images.append(info)
                    if not info["data_url"]:
                        with self.lock:
                            self.violations.append(str(url)[:80])
                elif kind == "text":
                    texts.append(item.get("text", ""))
        entry["images"] = images
        entry["texts"] = texts
        entry["order"] = order
        entry["images_ok"] = all(i.get("data_url") and i.get("decodable") for i in images)
        return entry

    def success_body(self, entry: dict[str, Any], stream: bool = False) -> Any:
        image_tokens = sum(i.get("image_tokens", 0) for i in entry.get("images", []))
        extra = entry.get("extra") or {}
        completion = int(entry.get("max_tokens") or 16) if extra.get("ignore_eos") else 12
        tiles = sum(i.get("tiles", 0) for i in entry.get("images", []))
        text = f"[{self.model_name}] 这张图有 {tiles} 块，每一块都在讲冷笑话。"
        body = {
            "id": f"chatcmpl-fake{self.served}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "tool_calls": None},
                    "logprobs": None,
                    "finish_reason": "length" if extra.get("ignore_eos") else "stop",
                }
            ],
            "usage": {
                "prompt_tokens": TEXT_TOKENS + image_tokens,
                "completion_tokens": completion,
                "total_tokens": TEXT_TOKENS + image_tokens + completion,
            },
        }
        return body

    # ---------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> FakeLMDeploy:
        self._httpd = _Server((self.host, self.port), _Handler)
        self._httpd.fake = self
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def _close_idle(self) -> None:
        """Graceful stop: idle keep-alive connections are closed, busy ones finish first."""
        self.stopping = True
        with self.lock:
            idle = [conn for conn, busy in self.connections.items() if not busy]
        for conn in idle:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._close_idle()
            self._httpd.server_close()
            self._httpd = None

    def serve_forever(self) -> None:
        self._httpd = _Server((self.host, self.port), _Handler)
        self._httpd.fake = self
        self.port = self._httpd.server_address[1]
        self._httpd.serve_forever(poll_interval=0.1)
        self._close_idle()
        self._httpd.server_close()

    def __enter__(self) -> FakeLMDeploy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fake-lmdeploy")
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("subcommand", choices=["api_server"])
    parser.add_argument("model_path")
    parser.add_argument("--server-port", type=int, default=23333)
    parser.add_argument("--server-name", default="0.0.0.0")
    parser.add_argument("--model-name", default=None)
    parser.add_argument("--api-keys", nargs="*", default=None)
    parser.add_argument("--chat-template", default=None)
    args, _unknown = parser.parse_known_args(argv)
    model = Path(args.model_path)
    print(f"fake lmdeploy: argv={sys.argv[1:]}", flush=True)
    print(
        "fake lmdeploy: OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS')} MKL_NUM_THREADS={os.environ.get('MKL_NUM_THREADS')}",
        flush=True,
    )
    if args.chat_template:
        template = json.loads(Path(args.chat_template).read_text(encoding="utf-8"))
        print(f"fake lmdeploy: chat template {template.get('model_name')}", flush=True)
    time.sleep(float(os.environ.get("FAKE_LMDEPLOY_STARTUP_S", "0")))
    if (model / "FAKE_BROKEN").exists():
        print("fake lmdeploy: model is broken, exiting", flush=True)
        return 3
    log_path = os.environ.get("FAKE_LMDEPLOY_LOG")
    fake = FakeLMDeploy(
        port=args.server_port,
        host=args.server_name,
        model_name=args.model_name or str(model),
        api_keys=args.api_keys,
        delay_s=float(os.environ.get("FAKE_LMDEPLOY_DELAY_S", "0")),
        capacity=int(os.environ.get("FAKE_LMDEPLOY_CAPACITY", "0")),
        log_path=Path(log_path) if log_path else None,
    )

    def stop(signum: int, frame: Any) -> None:
        print(f"fake lmdeploy: signal {signum}, draining {fake.active} requests", flush=True)
        threading.Thread(target=fake._httpd.shutdown, daemon=True).start()  # type: ignore[union-attr]

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"fake lmdeploy: serving {model} on port {args.server_port}", flush=True)
    fake.serve_forever()
    print(f"fake lmdeploy: stopped after {fake.served} requests", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
