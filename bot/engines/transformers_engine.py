"""In-process InternVL generation with Hugging Face transformers (CPU machines, tests, demos).

The model folder is transformers' native InternVL layout (``InternVLForConditionalGeneration``).
An InternVL2 folder (OpenGVLab's ``InternVLChatModel``, whose remote code cannot run on transformers
5) configured in settings is converted once into ``DATA_DIR/models/converted/`` (see
``bot.engines.internvl.convert_internvl2``); constructing the engine on one directly says how to
convert it.
Loading happens when the engine is built (the app calls engine factories in a worker thread);
every generation then runs on one dedicated thread, so the event loop never blocks and the model
never runs two requests at once.

torch and transformers are imported lazily: importing this module is cheap and works on the core
install, which has neither (``pip install 'oogiri[local]'`` adds them).

Inputs are prepared from the folder's tokenizer and image processor exactly as
``InternVLProcessor`` does (``<img>`` + ``<IMG_CONTEXT>`` × 256 per tile + ``</img>``), because in
transformers 5 ``AutoProcessor`` cannot load an InternVL folder without torchvision (its video
processor needs it), and torchvision is no dependency of ours.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.engines.base import EngineHealth
from bot.engines.internvl.convert_internvl2 import is_internvl2_folder
from bot.engines.internvl.tinymodel import LOCAL_EXTRA, version_label
from bot.hookspecs import hookimpl
from bot.models import EngineError, Generation, GenerationParams, NormalizedImage, Usage

if TYPE_CHECKING:
    from PIL import Image as PILImage

    from bot.settings import Settings

log = logging.getLogger(__name__)

INSTALL_HINT = f"the transformers engine needs torch and transformers: {LOCAL_EXTRA}"
DEMO_DIR = Path("models") / "tiny-demo"
PROMPT_SLOT = "\ue000oogiri-prompt\ue001"  # private-use characters: never part of the template
DEMO_WARNING = (
    "NO MODEL CONFIGURED: the transformers engine is using a tiny RANDOM demo model (%s); its "
    "jokes are random noise. Set OOGIRI_ENGINE__MODEL to a local InternVL model folder."
)


def _require_local_deps() -> None:
    missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        raise EngineError(detail=f"{INSTALL_HINT} (missing: {', '.join(missing)})")


def _short(exc: BaseException, limit: int = 200) -> str:
    """A one-line description of an exception that is safe to put in an error detail."""
    text = " ".join(str(exc).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


DEMO_PREFIX = "[demo model — random text]"


def demo_framed(text: str) -> str:
    """The random demo model's output, framed so nobody mistakes it for a (bad) joke: its tokens
    decode to plausible words. Real models' text is never touched."""
    return f"{DEMO_PREFIX} {text or '…'}"


