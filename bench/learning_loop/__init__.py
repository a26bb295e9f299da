"""Does the retraining loop learn? The learning-loop experiment, split by concern (issue 18.7):
``audience``, ``stats``, ``experiment`` (``python -m bench.learning_loop``), ``report``,
``control``, ``proxy`` (``python -m bench.learning_loop.proxy``), ``pretrain``. See
docs/learning-loop.md.
"""

from __future__ import annotations

from bench.learning_loop.audience import (
    KEYWORDS,
    Audience,
    PictureAudience,
    build_pool,
    source_of,
    source_photos,
)
from bench.learning_loop.experiment import Config, Experiment, register_plugin
from bench.learning_loop.stats import (
    bootstrap_diff,
    bootstrap_rate,
    distinct_share,
    two_proportion_p,
    wilson,
)

__all__ = [
    "KEYWORDS",
    "Audience",
    "Config",
    "Experiment",
    "PictureAudience",
    "bootstrap_diff",
    "bootstrap_rate",
    "build_pool",
    "distinct_share",
    "register_plugin",
    "source_of",
    "source_photos",
    "two_proportion_p",
    "wilson",
]
