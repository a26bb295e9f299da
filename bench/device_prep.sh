#!/usr/bin/env bash
# Prepare what the GPU machine needs for issue 3's device runs (it has no internet): run HERE, on a
# machine with PyPI. Writes the git-ignored folder .device/; a device call carries the parts its
# script uses (all of it is over a call's 64 MiB with TRAIN=1): the list this script ends with.
#   .device/wheels/      cp312 manylinux wheels: LMDeploy's serving deps + the bot's core
#   .device/testwheels/  pytest (+ pytest-asyncio, iniconfig) and redis: only bench/device_run.sh's
#                        `test` path installs them; the training scripts leave them behind
#   .device/lmdeploy/    LMDeploy's Python package only (the PyPI wheel without TurboMind's CUDA-12
#                        library, lib64/ and include/, which cannot load on the CUDA-13 device)
#   .device/photos/      a few real photos (scikit-image's) for bench/serve.py
#   .device/train/       (TRAIN=1, the default) XTuner 0.2.0's environment: its pinned wheels, the
#                        DeepSpeed 0.16.2 sdist, bitsandbytes 0.50.2 unpacked with only the CUDA-13
#                        library (.device/train-extra/: setuptools, only if DeepSpeed does not
#                        build with the device's); plus ext/internvl2-code/ (OpenGVLab's
#                        InternVL code, git-ignored) for the training scripts.
#   .device/pretrained-base/  (with TRAIN) the learning loop's tiny base, pretrained on this CPU
# Versions: the set recorded in shared/FIELD-NOTES.md as working with LMDeploy 0.18.0 there, plus
# the bot's own pins from the CPU environment.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=.device
TRAIN_DEFAULT=${TRAIN:-1}
mkdir -p "$OUT/wheels" "$OUT/photos"
LMDEPLOY_VERSION=${LMDEPLOY_VERSION:-0.18.0}

dl() {  # dl REQ [DIR]: one requirement as a cp312 manylinux (or pure) wheel, no dependencies
  local dest=${2:-$OUT/wheels}
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --abi cp312 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any \
    -d "$dest" "$1" 2>/dev/null \
  || "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --abi cp312 --abi abi3 --abi none --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any \
    -d "$dest" "${1%%==*}" \
  || echo "!! could not download $1" >&2
}

# LMDeploy 0.18's serving dependencies (FIELD-NOTES), then the bot's.
for req in fastapi==0.165.0 starlette==1.10.0 opentelemetry-api==1.45.2 pydantic==2.14.4 \
  pydantic-core==2.50.5 annotated-types typing-inspection uvicorn==0.54.0 click h11 \
  mmengine-lite==0.10.7 addict termcolor yapf platformdirs pybase64 shortuuid openai==3.57.0 \
  httpx2 httpcore2 truststore sniffio jiter distro pyzmq==27.3.0 xgrammar==0.2.8 \
  apache-tvm-ffi==0.1.11 importlib-metadata zipp \
  httpx==0.28.1 httpcore==1.0.9 h11==0.16.0 anyio==4.16.0 idna certifi \
  pydantic-settings==2.16.3 python-dotenv pluggy sqlalchemy==2.1.9 greenlet aiosqlite alembic \
  mako markupsafe pygments typing-extensions \
  python-multipart itsdangerous typer rich markdown-it-py mdurl shellingham \
  prometheus-client greenlet; do
  dl "$req"
done
mkdir -p "$OUT/testwheels"
for req in pytest pytest-asyncio iniconfig redis; do dl "$req" "$OUT/testwheels"; done

# LMDeploy itself: the Python package only.
if [ ! -f "$OUT/lmdeploy/lmdeploy/version.py" ]; then
  tmp=$(mktemp -d)
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --abi cp312 --platform manylinux2014_x86_64 \
    --platform manylinux_2_28_x86_64 -d "$tmp" "lmdeploy==$LMDEPLOY_VERSION"
  rm -rf "$OUT/lmdeploy" && mkdir -p "$OUT/lmdeploy"
  "$PY" - "$tmp"/lmdeploy-*.whl "$OUT/lmdeploy" <<'EOF'
import sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    keep = [n for n in z.namelist()
            if n.startswith("lmdeploy/") and "/lib64/" not in n and "/include/" not in n
            and "_turbomind" not in n.rsplit("/", 1)[-1]]
    z.extractall(dest, keep)
print(f"lmdeploy: {len(keep)} files kept")
EOF
  rm -rf "$tmp"
fi

