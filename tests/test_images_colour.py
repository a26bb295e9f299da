"""bot.images with pictures in other colour spaces, built from a real photo (scikit-image's
astronaut). A review asked whether LAB/HSV TIFFs are refused or come out with wrong colours.

Found: 8-bit CIELab TIFFs were already right (Pillow converts LAB through LittleCMS); HSV cannot
arrive in any accepted format, and Pillow converts it correctly where it would. The defects were
next to them: a grey TIFF with associated alpha (mode "La") was refused as unsupported although
Pillow decodes it; a Pillow without LittleCMS (or a LittleCMS error) made a LAB TIFF "damaged"
plus a logged traceback instead of "unsupported"; and LAB TIFFs Pillow cannot open (16-bit,
ICCLab) were described as "TIFF, 3 × 8-bit integer", as an ordinary RGB TIFF is.
"""

from __future__ import annotations

import io
import logging
import sys

import numpy as np
import PIL
import pytest
import skimage.color
import skimage.data
import tifffile
from PIL import Image, ImageCms

from bot import images
from bot.app import App
from bot.engines.instant import InstantEngine
from bot.images import load
from bot.models import ImageRejected, JokeRequest, message
from bot.settings import ImageSettings, Settings

#: Mean absolute difference (0–255 levels) the JPEG re-encode alone costs on this photo is about
#: 2.2; a wrong colour interpretation costs tens (a misread a*/b* sign gave 110).
MEAN_TOLERANCE = 4.0
P99_TOLERANCE = 20.0


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage.data.astronaut()  # 512×512 RGB photo


