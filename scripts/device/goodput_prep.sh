#!/usr/bin/env bash
# Run HERE (a machine with PyPI) right before a goodput device call (scripts/device/goodput_call.sh):
#   1. the git-ignored kit .device/ (wheels, LMDeploy's Python package, photos) if it is missing:
#      bench/device_prep.sh with TRAIN=0;
#   2. .device/goodput-tree: a git archive of REF (default HEAD; + COMMIT), so the call runs committed
#      code only, never someone's uncommitted edits in the shared checkout (pass the commit the
#      CPU dry run passed on to run exactly that);
#   3. what travels against the 64 MiB limit with
#      run(carry=[".device/wheels", ".device/lmdeploy", ".device/photos", ".device/goodput-tree"])
#      (not the whole .device/: other calls keep their own things there, e.g. train/).
#     bash scripts/device/goodput_prep.sh [REF]
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ ! -f .device/lmdeploy/lmdeploy/version.py ] || ! ls .device/wheels/fastapi-*.whl >/dev/null 2>&1; then
  TRAIN=0 bash bench/device_prep.sh || true  # its last line (du … ext) fails without ext/
fi
for need in .device/lmdeploy/lmdeploy/version.py .device/photos/chelsea.png; do
  [ -f "$need" ] || { echo "missing $need: bench/device_prep.sh did not finish" >&2; exit 1; }
done
TREE=.device/goodput-tree
rm -rf "$TREE" && mkdir -p "$TREE"
REF=${1:-HEAD}
git archive "$REF" | tar -x -C "$TREE"
git rev-parse --short "$REF" > "$TREE/COMMIT"
echo "tree: $(cat "$TREE/COMMIT"), $(du -sh "$TREE" | cut -f1)"
# the device tool sends tracked + untracked-not-ignored files + the carried paths
travels=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } \
  | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
kit=$(du -sbc .device/wheels .device/lmdeploy .device/photos "$TREE" | tail -1 | cut -f1)
awk -v t="$travels" -v k="$kit" 'BEGIN { printf "travels: checkout %.1f MiB + carried .device parts %.1f MiB = %.1f MiB (limit 64)\n", t/1048576, k/1048576, (t+k)/1048576; exit ((t+k) > 64*1048576) }'
