"""bench.common: the one percentile definition, the load generators, the Zipf workload, the
pictures every bench sends and the result files and headers they write."""

from __future__ import annotations

import asyncio
import io
import json
import platform
import random
import socket
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import bench.common as common
from bench.common import (
    Failed,
    Sample,
    Sampler,
    append_jsonl,
    at_offsets,
    chat_body,
    closed_loop,
    free_port,
    latency_summary,
    machine,
    markdown_table,
    open_loop,
    percentile,
    photo_jpegs,
    poisson_arrivals,
    source_photos,
    timed,
    write_json,
    write_section,
    zipf_indices,
)


def test_percentile_is_numpys_linear_definition() -> None:
    rng = random.Random(1)
    for n in (1, 2, 7, 100):
        values = [rng.uniform(0, 10) for _ in range(n)]
        for q in (0.0, 0.5, 0.95, 0.99, 1.0):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q * 100)))
    assert percentile([], 0.5) is None
    with pytest.raises(ValueError):
        percentile([1.0], 95)  # a percent where a fraction is meant


def test_latency_summary_counts_the_share_within_the_slo() -> None:
    summary = latency_summary([0.5, 1.0, 1.5, 2.0, 3.0], slo_s=2.0)
    assert summary["within_slo"] == 0.8
    low, high = summary["within_slo_ci"]
    assert low < 0.8 < high


def test_poisson_arrivals_have_the_asked_rate() -> None:
    arrivals = poisson_arrivals(50.0, 200.0, seed=3)
    assert len(arrivals) / 200.0 == pytest.approx(50.0, rel=0.05)
    gaps = np.diff(arrivals)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.1)  # exponential: CV 1


def test_zipf_puts_the_head_where_the_law_says() -> None:
    n = 20_000
    counts = Counter(zipf_indices(n, 100, 1.0, seed=0))
    harmonic = sum(1 / k for k in range(1, 101))
    assert counts[0] / n == pytest.approx(1 / harmonic, rel=0.08)
    assert counts[0] / counts[1] == pytest.approx(2.0, rel=0.15)
    assert len(set(zipf_indices(500, 5, 0.0))) == 5  # s = 0: uniform


async def test_open_loop_keeps_arriving_while_the_server_is_slow() -> None:
    """A closed loop would wait for answers; an open loop must not, and must report them late."""
    in_flight = 0
    peak = 0

    async def slow(_i: int) -> Sample:
        nonlocal in_flight, peak
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.3)
        in_flight -= 1
        return Sample(t0, loop.time(), True)

    samples, achieved = await open_loop(slow, rate=100.0, duration_s=1.0, seed=1)
    assert achieved == pytest.approx(100.0, rel=0.3)
    assert peak > 10  # ~30 overlap at 100/s × 0.3 s; a closed loop of 1 would show 1
    assert all(s.ok and s.latency >= 0.29 for s in samples)


async def test_open_loop_counts_unanswered_requests_as_failures() -> None:
    async def never(_i: int) -> Sample:
        await asyncio.sleep(60)
        raise AssertionError

    samples, _ = await open_loop(never, rate=20.0, duration_s=0.5, drain_s=0.2)
    assert samples and not any(s.ok for s in samples)
    assert {s.error for s in samples} == {"drain timeout"}


async def test_closed_loop_counts_only_the_window() -> None:
    async def quick(_i: int) -> Sample:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await asyncio.sleep(0.05)
        return Sample(t0, loop.time(), True)

    samples, w0, w1 = await closed_loop(quick, inflight=4, warmup_s=0.2, measure_s=0.5)
    assert all(w0 <= s.end <= w1 for s in samples)
    assert len(samples) == pytest.approx(4 * 0.5 / 0.05, rel=0.35)


def test_write_section_replaces_only_its_own_section(tmp_path: Path) -> None:
    doc = tmp_path / "b.md"
    write_section("a", "A", markdown_table(["x"], [[1.5]]), doc)
    write_section("b", "B", "bee", doc)
    write_section("a", "A", "again", doc)
    text = doc.read_text()
    assert "again" in text and "1.50" not in text and "bee" in text


def test_latency_summary_in_milliseconds_with_spread() -> None:
    summary = latency_summary([0.005, 0.001, 0.004, 0.002, 0.003], unit="ms", spread=True)
    assert summary == {
        "n": 5, "p50_ms": 3.0, "p95_ms": 4.8, "p99_ms": 5.0, "max_ms": 5.0, "mean_ms": 3.0,
    }  # fmt: skip
    empty = latency_summary([], unit="ms", spread=True)
    assert empty["n"] == 0 and empty["p95_ms"] is None and empty["max_ms"] is None


