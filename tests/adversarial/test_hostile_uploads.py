"""Every row of the hostile-input table through the web API (ASGI, a real App, instant engine).

Each case asserts the exact answer (status, error key and the user's message in English and
Chinese), that the service still serves a good picture right after it, that nothing half-stored
was left behind, and that time and the process's peak RSS stayed bounded (relreport.py says
exactly what is measured).
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator

import httpx
import pytest
from hostile_cases import (
    BOUNDARY,
    CASES,
    STREAM_HEAD,
    Case,
    Stored,
    Upload,
    fmt_bytes,
    multipart_body,
)
from PIL import Image
from relreport import Reliability
from sqlalchemy import select

from bot.models import message
from bot.store import JokeRow
from plugins.web import MULTIPART_SLACK, create_api, web_message

BASE = "http://testserver"


class Streamed:
    """A generated body (a file-part header, then zeros) that counts what the server pulled."""

    def __init__(self, total: int, chunk: int = 256 * 1024) -> None:
        self.total, self.chunk, self.pulled = total, chunk, 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self.pulled += len(STREAM_HEAD)
        yield STREAM_HEAD
        zeros = bytes(self.chunk)
        while self.pulled < self.total:
            piece = zeros[: min(self.chunk, self.total - self.pulled)]
            self.pulled += len(piece)
            yield piece


async def send(client: httpx.AsyncClient, up: Upload, lang: str) -> tuple[httpx.Response, int]:
    """POST the upload; returns the response and how many body bytes the server pulled."""
    headers = {"Accept-Language": lang, "Origin": BASE}
    if up.stream_total is not None:
        body = Streamed(up.stream_total)
        headers["Content-Type"] = f"multipart/form-data; boundary={BOUNDARY}"
        if up.declare_length:
            headers["Content-Length"] = str(up.stream_total)
        response = await client.post("/api/jokes", content=body, headers=headers)
        return response, body.pulled
    if up.raw is not None:
        headers["Content-Type"] = up.content_type or "application/octet-stream"
        response = await client.post("/api/jokes", content=up.raw, headers=headers)
        return response, len(up.raw)
    raw = multipart_body(up.parts)
    headers["Content-Type"] = f"multipart/form-data; boundary={BOUNDARY}"
    response = await client.post("/api/jokes", content=raw, headers=headers)
    return response, len(raw)


def expected_message(case: Case, lang: str) -> str:
    assert case.key is not None
    return web_message(case.key, lang, **case.params)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_hostile_upload(case: Case, make_app, reliability: Reliability) -> None:
    reliability.case("hostile input (web)", case.id, case.kind, case.what, case.expected)
    app = await make_app(**case.settings)
    up = case.build()
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_api(app)), base_url=BASE
    ) as client:
        with reliability.measure(time_limit_s=case.time_limit_s):
            response, pulled = await send(client, up, "en")
        body = response.json()
        reliability.observe(
            f"{response.status_code} {body.get('error', 'joke')}", body_bytes_read=pulled
        )
        assert response.status_code == case.status, body
        if case.key is not None:
            assert body == {"error": case.key, "message": expected_message(case, "en")}
            assert app.engine.prompts == []  # refused before the engine was asked
            async with app.store.session() as s:
                assert (await s.execute(select(JokeRow))).first() is None
            if up.stream_total is None and up.raw is None:  # small enough to send twice
                zh, _ = await send(client, up, "zh")
                assert zh.status_code == case.status
                assert zh.json() == {"error": case.key, "message": expected_message(case, "zh")}
        else:
            expected_keys = {"id", "text", "model_version", "up", "down", "demo"}
            assert set(body) == expected_keys and body["text"]
            joke = await app.store.get_joke_by_public_id(body["id"])
            async with app.store.session() as s:
                row = await s.get(JokeRow, joke.id)
                assert row is not None
                hint, prompt = row.hint, row.prompt
            path = app.store.image_path(joke.image_sha256)
            stored = Stored(
                body=body,
                image=path.read_bytes(),
                image_path=path,
                images_dir=app.store.images_dir,
                hint=hint,
                prompt=prompt,
                engine_prompts=app.engine.prompts,
                default_prompt=app.settings.prompt,
            )
            with Image.open(io.BytesIO(stored.image)) as im:  # a clean RGB JPEG, nothing else
                assert (im.format, im.mode) == ("JPEG", "RGB")
                assert max(im.size) <= app.settings.images.max_side
            if case.check is not None:
                case.check(stored)
        if up.stream_total is not None:
            limit = app.settings.images.max_bytes + MULTIPART_SLACK
            if up.declare_length:
                assert pulled == 0, "the body was read although Content-Length said 100 MB"
            else:
                assert pulled <= limit + 2 * 256 * 1024, pulled
        # no temporary files left behind by the atomic image writes
        assert not list(app.store.images_dir.rglob(".tmp-*"))
        # and the service is fine: the next good picture still gets a joke
        good = await client.post(
            "/api/jokes", files={"image": ("ok.png", fmt_bytes("PNG"), "image/png")}
        )
        assert good.status_code == 201, good.text


def test_the_table_covers_the_issue() -> None:
    """At least 30 kinds, and every family the issue names."""
    assert len(CASES) >= 30
    kinds = {c.kind for c in CASES}
    assert {"truncated", "bomb", "polyglot", "metadata", "size", "mime", "non-image"} <= kinds
    assert {"animated", "aspect", "hint", "injection"} <= kinds
    truncated = {c.id.split("-")[0] for c in CASES if c.kind == "truncated"}
    assert {"jpeg", "png", "gif", "webp", "bmp", "tiff"} <= truncated  # every accepted format
    bombs = {c.id.split("-")[0] for c in CASES if c.kind == "bomb"}
    assert {"png", "gif", "webp", "tiff"} <= bombs
    assert message("too_large", "en", limit_mb=20)  # the key every size case expects exists


PG_CASES = [c for c in CASES if c.kind in ("hint", "injection") and c.key is None]


@pytest.mark.postgres
@pytest.mark.parametrize("case", PG_CASES, ids=[c.id for c in PG_CASES])
async def test_hostile_hint_on_postgres(
    case: Case, pg_database: str, make_app, reliability: Reliability
) -> None:
    """The hint rows again on PostgreSQL, which refuses NUL in text: before the hint was
    cleaned, such a joke was lost after the engine had answered (a 503 'engine error')."""
    from sqlalchemy.ext.asyncio import create_async_engine

    reliability.case(
        "hostile input (web, PostgreSQL)", case.id, case.kind, case.what, case.expected
    )
    engine = create_async_engine(pg_database)
    async with engine.begin() as conn:
        await conn.exec_driver_sql("DROP SCHEMA public CASCADE")
        await conn.exec_driver_sql("CREATE SCHEMA public")
    await engine.dispose()
    app = await make_app(store={"url": pg_database})
    up = case.build()
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_api(app)), base_url=BASE
    ) as client:
        with reliability.measure(time_limit_s=case.time_limit_s):
            response, _ = await send(client, up, "en")
    reliability.observe(f"{response.status_code} {response.json().get('error', 'joke')}")
    assert response.status_code == 201, response.text
    async with app.store.session() as s:
        joke = await app.store.get_joke_by_public_id(response.json()["id"])
        row = await s.get(JokeRow, joke.id)
        assert row is not None and "\x00" not in (row.hint or "") + row.prompt
