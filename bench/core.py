"""Core overhead: images/s through JokeService (validate, normalise, store), instant engine.

Not a test: it measures. Writes bench/results/core-<store>[-phone-floor<f>].json and the "Core"
section of docs/benchmarks.md (every core-*.json). Usage:
python -m bench.core [--images 400] [--concurrency 8] [--store URL] [--phone --draft-floor F]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import bot.images
from bench.common import (
    RESULTS,
    latency_summary,
    machine,
    photo_jpegs,
    rusage_self,
    write_json,
    write_section,
)
from bot.app import App
from bot.engines.instant import InstantEngine
from bot.models import JokeRequest
from bot.plugins import make_manager
from bot.settings import Settings

PHONE = (4032, 3024)  # a 12 MP phone photo: the upload the serving benchmark sends


async def run(n_images: int, concurrency: int, store_url: str | None, phone: bool) -> dict:
    """``n_images`` distinct JPEGs (~1 MP or phone-sized: no dedupe serves one for another)
    through ``concurrency`` workers; the warm-up call (imports, first connection) not timed."""
    payloads = photo_jpegs(n_images, PHONE if phone else (1155, 866), workers=2)
    limits = {"per_user_per_minute": 0, "per_chat_per_minute": 0, "max_concurrency": concurrency}
    store: dict[str, Any] = {"store": {"url": store_url}} if store_url else {}
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(_env_file=None, data_dir=Path(tmp), limits=limits, **store)
        app = await App.create(settings, pm=make_manager([]), engine=InstantEngine())
        queue = list(reversed(payloads))
        latencies: list[float] = []

        async def tell(data: bytes, user: str) -> None:
            await app.service.tell(JokeRequest(image_bytes=data, channel="bench", user_id=user))

        async def worker(w: str) -> None:
            while queue:
                data, t0 = queue.pop(), time.perf_counter()
                await tell(data, w)
                latencies.append(time.perf_counter() - t0)

        await tell(payloads[0], "w")
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(f"bench:{w}") for w in range(concurrency)))
        elapsed = time.perf_counter() - t0
        outcomes = await app.store.request_outcomes()
        await app.close()
    lat = latency_summary(latencies, unit="ms")
    return {
        "images": n_images,
        "concurrency": concurrency,
        "store": "postgresql" if store_url else "sqlite",
        "photo": "phone" if phone else "1mp",
        "seconds": round(elapsed, 3),
        "images_per_s": round(n_images / elapsed, 1),
        "p50_ms": lat["p50_ms"],
        "p95_ms": lat["p95_ms"],
        "peak_rss_mb": rusage_self()["peak_rss_mb"],
        "outcomes": outcomes,
        "image_bytes_mean": int(statistics.mean(len(p) for p in payloads)),
    }


def render(results: list[dict[str, Any]]) -> str:
    """The section: every result's row (images/s in bold)."""
    columns = "store|photos|JPEG draft floor|images|in flight|images/s|p50 ms|p95 ms|peak RSS MB"
    rows = [columns.split("|"), ["---"] * 9]
    for r in results:
        phone = r.get("photo") == "phone"
        floor = r.get("draft_floor", "–") if phone else "–"
        cells = [r["store"], "12 MP phone" if phone else "1 MP", floor, r["images"]]
        cells += [r["concurrency"], f"**{r['images_per_s']}**", r["p50_ms"], r["p95_ms"]]
        rows.append([str(c) for c in [*cells, r["peak_rss_mb"]]])
    machines = ", ".join(sorted({r["machine"] for r in results}))
    return (
        "JokeService with the instant engine on distinct JPEGs (validate + normalise + store). "
        f"Machine: {machines}. Goal: >= 200 images/s (1 MP). Phone photos: the 4032×3024 uploads "
        "the serving benchmark sends; draft floor 1.0 is the exact-size JPEG drafting used before "
        "(decode whole, LANCZOS to 2048), 0.75 the current one (libjpeg halves to 2016×1512 while "
        "decoding). Commands: `python -m bench.core --images 1000 --concurrency 8\n[--store URL]`; "
        "phone rows `python -m bench.core --phone --images 200 --draft-floor 0.75` (or 1.0).\n\n"
        + "\n".join("| " + " | ".join(row) + " |" for row in rows)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--store", default=None, help="SQLAlchemy async URL (default: temp SQLite)")
    ap.add_argument("--no-docs", action="store_true")
    ap.add_argument("--phone", action="store_true", help="12 MP phone photos instead of 1 MP")
    ap.add_argument("--draft-floor", type=float, help="bot.images.DRAFT_FLOOR (1.0: as before)")
    args = ap.parse_args()
    if args.draft_floor is not None:
        bot.images.DRAFT_FLOOR = args.draft_floor
    result = asyncio.run(run(args.images, args.concurrency, args.store, args.phone))
    result |= {"draft_floor": bot.images.DRAFT_FLOOR, "machine": machine()}
    name = f"core-{result['store']}"
    if args.phone:
        name += f"-phone-floor{result['draft_floor']:g}"
    print(write_json(RESULTS / f"{name}.json", result).read_text())
    if not args.no_docs:
        results = [json.loads(f.read_text()) for f in sorted(RESULTS.glob("core-*.json"))]
        write_section("core", "Core overhead (`bench/core.py`)", render(results))


if __name__ == "__main__":
    main()
