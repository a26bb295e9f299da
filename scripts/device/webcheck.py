#!/usr/bin/env python3
"""Talk to a running ``oogiri serve`` over its web API, standard library only (device scripts).

``webcheck.py wait URL [SECONDS [PID]]`` polls URL/healthz until it answers 200; exit 1 on
timeout, or as soon as process PID (the server) is gone.

``webcheck.py joke URL IMAGE`` posts the picture to URL/api/jokes and prints one JSON line:
``{"status", "model_version", "text", "seconds"}``.
"""

from __future__ import annotations

import json
import mimetypes
import os
import sys
import time
import urllib.error
import urllib.request
import uuid
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


def joke(url: str, image: Path) -> int:
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
    print(json.dumps(out, ensure_ascii=False))
    return 0 if status == 201 else 1


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "wait":
        seconds = float(argv[2]) if len(argv) > 2 else 300.0
        return wait(argv[1], seconds, int(argv[3]) if len(argv) > 3 else None)
    if len(argv) == 3 and argv[0] == "joke":
        return joke(argv[1], Path(argv[2]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
