"""A tiny, randomly initialised InternVL model for tests and demos: real files, seconds to build.

``make_tiny_model(dir)`` writes a folder that transformers loads natively
(``InternVLForConditionalGeneration``: InternViT vision + Qwen2 text), with a byte-level BPE
tokenizer trained here on a small built-in corpus, InternVL's special tokens and a chat template,
the processor files (dynamic tiling into 448² tiles, 256 image tokens per tile) and
``model.safetensors``. Nothing is downloaded. Its answers are random noise: it exists so that the
whole path (processor → model → generate) runs for real on any CPU.

``AutoProcessor`` loads the folder as ``InternVLProcessor`` only where torchvision is installed
(transformers 5 needs it for InternVL's video processor); ``AutoTokenizer`` and
``AutoImageProcessor`` load it everywhere, and that is what the transformers engine uses.

``layout="internvl2"`` writes InternVL2's original remote-code layout (what XTuner fine-tunes and
LMDeploy serves) with a fast tokenizer; adding ``tokenizer="sentencepiece"`` gives it the tokenizer
a real InternVL2-2B download has instead (InternLM2's sentencepiece ``tokenizer.model``, trained
here, with InternVL's added tokens in ``tokenizer_config.json`` / ``added_tokens.json``): the input
that ``oogiri dev convert-internvl2`` is tested on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

# what adds torch and transformers, for an install from PyPI and from a checkout
LOCAL_EXTRA = "pip install 'oogiri[local]' (from a checkout: pip install -e '.[local]')"

MARKER = "oogiri-model.json"
LAYOUTS = ("hf", "internvl2")
TOKENIZERS = ("fast", "sentencepiece")

# InternVL's tokens. The processor finds the image tokens through these tokenizer attributes.
IMAGE_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
PAD = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END, *IMAGE_TOKENS.values()]

TILE = 448  # InternVL's tile side; 448/14 = 32 patches a side, pixel-shuffled ×0.5 → 256 tokens
PATCH = 14
VOCAB_LIMIT = 1024  # BPE stops earlier when the corpus runs out (~920 tokens)
HIDDEN = 64
LAYERS = 2
HEADS = 4
MAX_POSITIONS = 16384  # 40 tiles (settings' upper bound) × 256 + text

# A ChatML template; an image item becomes <IMG_CONTEXT>, which the processor expands to
# <img> + <IMG_CONTEXT> × (256 × tiles) + </img>.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '<IMG_CONTEXT>\\n' -}}"
    "{%- elif item['type'] == 'video' -%}{{- '<video>\\n' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Enough text for BPE to learn the default prompt's characters, common English and some joke-ish
# Chinese; written for this project.
CORPUS = [
    "请你根据这张图片，讲一个脑洞大开的梗",
    "请你根据这张图片，讲一个脑洞大开的梗。",
    "这张图片告诉我们：猫才是这个家真正的主人。",
    "科学家发现，咖啡喝多了会让人以为自己是火箭。",
    "宇航员说：我不是迷路了，我只是在找外星人的厕所。",
    "老板说今天加班，我的摩托车先下班了。",
    "当你以为周末到了，其实今天才星期一。",
    "这只猫看起来很严肃，因为它刚刚发现冰箱是空的。",
    "我们的梗图，你的笑声，大家的快乐。",
    "一个人，一杯茶，一张图，一个笑话。",
    "图片里的狗在想什么？它在想晚饭吃什么。",
    "你好，世界！今天天气很好，我们去看电影吧。",
    "Please tell a funny joke about this picture.",
    "Plot twist: the cat was the photographer all along.",
    "Breaking news: local coffee cup declares independence from the kitchen.",
    "The astronaut forgot the keys, so the rocket stayed home.",
    "When the motorcycle sees a speed bump, it pretends to be a horse.",
    "Why did the picture go to school? To improve its resolution.",
    "This is the face of someone who has read the terms and conditions.",
    "I am not lazy, I am in energy saving mode.",
    "The quick brown fox jumps over the lazy dog 0123456789 times.",
    "What do you call a joke without a punchline? A meeting.",
    "Hello, world! How are you today? Good morning and good night.",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z , . ! ? : ; ' \" ( ) - _ / @ #",
]


def _train_tokenizer() -> Any:
    """A byte-level BPE shaped like Qwen2's (so ``Qwen2Tokenizer`` rebuilds it identically)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_LIMIT,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    return tokenizer


def _readable(text: str) -> bool:
    return "\ufffd" not in text and all(c.isprintable() or c in "\n\t" for c in text)


