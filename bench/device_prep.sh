#!/usr/bin/env bash
# Prepare what the GPU machine needs for issue 3's device runs (it has no internet): run HERE, on a
# machine with PyPI. Writes the git-ignored folder .device/ (carry it: run(carry=[".device"])):
#   .device/wheels/      cp312 manylinux wheels: LMDeploy's serving deps + the bot's core + pytest
#   .device/lmdeploy/    LMDeploy's Python package only (the PyPI wheel without TurboMind's CUDA-12
#                        library, lib64/ and include/, which cannot load on the CUDA-13 device)
#   .device/photos/      a few real photos (scikit-image's) for bench/serve.py
# Versions: the set recorded in shared/FIELD-NOTES.md as working with LMDeploy 0.18.0 there, plus
# the bot's own pins from the CPU environment.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=.device
mkdir -p "$OUT/wheels" "$OUT/photos"
LMDEPLOY_VERSION=${LMDEPLOY_VERSION:-0.18.0}

dl() {  # download one requirement as a cp312 manylinux (or pure) wheel, no dependencies
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --abi cp312 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any \
    -d "$OUT/wheels" "$1" 2>/dev/null \
  || "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --abi cp312 --abi abi3 --abi none --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any \
    -d "$OUT/wheels" "${1%%==*}" \
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
  mako markupsafe pytest pytest-asyncio iniconfig pygments typing-extensions; do
  dl "$req"
done

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

du -sh "$OUT"/* "$OUT"
echo "carry: .device  (keep the total under 64 MiB)"
