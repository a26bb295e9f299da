"""A bounded, structured Hypothesis fuzz of the upload endpoint (the bytes-level fuzz of
bot/images.py is in tests/test_images.py).

Each example is a multipart request assembled from hostile parts — field names, file names,
declared types, bodies that are real pictures, mutated pictures or noise, hints of any Unicode,
broken boundaries and headers. Whatever comes in, the answer is one of the documented statuses
with a known error key and a message, never a 500, and the service keeps serving.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from hostile_cases import BOUNDARY, Part, fmt_bytes, jpeg_bytes, multipart_body
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from relreport import Reliability

from bot.models import MESSAGES
from plugins.web import WEB_MESSAGES, create_api

SEEDS = [fmt_bytes("PNG"), jpeg_bytes(), fmt_bytes("GIF"), fmt_bytes("WEBP"), b""]
KNOWN_KEYS = set(MESSAGES) | set(WEB_MESSAGES)
ALLOWED = {201, 400, 403, 408, 413, 415}


@st.composite
def payloads(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 4))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        data[at] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    if draw(st.booleans()):
        data += draw(st.binary(max_size=256))
    return bytes(data)


safe_text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters='"\r\n'), max_size=40
)
parts = st.builds(
    Part,
    name=st.sampled_from(["image", "hint", "image", "other", ""]),
    data=payloads() | st.text(max_size=300).map(str.encode),
    filename=st.none() | safe_text,
    content_type=st.none()
    | st.sampled_from(
        ["image/png", "image/jpeg", "text/plain", "application/x-msdownload", "image/png; x=1"]
    ),
)
good_type = f"multipart/form-data; boundary={BOUNDARY}"
content_types = st.sampled_from(
    [
        good_type,
        good_type,
        good_type,
        good_type,
        f"multipart/form-data; boundary={BOUNDARY}; charset=latin-1",
        "multipart/form-data",
        "multipart/form-data; boundary=",
        "multipart/form-data; boundary=other",
        "image/png",
        "application/json",
    ]
)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about broken EXIF/TIFF tags
async def test_fuzzed_uploads_get_a_documented_answer(make_app, reliability: Reliability) -> None:
    reliability.case(
        "hostile input (web)", "hypothesis-upload-fuzz", "fuzz",
        "300 Hypothesis-built multipart requests (mutated pictures, noise, odd names/types)",
        "201 or a documented 4xx with a known key; never 500",
    )  # fmt: skip
    # One client sends everything: the per-user and per-network limits are not under test here.
    app = await make_app(
        limits={"per_user_per_minute": 0},
        web={"uploads_per_ip_per_minute": 0, "new_sessions_per_ip_per_hour": 0},
    )
    seen: dict[int, int] = {}

    loop = asyncio.get_running_loop()
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_api(app)), base_url="http://testserver"
    ) as client:

        async def post(body: bytes, ctype: str) -> httpx.Response:
            return await client.post("/api/jokes", content=body, headers={"Content-Type": ctype})

        # Hypothesis drives synchronous functions: it runs in a worker thread and hands each
        # request to the test's event loop, where the App lives.
        @hsettings(
            max_examples=300,
            deadline=None,
            derandomize=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        )
        @given(
            first=st.builds(Part, name=st.just("image"), data=payloads(), filename=safe_text),
            body_parts=st.lists(parts, max_size=3),
            ctype=content_types,
            tail=st.sampled_from([True, True, True, False]),
        )
        def one(first: Part, body_parts: list[Part], ctype: str, tail: bool) -> None:
            body = multipart_body((first, *body_parts))
            if not tail:
                body = body[: len(body) // 2]
            r = asyncio.run_coroutine_threadsafe(post(body, ctype), loop).result(timeout=30)
            seen[r.status_code] = seen.get(r.status_code, 0) + 1
            assert r.status_code in ALLOWED, r.text
            payload = r.json()
            if r.status_code != 201:
                assert payload["error"] in KNOWN_KEYS and payload["message"]

        with reliability.measure(time_limit_s=120):
            await asyncio.to_thread(one)
        good = await client.post(
            "/api/jokes", files={"image": ("ok.png", fmt_bytes("PNG"), "image/png")}
        )
        assert good.status_code == 201
    reliability.observe(", ".join(f"{k} ×{v}" for k, v in sorted(seen.items())))