def lab_bytes(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """8-bit TIFF CIELab samples: L* 0–100 → 0–255, a* and b* as signed bytes (TIFF 6.0).

    skimage's L*a*b* is relative to D65 white and TIFF's to D50 (libtiff, Photoshop); both put
    white at L* 100, a* = b* = 0, so only saturated colours move, by about a level.
    """
    lab = skimage.color.rgb2lab(rgb)
    lightness = np.clip(np.round(lab[..., 0] * 255 / 100), 0, 255).astype(np.uint8)
    a, b = (np.clip(np.round(lab[..., i]), -128, 127).astype(np.int8) for i in (1, 2))
    return lightness, a, b


def decoded(jpeg: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(jpeg)) as im:
        return np.asarray(im.convert("RGB")).astype(np.float64)


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    diff = np.abs(got - want.astype(np.float64))
    assert diff.mean() < MEAN_TOLERANCE, diff.mean()
    assert np.percentile(diff, 99) < P99_TOLERANCE, np.percentile(diff, 99)
    # and each channel's average colour, so a tint cannot hide in a small mean difference
    assert np.allclose(got.mean(axis=(0, 1)), want.mean(axis=(0, 1)), atol=2.0)


# --------------------------------------------------------------------------- CIELab TIFF


def test_a_lab_tiff_written_by_other_software_decodes_to_the_original_colours(
    astronaut: np.ndarray,
) -> None:
    """tifffile writes the bytes as the TIFF spec says (signed a*/b*), independent of Pillow."""
    lightness, a, b = lab_bytes(astronaut)
    samples = np.dstack([lightness, a.view(np.uint8), b.view(np.uint8)])
    buf = io.BytesIO()
    tifffile.imwrite(buf, samples, photometric="CIELAB")
    out = load(buf.getvalue(), ImageSettings())
    assert (out.source_format, out.width, out.height) == ("TIFF", 512, 512)
    assert_close(decoded(out.jpeg), astronaut)


def test_a_lab_tiff_is_shrunk_in_lab_and_keeps_its_colours(astronaut: np.ndarray) -> None:
    """Larger than max_side: resampled in its own mode before the conversion (see _shrink)."""
    lightness, a, b = lab_bytes(astronaut)
    bands = [Image.fromarray(lightness), Image.fromarray((a.astype(np.int16) + 128).astype("u1"))]
    bands.append(Image.fromarray((b.astype(np.int16) + 128).astype("u1")))
    lab = Image.merge("LAB", bands)  # Pillow keeps a*/b* offset by 128 in memory
    buf = io.BytesIO()
    lab.save(buf, "TIFF")
    out = load(buf.getvalue(), ImageSettings(max_side=256))
    assert (out.width, out.height) == (256, 256)
    want = np.asarray(Image.fromarray(astronaut).resize((256, 256), Image.Resampling.LANCZOS))
    assert_close(decoded(out.jpeg), want)


# --------------------------------------------------------------------------- HSV


def test_hsv_converts_to_the_original_colours(astronaut: np.ndarray) -> None:
    """No accepted format decodes to HSV (TIFF has no HSV photometric; Pillow writes HSV nowhere
    we read), so this pins the conversion itself for the day one does."""
    hsv = skimage.color.rgb2hsv(astronaut)  # each channel 0–1; Pillow's HSV is 0–255 each
    im = Image.fromarray(np.clip(np.round(hsv * 255), 0, 255).astype(np.uint8), mode="HSV")
    with pytest.raises(OSError):
        im.save(io.BytesIO(), "TIFF")
    out = images._to_rgb_or_rgba(im, "TIFF")
    assert out.mode == "RGB"
    got = np.asarray(out).astype(np.float64)
    assert np.abs(got - astronaut).mean() < 1.5  # only the 8-bit hue steps (1.4°) remain


# --------------------------------------------------------------------------- grey + alpha


def test_a_grey_tiff_with_associated_alpha_is_flattened_not_refused(astronaut: np.ndarray) -> None:
    """ExtraSamples = associated alpha: Pillow decodes it as premultiplied "La", which has no
    conversion to RGBA of its own (it was "That image format isn't supported (TIFF La)")."""
    grey = (skimage.color.rgb2gray(astronaut) * 255).round().astype(np.uint8)
    alpha = np.tile(np.linspace(64, 255, 512).round().astype(np.uint8), (512, 1))
    premultiplied = (grey.astype(np.float64) * alpha / 255).round().astype(np.uint8)
    buf = io.BytesIO()
    tifffile.imwrite(
        buf,
        np.dstack([premultiplied, alpha]),
        photometric="minisblack",
        extrasamples=["assocalpha"],
    )
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        assert im.mode == "La"
    out = load(buf.getvalue(), ImageSettings())
    a = alpha.astype(np.float64) / 255
    on_white = grey * a + 255 * (1 - a)  # transparency flattens onto white, as for PNGs
    got = decoded(out.jpeg)
    assert np.abs(got.mean(axis=2) - on_white).mean() < MEAN_TOLERANCE


# --------------------------------------------------------------------------- what stays refused


@pytest.mark.parametrize(
    ("samples", "photometric", "described"),
    [
        (np.zeros((24, 32, 3), np.uint16), "CIELAB", "TIFF CIELab, 3 × 16-bit integer"),
        (np.zeros((24, 32, 3), np.uint8), "ICCLAB", "TIFF ICCLab, 3 × 8-bit integer"),
        (np.zeros((24, 32, 3), np.float64), "RGB", "TIFF RGB, 3 × 64-bit float"),
    ],
    ids=["cielab-16-bit", "icclab", "rgb-float64"],
)
def test_a_tiff_pillow_cannot_open_names_its_colour_space(
    samples: np.ndarray, photometric: str, described: str
) -> None:
    buf = io.BytesIO()
    tifffile.imwrite(buf, samples, photometric=photometric)
    with pytest.raises(ImageRejected) as info:
        load(buf.getvalue(), ImageSettings())
    assert (info.value.key, info.value.params) == ("unsupported", {"format": described})
    assert info.value.user_message("en") == message("unsupported", "en", format=described)


@pytest.fixture(scope="module")
def lab_tiff(astronaut: np.ndarray) -> bytes:
    lightness, a, b = lab_bytes(astronaut[:64, :64])
    buf = io.BytesIO()
    tifffile.imwrite(
        buf, np.dstack([lightness, a.view(np.uint8), b.view(np.uint8)]), photometric="CIELAB"
    )
    return buf.getvalue()


def _no_imagecms(monkeypatch: pytest.MonkeyPatch) -> None:
    """As in a Pillow built without LittleCMS: `from PIL import ImageCms` fails."""
    monkeypatch.setitem(sys.modules, "PIL.ImageCms", None)
    monkeypatch.delattr(PIL, "ImageCms", raising=False)


def _cms_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise ImageCms.PyCMSError("cannot build transform")

    monkeypatch.setattr(ImageCms, "buildTransform", broken)


@pytest.mark.parametrize("breakage", [_no_imagecms, _cms_fails], ids=["no-littlecms", "cms-error"])
def test_a_lab_tiff_that_cannot_be_converted_is_unsupported_not_damaged(
    lab_tiff: bytes,
    breakage: object,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    images._convert_errors()  # looked up once, as in a process that converted before
    breakage(monkeypatch)  # type: ignore[operator]
    with caplog.at_level(logging.WARNING, logger="bot.images"):
        with pytest.raises(ImageRejected) as info:
            load(lab_tiff, ImageSettings())
    assert (info.value.key, info.value.params) == ("unsupported", {"format": "TIFF LAB"})
    assert not caplog.records  # a known limit, not "unexpected error decoding"


async def test_the_service_answers_a_lab_tiff_and_refuses_a_16_bit_one(
    settings: Settings, lab_tiff: bytes
) -> None:
    """Through the core every channel uses: a joke, and a user-facing refusal (never a 500)."""
    app = await App.create(settings, engine=InstantEngine())
    try:
        result = await app.service.tell(
            JokeRequest(image_bytes=lab_tiff, channel="test", user_id="u", filename="lab.tif")
        )
        assert result.text
        buf = io.BytesIO()
        tifffile.imwrite(buf, np.zeros((24, 32, 3), np.uint16), photometric="CIELAB")
        with pytest.raises(ImageRejected) as info:
            await app.service.tell(
                JokeRequest(image_bytes=buf.getvalue(), channel="test", user_id="u")
            )
        assert info.value.key == "unsupported"
        assert "CIELab" in info.value.user_message("en")
    finally:
        await app.close()
