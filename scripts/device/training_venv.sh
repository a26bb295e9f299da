#!/usr/bin/env bash
# XTuner 0.2.0's training environment on the device, from the staged wheels (bench/device_prep.sh):
# a venv with --system-site-packages (it reuses the machine's CUDA torch), the pinned wheels
# installed --no-deps (transformers 4.48 …), bitsandbytes 0.50.2 (CUDA-13 library only), DeepSpeed
# 0.16.2 built from its sdist with DS_BUILD_OPS=0, and the torchrun shim. FIELD-NOTES: "XTuner".
#   bash scripts/device/training_venv.sh /tmp/xt      → /tmp/xt/bin/python, /tmp/xt/bin/xtuner
# Used by train_loop.sh (in the background) and train_throughput.sh.
set -u
cd "$(dirname "$0")/../.."
XT=${1:?usage: training_venv.sh VENV_DIR}
PY=${PY:-python3}
D=${D:-$PWD/.device}
t=$SECONDS
if "$PY" -m venv --system-site-packages "$XT"; then
  PIP=("$XT/bin/python" -m pip)
else
  echo "venv with pip failed; using the machine's pip --python"
  "$PY" -m venv --without-pip --system-site-packages "$XT" || exit 8
  PIP=("$PY" -m pip --python "$XT/bin/python")
fi
env -u PYTHONPATH "${PIP[@]}" install -q --no-index --no-deps "$D"/train/*.whl \
  "$D"/wheels/{annotated_types,termcolor,platformdirs,rich,markdown_it_py,mdurl,pygments}-*.whl 2>&1 \
  | grep -v '^WARNING' | tail -3
PURELIB=$(env -u PYTHONPATH "$XT/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# The machine's python3 is itself a venv (/opt/torch/.venv): --system-site-packages alone reaches
# only the base interpreter's packages, not its torch (training/environment.py: link_parent_site).
env -u PYTHONPATH "$PY" -c "from pathlib import Path; from training.environment import link_parent_site as l; print('linked:', l(Path('$XT'), '$PY'))"
cp -r "$D"/train/bnb/bitsandbytes "$D"/train/bnb/bitsandbytes-*.dist-info "$PURELIB/"
echo "wheels + bitsandbytes: $((SECONDS - t)) s"
env -u PYTHONPATH DS_BUILD_OPS=0 "${PIP[@]}" install -q --no-index --no-deps \
  --no-build-isolation "$D"/train/deepspeed-*.tar.gz 2>&1 | grep -v '^WARNING' | tail -5
if ! env -u PYTHONPATH "$XT/bin/python" -c "import deepspeed" 2>/dev/null; then
  echo "DeepSpeed did not build with the machine's setuptools: retrying with setuptools 84"
  env -u PYTHONPATH "${PIP[@]}" install -q --no-index --no-deps "$D"/train-extra/setuptools-*.whl
  env -u PYTHONPATH DS_BUILD_OPS=0 "${PIP[@]}" install -q --no-index --no-deps \
    --no-build-isolation "$D"/train/deepspeed-*.tar.gz 2>&1 | grep -v '^WARNING' | tail -5
fi
echo "+ deepspeed: $((SECONDS - t)) s"
if ! env -u PYTHONPATH "$XT/bin/python" -c "import skimage" 2>/dev/null; then
  echo "NOTE: no scikit-image here: xtuner.dataset imports skimage.io (for RefCOCO only): stubbed"
  mkdir -p "$PURELIB/skimage"
  echo "# stub written by scripts/device/train_loop.sh: scikit-image is not installed" \
    > "$PURELIB/skimage/__init__.py"
  printf 'def imread(*args, **kwargs):\n    raise ImportError("scikit-image is not installed (stub)")\n' \
    > "$PURELIB/skimage/io.py"
fi
env -u PYTHONPATH "$PY" -c "from pathlib import Path; from training.environment import write_torchrun_shim as w; w(Path('$XT'))"
echo "training venv ready: $((SECONDS - t)) s"
