"""Statistics of the learning-loop experiment: intervals, bootstrap over pictures, p-values.

The Wilson interval is the product's own (``bot.abstats.interval``), so the experiment and
``oogiri models ab status`` quote the same numbers. The p-value's normal tail comes from
``scipy.stats``, or ``math.erfc`` where SciPy is missing (the device's image).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Any

from bot.abstats import interval as wilson

__all__ = ["bootstrap_diff", "bootstrap_rate", "distinct_share", "two_proportion_p", "wilson"]


def _rate(cells: Sequence[Sequence[int]]) -> float:
    n = sum(c[1] for c in cells)
    return sum(c[0] for c in cells) / n if n else 0.0


def _bootstrap(
    items: Sequence[Any], stat: Callable[[list[Any]], float], b: int, seed: int
) -> tuple[float, float]:
    """2.5 % and 97.5 % quantiles of ``stat`` over ``b`` resamples of ``items``."""
    rng = random.Random(seed)
    values = sorted(stat([items[rng.randrange(len(items))] for _ in items]) for _ in range(b))
    last = len(values) - 1
    return values[round(0.025 * last)], values[round(0.975 * last)]


def bootstrap_rate(per_image: Sequence[tuple[int, int]], b: int = 2000, seed: int = 0) -> tuple:
    """95 % interval of the like-rate, resampling pictures (answers to one picture may be alike)."""
    if not per_image or sum(n for _, n in per_image) == 0:
        return 0.0, 1.0
    return _bootstrap(per_image, _rate, b, seed)


def bootstrap_diff(
    before: dict[str, tuple[int, int]],
    after: dict[str, tuple[int, int]],
    b: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """95 % interval of (after − before), resampling the pictures both were measured on."""
    keys = sorted(set(before) & set(after))
    if not keys:
        return -1.0, 1.0

    def diff(pick: list[str]) -> float:
        return _rate([after[k] for k in pick]) - _rate([before[k] for k in pick])

    return _bootstrap(keys, diff, b, seed)


def two_proportion_p(k0: int, n0: int, k1: int, n1: int) -> float | None:
    """Two-sided p-value of the pooled two-proportion z-test (None when it is undefined)."""
    if n0 == 0 or n1 == 0:
        return None
    pooled = (k0 + k1) / (n0 + n1)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n0 + 1 / n1))
    if se == 0:
        return None
    z = abs(k1 / n1 - k0 / n0) / se
    try:
        from scipy.stats import norm
    except ImportError:  # the device's image
        return math.erfc(z / math.sqrt(2))
    return float(2 * norm.sf(z))


def distinct_share(texts: Sequence[str]) -> float | None:
    """Share of distinct answers among ``texts`` (1.0: all different; collapse drives it down)."""
    return len(set(texts)) / len(texts) if texts else None
