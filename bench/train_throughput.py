"""XTuner QLoRA training throughput on the GPU: the tutorial's settings vs tuned ones (issue 6).

A benchmark, not a test: it needs a GPU, XTuner's training venv and an InternVL2-layout model
folder with InternVL's remote code (random weights are fine: speed does not depend on them).
Each setting trains for a fixed number of iterations on the same kind of data (real photos,
cropped and resized so no two images are equal, one short joke each) through the product's own
config renderer (training/config.py) and launch environment (training/run.py), then reads
mmengine's per-iteration time and peak memory from the log (training.run.parse_progress).

    python -m bench.train_throughput --model /tmp/full --xtuner-python /tmp/xt/bin/python \\
        --photos .device/photos --out /tmp/tp [--iters 30] [--only tutorial,b16-qlora]
    python -m bench.train_throughput --render /tmp/tp/results.jsonl [--write-doc]

samples/s = batch size × GPUs / median seconds per iteration, over the iterations after the
first ``--skip`` (CUDA warm-up, allocator growth). Wall time includes model loading, 4-bit
quantisation and DeepSpeed start-up, which a long run amortises.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, append_jsonl, markdown_table, source_photos, write_section
from bot.settings import DEFAULT_PROMPT
from training.config import TrainParams, write_config
from training.export import dumps_dataset, xtuner_item
from training.run import parse_progress, training_env, world_size
from training.settings import TrainingSettings

# The tutorial's values (shared/seed: batch 4 per device, 4 accumulation steps, 4 loader workers,
# 4-bit LLM) against settings a 2B model on an 80 GB GPU allows. The effective batch (batch ×
# accumulation × GPUs) stays 16 in every row, so the optimisation is the same.
SETTINGS: dict[str, dict[str, Any]] = {
    name: dict(batch_size=b, accumulative_counts=a, dataloader_num_workers=w, quantization_llm=q)
    for name, b, a, w, q in (
        ("tutorial", 4, 4, 4, True),
        ("b16-qlora", 16, 1, 8, True),
        ("b16-lora-bf16", 16, 1, 8, False),
    )
}
JOKES = ["它以为自己在加班，其实是在被加班。", "今天的KPI：假装很忙。",
         "老板说要有狼性，我选择了猫性。", "这不是摆烂，这是低功耗模式。"]  # fmt: skip


def write_data(work: Path, photos: Path, samples: int) -> tuple[Path, Path]:
    """An XTuner data set of ``samples`` distinct phone-size pictures cut from the real photos,
    one short joke each; returns (data file, image folder)."""
    rng = random.Random(0)
    sources = source_photos(photos, names=None)
    if not sources:
        raise SystemExit(f"no photos in {photos}")
    images = work / "images"
    images.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(samples):
        im = sources[i % len(sources)]
        w, h = im.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        # InternVL tiles a 3:2 picture into 3×2 448-px tiles + a thumbnail: 7 tiles, as a
        # phone photo would be (the serving benchmark's 6-tile case)
        name = f"img{i:04d}.jpg"
        im.crop((x, y, x + cw, y + ch)).resize((1344, 896)).save(images / name, quality=90)
        items.append(xtuner_item(f"tp-{i}", name, DEFAULT_PROMPT, JOKES[i % len(JOKES)]))
    data = work / "data.json"
    data.write_text(dumps_dataset(items), encoding="utf-8")
    return data, images


def run_one(
    name: str, values: dict[str, Any], args: argparse.Namespace, env: dict[str, str]
) -> dict[str, Any]:
    """Train one setting for ``args.iters`` iterations; its row, from mmengine's log lines."""
    world = world_size(env)
    samples = args.iters * values["batch_size"] * world
    work = args.work / name  # images and checkpoints: large, kept out of --out
    data, images = write_data(work, args.photos, samples)
    params = TrainParams(
        model_path=args.model,
        data_paths=[data],
        image_folders=[images],
        max_epochs=1,
        warmup_ratio=max(0.1, 2 / args.iters),  # >= 1 iteration (validate checks)
        save_steps=10**6,
        seed=0,
        **values,
    )
    plan = write_config(work / "config.py", params, samples, world)
    cmd = [str(args.xtuner_python.parent / "xtuner"), "train", str(work / "config.py"),
           "--work-dir", str(work / "run"), "--deepspeed", "deepspeed_zero1"]  # fmt: skip
    print(f"== {name}: {values}, {samples} samples, {plan.total_iters} iterations", flush=True)
    started = time.monotonic()
    first_iter_s = None
    progress = []
    log_path = args.out / f"xtuner-{name}.log"
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    assert proc.stdout is not None
    with log_path.open("w", encoding="utf-8") as log:
        try:
            for line in proc.stdout:
                log.write(line)
                if (p := parse_progress(line)) is None or p.time_s is None:
                    continue
                first_iter_s = first_iter_s or round(time.monotonic() - started, 1)
                progress.append(p)
                print(f"   iter {p.iteration}/{p.total} {p.time_s:.3f} s", flush=True)
            rc = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = -9
    times = [p.time_s for p in progress if p.time_s is not None]
    memory = [p.memory_mb for p in progress if p.memory_mb is not None]
    losses = [p.loss for p in progress if p.loss is not None]
    steady = times[args.skip :] or times
    s_per_iter = statistics.median(steady) if steady else None
    result = {
        "name": name,
        **values,
        "gpus": world,
        "iterations": len(times),
        "s_per_iter": round(s_per_iter, 4) if s_per_iter else None,
        "samples_per_s": round(values["batch_size"] * world / s_per_iter, 2)
        if s_per_iter
        else None,
        "peak_memory_mb": max(memory, default=None),
        "first_iteration_after_s": first_iter_s,
        "wall_s": round(time.monotonic() - started, 1),
        "loss_first_last": [losses[0], losses[-1]] if losses else None,
        "rc": rc,
    }
    if rc != 0:
        result["log_tail"] = log_path.read_text(encoding="utf-8").splitlines()[-15:]
    print(json.dumps(result), flush=True)
    return result


