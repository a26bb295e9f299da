"""A loopback stand-in for the Hugging Face hub: the parts of its HTTP API ``huggingface_hub``
uses to download a repository (standard library + Pillow).

``huggingface_hub.snapshot_download`` asks, in order:

- ``GET /api/{models|datasets}/OWNER/NAME[/revision/REV]``: repo info; ``sha`` is the commit;
- ``GET /api/{models|datasets}/OWNER/NAME/tree/COMMIT?recursive=true``: the file listing, with
  ``size``, git blob ``oid`` and, for LFS files, ``lfs: {oid: sha256, size}``;
- ``HEAD`` then ``GET /[datasets/]OWNER/NAME/resolve/COMMIT/PATH``: ``X-Repo-Commit``, ``ETag``
  (``X-Linked-Etag`` / ``X-Linked-Size`` for LFS files), ``Content-Length``; ``Range`` requests
  are answered with 206 (how an interrupted download resumes).

Errors carry the hub's ``X-Error-Code`` (RepoNotFound, RevisionNotFound, EntryNotFound,
GatedRepo), which ``huggingface_hub`` turns into its typed exceptions. A repository may require a
token (``Authorization: Bearer …``). Faults for tests: ``corrupt`` (serve a file with one byte
changed: same size, wrong content) and ``cut`` (the first full GET of a file stops half-way).
Every request is recorded (method, path, Range, whether a token came: never the token itself).

``make_oogiri_go(folder)`` writes a tiny data set in Oogiri-GO's exact shape (``cn.jsonl``,
``en.jsonl``, ``jp.jsonl`` lines ``{"type","question","image","text","star"}``; pictures in
``images.zip``) with the cases the recipe must handle: duplicate pictures and jokes, other
languages, text-only games, a broken picture, a missing one, a bad line.

Standalone (the device run): ``python tests/fakes/fake_hub.py --port 0 --model OWNER/NAME=DIR
--dataset OWNER/NAME=DIR`` prints ``FAKE_HUB_URL=http://127.0.0.1:PORT`` and serves until killed.
``python tests/fakes/fake_hub.py --make-oogiri-go DIR`` writes the tiny data set.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import sys
import threading
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".zip", ".png", ".jpg", ".model", ".pth")
LFS_MIN_BYTES = 1 << 20


@dataclass
class HubRepo:
    repo_type: str  # model | dataset
    name: str
    folder: Path
    token: str | None = None  # required token (a private or gated repository)
    gated: bool = False
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    commit: str = ""

    def scan(self) -> None:
        """Hash every file; the commit id is derived from the content, as git's would be."""
        self.files = {}
        for path in sorted(p for p in self.folder.rglob("*") if p.is_file()):
            rel = path.relative_to(self.folder).as_posix()
            if rel.startswith(".cache/") or rel.startswith("."):
                continue
            data = path.read_bytes()
            lfs = path.suffix in LFS_SUFFIXES or len(data) >= LFS_MIN_BYTES
            self.files[rel] = {
                "size": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "blob": hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest(),
                "lfs": lfs,
                "abs": path,
            }
        listing = json.dumps({k: v["sha256"] for k, v in self.files.items()}, sort_keys=True)
        self.commit = hashlib.sha1(listing.encode()).hexdigest()


