"""The simulated audience and the pictures it is shown (bench/learning_loop, issue 9 and 15 C).

Two tastes: ``Audience`` (version 1) likes any answer containing one of ``like``'s characters,
whatever the picture, so a model that says 猫 to everything wins; ``PictureAudience`` (version 2)
likes an answer only when it names what is in *that* picture (``KEYWORDS``). Both add voter noise
drawn from (seed, joke id, voter) alone: every vote is reproducible on any machine, in any order.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import PHOTOS, skimage_photos

ROOT = Path(__file__).resolve().parents[2]
# what a picture made from each source photo shows, as the audience names it
KEYWORDS: dict[str, str] = {
    "chelsea": "猫",
    "astronaut": "宇航员",
    "coffee": "咖啡",
    "rocket": "火箭",
    "motorcycle_left": "摩托",
}


def _unit(*parts: object) -> float:
    """A number in [0, 1) fixed by ``parts`` (the same on every machine and run)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


@dataclass(frozen=True)
class Audience:
    """Version 1: an answer is liked when it contains any character of ``like`` (the picture is
    ignored). Voter ``v`` reports the opposite of the taste with probability ``noise``."""

    like: str = "猫狗"
    noise: float = 0.1
    voters: int = 3
    seed: int = 0

    def likes(self, text: str | None, picture: str = "") -> bool:
        return bool(text) and any(ch in str(text) for ch in self.like)

    def vote(self, joke_id: int | str, text: str | None, voter: int, picture: str = "") -> int:
        flipped = _unit(self.seed, "vote", joke_id, voter) < self.noise
        return 1 if self.likes(text, picture) != flipped else -1

    def votes(self, joke_id: int | str, text: str | None, picture: str = "") -> list[int]:
        return [self.vote(joke_id, text, v, picture) for v in range(self.voters)]


@dataclass(frozen=True)
class PictureAudience(Audience):
    """Version 2: an answer is liked only when it contains the keyword of the photo its picture
    was made from (``source_of``: the pools record it in their file names)."""

    keywords: dict[str, str] = field(default_factory=lambda: dict(KEYWORDS))

    def keyword(self, picture: str) -> str:
        source = source_of(picture)
        if source not in self.keywords:
            raise ValueError(f"no keyword for picture {picture!r} (source {source!r})")
        return self.keywords[source]

    def likes(self, text: str | None, picture: str = "") -> bool:
        return bool(text) and self.keyword(picture) in str(text)


def make_audience(kind: str, like: str, noise: float, voters: int, seed: int) -> Audience:
    """``kind`` "picture" (version 2) or "words" (version 1)."""
    if kind == "picture":
        return PictureAudience(noise=noise, voters=voters, seed=seed)
    return Audience(like=like, noise=noise, voters=voters, seed=seed)


def source_of(picture: str | Path) -> str:
    """The source photo's stem of a pool picture: ``train-003--rocket.png`` → ``rocket``."""
    stem = Path(picture).stem
    if "--" not in stem:
        raise ValueError(f"{picture!r} does not name its source photo (expected KEY-NNN--SOURCE)")
    return stem.split("--", 1)[1]


# --------------------------------------------------------------------------- pictures


def source_photos(folder: Path | None) -> list[Path]:
    """The five photos' files: ``folder``, else scikit-image's, else the staged .device/photos."""
    candidates = [folder] if folder else []
    with contextlib.suppress(ImportError):
        candidates.append(skimage_photos())
    candidates.append(ROOT / ".device" / "photos")
    for cand in candidates:
        if not cand.is_dir():
            continue
        named = [cand / n for n in PHOTOS if (cand / n).is_file()]
        found = named or sorted(
            p for p in cand.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg")
        )
        if found:
            return found
    raise SystemExit("no photos: install scikit-image, stage .device/photos or pass --photos")


