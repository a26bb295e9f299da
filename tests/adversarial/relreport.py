"""Per-case records of the reliability suites (tests/adversarial, tests/faults) for
docs/reliability.md, and the memory/time measurement every case uses.

A test says what it tries with ``reliability.case(...)`` and measures its critical section with
``with reliability.measure(): ...``. The record rides on the test item's ``user_properties``; the
hooks below (re-exported by both suites' conftest.py) collect every record with the test's real
outcome, and write them as JSON when ``OOGIRI_RELIABILITY_JSON`` names a file.
``bench/adversarial_report.py`` runs the suites that way and renders docs/reliability.md from it,
so the document shows exactly what the tests saw.

What "peak RSS" means here: the kernel's high-water mark of resident memory (``VmHWM``) of the
*whole test process* (client, server, decoder), reset right before the measured section by
writing ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0). It therefore includes the pytest
process's baseline (reported separately as ``base_mb``), so ``peak_mb - base_mb`` is an upper bound
of what the case itself needed. Where the reset is not permitted the figure is the process's
lifetime peak (``ru_maxrss``) and the record says so (``peak_kind``). Cases that run a server in a
child process measure that process's ``VmHWM`` instead and say so.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest

ENV = "OOGIRI_RELIABILITY_JSON"
RSS_LIMIT_MB = 1024.0
PROPERTY = "reliability"

_records: dict[str, dict[str, Any]] = {}
_written = False


def _status_kb(field_name: str, pid: int | str = "self") -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = re.search(rf"^{field_name}:\s+(\d+)\s+kB", text, re.M)
    return int(found.group(1)) if found else None


def rss_mb(pid: int | str = "self") -> float | None:
    kb = _status_kb("VmRSS", pid)
    return None if kb is None else kb / 1024


def peak_mb(pid: int | str = "self") -> float | None:
    kb = _status_kb("VmHWM", pid)
    return None if kb is None else kb / 1024


def reset_peak(pid: int | str = "self") -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not let us."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@dataclass
class Record:
    suite: str
    case: str
    kind: str
    what: str
    expected: str
    observed: str = ""
    outcome: str = "not run"
    seconds: float | None = None
    peak_mb: float | None = None
    base_mb: float | None = None
    peak_kind: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class Reliability:
    """The fixture object: describe the case, measure it, note what was observed."""

    def __init__(self, item: pytest.Item) -> None:
        self.item = item
        self.record: Record | None = None

    def case(self, suite: str, case: str, kind: str, what: str, expected: str) -> Record:
        self.record = Record(suite, case, kind, what, expected)
        self.item.user_properties.append((PROPERTY, self.record))
        return self.record

    def observe(self, text: str, **extra: Any) -> None:
        assert self.record is not None, "call reliability.case() first"
        self.record.observed = text
        self.record.extra.update(extra)

    @contextlib.contextmanager
    def measure(self, time_limit_s: float | None = None) -> Iterator[Record]:
        """Time the block and take this process's peak RSS over it (see the module docstring)."""
        record = self.record
        assert record is not None, "call reliability.case() first"
        fresh = reset_peak()
        record.base_mb = rss_mb()
        started = time.perf_counter()
        try:
            yield record
        finally:
            record.seconds = time.perf_counter() - started
            if fresh:
                record.peak_mb, record.peak_kind = peak_mb(), "VmHWM of the test process"
            else:
                maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                record.peak_mb, record.peak_kind = maxrss, "lifetime ru_maxrss (no reset)"
        if record.peak_mb is not None:
            assert record.peak_mb < RSS_LIMIT_MB, f"peak RSS {record.peak_mb:.0f} MB"
        if time_limit_s is not None:
            assert record.seconds < time_limit_s, f"took {record.seconds:.1f} s"

    def child_peak(self, pid: int, base_mb: float | None = None) -> float | None:
        """Record a child process's VmHWM as this case's peak (servers run as subprocesses)."""
        assert self.record is not None
        value = peak_mb(pid)
        self.record.peak_mb, self.record.base_mb = value, base_mb
        self.record.peak_kind = "VmHWM of the server process"
        if value is not None:
            assert value < RSS_LIMIT_MB, f"server peak RSS {value:.0f} MB"
        return value


@pytest.fixture
def reliability(request: pytest.FixtureRequest) -> Reliability:
    return Reliability(request.node)


# --------------------------------------------------------------------------- hooks


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    for name, value in report.user_properties:
        if name != PROPERTY or not isinstance(value, Record):
            continue
        if report.when == "call" or report.outcome != "passed":
            value.outcome = report.outcome
            if report.outcome == "skipped" and isinstance(report.longrepr, tuple):
                value.observed = value.observed or f"skipped: {report.longrepr[2]}"
            _records[report.nodeid] = asdict(value)


def pytest_sessionfinish(session: pytest.Session) -> None:
    global _written
    target = os.environ.get(ENV)
    if not target or _written:
        return
    _written = True
    Path(target).write_text(json.dumps(list(_records.values()), ensure_ascii=False, indent=1))
