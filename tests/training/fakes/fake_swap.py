"""Stand-in for ``oogiri engine swap MODEL_DIR``: records the call; FAKE_SWAP=fail exits 1."""

import json
import os
import sys
from pathlib import Path

record = Path(os.environ["FAKE_SWAP_RECORD"])
if os.environ.get("FAKE_SWAP") == "fail":
    print("swap failed: new server never became healthy", flush=True)
    sys.exit(1)
calls = json.loads(record.read_text()) if record.exists() else []
calls.append(sys.argv[1:])
record.write_text(json.dumps(calls))
print("swapped to", sys.argv[1], flush=True)
