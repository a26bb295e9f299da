#!/usr/bin/env bash
# Issue 9's device run: does the retraining loop learn? bench/learning_loop through the real
# stack — the tiny InternVL2 model (pretrained on CPU: .device/pretrained-base; random weights with
# RANDOM_BASE=1, as version 1 was) served by managed LMDeploy, the web API, a
# simulated audience, `oogiri train run` (XTuner QLoRA, gate, blue/green promotion) — k rounds and
# a control round. docs/learning-loop.md has the design; this is the device wrapper.
#
# ---- 1. staging, HERE (before the device call), as for train_loop.sh --------------------------
#   PY=/path/to/venv/python bash bench/device_prep.sh       (.device/ and ext/internvl2-code/)
#
# ---- 2. the device calls ---------------------------------------------------------------------
#   run(command="bash scripts/device/learning_loop.sh", timeout_s=600, carry=[".device/lmdeploy",
#       ".device/photos", ".device/train", ".device/wheels", ".device/pretrained-base", "ext"])
# (the list device_prep.sh prints: all of .device/ with the tree is over the 64 MiB a call takes;
# with every committed result even that list is: move bench/results out of the checkout for the
# calls and back afterwards, docs/learning-loop.md "The 64 MiB limit")
# The experiment resumes: everything lives in $WORK (/tmp, kept while the machine stays warm, ~30 s
# after a call). When the output ends with "pending: …", make the same call again AT ONCE. A cold
# machine has lost $WORK: the wrapper then starts over (each call's results stay in its $OUT).
#
# Knobs (environment): BUDGET (s for this call, default 580), PY (python3), RANDOM_BASE=1 (version
# 1's random base instead of .device/pretrained-base), WORK
# (/tmp/oogiri-learning-loop), FRESH=1 (discard $WORK first), DRY=1 (no GPU: the harness's CPU
# stand-ins), NPROC_PER_NODE (1; 2 on nvidia-h100-x2), LL_ARGS (more arguments for
# bench/learning_loop, e.g. "--rounds 4"; give the same ones on every call of one experiment).
#
# The device returns at most 8 files from $OUT: run it with OUT=/tmp/… and tar that folder into
# the real $OUT (docs/learning-loop.md, "How to run it on the device").
# $OUT (./device-out elsewhere) receives: learning_loop.log (this output), timings.tsv, gpu.txt,
# gpu.csv, xtuner-venv.log, learning-loop/ (results.jsonl, summary.md/json, like-rate.png, serve.log,
# train-*.log), runs/ (each training run's run.log, data card, config, train/heldout JSON),
# lmdeploy/ (server logs), registry.txt.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
[ "${1:-}" = "--stage" ] && exec bash bench/device_prep.sh   # the staging, HERE

OUT=${OUT:-$ROOT/device-out}
BUDGET=${BUDGET:-580}
PY=${PY:-python3}
W=${WORK:-/tmp/oogiri-learning-loop}
D=$ROOT/.device
LMDEPLOY_SITE=${LMDEPLOY_SITE:-$D/lmdeploy}
[ "${FRESH:-0}" = 1 ] && rm -rf "$W"
mkdir -p "$OUT" "$W"
exec > >(tee -a "$OUT/learning_loop.log") 2>&1
T0=$SECONDS
say() { printf '\n=== [%4ds] %s\n' $((SECONDS - T0)) "$*"; }
left() { echo $((BUDGET - (SECONDS - T0))); }
[ -f "$OUT/timings.tsv" ] || printf 'step\tseconds\trc\n' > "$OUT/timings.tsv"
step() {  # step NAME CMD...: run it, append "NAME seconds rc" to timings.tsv
  local name=$1 began=$SECONDS rc
  shift
  "$@"
  rc=$?
  printf '%s\t%d\t%d\n' "$name" $((SECONDS - began)) "$rc" >> "$OUT/timings.tsv"
  return $rc
}

