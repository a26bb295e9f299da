#!/usr/bin/env bash
# Issue 3 on the GPU machine, one call each (the machine stays warm only ~30 s between calls):
# BUDGET (default 585 s) is the call's limit; later steps get what is left. STARTUP_S (default
# 420 s) caps each server's wait for /health; CONVERT=1 also writes the transformers-layout copy
# that plans name "MODEL-hf".
#   bash bench/device_run.sh test                        # ≈ 6 min: install, LMDeploy agreement
#                                                         # tests, tests/gpu (serve, capture, swap)
#   bash bench/device_run.sh bench bench/plans/serve-device-1.json   # ≈ 9 min: full-size model
#   bash bench/device_run.sh bench bench/plans/serve-device-2.json
#   bash bench/device_run.sh bench bench/plans/serve-device-3.json   # bot processes (web path)
#   bash bench/device_run.sh goodput bench/plans/goodput-device.json # issue 20: goodput (open
#        loop, admission on/off, Zipf with prefix caching on/off), the prefix-caching safety
#        check and the profiled server, one call (≈ 5 min); DEVICE_DIR: where .device/ is
# Needs .device/ from bench/device_prep.sh carried with the tree: run(carry=[".device"]) after a
# TRAIN=0 prep; with the training folders there, carry only what this script uses:
# run(carry=[".device/wheels", ".device/testwheels", ".device/lmdeploy", ".device/photos"]).
# Everything worth keeping goes to $OUT (the device tool's folder; ./device-out elsewhere).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
SITE=/tmp/oogiri-site
DEV=$(cd "${DEVICE_DIR:-.device}" && pwd)
if [ ! -f "$SITE/.done" ]; then
  shopt -s nullglob
  tests=("$DEV"/testwheels/*.whl)
  shopt -u nullglob
  [ ${#tests[@]} -gt 0 ] || echo "NOTE: no $DEV/testwheels carried: the test path has no pytest"
  python3 -m pip install -q --no-index --no-deps --target "$SITE" "$DEV"/wheels/*.whl \
    "${tests[@]}" 2>&1 | grep -v "^WARNING" | tail -3
  touch "$SITE/.done"
fi
export PYTHONPATH="$SITE:$DEV/lmdeploy:$PWD"
# the `web` path starts real `oogiri serve` processes: they need the plugins' entry points
[ -d "$SITE/oogiri_device_entry_points-0.dist-info" ] || python3 scripts/device/entry_points.py "$SITE"
export PYTHONDONTWRITEBYTECODE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import sys, lmdeploy, torch, transformers; print('python', sys.version.split()[0], \
'lmdeploy', lmdeploy.__version__, 'torch', torch.__version__, 'transformers', \
transformers.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tail -1 | tee "$OUT/versions.txt"

case "${1:-test}" in
  test)
    # LMDeploy's own template code and tiling agree with ours (these skip on CPU).
    timeout 120 python3 -m pytest -q --noconftest -p no:cacheprovider \
      tests/engines/test_chat_template.py tests/engines/test_tiling.py 2>&1 \
      | tail -5 | tee "$OUT/lmdeploy-agreement.txt"
    left=$(( ${BUDGET:-585} - SECONDS ))
    OUT="$OUT/gpu" timeout "$left" python3 tests/gpu/test_lmdeploy_gpu.py 2>&1 | tail -40
    echo "exit: ${PIPESTATUS[0]}"
    ;;
  bench|goodput)
    PLAN=${2:?plan file}
    MODEL=/tmp/oogiri-full-internvl2
    if [ ! -f "$MODEL/config.json" ]; then
      python3 -c "
from pathlib import Path
from bot.engines.internvl.tinymodel import make_tiny_model
make_tiny_model(Path('$MODEL'), layout='internvl2', size='full', device='cuda')
" 2>&1 | tail -3
    fi
    if [ "${CONVERT:-0}" = 1 ]; then
      # transformers' own InternVL layout (LLM as Llama: separate q/k/v), which LMDeploy serves
      # as InternVLForConditionalGeneration; the layout its load-time FP8 can split. A plan names
      # it "MODEL-hf" (the plan's or a config's "model").
      [ -f "$MODEL-hf/config.json" ] || python3 -m bot.cli dev convert-internvl2 "$MODEL" "$MODEL-hf" 2>&1 | tail -3
    fi
    python3 - "$PLAN" "$MODEL" "$OUT/plan.json" <<'PY'
import json, sys
plan, model = json.load(open(sys.argv[1])), sys.argv[2]
for doc in (plan, *plan.get("configs", [])):
    if isinstance(doc.get("model"), str) and doc["model"].startswith("MODEL"):
        doc["model"] = model + doc["model"][len("MODEL"):]
json.dump(plan, open(sys.argv[3], "w"), indent=1)
PY
    left=$(( ${BUDGET:-585} - SECONDS ))
    if [ "$1" = goodput ]; then
      # at most 8 files come back from $OUT: work elsewhere, copy the essentials
      GP=/tmp/goodput
      GOODPUT_DEVICE="$(head -1 "$OUT/gpu.txt")" GOODPUT_VERSIONS="$(cat "$OUT/versions.txt")" \
        PYTHONUNBUFFERED=1 timeout "$left" python3 -m bench.goodput --plan "$OUT/plan.json" \
        --images "$DEV/photos" --out "$GP" --deadline-s $(( left - 40 )) \
        --startup-timeout-s "${STARTUP_S:-240}" 2>&1 | tee "$OUT/goodput-log.txt" | tail -60
      cp "$GP"/goodput-results.json "$GP"/goodput.md "$OUT"/ 2>/dev/null \
        || cp "$GP"/goodput-results.jsonl "$OUT"/ 2>/dev/null
      mv "$OUT/plan.json" "$GP/" 2>/dev/null  # the results' meta keeps the plan
      trace=$(ls "$GP"/profile/*.json* 2>/dev/null | tail -1)
      if [ -n "$trace" ] && [ "$(stat -c %s "$trace")" -lt 15000000 ]; then
        cp "$trace" "$OUT/profile-trace.json.gz"
      fi
      for f in "$GP"/logs/*/*.log "$GP"/bots/*/*.log; do
        [ -f "$f" ] && { echo "== $f"; tail -n 25 "$f"; }
      done > "$OUT/logs-tail.txt" 2>&1
      exit 0
    fi
    timeout "$left" python3 -m bench.serve --plan "$OUT/plan.json" --images .device/photos \
      --out "$OUT/bench" --deadline-s $(( left - 60 )) --startup-timeout-s "${STARTUP_S:-420}" 2>&1 | tail -40
    # killed at the limit: the finished cells are in serve-results.jsonl; render them anyway
    [ -f "$OUT/bench/serve.md" ] || python3 -m bench.serve --render "$OUT/bench/serve-results.jsonl" \
      > "$OUT/bench/serve.md" 2>/dev/null
    ;;
  *)
    echo "usage: bench/device_run.sh test | bench PLAN" >&2
    exit 2
    ;;
esac
