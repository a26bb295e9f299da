"""Keep docs/benchmarks.md as sections owned by individual benchmarks (between markers)."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
HEADER = (
    "# Benchmarks\n\nMeasured figures only; each section is written by the benchmark named in it.\n"
)


def write_section(key: str, title: str, body: str, doc: Path = DOC) -> None:
    text = doc.read_text(encoding="utf-8") if doc.exists() else HEADER
    block = f"<!-- bench:{key} -->\n## {title}\n\n{body.strip()}\n<!-- /bench:{key} -->"
    pattern = re.compile(
        rf"<!-- bench:{re.escape(key)} -->.*?<!-- /bench:{re.escape(key)} -->", re.S
    )
    text = (
        pattern.sub(lambda _m: block, text)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + block + "\n"
    )
    doc.write_text(text, encoding="utf-8")
