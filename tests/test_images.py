"""bot.images: hostile uploads are refused with the right reason; real pictures come out as clean
RGB JPEGs with the right size, orientation and colours."""

from __future__ import annotations

import hashlib
import io
import struct
import warnings
import zlib
from pathlib import Path

import pytest
import skimage
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from PIL import Image, ImageCms, ImageFile

from bot import images
from bot.images import load, sniff_format
from bot.models import MESSAGES, ImageRejected, NormalizedImage
from bot.settings import ImageSettings

DATA = Path(skimage.__file__).parent / "data"


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def cfg() -> ImageSettings:
    return ImageSettings()


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fail loudly if Pillow is even asked to open the file (bombs must die at the header)."""
    calls: list[str] = []

    def spy(*args: object, **kwargs: object) -> None:
        calls.append("open")
        raise AssertionError("Image.open called")

    monkeypatch.setattr(Image, "open", spy)
    return calls


def encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def rejected(data: bytes, cfg: ImageSettings | None = None, **kw: object) -> ImageRejected:
    with pytest.raises(ImageRejected) as info:
        load(data, cfg or ImageSettings(), **kw)  # type: ignore[arg-type]
    return info.value


def decoded(out: NormalizedImage) -> Image.Image:
    im = Image.open(io.BytesIO(out.jpeg))
    assert im.format == "JPEG"
    assert im.mode == "RGB"
    assert im.size == (out.width, out.height)
    return im.convert("RGB")


def near(pixel: tuple[int, ...], expected: tuple[int, int, int], tol: int = 12) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(pixel, expected, strict=True))


def halves(mode: str, size: tuple[int, int], left: object, right: object) -> Image.Image:
    im = Image.new(mode, size, left)  # type: ignore[arg-type]
    im.paste(right, (size[0] // 2, 0, size[0], size[1]))  # type: ignore[arg-type]
    return im


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bomb(width: int, height: int, rows: int | None = None) -> bytes:
    """A grey PNG of width×height zeros, a few hundred KB thanks to zlib. With ``rows`` only that
    many rows are stored (a crafted header: same threat, cheaper to build)."""
    comp = zlib.compressobj(9)
    chunk = bytes(1 + width) * 64
    idat = b"".join(comp.compress(chunk) for _ in range((rows or height) // 64)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def gif_bomb(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("P", (1, 1)), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)  # logical screen size
    return bytes(data)


def webp_bomb(width: int, height: int, extended: bool) -> bytes:
    im = Image.new("RGB", (4, 4), "red")
    if extended:  # VP8X chunk carries the canvas size
        data = bytearray(encode(im, "WEBP", exif=b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x00\x00"))
        assert data[12:16] == b"VP8X"
        data[24:30] = (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    else:  # simple lossless: the VP8L header carries it
        data = bytearray(encode(im, "WEBP", lossless=True))
        assert data[12:16] == b"VP8L"
        bits = int.from_bytes(data[21:25], "little") & ~((1 << 28) - 1)
        data[21:25] = (bits | (width - 1) | ((height - 1) << 14)).to_bytes(4, "little")
    return bytes(data)


def tiff_bomb(width: int, height: int) -> bytes:
    """An uncompressed grey TIFF whose single strip claims width×height pixels."""
    entries = [
        (256, 4, width),
        (257, 4, height),
        (258, 3, 8),
        (259, 3, 1),
        (262, 3, 1),
        (273, 4, 8 + 2 + 12 * 9 + 4),
        (277, 3, 1),
        (278, 4, height),
        (279, 4, width * height),
    ]
    ifd = struct.pack("<H", len(entries))
    for tag, typ, value in entries:
        packed = struct.pack("<I", value) if typ == 4 else struct.pack("<HH", value, 0)
        ifd += struct.pack("<HHI", tag, typ, 1) + packed
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00\x00\x00\x00" + bytes(64)


def jpeg_bomb(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("RGB", (8, 8)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def bmp_bomb(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("RGB", (2, 2)), "BMP"))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def exif_bytes(**tags: object) -> bytes:
    exif = Image.Exif()
    for key, value in tags.items():
        exif[int(key[1:])] = value
    return exif.tobytes()


# --------------------------------------------------------------------------- real pictures


@pytest.mark.parametrize(
    ("name", "fmt", "size"),
    [
        ("chelsea.png", "PNG", (451, 300)),
        ("astronaut.png", "PNG", (512, 512)),
        ("coffee.png", "PNG", (600, 400)),
        ("camera.png", "PNG", (512, 512)),
        ("rocket.jpg", "JPEG", (640, 427)),
        ("retina.jpg", "JPEG", (1411, 1411)),
        ("hubble_deep_field.jpg", "JPEG", (1000, 872)),
    ],
)
def test_sample_images(name: str, fmt: str, size: tuple[int, int], cfg: ImageSettings) -> None:
    out = load((DATA / name).read_bytes(), cfg, filename=name)
    assert (out.source_format, (out.width, out.height)) == (fmt, size)
    assert out.sha256 == hashlib.sha256(out.jpeg).hexdigest()
    assert out.to_pil().size == size
    original = Image.open(DATA / name).convert("RGB")
    assert near(
        decoded(out).getpixel((size[0] // 2, size[1] // 2)),
        original.getpixel((size[0] // 2, size[1] // 2)),
        tol=40,
    )


def test_sha256_is_deterministic(cfg: ImageSettings) -> None:
    png = (DATA / "chelsea.png").read_bytes()
    a, b = load(png, cfg), load(png, cfg)
    assert a == b
    assert a.sha256 == hashlib.sha256(a.jpeg).hexdigest()
    assert load((DATA / "coffee.png").read_bytes(), cfg).sha256 != a.sha256


def test_rgba_png_alpha_is_flattened_onto_white(cfg: ImageSettings) -> None:
    im = Image.new("RGBA", (60, 20), (255, 0, 0, 0))  # transparent
    im.paste((255, 0, 0, 255), (20, 0, 40, 20))  # opaque red
    im.paste((255, 0, 0, 128), (40, 0, 60, 20))  # half red
    out = decoded(load(encode(im, "PNG"), cfg))
    assert near(out.getpixel((10, 10)), (255, 255, 255))
    assert near(out.getpixel((30, 10)), (255, 0, 0))
    assert near(out.getpixel((50, 10)), (255, 127, 127))


def test_palette_png_with_transparency_becomes_white(cfg: ImageSettings) -> None:
    im = halves("P", (40, 20), 0, 1)
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # 0: red (transparent), 1: blue
    out = decoded(load(encode(im, "PNG", transparency=0), cfg))
    assert near(out.getpixel((5, 10)), (255, 255, 255))
    assert near(out.getpixel((35, 10)), (0, 0, 255))


def test_16bit_png_is_scaled_not_clipped(cfg: ImageSettings) -> None:
    im = Image.new("I;16", (30, 10), 32768)
    im.paste(0, (0, 0, 10, 10))
    im.paste(65535, (20, 0, 30, 10))
    data = encode(im, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = decoded(load(data, cfg))
    assert near(out.getpixel((5, 5)), (0, 0, 0), tol=2)
    assert near(out.getpixel((15, 5)), (128, 128, 128), tol=2)  # mid-grey, not white
    assert near(out.getpixel((25, 5)), (255, 255, 255), tol=2)


@pytest.mark.parametrize(
    ("mode", "colour", "fmt", "expected"),
    [
        ("L", 200, "PNG", (200, 200, 200)),
        ("LA", (100, 255), "PNG", (100, 100, 100)),
        ("LA", (100, 0), "PNG", (255, 255, 255)),
        ("1", 1, "PNG", (255, 255, 255)),
        ("P", 0, "PNG", (0, 0, 0)),
        ("I", 65535, "TIFF", (255, 255, 255)),
        ("I", 32768, "TIFF", (128, 128, 128)),
        ("F", 0.5, "TIFF", (128, 128, 128)),
        ("RGB", (10, 200, 30), "BMP", (10, 200, 30)),
        ("RGBA", (10, 200, 30, 255), "TIFF", (10, 200, 30)),
        ("CMYK", (0, 255, 255, 0), "TIFF", (255, 0, 0)),
    ],
)
def test_modes_become_rgb(
    mode: str, colour: object, fmt: str, expected: tuple[int, int, int], cfg: ImageSettings
) -> None:
    data = encode(Image.new(mode, (16, 16), colour), fmt)  # type: ignore[arg-type]
    out = load(data, cfg)
    assert (out.source_format, out.width, out.height) == (fmt, 16, 16)
    assert near(decoded(out).getpixel((8, 8)), expected, tol=3)


def test_cmyk_jpeg_colours(cfg: ImageSettings) -> None:
    im = halves("CMYK", (64, 32), (255, 0, 0, 0), (0, 255, 255, 0))  # cyan | red
    data = encode(im, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decoded(load(data, cfg))
    assert near(out.getpixel((10, 16)), (0, 255, 255), tol=16)
    assert near(out.getpixel((54, 16)), (255, 0, 0), tol=16)


def test_grayscale_jpeg_becomes_rgb(cfg: ImageSettings) -> None:
    data = encode(Image.open(DATA / "camera.png").convert("L"), "JPEG")
    out = load(data, cfg)
    assert out.jpeg != data  # re-encoded: a one-channel JPEG would not be RGB
    px = decoded(out).getpixel((100, 100))
    assert px[0] == px[1] == px[2]


def test_bmp_and_webp(cfg: ImageSettings) -> None:
    chelsea = Image.open(DATA / "chelsea.png").convert("RGB")
    for fmt, kw in (("BMP", {}), ("WEBP", {"quality": 90}), ("WEBP", {"lossless": True})):
        out = load(encode(chelsea, fmt, **kw), cfg)
        assert (out.source_format, out.width, out.height) == (fmt, 451, 300)
        assert near(decoded(out).getpixel((200, 150)), chelsea.getpixel((200, 150)), tol=30)
    rgba = Image.new("RGBA", (20, 20), (0, 0, 255, 0))
    assert near(
        decoded(load(encode(rgba, "WEBP", lossless=True), cfg)).getpixel((5, 5)), (255,) * 3
    )


def test_animated_gif_first_frame(cfg: ImageSettings) -> None:
    frames = [Image.new("RGB", (32, 24), c) for c in ("red", "blue", "green")]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    out = load(data, cfg)
    assert (out.source_format, out.width, out.height) == ("GIF", 32, 24)
    assert near(decoded(out).getpixel((16, 12)), (255, 0, 0))

    tiny = DATA / "no_time_for_that_tiny.gif"
    assert Image.open(tiny).n_frames > 1
    out = load(tiny.read_bytes(), cfg)
    assert (out.width, out.height) == (14, 25)
    first = Image.open(tiny).convert("RGB")
    assert near(decoded(out).getpixel((7, 12)), first.getpixel((7, 12)), tol=40)


def test_multipage_tiff_first_page(cfg: ImageSettings) -> None:
    pages = [Image.new("RGB", (40, 30), c) for c in ("lime", "red")]
    data = encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    out = load(data, cfg)
    assert (out.source_format, out.width, out.height) == ("TIFF", 40, 30)
    assert near(decoded(out).getpixel((20, 15)), (0, 255, 0))

    out = load((DATA / "multipage.tif").read_bytes(), cfg)  # grey, two pages
    assert (out.width, out.height) == (10, 15)


def test_exif_orientation_6_is_applied(cfg: ImageSettings) -> None:
    im = Image.new("RGB", (200, 100), "blue")
    im.paste("red", (0, 0, 50, 50))  # a red block at the stored top-left corner
    data = encode(im, "JPEG", quality=95, exif=exif_bytes(t274=6))
    out = load(data, cfg)
    assert (out.width, out.height) == (100, 200)
    px = decoded(out)
    # Orientation 6: rotate 90° clockwise to display, so stored top-left lands top-right.
    assert near(px.getpixel((75, 25)), (255, 0, 0), tol=20)
    assert near(px.getpixel((25, 25)), (0, 0, 255), tol=20)
    assert near(px.getpixel((75, 175)), (0, 0, 255), tol=20)
    assert not decoded(out).getexif()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation(orientation: int, cfg: ImageSettings) -> None:
    im = Image.new("RGB", (64, 32), "blue")
    im.paste("red", (0, 0, 16, 16))
    out = load(encode(im, "PNG", exif=exif_bytes(t274=orientation)), cfg)
    expected = im.transpose(images._TRANSPOSE[orientation]) if orientation > 1 else im
    assert (out.width, out.height) == expected.size
    got = decoded(out)
    for xy in ((4, 4), (expected.width - 4, 4), (4, expected.height - 4)):
        assert near(got.getpixel(xy), expected.getpixel(xy), tol=20)


def test_max_side_downscale() -> None:
    small = ImageSettings(max_side=256)
    out = load((DATA / "chelsea.png").read_bytes(), small)
    assert (out.width, out.height) == (256, 170)
    out = load((DATA / "astronaut.png").read_bytes(), small)
    assert (out.width, out.height) == (256, 256)
    # A phone-size JPEG halves in libjpeg while decoding (no resampling pass): a little under
    # max_side is accepted for that (DRAFT_FLOOR); the picture is still the whole picture.
    big = Image.open(DATA / "coffee.png").convert("RGB").resize((4000, 3000))
    out = load(encode(big, "JPEG"), ImageSettings())
    assert (out.width, out.height) == (2000, 1500)
    assert near(decoded(out).getpixel((1000, 750)), big.getpixel((2000, 1500)), tol=40)
    assert near(decoded(out).getpixel((1990, 10)), big.getpixel((3980, 20)), tol=40)
    # a JPEG that halving would take below the floor is decoded whole and resampled to max_side
    wide = big.resize((3000, 2250))
    out = load(encode(wide, "JPEG"), ImageSettings())
    assert (out.width, out.height) == (2048, 1536)
    assert near(decoded(out).getpixel((1024, 768)), wide.getpixel((1500, 1125)), tol=40)


def test_metadata_is_stripped_on_reencode(cfg: ImageSettings) -> None:
    gps = {2: (35.0, 39.0, 29.0), 1: "N", 4: (139.0, 44.0, 40.0), 3: "E"}
    exif = Image.Exif()
    exif[0x010F] = "SecretCam"
    exif[0x0112] = 6  # forces the re-encode path
    exif.get_ifd(0x8825).update(gps)
    data = encode(Image.open(DATA / "rocket.jpg"), "JPEG", exif=exif.tobytes(), comment=b"hi")
    assert b"SecretCam" in data
    out = load(data, cfg)
    check_clean(out)


def test_metadata_is_stripped_on_fast_path(cfg: ImageSettings) -> None:
    exif = Image.Exif()
    exif[0x010F] = "SecretCam"
    exif.get_ifd(0x8825).update({1: "N", 2: (35.0, 39.0, 29.0)})
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    rocket = Image.open(DATA / "rocket.jpg")
    data = encode(
        rocket,
        "JPEG",
        quality=90,
        exif=exif.tobytes(),
        comment=b"hi",
        icc_profile=icc,
        xmp=b"<x:xmpmeta>SecretCam</x:xmpmeta>",
    )
    data += b"PK\x03\x04 appended archive SecretCam"
    out = load(data, cfg)
    check_clean(out)
    clean = Image.open(io.BytesIO(out.jpeg))
    assert clean.info.get("icc_profile") == icc  # colour kept
    # Fast path: the very same coded pixels, not a lossy re-encode.
    assert len(out.jpeg) < len(data)
    assert clean.tobytes() == Image.open(io.BytesIO(data)).tobytes()
    assert out.jpeg.endswith(b"\xff\xd9")


def check_clean(out: NormalizedImage) -> None:
    assert b"SecretCam" not in out.jpeg
    assert b"Exif\x00\x00" not in out.jpeg
    assert b"GPS" not in out.jpeg
    im = Image.open(io.BytesIO(out.jpeg))
    assert not im.getexif()
    assert not {"exif", "xmp", "comment", "photoshop"} & set(im.info)


def test_progressive_jpeg_fast_path(cfg: ImageSettings) -> None:
    data = encode(Image.open(DATA / "rocket.jpg"), "JPEG", progressive=True, quality=85)
    out = load(data, cfg)
    assert Image.open(io.BytesIO(out.jpeg)).tobytes() == Image.open(io.BytesIO(data)).tobytes()


# --------------------------------------------------------------------------- rejections


def test_empty(cfg: ImageSettings) -> None:
    assert rejected(b"", cfg).key == "empty"


def test_too_large_is_checked_first(cfg: ImageSettings, no_decoding: list[str]) -> None:
    exc = rejected(b"\xff\xd8\xff" + bytes(30 * 1024 * 1024), cfg)
    assert (exc.key, exc.params) == ("too_large", {"limit_mb": 20})
    assert "20" in exc.user_message("en") and "20" in exc.user_message("zh")
    exc = rejected(bytes(2 * 1024 * 1024), ImageSettings(max_bytes=1536 * 1024))
    assert exc.params == {"limit_mb": 1.5}
    assert not no_decoding


def test_text_renamed_jpg(cfg: ImageSettings) -> None:
    text = "这不是图片 — just a shopping list\n".encode() * 50
    exc = rejected(text, cfg, filename="cat.jpg", content_type="image/jpeg")
    assert exc.key == "not_image"
    assert rejected(bytes(range(256)) * 4, cfg).key == "not_image"
    assert rejected(b"<html><body>hi</body></html>", cfg).key == "not_image"
    assert rejected(b"BMW 320i, 2004, one owner\n" * 10, cfg).key == "not_image"


@pytest.mark.parametrize(
    ("fmt", "make"),
    [
        ("ICO", lambda: encode(Image.new("RGB", (16, 16)), "ICO")),
        ("PDF", lambda: encode(Image.new("RGB", (16, 16)), "PDF")),
        ("AVIF", lambda: encode(Image.new("RGB", (16, 16)), "AVIF")),
        ("PSD", lambda: b"8BPS\x00\x01" + bytes(40)),
        ("SVG", lambda: b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>'),
        ("SVG", lambda: b"\n  <svg width='10' height='10'></svg>"),
        ("JPEG 2000", lambda: encode(Image.new("RGB", (16, 16)), "JPEG2000")),
    ],
)
def test_unsupported_formats(fmt: str, make: object, cfg: ImageSettings) -> None:
    try:
        data = make()  # type: ignore[operator]
    except (OSError, KeyError) as exc:  # encoder not built into this Pillow
        pytest.skip(f"cannot write {fmt}: {exc}")
    exc = rejected(data, cfg)
    assert (exc.key, exc.params) == ("unsupported", {"format": fmt})
    assert fmt in exc.user_message("zh")


def test_heic_only_with_pillow_heif(cfg: ImageSettings) -> None:
    head = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64)
    assert sniff_format(head) == "HEIF"
    if images.pillow_heif is None:
        assert rejected(head, cfg).params == {"format": "HEIF"}
    else:  # pragma: no cover
        assert rejected(head, cfg).key == "corrupt"


def test_sniff_format() -> None:
    for name, fmt in (("chelsea.png", "PNG"), ("rocket.jpg", "JPEG"), ("multipage.tif", "TIFF")):
        assert sniff_format((DATA / name).read_bytes()) == fmt
    assert sniff_format((DATA / "no_time_for_that_tiny.gif").read_bytes()) == "GIF"
    assert sniff_format(b"\x00\x00\x00\x18ftypisom" + bytes(20)) is None  # an mp4
    assert sniff_format(b"hello") is None


@pytest.mark.parametrize("cut", [0.3, 0.6, 0.9, 0.98])
@pytest.mark.parametrize("progressive", [False, True])
def test_truncated_jpeg(cut: float, progressive: bool, cfg: ImageSettings) -> None:
    data = encode(Image.open(DATA / "rocket.jpg"), "JPEG", progressive=progressive)
    assert rejected(data[: int(len(data) * cut)], cfg).key == "corrupt"


@pytest.mark.parametrize("progressive", [False, True])
def test_draft_decode_detects_truncation(progressive: bool) -> None:
    """The fast path's 1/8-scale check still reads every scan, so a cut file fails it."""
    data = encode(Image.open(DATA / "rocket.jpg"), "JPEG", progressive=progressive)
    images._verify_jpeg(data)
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    for cut in (0.5, 0.95):
        with pytest.raises(OSError, match="truncated"):
            images._verify_jpeg(data[: int(len(data) * cut)])


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "WEBP", "BMP", "TIFF"])
def test_truncated_other_formats(fmt: str, cfg: ImageSettings) -> None:
    data = encode(Image.open(DATA / "chelsea.png").convert("RGB"), fmt)
    assert rejected(data[: len(data) // 2], cfg).key == "corrupt"


def test_corrupt_png_data(cfg: ImageSettings) -> None:
    data = bytearray((DATA / "chelsea.png").read_bytes())
    idat = data.index(b"IDAT")
    data[idat + 4 : idat + 8] = b"\xff\xff\xff\xff"  # the zlib stream header
    assert rejected(bytes(data), cfg).key == "corrupt"
    assert rejected(b"\x89PNG\r\n\x1a\n" + b"junk" * 10, cfg).key == "corrupt"


BOMBS = {
    "png": png_bomb,
    "gif": gif_bomb,
    "webp-vp8l": lambda w, h: webp_bomb(w, h, extended=False),
    "webp-vp8x": lambda w, h: webp_bomb(w, h, extended=True),
    "tiff": tiff_bomb,
    "jpeg": jpeg_bomb,
    "bmp": bmp_bomb,
}


# 16384×16384 is past Pillow's own limit (and the largest VP8L can state); 8000×8000 only ours.
@pytest.mark.parametrize("size", [(16384, 16384), (8000, 8000)])
@pytest.mark.parametrize("kind", BOMBS)
def test_decompression_bombs_rejected_from_header(
    kind: str, size: tuple[int, int], no_decoding: list[str]
) -> None:
    data = BOMBS[kind](*size)
    assert len(data) < 2_000_000
    exc = rejected(data)
    assert (exc.key, exc.params) == ("too_many_pixels", {"width": size[0], "height": size[1]})
    assert not no_decoding  # refused before Pillow saw it: no pixel (or WebP canvas) allocated


def test_30000_pixel_bombs(no_decoding: list[str]) -> None:
    crafted = {**BOMBS, "png": lambda w, h: png_bomb(w, h, rows=64)}
    for kind in ("png", "gif", "webp-vp8x", "tiff", "jpeg", "bmp"):
        exc = rejected(crafted[kind](30000, 30000))
        assert (exc.key, exc.params) == ("too_many_pixels", {"width": 30000, "height": 30000})
    assert not no_decoding


def test_png_bomb_is_real() -> None:
    """The 8000×8000 bomb is an honest PNG: with the limits off, Pillow decodes all of it."""
    data = png_bomb(8000, 8000)
    assert len(data) < 200_000
    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            assert im.size == (8000, 8000)
            assert im.getextrema() == (0, 0)
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def test_pillow_bomb_error_becomes_too_many_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images, "_header_size", lambda data, fmt: None)
    exc = rejected(jpeg_bomb(60000, 60000))
    assert exc.key == "too_many_pixels"
    assert exc.user_message("en") and exc.user_message("zh")


def test_pillow_bomb_warning_as_error_becomes_too_many_pixels() -> None:
    lenient = ImageSettings(max_pixels=10**9, max_aspect=100)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        assert rejected(jpeg_bomb(10000, 10000), lenient).key == "too_many_pixels"


def test_gif_frame_larger_than_canvas(cfg: ImageSettings) -> None:
    data = bytearray(encode(Image.new("P", (1, 1)), "GIF"))
    desc = data.index(b",")
    data[desc + 5 : desc + 9] = struct.pack("<HH", 9000, 9000)  # frame 9000×9000 on a 1×1 screen
    exc = rejected(bytes(data), cfg)
    assert exc.key == "too_many_pixels"


def test_extreme_aspect(cfg: ImageSettings) -> None:
    exc = rejected(encode(Image.new("L", (1, 20000)), "PNG"), cfg)
    assert (exc.key, exc.params) == ("bad_aspect", {"width": 1, "height": 20000})
    out = load(encode(Image.new("L", (20, 400)), "PNG"), cfg)  # exactly 20:1 is fine
    assert (out.width, out.height) == (20, 400)


@pytest.mark.parametrize(
    ("key", "params"),
    [
        ("empty", {}),
        ("too_large", {"limit_mb": 20}),
        ("not_image", {}),
        ("unsupported", {"format": "PSD"}),
        ("corrupt", {}),
        ("too_many_pixels", {"width": 30000, "height": 30000}),
        ("bad_aspect", {"width": 1, "height": 20000}),
    ],
)
def test_user_messages(key: str, params: dict[str, object]) -> None:
    exc = ImageRejected(key, **params)
    for lang in ("en", "zh"):
        text = exc.user_message(lang)
        assert text and "{" not in text
        assert text == MESSAGES[key][lang].format(**params)
    assert exc.user_message("zh") != exc.user_message("en")


# --------------------------------------------------------------------------- fuzzing


def _seeds() -> list[bytes]:
    base = Image.open(DATA / "chelsea.png").convert("RGB").resize((24, 16))
    rgba = base.convert("RGBA")
    return [
        encode(base, "JPEG"),
        encode(base, "JPEG", progressive=True, exif=exif_bytes(t274=6)),
        encode(rgba, "PNG"),
        encode(base.convert("P"), "GIF"),
        encode(rgba, "WEBP"),
        encode(base, "BMP"),
        encode(base, "TIFF", compression="tiff_lzw"),
    ]


SEEDS = _seeds()


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about broken EXIF/TIFF tags
@hsettings(
    max_examples=200,
    deadline=2000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    seed=st.sampled_from(SEEDS),
    edits=st.lists(
        st.tuples(st.floats(0, 1), st.integers(0, 255), st.sampled_from(["set", "ins", "del"])),
        max_size=8,
    ),
    cut=st.one_of(st.none(), st.floats(0, 1)),
)
def test_fuzz_mutations_only_raise_image_rejected(
    seed: bytes, edits: list[tuple[float, int, str]], cut: float | None
) -> None:
    data = bytearray(seed)
    for where, byte, op in edits:
        i = min(int(where * len(data)), max(len(data) - 1, 0))
        if op == "set" and data:
            data[i] = byte
        elif op == "ins":
            data.insert(i, byte)
        elif data:
            del data[i]
    if cut is not None:
        data = data[: int(cut * len(data))]
    small = ImageSettings(max_pixels=1_000_000, max_side=64)
    try:
        out = load(bytes(data), small)
    except ImageRejected as exc:
        assert exc.user_message("zh") and exc.user_message("en")
    else:
        assert max(out.width, out.height) <= 64
        assert decoded(out).size == (out.width, out.height)
