"""Prefix caching must never answer one picture from another picture's cached prefix (issue 20).

Every InternVL2 image becomes the same run of ``<IMG_CONTEXT>`` token ids; only the image's
features differ. A prefix cache keyed on token ids alone would match picture B's prompt to
picture A's cached blocks and tell B's user a joke about A's picture. LMDeploy 0.18's PyTorch
engine hashes multimodal content into its cache keys; this test checks that it works for the
project's InternVL2 layout, with greedy decoding (deterministic answers) and logprobs:

1. A, then B (A with one 64×64 block inverted: a near-duplicate), then A again: A's answer is the
   same both times; B's is not A's (text or logprobs differ; bit-identical logprobs would mean B
   reused A's image blocks).
2. A burst of many different pictures, each answered once alone first: in the burst every picture
   gets its own answer back (same first tokens), and no two pictures' answers are bit-identical.

LMDeploy 0.18 itself switches prefix caching off for InternVL's (legacy-preprocess) path and logs
"Prefix caching is disabled for this VL model path": there the test passes because nothing is
cached; it matters for a later LMDeploy that caches pictures.

Skips without CUDA, LMDeploy or a model (``OOGIRI_GPU_MODEL``: an InternVL2-layout folder). Run::

    OOGIRI_GPU_MODEL=/tmp/oogiri-full-internvl2 python -m pytest tests/gpu/test_prefix_caching.py

``check(url, model_name)`` does the same against a running server started with
``--enable-prefix-caching --logprobs-mode raw_logprobs`` (without a logprobs mode LMDeploy 0.18
answers 400 to ``logprobs``); bench/goodput.py runs it as a plan step in the device call.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import io
import os
import random
from pathlib import Path
from typing import Any

import httpx
import pytest

GREEDY_TOKENS = 24
SAME_PREFIX_TOKENS = 8  # batching may move a late near-tie; a wrong prefix changes token one
PROMPT = "请你根据这张图片，讲一个脑洞大开的梗"


def why_skip() -> str | None:
    if importlib.util.find_spec("lmdeploy") is None:
        return "lmdeploy is not importable"
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not os.environ.get("OOGIRI_GPU_MODEL"):
        return "set OOGIRI_GPU_MODEL to an InternVL2-layout model folder"
    return None


def pictures(count: int, photos_dir: Path | None = None) -> list[bytes]:
    """Pictures 0, 1 are A and its near-duplicate B; the rest are distinct variants."""
    from PIL import Image, ImageOps

    if photos_dir is None:
        import skimage

        photos_dir = Path(skimage.__file__).parent / "data"
    names = ("chelsea.png", "astronaut.png", "coffee.png", "rocket.jpg", "motorcycle_left.png")
    base = [Image.open(photos_dir / n).convert("RGB").resize((1344, 896)) for n in names]
    rng = random.Random(7)
    out = []
    for i in range(count):
        img = base[0 if i < 2 else i % len(base)].copy()
        if i >= 1:  # invert one 64×64 block somewhere: same photo, different picture
            x, y = rng.randrange(0, 1344 - 64), rng.randrange(0, 896 - 64)
            box = (x, y, x + 64, y + 64)
            img.paste(ImageOps.invert(img.crop(box)), box)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def body(model_name: str, jpeg: bytes) -> dict[str, Any]:
    url = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
    return {
        "model": model_name,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url, "max_dynamic_patch": 6}},
                    {"type": "text", "text": PROMPT},
                ],
            }
        ],
        "max_tokens": GREEDY_TOKENS,
        "temperature": 0.0,
        "top_k": 1,
        "ignore_eos": True,
        "min_new_tokens": GREEDY_TOKENS,
        "logprobs": True,
        "top_logprobs": 1,
    }


class ServerRefused(RuntimeError):
    """The api_server answered with an error; the message carries its reason."""


async def ask(client: httpx.AsyncClient, url: str, model_name: str, jpeg: bytes) -> dict:
    r = await client.post(url + "/v1/chat/completions", json=body(model_name, jpeg))
    if r.status_code != 200:
        # LMDeploy says why in the body (0.18: "Logprobs(True)/top_logprobs(1) requested but not
        # enabled logprobs_mode in engine configuration" without --logprobs-mode): keep it
        try:
            reason = r.json().get("message") or r.text
        except ValueError:
            reason = r.text
        raise ServerRefused(f"HTTP {r.status_code} from {url}/v1/chat/completions: {reason[:300]}")
    data = r.json()
    choice = data["choices"][0]
    content = ((choice.get("logprobs") or {}).get("content")) or []
    usage = data.get("usage") or {}
    return {
        "text": choice["message"]["content"],
        "tokens": [c.get("token") for c in content],
        "logprobs": [c.get("logprob") for c in content],
        "cached_tokens": ((usage.get("prompt_tokens_details") or {}).get("cached_tokens")) or 0,
        "prompt_tokens": usage.get("prompt_tokens"),
    }


def same_answer(a: dict, b: dict) -> bool:
    if a["tokens"] and b["tokens"]:
        return a["tokens"][:SAME_PREFIX_TOKENS] == b["tokens"][:SAME_PREFIX_TOKENS]
    return a["text"][:16] == b["text"][:16]


def identical(a: dict, b: dict) -> bool:
    """Bit-identical answers: what a shared image prefix produces."""
    return a["text"] == b["text"] and a["logprobs"] == b["logprobs"]


async def check(
    url: str, model_name: str, *, burst: int = 24, photos_dir: Path | None = None
) -> dict[str, Any]:
    pics = pictures(max(burst, 2), photos_dir)
    async with httpx.AsyncClient(timeout=300, trust_env=False) as client:
        a1 = await ask(client, url, model_name, pics[0])
        b = await ask(client, url, model_name, pics[1])
        a2 = await ask(client, url, model_name, pics[0])
        refs = [a1, b] + [await ask(client, url, model_name, p) for p in pics[2:burst]]
        order = list(range(burst)) * 2
        random.Random(3).shuffle(order)
        answers = await asyncio.gather(*(ask(client, url, model_name, pics[i]) for i in order))
    return verdict(a1, b, a2, refs, order, answers)


def verdict(
    a1: dict, b: dict, a2: dict, refs: list[dict], order: list[int], answers: list[dict]
) -> dict[str, Any]:
    """The check's judgement of the answers (pure: tested on CPU with made-up answers).

    Batched greedy decoding may drift from a batch-of-one answer (kernels differ with batch
    size; on random weights near-tied logits flip), so drifting from one's own reference is
    reported, not failed. A cache leak is what fails: an answer bit-identical (text and
    logprobs) to another picture's reference and not to its own."""
    burst = len(refs)
    mismatched = [i for i, ans in zip(order, answers, strict=True) if not same_answer(ans, refs[i])]
    borrowed = [
        (i, j)
        for i, ans in zip(order, answers, strict=True)
        for j in range(burst)
        if j != i and identical(ans, refs[j]) and not identical(ans, refs[i])
    ]
    twins = [
        (i, j) for i in range(burst) for j in range(i + 1, burst) if identical(refs[i], refs[j])
    ]
    checks = {
        "A again gives A's answer": same_answer(a1, a2),
        "B (A's near-duplicate) is not answered from A's prefix": not identical(a1, b),
        "burst: no answer is another picture's (bit-identical)": not borrowed,
        "burst: no two pictures' answers are bit-identical": not twins,
        "logprobs returned": bool(a1["logprobs"]),
    }
    return {
        "ok": all(checks.values()),
        "checks": checks,
        "a_first": a1["text"][:80],
        "b": b["text"][:80],
        "a_again": a2["text"][:80],
        "cached_tokens_a_again": a2["cached_tokens"],
        "cached_tokens_burst_max": max((x["cached_tokens"] for x in answers), default=0),
        "prompt_tokens": a1["prompt_tokens"],
        "burst": burst,
        "burst_requests": len(order),
        "drifted_from_own_reference": len(mismatched),
        "mismatched": mismatched[:10],
        "borrowed": borrowed[:10],
        "bit_identical_pairs": twins[:10],
    }