def ensure_demo_model(data_dir: Path) -> Path:
    """The tiny demo model in ``data_dir``, built once (atomically) and reused afterwards."""
    from bot.engines.internvl.tinymodel import make_tiny_model, read_marker

    target = data_dir / DEMO_DIR
    if read_marker(target) and (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.{os.getpid()}.{threading.get_ident()}"
    shutil.rmtree(staging, ignore_errors=True)
    make_tiny_model(staging)
    shutil.rmtree(target, ignore_errors=True)  # a half-written folder from an older crash
    try:
        staging.rename(target)
    except OSError:  # another process finished first: use theirs
        shutil.rmtree(staging, ignore_errors=True)
    return target


def internvl2_hint(model_dir: Path) -> str:
    """What to do with an InternVL2 (InternVLChatModel) folder, for the error a user sees."""
    return (
        f"{model_dir} is an InternVL2 (InternVLChatModel) folder, whose remote code cannot run on "
        "transformers 5. Convert it once to transformers' InternVL layout: "
        f"oogiri dev convert-internvl2 {model_dir} CONVERTED_DIR, and use CONVERTED_DIR (with "
        "OOGIRI_ENGINE__MODEL set to the InternVL2 folder, the engine converts it into the data "
        "directory by itself)"
    )


def _converted_if_internvl2(model_dir: Path, settings: Settings) -> Path:
    """An InternVL2 folder's converted copy in the data dir (made on first use), else the folder."""
    from bot.engines.internvl.convert_internvl2 import ConversionError, ensure_converted

    if not is_internvl2_folder(model_dir):
        return model_dir
    _require_local_deps()
    try:
        return ensure_converted(model_dir, settings.data_dir)
    except (ConversionError, OSError) as exc:
        log.exception("could not convert the InternVL2 folder %s", model_dir)
        raise EngineError(detail=f"could not convert {model_dir}: {_short(exc, 400)}") from exc


class _InternVLInputs:
    """Turns (image, prompt, max tiles) into model inputs the way ``InternVLProcessor`` does."""

    def __init__(self, model_dir: Path, image_seq_length: int) -> None:
        from transformers import AutoImageProcessor, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.image_processor = AutoImageProcessor.from_pretrained(model_dir, local_files_only=True)
        self.image_seq_length = image_seq_length
        tok = self.tokenizer
        self.start_id = tok.convert_tokens_to_ids(_token(tok, "start_image_token", "<img>"))
        self.end_id = tok.convert_tokens_to_ids(_token(tok, "end_image_token", "</img>"))
        context = _token(tok, "context_image_token", "<IMG_CONTEXT>")
        self.context_id = tok.convert_tokens_to_ids(context)
        # Older InternVL-hf folders keep the multimodal template in the processor's own file.
        self.chat_template: str | None = None
        processor_template = model_dir / "chat_template.json"
        if processor_template.is_file():
            self.chat_template = json.loads(processor_template.read_text("utf-8"))["chat_template"]
        if not (self.chat_template or tok.chat_template):
            raise ValueError("the model folder has no chat template")

        self._head, self._tail, self._front, self._rest = self._template_pieces()

    def _encode(self, text: str, split_special_tokens: bool = False) -> list[int]:
        encoded = self.tokenizer(
            text, add_special_tokens=False, split_special_tokens=split_special_tokens
        )
        return list(encoded["input_ids"])

    def _template_pieces(self) -> tuple[list[int], str, str, list[int]]:
        """The rendered template around the prompt: ids before, text, text, ids after.

        The text between the template's last marker and the prompt (and between the prompt and the
        next marker) is encoded together with the prompt, as one stretch: a sentencepiece
        tokenizer (InternLM2's) gives every separately encoded stretch its own dummy prefix, so
        encoding the prompt alone would differ from the text the model was trained on.
        """
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT_SLOT}]}
        ]
        rendered: str = self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, add_generation_prompt=True, tokenize=False
        )
        before, found, after = rendered.partition(PROMPT_SLOT)
        if not found or PROMPT_SLOT in after:
            raise ValueError("the chat template must place the prompt exactly once")
        markers = [t for t in self.tokenizer.get_added_vocab() if t and t in rendered]
        cut = max((before.rfind(t) + len(t) for t in markers if t in before), default=0)
        ends = [after.find(t) for t in markers if t in after]
        stop = min(ends, default=len(after))
        head, rest = self._encode(before[:cut]), self._encode(after[stop:])
        if (head + rest).count(self.context_id) != 1:
            raise ValueError("the chat template must place exactly one image placeholder")
        return head, before[cut:], after[:stop], rest

    def __call__(
        self, image: PILImage.Image, prompt: str, max_patches: int, device: Any, dtype: Any
    ) -> tuple[dict[str, Any], int]:
        """Model inputs and the number of tiles the image was cut into (thumbnail included)."""
        import torch

        processor: Any = self.image_processor  # transformers' processor types lag its kwargs
        pixels = processor(
            images=[image], crop_to_patches=True, max_patches=max_patches, return_tensors="pt"
        )
        tiles = int(pixels["num_patches"][0])
        # The prompt (which may carry a user's hint) is encoded with special tokens split into
        # plain text, so typing "<IMG_CONTEXT>" or "<|im_end|>" forges neither an image nor a
        # turn; only the template's own markers are special. (apply_chat_template's
        # sanitize_control_tokens does the same on transformers 5.24, but 5.17 ignores it.)
        middle = self._encode(self._tail + prompt + self._front, split_special_tokens=True)
        ids = self._head + middle + self._rest
        at = ids.index(self.context_id)
        image_ids = [
            self.start_id,
            *[self.context_id] * (self.image_seq_length * tiles),
            self.end_id,
        ]
        ids = ids[:at] + image_ids + ids[at + 1 :]
        input_ids = torch.tensor([ids], dtype=torch.long, device=device)
        inputs = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "pixel_values": pixels["pixel_values"].to(device=device, dtype=dtype),
        }
        return inputs, tiles


