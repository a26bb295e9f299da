"""The folder LMDeploy is given for an InternVL2 model: the model's own, or a view of it.

LMDeploy 0.18 on transformers 5 cannot use InternVL2's own config class: its ``llm_config`` stays
a plain dict and the engine dies at start (``'dict' object has no attribute 'hidden_size'``,
seen on the device with the code a real InternVL2-2B download ships and with every model XTuner's
convert_to_official writes). Serving needs only the *config* class (no modeling code is loaded),
so the managed server serves a view of the folder: every file linked, except ``config.json``
(its ``auto_map.AutoConfig`` pointed at the project's class) and ``configuration_internvl_chat.py``
(the project's, which fills both transformers 4's and 5's rope fields). The model folder itself
is never modified: XTuner and the evaluation still load it with InternVL's own code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

PROJECT_CONFIG = (
    Path(__file__).resolve().parent / "internvl" / "remote_code" / "configuration_internvl_chat.py"
)
CONFIG_MODULE = "configuration_internvl_chat"
CONFIG_CLASS = f"{CONFIG_MODULE}.InternVLChatConfig"


def needs_view(model_dir: Path) -> bool:
    """An InternVLChatModel folder whose config class is not the project's."""
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # not ours to judge: LMDeploy reports a broken folder itself
    auto = (config.get("auto_map") or {}).get("AutoConfig", "")
    if not isinstance(auto, str) or auto.split("--")[-1] != CONFIG_CLASS:
        return False
    own = model_dir / f"{CONFIG_MODULE}.py"
    return not (own.is_file() and own.read_bytes() == PROJECT_CONFIG.read_bytes())


def serving_folder(model_dir: Path, views_dir: Path) -> Path:
    """``model_dir`` if LMDeploy can serve it as it is, else a view under ``views_dir``.

    The view's name hashes the folder's path, its config.json and the project's class, so a
    changed model or an upgraded bot gets a fresh view; building goes through a temporary name
    and one rename, so two processes starting the same model never see a half-built view.
    """
    model_dir = Path(model_dir).resolve()
    if not needs_view(model_dir):
        return model_dir
    config_bytes = (model_dir / "config.json").read_bytes()
    digest = hashlib.sha256(
        str(model_dir).encode() + b"\0" + config_bytes + b"\0" + PROJECT_CONFIG.read_bytes()
    ).hexdigest()[:12]
    view = Path(views_dir) / f"{model_dir.name}-{digest}"
    if (view / "config.json").is_file():
        return view
    tmp = view.with_name(f".{view.name}.{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        for entry in model_dir.iterdir():
            if entry.name in ("config.json", f"{CONFIG_MODULE}.py"):
                continue
            os.symlink(entry, tmp / entry.name)
        shutil.copyfile(PROJECT_CONFIG, tmp / f"{CONFIG_MODULE}.py")
        config = json.loads(config_bytes)
        # LMDeploy loads no modeling code; AutoModel entries would point at InternVL's files
        config["auto_map"] = {"AutoConfig": CONFIG_CLASS}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        try:
            tmp.rename(view)
        except OSError:  # another process won the race: its view is the same
            if not (view / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return view