@pytest.mark.skipif(why_skip() is not None, reason=why_skip() or "")
async def test_prefix_caching_never_mixes_pictures(tmp_path: Path) -> None:
    from bench.serve import SERVED_NAME, Launch, launch_servers

    launch = Launch(
        servers=1, extra_args=["--enable-prefix-caching", "--logprobs-mode", "raw_logprobs"]
    )
    model = Path(os.environ["OOGIRI_GPU_MODEL"])
    started = await launch_servers(launch, model, 24600, tmp_path / "logs", 420)
    try:
        result = await check("http://127.0.0.1:24600", SERVED_NAME)
    finally:
        await started.stop(grace_s=10)
    log = started.servers[0].log_path.read_text(errors="replace")
    # LMDeploy 0.18 turns caching off for InternVL's path: then the test proves only that
    # nothing is shared, and says so
    result["lmdeploy_disabled_caching"] = "Prefix caching is disabled" in log
    print(result)
    assert result["ok"], result


async def test_the_check_catches_a_server_that_answers_every_picture_alike() -> None:
    """The fake api_server ignores the picture: exactly what a false cache hit looks like."""
    from tests.fakes.fake_lmdeploy import FakeLMDeploy

    with FakeLMDeploy() as fake:
        result = await check(fake.url, "fake-internvl2", burst=4)
    assert not result["ok"]
    assert not result["checks"]["B (A's near-duplicate) is not answered from A's prefix"]
    assert result["bit_identical_pairs"]


