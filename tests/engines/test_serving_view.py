"""The managed server serves InternVL2 folders through the project's config class (serving_view)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from test_lmdeploy_server import FAKE_CMD, free_port_block

from bot.engines.internvl.tinymodel import make_tiny_model
from bot.engines.lmdeploy_server import LMDeployEngineSettings as EngineSettings
from bot.engines.lmdeploy_server import ServerProcess
from bot.engines.serving_view import PROJECT_CONFIG, needs_view, serving_folder

# What a real InternVL2-2B folder (and every model XTuner's convert_to_official writes) carries:
# InternVL's own config class, which LMDeploy 0.18 on transformers 5 cannot use.
FOREIGN_CONFIG = """
from transformers import PretrainedConfig


class InternVLChatConfig(PretrainedConfig):
    model_type = "internvl_chat"

    def __init__(self, llm_config=None, vision_config=None, **kwargs):
        super().__init__(**kwargs)
        self.llm_config = llm_config  # stays a dict: the engine dies on llm_config.hidden_size
        self.vision_config = vision_config
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("m") / "tiny", layout="internvl2")


def foreign_folder(tiny: Path, root: Path) -> Path:
    """The tiny model as InternVL ships it: their config class + auto_map for their model code."""
    folder = root / "internvl2-ft"
    folder.mkdir()
    for f in tiny.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "configuration_internvl_chat.py").write_text(FOREIGN_CONFIG)
    (folder / "tokenization_internlm2.py").write_text("# InternVL's tokenizer code\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
        "AutoModel": "modeling_internvl_chat.InternVLChatModel",
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def test_a_folder_with_the_projects_class_is_served_as_it_is(tiny: Path, tmp_path: Path) -> None:
    assert not needs_view(tiny)
    assert serving_folder(tiny, tmp_path / "views") == tiny.resolve()
    assert not (tmp_path / "views").exists()


def test_a_non_internvl_folder_is_served_as_it_is(tmp_path: Path) -> None:
    hf = make_tiny_model(tmp_path / "hf", layout="hf")
    assert serving_folder(hf, tmp_path / "views") == hf.resolve()


def test_internvls_own_class_is_swapped_in_a_view(tiny: Path, tmp_path: Path) -> None:
    folder = foreign_folder(tiny, tmp_path)
    before = snapshot(folder)
    view = serving_folder(folder, tmp_path / "views")

    assert view != folder and view.parent == tmp_path / "views"
    assert snapshot(folder) == before  # the model folder is never touched
    config = json.loads((view / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig"}
    assert config["llm_config"] == json.loads(before["config.json"])["llm_config"]
    assert (view / "configuration_internvl_chat.py").read_bytes() == PROJECT_CONFIG.read_bytes()
    for name in before:
        if name not in ("config.json", "configuration_internvl_chat.py"):
            assert (view / name).is_symlink(), name
            assert (view / name).resolve() == (folder / name).resolve()
    assert (view / "tokenization_internlm2.py").exists()  # the tokenizer's remote code stays

    # the same folder again: the same view, not rebuilt; a changed config: a new one
    mtime = (view / "config.json").stat().st_mtime_ns
    assert serving_folder(folder, tmp_path / "views") == view
    assert (view / "config.json").stat().st_mtime_ns == mtime
    config = json.loads(before["config.json"])
    config["max_dynamic_patch"] = 6
    (folder / "config.json").write_text(json.dumps(config))
    assert serving_folder(folder, tmp_path / "views") not in (view, folder)
    assert not [p for p in (tmp_path / "views").iterdir() if p.name.startswith(".")]


def test_the_view_loads_with_an_llm_config_object(tiny: Path, tmp_path: Path) -> None:
    """What LMDeploy needs: AutoConfig with remote code gives llm_config attributes, not a dict."""
    from transformers import AutoConfig

    folder = foreign_folder(tiny, tmp_path)
    broken = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert isinstance(broken.llm_config, dict)  # what made the engine die
    config = AutoConfig.from_pretrained(
        serving_folder(folder, tmp_path / "views"), trust_remote_code=True
    )
    saved = json.loads((tiny / "config.json").read_text())
    assert config.llm_config.hidden_size == saved["llm_config"]["hidden_size"]
    assert config.llm_config.rope_parameters["rope_theta"] == saved["llm_config"]["rope_theta"]
    assert config.vision_config.image_size == saved["vision_config"]["image_size"]


async def test_the_managed_server_is_started_on_the_view(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = foreign_folder(tiny, tmp_path)
    monkeypatch.setenv("FAKE_LMDEPLOY_STARTUP_S", "0.1")
    settings = EngineSettings(server_command=FAKE_CMD, startup_timeout_s=30)
    logs = tmp_path / "data" / "logs"
    server = ServerProcess(settings, folder, free_port_block(), "m", "ft-1", logs)
    try:
        await server.start()
        await asyncio.wait_for(server.wait_healthy(), 30)
        view = next((tmp_path / "data" / "lmdeploy-views").iterdir())
        assert str(view) in server.command and str(folder) not in server.command
        assert f"argv=['serve', 'api_server', '{view}'" in server.log_path.read_text()
    finally:
        await server.stop(grace_s=5)
