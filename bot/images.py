"""Untrusted upload bytes → a small, clean RGB JPEG (``NormalizedImage``) or ``ImageRejected``.

Every channel funnels pictures through :func:`load`, so this is the one place that has to be
paranoid: sizes are checked from the file header before Pillow allocates any pixels (WebP's
decoder allocates its canvas at open time, so Pillow alone is not enough), the format is sniffed
from magic bytes rather than trusted from the filename, and every decoder failure becomes a
rejection the user can read. Output never carries EXIF/XMP/IPTC (GPS, camera serials).

Speed: a typical upload is an RGB JPEG that is already small enough. Such a file is validated by
a 1/8-scale decode (which still entropy-decodes every block, so truncation is caught) and stored
as the original bytes minus metadata segments, instead of a full decode + re-encode.

Memory: what a decode costs is estimated from the opened header (Pillow's storage per pixel for
the picture's mode, plus the working copies of shrinking) before any pixel is read. One picture
may not exceed ``max_decoded_bytes``; all decodes of the process together share
``decode_budget_bytes`` (a byte-counting semaphore), so parallel uploads wait instead of piling
up. Pictures are shrunk in their own mode before any conversion, so a 16-bit or float picture is
never copied at full size into a wider mode. After a large decode the C heap is trimmed
(``malloc_trim`` on glibc) so a burst does not leave the process large.

Colour: every mode Pillow decodes becomes RGB with its colours (CMYK, YCbCr, 8-bit CIELab TIFFs
through LittleCMS, premultiplied grey + alpha, 16-bit and float grey by scaling). A TIFF Pillow
has no decoder for (16-bit or ICC L*a*b*, float RGB) is refused as "unsupported" naming its
colour space and sample layout, never as "damaged".
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import io
import logging
import math
import re
import struct
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from PIL import Image

from .models import EngineBusy, ImageRejected, NormalizedImage
from .settings import ImageSettings

log = logging.getLogger(__name__)

try:  # HEIC/HEIF (iPhone photos) only if the maintained plugin is installed.
    import pillow_heif  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the environment
    pillow_heif = None
else:  # pragma: no cover
    pillow_heif.register_heif_opener()

#: Sniffed format → Pillow format name that may open it.
ACCEPTED: dict[str, str] = {
    "JPEG": "JPEG",
    "PNG": "PNG",
    "WEBP": "WEBP",
    "GIF": "GIF",
    "BMP": "BMP",
    "TIFF": "TIFF",
}
if pillow_heif is not None:  # pragma: no cover
    ACCEPTED["HEIF"] = "HEIF"

#: File suffixes and MIME types of each format: with ``ACCEPTED`` the one list every channel uses
#: to decide from an attachment's metadata alone, before downloading, whether to try it.
FORMAT_TYPES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "JPEG": ((".jpg", ".jpeg", ".jfif", ".jpe"), ("image/jpeg", "image/pjpeg", "image/jpg")),
    "PNG": ((".png",), ("image/png", "image/x-png")),
    "WEBP": ((".webp",), ("image/webp",)),
    "GIF": ((".gif",), ("image/gif",)),
    "BMP": ((".bmp", ".dib"), ("image/bmp", "image/x-ms-bmp", "image/x-bmp")),
    "TIFF": ((".tif", ".tiff"), ("image/tiff", "image/tif")),
    "HEIF": ((".heic", ".heif"), ("image/heic", "image/heif")),
}
ACCEPTED_SUFFIXES = frozenset(x for f in ACCEPTED for x in FORMAT_TYPES.get(f, ((), ()))[0])
ACCEPTED_MIME_TYPES = frozenset(x for f in ACCEPTED for x in FORMAT_TYPES.get(f, ((), ()))[1])


def accepted_type(content_type: str | None, filename: str | None) -> bool:
    """Whether metadata alone says "a picture we decode": the MIME type when one is given (and
    not the generic octet-stream), else the file name's suffix."""
    ctype = (content_type or "").split(";", 1)[0].strip().lower()
    if ctype and ctype != "application/octet-stream":
        return ctype in ACCEPTED_MIME_TYPES
    name = (filename or "").lower()
    return "." in name and name[name.rindex(".") :] in ACCEPTED_SUFFIXES


