"""Stand-in for ``python evaluate_hf.py --model DIR --data F --image-root R --out O …``: the
candidate (a folder under …/models/) scores FAKE_EVAL_CANDIDATE_LOSS (default 1.0), any other
model 2.0; both answer with a sane Chinese joke per held-out item."""

import json
import os
import sys

args = sys.argv[2:]  # argv[1] is the evaluate_hf.py path the evaluator passes
model = args[args.index("--model") + 1]
data = json.load(open(args[args.index("--data") + 1], encoding="utf-8"))
out = args[args.index("--out") + 1]
loss = float(os.environ.get("FAKE_EVAL_CANDIDATE_LOSS", "1.0")) if "/models/" in model else 2.0
print(f"fake eval {model}: {loss}", flush=True)
result = {
    "model": model,
    "samples": len(data),
    "tokens": 10 * len(data),
    "loss": loss,
    "generations": [{"id": d["id"], "text": "这只猫刚刚发现冰箱是空的。"} for d in data],
}
with open(out, "w", encoding="utf-8") as fh:
    json.dump(result, fh, ensure_ascii=False)