# --------------------------------------------------------------------------- on CPU


def _answer(text: str, logprobs: list[float], tokens: list[str] | None = None) -> dict:
    tokens = tokens if tokens is not None else list(text)
    return {
        "text": text,
        "tokens": tokens,
        "logprobs": logprobs,
        "cached_tokens": 0,
        "prompt_tokens": 1863,
    }


def test_drift_is_reported_and_a_borrowed_answer_fails() -> None:
    refs = [_answer(f"picture {i} joke", [-0.1 * (i + 1)] * 3) for i in range(4)]
    order = [0, 1, 2, 3, 0, 1, 2, 3]
    # batched decoding drifted late for picture 2 (same first tokens, other logprobs): fine
    drift = _answer("picture 2 joke!", [-0.31, -0.3, -0.3])
    answers = [refs[i] for i in order]
    answers[2] = drift
    honest = verdict(refs[0], refs[1], refs[0], refs, order, answers)
    assert honest["ok"], honest
    assert honest["drifted_from_own_reference"] == 0  # first tokens agree: not even drift
    answers[6] = _answer("something else", [-9.0])
    honest = verdict(refs[0], refs[1], refs[0], refs, order, answers)
    assert honest["ok"] and honest["drifted_from_own_reference"] == 1
    # picture 3 answered with picture 1's bit-identical answer: what a shared prefix does
    answers[7] = refs[1]
    leak = verdict(refs[0], refs[1], refs[0], refs, order, answers)
    assert not leak["ok"]
    assert not leak["checks"]["burst: no answer is another picture's (bit-identical)"]
    assert leak["borrowed"] == [(3, 1)]
    # B answered from A's prefix
    b_leak = verdict(refs[0], refs[0], refs[0], refs, order, [refs[i] for i in order])
    assert not b_leak["checks"]["B (A's near-duplicate) is not answered from A's prefix"]


async def test_a_server_without_logprobs_mode_is_refused_with_its_reason(tmp_path: Path) -> None:
    """The first device run stopped at a bare "400 Bad Request": LMDeploy 0.18 refuses
    logprobs unless the server runs with --logprobs-mode. The check now says so."""
    import json

    message = (
        "Logprobs(True)/top_logprobs(1) requested but not enabled logprobs_mode in engine "
        "configuration"
    )
    fixture = {
        "name": "chat_logprobs_off",
        "response": {
            "status": 400,
            "headers": {"content-type": "application/json"},
            "body": {"message": message, "type": "invalid_request_error", "code": 400},
        },
    }
    (tmp_path / "chat_logprobs_off.json").write_text(json.dumps(fixture))
    from tests.fakes.fake_lmdeploy import FakeLMDeploy

    with FakeLMDeploy(fixtures_dir=tmp_path, script=[{"fixture": "chat_logprobs_off"}]) as fake:
        with pytest.raises(ServerRefused, match=r"400 .*logprobs_mode"):
            await check(fake.url, "fake-internvl2", burst=2)


def test_it_skips_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    fake_torch = types.ModuleType("torch")
    fake_torch.cuda = types.SimpleNamespace(is_available=lambda: False)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    monkeypatch.setenv("OOGIRI_GPU_MODEL", "/nowhere")
    assert why_skip() == "no CUDA device"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert why_skip() == "lmdeploy is not importable"