# Errors Pillow's decoders are known to raise on hostile input. Anything else is caught too,
# but logged loudly because it more likely means a bug here.
_DECODE_ERRORS = (
    OSError,  # includes UnidentifiedImageError and "image file is truncated"
    SyntaxError,
    ValueError,
    TypeError,
    IndexError,
    KeyError,
    struct.error,
    EOFError,
    ZeroDivisionError,
    OverflowError,
    MemoryError,
)

_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_BMP_HEADER_SIZES = {n.to_bytes(4, "little") for n in (12, 40, 52, 56, 64, 108, 124)}
_ORIENTATION_TAG = 0x0112
_MIB = 1024 * 1024


# --------------------------------------------------------------------------- decode memory

#: Pillow keeps these modes in one byte per pixel, I;16 in two, every other mode in four.
_ONE_BYTE_MODES = frozenset({"1", "L", "P"})
#: Below this estimate a decode is not worth a heap trim afterwards.
TRIM_AFTER_BYTES = 32 * _MIB
#: Fixed cost of any decode (decoder buffers, the output JPEG) on top of the pixels.
DECODE_OVERHEAD = 8 * _MIB


def storage_bytes_per_pixel(mode: str) -> int:
    """Bytes Pillow allocates per pixel for a decoded image of ``mode``."""
    if mode in _ONE_BYTE_MODES:
        return 1
    if mode.startswith(("I;16", "BGR;15", "BGR;16")):
        return 2
    return 4


def decode_cost(size: tuple[int, int], mode: str, max_side: int) -> int:
    """Estimated peak bytes to decode and normalise one picture (see ``_normalise``).

    The decoded pixels at the mode's storage size, a full-size RGBA copy when the mode cannot be
    resampled directly (palette, bilevel), and the shrinking's intermediate (at most twice the
    output side, four bytes per pixel).
    """
    w, h = size
    pixels = w * h
    cost = pixels * storage_bytes_per_pixel(mode)
    if mode in ("P", "PA", "1"):
        cost += pixels * 4
    cost += 4 * min(pixels, (2 * max_side) ** 2)
    return cost + DECODE_OVERHEAD


def _load_malloc_trim() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_malloc_trim = _load_malloc_trim()

#: glibc's mallopt parameter M_MMAP_THRESHOLD.
_M_MMAP_THRESHOLD = -3
#: Allocations from this size up get their own mapping, returned to the OS as soon as freed.
MMAP_THRESHOLD = 1 * _MIB


def _pin_mmap_threshold() -> bool:
    """Keep big pixel buffers out of the malloc arenas.

    glibc raises its mmap threshold to the size of the largest mapping freed so far (up to
    32 MiB). After one big picture, Pillow's 16 MiB pixel blocks therefore come from the per-
    thread arenas, where freed blocks stay resident and fragment: 16 parallel decodes reached
    1.5 GB of RSS with 0.45 GB of pixels alive. Pinning the threshold makes every large
    buffer a mapping of its own, so RSS follows the memory actually in use.
    """
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


MMAP_THRESHOLD_PINNED = _pin_mmap_threshold()


def release_memory() -> bool:
    """Give freed C heap back to the OS (glibc keeps large freed chunks otherwise)."""
    if _malloc_trim is None:
        return False
    return bool(_malloc_trim(0))


#: A decode estimated at this much or more is "large": at most ``MAX_LARGE_DECODES`` run at once,
#: so a burst of huge pictures takes one core, not all of them, and ordinary photos keep moving.
LARGE_DECODE_BYTES = 64 * _MIB
MAX_LARGE_DECODES = 1
#: A large picture waits at most this long for its turn (then "busy"): a queue of huge pictures
#: must not hold the channel's admission slots that ordinary photos need.
LARGE_DECODE_WAIT_S = 5.0