GPU_PID=""
finish() {
  say "collect logs into $OUT"
  [ -n "$GPU_PID" ] && kill "$GPU_PID" 2>/dev/null
  mkdir -p "$OUT/lmdeploy" "$OUT/runs"
  for f in "$W"/data/logs/*.log; do
    [ -f "$f" ] && tail -n 2000 "$f" > "$OUT/lmdeploy/$(basename "$f")"
  done
  for r in "$W"/data/training/runs/run-* "$W"/state/data/training/runs/run-*; do
    [ -d "$r" ] || continue
    dest="$OUT/runs/$(basename "$r")"
    mkdir -p "$dest"
    (cd "$r" && find . -type f \( -name '*.log' -o -name '*.json' -o -name 'xtuner_config.py' \) \
      -not -path './data/images/*' -size -2M -print0 | xargs -0 -r cp --parents -t "$dest/")
  done
  [ -f "$W/site/.ok" ] && "$PY" -m bot.cli models list > "$OUT/registry.txt" 2>&1
  echo "wrapper total $((SECONDS - T0)) s" | tee -a "$OUT/timings.tsv"
  # the last line says whether to call again
  grep -E '^(pending: |EXPERIMENT COMPLETE)' "$OUT/learning_loop.log" | tail -1
}
trap finish EXIT

say "$( [ -f "$W/state/state.json" ] && echo "resuming $W" || echo "fresh start in $W" ) (budget $BUDGET s)"
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
  nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv -l 5 >> "$OUT/gpu.csv" 2>&1 &
  GPU_PID=$!
fi

if [ "${DRY:-0}" = 1 ]; then
  say "DRY=1: the harness's CPU stand-ins (instant engine, fake XTuner, unigram evaluator)"
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  # shellcheck disable=SC2086
  "$PY" -m bench.learning_loop --dry-run --state "$W/state" --out "$OUT/learning-loop" \
    --budget-s $(( $(left) - 20 )) ${LL_ARGS:-}
  exit $?
fi

# ------------------------------------------------------------------ 1. training venv (background)
# XTuner 0.2.0's own environment; the harness waits for $W/xt.ready before its first training run.
if [ -f "$W/xt.ready" ]; then
  say "training venv: kept from the previous call"
else
  say "training venv in the background (scripts/device/training_venv.sh)"
  rm -f "$W/xt.ready.failed"
  (
    began=$SECONDS
    if PY="$PY" bash scripts/device/training_venv.sh "$W/xt" \
      && env -u PYTHONPATH "$W/xt/bin/python" -c \
        "import xtuner, mmengine, transformers, peft, deepspeed, bitsandbytes; print('xtuner', xtuner.__version__, 'transformers', transformers.__version__)"; then
      touch "$W/xt.ready"
    else
      touch "$W/xt.ready.failed"
    fi
    printf 'xtuner-venv\t%d\t%d\n' $((SECONDS - began)) "$([ -f "$W/xt.ready" ]; echo $?)" >> "$OUT/timings.tsv"
  ) > "$OUT/xtuner-venv.log" 2>&1 &
fi

# ------------------------------------------------------------------ 2. the bot's environment
SITE=$W/site
if [ ! -f "$SITE/.ok" ]; then
  say "bot dependencies → $SITE"
  step bot-wheels "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "$D"/wheels/*.whl \
    2>&1 | grep -v '^WARNING' | tail -3
fi
# $W/state/site: the plugins' entry points, written by bench/learning_loop (this tree is not
# pip-installed here)
export PYTHONPATH="$W/state/site:$SITE:$LMDEPLOY_SITE:$ROOT"
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 COLUMNS=200
"$PY" -c "import bot.cli, fastapi, sqlalchemy, greenlet, httpx; print('bot imports ok')" \
  || { echo "FATAL: the bot's dependencies do not import"; exit 5; }
touch "$SITE/.ok"

# ------------------------------------------------------------------ 3. the base model
BASE=$W/base
if [ ! -f "$BASE/oogiri-model.json" ] || [ ! -f "$BASE/.code-installed" ]; then
  [ -d ext/internvl2-code ] || { echo "FATAL: ext/internvl2-code missing: stage (--stage) and carry ext"; exit 4; }
  rm -rf "$BASE"
  if [ -f "$D/pretrained-base/oogiri-model.json" ]; then
    # version 2: the tiny base pretrained on CPU to name pictures some of the time
    # (python -m bench.learning_loop.proxy … --save-base .device/pretrained-base)
    say "tiny InternVL2 base, pretrained ($D/pretrained-base), with InternVL's remote code"
    step base cp -r "$D/pretrained-base" "$BASE" || exit 6
  elif [ "${RANDOM_BASE:-0}" != 1 ]; then
    # version 2 needs a base that already names pictures some of the time (docs/learning-loop.md,
    # "A pretrained base"); a silent fall-back to random weights would spend the call on nothing
    echo "FATAL: $D/pretrained-base missing: stage it (bench/device_prep.sh builds it), or RANDOM_BASE=1"
    exit 6
  else
    say "tiny InternVL2 base (random weights, RANDOM_BASE=1) with InternVL's remote code"
    # the module, not `oogiri dev make-tiny-model`: that command comes from a plugin's entry
    # point, and this tree is not pip-installed here
    step base "$PY" -c "import sys; from pathlib import Path; from bot.engines.internvl.tinymodel import make_tiny_model; make_tiny_model(Path(sys.argv[1]), layout='internvl2')" "$BASE" || exit 6
  fi
  step code "$PY" scripts/prepare_internvl_code.py install "$BASE" --code ext/internvl2-code || exit 6
  touch "$BASE/.code-installed"
fi
BASE_VERSION=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['version'])" "$BASE/oogiri-model.json")

# ------------------------------------------------------------------ 4. machine settings
# The experiment's own settings (sampling, limits, training hyper-parameters, gate) are set and
# recorded by bench/learning_loop; these are the machine's.
export OOGIRI_DATA_DIR=$W/data OOGIRI_WEB__PORT=8000
export OOGIRI_ENGINE__MODEL=$BASE OOGIRI_ENGINE__MODEL_VERSION=$BASE_VERSION OOGIRI_ENGINE__TIMEOUT_S=90
if ! { [ -d "$LMDEPLOY_SITE/lmdeploy" ] && "$PY" -c "import torch,sys; sys.exit(not torch.cuda.is_available())"; }; then
  echo "FATAL: no LMDeploy or no CUDA here: this experiment needs the GPU (DRY=1 for the CPU stand-ins)"
  exit 3
fi
export OOGIRI_ENGINE__NAME=lmdeploy OOGIRI_ENGINE__MANAGE=true OOGIRI_ENGINE__PORT=23333
export OOGIRI_ENGINE__CACHE_MAX_ENTRY_COUNT=0.05 OOGIRI_ENGINE__MAX_BATCH_SIZE=32
export OOGIRI_ENGINE__EXTRA_ARGS='["--eager-mode"]'   # no CUDA-graph capture: faster starts
export OOGIRI_ENGINE__STARTUP_TIMEOUT_S=300 OOGIRI_ENGINE__DRAIN_TIMEOUT_S=20
# version 2's live A/B: the candidate arm is a second api_server on the same GPU
export OOGIRI_AB__CANDIDATE_CACHE_MAX_ENTRY_COUNT=0.05
export OOGIRI_TRAINING__BASE_MODEL=$BASE OOGIRI_TRAINING__XTUNER_PYTHON=$W/xt/bin/python
export NPROC_PER_NODE=${NPROC_PER_NODE:-1}
export OOGIRI_TRAINING__DATALOADER_NUM_WORKERS=2
export OOGIRI_TRAINING__TIMEOUT_HOURS=0.08   # any one command of a run: 288 s at most

# ------------------------------------------------------------------ 5. the experiment
say "bench/learning_loop ($(left) s left)"
# shellcheck disable=SC2086
step learning-loop "$PY" -m bench.learning_loop --state "$W/state" --out "$OUT/learning-loop" \
  --budget-s $(( $(left) - 35 )) --wait-file "$W/xt.ready" --keep-serving ${LL_ARGS:-}
RC=$?
say "done (rc $RC)"
exit $RC