def _split_repo(parts: list[str]) -> tuple[str, list[str]]:
    return "/".join(parts[:2]), parts[2:]


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: Any) -> None:  # the hub keeps its own record
        pass

    # ------------------------------------------------------------------ plumbing

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, doc: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(doc).encode()
        self._send(status, body, {"Content-Type": "application/json", **(headers or {})})

    def _error(self, status: int, code: str, message: str) -> None:
        self._json(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

    def _authorized(self, repo: HubRepo) -> bool:
        if repo.token is None:
            return True
        return self.headers.get("Authorization", "") == f"Bearer {repo.token}"

    def _record(self) -> None:
        self.server.hub.requests.append(
            {
                "method": self.command,
                "path": urlsplit(self.path).path,
                "query": urlsplit(self.path).query,
                "range": self.headers.get("Range"),
                "token": bool(self.headers.get("Authorization")),
            }
        )

    # ------------------------------------------------------------------ routing

    def do_HEAD(self) -> None:
        self._route()

    def do_GET(self) -> None:
        self._route()

    def _route(self) -> None:
        self._record()
        hub = self.server.hub
        parts = [unquote(p) for p in urlsplit(self.path).path.split("/") if p]
        try:
            if parts[:1] == ["api"] and len(parts) >= 4 and parts[1] in ("models", "datasets"):
                repo_type = parts[1][:-1]
                name, rest = _split_repo(parts[2:])
                self._api(hub.repo(repo_type, name), repo_type, name, rest)
            elif parts[:1] == ["datasets"] and "resolve" in parts:
                name, rest = _split_repo(parts[1:])
                self._resolve(hub.repo("dataset", name), name, rest)
            elif len(parts) >= 4 and parts[2] == "resolve":
                name, rest = _split_repo(parts)
                self._resolve(hub.repo("model", name), name, rest)
            else:
                self._error(404, "EntryNotFound", f"no route {self.path}")
        except BrokenPipeError:
            pass

    def _repo_ok(self, repo: HubRepo | None, name: str) -> HubRepo | None:
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository {name} not found")
            return None
        if not self._authorized(repo):
            if repo.gated:
                self._error(401, "GatedRepo", f"Access to {name} is restricted")
            else:
                self._error(401, "RepoNotFound", f"Repository {name} not found")
            return None
        return repo

    def _commit(self, repo: HubRepo, rev: str) -> str | None:
        return repo.commit if rev in ("main", repo.commit) else None

    def _api(self, repo: HubRepo | None, repo_type: str, name: str, rest: list[str]) -> None:
        repo = self._repo_ok(repo, name)
        if repo is None:
            return
        if not rest or rest[0] == "revision":
            rev = rest[1] if len(rest) > 1 else "main"
            commit = self._commit(repo, rev)
            if commit is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                return
            doc = {
                "_id": commit[:24],
                "id": name,
                "sha": commit,
                "private": repo.token is not None,
                "gated": repo.gated,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "lastModified": "2026-12-01T00:00:00.000Z",
                "siblings": [{"rfilename": p} for p in repo.files],
            }
            self._json(200, doc)
        elif rest[0] == "tree" and len(rest) >= 2:
            commit = self._commit(repo, rest[1])
            if commit is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rest[1]}")
                return
            prefix = "/".join(rest[2:])
            entries: list[dict[str, Any]] = []
            dirs: set[str] = set()
            for path, f in repo.files.items():
                if prefix and not path.startswith(prefix + "/"):
                    continue
                *parents, _ = path.split("/")
                for i in range(1, len(parents) + 1):
                    dirs.add("/".join(parents[:i]))
                entry: dict[str, Any] = {
                    "type": "file",
                    "oid": f["blob"],
                    "size": f["size"],
                    "path": path,
                }
                if f["lfs"]:
                    entry["lfs"] = {"oid": f["sha256"], "size": f["size"], "pointerSize": 134}
                entries.append(entry)
            for d in sorted(dirs):
                oid = hashlib.sha1(d.encode()).hexdigest()
                entries.append({"type": "directory", "oid": oid, "size": 0, "path": d})
            self._json(200, entries)
        else:
            self._error(404, "EntryNotFound", f"no API route {'/'.join(rest)}")

    def _resolve(self, repo: HubRepo | None, name: str, rest: list[str]) -> None:
        # rest: ["resolve", REV, *path]
        repo = self._repo_ok(repo, name)
        if repo is None:
            return
        rev, path = rest[1], "/".join(rest[2:])
        commit = self._commit(repo, rev)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return
        f = repo.files.get(path)
        if f is None:
            self._error(404, "EntryNotFound", f"{path} does not exist at {rev}")
            return
        hub = self.server.hub
        data = Path(f["abs"]).read_bytes()
        if (repo.name, path) in hub.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        etag = f'"{f["sha256"] if f["lfs"] else f["blob"]}"'
        headers = {
            "X-Repo-Commit": commit,
            "ETag": etag,
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if f["lfs"]:
            headers["X-Linked-Etag"] = etag
            headers["X-Linked-Size"] = str(f["size"])
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start_s, _, end_s = rng[6:].partition("-")
            start = int(start_s or 0)
            end = int(end_s) if end_s else len(data) - 1
            part = data[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{start + len(part) - 1}/{len(data)}"
            self._send(206, part, headers)
            return
        key = (repo.name, path)
        if self.command == "GET" and key in hub.cut and key not in hub.cut_done:
            hub.cut_done.add(key)
            half = len(data) // 2
            self.send_response(200)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:half])
            self.wfile.flush()
            self.close_connection = True
            try:
                self.connection.shutdown(2)
            except OSError:
                pass
            return
        self._send(200, data, headers)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    hub: FakeHub


