"""Write the proxy's pretrained tiny base in InternVL2's layout, for the device experiment.

The CPU proxy pretrains in transformers' native layout; XTuner and LMDeploy need InternVL2's.
``save_internvl2`` writes the weights back into a copy of the random base folder (tokenizer,
config, remote code unchanged) through ``convert_internvl2.unmap_tensor``, so the device starts
from the base the proxy measured (staged as ``.device/pretrained-base``).

    python -m bench.learning_loop.proxy --pretrain-epochs 6 --rounds 0 --controls \\
        --save-base .device/pretrained-base
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from bot.engines.internvl.convert_internvl2 import _shapes, read_source_config, unmap_tensor
from bot.engines.internvl.tinymodel import MARKER


def native_state(model: Any) -> dict[str, Any]:
    """The model's tensors under the names ``save_pretrained`` gives them, LoRA wrappers removed.

    The proxy's LoRA modules keep the wrapped layer as ``.linear`` and add ``.a``/``.b``; after
    ``Proxy.merge`` the adapters are zero, so the plain layers carry the whole model.
    """
    from safetensors.torch import load_file

    plain = copy.deepcopy(model)
    for module in list(plain.modules()):
        for name, child in list(module.named_children()):
            if hasattr(child, "linear") and hasattr(child, "a") and hasattr(child, "b"):
                setattr(module, name, child.linear)
    with tempfile.TemporaryDirectory(prefix="oogiri-native-") as tmp:
        plain.save_pretrained(tmp)
        state: dict[str, Any] = {}
        for file in sorted(Path(tmp).glob("*.safetensors")):
            state |= load_file(str(file))
    return state


def save_internvl2(src: Path, model: Any, dst: Path, version: str | None = None) -> Path:
    """Copy the InternVL2 folder ``src`` to ``dst`` with ``model``'s weights in its layout."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    shapes = _shapes(read_source_config(src))
    native = native_state(model)
    weights = src / "model.safetensors"
    if not weights.is_file():
        raise SystemExit(f"{src}: expected one model.safetensors (a tiny InternVL2 base)")
    out: dict[str, Any] = {}
    with safe_open(str(weights), "pt") as f:
        for name in f.keys():
            old = f.get_tensor(name)
            new = unmap_tensor(name, old, native, shapes)
            if tuple(new.shape) != tuple(old.shape):
                raise SystemExit(f"{name}: shape {tuple(new.shape)} != {tuple(old.shape)}")
            out[name] = new.to(old.dtype).contiguous()
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    marker_path = dst / MARKER
    marker = json.loads(marker_path.read_text(encoding="utf-8")) if marker_path.is_file() else {}
    old_version = str(marker.get("version", "tiny"))
    marker |= {
        "version": version or old_version.replace("random", "pretrained"),
        "pretrained_from": old_version,
        "note": "the tiny random base pretrained by bench.learning_loop.proxy (see its command)",
    }
    marker_path.write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    return dst
