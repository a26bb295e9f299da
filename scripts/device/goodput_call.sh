#!/usr/bin/env bash
# Issue 20's goodput measurements in ONE device call, results packed into $OUT (which brings
# back at most 8 files): install the carried wheels, build the full-size random InternVL2-2B
# model on the GPU, run a bench/plans/goodput-*.json plan with bench.goodput, pack.
#
#   device (tree = git archive in .device/goodput-tree, made by scripts/device/goodput_prep.sh):
#     cd .device/goodput-tree && DEVICE_DIR=.. BUDGET=410 STARTUP_S=200 \
#       bash scripts/device/goodput_call.sh bench/plans/goodput-device-2.json
#   CPU dry run of the same plan against fake api_servers (rates × 0.25, small pictures):
#     DRY_RUN=1 PY=.venv/bin/python bash scripts/device/goodput_call.sh bench/plans/goodput-device-2.json
#
# BUDGET (s, default 410): this script's whole run; the bench is killed at BUDGET - 15 and starts
# no rate cell it cannot finish by BUDGET - 45 (server stop and packing fit in what is left).
# What comes back in $OUT: goodput-results.json (commit it), goodput.md, goodput-log.txt and
# goodput-call.tar.gz (plan, gpu/versions, setup log, every server's and bot's log, the jsonl).
set -uo pipefail
cd "$(dirname "$0")/../.."
PLAN=${1:-bench/plans/goodput-device-2.json}
PY=${PY:-python3}
BUDGET=${BUDGET:-410}
FINAL=${OUT:-$PWD/device-out}
WORK=${GOODPUT_WORK:-/tmp/goodput-call}
GP=$WORK/run
rm -rf "$WORK" && mkdir -p "$GP" "$FINAL"
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1

if [ "${DRY_RUN:-0}" = 1 ]; then
  MODEL=MODEL  # as_cpu_dry_run makes a fake model folder
  EXTRA=(--dry-run-fake "${DRY_SCALE:-0.25}")
  echo "dry run on $(uname -m), $(nproc) cores" | tee "$WORK/gpu.txt"
  "$PY" -c "import sys; print('python', sys.version.split()[0], 'dry run: fake api_servers')" \
    | tee "$WORK/versions.txt"
  PHOTOS=${DEVICE_DIR:-.device}/photos
else
  SITE=/tmp/oogiri-site
  DEV=$(cd "${DEVICE_DIR:-.device}" && pwd)
  PHOTOS=$DEV/photos
  {
    [ -f "$SITE/.done" ] || { "$PY" -m pip install -q --no-index --no-deps --target "$SITE" \
      "$DEV"/wheels/*.whl 2>&1 | grep -v "^WARNING" | tail -3; touch "$SITE/.done"; }
  } > "$WORK/setup.log" 2>&1
  export PYTHONPATH="$SITE:$DEV/lmdeploy:$PWD"
  # bot processes find their plugins (web channel, joke pool) through entry points
  [ -d "$SITE/oogiri_device_entry_points-0.dist-info" ] \
    || "$PY" scripts/device/entry_points.py "$SITE" >> "$WORK/setup.log" 2>&1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    | tee "$WORK/gpu.txt"
  "$PY" -c "import sys, lmdeploy, torch, transformers; print('python', sys.version.split()[0], \
'lmdeploy', lmdeploy.__version__, 'torch', torch.__version__, 'transformers', \
transformers.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tail -1 \
    | tee "$WORK/versions.txt"
  MODEL=/tmp/oogiri-full-internvl2
  if [ ! -f "$MODEL/config.json" ]; then
    "$PY" -c "
from pathlib import Path
from bot.engines.internvl.tinymodel import make_tiny_model
make_tiny_model(Path('$MODEL'), layout='internvl2', size='full', device='cuda')
" >> "$WORK/setup.log" 2>&1 || { echo "model build failed:"; tail -20 "$WORK/setup.log"; }
  fi
  EXTRA=()
fi
echo "setup done at ${SECONDS} s" | tee -a "$WORK/setup.log"

# the plan with its model placeholder filled in (MODEL, MODEL-hf …)
"$PY" - "$PLAN" "$MODEL" "$WORK/plan.json" <<'PY' || exit 2
import json, sys
plan, model = json.load(open(sys.argv[1])), sys.argv[2]
if isinstance(plan.get("model"), str) and plan["model"].startswith("MODEL"):
    plan["model"] = model + plan["model"][len("MODEL"):]
json.dump(plan, open(sys.argv[3], "w"), indent=1)
PY

left=$(( BUDGET - SECONDS - 15 ))
GOODPUT_DEVICE="$(head -1 "$WORK/gpu.txt")" GOODPUT_VERSIONS="$(cat "$WORK/versions.txt")" \
  timeout "$left" "$PY" -m bench.goodput --plan "$WORK/plan.json" --images "$PHOTOS" \
  --out "$GP" --deadline-s $(( left - 30 )) --startup-timeout-s "${STARTUP_S:-200}" \
  ${EXTRA[@]+"${EXTRA[@]}"} > "$FINAL/goodput-log.txt" 2>&1
echo "bench exit $? at ${SECONDS} s" | tee -a "$FINAL/goodput-log.txt"

# results: the final JSON, or the one saved after the last finished step (meta.partial)
cp "$GP/goodput-results.json" "$FINAL/" 2>/dev/null
if [ -f "$GP/goodput.md" ]; then
  cp "$GP/goodput.md" "$FINAL/"
elif [ -f "$FINAL/goodput-results.json" ]; then
  "$PY" -m bench.goodput --render "$FINAL/goodput-results.json" > "$FINAL/goodput.md" 2>&1
fi
# everything else in one archive (no bot databases, no profiler traces)
tar -czf "$FINAL/goodput-call.tar.gz" -C "$WORK" --exclude='run/bots/*/bot-*/*' \
  --exclude='run/profile/*' . 2>/dev/null
ls -la "$FINAL"
tail -40 "$FINAL/goodput-log.txt"
echo "call done at ${SECONDS} s"
