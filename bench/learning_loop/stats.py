"""Statistics of the learning-loop experiment: intervals, bootstrap over pictures, p-values.

The Wilson interval is the product's own (``bot.abstats.interval``), so the experiment and
``oogiri models ab status`` quote the same numbers. The p-value uses ``scipy.stats`` where it is
installed (here, for rendering) and the same normal tail through ``math.erfc`` where it is not (the
device's image has no SciPy).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from bot.abstats import interval


def wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (0, 1 when n is 0)."""
    return interval(k, n, confidence)


def _quantiles(values: list[float], lo: float = 0.025, hi: float = 0.975) -> tuple[float, float]:
    ordered = sorted(values)
    last = len(ordered) - 1
    return ordered[round(lo * last)], ordered[round(hi * last)]


def bootstrap_rate(per_image: Sequence[tuple[int, int]], b: int = 2000, seed: int = 0) -> tuple:
    """95 % interval of the like-rate, resampling pictures (answers to one picture may be alike)."""
    if not per_image or sum(n for _, n in per_image) == 0:
        return 0.0, 1.0
    rng = random.Random(seed)
    m = len(per_image)
    rates = []
    for _ in range(b):
        pick = [per_image[rng.randrange(m)] for _ in range(m)]
        n = sum(x[1] for x in pick)
        rates.append(sum(x[0] for x in pick) / n if n else 0.0)
    return _quantiles(rates)


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
    rng = random.Random(seed)
    diffs = []
    for _ in range(b):
        pick = [keys[rng.randrange(len(keys))] for _ in keys]
        n0 = sum(before[k][1] for k in pick)
        n1 = sum(after[k][1] for k in pick)
        p0 = sum(before[k][0] for k in pick) / n0 if n0 else 0.0
        p1 = sum(after[k][0] for k in pick) / n1 if n1 else 0.0
        diffs.append(p1 - p0)
    return _quantiles(diffs)


def two_proportion_p(k0: int, n0: int, k1: int, n1: int) -> float | None:
    """Two-sided p-value of the pooled two-proportion z-test (None when it is undefined)."""
    if n0 == 0 or n1 == 0:
        return None
    pooled = (k0 + k1) / (n0 + n1)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n0 + 1 / n1))
    if se == 0:
        return None
    z = (k1 / n1 - k0 / n0) / se
    try:
        from scipy.stats import norm
    except ImportError:
        return math.erfc(abs(z) / math.sqrt(2))
    return float(2 * norm.sf(abs(z)))


def distinct_share(texts: Sequence[str]) -> float | None:
    """Share of distinct answers among ``texts`` (1.0: all different; collapse drives it down)."""
    return len(set(texts)) / len(texts) if texts else None