async def test_timed_turns_outcomes_into_samples() -> None:
    async def answered() -> dict[str, int]:
        return {"prompt_tokens": 7, "completion_tokens": 3}

    async def refused() -> None:
        raise Failed("503")

    async def broken() -> None:
        raise ValueError("not JSON")

    ok = await timed(answered)
    assert ok.ok and (ok.prompt_tokens, ok.completion_tokens) == (7, 3) and ok.latency >= 0
    assert [(s.ok, s.error) for s in (await timed(refused), await timed(broken))] == [
        (False, "503"),
        (False, "ValueError"),
    ]


def test_photo_jpegs_are_distinct_real_photos_of_the_asked_size() -> None:
    pytest.importorskip("skimage")
    from PIL import Image

    jpegs = photo_jpegs(7, size=(64, 48))  # more than the five photos: copies must differ
    assert len(set(jpegs)) == 7
    assert {Image.open(io.BytesIO(j)).size for j in jpegs} == {(64, 48)}


def test_source_photos_reads_a_folder_in_name_order(tmp_path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (30, 20), "red").save(tmp_path / "b.png")
    Image.new("L", (10, 10)).save(tmp_path / "a.jpg")
    (tmp_path / "notes.txt").write_text("not a picture")
    images = source_photos(tmp_path, names=None)
    assert [(im.size, im.mode) for im in images] == [((10, 10), "RGB"), ((30, 20), "RGB")]
    assert [im.size for im in source_photos(tmp_path, names=["b.png"])] == [(30, 20)]


def test_result_files(tmp_path: Path) -> None:
    path = write_json(tmp_path / "new" / "r.json", {"where": tmp_path, "text": "梗"})
    assert json.loads(path.read_text()) == {"where": str(tmp_path), "text": "梗"}
    assert "梗" in path.read_text()  # readable, not \\u escapes
    lines = tmp_path / "r.jsonl"
    append_jsonl(lines, {"cell": 1})
    append_jsonl(lines, {"cell": 2})
    assert [json.loads(x)["cell"] for x in lines.read_text().splitlines()] == [1, 2]


def test_headers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert machine().endswith(f"cores, Python {platform.python_version()}")
    assert machine(cpu_model=True).endswith(platform.system())
    monkeypatch.setattr(common, "ROOT", tmp_path)  # no .git: the device's copy of the tree
    monkeypatch.setenv("OOGIRI_COMMIT", "abc1234")
    assert common.git_commit() == "abc1234"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", free_port()))  # free: binding it works


async def test_at_offsets_paces_a_stream_whatever_the_consumer_does() -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    seen = []
    async for i in at_offsets([i / 20 for i in range(5)], t0):  # 20/s
        seen.append((i, loop.time() - t0))
        if i == 1:
            await asyncio.sleep(0.12)  # a slow consumer: the next ones are due, not re-spaced
    assert [i for i, _ in seen] == [0, 1, 2, 3, 4]
    assert seen[3][1] - seen[2][1] < 0.03  # both were due: back to back, not re-spaced
    assert seen[4][1] >= 0.19  # and none early


async def test_sampler_keeps_what_it_read_while_started_and_skips_failed_reads() -> None:
    reads = iter([1.0, None, RuntimeError("gone"), 4.0, 5.0, 6.0, 7.0, 8.0])

    def read() -> float | None:
        value = next(reads)
        if isinstance(value, Exception):
            raise value
        return value

    loop = asyncio.get_running_loop()
    sampler = Sampler(read, every_s=0.02).start()
    await asyncio.sleep(0.09)
    middle = loop.time()
    await asyncio.sleep(0.04)
    await sampler.stop()
    values = sampler.values()
    assert values[:2] == [1.0, 4.0] and None not in values
    later = sampler.values(start=middle)  # a window: split at a time, nothing lost or doubled
    assert later and sampler.values(end=middle) + later == values
    count = len(sampler.samples)
    await asyncio.sleep(0.05)
    assert len(sampler.samples) == count  # stopped means stopped


def test_chat_body_is_lmdeploys_request_with_one_picture() -> None:
    body = chat_body("m", b"\xff\xd8jpeg", 6, 64, ignore_eos=True)
    picture, text = body["messages"][0]["content"]
    assert picture["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert picture["image_url"]["max_dynamic_patch"] == 6
    assert text["text"] and (body["max_tokens"], body["ignore_eos"]) == (64, True)
    assert chat_body("m", b"x", 1, 1, prompt="hint")["messages"][0]["content"][1]["text"] == "hint"