class FakeHub:
    """``FakeHub().add_model(name, folder).start()`` → serving at ``url`` (set HF_ENDPOINT)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port
        self.repos: dict[tuple[str, str], HubRepo] = {}
        self.requests: list[dict[str, Any]] = []
        self.corrupt: set[tuple[str, str]] = set()
        self.cut: set[tuple[str, str]] = set()
        self.cut_done: set[tuple[str, str]] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def add(
        self,
        repo_type: str,
        name: str,
        folder: Path,
        token: str | None = None,
        gated: bool = False,
    ) -> HubRepo:
        repo = HubRepo(repo_type, name, Path(folder), token, gated)
        repo.scan()
        self.repos[(repo_type, name)] = repo
        return repo

    def add_model(self, name: str, folder: Path, **kw: Any) -> HubRepo:
        return self.add("model", name, folder, **kw)

    def add_dataset(self, name: str, folder: Path, **kw: Any) -> HubRepo:
        return self.add("dataset", name, folder, **kw)

    def repo(self, repo_type: str, name: str) -> HubRepo | None:
        return self.repos.get((repo_type, name))

    def downloads(self, path_suffix: str) -> list[dict[str, Any]]:
        """The GET requests for a file (``…/resolve/REV/<path_suffix>``)."""
        return [
            r
            for r in self.requests
            if r["method"] == "GET" and "/resolve/" in r["path"] and r["path"].endswith(path_suffix)
        ]

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://{self.host}:{self._server.server_address[1]}"

    def start(self) -> FakeHub:
        self._server = _Server((self.host, self.port), _Handler)
        self._server.hub = self
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- a tiny Oogiri-GO

CN_JOKES = [
    "猫：这个家我说了算。",
    "老板说加班，我的摩托车先下班了。",
    "宇航员：我不是迷路，我在找外星人的厕所。",
    "咖啡喝多了，我以为自己是火箭。",
    "当你以为周末到了，其实今天才星期一。",
    "我不是懒，我只是进入了省电模式。",
    "这位朋友的发型，是被风投资过的。",
    "看到工资条的我，表情就是这样。",
    "别问，问就是在思考人生。",
    "我妈说的“马上到家”，大概就是这个速度。",
]


def picture(index: int, size: tuple[int, int] = (160, 120)) -> bytes:
    """A distinct JPEG per index: a crop of one of scikit-image's photos, or a drawn one."""
    from PIL import Image, ImageDraw

    img: Image.Image | None = None
    try:
        import skimage

        names = ("chelsea.png", "astronaut.png", "coffee.png", "rocket.jpg", "motorcycle_left.png")
        src = Path(skimage.__file__).parent / "data" / names[index % len(names)]
        full = Image.open(src).convert("RGB")
        step = index // len(names)
        left = (step * 41) % max(full.width - size[0] * 2, 1)
        top = (step * 29) % max(full.height - size[1] * 2, 1)
        img = full.crop((left, top, left + size[0] * 2, top + size[1] * 2)).resize(size)
    except (ImportError, OSError):
        rng = random.Random(index)
        img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        for _ in range(12):
            x, y, r = rng.randrange(size[0]), rng.randrange(size[1]), rng.randrange(8, 40)
            draw.ellipse(
                (x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in "rgb")
            )
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=88)
    return buf.getvalue()


