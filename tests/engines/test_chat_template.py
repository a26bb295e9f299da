"""The shipped LMDeploy chat template renders exactly the text XTuner trains InternVL2 on.

Two renderers, each written here from its project's documented behaviour:

* LMDeploy (``--chat-template FILE``, ``BaseChatTemplate``): a JSON template is applied as
  ``{system}{meta_instruction}{eosys}{user}{user_content}{eoh}{assistant}{assistant_content}{eoa}
  {separator}{user}…`` ending with ``{assistant}``; a leading system message replaces
  ``meta_instruction``; fields missing from the JSON are ``''``. For InternVL, each picture in a
  user turn becomes ``<img><IMG_CONTEXT></img>\\n`` at its place in the content list, and the
  ``<IMG_CONTEXT>`` placeholder is expanded to 256 tokens per tile after tokenisation.
* XTuner 0.2.0 (``InternVL_V1_5_Dataset`` with ``PROMPT_TEMPLATE.internlm2_chat``, InternLM2 LLM):
  SYSTEM ``<|im_start|>system\\n{system}<|im_end|>`` (no newline), INSTRUCTION
  ``<|im_start|>user\\n{input}<|im_end|><|im_start|>assistant\\n`` (no newline), SUFFIX
  ``<|im_end|>`` after every answer, the system text "You are an AI assistant whose name is
  InternLM (书生·浦语)." on the first turn; ``<image>`` is removed from the human text, which is
  stripped and prefixed by ``<img>`` + ``<IMG_CONTEXT>``×tokens + ``</img>`` + ``\\n``; answers are
  stripped. Both add the tokenizer's BOS once at the start.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from bot.engines.lmdeploy_server import TEMPLATE
from bot.engines.openai_http import OpenAIHTTPEngine
from bot.models import GenerationParams
from bot.settings import DEFAULT_PROMPT, EngineSettings

FIELDS = ("system", "meta_instruction", "eosys", "user", "eoh", "assistant", "eoa", "separator")
IMG_CONTEXT = "<IMG_CONTEXT>"

# XTuner 0.2.0's InternVL + InternLM2 training format (see the module docstring).
XTUNER_SYSTEM = "<|im_start|>system\n{system}<|im_end|>"
XTUNER_INSTRUCTION = "<|im_start|>user\n{input}<|im_end|><|im_start|>assistant\n"
XTUNER_SUFFIX = "<|im_end|>"
XTUNER_SYSTEM_TEXT = "You are an AI assistant whose name is InternLM (书生·浦语)."
XTUNER_STOP_WORDS = ["<|im_end|>"]


def template() -> dict[str, Any]:
    return json.loads(TEMPLATE.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- LMDeploy's side


def lmdeploy_content(content: Any) -> str:
    """InternVL's message preprocessing in LMDeploy: pictures in place, text as is."""
    if isinstance(content, str):
        return content
    parts = []
    for item in content:
        if item["type"] == "text":
            parts.append(item["text"])
        elif item["type"] in ("image_url", "image"):
            parts.append(f"<img>{IMG_CONTEXT}</img>\n")
        else:
            raise ValueError(item["type"])
    return "".join(parts)


def render_lmdeploy(tpl: dict[str, Any], messages: list[dict[str, Any]], tokens: int) -> str:
    t = {key: tpl.get(key) or "" for key in FIELDS}
    meta = tpl.get("meta_instruction")
    box = {"user": t["user"], "assistant": t["assistant"], "system": t["system"]}
    end = {"user": t["eoh"], "assistant": t["eoa"] + t["separator"], "system": t["eosys"]}
    out = ""
    if meta is not None and messages and messages[0]["role"] != "system":
        out += t["system"] + meta + t["eosys"]
    for message in messages:
        role = message["role"]
        out += box[role] + lmdeploy_content(message["content"]) + end[role]
    if messages and messages[-1]["role"] == "assistant":
        out = out[: len(out) - len(end["assistant"])] if end["assistant"] else out
    else:
        out += t["assistant"]
    return out.replace(IMG_CONTEXT, IMG_CONTEXT * tokens)


# --------------------------------------------------------------------------- XTuner's side


def render_xtuner(conversations: list[dict[str, str]], tokens: int) -> tuple[str, list[str]]:
    """Training text of one sample and, per turn, the prompt the answer follows."""
    image_str = "<img>" + IMG_CONTEXT * tokens + "</img>"
    text, prompts, pending = "", [], ""
    for message in conversations:
        if message["from"] == "human":
            value = message["value"]
            if "<image>" in value:
                value = value.replace("<image>", "").strip()
                value = (image_str + "\n" + value).strip()
            pending += value.strip()
        else:
            instruction = XTUNER_INSTRUCTION.format(input=pending)
            if not prompts:
                instruction = XTUNER_SYSTEM.format(system=XTUNER_SYSTEM_TEXT) + instruction
            text += instruction
            prompts.append(text)
            text += message["value"].strip() + XTUNER_SUFFIX
            pending = ""
    return text, prompts