def render(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    head = (
        f"{meta.get('gpu', '?')}; XTuner {meta.get('xtuner', '?')}, transformers "
        f"{meta.get('transformers', '?')}, torch {meta.get('torch', '?')}; full-size random "
        "InternVL2-2B shapes (InternViT-300M + InternLM2-1.8B); 1344×896 photos → 7 tiles "
        f"(1,792 image tokens) + a short joke; DeepSpeed ZeRO-1; {meta.get('date', '')}.\n\n"
    )
    columns = ["setting", "batch × accum × GPUs", "LLM", "loader workers", "s/iter (median)",
               "samples/s", "peak memory", "first iteration after", "wall", "rc"]  # fmt: skip
    table = [
        [
            r["name"],
            f"{r['batch_size']} × {r['accumulative_counts']} × {r['gpus']}",
            "4-bit (QLoRA)" if r["quantization_llm"] else "bf16 (LoRA)",
            str(r["dataloader_num_workers"]),
            str(r["s_per_iter"] or "–"),
            f"**{r['samples_per_s'] or '–'}**",
            f"{r['peak_memory_mb'] / 1024:.1f} GiB" if r.get("peak_memory_mb") else "–",
            f"{r['first_iteration_after_s']} s",
            f"{r['wall_s']} s",
            str(r["rc"]),
        ]
        for r in rows
    ]
    base = next((r for r in rows if r["name"] == "tutorial" and r.get("samples_per_s")), None)
    notes = [
        f"{r['name']}: {r['samples_per_s'] / base['samples_per_s']:.2f}× the tutorial's samples/s"
        for r in rows
        if base and r is not base and r.get("samples_per_s")
    ]
    tail = "\n\n" + "; ".join(notes) + "." if notes else ""
    return f"{head}{markdown_table(columns, table)}{tail}\n"


def read_results(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """results.jsonl: the run's meta on its first line, then one row per setting."""
    meta, *rows = (json.loads(x) for x in path.read_text(encoding="utf-8").splitlines())
    return rows, meta


def versions(xtuner_python: Path) -> dict[str, Any]:
    code = (
        "import json, torch, transformers, xtuner; print(json.dumps({'torch': torch.__version__,"
        " 'transformers': transformers.__version__, 'xtuner': xtuner.__version__, 'gpu': "
        "torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(
        [str(xtuner_python), "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": (r.stderr or r.stdout)[-300:]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--xtuner-python", type=Path)
    ap.add_argument("--photos", type=Path, default=ROOT / ".device" / "photos")
    ap.add_argument("--out", type=Path, default=Path("train-throughput"), help="results, logs")
    ap.add_argument("--work", type=Path, default=Path("/tmp/oogiri-train-throughput"))
    ap.add_argument("--iters", type=int, default=30, help="iterations per setting")
    ap.add_argument("--skip", type=int, default=5, help="first iterations left out of the median")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per setting")
    ap.add_argument("--only", default="", help="comma-separated setting names")
    ap.add_argument("--render", type=Path, help="results.jsonl to render as markdown")
    ap.add_argument("--write-doc", action="store_true", help="into docs/benchmarks.md")
    args = ap.parse_args(argv)

    if args.render:
        table = render(*read_results(args.render))
        print(table)
        if args.write_doc:
            write_section("train-throughput", "Training throughput: XTuner QLoRA on the GPU", table)
        return 0
    if not (args.model and args.xtuner_python):
        ap.error("--model and --xtuner-python are required (or --render)")
    t = TrainingSettings(xtuner_python=args.xtuner_python, base_model=args.model)
    env = training_env(t)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {**versions(args.xtuner_python), "date": time.strftime("%Y-%m-%d")}
    results = args.out / "results.jsonl"
    results.write_text(json.dumps(meta) + "\n", encoding="utf-8")
    names = [n for n in (args.only.split(",") if args.only else SETTINGS) if n]
    for name in names:
        append_jsonl(results, run_one(name, SETTINGS[name], args, env))
    table = render(*read_results(results))
    (args.out / "table.md").write_text(table, encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
