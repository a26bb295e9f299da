"""Record real LMDeploy HTTP exchanges as replay fixtures for the CPU tests.

Run it against a live ``lmdeploy serve api_server`` (started with ``--api-keys KEY``, so that the
401 exchanges exist); it writes one ``NAME.json`` per exchange in the format
``tests/fakes/fake_lmdeploy.py`` replays (see ``tests/fixtures/lmdeploy/README.md``) with
``"source": "captured"``. Pictures and keys are summarised, never stored.

    python -m bench.capture_lmdeploy --base-url http://127.0.0.1:23333 --api-key KEY \\
        --out tests/fixtures/lmdeploy [--image photo.jpg] [--proxy-url http://127.0.0.1:8000] \\
        [--overload 64]

Exchanges (a name is written only when the server gave the kind of answer the name promises;
the summary printed at the end says which were kept): health, models, models_unauthorized,
chat_success, chat_stream_success, chat_template_leftovers (``skip_special_tokens: false`` +
``include_stop_str_in_output``: the stop word stays in the text), chat_unauthorized,
chat_bad_image, chat_context_too_long (40 tiles of a phone photo), chat_model_not_found,
chat_overloaded (``--overload N`` concurrent requests against a server started with
``--max-concurrent-requests`` small; the first 503), and through ``lmdeploy serve proxy``
(``--proxy-url``, the backend registered with its key but the proxy called without one):
proxy_ok_with_backend_401.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from bench.common import ROOT, jpeg_bytes, skimage_photos, write_json
from bench.common import chat_body as common_chat_body
from bot.engines.openai_http import to_data_url
from bot.settings import DEFAULT_PROMPT

KEEP_HEADERS = ("content-type", "www-authenticate", "retry-after")
#: Body fields a fixture's request summary has under their own names (the rest: under "extra").
SHOWN = ("model", "messages", "max_tokens", "temperature", "top_p")
#: Ask LMDeploy to leave the chat template's stop word in the text.
LEFTOVERS = dict(skip_special_tokens=False, include_stop_str_in_output=True, ignore_eos=False)
#: Whether an answer is the kind of exchange its name promises.
Want = Callable[[httpx.Response, Any], bool]


def photo_jpeg(path: Path | None, size: tuple[int, int] = (1344, 896)) -> bytes:
    from PIL import Image

    try:
        img = Image.open(path or skimage_photos() / "chelsea.png").convert("RGB")
    except (ImportError, OSError):
        if path is not None:  # the picture asked for: never a stand-in
            raise
        img = Image.new("RGB", size, (200, 160, 90))
    return jpeg_bytes(img.resize(size), quality=90)


def image_summary(url: str, mdp: int | None, jpeg: bytes | None) -> dict[str, Any]:
    """What a fixture keeps of a picture: never its bytes."""
    info: dict[str, Any] = {"scheme": url.split(",", 1)[0], "max_dynamic_patch": mdp}
    if jpeg is not None:
        info["bytes"] = len(jpeg)
        try:
            from PIL import Image

            with Image.open(io.BytesIO(jpeg)) as im:
                info["size"] = list(im.size)
            info["decodable"] = True
        except Exception:
            info["decodable"] = False
    return info


def chat_body(
    model: str, jpeg: bytes, *, mdp: int = 6, stream: bool = False, **extra: Any
) -> dict[str, Any]:
    return common_chat_body(model, jpeg, mdp, 32, stream=stream, **extra)


class Capturer:
    """Writes the exchanges that are what their names promise; notes the others."""

    def __init__(self, out: Path, version: str | None) -> None:
        self.out, self.version = out, version
        self.kept: list[str] = []
        self.skipped: list[str] = []

    def record(
        self,
        name: str,
        request: dict[str, Any],
        response: httpx.Response,
        *,
        want: Want,
        sse: bool = False,
        note: str = "",
    ) -> None:
        headers = {k: v for k, v in response.headers.items() if k.lower() in KEEP_HEADERS}
        resp: dict[str, Any] = {"status": response.status_code, "headers": headers}
        body: Any = None
        if sse:
            resp["sse"] = [line for line in response.text.splitlines() if line.strip()]
        else:
            try:
                body = resp["body"] = response.json()
            except ValueError:
                resp["body_text"] = response.text
        if not want(response, body):
            self.skipped.append(f"{name} (got {response.status_code}: {response.text[:120]!r})")
            return
        doc = {
            "name": name,
            "source": "captured",
            "lmdeploy_version": self.version,
            "captured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "note": note or "Recorded by bench/capture_lmdeploy.py from a live server.",
            "request": request,
            "response": resp,
        }
        self.kept.append(name)
        write_json(self.out / f"{name}.json", doc)


def status_is(*codes: int) -> Want:
    return lambda r, _body: r.status_code in codes


def refused(r: httpx.Response, _body: Any) -> bool:
    return r.status_code != 200


def has_error_code(code: int) -> Want:
    """The status, or (a proxy answering 200) the code in the body."""
    return lambda r, body: (
        r.status_code == code
        or (
            isinstance(body, dict)
            and (body.get("code") == code or (code == 401 and "nauthor" in r.text))
        )
    )


def capture(args: argparse.Namespace) -> Capturer:
    cap = Capturer(Path(args.out), args.lmdeploy_version)
    good = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    wrong = {"Authorization": "Bearer wrong-key"}
    base = args.base_url.rstrip("/")
    jpeg = photo_jpeg(Path(args.image) if args.image else None)
    big = photo_jpeg(Path(args.image) if args.image else None, size=(4032, 3024))

    def summary(method: str, path: str, auth: str, **more: Any) -> dict[str, Any]:
        return {"method": method, "path": path, "auth": auth, **more}

    with httpx.Client(timeout=args.timeout, trust_env=False) as client:
        r = client.get(base + "/health")
        cap.record("health", summary("GET", "/health", "none"), r, want=status_is(200))
        r = client.get(base + "/v1/models", headers=good)
        cap.record("models", summary("GET", "/v1/models", "good"), r, want=status_is(200))
        model = args.model or r.json()["data"][0]["id"]
        r = client.get(base + "/v1/models", headers=wrong)
        cap.record(
            "models_unauthorized", summary("GET", "/v1/models", "bearer"), r, want=status_is(401)
        )

        def chat(name: str, body: dict[str, Any], auth: dict[str, str], want: Want, *,
                 image: bytes | None = jpeg, url_base: str = base, note: str = "",
                 **more: Any) -> None:  # fmt: skip
            item = body["messages"][0]["content"][0]["image_url"]
            who = "good" if auth is good and auth else ("bearer" if auth else "none")
            extra = {k: v for k, v in body.items() if k not in SHOWN}
            req = summary("POST", "/v1/chat/completions", who, model=body["model"],
                          stream=body.get("stream", False), max_tokens=body.get("max_tokens"),
                          image=image_summary(item["url"], item.get("max_dynamic_patch"), image),
                          text=DEFAULT_PROMPT, extra=extra, **more)  # fmt: skip
            response = client.post(url_base + "/v1/chat/completions", json=body, headers=auth)
            cap.record(name, req, response, want=want, sse=bool(body.get("stream")), note=note)

        ok = status_is(200)
        chat("chat_success", chat_body(model, jpeg), good, ok)
        chat("chat_stream_success", chat_body(model, jpeg, stream=True), good, ok)
        note = "skip_special_tokens=false + include_stop_str_in_output: stop word left in text"
        chat("chat_template_leftovers", chat_body(model, jpeg, **LEFTOVERS), good, ok, note=note)
        chat("chat_unauthorized", chat_body(model, jpeg), wrong, status_is(401))
        garbage = b"this is not a picture at all"
        bad = chat_body(model, jpeg)
        bad["messages"][0]["content"][0]["image_url"]["url"] = to_data_url(garbage)
        chat("chat_bad_image", bad, good, refused, image=garbage)
        chat("chat_context_too_long", chat_body(model, big, mdp=40), good, refused, image=big)
        chat("chat_model_not_found", chat_body("no-such-model-oogiri", jpeg), good, refused)
        if args.overload:
            bodies = [chat_body(model, jpeg) for _ in range(args.overload)]

            def post(body: dict[str, Any]) -> httpx.Response:
                return client.post(base + "/v1/chat/completions", json=body, headers=good)

            with ThreadPoolExecutor(args.overload) as pool:
                answers = [a for a in pool.map(post, bodies) if a.status_code != 200]
            if answers:
                chat_req = summary("POST", "/v1/chat/completions", "good", concurrent=args.overload)
                cap.record("chat_overloaded", chat_req, answers[0], want=lambda r, _b: True)
            else:
                cap.skipped.append(f"chat_overloaded (all {args.overload} answered 200)")
        if args.proxy_url:
            chat("proxy_ok_with_backend_401", chat_body(model, jpeg), {}, has_error_code(401),
                 url_base=args.proxy_url.rstrip("/"), via="lmdeploy serve proxy",
                 note="The proxy answers HTTP 200 with the backend's 401 as its body.")  # fmt: skip
    return cap


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--model", default=None, help="default: the first of /v1/models")
    parser.add_argument("--image", default=None, help="a JPEG/PNG photo (default: skimage's cat)")
    parser.add_argument("--proxy-url", default=None)
    parser.add_argument("--overload", type=int, default=0)
    parser.add_argument("--lmdeploy-version", default=None)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--out", default=str(ROOT / "tests" / "fixtures" / "lmdeploy"))
    args = parser.parse_args(argv)
    if args.lmdeploy_version is None:
        with contextlib.suppress(Exception):
            import lmdeploy

            args.lmdeploy_version = lmdeploy.__version__
    cap = capture(args)
    print(json.dumps({"kept": cap.kept, "skipped": cap.skipped}, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
