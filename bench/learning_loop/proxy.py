"""A CPU proxy of the learning-loop experiment, to choose its settings without GPU time.

Not the experiment: no LMDeploy, no XTuner, no bot. The same tiny InternVL2 model (random weights,
``make_tiny_model --layout internvl2``, optionally pretrained here: ``--pretrain-*``, or a saved
base: ``--base``) converted to transformers' layout, sampled as LMDeploy samples (temperature 0.8,
top-p 0.9, top-k 50, XTuner's template), the same pictures and audience (bench/learning_loop), and
a loop that mimics ``oogiri train run``: LoRA r/2r on every linear layer of the language model and
its head (as XTuner's QLoRA; unquantised unless ``--qlora``), trained from the base on every liked
answer so far, a split by picture hash, the gate's held-out loss, promotion. Then the control
(disliked answers, matched per round or all).

    python -m bench.learning_loop.proxy --seeds 0 1 2        # ~1 min per seed on one CPU core

Prints one line per round and seed; docs/learning-loop.md quotes its results.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import random
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.learning_loop.audience import (
    KEYWORDS,
    Audience,
    PictureAudience,
    base_mix_items,
    build_pool,
    make_audience,
    neutral_pictures,
    pretrain_items,
    source_of,
    source_photos,
)
from bench.learning_loop.pretrain import save_internvl2
from bench.learning_loop.stats import wilson
from training.export import heldout_bucket

PROMPT = "请你根据这张图片，讲一个脑洞大开的梗"

# The 16 NF4 levels (QLoRA, Dettmers et al. 2023: quantiles of a standard normal, scaled to ±1).
NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)  # fmt: skip


def nf4_round_trip(weight: Any, block: int = 64) -> Any:
    """``weight`` quantised to NF4 in blocks of 64 with an absmax scale each, and back: what
    bitsandbytes' 4-bit layers compute with (its double quantisation of the scales is left out)."""
    import torch

    flat = weight.detach().float().reshape(-1)
    pad = (-flat.numel()) % block
    blocks = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, block)
    scale = blocks.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    levels = torch.tensor(NF4)
    codes = (blocks / scale).unsqueeze(-1).sub(levels).abs().argmin(dim=-1)
    out = (levels[codes] * scale).reshape(-1)[: flat.numel()]
    return out.reshape(weight.shape).to(weight.dtype)


