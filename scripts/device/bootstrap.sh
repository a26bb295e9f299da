#!/usr/bin/env bash
# Issue 17's device run, in ONE call: `oogiri train bootstrap` from nothing, against a loopback hub
# (tests/fakes/fake_hub.py: the Hub HTTP API, through HF_ENDPOINT) serving the tiny InternVL2 model
# (random weights + InternVL's own code, as a real download has it) and a tiny Oogiri-GO-shaped
# data set, with the real XTuner training venv built by `oogiri train setup` from
# training/requirements-xtuner.txt.
#
#   here:   PY=.venv/bin/python bash scripts/device/bootstrap_prep.sh   (.whl_train/, ext/)
#   device: run(command="bash scripts/device/bootstrap.sh", carry=[".whl_train", "ext"],
#               timeout_s=290)        (STOP_AFTER=setup: the venv and its check only)
#
# What lands in $OUT: bootstrap.log (this output), setup.log + check.json (the venv and its
# check), system-versions.json (lock entries taken from the machine), run/ (run.log, xtuner
# config, data card, mmengine logs), registry.json, bootstrap.env, state.json, timings.tsv.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
OUT=${OUT:-$ROOT/device-out}
mkdir -p "$OUT"
PY=${PY:-python3}
W=${WORK:-/tmp/oogiri-bootstrap}
rm -rf "$W" && mkdir -p "$W"
exec > >(tee "$OUT/bootstrap.log") 2>&1
T0=$SECONDS
printf 'step\tseconds\trc\n' > "$OUT/timings.tsv"
say() { printf '\n=== [%4ds] %s\n' $((SECONDS - T0)) "$*"; }
timed() {
  local name=$1 t=$SECONDS rc
  shift
  "$@"
  rc=$?
  printf '%s\t%d\t%d\n' "$name" $((SECONDS - t)) "$rc" >> "$OUT/timings.tsv"
  echo "--- $name: rc=$rc, $((SECONDS - t)) s"
  return $rc
}
HUB_PID=""
collect() {
  say "collect"
  [ -n "$HUB_PID" ] && kill "$HUB_PID" 2>/dev/null
  mkdir -p "$OUT/run"
  for r in "$W"/data/training/runs/run-*; do
    [ -d "$r" ] || continue
    (cd "$r" && find . -type f \( -name '*.log' -o -name '*.py' -o -name '*.json' \) \
      -not -path './data/images/*' -size -2M -print0 | xargs -0 -r cp --parents -t "$OUT/run/")
  done
  cp "$W"/data/training/bootstrap/* "$OUT/" 2>/dev/null
  cp "$W"/data/datasets/oogiri-go-*/report.json "$OUT/data-report.json" 2>/dev/null
  for m in "$W"/data/training/models/*; do
    [ -d "$m" ] && { echo "# $m"; ls -la "$m"; } > "$OUT/model-$(basename "$m").txt"
  done
  echo "total $((SECONDS - T0)) s" | tee -a "$OUT/timings.tsv"
}
trap collect EXIT

say "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

say "the bot's wheels"
SITE=$W/site
timed bot-wheels "$PY" -m pip install -q --no-index --no-deps --target "$SITE" .whl_train/bot/*.whl \
  2>&1 | grep -v '^WARNING' | tail -3
export PYTHONPATH="$SITE:$ROOT" PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 COLUMNS=160
export OOGIRI_PLUGINS=training   # the web/chat plugins' dependencies are not carried
"$PY" scripts/device/entry_points.py "$SITE"
OOGIRI=("$PY" -m bot.cli)

# started first: the longest step; its check (at the end) reads the model folder made meanwhile
say "the training venv from the lock (background): oogiri train setup --wheels --reuse-system"
SRC=$W/src
XT=$W/xt
( timed setup "${OOGIRI[@]}" train setup --venv "$XT" --python "$PY" --wheels .whl_train/lock \
    --reuse-system --model "$SRC/InternVL2-2B" > "$OUT/setup.log" 2>&1 ) &
SETUP_PID=$!

say "the hub's content: tiny InternVL2 + InternVL's code, tiny Oogiri-GO"
# `dev make-tiny-model` belongs to the transformers engine plugin
timed base env OOGIRI_PLUGINS=training,engine_transformers "${OOGIRI[@]}" dev make-tiny-model \
  "$SRC/InternVL2-2B" --layout internvl2 || exit 6
timed code "$PY" scripts/prepare_internvl_code.py install "$SRC/InternVL2-2B" --code ext/internvl2-code || exit 6
timed data-src "$PY" tests/fakes/fake_hub.py --make-oogiri-go "$SRC/oogiri-go" > /dev/null || exit 6

say "loopback hub"
"$PY" tests/fakes/fake_hub.py --model "OpenGVLab/InternVL2-2B=$SRC/InternVL2-2B" \
  --dataset "zhongshsh/CLoT-Oogiri-GO=$SRC/oogiri-go" > "$W/hub.out" 2>&1 &
HUB_PID=$!
for _ in $(seq 1 50); do grep -q FAKE_HUB_URL "$W/hub.out" && break; sleep 0.2; done
export HF_ENDPOINT=$(sed -n 's/^FAKE_HUB_URL=//p' "$W/hub.out")
echo "HF_ENDPOINT=$HF_ENDPOINT"

say "waiting for the training venv"
wait "$SETUP_PID"
SETUP_RC=$?
grep -v '^ *"dataset_traceback"' "$OUT/setup.log" | tail -60
"$PY" - "$OUT/setup.log" "$OUT/check.json" <<'EOF'
import json, sys
text = open(sys.argv[1], encoding="utf-8").read()
start = text.rfind('\n{\n')
doc = json.JSONDecoder().raw_decode(text[start + 1:])[0] if start >= 0 else {}
json.dump(doc, open(sys.argv[2], "w"), indent=1, ensure_ascii=False)
print("check:", {k: doc.get(k) for k in ("python", "xtuner_internvl", "model_code", "dataset", "cuda")})
EOF
env -u PYTHONPATH "$XT/bin/python" - "$OUT/system-versions.json" <<'EOF'
import json, sys
from importlib.metadata import version, PackageNotFoundError
names = ["numpy", "scipy", "pandas", "pyarrow", "opencv-python-headless", "opencv-python",
         "matplotlib", "pillow", "mpi4py", "aiohttp", "safetensors", "networkx", "torch",
         "torchvision", "scikit-image", "timm", "bitsandbytes", "deepspeed", "xtuner"]
out = {}
for n in names:
    try:
        out[n] = version(n)
    except PackageNotFoundError:
        out[n] = None
json.dump(out, open(sys.argv[1], "w"), indent=1)
print("versions seen by the training venv:", out)
EOF
[ "$SETUP_RC" -eq 0 ] || { echo "FATAL: oogiri train setup failed (rc $SETUP_RC)"; exit 8; }
# STOP_AFTER=setup: only the environment and its check (a call of about two minutes)
[ "${STOP_AFTER:-}" = setup ] && exit 0

say "oogiri train bootstrap (1st: from nothing)"
export OOGIRI_DATA_DIR=$W/data OOGIRI_PLUGINS=training OOGIRI_TRAINING__XTUNER_PYTHON=$XT/bin/python
export NPROC_PER_NODE=1
# 8 samples, batch 1 × 1, 2 epochs: 16 iterations, warm-up 4; the seed's lr
export OOGIRI_TRAINING__BATCH_SIZE=1 OOGIRI_TRAINING__ACCUMULATIVE_COUNTS=1
export OOGIRI_TRAINING__WARMUP_RATIO=0.25 OOGIRI_TRAINING__DATALOADER_NUM_WORKERS=2
# random weights: the sanity gate cannot expect Chinese jokes from them
export OOGIRI_TRAINING__GATE_LANGUAGE=any OOGIRI_TRAINING__GATE_MIN_SANITY=0
export OOGIRI_TRAINING__EVAL_MAX_SAMPLES=8 OOGIRI_TRAINING__EVAL_MAX_NEW_TOKENS=8
export OOGIRI_TRAINING__TIMEOUT_HOURS=0.05
timed bootstrap "${OOGIRI[@]}" train bootstrap --n 8 --epochs 2 -v
RC=$?

say "oogiri train bootstrap (2nd: every step already done)"
timed bootstrap-again "${OOGIRI[@]}" train bootstrap --n 8 --epochs 2
"${OOGIRI[@]}" models list --json > "$OUT/registry.json"
cat "$OUT/registry.json"
exit $RC
