"""Fixtures of the fault-injection suite (the reliability records come from tests/adversarial)."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for extra in (HERE, HERE.parent / "adversarial"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from relreport import (  # noqa: E402,F401  (fixture and hooks of the reliability records)
    pytest_runtest_logreport,
    pytest_sessionfinish,
    reliability,
)