class Proxy:
    """The tiny model, its LoRA adapters and the operations the loop needs."""

    def __init__(self, folder: Path, lora_r: int, seed: int, base: Path | None = None) -> None:
        import torch

        from bot.engines.internvl.convert_internvl2 import convert_internvl2
        from bot.engines.internvl.tinymodel import make_tiny_model
        from training.evaluate_hf import (
            IM_END,
            IM_START,
            IMG_CONTEXT,
            IMG_END,
            IMG_START,
            XTUNER_SYSTEM,
            NativeInternVL,
        )

        torch.manual_seed(seed)
        if base is None:
            base = make_tiny_model(folder / "base", layout="internvl2")
        hf = convert_internvl2(base, folder / "hf")
        self.adapter = NativeInternVL(hf, "cpu", 1)
        self.tok = self.adapter.tokenizer
        self.model = self.adapter.model
        self.im_end = IM_END
        image = IMG_START + IMG_CONTEXT * self.adapter.image_tokens + IMG_END
        text = (
            f"{IM_START}system\n{XTUNER_SYSTEM}{IM_END}"
            f"{IM_START}user\n{image}\n{PROMPT}{IM_END}{IM_START}assistant\n"
        )
        self.prompt = self.tok.encode(text, add_special_tokens=False)
        self.lora: list[Any] = []
        self._add_lora(lora_r)
        self.active = self.snapshot()
        self.pixels: dict[Path, Any] = {}
        self.top_k = 50

    def _add_lora(self, r: int) -> None:
        import torch

        class LoRA(torch.nn.Module):
            def __init__(self, linear: torch.nn.Linear) -> None:
                super().__init__()
                self.linear, self.scale = linear, 2.0  # alpha = 2r, as XTuner's r128/α256
                self.a = torch.nn.Parameter(torch.empty(r, linear.in_features))
                self.b = torch.nn.Parameter(torch.zeros(linear.out_features, r))
                self.drop = torch.nn.Dropout(0.05)
                self.reset()

            def reset(self) -> None:
                torch.nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))
                torch.nn.init.zeros_(self.b)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.linear(x) + (self.drop(x) @ self.a.T @ self.b.T) * self.scale

        lm = self.model.model.language_model
        for module in list(lm.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(module, name, LoRA(child))
        self.model.lm_head = LoRA(self.model.lm_head)
        self.lora = [m for m in self.model.modules() if isinstance(m, LoRA)]
        for p in self.model.parameters():
            p.requires_grad = False
        for m in self.lora:
            m.a.requires_grad = m.b.requires_grad = True

    @contextlib.contextmanager
    def quantised(self) -> Iterator[None]:
        """XTuner's QLoRA in the proxy: while training, every LLM linear layer (not the head, which
        bitsandbytes leaves unquantised) computes with its NF4 round-tripped weight; the adapters
        are then merged into and served with the unquantised weights, as the product does."""
        layers = [m for m in self.lora if m is not self.model.lm_head]
        clean = [m.linear.weight.data for m in layers]
        try:
            for m, w in zip(layers, clean, strict=True):
                m.linear.weight.data = nf4_round_trip(w)
            yield
        finally:
            for m, w in zip(layers, clean, strict=True):
                m.linear.weight.data = w

    def merge(self) -> None:
        """Fold the adapters into the weights: the pretrained base every later run starts from."""
        import torch

        with torch.no_grad():
            for m in self.lora:
                m.linear.weight += (m.b @ m.a) * m.scale
                m.reset()
        self.active = self.snapshot()

    def snapshot(self) -> list[tuple[Any, Any]]:
        return [(m.a.detach().clone(), m.b.detach().clone()) for m in self.lora]

    def load(self, snap: list[tuple[Any, Any]]) -> None:
        for m, (a, b) in zip(self.lora, snap, strict=True):
            m.a.data.copy_(a)
            m.b.data.copy_(b)

    def pv(self, picture: Path) -> Any:
        from PIL import Image

        from training.evaluate_hf import pixel_values

        if picture not in self.pixels:
            self.pixels[picture] = pixel_values(Image.open(picture).convert("RGB"), 1, 448, True)
        return self.pixels[picture]

    def sample(self, picture: Path, n: int, max_new_tokens: int) -> list[str]:
        import torch

        ids = torch.tensor([self.prompt]).repeat(n, 1)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids,
                pixel_values=self.pv(picture).repeat(n, 1, 1, 1),
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=True,
                temperature=0.8,
                top_p=0.9,
                top_k=self.top_k,
                eos_token_id=self.adapter.eos,
            )
        start = len(self.prompt)
        return [self.tok.decode(o[start:], skip_special_tokens=True).strip() for o in out]

    def _nll(self, picture: Path, text: str) -> tuple[Any, int]:
        import torch

        ids = torch.tensor(
            [self.prompt + self.tok.encode(text + self.im_end, add_special_tokens=False)]
        )
        logits = self.model(
            input_ids=ids, pixel_values=self.pv(picture), attention_mask=torch.ones_like(ids)
        ).logits[0]
        start = len(self.prompt)
        target = ids[0, start:]
        loss = torch.nn.functional.cross_entropy(logits[start - 1 : -1], target, reduction="sum")
        return loss, int(target.numel())

    def loss(self, items: list[tuple[Path, str]]) -> float | None:
        import torch

        if not items:
            return None
        total = tokens = 0.0
        self.model.eval()
        with torch.inference_mode():
            for picture, text in items:
                nll, n = self._nll(picture, text)
                total, tokens = total + float(nll), tokens + n
        return total / tokens

    def train(self, items: list[tuple[Path, str]], a: argparse.Namespace, seed: int) -> int:
        """From the base (fresh adapters), as every ``oogiri train run``: AdamW, linear warm-up
        over ``warmup`` of the run, cosine decay, clipping at 1."""
        import torch

        for m in self.lora:
            m.reset()
        params = [p for m in self.lora for p in (m.a, m.b)]
        opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.05)
        per_epoch = math.ceil(len(items) / a.batch)
        total = per_epoch * a.epochs
        warm = max(1, int(a.warmup * total))
        rng = random.Random(seed)
        self.model.train()
        quantised = self.quantised() if a.qlora else contextlib.nullcontext()
        with quantised:
            step = 0
            for _ in range(a.epochs):
                order = items[:]
                rng.shuffle(order)
                for i in range(0, len(order), a.batch):
                    if step < warm:
                        lr = a.lr * (step + 1) / warm
                    else:
                        lr = (
                            a.lr
                            * 0.5
                            * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
                        )
                    for group in opt.param_groups:
                        group["lr"] = lr
                    opt.zero_grad()
                    batch = order[i : i + a.batch]
                    losses = [self._nll(p, t) for p, t in batch]
                    loss = sum(nll / n for nll, n in losses) / len(batch)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    opt.step()
                    step += 1
        self.model.eval()
        return step


