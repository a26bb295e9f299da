"""InternVL's dynamic tiling, computed on the client so the server has nothing left to resize.

InternVL (1.5 and 2.x) cuts a picture into a grid of 448×448 tiles: among every grid ``cols×rows``
with ``min_tiles <= cols*rows <= max_tiles`` it takes the one whose aspect ratio is closest to the
picture's; on a tie it moves to the larger grid only while the picture has more than half the
pixels that grid needs. The picture is then resized to ``cols*448 × rows*448`` and cut; with
``use_thumbnail`` a 448×448 thumbnail of the whole picture is added when there are several tiles.

LMDeploy does that resize on its single preprocessing thread for every request. Sending the
picture already at the grid size makes the server's resize a no-op (Pillow copies an equal size),
and the upload is smaller for phone photos. The rule is re-implemented here from InternVL's
published description; :func:`server_grid` is what the server will choose for a given size, and
:func:`presize_size` only returns a size for which the server's choice provably stays the same.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, replace
from hashlib import sha256

from PIL import Image

from bot.models import NormalizedImage

TILE = 448
TOKENS_PER_TILE = 256  # (448 / 14)² patches, pixel-shuffled by 0.5 → 16×16


@dataclass(frozen=True, slots=True)
class Grid:
    cols: int
    rows: int

    @property
    def tiles(self) -> int:
        return self.cols * self.rows

    def size(self, tile: int = TILE) -> tuple[int, int]:
        return (self.cols * tile, self.rows * tile)

    def image_tokens(self, use_thumbnail: bool = True, per_tile: int = TOKENS_PER_TILE) -> int:
        """Prompt tokens the picture costs (the thumbnail counts as a tile)."""
        extra = 1 if use_thumbnail and self.tiles > 1 else 0
        return (self.tiles + extra) * per_tile


def candidate_grids(min_tiles: int, max_tiles: int) -> list[Grid]:
    """Every grid with min..max tiles, in the order InternVL's preprocessing tries them.

    That order is "by tile count" with a stable sort over a Python set built column by column, so
    equal-count grids keep the set's iteration order; building the same set the same way
    reproduces it (it decides exact ties, e.g. a 1.5:1 picture between 1×1 and 2×1 at 2 tiles).
    """
    if min_tiles < 1 or max_tiles < min_tiles:
        raise ValueError(f"bad tile range {min_tiles}..{max_tiles}")
    pairs = set()
    for n in range(min_tiles, max_tiles + 1):
        for c in range(1, n + 1):
            for r in range(1, n + 1):
                if min_tiles <= c * r <= max_tiles:
                    pairs.add((c, r))
    return [Grid(c, r) for c, r in sorted(pairs, key=lambda g: g[0] * g[1])]


def server_grid(
    width: int, height: int, max_tiles: int, min_tiles: int = 1, tile: int = TILE
) -> Grid:
    """The grid InternVL's dynamic preprocessing picks for a ``width``×``height`` picture."""
    if width <= 0 or height <= 0:
        raise ValueError(f"bad size {width}x{height}")
    aspect = width / height
    area = width * height
    best = Grid(1, 1)
    best_diff = float("inf")
    for grid in candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - grid.cols / grid.rows)
        if diff < best_diff:
            best_diff, best = diff, grid
        elif diff == best_diff and area > 0.5 * tile * tile * grid.tiles:
            best = grid
    return best


def presize_size(
    width: int, height: int, max_tiles: int, min_tiles: int = 1, tile: int = TILE
) -> tuple[int, int] | None:
    """The upload size for which the server keeps the grid it would choose and resizes nothing.

    ``None`` when no such size exists: a 3×3 grid's exact size looks like a 4×4 picture to the tie
    rule when 16 tiles are allowed (only possible with ``max_tiles >= 16``).
    """
    grid = server_grid(width, height, max_tiles, min_tiles, tile)
    target = grid.size(tile)
    if server_grid(*target, max_tiles, min_tiles, tile) != grid:
        return None
    return target


def presize(
    image: NormalizedImage,
    max_tiles: int,
    min_tiles: int = 1,
    tile: int = TILE,
    quality: int = 90,
) -> NormalizedImage:
    """``image`` resized to its tile grid (bicubic, as the server would), or itself if it is.

    The returned image keeps the original's ``sha256`` (it is the same picture to the store); its
    ``jpeg`` is what goes on the wire.
    """
    target = presize_size(image.width, image.height, max_tiles, min_tiles, tile)
    if target is None or target == (image.width, image.height):
        return image
    with Image.open(io.BytesIO(image.jpeg)) as src:
        src.draft("RGB", target)  # JPEG: decode at a reduced scale when that is still ≥ target
        rgb = src.convert("RGB")
        resized = rgb.resize(target, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    resized.save(buf, "JPEG", quality=quality)
    data = buf.getvalue()
    return replace(image, jpeg=data, width=target[0], height=target[1])


def content_hash(data: bytes) -> str:
    return sha256(data).hexdigest()
