"""Stand-in for XTuner's convert_to_official.py CONFIG CHECKPOINT SAVE_PATH.

Like the real one on transformers 4.48 it writes the model and tokenizer files of the base model
named in the config (here: copies them, so a real base model stays loadable) but omits the
remote-code ``*.py`` files. FAKE_CONVERT: rc (exit 2), empty (writes nothing, exit 0).
"""

import ast
import os
import shutil
import sys
from pathlib import Path


def main() -> int:
    config, checkpoint, save = sys.argv[1:4]
    mode = os.environ.get("FAKE_CONVERT", "ok")
    if mode == "rc":
        print("ValueError: checkpoint does not match the model", flush=True)
        return 2
    if not Path(checkpoint).exists():
        print(f"FileNotFoundError: {checkpoint}")
        return 1
    out = Path(save)
    out.mkdir(parents=True, exist_ok=True)
    if mode == "empty":
        return 0
    base = None
    for node in ast.parse(Path(config).read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "path":
            base = Path(ast.literal_eval(node.value))
    assert base is not None and base.is_dir(), base
    for f in base.iterdir():
        if f.is_file() and f.suffix != ".py" and f.name != "oogiri-model.json":
            shutil.copy2(f, out / f.name)
    print(f"converted {checkpoint} -> {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