# Real photos for the benchmark (skimage ships them; any JPEG/PNG folder works).
"$PY" - "$OUT/photos" <<'EOF' || echo "!! no scikit-image here: bench/serve.py falls back to drawn pictures" >&2
import shutil, sys
from pathlib import Path
import skimage
data = Path(skimage.__file__).parent / "data"
for name in ("chelsea.png", "astronaut.png", "coffee.png", "rocket.jpg", "motorcycle_left.png"):
    if (data / name).exists():
        shutil.copy(data / name, Path(sys.argv[1]) / name)
EOF

# XTuner's training environment (FIELD-NOTES "XTuner 0.2.0"): its own pins, installed --no-deps into
# a venv with --system-site-packages on the device (training/environment.py, train_loop.sh).
if [ "${TRAIN:-1}" = 1 ]; then
  mkdir -p "$OUT/train"
  for req in xtuner==0.2.0 mmengine==0.10.6 transformers==4.48.0 tokenizers==0.21.0 \
    huggingface-hub==0.27.1 peft==0.14.0 accelerate==1.2.1 datasets==3.2.0 dill==0.3.8 \
    multiprocess==0.70.16 fsspec==2024.9.0 xxhash pydantic==2.10.6 pydantic-core==2.27.2 hjson \
    loguru addict yapf einops sentencepiece msgpack ninja py-cpuinfo nvidia-ml-py; do
    dl "$req" "$OUT/train"
  done
  # only if the device's setuptools cannot build the DeepSpeed sdist
  mkdir -p "$OUT/train-extra" && dl setuptools==84.2.1 "$OUT/train-extra"
  [ -f "$OUT/train/deepspeed-0.16.2.tar.gz" ] || "$PY" -m pip download -q --no-deps \
    --no-binary=:all: -d "$OUT/train" deepspeed==0.16.2
  if [ ! -d "$OUT/train/bnb/bitsandbytes" ]; then
    tmp=$(mktemp -d)
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --platform manylinux_2_24_x86_64 -d "$tmp" bitsandbytes==0.50.2
    mkdir -p "$OUT/train/bnb"
    "$PY" - "$tmp"/bitsandbytes-*.whl "$OUT/train/bnb" <<'EOF'
import sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:  # the device's torch is cu130: drop the other CUDA libraries
    keep = [n for n in z.namelist()
            if "libbitsandbytes_" not in n or "cuda130" in n or "_cpu" in n]
    z.extractall(dest, keep)
print(f"bitsandbytes: {len(keep)} files kept")
EOF
    rm -rf "$tmp"
  fi
  "$PY" scripts/prepare_internvl_code.py \
    || echo "!! no InternVL code: fetch github:OpenGVLab/InternVL (the search tool) first" >&2
fi

# The learning loop's pretrained tiny base (docs/learning-loop.md, "A pretrained base"): ~10 min of
# one CPU core, once. PRETRAINED=0 skips it (scripts/device/learning_loop.sh then needs RANDOM_BASE=1).
# SEED (default 0) picks the proxy seed whose base is built; give the experiment the same --seed.
if [ "${PRETRAINED:-$TRAIN_DEFAULT}" = 1 ] && [ ! -f "$OUT/pretrained-base/oogiri-model.json" ]; then
  echo "pretraining the tiny base (seed ${SEED:-0}) for the learning loop (about 10 minutes) ..."
  "$PY" -m bench.learning_loop.proxy --seeds "${SEED:-0}" --lr 5e-4 --pretrain-epochs 12 --pretrain-images 80 \
    --pretrain-answers 2 --pretrain-p 0.5 --rounds 0 --controls --save-base "$OUT/pretrained-base" \
    || echo "!! the pretrained base failed: see the output above" >&2
fi
du -sh "$OUT"/* "$OUT"
# What a device call sends: the working tree (tracked and untracked-not-ignored files) plus the
# carried folders, 64 MiB at most. The training scripts (learning_loop.sh, train_loop.sh,
# train_throughput.sh) need only these:
CARRY=""
for path in .device/lmdeploy .device/photos .device/train .device/wheels .device/pretrained-base ext; do
  [ -e "$path" ] && CARRY="$CARRY $path"
done
tree=$(git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
# shellcheck disable=SC2086  # CARRY is a list of paths without spaces
carried=$(du -sbc $CARRY /dev/null 2>/dev/null | tail -1 | cut -f1)
awk -v t="$tree" -v c="$carried" 'BEGIN {
  printf "carried: %.1f MiB + the tree %.1f MiB = %.1f MiB (the limit is 64)\n", c/1048576, t/1048576, (c+t)/1048576
  if (c + t > 63 * 1048576) print "!! near or over the limit (the device tool counted 63.4 MiB as over): move bench/results out of the checkout for the calls (docs/learning-loop.md, \"The 64 MiB limit\")" }'
echo "training scripts: run(..., carry=[$(printf '"%s", ' $CARRY | sed 's/, $//')])"
