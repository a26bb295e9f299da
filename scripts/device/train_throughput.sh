#!/usr/bin/env bash
# Issue 6's training-throughput figures, in one device call: XTuner QLoRA on full-size random
# InternVL2-2B shapes, the tutorial's settings vs tuned ones (bench/train_throughput.py).
#   run(command="bash scripts/device/train_throughput.sh", carry=[".device/lmdeploy",
#       ".device/photos", ".device/train", ".device/wheels", "ext"])   (device_prep.sh prints it)
# Reuses what train_loop.sh left on a still-warm machine (/tmp/oogiri-train-loop/{xt,site}) and
# the full-size model bench/device_run.sh builds (/tmp/oogiri-full-internvl2); builds what is
# missing. Knobs: ITERS (default 30), ONLY (setting names, comma-separated), BUDGET (s, 570).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
OUT=${OUT:-$ROOT/device-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/train_throughput.log") 2>&1
PY=${PY:-python3}
W=${WORK:-/tmp/oogiri-train-loop}
XT=$W/xt
SITE=$W/site
MODEL=/tmp/oogiri-full-internvl2
BUDGET=${BUDGET:-570}
mkdir -p "$W"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ ! -x "$XT/bin/xtuner" ]; then
  echo "== training venv"
  PY="$PY" bash scripts/device/training_venv.sh "$XT" > "$OUT/xtuner-venv.log" 2>&1 \
    || { tail -20 "$OUT/xtuner-venv.log"; exit 8; }
fi
if [ ! -f "$SITE/.done" ]; then
  echo "== bot dependencies"
  "$PY" -m pip install -q --no-index --no-deps --target "$SITE" .device/wheels/*.whl 2>&1 \
    | grep -v '^WARNING' | tail -3
  touch "$SITE/.done"
fi
export PYTHONPATH="$SITE:$ROOT" PYTHONUNBUFFERED=1
if [ ! -f "$MODEL/modeling_internvl_chat.py" ]; then
  echo "== full-size random InternVL2-2B shapes (built on the GPU) + InternVL's code"
  t=$SECONDS
  [ -f "$MODEL/config.json" ] || "$PY" -c "
from pathlib import Path
from bot.engines.internvl.tinymodel import make_tiny_model
make_tiny_model(Path('$MODEL'), layout='internvl2', size='full', device='cuda')
" 2>&1 | tail -3
  "$PY" scripts/prepare_internvl_code.py install "$MODEL" --code ext/internvl2-code | head -1
  echo "model ready: $((SECONDS - t)) s"; du -sh "$MODEL"
fi
left=$((BUDGET - SECONDS))
timeout -k 10 "$left" "$PY" -m bench.train_throughput --model "$MODEL" --xtuner-python "$XT/bin/python" \
  --photos .device/photos --out "$OUT/tp" --iters "${ITERS:-30}" --timeout 200 ${ONLY:+--only "$ONLY"}
echo "exit $? after $SECONDS s"