# --------------------------------------------------------------------------- comparisons


def test_every_field_is_set() -> None:
    tpl = template()
    for key in (*FIELDS, "model_name", "capability", "stop_words"):
        assert key in tpl, f"{key} unset: LMDeploy would use ''"
    assert tpl["model_name"].startswith("oogiri-")  # never a built-in template's name
    assert tpl["capability"] == "chat"
    assert set(XTUNER_STOP_WORDS) <= set(tpl["stop_words"])
    assert tpl["eoa"] == XTUNER_SUFFIX


@pytest.mark.parametrize("tiles", [1, 6, 12])
def test_single_turn_prompt_matches_training(tiles: int) -> None:
    tokens = (tiles + (1 if tiles > 1 else 0)) * 256
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,AA"}},
                {"type": "text", "text": DEFAULT_PROMPT},
            ],
        }
    ]
    sample = [
        {"from": "human", "value": f"<image>\n{DEFAULT_PROMPT}"},
        {"from": "gpt", "value": "这只猫在思考人生。"},
    ]
    _, prompts = render_xtuner(sample, tokens)
    assert render_lmdeploy(template(), messages, tokens) == prompts[0]
    assert prompts[0].count(IMG_CONTEXT) == tokens


def test_multi_turn_matches_training() -> None:
    tokens = 256
    sample = [
        {"from": "human", "value": "<image>\n讲个梗"},
        {"from": "gpt", "value": "  第一个梗 "},
        {"from": "human", "value": "再来一个"},
        {"from": "gpt", "value": "第二个梗"},
    ]
    full, prompts = render_xtuner(sample, tokens)
    image = {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,AA"}}
    messages = [
        {"role": "user", "content": [image, {"type": "text", "text": "讲个梗"}]},
        {"role": "assistant", "content": "第一个梗"},
        {"role": "user", "content": "再来一个"},
    ]
    assert render_lmdeploy(template(), messages, tokens) == prompts[1]
    # the answer the model learnt ends with eoa, which is a stop word
    assert full == prompts[1] + "第二个梗" + template()["eoa"]


def test_the_engine_request_renders_to_the_training_prompt() -> None:
    """What the bot sends (picture first, stripped prompt) is what XTuner trained on."""
    engine = OpenAIHTTPEngine(EngineSettings(), flavor="lmdeploy")
    body = engine.build_payload(
        "m", "data:image/jpeg;base64,AA", f" {DEFAULT_PROMPT}\n", GenerationParams()
    )
    tokens = 7 * 256
    _, prompts = render_xtuner(
        [{"from": "human", "value": f"<image>\n{DEFAULT_PROMPT}"}, {"from": "gpt", "value": "x"}],
        tokens,
    )
    assert render_lmdeploy(template(), body["messages"], tokens) == prompts[0]


def test_renderers_disagree_with_the_stock_internvl2_template() -> None:
    """A guard on the renderers themselves: InternVL2's own (newline) template must differ."""
    stock = {
        "system": "<|im_start|>system\n",
        "meta_instruction": "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，"
        "英文名叫InternVL, 是一个有用无害的人工智能助手。",
        "eosys": "<|im_end|>\n",
        "user": "<|im_start|>user\n",
        "eoh": "<|im_end|>\n",
        "assistant": "<|im_start|>assistant\n",
        "eoa": "<|im_end|>",
        "separator": "\n",
    }
    messages = [{"role": "user", "content": [{"type": "image_url"}, {"type": "text", "text": "x"}]}]
    sample = [{"from": "human", "value": "<image>\nx"}, {"from": "gpt", "value": "y"}]
    _, prompts = render_xtuner(sample, 256)
    assert render_lmdeploy(stock, messages, 256) != prompts[0]
    assert render_lmdeploy(template(), messages, 256) == prompts[0]


def test_lmdeploy_itself_renders_the_same() -> None:
    """Where LMDeploy is installed (the GPU machine), its own template code must agree."""
    model = pytest.importorskip("lmdeploy.model")
    config = model.ChatTemplateConfig.from_json(str(TEMPLATE))
    chat = config.chat_template()
    messages = [
        {"role": "user", "content": f"<img>{IMG_CONTEXT}</img>\n{DEFAULT_PROMPT}"},
        {"role": "assistant", "content": "第一个梗"},
        {"role": "user", "content": "再来一个"},
    ]
    ours = render_lmdeploy(template(), messages, 1)
    assert chat.messages2prompt(messages) == ours
