"""Helpers of the training tests: real photos (crops of scikit-image's sample images) and jokes
and votes seeded through the Store API."""

from __future__ import annotations

import hashlib
import inspect
import io
from pathlib import Path

from PIL import Image

from bot.models import Joke, NormalizedImage
from bot.settings import DEFAULT_PROMPT
from bot.store import Store

PHOTOS = ("chelsea.png", "astronaut.png", "coffee.png", "rocket.jpg", "motorcycle_left.png")
FAKES = Path(__file__).parent / "fakes"


def skimage_dir() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data"


def photo(index: int, size: int = 96) -> NormalizedImage:
    """A distinct real photo per index: a crop of one of scikit-image's photos, as JPEG."""
    name = PHOTOS[index % len(PHOTOS)]
    img = Image.open(skimage_dir() / name).convert("RGB")
    step = index // len(PHOTOS)
    left = (step * 37) % max(img.width - size * 2, 1)
    top = (step * 23) % max(img.height - size * 2, 1)
    crop = img.crop((left, top, left + size * 2, top + size * 2)).resize((size, size))
    buf = io.BytesIO()
    crop.save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    return NormalizedImage(
        jpeg=data,
        sha256=hashlib.sha256(data).hexdigest(),
        width=size,
        height=size,
        source_format="PNG",
    )


async def add_joke(
    store: Store,
    image: NormalizedImage,
    text: str,
    user: str = "test:alice",
    prompt: str = DEFAULT_PROMPT,
    channel: str = "test",
    version: str = "base-v0",
) -> Joke:
    fields = dict(
        channel=channel,
        user_id=user,
        chat_id=None,
        prompt=prompt,
        text=text,
        model_version=version,
        engine="instant",
        params={"max_new_tokens": 64},
    )
    if "image" in inspect.signature(store.add_joke).parameters:
        return await store.add_joke(image, **fields)
    await store.save_image(image)
    return await store.add_joke(image_sha256=image.sha256, **fields)


async def vote(store: Store, joke_id: int, up: int = 0, down: int = 0, prefix: str = "v") -> None:
    for i in range(up):
        await store.rate(joke_id, f"{prefix}-up-{i}", 1, "test")
    for i in range(down):
        await store.rate(joke_id, f"{prefix}-down-{i}", -1, "test")