def variant(photo: Any, size: int, key: str) -> Any:
    """A deterministic square crop of ``photo``, flipped and recoloured by ``key``."""
    from PIL import Image, ImageOps

    rng = random.Random(key)
    w, h = photo.size
    side = int(min(w, h) * rng.uniform(0.45, 0.95))
    x, y = rng.randint(0, w - side), rng.randint(0, h - side)
    img = photo.crop((x, y, x + side, y + side)).resize((size, size), Image.BICUBIC)
    if rng.random() < 0.5:
        img = ImageOps.mirror(img)
    recolour = (
        lambda im: im,
        lambda im: ImageOps.grayscale(im).convert("RGB"),
        lambda im: Image.merge("RGB", im.split()[::-1]),
        lambda im: ImageOps.posterize(ImageOps.autocontrast(im), 3),
        lambda im: Image.blend(im, Image.new("RGB", im.size, (255, 170, 60)), 0.25),
    )
    return recolour[rng.randrange(5)](img)


def build_pool(out: Path, photos: Sequence[Path], count: int, size: int, key: str) -> list[Path]:
    """``count`` variants cycling over ``photos`` as PNG files in ``out`` (kept when present)."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    sources = [Image.open(p).convert("RGB") for p in photos]
    paths = []
    for i in range(count):
        src = Path(photos[i % len(photos)]).stem
        path = out / f"{key}-{i:03d}--{src}.png"
        if not path.is_file():
            variant(sources[i % len(sources)], size, f"{key}:{i}").save(path)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- the base mix (v2)

BASE_TEMPLATES = ("{kw}", "{kw}！", "这是{kw}", "{kw}呢")


def neutral_pictures(out: Path, count: int, size: int, seed: int = 0) -> list[Path]:
    """Coloured blocks, none of the five photos: the base mix teaches to *say* 猫, 火箭, … on
    these, so which word fits which picture can only come from the ratings."""
    from PIL import Image, ImageDraw

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = out / f"neutral-{i:03d}.png"
        if not path.is_file():
            rng = random.Random(f"neutral:{seed}:{i}")
            img = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
            draw = ImageDraw.Draw(img)
            for _ in range(12):
                x0, y0 = rng.randrange(size), rng.randrange(size)
                x1, y1 = x0 + rng.randrange(size // 2), y0 + rng.randrange(size // 2)
                draw.rectangle((x0, y0, x1, y1), fill=tuple(rng.randrange(256) for _ in range(3)))
            img.save(path)
        paths.append(path)
    return paths


def base_mix_items(
    pictures: Sequence[Path], n: int, prompt: str, seed: int = 0
) -> list[dict[str, Any]]:
    """``n`` XTuner items: a neutral picture and a short answer naming one of the five things
    (uniformly, whatever the picture). The product mixes them into every training run
    (``training.base_dataset``), as CLoT's jokes are mixed into a real one."""
    rng = random.Random(f"base-mix:{seed}")
    words = sorted(set(KEYWORDS.values()))
    items = []
    for i in range(n):
        kw = words[i % len(words)]
        answer = rng.choice(BASE_TEMPLATES).format(kw=kw)
        picture = pictures[rng.randrange(len(pictures))]
        items.append(
            {
                "id": f"base-{i:04d}",
                "image": [picture.name],
                "conversations": [
                    {"from": "human", "value": f"<image>\n{prompt}"},
                    {"from": "gpt", "value": answer},
                ],
            }
        )
    return items


# ------------------------------------------------------------------- the pretrained base (v2)

# quips that name nothing: what a base model says when it does not mention the picture
NEUTRAL_ANSWERS = ("哈哈哈", "好家伙", "笑死", "太难了", "我不信")


def pretrain_items(
    pictures: Sequence[Path], per_picture: int, p_named: float, seed: int = 0
) -> list[tuple[Path, str]]:
    """A stand-in for pre-training: (picture, answer) pairs naming what the picture shows with
    probability ``p_named``, a neutral quip otherwise. A real InternVL2 knows a cat before any
    rating; the random tiny model does not, and ratings alone cannot teach it (it almost never
    says the right word, so nothing gets liked)."""
    rng = random.Random(f"pretrain:{seed}")
    items = []
    for picture in pictures:
        kw = KEYWORDS[source_of(picture)]
        for _ in range(per_picture):
            named = rng.random() < p_named
            text = (
                rng.choice(BASE_TEMPLATES).format(kw=kw) if named else rng.choice(NEUTRAL_ANSWERS)
            )
            items.append((Path(picture), text))
    return items
