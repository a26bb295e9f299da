#!/usr/bin/env python3
"""Held-out loss and greedy sample jokes of an InternVL model folder, with transformers.

Standalone on purpose (no oogiri import): ``training/gate.py`` runs it with the training venv's
python, because InternVL2's remote code (``InternVLChatModel``) needs transformers 4.x while the
bot may run transformers 5. It also evaluates the transformers-native layout
(``InternVLForConditionalGeneration``, e.g. ``oogiri dev make-tiny-model``).

    python evaluate_hf.py --model DIR --data heldout.json --image-root DIR --out eval.json

Input: an XTuner InternVL data file (``{"id", "image", "conversations"}``). For each item the loss
is the mean negative log-likelihood of the joke tokens (plus end-of-turn) given the image and the
prompt, written in the chat format the model is trained with: XTuner's InternLM2 template and
system prompt for the remote-code layout, ChatML for the native one. Output JSON: ``loss``
(token-weighted mean), ``perplexity``, ``tokens``, ``samples``, ``generations`` (the model's own
jokes for the same images), ``seconds``, ``device``, ``layout``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

IMAGE_TOKEN = "<image>"
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# What XTuner's InternVL_V1_5_Dataset trains InternLM2-based InternVL2 with.
XTUNER_SYSTEM = "You are an AI assistant whose name is InternLM (书生·浦语)."
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- images


def pick_grid(width: int, height: int, max_tiles: int, tile: int) -> tuple[int, int]:
    """The (columns, rows) grid of at most ``max_tiles`` tiles whose shape best fits the image;
    on a tie the larger grid wins when the image has the pixels to fill it."""
    aspect = width / height
    grids = sorted(
        {
            (c, r)
            for c in range(1, max_tiles + 1)
            for r in range(1, max_tiles + 1)
            if c * r <= max_tiles
        },
        key=lambda g: g[0] * g[1],
    )
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


def image_tiles(image: Any, max_tiles: int, tile: int, thumbnail: bool) -> list[Any]:
    cols, rows = pick_grid(image.width, image.height, max_tiles, tile)
    resized = image.resize((cols * tile, rows * tile))
    tiles = [
        resized.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile))
        for r in range(rows)
        for c in range(cols)
    ]
    if thumbnail and len(tiles) > 1:
        tiles.append(image.resize((tile, tile)))
    return tiles


def pixel_values(image: Any, max_tiles: int, tile: int, thumbnail: bool) -> Any:
    import numpy as np
    import torch
    from PIL import Image

    arrays = []
    for t in image_tiles(image, max_tiles, tile, thumbnail):
        t = t.resize((tile, tile), Image.BICUBIC)
        a = np.asarray(t, dtype=np.float32) / 255.0
        a = (a - np.array(MEAN, dtype=np.float32)) / np.array(STD, dtype=np.float32)
        arrays.append(a.transpose(2, 0, 1))
    return torch.from_numpy(np.stack(arrays))


# --------------------------------------------------------------------------- models


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, list | tuple) else value


class Adapter:
    """One model layout: how to build the prompt, run the forward pass and generate."""

    layout = "?"

    def __init__(self, model_dir: Path, device: str, max_tiles: int) -> None:
        self.model_dir = model_dir
        self.device = device
        self.max_tiles = max_tiles
        self.cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))

    def tokens_per_tile(self, image_size: int, patch: int, ratio: float) -> int:
        return int((image_size // patch) ** 2 * ratio**2)

    def encode(self, text: str, special: bool) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=special))


class RemoteInternVL2(Adapter):
    """InternVL2's own layout (``InternVLChatModel``, remote code): what XTuner fine-tunes."""

    layout = "internvl2"

    def __init__(self, model_dir: Path, device: str, max_tiles: int) -> None:
        super().__init__(model_dir, device, max_tiles)
        import torch
        from transformers import AutoModel, AutoTokenizer

        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        self.dtype = dtype
        self.model = AutoModel.from_pretrained(
            str(model_dir), torch_dtype=dtype, trust_remote_code=True, low_cpu_mem_usage=True
        ).to(device)
        self.model.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=True)
        self.model.img_context_token_id = self.tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
        vision = self.cfg.get("vision_config", {})
        self.tile = int(self.cfg.get("force_image_size") or _first(vision.get("image_size", 448)))
        self.thumbnail = bool(self.cfg.get("use_thumbnail", True))
        self.image_tokens = self.tokens_per_tile(
            self.tile,
            int(_first(vision.get("patch_size", 14))),
            self.cfg.get("downsample_ratio", 0.5),
        )
        self.eos = self.tokenizer.convert_tokens_to_ids(IM_END)

    def prompt_ids(self, prompt: str, tiles: int) -> list[int]:
        image = IMG_START + IMG_CONTEXT * (self.image_tokens * tiles) + IMG_END
        text = (
            f"{IM_START}system\n{XTUNER_SYSTEM}{IM_END}"
            f"{IM_START}user\n{image}\n{prompt}{IM_END}{IM_START}assistant\n"
        )
        return self.encode(text, special=True)

    def answer_ids(self, answer: str) -> list[int]:
        return self.encode(answer + IM_END, special=False)

    def logits(self, pv: Any, ids: Any) -> Any:
        import torch

        flags = torch.ones(pv.shape[0], 1, dtype=torch.long, device=self.device)
        out = self.model(
            pixel_values=pv.to(self.device, self.dtype),
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            image_flags=flags,
            return_dict=True,
        )
        return out.logits

    def generate(self, pv: Any, ids: Any, max_new_tokens: int) -> list[int]:
        import torch

        out = self.model.generate(
            pixel_values=pv.to(self.device, self.dtype),
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=self.eos,
        )
        return out[0].tolist()  # only the new tokens (it generates from embeddings)