def make_tiny_model(
    out_dir: Path,
    *,
    seed: int = 0,
    layout: str = "hf",
    size: str = "tiny",
    device: str = "cpu",
    tokenizer: str = "fast",
) -> Path:
    """Build the tiny random InternVL model into ``out_dir`` (created) and return it.

    The same ``seed`` gives the same weights. ``oogiri-model.json`` records the version label
    (``tiny-random-<seed>`` for "hf"), which engines report as the model version. ``layout=
    "internvl2"`` writes InternVL2's original layout (what XTuner trains and LMDeploy serves);
    only it has ``size="full"`` (InternVL2-2B's shapes; build that on a GPU with ``device="cuda"``)
    and ``tokenizer="sentencepiece"`` (a real download's tokenizer files; see the module docstring).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown tiny-model layout {layout!r}; supported: {', '.join(LAYOUTS)}")
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; supported: {', '.join(TOKENIZERS)}")
    if tokenizer == "sentencepiece" and layout != "internvl2":
        raise ValueError("tokenizer='sentencepiece' exists only for layout='internvl2'")
    if layout == "internvl2":
        if tokenizer == "sentencepiece":
            return _make_internvl2_sentencepiece(Path(out_dir), seed=seed, size=size, device=device)
        return _make_internvl2(Path(out_dir), seed=seed, size=size, device=device)
    if size != "tiny":
        raise ValueError("size='full' exists only for layout='internvl2'")
    try:
        import torch
        from transformers import (
            GenerationConfig,
            InternVLConfig,
            InternVLForConditionalGeneration,
            Qwen2Tokenizer,
        )
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
            GotOcr2ImageProcessorPil,
        )
    except ImportError as exc:  # the core install has no torch/transformers
        raise RuntimeError(
            f"building the tiny model needs torch and transformers: {LOCAL_EXTRA}"
        ) from exc

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tok = Qwen2Tokenizer(
        tokenizer_object=_train_tokenizer(),
        eos_token=IM_END,
        pad_token=PAD,
        unk_token=None,  # pyright: ignore[reportArgumentType]  # no unknown token: a byte-level BPE
        extra_special_tokens=IMAGE_TOKENS,
        model_max_length=MAX_POSITIONS,
        padding_side="left",
    )
    vocab_size = len(tok)

    image_processor = GotOcr2ImageProcessorPil(
        size={"height": TILE, "width": TILE},
        crop_to_patches=True,
        min_patches=1,
        max_patches=12,
        image_mean=[0.485, 0.456, 0.406],  # ImageNet statistics, as InternVL uses
        image_std=[0.229, 0.224, 0.225],
    )
    tokens_per_tile = (TILE // PATCH) ** 2 // 4  # pixel shuffle with downsample_ratio 0.5

    config = InternVLConfig(
        vision_config={
            "hidden_size": HIDDEN,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS,
            "intermediate_size": 2 * HIDDEN,
            "image_size": [TILE, TILE],
            "patch_size": [PATCH, PATCH],
        },
        text_config={
            "model_type": "qwen2",
            "vocab_size": vocab_size,
            "hidden_size": HIDDEN,
            "intermediate_size": 2 * HIDDEN,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS,
            "num_key_value_heads": HEADS // 2,
            "max_position_embeddings": MAX_POSITIONS,
            "tie_word_embeddings": False,
            "bos_token_id": None,
            "eos_token_id": tok.convert_tokens_to_ids(IM_END),
            "pad_token_id": tok.convert_tokens_to_ids(PAD),
        },
        image_token_id=cast(int, tok.convert_tokens_to_ids(IMAGE_TOKENS["context_image_token"])),
        image_seq_length=tokens_per_tile,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )

    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(seed)
        model = InternVLForConditionalGeneration(config)
        model = model.to(torch.float32).eval()  # pyright: ignore[reportArgumentType]
    # Random weights pick byte tokens that are no whole character (shown as "�") or control
    # characters; suppressing them keeps the demo's noise readable. A real model needs no such list.
    unreadable = [i for i in range(vocab_size) if not _readable(str(tok.decode([i])))]
    model.generation_config = GenerationConfig(
        eos_token_id=[
            tok.convert_tokens_to_ids(IM_END),
            tok.convert_tokens_to_ids(PAD),
        ],
        pad_token_id=tok.convert_tokens_to_ids(PAD),
        suppress_tokens=unreadable,
        do_sample=False,
    )

    model.save_pretrained(out_dir)
    # The processor is written as its parts: constructing ``InternVLProcessor`` (and loading it with
    # ``AutoProcessor``) needs torchvision for its video processor, which CPU installs lack.
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out_dir)
    image_processor.save_pretrained(out_dir)
    processor_config = {"processor_class": "InternVLProcessor", "image_seq_length": tokens_per_tile}
    (out_dir / "processor_config.json").write_text(
        json.dumps(processor_config, indent=2) + "\n", encoding="utf-8"
    )
    marker = {"version": f"tiny-random-{seed}", "layout": layout, "seed": seed, "tiny": True}
    (out_dir / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    return out_dir


def _make_internvl2(out_dir: Path, *, seed: int, size: str, device: str) -> Path:
    from transformers import PreTrainedTokenizerFast

    from bot.engines.internvl.tiny_internvl2 import SIZES, write_internvl2

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; supported: {', '.join(SIZES)}")
    raw = pad_vocab(_train_tokenizer(), SIZES[size]["llm"]["vocab_size"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token=IM_START,
        eos_token=IM_END,
        pad_token=PAD,
        additional_special_tokens=list(IMAGE_TOKENS.values()),
        model_max_length=MAX_POSITIONS,
    )
    tokenizer.chat_template = INTERNVL2_CHAT_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    _portable_tokenizer_config(out_dir, INTERNVL2_CHAT_TEMPLATE)
    ids = {name: raw.token_to_id(tok) for name, tok in (("pad", PAD), ("eos", IM_END))}
    return write_internvl2(out_dir, raw, size=size, seed=seed, device=device, token_ids=ids)


# InternLM2's special pieces (in its sentencepiece model) and the tokens InternVL2 adds after them.
INTERNLM2_SPECIALS = [
    "<|plugin|>",
    "<|interpreter|>",
    "<|action_end|>",
    "<|action_start|>",
    IM_END,
    IM_START,
]
INTERNVL2_ADDED = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>"]
INTERNVL2_ADDED += ["<box>", "</box>"]
SPM_VOCAB = 1024 - len(INTERNVL2_ADDED)  # the tiny model's 1,024 ids, as InternVL2-2B's 92,553


def train_sentencepiece(vocab_size: int = SPM_VOCAB, *, add_dummy_prefix: bool = True) -> bytes:
    """A BPE sentencepiece model shaped like InternLM2's (byte fallback, <unk>/<s>/</s> = 0/1/2).

    Trained on the built-in corpus in well under a second; returns the ``tokenizer.model`` bytes.
    """
    import io

    import sentencepiece

    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        user_defined_symbols=INTERNLM2_SPECIALS,
        add_dummy_prefix=add_dummy_prefix,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        num_threads=1,
        minloglevel=2,
    )
    return buf.getvalue()


def write_sentencepiece_tokenizer(
    out_dir: Path, model: bytes, vocab_size: int, chat_template: str | None = None
) -> dict[str, int]:
    """Write the tokenizer files of a real InternVL2 download around a sentencepiece model.

    ``tokenizer.model``; ``tokenizer_config.json`` naming InternLM2's remote tokenizer class (whose
    code is OpenGVLab's and not written here), with every added token by id; ``added_tokens.json``
    with the ids InternVL2 adds after the sentencepiece vocabulary (then ``<|padN|>`` up to the
    model's ``vocab_size``, see ``pad_vocab``); ``special_tokens_map.json``. Returns token ids.
    """
    import sentencepiece

    out_dir.mkdir(parents=True, exist_ok=True)
    sp = sentencepiece.SentencePieceProcessor(model_proto=model)
    n = sp.get_piece_size()
    extra = INTERNVL2_ADDED + [f"<|pad{i}|>" for i in range(vocab_size - n - len(INTERNVL2_ADDED))]
    (out_dir / "tokenizer.model").write_bytes(model)

    def entry(content: str) -> dict[str, Any]:
        return {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            # Padding is no special token: a random model samples it, and it must decode to text.
            "special": not content.startswith("<|pad"),
        }

    decoder = {str(i): entry(sp.id_to_piece(i)) for i in (0, 1, 2)}
    decoder |= {str(sp.piece_to_id(t)): entry(t) for t in INTERNLM2_SPECIALS}
    added = {token: n + i for i, token in enumerate(extra)}
    decoder |= {str(i): entry(t) for t, i in added.items()}
    specials = INTERNLM2_SPECIALS[::-1] + INTERNVL2_ADDED
    config: dict[str, Any] = {
        "added_tokens_decoder": decoder,
        "additional_special_tokens": specials,
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_POSITIONS,
        "tokenizer_class": "InternLM2Tokenizer",
    }
    if chat_template:
        config["chat_template"] = chat_template
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (out_dir / "added_tokens.json").write_text(json.dumps(added, indent=2) + "\n")
    special_map = {
        "additional_special_tokens": specials,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "</s>",
        "unk_token": "<unk>",
    }
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    return {"bos": 1, "eos": 2, "pad": 2, "im_end": sp.piece_to_id(IM_END)}


class _VocabSize:
    """What ``write_internvl2`` reads of a tokenizer: its size."""

    def __init__(self, size: int) -> None:
        self.size = size

    def get_vocab_size(self) -> int:
        return self.size


def _make_internvl2_sentencepiece(out_dir: Path, *, seed: int, size: str, device: str) -> Path:
    from bot.engines.internvl.tiny_internvl2 import SIZES, write_internvl2

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; supported: {', '.join(SIZES)}")
    try:
        model = train_sentencepiece()
    except ImportError as exc:
        raise RuntimeError("a sentencepiece tokenizer needs: pip install sentencepiece") from exc
    vocab = SIZES[size]["llm"]["vocab_size"]
    chat = "{{ bos_token }}" + INTERNVL2_CHAT_TEMPLATE  # as InternLM2-chat ships it
    ids = write_sentencepiece_tokenizer(out_dir, model, vocab, chat)
    version = f"internvl2-{size}-spm-random-{seed}"
    return write_internvl2(
        out_dir,
        _VocabSize(vocab),
        size=size,
        seed=seed,
        device=device,
        version=version,
        token_ids={"eos": ids["eos"], "pad": ids["pad"]},
    )


def pad_vocab(raw: Any, vocab_size: int) -> Any:
    """Give every id of the model's vocabulary a token (``<|padN|>``).

    A random model samples any id it has; ids the tokenizer lacks decode to nothing, so a
    full-size model (92,553 ids) over the 923-token demo tokenizer answered empty strings. The
    pads are plain vocabulary entries, not added tokens: transformers 4.48 (XTuner) spent ~105 s
    per load on 91,630 added tokens, three loads before the first training iteration (device run).
    """
    from tokenizers import Tokenizer

    start = raw.get_vocab_size()
    if vocab_size <= start:
        return raw
    doc = json.loads(raw.to_str())
    vocab = doc["model"]["vocab"]
    for i in range(vocab_size - start):
        vocab[f"<|pad{i}|>"] = start + i
    return Tokenizer.from_str(json.dumps(doc, ensure_ascii=False))


def _portable_tokenizer_config(out_dir: Path, chat_template: str) -> None:
    """Make ``tokenizer_config.json`` loadable by transformers 4.x as well as 5.x.

    transformers 5 writes ``tokenizer_class: "TokenizersBackend"`` and ``extra_special_tokens``;
    XTuner's transformers 4.48 knows neither ("Tokenizer class TokenizersBackend does not exist")
    and reads the chat template only from this file. ``PreTrainedTokenizerFast`` +
    ``additional_special_tokens`` + an inline template load the same tokenizer in both.
    """
    path = out_dir / "tokenizer_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    if cfg.get("tokenizer_class") in (None, "TokenizersBackend"):
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = cfg.pop("extra_special_tokens", None)
    if isinstance(extra, list):
        merged = list(cfg.get("additional_special_tokens") or [])
        cfg["additional_special_tokens"] = merged + [t for t in extra if t not in merged]
    elif isinstance(extra, dict):  # named extra tokens (4.x reads these too)
        cfg["extra_special_tokens"] = extra
    cfg.pop("backend", None)
    cfg.setdefault("chat_template", chat_template)
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# InternLM2-chat's ChatML, as InternVL2 ships it (no system prompt here: servers add their own).
INTERNVL2_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def read_marker(model_dir: Path) -> dict[str, Any] | None:
    """The ``oogiri-model.json`` of a model folder, or None when absent or unreadable."""
    try:
        data = json.loads((Path(model_dir) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def version_label(model_dir: Path, configured: str | None = None) -> str:
    """The label stored with each joke: configured, else the folder's marker, else its name."""
    if configured:
        return configured
    marker = read_marker(model_dir) or {}
    version = marker.get("version")
    if isinstance(version, str) and version:
        return version
    return Path(model_dir).resolve().name
