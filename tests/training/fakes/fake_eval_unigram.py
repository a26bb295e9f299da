"""Stand-in for ``python evaluate_hf.py --model DIR --data F --out O …`` in bench/learning_loop's
dry run: a model "is" the character unigram of the answers it was trained on.

A fine-tuned folder (its oogiri-model.json names the run) is scored with the smoothed character
frequencies of ``<work_dir>/runs/run-NNNNN/data/train.json``; any other folder (the base) with the
uniform distribution. The held-out loss is the mean negative log-likelihood per character of the
held-out answers, so the gate's comparison means something (a model trained on disliked answers
scores worse on liked ones) while nothing here can show learning: the served answers come from the
instant engine, which no training changes.
"""

import json
import math
import sys
from collections import Counter
from pathlib import Path

ALPHABET = 65536  # smoothing over the Basic Multilingual Plane
ALPHA = 0.01


def answers(path: Path) -> list[str]:
    items = json.loads(path.read_text(encoding="utf-8"))
    return [c["value"] for item in items for c in item["conversations"] if c["from"] == "gpt"]


def training_answers(model: Path) -> list[str]:
    try:
        marker = json.loads((model / "oogiri-model.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if "run" not in marker:
        return []
    data = model.parent.parent / "runs" / f"run-{int(marker['run']):05d}" / "data" / "train.json"
    return answers(data) if data.is_file() else []


def main(argv: list[str]) -> int:
    args = argv[1:]  # argv[0] is the evaluate_hf.py path the evaluator passes
    model = Path(args[args.index("--model") + 1])
    heldout = answers(Path(args[args.index("--data") + 1]))
    out = Path(args[args.index("--out") + 1])
    counts = Counter("".join(training_answers(model)))
    total = sum(counts.values())

    def nll(ch: str) -> float:
        return -math.log((counts[ch] + ALPHA) / (total + ALPHA * ALPHABET))

    chars = "".join(heldout)
    loss = sum(nll(c) for c in chars) / len(chars) if chars else None
    favourite = "".join(c for c, _ in counts.most_common(8)) or "〇"
    result = {
        "model": str(model),
        "samples": len(heldout),
        "tokens": len(chars),
        "loss": loss,
        "generations": [{"id": str(i), "text": favourite} for i in range(len(heldout))],
    }
    out.write_text(json.dumps(result, ensure_ascii=False), encoding="utf-8")
    print(f"unigram stand-in {model.name}: loss {loss} over {len(chars)} characters", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
