#!/usr/bin/env python3
"""Talk to a running ``oogiri serve`` over its web API, standard library only (device scripts).

``webcheck.py wait URL [SECONDS [PID]]`` polls URL/healthz until it answers 200; exit 1 on
timeout, or as soon as process PID (the server) is gone.

``webcheck.py joke URL IMAGE`` posts the picture to URL/api/jokes and prints one JSON line:
``{"status", "model_version", "text", "seconds"}``.

``webcheck.py load URL IMAGE_DIR STOP_FILE OUT_JSONL [CONCURRENCY]`` keeps CONCURRENCY requests
in flight (default 4) over the pictures in IMAGE_DIR until STOP_FILE exists, writes one line per
request to OUT_JSONL and prints a summary: requests, failures, the model versions that answered
and when each was first and last seen. A swap under this load must fail nothing (issue 3).
"""

from __future__ import annotations

import json
import mimetypes
import os
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from pathlib import Path


def alive(pid: int | None) -> bool:
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait(url: str, seconds: float, pid: int | None = None) -> int:
    deadline = time.monotonic() + seconds
    last = "no answer"
    while time.monotonic() < deadline:
        if not alive(pid):
            print(f"the server (pid {pid}) exited: {last}", file=sys.stderr)
            return 1
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/healthz", timeout=10) as r:
                body = r.read().decode("utf-8", "replace")
                if r.status == 200:
                    print(body)
                    return 0
                last = f"{r.status} {body[:200]}"
        except urllib.error.HTTPError as exc:
            last = f"{exc.code} {exc.read().decode('utf-8', 'replace')[:200]}"
        except OSError as exc:
            last = str(exc)
        time.sleep(2)
    print(f"not healthy after {seconds:.0f} s: {last}", file=sys.stderr)
    return 1


def post_joke(url: str, image: Path) -> dict[str, object]:
    """One picture through POST /api/jokes: status, model version, text, seconds (never raises)."""
    boundary = uuid.uuid4().hex
    ctype = mimetypes.guess_type(image.name)[0] or "application/octet-stream"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{image.name}"'
            f"\r\nContent-Type: {ctype}\r\n\r\n"
        ).encode()
        + image.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    req = urllib.request.Request(
        url.rstrip("/") + "/api/jokes",
        data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        method="POST",
    )
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            status, answer = r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        status, answer = exc.code, {"error": exc.read().decode("utf-8", "replace")[:300]}
    except OSError as exc:
        status, answer = 0, {"error": str(exc)}
    out = {
        "status": status,
        "model_version": answer.get("model_version"),
        "text": answer.get("text"),
        "seconds": round(time.perf_counter() - started, 2),
    }
    if "error" in answer:
        out["error"] = answer["error"]
    return out


def joke(url: str, image: Path) -> int:
    out = post_joke(url, image)
    print(json.dumps(out, ensure_ascii=False))
    return 0 if out["status"] == 201 else 1


def load(url: str, images: Path, stop: Path, out: Path, concurrency: int = 4) -> int:
    """Continuous traffic while something else (a swap) happens; every failure is reported."""
    pictures = sorted(p for p in images.iterdir() if p.is_file())
    lock = threading.Lock()
    results: list[dict[str, object]] = []
    t0 = time.time()

    def worker(k: int) -> None:
        i = k
        while not stop.exists():
            r = post_joke(url, pictures[i % len(pictures)])
            r["t"] = round(time.time() - t0, 2)
            with lock:
                results.append(r)
                with out.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
            i += concurrency

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = [r for r in results if r["status"] != 201]
    seen: dict[str, list[float]] = {}
    for r in results:
        if r["status"] == 201:
            span = seen.setdefault(str(r["model_version"]), [float(r["t"]), float(r["t"])])  # type: ignore[arg-type]
            span[1] = float(r["t"])  # type: ignore[arg-type]
    summary = {
        "requests": len(results),
        "failed": len(failed),
        "failures_by_status": dict(Counter(str(r["status"]) for r in failed)),
        "first_failures": failed[:5],
        "versions_seen_s": seen,
        "seconds": round(time.time() - t0, 1),
    }
    print(json.dumps(summary, ensure_ascii=False))
    return 0 if not failed else 1


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "wait":
        seconds = float(argv[2]) if len(argv) > 2 else 300.0
        return wait(argv[1], seconds, int(argv[3]) if len(argv) > 3 else None)
    if len(argv) == 3 and argv[0] == "joke":
        return joke(argv[1], Path(argv[2]))
    if len(argv) in (5, 6) and argv[0] == "load":
        n = int(argv[5]) if len(argv) == 6 else 4
        return load(argv[1], Path(argv[2]), Path(argv[3]), Path(argv[4]), n)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
