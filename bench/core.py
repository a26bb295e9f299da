"""Core overhead: images/s through JokeService (validate, normalise, store), instant engine.

Not a test: it measures. Writes bench/results/core.json and the "Core" section of
docs/benchmarks.md. Usage: python -m bench.core [--images 400] [--concurrency 8] [--store URL]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

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


async def run(n_images: int, concurrency: int, store_url: str | None, phone: bool = False) -> dict:
    # distinct JPEGs (~1 MP, or phone-sized): no dedupe can serve one for another
    payloads = photo_jpegs(n_images, PHONE if phone else (1155, 866), workers=2)
    with tempfile.TemporaryDirectory() as tmp:
        overrides: dict = {
            "data_dir": Path(tmp),
            "limits": {
                "per_user_per_minute": 0,
                "per_chat_per_minute": 0,
                "max_concurrency": concurrency,
            },
        }
        if store_url:
            overrides["store"] = {"url": store_url}
        settings = Settings(_env_file=None, **overrides)
        app = await App.create(settings, pm=make_manager([]), engine=InstantEngine())
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        for p in payloads:
            queue.put_nowait(p)
        latencies: list[float] = []

        async def worker(w: int) -> None:
            while not queue.empty():
                data = queue.get_nowait()
                t0 = time.perf_counter()
                await app.service.tell(
                    JokeRequest(image_bytes=data, channel="bench", user_id=f"bench:{w}")
                )
                latencies.append(time.perf_counter() - t0)

        # warm-up (imports, first DB connection) outside the timed window
        await app.service.tell(JokeRequest(image_bytes=payloads[0], channel="bench", user_id="w"))
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--store", default=None, help="SQLAlchemy async URL (default: temp SQLite)")
    ap.add_argument("--no-docs", action="store_true")
    ap.add_argument("--phone", action="store_true", help="12 MP phone photos instead of 1 MP")
    ap.add_argument(
        "--draft-floor",
        type=float,
        default=None,
        help="override bot.images.DRAFT_FLOOR (1.0 = the exact-size drafting used before)",
    )
    args = ap.parse_args()
    if args.draft_floor is not None:
        import bot.images

        bot.images.DRAFT_FLOOR = args.draft_floor
    result = asyncio.run(run(args.images, args.concurrency, args.store, args.phone))
    result["draft_floor"] = __import__("bot.images").images.DRAFT_FLOOR
    result["machine"] = machine()
    name = f"core-{result['store']}" + (
        f"-phone-floor{result['draft_floor']:g}" if args.phone else ""
    )
    print(write_json(RESULTS / f"{name}.json", result).read_text())
    if not args.no_docs:
        rows = [
            "| store | photos | JPEG draft floor | images | in flight | images/s | p50 ms | p95 ms "
            "| peak RSS MB |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for f in sorted(RESULTS.glob("core-*.json")):
            r = json.loads(f.read_text())
            photo = "12 MP phone" if r.get("photo") == "phone" else "1 MP"
            floor = r.get("draft_floor", "–") if r.get("photo") == "phone" else "–"
            rows.append(
                f"| {r['store']} | {photo} | {floor} | {r['images']} | {r['concurrency']} "
                f"| **{r['images_per_s']}** | {r['p50_ms']} | {r['p95_ms']} | {r['peak_rss_mb']} |"
            )
        write_section(
            "core",
            "Core overhead (`bench/core.py`)",
            f"JokeService with the instant engine on distinct JPEGs "
            f"(validate + normalise + store). Machine: {result['machine']}. "
            "Goal: >= 200 images/s (1 MP). Phone photos: the 4032×3024 uploads the serving "
            "benchmark sends; draft floor 1.0 is the exact-size JPEG drafting used before "
            "(decode whole, LANCZOS to 2048), 0.75 the current one (libjpeg halves to "
            "2016×1512 while decoding). Commands: `python -m bench.core --images 1000 "
            "--concurrency 8\n[--store URL]`; phone rows `python -m bench.core --phone --images "
            "200 --draft-floor 0.75` (or 1.0).\n\n" + "\n".join(rows),
        )


if __name__ == "__main__":
    main()
