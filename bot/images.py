"""Untrusted upload bytes → a small, clean RGB JPEG (``NormalizedImage``) or ``ImageRejected``.

Every channel funnels pictures through :func:`load`, so this is the one place that has to be
paranoid: sizes are checked from the file header before Pillow allocates any pixels (WebP's
decoder allocates its canvas at open time, so Pillow alone is not enough), the format is sniffed
from magic bytes rather than trusted from the filename, and every decoder failure becomes a
rejection the user can read. Output never carries EXIF/XMP/IPTC (GPS, camera serials).

Speed: a typical upload is an RGB JPEG that is already small enough. Such a file is validated by
a 1/8-scale decode (which still entropy-decodes every block, so truncation is caught) and stored
as the original bytes minus metadata segments, instead of a full decode + re-encode.
"""

from __future__ import annotations

import io
import logging
import math
import re
import struct
from dataclasses import dataclass

from PIL import Image

from .models import ImageRejected, NormalizedImage
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
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Only reached when the header probe missed the real size (e.g. a GIF frame that is larger
        # than its canvas), so the probed size would be wrong here.
        raise ImageRejected("too_many_pixels", detail=str(exc), width="?", height="?") from exc
    except _DECODE_ERRORS as exc:
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
            _draft(im, settings.max_side)
            im.load()
        else:
            im.load()  # first: PNG's getexif() would load and _orientation() hide its errors
            orientation = _orientation(im)
        icc = im.info.get("icc_profile")
        out = _to_rgb_or_rgba(im, fmt)
        if orientation in _TRANSPOSE:
            out = out.transpose(_TRANSPOSE[orientation])
        out.thumbnail((settings.max_side, settings.max_side), Image.Resampling.LANCZOS)
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
    """Bring any decoded mode to RGB, or RGBA when it has transparency to flatten later."""
    if im.mode in ("RGB", "RGBA"):
        return im
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        return _wide_to_l(im).convert("RGB")
    try:
        return im.convert("RGBA" if im.has_transparency_data else "RGB")
    except ValueError as exc:  # e.g. LAB or HSV TIFFs: Pillow has no conversion
        raise ImageRejected("unsupported", format=f"{fmt} {im.mode}") from exc


def _wide_to_l(im: Image.Image) -> Image.Image:
    """16/32-bit integer or float grey → 8-bit by scaling, not clipping (Pillow clips to white)."""
    if im.mode != "F":
        sixteen = im.mode.startswith("I;16")
        im = im.convert("I")
        lo, hi = im.getextrema()
        if sixteen or (lo >= 0 and hi <= 65535):
            lo, hi = 0, 65535
    else:
        lo, hi = im.getextrema()
        if lo >= 0 and hi <= 1:
            lo, hi = 0, 1
    scale = 255 / (hi - lo) if hi > lo else 0.0
    return im.point(lambda x: x * scale - lo * scale + 0.5).convert("L")
