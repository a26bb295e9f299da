"""InternVL's tile-grid choice, and pre-sizing that makes the server's resize a no-op."""

from __future__ import annotations

import io
import random

import pytest
from enginesupport import jpeg_image
from fake_lmdeploy import _grid_tiles
from PIL import Image

from bot.engines.tiling import (
    TILE,
    Grid,
    candidate_grids,
    presize,
    presize_size,
    server_grid,
)


def brute_force_grid(w: int, h: int, max_tiles: int, min_tiles: int = 1) -> Grid:
    """The published rule, evaluated the slow, obvious way (an independent cross-check)."""
    grids = sorted(
        {
            (c, r)
            for c in range(1, max_tiles + 1)
            for r in range(1, max_tiles + 1)
            if min_tiles <= c * r <= max_tiles
        },
        key=lambda g: g[0] * g[1],
    )
    best, best_diff = (1, 1), None
    for c, r in grids:
        diff = abs(w / h - c / r)
        if best_diff is None or diff < best_diff:
            best, best_diff = (c, r), diff
        elif diff == best_diff and w * h > 0.5 * TILE * TILE * c * r:
            best = (c, r)
    return Grid(*best)


@pytest.mark.parametrize(
    ("size", "max_tiles", "grid"),
    [
        ((4032, 3024), 6, (3, 2)),  # a phone photo, landscape
        ((3024, 4032), 6, (2, 3)),
        ((4032, 3024), 12, (4, 3)),
        ((4032, 3024), 1, (1, 1)),
        ((896, 448), 12, (2, 1)),  # the field notes' 948-token example: 2 tiles + thumbnail
        ((1000, 1000), 6, (2, 2)),
        ((1000, 1000), 12, (3, 3)),
        ((300, 300), 12, (1, 1)),  # small: the tie rule keeps it on one tile
        ((672, 448), 2, (2, 1)),  # exact tie between 1:1 and 2:1, big enough for 2 tiles
        ((150, 100), 2, (1, 1)),  # the same tie, too small for 2 tiles
        ((5000, 400), 12, (12, 1)),
    ],
)
def test_known_grids(size: tuple[int, int], max_tiles: int, grid: tuple[int, int]) -> None:
    assert server_grid(*size, max_tiles) == Grid(*grid)


def test_grid_tokens() -> None:
    assert Grid(1, 1).image_tokens() == 256
    assert Grid(2, 1).image_tokens() == 768  # + thumbnail
    assert Grid(3, 2).image_tokens() == 7 * 256
    assert Grid(3, 2).image_tokens(use_thumbnail=False) == 6 * 256
    assert Grid(3, 2).size() == (1344, 896)


def test_candidates_are_ordered_by_tile_count() -> None:
    grids = candidate_grids(1, 6)
    assert [g.tiles for g in grids] == sorted(g.tiles for g in grids)
    assert Grid(1, 1) == grids[0] and {g.tiles for g in grids} == {1, 2, 3, 4, 5, 6}
    assert candidate_grids(2, 2) == [Grid(1, 2), Grid(2, 1)] or candidate_grids(2, 2) == [
        Grid(2, 1),
        Grid(1, 2),
    ]
    with pytest.raises(ValueError):
        candidate_grids(3, 2)
    with pytest.raises(ValueError):
        server_grid(0, 10, 6)


def test_matches_independent_implementations() -> None:
    rng = random.Random(3)
    for _ in range(3000):
        w, h = rng.randint(16, 6000), rng.randint(16, 6000)
        if rng.random() < 0.2:  # exact aspect ratios, where ties happen
            c, r, k = rng.randint(1, 6), rng.randint(1, 6), rng.randint(20, 600)
            w, h = c * k, r * k
        n = rng.randint(1, 24)
        grid = server_grid(w, h, n)
        assert grid == brute_force_grid(w, h, n), (w, h, n)
        assert grid.tiles == _grid_tiles(w, h, n), (w, h, n)


def test_presize_keeps_the_grid_and_the_server_resizes_nothing() -> None:
    rng = random.Random(5)
    for _ in range(3000):
        w, h, n = rng.randint(16, 6000), rng.randint(16, 6000), rng.randint(1, 12)
        target = presize_size(w, h, n)
        assert target is not None, (w, h, n)  # always possible up to 15 tiles
        grid = server_grid(w, h, n)
        assert target == grid.size()
        # the server sees an image of exactly its target size: its resize changes nothing
        assert server_grid(*target, n) == grid


def test_presize_gives_up_where_the_tie_rule_would_change_the_grid() -> None:
    # With 16 tiles allowed, a 3×3 choice's exact size looks like a 4×4 picture.
    assert server_grid(1100, 1100, 16) == Grid(3, 3)
    assert server_grid(1344, 1344, 16) == Grid(4, 4)
    assert presize_size(1100, 1100, 16) is None
    image = jpeg_image(1100, 1100)
    assert presize(image, 16) is image


def test_presize_image() -> None:
    phone = jpeg_image(4032, 3024)
    out = presize(phone, 6)
    assert (out.width, out.height) == (1344, 896) and out.sha256 == phone.sha256
    with Image.open(io.BytesIO(out.jpeg)) as im:
        assert im.size == (1344, 896) and im.format == "JPEG"
    assert len(out.jpeg) < len(phone.jpeg)
    assert presize(out, 6) is out  # already on its grid
    small = presize(jpeg_image(300, 200), 1)
    assert (small.width, small.height) == (448, 448)


def test_matches_lmdeploy_when_installed() -> None:
    """On the GPU machine: LMDeploy's own InternVL preprocessing picks the same tile counts."""
    internvl = pytest.importorskip("lmdeploy.vl.model.internvl")
    rng = random.Random(11)
    for i in range(300):
        w, h, n = rng.randint(16, 3000), rng.randint(16, 3000), rng.randint(1, 12)
        if i % 4 == 0:
            c, r, k = rng.randint(1, 6), rng.randint(1, 6), rng.randint(20, 400)
            w, h = c * k, r * k
        tiles = internvl.dynamic_preprocess(Image.new("RGB", (w, h)), 1, n, TILE, False)
        assert len(tiles) == server_grid(w, h, n).tiles, (w, h, n)
        target = presize_size(w, h, n)
        assert target is not None
        again = internvl.dynamic_preprocess(Image.new("RGB", target), 1, n, TILE, False)
        assert len(again) == len(tiles)