def _token(tokenizer: Any, attribute: str, default: str) -> str:
    value = getattr(tokenizer, attribute, None)
    return str(value) if value else default


class TransformersEngine:
    """An InternVL model folder served in-process; one generation at a time on a worker thread."""

    name = "transformers"

    def __init__(
        self,
        model_dir: Path,
        *,
        device: str = "cpu",
        threads: int = 0,
        model_version: str | None = None,
        timeout_s: float | None = None,
        is_demo: bool = False,
    ) -> None:
        _require_local_deps()
        self.model_dir = Path(model_dir)
        self.device = device
        self.timeout_s = timeout_s
        self.is_demo = is_demo
        self.model = version_label(self.model_dir, model_version)
        self.tiles_last: int = 0  # tiles of the latest request (metrics, tests)
        self._closed = False
        self._model: Any = None
        self._inputs: Any = None  # _InternVLInputs once loaded
        if is_internvl2_folder(self.model_dir):
            raise EngineError(detail=internvl2_hint(self.model_dir))
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="oogiri-transformers")
        try:
            self._load(threads)
        except Exception as exc:
            self._executor.shutdown(wait=False)
            log.exception("could not load the model folder %s", self.model_dir)
            raise EngineError(detail=f"could not load model {self.model}: {_short(exc)}") from exc
        log.info("transformers engine: %s on %s (%s)", self.model, device, self.model_dir)

    @classmethod
    def from_settings(cls, settings: Settings) -> TransformersEngine:
        """The factory behind the "transformers" registration (see the module's hook below)."""
        _require_local_deps()
        engine = settings.engine
        if engine.model is None:
            model_dir = ensure_demo_model(settings.data_dir)
            log.warning(DEMO_WARNING, model_dir)
            is_demo = True
        else:
            model_dir = engine.model.expanduser()
            is_demo = False
            model_dir = _converted_if_internvl2(model_dir, settings)
        return cls(
            model_dir,
            device=engine.device,
            threads=engine.threads,
            model_version=engine.model_version,
            timeout_s=engine.timeout_s,
            is_demo=is_demo,
        )

    # ------------------------------------------------------------------ loading (blocking)

    def _load(self, threads: int) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForImageTextToText

        if not self.model_dir.is_dir():
            raise FileNotFoundError(f"no model folder at {self.model_dir}")
        if threads > 0:
            torch.set_num_threads(threads)
        config = AutoConfig.from_pretrained(self.model_dir, local_files_only=True)
        if config.model_type != "internvl":
            raise ValueError(
                f"model_type {config.model_type!r} is not transformers' InternVL layout "
                "(InternVLForConditionalGeneration); convert the model or use the lmdeploy engine"
            )
        dtype = torch.float32 if self.device == "cpu" else "auto"
        model = AutoModelForImageTextToText.from_pretrained(
            self.model_dir, local_files_only=True, dtype=dtype
        )
        self._model = model.to(self.device).eval()  # pyright: ignore[reportArgumentType]
        self._inputs = _InternVLInputs(self.model_dir, int(config.image_seq_length))
        tok = self._inputs.tokenizer
        generation_config = self._model.generation_config
        eos = generation_config.eos_token_id
        stops = [eos] if isinstance(eos, int) else list(eos or [])
        # Stop where LMDeploy's InternVL template stops: end of turn, or a new turn starting.
        stops += [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_start|>")]
        stops += [tok.convert_tokens_to_ids("<|im_end|>")]
        unk = tok.unk_token_id
        self._eos = [i for i in dict.fromkeys(stops) if isinstance(i, int) and i != unk]
        self._pad = tok.pad_token_id if tok.pad_token_id is not None else self._eos[0]
        # An answer never contains image markers; the model's own suppress list is kept.
        image_ids = {self._inputs.start_id, self._inputs.end_id, self._inputs.context_id}
        self._suppress = sorted(set(generation_config.suppress_tokens or []) | image_ids)

    # ------------------------------------------------------------------ generation (worker)

    def _generate_sync(
        self, image: NormalizedImage, prompt: str, params: GenerationParams
    ) -> Generation:
        import torch

        start = time.perf_counter()
        model = self._model
        inputs, tiles = self._inputs(
            image.to_pil(), prompt, params.max_dynamic_patch, model.device, model.dtype
        )
        sampling: dict[str, Any]
        if params.temperature <= 0:
            sampling = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        else:
            sampling = {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p}
            if params.seed is not None:
                torch.manual_seed(params.seed)
        with torch.inference_mode():
            output = model.generate(
                **inputs,
                max_new_tokens=params.max_new_tokens,
                eos_token_id=self._eos,
                pad_token_id=self._pad,
                suppress_tokens=self._suppress,
                **sampling,
            )
        prompt_tokens = int(inputs["input_ids"].shape[1])
        new_tokens = output[0, prompt_tokens:].tolist()
        while new_tokens and new_tokens[-1] == self._pad:  # padding after an early stop
            new_tokens.pop()
        text = self._inputs.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
        if self.is_demo:
            text = demo_framed(text)
        self.tiles_last = tiles
        return Generation(
            text=text,
            model=self.model,
            usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=len(new_tokens)),
            latency_s=time.perf_counter() - start,
        )

    # ------------------------------------------------------------------ the Engine protocol

    async def generate(
        self, image: NormalizedImage, prompt: str, params: GenerationParams
    ) -> Generation:
        if self._closed:
            raise EngineError(detail="the transformers engine is closed")
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, self._generate_sync, image, prompt, params)
        try:
            # A request cancelled or timed out while still queued never runs; one already
            # running finishes on the worker and its result is dropped.
            return await asyncio.wait_for(future, timeout=self.timeout_s)
        except TimeoutError as exc:
            raise EngineError(detail=f"generation timed out after {self.timeout_s:g} s") from exc
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._closed and not (task and task.cancelling()):  # dropped by close()
                raise EngineError(detail="the transformers engine was closed") from None
            raise
        except EngineError:
            raise
        except Exception as exc:
            log.exception("generation failed (model %s)", self.model)
            raise EngineError(detail=f"generation failed: {_short(exc)}") from exc

    async def health(self) -> EngineHealth:
        extra = {"device": self.device, "demo": self.is_demo, "path": str(self.model_dir)}
        if self._closed:
            return EngineHealth(ok=False, model=self.model, detail="closed", extra=extra)
        detail = "random demo model: jokes are noise" if self.is_demo else ""
        return EngineHealth(
            ok=True, model=self.model, detail=detail, extra=extra, demo=self.is_demo
        )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Wait for a running generation without blocking the loop; queued ones are dropped.
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        self._model = None
        self._inputs = None


@hookimpl
def oogiri_register_engines(register: Callable[..., Any], settings: Any) -> None:
    register("transformers", TransformersEngine.from_settings)


@hookimpl
def oogiri_register_commands(cli: Any) -> None:
    from bot.engines.internvl.cli import register

    register(cli)
