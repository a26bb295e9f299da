"""bench/capture_lmdeploy.py records exchanges in exactly the format the fake server replays."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from pathlib import Path

import pytest
from enginesupport import engine_settings, jpeg_image
from fake_lmdeploy import FIXTURES

from bot.engines.openai_http import OpenAIHTTPEngine, clean_text
from bot.models import EngineError, GenerationParams, ImageRejected

ROOT = Path(__file__).resolve().parents[2]


def load_tool():
    spec = importlib.util.spec_from_file_location(
        "capture_lmdeploy", ROOT / "bench" / "capture_lmdeploy.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["capture_lmdeploy"] = module
    spec.loader.exec_module(module)
    return module


async def test_capture_then_replay(tmp_path: Path, fake_server) -> None:
    tool = load_tool()
    live = fake_server(api_keys=["sk-cap"], model_name="tiny")
    out = tmp_path / "captured"
    await _in_thread(
        tool.main,
        [
            "--base-url",
            live.url,
            "--api-key",
            "sk-cap",
            "--out",
            str(out),
            "--lmdeploy-version",
            "x",
        ],
    )
    names = {p.stem for p in out.glob("*.json")}
    assert {
        "health",
        "models",
        "models_unauthorized",
        "chat_success",
        "chat_stream_success",
        "chat_unauthorized",
        "chat_bad_image",
    } <= names
    for path in out.glob("*.json"):
        doc = json.loads(path.read_text(encoding="utf-8"))
        assert doc["source"] == "captured" and doc["lmdeploy_version"] == "x"
        assert "sk-cap" not in path.read_text(encoding="utf-8")
        assert "base64," not in path.read_text(encoding="utf-8")  # pictures are summarised
    stream = json.loads((out / "chat_stream_success.json").read_text())
    assert stream["response"]["sse"]

    # fill the gaps with the shipped fixtures, then replay the captured ones
    for path in FIXTURES.glob("*.json"):
        if not (out / path.name).exists():
            (out / path.name).write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
    replay = fake_server(fixtures_dir=out, api_keys=["sk-cap"], script=["chat_success"])
    engine = OpenAIHTTPEngine(engine_settings(replay.url, api_key="sk-cap"))
    try:
        gen = await engine.generate(jpeg_image(640, 480), "讲个梗", GenerationParams())
        captured = json.loads((out / "chat_success.json").read_text())
        assert gen.text == clean_text(
            captured["response"]["body"]["choices"][0]["message"]["content"]
        )
        assert gen.model == replay.model_name
        replay.script.append("chat_bad_image")
        with pytest.raises(ImageRejected):
            await engine.generate(jpeg_image(640, 480), "讲个梗", GenerationParams())
        bad_key = OpenAIHTTPEngine(
            engine_settings(replay.url, api_key="nope", served_model_name="m")
        )
        try:
            with pytest.raises(EngineError, match="bad API key"):
                await bad_key.generate(jpeg_image(64, 64), "x", GenerationParams())
        finally:
            await bad_key.close()
    finally:
        await engine.close()


async def _in_thread(fn, *args):
    return await asyncio.to_thread(fn, *args)
