"""Tiny files that decode to huge pictures (issue 21's reproducers), built without the pixels."""

from __future__ import annotations

import struct
import zlib

#: PNG colour type → samples per pixel.
_SAMPLES = {0: 1, 2: 3, 4: 2, 6: 4}


def _chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def png_bomb(width: int, height: int, bit_depth: int = 16, color_type: int = 0) -> bytes:
    """A valid all-black PNG: 6324×6324 16-bit grey is ~78 KB and 80 MB of 16-bit pixels."""
    row = b"\x00" * (1 + width * _SAMPLES[color_type] * bit_depth // 8)  # filter byte + pixels
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", idat)
        + _chunk(b"IEND", b"")
    )