class NativeInternVL(Adapter):
    """transformers' own ``InternVLForConditionalGeneration`` (no remote code)."""

    layout = "hf"

    def __init__(self, model_dir: Path, device: str, max_tiles: int) -> None:
        super().__init__(model_dir, device, max_tiles)
        import torch
        from transformers import AutoModelForImageTextToText, AutoTokenizer

        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        self.dtype = dtype
        self.model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=dtype).to(
            device
        )
        self.model.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        vision = self.cfg.get("vision_config", {})
        self.tile = int(_first(vision.get("image_size", 448)))
        self.thumbnail = True
        self.image_tokens = int(
            self.cfg.get("image_seq_length")
            or self.tokens_per_tile(
                self.tile,
                int(_first(vision.get("patch_size", 14))),
                self.cfg.get("downsample_ratio", 0.5),
            )
        )
        self.eos = self.tokenizer.convert_tokens_to_ids(IM_END)

    def prompt_ids(self, prompt: str, tiles: int) -> list[int]:
        image = IMG_START + IMG_CONTEXT * (self.image_tokens * tiles) + IMG_END
        text = f"{IM_START}user\n{image}\n{prompt}{IM_END}\n{IM_START}assistant\n"
        return self.encode(text, special=False)

    def answer_ids(self, answer: str) -> list[int]:
        return self.encode(answer + IM_END, special=False)

    def logits(self, pv: Any, ids: Any) -> Any:
        import torch

        out = self.model(
            input_ids=ids,
            pixel_values=pv.to(self.device, self.dtype),
            attention_mask=torch.ones_like(ids),
        )
        return out.logits

    def generate(self, pv: Any, ids: Any, max_new_tokens: int) -> list[int]:
        import torch

        out = self.model.generate(
            input_ids=ids,
            pixel_values=pv.to(self.device, self.dtype),
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=self.eos,
        )
        return out[0, ids.shape[1] :].tolist()


def load_adapter(model_dir: Path, device: str, max_tiles: int) -> Adapter:
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    archs = cfg.get("architectures") or []
    if "InternVLChatModel" in archs or "auto_map" in cfg:
        return RemoteInternVL2(model_dir, device, max_tiles)
    return NativeInternVL(model_dir, device, max_tiles)


# --------------------------------------------------------------------------- evaluation


def read_items(
    data: Path, image_root: Path, limit: int, seed: int = 0
) -> list[tuple[str, Path, str, str]]:
    """The held-out items to evaluate: all of them, or a seeded random sample of ``limit``.

    A sample, not the first ``limit``: export writes the held-out set best-rated first, so its
    head would judge every model on the easiest jokes only. The same seed picks the same items
    for the candidate and the active model (kept in file order).
    """
    items = json.loads(data.read_text(encoding="utf-8"))
    if 0 <= limit < len(items):
        picked = sorted(random.Random(seed).sample(range(len(items)), limit))
        items = [items[i] for i in picked]
    out = []
    for item in items:
        image = item["image"][0] if isinstance(item["image"], list) else item["image"]
        human = next(c["value"] for c in item["conversations"] if c["from"] == "human")
        answer = next(c["value"] for c in item["conversations"] if c["from"] == "gpt")
        prompt = human.replace(IMAGE_TOKEN, "").strip()
        out.append((str(item.get("id")), image_root / image, prompt, answer.strip()))
    return out


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from PIL import Image

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    start = time.perf_counter()
    adapter = load_adapter(Path(args.model), device, args.max_dynamic_patch)
    items = read_items(Path(args.data), Path(args.image_root), args.max_samples, args.seed)
    total_nll = 0.0
    total_tokens = 0
    generations = []
    with torch.inference_mode():
        for item_id, path, prompt, answer in items:
            image = Image.open(path).convert("RGB")
            pv = pixel_values(image, args.max_dynamic_patch, adapter.tile, adapter.thumbnail)
            p_ids = adapter.prompt_ids(prompt, pv.shape[0])
            a_ids = adapter.answer_ids(answer)
            ids = torch.tensor([p_ids + a_ids], device=device)
            logits = adapter.logits(pv, ids).float()
            # logits at position t predict token t+1: score only the answer tokens
            pred = logits[0, len(p_ids) - 1 : -1]
            target = ids[0, len(p_ids) :]
            nll = torch.nn.functional.cross_entropy(pred, target, reduction="sum")
            total_nll += float(nll)
            total_tokens += int(target.numel())
            if args.max_new_tokens > 0:
                prompt_tensor = torch.tensor([p_ids], device=device)
                new = adapter.generate(pv, prompt_tensor, args.max_new_tokens)
                text = adapter.tokenizer.decode(new, skip_special_tokens=True).strip()
                generations.append({"id": item_id, "text": text})
            print(f"eval {item_id}: {float(nll) / max(int(target.numel()), 1):.4f}", flush=True)
    loss = total_nll / total_tokens if total_tokens else None
    return {
        "model": str(args.model),
        "layout": adapter.layout,
        "device": device,
        "samples": len(items),
        "tokens": total_tokens,
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)) if loss is not None else None,
        "generations": generations,
        "seconds": round(time.perf_counter() - start, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="XTuner-format held-out JSON")
    parser.add_argument("--image-root", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-samples", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out sample")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-dynamic-patch", type=int, default=6)
    args = parser.parse_args(argv)
    result = evaluate(args)
    Path(args.out).write_text(json.dumps(result, ensure_ascii=False, indent=2), encoding="utf-8")
    print(f"loss {result['loss']} over {result['tokens']} tokens, {result['samples']} samples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