def decode_wait(cost: int, settings: ImageSettings) -> float:
    """How long a decode of ``cost`` bytes may wait for the budget."""
    if cost >= LARGE_DECODE_BYTES:
        return min(settings.decode_wait_s, LARGE_DECODE_WAIT_S)
    return settings.decode_wait_s


class DecodeBudget:
    """A semaphore counting bytes: decodes run while their estimates fit in ``capacity`` together.

    Not FIFO on purpose: a small photo need not wait behind a huge one that does not fit yet.
    A single estimate above the capacity is clamped to it (it then runs alone); large decodes
    also take turns (``MAX_LARGE_DECODES``).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self.peak = 0
        self.large = 0  # decodes of LARGE_DECODE_BYTES or more in progress
        self._large_since_trim = False
        self._cond = threading.Condition()

    def _fits(self, n: int) -> bool:
        large_busy = n >= LARGE_DECODE_BYTES and self.large >= MAX_LARGE_DECODES
        return self.used + n <= self.capacity and not large_busy

    def _take(self, n: int) -> None:
        self.used += n
        self.large += n >= LARGE_DECODE_BYTES
        self.peak = max(self.peak, self.used)

    def _try_take(self, n: int) -> bool:
        with self._cond:
            if not self._fits(n):
                return False
            self._take(n)
            return True

    def _give_back(self, n: int, nbytes: int) -> None:
        with self._cond:
            self.used -= n
            self.large -= n >= LARGE_DECODE_BYTES
            self._large_since_trim |= nbytes >= TRIM_AFTER_BYTES
            trim = self._large_since_trim and self.used == 0
            if trim:
                self._large_since_trim = False
            self._cond.notify_all()
        if trim:  # the last large decode of a burst: hand its pages back
            release_memory()

    @contextmanager
    def reserve(self, nbytes: int, timeout_s: float) -> Iterator[None]:
        """Hold ``nbytes`` of the budget; ``EngineBusy`` when it does not free up in time."""
        n = min(nbytes, self.capacity)
        with self._cond:
            if not self._cond.wait_for(lambda: self._fits(n), timeout_s):
                raise EngineBusy(detail="decode memory budget exhausted")
            self._take(n)
        try:
            yield
        finally:
            self._give_back(n, nbytes)

    @asynccontextmanager
    async def reserve_async(self, nbytes: int, timeout_s: float) -> AsyncIterator[None]:
        """``reserve`` for the event loop: waiting here holds no worker thread (a burst of huge
        pictures must not occupy the thread pool that small ones need to be decoded in)."""
        n = min(nbytes, self.capacity)
        deadline = time.monotonic() + timeout_s
        while not self._try_take(n):
            if time.monotonic() >= deadline:
                raise EngineBusy(detail="decode memory budget exhausted")
            await asyncio.sleep(0.02)
        try:
            yield
        finally:
            self._give_back(n, nbytes)


_budgets: dict[int, DecodeBudget] = {}
_budgets_lock = threading.Lock()


def decode_budget(settings: ImageSettings) -> DecodeBudget:
    """The process-wide budget for this capacity (every channel's decodes share it)."""
    with _budgets_lock:
        budget = _budgets.get(settings.decode_budget_bytes)
        if budget is None:
            budget = _budgets[settings.decode_budget_bytes] = DecodeBudget(
                settings.decode_budget_bytes
            )
        return budget


def read_limited(path: str | Path, max_bytes: int) -> bytes:
    """At most ``max_bytes`` + 1 bytes of a file (``/dev/zero`` is not read to the end).

    A result longer than ``max_bytes`` means "too large"; ``load`` refuses it with that message.
    """
    with open(path, "rb") as fh:
        return fh.read(max_bytes + 1)


# --------------------------------------------------------------------------- sniffing


def sniff_format(data: bytes) -> str | None:
    """Name the container from its magic bytes (None: not a picture we recognise).

    Returns accepted names (see ``ACCEPTED``) and also well-known formats we refuse, so the user
    hears "unsupported PSD" rather than "not a picture".
    """
    head = data[:32]
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:2] == b"BM" and head[14:18] in _BMP_HEADER_SIZES:  # "BM" alone starts many texts
        return "BMP"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"avif", b"avis") or (brand == b"mif1" and b"avif" in data[8:64]):
            return "AVIF"
        if brand in (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"):
            return "HEIF"
        return None  # mp4/mov/3gp …
    if head[:4] == b"8BPS":
        return "PSD"
    if head[:4] in (b"\x00\x00\x01\x00", b"\x00\x00\x02\x00"):
        return "ICO"
    if head[:5] == b"%PDF-":
        return "PDF"
    if head[:4] == b"%!PS" or head[:4] == b"\xc5\xd0\xd3\xc6":
        return "EPS"
    if head[:2] == b"\xff\x0a" or head[:12] == b"\x00\x00\x00\x0cJXL \r\n\x87\n":
        return "JPEG XL"
    if head[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n" or head[:4] == b"\xff\x4f\xff\x51":
        return "JPEG 2000"
    if head[:4] == b"qoif":
        return "QOI"
    if _looks_like_svg(data):
        return "SVG"
    return None


def _looks_like_svg(data: bytes) -> bool:
    text = data[:4096].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return text.startswith((b"<?xml", b"<svg", b"<!doctype svg", b"<!--")) and b"<svg" in text


# --------------------------------------------------------------------------- header sizes


def _header_size(data: bytes, fmt: str) -> tuple[int, int] | None:
    """Width and height as the header claims them, without Pillow (which may allocate)."""
    try:
        if fmt == "PNG":
            if data[12:16] != b"IHDR":
                return None
            return struct.unpack(">II", data[16:24])
        if fmt == "GIF":
            return struct.unpack("<HH", data[6:10])
        if fmt == "BMP":
            if struct.unpack("<I", data[14:18])[0] == 12:  # OS/2 BITMAPCOREHEADER
                return struct.unpack("<HH", data[18:22])
            w, h = struct.unpack("<ii", data[18:26])
            return abs(w), abs(h)
        if fmt == "WEBP":
            return _webp_size(data)
        if fmt == "JPEG":
            return _scan_jpeg(data).size
        if fmt == "TIFF":
            return _tiff_size(data)
    except struct.error:
        return None
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X":
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        return w, h
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack("<HH", data[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L" and data[20:21] == b"\x2f":
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    """ImageWidth/ImageLength of the first IFD (classic TIFF only; BigTIFF → Pillow decides)."""
    order = "<" if data[:2] == b"II" else ">"
    if struct.unpack(order + "H", data[2:4])[0] != 42:
        return None
    ifd = struct.unpack(order + "I", data[4:8])[0]
    count = struct.unpack(order + "H", data[ifd : ifd + 2])[0]
    dims: dict[int, int] = {}
    for i in range(min(count, 512)):
        entry = data[ifd + 2 + 12 * i : ifd + 14 + 12 * i]
        tag, typ = struct.unpack(order + "HH", entry[:4])
        if tag in (256, 257):
            fmt = "H" if typ == 3 else "I"
            dims[tag] = struct.unpack(order + fmt, entry[8 : 8 + struct.calcsize(fmt)])[0]
    if 256 in dims and 257 in dims:
        return dims[256], dims[257]
    return None


_TIFF_TYPES = {1: "B", 3: "H", 4: "I"}  # BYTE, SHORT, LONG: what the layout tags use
_SAMPLE_FORMATS = {1: "integer", 2: "signed integer", 3: "float"}
#: PhotometricInterpretation → colour space, so a refusal says "CIELab" or "ICCLab" rather than
#: a bare "3 × 8-bit integer" that an ordinary RGB TIFF is too.
_PHOTOMETRIC = {
    0: "grey",
    1: "grey",
    2: "RGB",
    3: "palette",
    4: "mask",
    5: "CMYK",
    6: "YCbCr",
    8: "CIELab",
    9: "ICCLab",
    10: "ITULab",
    32844: "LogL",
    32845: "LogLuv",
}


def _tiff_first_ifd(data: bytes) -> dict[int, list[int]] | None:
    """Tag → values of the first IFD's integer tags (classic TIFF); None when unreadable."""
    order = "<" if data[:2] == b"II" else ">"
    try:
        if struct.unpack(order + "H", data[2:4])[0] != 42:
            return None
        ifd = struct.unpack(order + "I", data[4:8])[0]
        count = struct.unpack(order + "H", data[ifd : ifd + 2])[0]
        tags: dict[int, list[int]] = {}
        for i in range(min(count, 512)):
            entry = data[ifd + 2 + 12 * i : ifd + 14 + 12 * i]
            tag, typ, n = struct.unpack(order + "HHI", entry[:8])
            code = _TIFF_TYPES.get(typ)
            if code is None or not 0 < n <= 16:
                continue
            size = struct.calcsize(code) * n
            if size <= 4:
                raw = entry[8 : 8 + size]
            else:
                offset = struct.unpack(order + "I", entry[8:12])[0]
                raw = data[offset : offset + size]
            tags[tag] = list(struct.unpack(order + code * n, raw))
    except struct.error:
        return None
    return tags


def tiff_layout(data: bytes) -> str | None:
    """A readable description of a TIFF's pixels, e.g. "TIFF RGB, 3 × 64-bit float" or
    "TIFF CIELab, 3 × 16-bit integer" (None: unknown)."""
    tags = _tiff_first_ifd(data)
    if not tags or 256 not in tags or 257 not in tags:
        return None
    bits = tags.get(258, [1])
    samples = tags.get(277, [len(bits)])[0]
    kind = _SAMPLE_FORMATS.get(tags.get(339, [1])[0], "unusual")
    space = _PHOTOMETRIC.get(tags.get(262, [-1])[0])
    return f"TIFF{' ' + space if space else ''}, {samples} × {bits[0]}-bit {kind}"


# --------------------------------------------------------------------------- JPEG markers

# The end of entropy-coded data: 0xFF not followed by a stuffed 0x00 or a restart marker RSTn.
# (A literal first byte lets the regex engine skip ahead fast; fill bytes are eaten by the walk.)
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7]")
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_HUFFMAN_SOF = {0xC0, 0xC1, 0xC2}  # baseline, extended, progressive: what every viewer decodes


@dataclass(slots=True)
class _JpegScan:
    size: tuple[int, int] | None = None
    sof: int | None = None
    clean: bytes | None = None  # the file minus metadata and trailing bytes; None: malformed


def _keep_segment(marker: int, body: bytes) -> bool:
    """Keep what decoding and colour need (JFIF, ICC, Adobe transform); drop EXIF/XMP/IPTC/MPF,
    comments and JFXX thumbnails."""
    if marker == 0xFE or 0xE0 <= marker <= 0xEF:
        return (
            (marker == 0xE0 and body.startswith(b"JFIF\x00"))
            or (marker == 0xE2 and body.startswith(b"ICC_PROFILE\x00"))
            or (marker == 0xEE and body.startswith(b"Adobe"))
        )
    return True


def _scan_jpeg(data: bytes) -> _JpegScan:
    """Walk the marker segments once: frame size, SOF type and a metadata-free copy."""
    scan = _JpegScan()
    if not data.startswith(b"\xff\xd8"):
        return scan
    out = [b"\xff\xd8"]
    pos, end = 2, len(data)
    while pos < end:
        if data[pos] != 0xFF:
            return scan
        while pos < end and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= end:
            return scan
        marker = data[pos]
        pos += 1
        if marker == 0xD9:  # EOI: anything after it (MPO frames, appended archives) goes
            out.append(b"\xff\xd9")
            scan.clean = b"".join(out)
            return scan
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            out.append(bytes((0xFF, marker)))
            continue
        if marker in (0x00, 0xD8) or pos + 2 > end:
            return scan
        length = int.from_bytes(data[pos : pos + 2], "big")
        if length < 2 or pos + length > end:
            return scan
        body = data[pos + 2 : pos + length]
        if marker in _SOF:
            if scan.sof is not None or len(body) < 5:
                return scan
            scan.sof = marker
            h, w = struct.unpack(">HH", body[1:5])
            scan.size = (w, h)
        if _keep_segment(marker, body):
            out.append(bytes((0xFF, marker)) + data[pos : pos + length])
        pos += length
        if marker == 0xDA:  # SOS: copy entropy-coded data up to the next real marker
            found = _NEXT_MARKER.search(data, pos)
            if found is None:
                return scan
            out.append(data[pos : found.start()])
            pos = found.start()
    return scan


# --------------------------------------------------------------------------- public API


#: Set in a worker thread by ``load_async``: the decode's budget is already held.
_prereserved = threading.local()


def probe_cost(data: bytes, settings: ImageSettings) -> int | None:
    """The decode cost ``load`` will reserve, from the header alone (None: cannot tell)."""
    fmt = sniff_format(data)
    if fmt not in ACCEPTED or len(data) > settings.max_bytes:
        return None
    try:
        with Image.open(io.BytesIO(data), formats=[ACCEPTED[fmt]]) as im:
            if fmt == "JPEG":
                _draft(im, settings.max_side)
            return decode_cost(im.size, im.mode, settings.max_side)
    except Exception:  # load() will give the proper answer
        return None


async def load_async(
    data: bytes,
    settings: ImageSettings,
    *,
    filename: str | None = None,
    content_type: str | None = None,
) -> NormalizedImage:
    """``load`` in a worker thread, with its share of the decode budget awaited on the loop."""
    cost = probe_cost(data, settings)

    def run() -> NormalizedImage:
        _prereserved.held = cost is not None
        try:
            return load(data, settings, filename=filename, content_type=content_type)
        finally:
            _prereserved.held = False

    if cost is None or cost > settings.max_decoded_bytes:  # load() refuses or decides itself
        return await asyncio.to_thread(
            load, data, settings, filename=filename, content_type=content_type
        )
    async with decode_budget(settings).reserve_async(cost, decode_wait(cost, settings)):
        return await asyncio.to_thread(run)


def load(
    data: bytes,
    settings: ImageSettings,
    *,
    filename: str | None = None,
    content_type: str | None = None,
) -> NormalizedImage:
    """Validate and normalise one upload. Blocking and CPU-bound: call it in a worker thread.

    ``filename`` and ``content_type`` are only hints for log messages; the bytes decide.
    """
    if not data:
        raise ImageRejected("empty")
    if len(data) > settings.max_bytes:
        limit = settings.max_bytes / _MIB
        raise ImageRejected("too_large", limit_mb=int(limit) if limit.is_integer() else limit)

    hint = f"filename={filename!r} content_type={content_type!r}"
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageRejected("not_image", detail=f"unrecognised bytes ({hint})")
    if fmt not in ACCEPTED:
        raise ImageRejected("unsupported", format=fmt)

    size = _header_size(data, fmt)
    if size is not None:
        _check_geometry(size, settings)
    elif fmt in ("PNG", "GIF", "WEBP", "BMP"):  # these always state their size up front
        raise ImageRejected("corrupt", detail=f"unreadable {fmt} header ({hint})")

    try:
        return _decode(data, fmt, settings)
    except (ImageRejected, EngineBusy):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Only reached when the header probe missed the real size (e.g. a GIF frame that is larger
        # than its canvas), so the probed size would be wrong here.
        raise ImageRejected("too_many_pixels", detail=str(exc), width="?", height="?") from exc
    except _DECODE_ERRORS as exc:
        unidentified = isinstance(exc, Image.UnidentifiedImageError)
        if fmt == "TIFF" and unidentified and (layout := tiff_layout(data)) is not None:
            # A well-formed TIFF Pillow has no decoder for (e.g. 64-bit float RGB): the file
            # is fine, the format is what we cannot read.
            raise ImageRejected("unsupported", format=layout, detail=repr(exc)) from exc
        raise ImageRejected("corrupt", detail=f"{fmt}: {exc!r} ({hint})") from exc
    except Exception as exc:  # a decoder bug must not become a 500 for the user
        log.warning("unexpected error decoding %s (%s)", fmt, hint, exc_info=True)
        raise ImageRejected("corrupt", detail=f"{fmt}: {exc!r}") from exc


def _check_geometry(size: tuple[int, int], settings: ImageSettings) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageRejected("corrupt", detail=f"size {w}x{h}")
    if w * h > settings.max_pixels:
        raise ImageRejected("too_many_pixels", width=w, height=h)
    if max(w, h) / min(w, h) > settings.max_aspect:
        raise ImageRejected("bad_aspect", width=w, height=h)


def _decode(data: bytes, fmt: str, settings: ImageSettings) -> NormalizedImage:
    with Image.open(io.BytesIO(data), formats=[ACCEPTED[fmt]]) as im:
        _check_geometry(im.size, settings)  # authoritative (a GIF frame may enlarge the canvas)
        source = "JPEG" if im.format in ("JPEG", "MPO") else (im.format or fmt)
        if fmt == "JPEG":
            orientation = _orientation(im)  # JPEG EXIF sits in the header: no pixels read yet
            if im.mode == "RGB" and orientation == 1 and max(im.size) <= settings.max_side:
                if (kept := _keep_jpeg(data)) is not None:
                    w, h = im.size
                    return NormalizedImage.of(kept, w, h, source)
            _draft(im, settings.max_side)  # lowers im.size (and the cost) to the drafted scale
        cost = decode_cost(im.size, im.mode, settings.max_side)
        if cost > settings.max_decoded_bytes:
            w, h = im.size
            raise ImageRejected(
                "too_many_pixels", width=w, height=h, detail=f"{im.mode}: ~{cost // _MIB} MiB"
            )
        held = getattr(_prereserved, "held", False)  # load_async reserved it on the loop
        budget = (
            nullcontext()
            if held
            else decode_budget(settings).reserve(cost, decode_wait(cost, settings))
        )
        with budget:
            im.load()
            # after load: PNG's getexif() would load and _orientation() hide its errors
            orientation = orientation if fmt == "JPEG" else _orientation(im)
            icc = im.info.get("icc_profile")
            out = _shrink(im, settings.max_side)
            out = _to_rgb_or_rgba(out, fmt)
            if orientation in _TRANSPOSE:
                out = out.transpose(_TRANSPOSE[orientation])
            if out.mode == "RGBA":
                flat = Image.new("RGB", out.size, (255, 255, 255))
                flat.paste(out, mask=out.getchannel("A"))
                out = flat
    out.info = {}  # Pillow would otherwise copy a JPEG comment into the output
    buf = io.BytesIO()
    keep_icc = (
        isinstance(icc, bytes) and icc[16:20] == b"RGB "
    )  # a CMYK/grey profile no longer fits
    out.save(buf, "JPEG", quality=settings.jpeg_quality, icc_profile=icc if keep_icc else None)
    jpeg = buf.getvalue()
    return NormalizedImage.of(jpeg, out.width, out.height, source)


def _shrink(im: Image.Image, max_side: int) -> Image.Image:
    """Fit within ``max_side`` in the picture's own mode, before any widening conversion.

    Palette and bilevel pictures cannot be resampled and are converted first; 16-bit integer
    grey has only the box filter (an area average, which is what downscaling wants anyway).
    """
    if max(im.size) <= max_side:
        return im
    if im.mode in ("P", "PA", "1"):
        im = im.convert("RGBA" if im.has_transparency_data else ("L" if im.mode == "1" else "RGB"))
    scale = max_side / max(im.size)
    size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    if im.mode.startswith("I;16"):
        return im.resize(size, Image.Resampling.BOX)
    im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)  # in place: no second copy
    return im


def _keep_jpeg(data: bytes) -> bytes | None:
    """The fast path: the upload minus metadata, if it is a plain JPEG that decodes completely."""
    scan = _scan_jpeg(data)
    if scan.clean is None or scan.sof not in _HUFFMAN_SOF:
        return None
    _verify_jpeg(scan.clean)
    return scan.clean


def _verify_jpeg(data: bytes) -> None:
    """Decode every scan cheaply; raises OSError when the entropy-coded data is cut short.

    At 1/8 scale libjpeg skips most of the IDCT and colour work but still Huffman-decodes every
    block, so Pillow still runs out of input on a truncated file ("image file is truncated").
    """
    with Image.open(io.BytesIO(data), formats=["JPEG"]) as im:
        im.draft("L", (max(1, im.width // 8), max(1, im.height // 8)))
        im.load()


# libjpeg scales by 1/2, 1/4 or 1/8 while decoding, far cheaper than resampling afterwards. A
# phone photo (4032×3024) halves to 2016×1512: just under max_side 2048, but with exact-size
# drafting it was decoded whole and LANCZOS-resized (200 of its 250 ms on this CPU; the bot
# process's ceiling on the device). A decoded side down to DRAFT_FLOOR × max_side is accepted.
DRAFT_FLOOR = 0.75


def _draft(im: Image.Image, max_side: int) -> None:
    """Let libjpeg downscale while decoding, keeping the longest side >= DRAFT_FLOOR × max_side."""
    w, h = im.size
    longest = max(w, h)
    if longest > max_side:
        floor = max_side * DRAFT_FLOOR
        im.draft(im.mode, (math.ceil(w * floor / longest), math.ceil(h * floor / longest)))


def _orientation(im: Image.Image) -> int:
    """EXIF orientation, 1 when absent or unreadable (bad EXIF is no reason to refuse a photo)."""
    try:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:
        return 1
    return value if isinstance(value, int) and value in _TRANSPOSE else 1


def _to_rgb_or_rgba(im: Image.Image, fmt: str) -> Image.Image:
    """Bring any decoded mode to RGB, or RGBA when it has transparency to flatten later.

    Colour spaces go through Pillow's own conversions, which are correct: CIELab (TIFF
    PhotometricInterpretation 8, signed a*/b*) through LittleCMS as D50 L*a*b* → sRGB, the
    white point libtiff and Photoshop assume; CMYK, YCbCr and HSV by formula. Premultiplied grey
    + alpha ("La": a TIFF with associated alpha) has no path of its own and is unpremultiplied
    first. What still cannot be converted (a Pillow without LittleCMS) is "unsupported".
    """
    if im.mode in ("RGB", "RGBA"):
        return im
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        return _wide_to_l(im).convert("RGB")
    try:
        if im.mode == "La":
            im = im.convert("LA")
        return im.convert("RGBA" if im.has_transparency_data else "RGB")
    except _convert_errors() as exc:  # evaluated only when a conversion failed
        raise ImageRejected("unsupported", format=f"{fmt} {im.mode}", detail=repr(exc)) from exc


@functools.cache
def _convert_errors() -> tuple[type[Exception], ...]:
    """What a failed mode conversion raises: ValueError (no path between the modes),
    ImportError (LAB without Pillow's LittleCMS module) or LittleCMS's own error. Looked up on
    the first failure, so a normal decode never imports ImageCms."""
    try:
        from PIL.ImageCms import PyCMSError
    except ImportError:  # pragma: no cover - a Pillow built without LittleCMS
        return (ValueError, ImportError)
    return (ValueError, ImportError, PyCMSError)


def _wide_to_l(im: Image.Image) -> Image.Image:
    """16/32-bit integer or float grey → 8-bit by scaling, not clipping (Pillow clips to white)."""
    if im.mode != "F":
        sixteen = im.mode.startswith("I;16")
        im = im.convert("I")
        lo, hi = cast("tuple[float, float]", im.getextrema())  # one band: (min, max)
        if sixteen or (lo >= 0 and hi <= 65535):
            lo, hi = 0, 65535
    else:
        lo, hi = cast("tuple[float, float]", im.getextrema())
        if lo >= 0 and hi <= 1:
            lo, hi = 0, 1
    scale = 255 / (hi - lo) if hi > lo else 0.0
    return im.point(lambda x: x * scale - lo * scale + 0.5).convert("L")
