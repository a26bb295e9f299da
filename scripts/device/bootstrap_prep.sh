#!/usr/bin/env bash
# Staging for issue 17's device run (scripts/device/bootstrap.sh), HERE, where PyPI is reachable.
# Writes the git-ignored .whl_train/ (carry it) and ext/internvl2-code/ (OpenGVLab's code):
#   .whl_train/bot/    the bot's own cp312 wheels for `python -m bot.cli` (the device has torch,
#                      transformers 5, huggingface_hub; not pydantic, SQLAlchemy, typer …)
#   .whl_train/lock/   cp312 wheels of training/requirements-xtuner.txt, the DeepSpeed sdist and
#                      bitsandbytes re-zipped with only its CPU and CUDA-13 libraries — minus the
#                      big packages the device already has (numpy, SciPy, pandas, pyarrow, OpenCV,
#                      matplotlib, Pillow, mpi4py, aiohttp …): one call carries 64 MiB at most, so
#                      the device venv is the lock with those taken from the machine
#                      (`oogiri train setup --wheels … --reuse-system`; its check lists them).
#   PY=.venv/bin/python bash scripts/device/bootstrap_prep.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
W=.whl_train
mkdir -p "$W/bot" "$W/lock"

dl() {  # dl DEST REQ...: cp312 manylinux (or pure) wheels, no dependencies
  local dest=$1
  shift
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --abi cp312 --abi abi3 --abi none --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_28_x86_64 --platform any -d "$dest" "$@" 2>&1 | grep -v '^WARNING' || true
}

# the bot (the versions of this machine's venv, where the tests pass)
dl "$W/bot" aiosqlite==0.22.1 alembic==1.20.1 annotated-doc==0.0.7 annotated-types==0.8.0 \
  anyio==4.16.0 click==8.5.1 fastapi==0.165.0 greenlet==3.5.6 h11==0.16.0 httpcore==1.0.9 \
  httpx==0.28.1 itsdangerous==2.2.0 Mako==1.4.3 markdown-it-py==4.3.0 MarkupSafe==3.0.4 \
  mdurl==0.1.2 pluggy==1.7.0 prometheus_client==0.26.0 pydantic==2.14.4 pydantic-core==2.50.5 \
  pydantic-settings==2.16.3 Pygments==2.21.0 python-dotenv==1.2.4 python-multipart==0.0.34 \
  redis==8.2.0 rich==15.0.0 shellingham==1.5.4 sniffio==1.3.1 SQLAlchemy==2.1.9 \
  starlette==1.10.0 typer==0.29.2 typing-inspection==0.4.5

# the lock, minus what the device has (FIELD-NOTES; train_loop.sh's preflight)
SKIP='^(opencv-python-headless|pyarrow|bitsandbytes|scipy|numpy|pandas|matplotlib|pillow|fonttools|contourpy|kiwisolver|mpi4py|pyparsing|cycler|python-dateutil|aiohttp|aiohappyeyeballs|aiosignal|frozenlist|multidict|propcache|yarl|attrs|pyyaml|regex|requests|tqdm|psutil|packaging|filelock|urllib3|idna|certifi|charset-normalizer|safetensors|networkx|typing-extensions|pygments|tzdata|tiktoken|openpyxl|et-xmlfile|six|deepspeed)=='
grep -v '^#' training/requirements-xtuner.txt | grep -v '^$' | grep -Ev "$SKIP" > "$W/lock.txt"
dl "$W/lock" -r "$W/lock.txt"
[ -f "$W/lock/deepspeed-0.16.2.tar.gz" ] || "$PY" -m pip download -q --no-deps \
  --no-binary=:all: -d "$W/lock" "$(grep '^deepspeed==' training/requirements-xtuner.txt)"
if ! ls "$W"/lock/bitsandbytes-*.whl > /dev/null 2>&1; then
  tmp=$(mktemp -d)
  dl "$tmp" "$(grep '^bitsandbytes==' training/requirements-xtuner.txt)"
  "$PY" - "$tmp"/bitsandbytes-*.whl "$W/lock" <<'EOF'
import sys, zipfile
from pathlib import Path
src, dest = Path(sys.argv[1]), Path(sys.argv[2])
with zipfile.ZipFile(src) as z, zipfile.ZipFile(dest / src.name, "w", zipfile.ZIP_DEFLATED) as out:
    for info in z.infolist():  # the device's torch is cu130: drop the other CUDA libraries
        if "libbitsandbytes_" in info.filename and not any(
            k in info.filename for k in ("cuda130", "_cpu")
        ):
            continue
        out.writestr(info, z.read(info))
print("bitsandbytes re-zipped:", (dest / src.name).stat().st_size // 1024, "KiB")
EOF
  rm -rf "$tmp"
fi
"$PY" scripts/prepare_internvl_code.py \
  || echo "!! no InternVL code: fetch github:OpenGVLab/InternVL (the search tool) first" >&2
du -sh "$W"/* ext/internvl2-code
du -sbc "$W" ext 2>/dev/null | tail -1 \
  | awk '{printf "carried: %.1f MiB (+ the tree; the limit is 64)\n", $1/1048576}'
