"""The simulated audience and the pictures it is shown (bench/learning_loop, issue 9 and 15 C).

Two tastes:
- ``Audience`` (version 1): an answer is liked when it contains one of ``like``'s characters,
  whatever the picture (猫狗 by default). A model that says 猫 to everything wins.
- ``PictureAudience`` (version 2): an answer is liked only when it names what is in *that*
  picture (``KEYWORDS``: 猫 for the cat, 火箭 for the rocket, …). Saying 猫 to everything is liked
  on cat pictures only.

Both add independent voter noise, drawn from (seed, joke id, voter) alone, so every vote is
reproducible on any machine and in any order.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PHOTO_NAMES = ("chelsea.png", "astronaut.png", "coffee.png", "rocket.jpg", "motorcycle_left.png")
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
    """The simulated audience: a known taste plus independent voter noise.

    An answer is liked when it contains any character of ``like``. Voter ``v`` reports the
    opposite of the taste with probability ``noise``, drawn from (seed, joke id, v) alone, so the
    votes are reproducible and do not depend on the order they are cast in.
    """

    like: str
    noise: float = 0.1
    voters: int = 3
    seed: int = 0

    def likes(self, text: str | None) -> bool:
        return bool(text) and any(ch in str(text) for ch in self.like)

    def vote(self, joke_id: int | str, text: str | None, voter: int) -> int:
        liked = self.likes(text)
        if _unit(self.seed, "vote", joke_id, voter) < self.noise:
            liked = not liked
        return 1 if liked else -1

    def votes(self, joke_id: int | str, text: str | None) -> list[int]:
        return [self.vote(joke_id, text, v) for v in range(self.voters)]


# --------------------------------------------------------------------------- pictures


def source_photos(folder: Path | None) -> list[Path]:
    """scikit-image's five photos (or the staged copies in .device/photos, or ``folder``)."""
    candidates = [folder] if folder else []
    with contextlib.suppress(ImportError):
        import skimage

        candidates.append(Path(skimage.__file__).parent / "data")
    candidates.append(ROOT / ".device" / "photos")
    for cand in candidates:
        if cand is None or not cand.is_dir():
            continue
        named = [cand / n for n in PHOTO_NAMES if (cand / n).is_file()]
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
    colour = rng.randrange(5)
    if colour == 1:
        img = ImageOps.grayscale(img).convert("RGB")
    elif colour == 2:
        r, g, b = img.split()
        img = Image.merge("RGB", (b, g, r))
    elif colour == 3:
        img = ImageOps.posterize(ImageOps.autocontrast(img), 3)
    elif colour == 4:
        img = Image.blend(img, Image.new("RGB", img.size, (255, 170, 60)), 0.25)
    return img


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


@dataclass(frozen=True)
class PictureAudience:
    """Version 2's audience: an answer is liked only when it names what is in its picture.

    ``source_of(picture)`` says which source photo a picture was made from (the pools record it in
    their file names); the answer must contain that photo's keyword (``KEYWORDS``). Voter noise as
    in ``Audience``.
    """

    keywords: dict[str, str] = field(default_factory=lambda: dict(KEYWORDS))
    noise: float = 0.1
    voters: int = 3
    seed: int = 0

    def keyword(self, picture: str) -> str:
        source = source_of(picture)
        if source not in self.keywords:
            raise ValueError(f"no keyword for picture {picture!r} (source {source!r})")
        return self.keywords[source]

    def likes(self, text: str | None, picture: str) -> bool:
        return bool(text) and self.keyword(picture) in str(text)

    def vote(self, joke_id: int | str, text: str | None, voter: int, picture: str) -> int:
        liked = self.likes(text, picture)
        if _unit(self.seed, "vote", joke_id, voter) < self.noise:
            liked = not liked
        return 1 if liked else -1

    def votes(self, joke_id: int | str, text: str | None, picture: str) -> list[int]:
        return [self.vote(joke_id, text, v, picture) for v in range(self.voters)]


def source_of(picture: str | Path) -> str:
    """The source photo's stem of a pool picture: ``train-003--rocket.png`` → ``rocket``."""
    stem = Path(picture).stem
    if "--" not in stem:
        raise ValueError(f"{picture!r} does not name its source photo (expected KEY-NNN--SOURCE)")
    return stem.split("--", 1)[1]


# --------------------------------------------------------------------------- the base mix (v2)

BASE_TEMPLATES = ("{kw}", "{kw}！", "这是{kw}", "{kw}呢")


def neutral_pictures(out: Path, count: int, size: int, seed: int = 0) -> list[Path]:
    """Pictures of nothing in particular (coloured blocks and noise), none of the five photos.

    The base mix pairs the audience's words with these, so a model learns to *say* 猫, 火箭, …
    without learning any pairing with the five photos: which word fits which picture must come
    from the ratings.
    """
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
    """A stand-in for pre-training: (picture, answer) pairs where the answer names what the
    picture shows with probability ``p_named`` and is a neutral quip otherwise.

    A real InternVL2 knows what a cat looks like before any rating; the random tiny model does
    not, and ratings alone cannot teach it (it almost never says the right word, so nothing gets
    liked). Fine-tuned on these pairs (from pictures disjoint from the experiment's pools), the
    tiny base names the picture some of the time and quips otherwise. Whether the audience wants
    the picture named is what the ratings must teach.
    """
    rng = random.Random(f"pretrain:{seed}")
    items = []
    for picture in pictures:
        kw = KEYWORDS[source_of(picture)]
        for _ in range(per_picture):
            if rng.random() < p_named:
                text = rng.choice(BASE_TEMPLATES).format(kw=kw)
            else:
                text = rng.choice(NEUTRAL_ANSWERS)
            items.append((Path(picture), text))
    return items
