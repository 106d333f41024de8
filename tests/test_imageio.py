"""The one image loader on every supported format, and its one-line errors on the basic bad files."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import DATASET, FULLRES, GENERATED
from xray.io.loader import XrayImage, load_image

SOURCE = DATASET / "PNEUMONIA" / "person1000_bacteria_2931.jpeg"  # the image the generated fixtures derive from


def _reference() -> np.ndarray:
    """The source image min/max-scaled, as formats without a fixed 8-bit range are normalised."""
    pixels = load_image(SOURCE).pixels
    return (pixels - pixels.min()) / (pixels.max() - pixels.min())


def _assert_normalised(image: XrayImage, shape: tuple[int, int]) -> None:
    assert isinstance(image, XrayImage)
    assert image.pixels.shape == shape
    assert image.pixels.ndim == 2
    assert image.pixels.dtype == np.float32
    assert np.isfinite(image.pixels).all()
    assert 0.0 <= image.pixels.min() < image.pixels.max() <= 1.0


def _save_png(tmp_path: Path, array: np.ndarray, name: str = "image.png") -> Path:
    path = tmp_path / name
    Image.fromarray(array).save(path)
    return path


# -- formats ----------------------------------------------------------------------------------------
def test_rgb_jpeg_becomes_one_channel():
    image = load_image(SOURCE)
    _assert_normalised(image, (224, 224))
    assert image.format == "JPEG"
    # The dataset's RGB JPEGs have three equal channels: one channel must equal their grey value.
    rgb = np.asarray(Image.open(SOURCE).convert("L"), dtype=np.float32) / 255
    np.testing.assert_allclose(image.pixels, rgb, atol=1 / 255)


def test_8bit_grayscale_png_keeps_its_grey_levels(tmp_path):
    grey = np.asarray(Image.open(SOURCE).convert("L"))
    image = load_image(_save_png(tmp_path, grey))
    _assert_normalised(image, (224, 224))
    assert image.format == "PNG"
    np.testing.assert_allclose(image.pixels, grey / 255.0, atol=1e-6)


def test_16bit_png_uses_its_full_range():
    image = load_image(GENERATED / "gray16.png")
    _assert_normalised(image, (224, 224))
    assert image.pixels.min() == 0.0 and image.pixels.max() == 1.0
    np.testing.assert_allclose(image.pixels, _reference(), atol=1e-4)


@pytest.mark.parametrize("name, tolerance", [("rgba.png", 1e-6), ("palette.png", 0.08)])
def test_rgba_and_palette_png_match_the_source(name, tolerance):
    image = load_image(GENERATED / name)
    _assert_normalised(image, (224, 224))
    # palette.png is quantised to 64 colours, so it matches only to within a quantisation step
    np.testing.assert_allclose(image.pixels, load_image(SOURCE).pixels, atol=tolerance)


def test_dicom_pixels_and_header():
    image = load_image(GENERATED / "chest.dcm")
    _assert_normalised(image, (224, 224))
    assert image.format == "DICOM"
    assert image.dicom_header["Modality"] == "CR"
    assert image.dicom_header["PhotometricInterpretation"] == "MONOCHROME2"
    # 12-bit version of the source, windowed over its whole range: the same picture
    np.testing.assert_allclose(image.pixels, _reference(), atol=1e-3)


def test_dicom_monochrome1_is_inverted_so_bone_is_white():
    normal = load_image(GENERATED / "chest.dcm").pixels
    inverted_file = load_image(GENERATED / "chest_monochrome1.dcm")
    assert inverted_file.dicom_header["PhotometricInterpretation"] == "MONOCHROME1"
    np.testing.assert_allclose(inverted_file.pixels, normal, atol=1e-5)


def _rewrite_dicom(tmp_path: Path, name: str, **attributes) -> Path:
    import pydicom

    ds = pydicom.dcmread(GENERATED / "chest.dcm")
    for key, value in attributes.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    path = tmp_path / name
    ds.save_as(path)
    return path


def test_dicom_voi_window_is_applied(tmp_path):
    import pydicom

    stored = pydicom.dcmread(GENERATED / "chest.dcm").pixel_array.astype(float)  # raw 12-bit values
    # A narrow window around the middle of the 12-bit range: values outside it clip to black / white.
    narrow = load_image(_rewrite_dicom(tmp_path, "narrow.dcm", WindowCenter=2048, WindowWidth=400)).pixels
    below, above = stored < 2048 - 210, stored > 2048 + 210
    inside = (stored > 2048 - 150) & (stored < 2048 + 150)
    assert below.any() and above.any() and inside.any()
    assert narrow[below].max() == 0.0
    assert narrow[above].min() == 1.0
    assert 0.0 < narrow[inside].min() and narrow[inside].max() < 1.0
    # Without the window the same values spread over the whole range instead.
    raw = load_image(_rewrite_dicom(tmp_path, "raw.dcm", WindowCenter=None, WindowWidth=None)).pixels
    np.testing.assert_allclose(raw, (stored - stored.min()) / (stored.max() - stored.min()), atol=1e-6)


def test_dicom_modality_lut_is_applied(tmp_path):
    plain = load_image(GENERATED / "chest.dcm").pixels
    # A negative rescale slope turns the stored values upside down; the loader must follow it.
    flipped = load_image(_rewrite_dicom(tmp_path, "slope.dcm", RescaleSlope=-1, RescaleIntercept=4095,
                                        WindowCenter=None, WindowWidth=None)).pixels
    np.testing.assert_allclose(flipped, 1.0 - plain, atol=1e-3)


@pytest.mark.parametrize("path", sorted(FULLRES.iterdir()), ids=lambda p: p.name)
def test_full_resolution_keeps_size_and_aspect_ratio(path):
    with Image.open(path) as original:
        width, height = original.size
    image = load_image(path)
    _assert_normalised(image, (height, width))
    assert image.size == (width, height)
    assert width != height  # the fixture is deliberately not square


def test_bytes_and_file_object_sources_match_the_path():
    for path in (SOURCE, GENERATED / "chest.dcm", GENERATED / "gray16.png"):
        from_path = load_image(path).pixels
        data = path.read_bytes()
        np.testing.assert_array_equal(load_image(data).pixels, from_path)
        np.testing.assert_array_equal(load_image(bytearray(data)).pixels, from_path)
        np.testing.assert_array_equal(load_image(io.BytesIO(data)).pixels, from_path)
        with open(path, "rb") as f:
            np.testing.assert_array_equal(load_image(f).pixels, from_path)


def test_dicom_bytes_without_preamble_recognised_by_name():
    import pydicom

    ds = pydicom.dcmread(GENERATED / "chest.dcm")
    ds.preamble = None  # no 128-byte preamble, no "DICM" magic: only the file name says DICOM
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=False)
    data = buffer.getvalue()
    assert data[128:132] != b"DICM"
    np.testing.assert_allclose(load_image(data, name="upload.dcm").pixels, load_image(GENERATED / "chest.dcm").pixels)


def test_to_uint8_for_display():
    image = load_image(SOURCE)
    display = image.to_uint8()
    assert display.dtype == np.uint8 and display.shape == image.pixels.shape
    np.testing.assert_array_equal(display, np.asarray(Image.open(SOURCE).convert("L")))


# -- errors -----------------------------------------------------------------------------------------
def _error(source, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        load_image(source, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message  # one line, fit for a CSV cell or a UI message
    return message.lower()


@pytest.mark.parametrize("name, words", [
    ("empty.png", ["empty"]),
    ("text_renamed.png", ["text"]),
    ("truncated.jpeg", ["truncated", "damaged", "corrupt"]),
    ("no_pixels.dcm", ["no pixel data"]),
])
def test_bad_fixture_files_are_named(name, words):
    message = _error(GENERATED / name)
    assert any(word in message for word in words), message


def test_bad_bytes_are_named_like_bad_files():
    assert "empty" in _error(b"")
    assert "text" in _error(io.BytesIO((GENERATED / "text_renamed.png").read_bytes()))


def test_missing_file_and_folder(tmp_path):
    assert "no such file" in _error(tmp_path / "absent.png")
    assert "folder" in _error(tmp_path)


def test_too_small(tmp_path):
    rng = np.random.default_rng(0)
    path = _save_png(tmp_path, rng.integers(0, 256, (16, 16), dtype=np.uint8))
    assert "too small" in _error(path)


def test_extreme_aspect_ratio(tmp_path):
    rng = np.random.default_rng(0)
    path = _save_png(tmp_path, rng.integers(0, 256, (40, 400), dtype=np.uint8))
    message = _error(path)
    assert "shape" in message or "aspect" in message, message


@pytest.mark.parametrize("value", [0, 128, 255])
def test_blank_image(tmp_path, value):
    path = _save_png(tmp_path, np.full((128, 128), value, dtype=np.uint8))
    assert "blank" in _error(path)


def test_blank_dicom(tmp_path):
    import pydicom

    ds = pydicom.dcmread(GENERATED / "chest.dcm")
    ds.PixelData = np.full((ds.Rows, ds.Columns), 1000, np.uint16).tobytes()
    del ds.WindowCenter, ds.WindowWidth
    path = tmp_path / "blank.dcm"
    ds.save_as(path)
    assert "blank" in _error(path)
