"""Stand-in for XTuner's ``xtuner`` command: ``xtuner train CONFIG --work-dir W [--deepspeed X]``.

It reads the rendered config's literal settings, checks the data files and images the way XTuner's
InternVL dataset would find them, counts iterations like XTuner's sampler, prints mmengine-style
log lines and leaves a DeepSpeed-style checkpoint folder and ``last_checkpoint``.
FAKE_XTUNER selects a failure: rc (exit 1), crash (a traceback, exit 0 — XTuner's CLI swallows its
trainer's exit status), early (stops half-way), sleep (hangs, for cancellation).
"""

import ast
import json
import math
import os
import sys
import time
from pathlib import Path


def literals(text: str) -> dict:
    out = {}
    for node in ast.parse(text).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return out


def main() -> int:
    args = sys.argv[1:]
    if args[:1] != ["train"]:
        print(f"fake xtuner: unsupported {args}")
        return 2
    config = Path(args[1])
    work = Path(args[args.index("--work-dir") + 1])
    work.mkdir(parents=True, exist_ok=True)
    keys = ("NPROC_PER_NODE", "NNODES", "NODE_RANK", "ADDR", "PORT", "PATH", "PYTHONPATH")
    call = {"argv": args, "env": {k: os.environ.get(k) for k in keys}}
    (work / "fake_xtuner_call.json").write_text(json.dumps(call))
    mode = os.environ.get("FAKE_XTUNER", "ok")
    cfg = literals(config.read_text(encoding="utf-8"))
    assert cfg["repeat_times"] == [1] * len(cfg["data_paths"]), cfg["repeat_times"]
    samples = 0
    for data, folder in zip(cfg["data_paths"], cfg["image_folders"], strict=True):
        items = json.loads(Path(data).read_text(encoding="utf-8"))
        for item in items:
            image = Path(folder) / item["image"][0]
            if not image.is_file():
                print(f"FileNotFoundError: {image}")
                return 1
            assert item["conversations"][0]["value"].startswith("<image>\n")
        samples += len(items)
    print(f"=======total {samples} samples=======", flush=True)
    if mode == "rc":
        print("RuntimeError: NCCL error", flush=True)
        return 1
    if mode == "crash":
        print("Traceback (most recent call last):")
        print('  File "train.py", line 1, in <module>')
        print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", flush=True)
        return 0
    if mode == "sleep":
        print("Iter(train) [ 1/100]  lr: 1e-05  eta: 0:10:00  loss: 3.0", flush=True)
        time.sleep(60)
    world = int(os.environ.get("NPROC_PER_NODE", "1")) * int(os.environ.get("NNODES", "1"))
    group = cfg["batch_size"] * cfg["accumulative_counts"]
    per_epoch = math.ceil(samples / world / group) * group // cfg["batch_size"]
    total = cfg["max_epochs"] * per_epoch
    stop = total // 2 if mode == "early" else total
    width = len(str(total))
    for it in range(1, stop + 1):
        eta = total - it
        stamp = f"2026/11/25 18:30:{it % 60:02d}"
        print(
            f"{stamp} - mmengine - INFO - Iter(train) [{it:>{width}}/{total}]"
            f"  base_lr: 2.0000e-05 lr: 2.0000e-05  eta: 0:{eta // 60:02d}:{eta % 60:02d}"
            f"  time: 0.0100  data_time: 0.0010  memory: 1024  loss: {2.5 / math.sqrt(it):.4f}",
            flush=True,
        )
    checkpoint = work / f"iter_{stop}.pth"  # DeepSpeed: a folder
    checkpoint.mkdir()
    (checkpoint / "mp_rank_00_model_states.pt").write_bytes(b"fake")
    (work / "last_checkpoint").write_text(str(checkpoint))
    return 0


if __name__ == "__main__":
    sys.exit(main())