def make_oogiri_go(folder: Path, unique: int = 10) -> dict[str, Any]:
    """Write the tiny data set; returns what a correct Chinese build keeps and drops.

    Chinese (cn.jsonl), in file order: ``unique`` good image-to-text jokes (stars descending
    from 20, one without a star); then the traps.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pictures: dict[str, bytes] = {}
    lines: list[Any] = []
    for i in range(unique):
        image_id = f"{1000 + i}"
        pictures[image_id] = picture(i)
        star: int | None = 20 - i if i < unique - 1 else None
        lines.append(
            {
                "type": "I2T",
                "question": None,
                "image": image_id,
                "text": CN_JOKES[i % len(CN_JOKES)],
                "star": star,
            }
        )
    # the same picture with a weaker joke: the best-rated joke per picture stays
    lines.append(
        {"type": "I2T", "question": None, "image": "1000", "text": "一个一般的笑话。", "star": 1}
    )
    # a byte-identical copy of picture 1001 under another id: one picture, one joke
    pictures["2001"] = pictures["1001"]
    lines.append(
        {
            "type": "I2T",
            "question": None,
            "image": "2001",
            "text": "同一张图的另一个梗。",
            "star": 2,
        }
    )
    # the best joke again (other spacing), on a new picture: one joke is kept once
    pictures["2002"] = picture(unique + 1)
    lines.append(
        {
            "type": "I2T",
            "question": None,
            "image": "2002",
            "text": " 猫：这个家 我说了算。 ",
            "star": 3,
        }
    )
    # text-only and image+text games
    lines.append(
        {"type": "T2T", "question": "什么东西越洗越脏？", "image": None, "text": "水。", "star": 50}
    )
    pictures["2003"] = picture(unique + 2)
    lines.append(
        {
            "type": "IT2T",
            "question": "他在想什么？",
            "image": "2003",
            "text": "在想晚饭吃什么。",
            "star": 40,
        }
    )
    # a broken picture (a truncated JPEG) and a missing one
    pictures["2004"] = picture(unique + 3)[:200]
    lines.append(
        {"type": "I2T", "question": None, "image": "2004", "text": "坏图的笑话。", "star": 30}
    )
    lines.append(
        {"type": "I2T", "question": None, "image": "9999", "text": "没有图的笑话。", "star": 30}
    )
    # an empty joke and a line that is not JSON
    lines.append({"type": "I2T", "question": None, "image": "1002", "text": "  ", "star": 60})
    lines.append("{not json")
    with (folder / "cn.jsonl").open("w", encoding="utf-8") as fh:
        for line in lines:
            fh.write(line if isinstance(line, str) else json.dumps(line, ensure_ascii=False))
            fh.write("\n")
    # other languages: never part of a Chinese build
    pictures["3001"] = picture(unique + 4)
    en = [
        {
            "type": "I2T",
            "question": None,
            "image": "3001",
            "text": "It wasn't on purpose!",
            "star": 99,
        }
    ]
    jp = [
        {"type": "I2T", "question": None, "image": "3001", "text": "わざとじゃないよ！", "star": 99}
    ]
    for name, rows in (("en.jsonl", en), ("jp.jsonl", jp)):
        (folder / name).write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
        )
    with zipfile.ZipFile(folder / "images.zip", "w", zipfile.ZIP_STORED) as z:
        for image_id, data in pictures.items():
            z.writestr(f"images/{image_id}.jpg", data)
    (folder / "README.md").write_text("# tiny Oogiri-GO (synthetic)\n", encoding="utf-8")
    return {
        "kept_texts": [CN_JOKES[i % len(CN_JOKES)] for i in range(unique)],
        "dropped": {
            "duplicate_image": 2,  # 1000 (weaker joke), 2001 (same bytes as 1001)
            "duplicate_text": 1,  # 2002
            "not_image_to_text": 2,  # T2T, IT2T
            "image_corrupt": 1,  # 2004
            "image_missing": 1,  # 9999
            "empty_text": 1,
            "bad_line": 1,
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--model", action="append", default=[], help="OWNER/NAME=DIR")
    ap.add_argument("--dataset", action="append", default=[], help="OWNER/NAME=DIR")
    ap.add_argument("--make-oogiri-go", type=Path, help="write the tiny data set and exit")
    args = ap.parse_args(argv)
    if args.make_oogiri_go:
        expected = make_oogiri_go(args.make_oogiri_go)
        print(json.dumps(expected, ensure_ascii=False))
        return 0
    hub = FakeHub(args.host, args.port)
    for kind, specs in (("model", args.model), ("dataset", args.dataset)):
        for spec in specs:
            name, _, folder = spec.partition("=")
            hub.add(kind, name, Path(folder))
    hub.start()
    print(f"FAKE_HUB_URL={hub.url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        hub.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
