"""Kept for benches not yet moved to ``bench.common``: the one ``write_section`` lives there."""

from bench.common import DOC, HEADER, write_section

__all__ = ["DOC", "HEADER", "write_section"]