def pools(a: argparse.Namespace, folder: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """The source photos, the training pool and the held-out pool (as the experiment's)."""
    photos = source_photos(None)
    pool = build_pool(folder / "pictures", photos, a.train_images, 448, "train")
    return photos, pool, build_pool(folder / "pictures", photos, a.heldout_images, 448, "heldout")


def heldout_rate(
    proxy: Proxy, heldout: list[Path], a: argparse.Namespace, audience: Audience
) -> tuple[str, dict[str, list[int]], list[str]]:
    """``a.samples`` answers per held-out picture: "rate [Wilson 95 %]", per photo, the texts."""
    per: dict[str, list[int]] = {}
    texts = []
    for p in heldout:
        for t in proxy.sample(p, a.samples, a.max_new_tokens):
            kn = per.setdefault(source_of(p), [0, 0])
            kn[0] += int(audience.likes(t, p.name))
            kn[1] += 1
            texts.append(t)
    k, n = sum(v[0] for v in per.values()), sum(v[1] for v in per.values())
    lo, hi = wilson(k, n)
    return f"{k / n:.3f} [{lo:.3f}, {hi:.3f}]", per, texts


def run_seed(a: argparse.Namespace, seed: int, folder: Path) -> list[str]:
    photos, pool, heldout = pools(a, folder)
    gate_side = {
        p for p in pool if heldout_bucket(hashlib.sha256(p.read_bytes()).hexdigest()) < 0.25
    }
    audience = make_audience(a.audience, a.like, 0.1, 3, seed)
    proxy = Proxy(folder / f"model-{seed}", a.lora_r, seed, a.base)
    proxy.top_k = a.top_k
    rated: list[tuple[int, Path, str, int]] = []  # round, picture, text, net votes
    lines = pretrain(proxy, a, seed, folder, photos)

    def like_rate() -> str:
        rate, per, texts = heldout_rate(proxy, heldout, a, audience)
        cells = " ".join(f"{src[:5]} {v[0]}/{v[1]}" for src, v in sorted(per.items()))
        return f"{rate} ({cells}; distinct {len(set(texts)) / len(texts):.2f})"

    base: list[tuple[Path, str]] = []
    if a.base_mix > 0:
        neutral = neutral_pictures(folder / "neutral", 20, 448, seed)
        by_name = {q.name: q for q in neutral}
        base = [
            (by_name[i["image"][0]], i["conversations"][1]["value"])
            for i in base_mix_items(neutral, 2000, PROMPT, seed)
        ]

    def sets(control: str | None = None) -> tuple[list[Any], list[Any]]:
        """Training and gate sets: every liked answer so far (or the control's disliked ones)."""
        held = [(p, t) for _, p, t, net in rated if net > 0 and p in gate_side][:32]
        if control is None:
            liked = [(p, t, net) for _, p, t, net in rated if net > 0 and p not in gate_side]
            train = export_like(liked, a.max_per_image) if a.max_per_image else liked
            train = [(p, t) for p, t, *_ in train]
            return train + base[: int(a.base_mix * len(train))], held
        picked: list[Any] = []
        rng = random.Random(seed)
        for r in sorted({r for r, *_ in rated}):
            mine = [x for x in rated if x[0] == r and x[1] not in gate_side]
            bad = [(p, t) for _, p, t, net in mine if net < 0]
            n_liked = sum(1 for *_, net in mine if net > 0)
            picked += bad if control == "all" else rng.sample(bad, min(len(bad), n_liked))
        return picked, held

    def gate(train: list[Any], held: list[Any], seed: int) -> tuple[float, float, int]:
        """Train a candidate from the base; the held-out loss of the active model and of it."""
        proxy.load(proxy.active)
        before = proxy.loss(held)
        iters = proxy.train(train, a, seed)
        return before, proxy.loss(held), iters

    nan = float("nan")
    lines.append(f"seed {seed} round 0: like-rate {like_rate()}")
    for rnd in range(1, a.rounds + 1):
        for picture in pool:
            for text in proxy.sample(picture, a.answers, a.max_new_tokens):
                rated.append(
                    (rnd, picture, text, sum(audience.votes(len(rated) + 1, text, picture.name)))
                )
        train, held = sets()
        before, after, iters = gate(train, held, seed + rnd)
        promoted = after is not None and (before is None or after <= before)
        # a rejected candidate's own rate: on the device the live A/B step, not this loss gate,
        # decides, so what the candidate would have scored matters too
        rejected = "" if promoted else f"; the rejected candidate's like-rate {like_rate()}"
        if promoted:
            proxy.active = proxy.snapshot()
        proxy.load(proxy.active)
        lines.append(
            f"seed {seed} round {rnd}: {len(train)} liked training answers, {iters} iterations, "
            f"held-out loss {before or nan:.3f} → {after or nan:.3f} "
            f"({'promoted' if promoted else 'rejected'}); like-rate {like_rate()}{rejected}"
        )
    for mode in a.controls:
        train, held = sets(mode)
        before, after, _ = gate(train, held, seed + 99)
        proxy.load(proxy.active)
        passed = after is None or before is None or after <= before
        lines.append(
            f"seed {seed} control {mode}: {len(train)} disliked answers; held-out loss active "
            f"{before or nan:.3f} vs control {after or nan:.3f} → "
            + ("PASSED" if passed else "rejected")
        )
    return lines


def export_like(liked: list[tuple[Path, str, int]], per_image: int) -> list[tuple[Path, str]]:
    """The liked answers as the product's export keeps them (``training.export.select``: best
    rated first, the same answer on the same picture once, at most ``per_image`` per picture; the
    proxy makes its own held-out split). Without the cap the pictures the model already gets right
    dominate the data."""
    from training.export import select
    from training.settings import TrainingSettings

    examples = [
        {"id": str(i), "kind": "positive", "image_sha256": str(p), "text": t, "net": net}
        for i, (p, t, net) in enumerate(liked)
    ]
    settings = TrainingSettings(max_jokes_per_image=per_image, heldout_fraction=0.0)
    train, _, _, _ = select(examples, settings)
    return [(Path(e["image_sha256"]), e["text"]) for e in train]


def pretrain(
    proxy: Proxy, a: argparse.Namespace, seed: int, folder: Path, photos: list[Path]
) -> list[str]:
    """The stand-in for pre-training (``audience.pretrain_items``), merged into the base."""
    if a.pretrain_epochs <= 0:
        return []
    pictures = build_pool(folder / "pictures", photos, a.pretrain_images, 448, "pretrain")
    items = pretrain_items(pictures, a.pretrain_answers, a.pretrain_p, seed)
    b = argparse.Namespace(**{**vars(a), "epochs": a.pretrain_epochs, "qlora": False})
    iters = proxy.train(items, b, seed + 1000)
    proxy.merge()
    lines = [
        f"seed {seed} pretrain: {len(items)} items on {len(pictures)} pictures "
        f"(named {a.pretrain_p:.0%}), {iters} iterations, merged"
    ]
    if a.save_base:
        save_internvl2(a.base or folder / f"model-{seed}" / "base", proxy.model, a.save_base)
        lines.append(f"seed {seed} pretrained base (InternVL2 layout) → {a.save_base}")
    return lines


def check_conditional(a: argparse.Namespace, seed: int, folder: Path) -> list[str]:
    """Can the tiny model learn an image-conditional answer at all (issue 15 C's first check)?

    The easiest case the loop could ever reach: fine-tune on every training picture paired with
    the keyword of what it shows, then score sampled answers to the held-out pictures. A model
    that learnt the words but not the pictures scores about 1/5.
    """
    _, pool, heldout = pools(a, folder)
    audience = PictureAudience(seed=seed)
    proxy = Proxy(folder / f"model-{seed}", a.lora_r, seed)
    proxy.top_k = a.top_k
    lines = []

    def score(tag: str) -> None:
        rate, per, texts = heldout_rate(proxy, heldout, a, audience)
        cells = ", ".join(f"{src} {v[0]}/{v[1]}" for src, v in sorted(per.items()))
        said = {kw: sum(kw in t for t in texts) for kw in KEYWORDS.values()}
        lines.append(f"seed {seed} {tag}: like-rate {rate} ({cells}); keywords said {said}")

    score("base")
    items = [(p, KEYWORDS[source_of(p)]) for p in pool] * a.answers
    iters = proxy.train(items, a, seed)
    lines.append(f"seed {seed}: trained {iters} iterations on {len(items)} (picture, keyword)")
    score("after supervised fine-tune")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--like", default="猫狗", help="the words audience's characters")
    p.add_argument("--audience", choices=("words", "picture"), default="picture")
    p.add_argument(
        "--base-mix", type=float, default=0.0, help="base items (neutral picture, a word) per liked"
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--train-images", type=int, default=40)
    p.add_argument("--answers", type=int, default=4, help="answers per picture and round")
    p.add_argument("--heldout-images", type=int, default=12)
    p.add_argument("--samples", type=int, default=8, help="answers per held-out picture")
    p.add_argument("--max-new-tokens", type=int, default=6)
    p.add_argument("--top-k", type=int, default=50, help="LMDeploy's default; 0: off")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--warmup", type=float, default=0.34)
    p.add_argument("--lora-r", type=int, default=128)
    p.add_argument(
        "--max-per-image",
        type=int,
        default=0,
        help="export as the product does: dedupe, at most this many per picture (0: every liked)",
    )
    p.add_argument(
        "--qlora", action="store_true", help="train against NF4 weights, as XTuner's QLoRA does"
    )
    p.add_argument("--controls", nargs="*", default=["matched", "all"])
    p.add_argument("--pretrain-epochs", type=int, default=0, help="0: the random base")
    p.add_argument("--pretrain-images", type=int, default=40)
    p.add_argument("--pretrain-answers", type=int, default=4, help="answers per picture")
    p.add_argument("--pretrain-p", type=float, default=0.4, help="share naming the picture")
    p.add_argument("--save-base", type=Path, help="write the pretrained base (InternVL2 layout)")
    p.add_argument(
        "--base", type=Path, help="start from this base (InternVL2 layout, e.g. a --save-base one)"
    )
    p.add_argument(
        "--conditional",
        action="store_true",
        help="only check that the model can learn a picture-dependent keyword (supervised)",
    )
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="oogiri-proxy-") as tmp:
        for seed in a.seeds:
            check = check_conditional if a.conditional else run_seed
            for line in check(a, seed, Path(tmp)):
                print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
