#!/usr/bin/env bash
# The live A/B test end to end with real processes on a CPU machine (no GPU, no model):
#   oogiri serve (web channel, managed LMDeploy engine whose `lmdeploy` is tests/fakes/fake_lmdeploy.py)
#   → `oogiri models ab start v2` → 60 web users ask for jokes and vote through the web API
#   → serve decides (ab.check_minutes) and promotes v2 through `oogiri engine swap` and its
#     control socket → the previous model stays on a small arm (the watch).
# Prints `oogiri models ab status`, `oogiri models list`, /api/ab and the A/B metrics.
#   bash scripts/ab_smoke_cpu.sh            (PORT, WEBPORT choose the ports; about 40 s)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
OOGIRI=${OOGIRI:-$ROOT/.venv/bin/oogiri}
S=$(mktemp -d /tmp/oogiri-ab-smoke.XXXXXX)
mkdir -p "$S/models/v1" "$S/models/v2"
for v in v1 v2; do
  echo '{"architectures": ["InternVLChatModel"]}' > "$S/models/$v/config.json"
  echo "{\"version\": \"$v\"}" > "$S/models/$v/oogiri-model.json"
done
export OOGIRI_DATA_DIR=$S/data
export OOGIRI_ENGINE__NAME=lmdeploy OOGIRI_ENGINE__MANAGE=true OOGIRI_ENGINE__MODEL=$S/models/v1
export OOGIRI_ENGINE__MODEL_VERSION=v1 OOGIRI_ENGINE__PORT=${PORT:-41333}
export OOGIRI_ENGINE__MAX_DYNAMIC_PATCH=1
export OOGIRI_ENGINE__SERVER_COMMAND="[\"$PY\", \"$ROOT/tests/fakes/fake_lmdeploy.py\"]"
export OOGIRI_WEB__PORT=${WEBPORT:-41800} OOGIRI_WEB__UPLOADS_PER_IP_PER_MINUTE=0
export OOGIRI_WEB__VOTES_PER_IP_PER_MINUTE=0 OOGIRI_WEB__NEW_SESSIONS_PER_IP_PER_HOUR=0
export OOGIRI_WEB__INFLIGHT_UPLOADS_PER_IP=0 OOGIRI_LIMITS__PER_USER_PER_MINUTE=0
export OOGIRI_AB__SHARE=0.5 OOGIRI_AB__MIN_VOTES=20 OOGIRI_AB__POLL_S=1
export OOGIRI_AB__CHECK_MINUTES=0.05 OOGIRI_AB__WATCH_SHARE=0.25
export FAKE_LMDEPLOY_STARTUP_S=0.3
BASE=http://127.0.0.1:$OOGIRI_WEB__PORT

"$OOGIRI" serve --channels web > "$S/serve.log" 2>&1 &
SERVE=$!
trap 'kill $SERVE 2>/dev/null; wait $SERVE 2>/dev/null; echo "logs: $S"' EXIT
for _ in $(seq 120); do curl -fsS "$BASE/healthz" >/dev/null 2>&1 && break; sleep 0.5; done

"$PY" - <<'PY'
import asyncio
from bot.settings import Settings
from bot.store import Store
from training.run import ensure_registry

async def main() -> None:
    s = Settings()
    store = Store(s.database_url, s.images_dir)
    await store.upgrade()
    print("active:", (await ensure_registry(store, s)).version)
    await store.add_model_version("v2", str(s.data_dir.parent / "models" / "v2"), parent="v1")
    await store.close()

asyncio.run(main())
PY
"$OOGIRI" models ab start v2

"$PY" - <<'PY'
import io, os, time
import httpx
from PIL import Image

base = f"http://127.0.0.1:{os.environ['OOGIRI_WEB__PORT']}"
time.sleep(2.5)  # serve looks at the store every second: the candidate's server is up
seen: dict[str, int] = {}
for u in range(60):
    with httpx.Client(base_url=base, headers={"Origin": base}) as c:
        token = c.get("/api/session").json()["csrf_token"]
        for k in range(2):
            buf = io.BytesIO()
            Image.new("RGB", (80, 60), ((u * 2 + k) * 41 % 255, 80, 160)).save(buf, "JPEG")
            r = c.post("/api/jokes", files={"image": ("p.jpg", buf.getvalue(), "image/jpeg")})
            r.raise_for_status()
            joke = r.json()
            version = joke["model_version"]
            seen[version] = seen.get(version, 0) + 1
            liked = (version == "v2") == (k == 0 or u % 4 != 0)  # this audience prefers v2
            r = c.post(f"/api/jokes/{joke['id']}/rating", json={"value": 1 if liked else -1},
                       headers={"X-CSRF-Token": token})
            r.raise_for_status()
print("jokes per version:", seen)
PY
for _ in $(seq 60); do
  "$OOGIRI" models ab status --json | "$PY" -c 'import json,sys; d=json.load(sys.stdin); sys.exit(0 if any(t["kind"]=="watch" for t in d["tests"]) else 1)' && break
  sleep 1
done
COLUMNS=160 "$OOGIRI" models ab status --limit 2
COLUMNS=160 "$OOGIRI" models list
curl -fsS "$BASE/api/ab" | "$PY" -c 'import json,sys; d=json.load(sys.stdin); print("api/ab running:", d["running"]["kind"], d["running"]["control"], "vs", d["running"]["candidate"])'
curl -fsS "$BASE/metrics" | grep -E "^oogiri_ab_(votes|like_rate|decision)|^oogiri_model_rollbacks" || true
