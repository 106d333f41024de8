"""The one image loader: PNG/JPEG/DICOM (and other still formats Pillow reads) in, a normalised
single-channel array out, or a ValueError that names what is wrong with the file."""
from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Limits that keep a hostile or broken file from exhausting memory. A 30 MB DICOM is common; 128 MB
# is well above any plain radiograph. 60 megapixels covers 7000x8500 detector images.
MAX_FILE_BYTES = 128 * 1024 * 1024
MAX_PIXELS = 60_000_000
MIN_SIDE = 32
MAX_ASPECT = 4.0

Source = Union[str, os.PathLike, bytes, bytearray, BinaryIO]

# Fields shown to the clinician; never stored or logged.
DICOM_DISPLAY_FIELDS = ("Modality", "ViewPosition", "BodyPartExamined", "PatientAge", "PatientSex",
                        "PhotometricInterpretation")


@dataclass
class XrayImage:
    """A decoded radiograph, as the clinician sees it."""

    pixels: np.ndarray  # (H, W) float32 in [0, 1]; 0 is black (air), 1 is white (bone)
    format: str  # "JPEG", "PNG", "DICOM", ...
    dicom_header: dict[str, str] = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return int(self.pixels.shape[1]), int(self.pixels.shape[0])

    def to_uint8(self) -> np.ndarray:
        """(H, W) uint8 for display."""
        return np.round(self.pixels * 255.0).astype(np.uint8)


def _read_bytes(source: Source) -> tuple[bytes, str]:
    if isinstance(source, (bytes, bytearray)):
        return bytes(source), ""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise ValueError("no such file")
        if path.is_dir():
            raise ValueError("is a folder, not a file")
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ValueError(f"file too large ({size / 2**20:.0f} MB; limit {MAX_FILE_BYTES // 2**20} MB)")
        try:
            return path.read_bytes(), path.name
        except OSError as exc:
            raise ValueError(f"cannot read file: {exc.strerror or exc}") from None
    data = source.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"file too large (over {MAX_FILE_BYTES // 2**20} MB)")
    return data, getattr(source, "name", "") or ""


def _describe_non_image(data: bytes) -> str:
    head = data[:1024]
    if head.startswith(b"%PDF"):
        return "a PDF document, not an image"
    if head.startswith(b"PK\x03\x04"):
        return "a ZIP/Office archive, not an image"
    if head[:5].lower() in (b"<!doc", b"<html") or head.startswith(b"<?xml"):
        return "an HTML/XML document, not an image"
    try:
        head.decode("utf-8")
        if all(c >= 32 or c in (9, 10, 13) for c in head):
            return "a text file, not an image"
    except UnicodeDecodeError:
        pass
    return "not a recognised image format (PNG, JPEG or DICOM expected)"


def _is_dicom(data: bytes, name: str) -> bool:
    return data[128:132] == b"DICM" or name.lower().endswith((".dcm", ".dicom"))


def _check_shape(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise ValueError(f"image too large ({width}x{height} pixels; limit {MAX_PIXELS // 1_000_000} megapixels)")
    if min(width, height) < MIN_SIDE:
        raise ValueError(f"image too small ({width}x{height} pixels; at least {MIN_SIDE} a side)")
    if max(width, height) / min(width, height) > MAX_ASPECT:
        raise ValueError(f"implausible shape for a chest radiograph ({width}x{height} pixels)")


def _finish(array: np.ndarray, fixed_range: float | None) -> np.ndarray:
    """Scale to [0, 1]: by the format's range for 8-bit data, else by the image's own min/max."""
    array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        raise ValueError("pixel data contains NaN or infinite values")
    low, high = float(array.min()), float(array.max())
    if high - low < 1e-6 * max(1.0, abs(high)):
        raise ValueError("blank image: every pixel has the same value")
    if fixed_range is not None:
        return np.clip(array / fixed_range, 0.0, 1.0)
    return (array - low) / (high - low)


def _load_pillow(data: bytes) -> XrayImage:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError("image too large (decompression bomb: header claims too many pixels)") from None
    except UnidentifiedImageError:
        raise ValueError(_describe_non_image(data)) from None
    except OSError as exc:
        raise ValueError(f"corrupt image header: {exc}") from None
    fmt = image.format or "image"
    _check_shape(*image.size)  # before decoding: a bomb is refused from its header alone
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        raise ValueError(f"animated or multi-frame {fmt} ({frames} frames): upload a single still radiograph")
    try:
        image.load()
        image = ImageOps.exif_transpose(image)  # phones and some exporters rotate through EXIF
    except (OSError, SyntaxError, ValueError) as exc:
        msg = str(exc)
        if "truncated" in msg or "broken data stream" in msg or "unrecognized data stream" in msg:
            raise ValueError(f"truncated or damaged {fmt} file") from None
        raise ValueError(f"damaged {fmt} file: {msg}") from None
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        return XrayImage(_finish(array, None), fmt)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        # Transparent parts are shown as black, as a viewer on a dark background would.
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    if mode == "CMYK":
        image = image.convert("RGB")
    array = np.asarray(image.convert("L"), dtype=np.float32)
    return XrayImage(_finish(array, 255.0), fmt)


def _load_dicom(data: bytes) -> XrayImage:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, AttributeError, KeyError, TypeError) as exc:
        raise ValueError(f"unreadable DICOM file: {exc}") from None
    header = {key: str(ds.get(key, "")).strip() for key in DICOM_DISPLAY_FIELDS if str(ds.get(key, "")).strip()}
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ValueError("DICOM file has no pixel data (not an image object)")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows and cols:
        _check_shape(cols, rows)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ValueError(f"multi-frame DICOM ({frames} frames): a chest radiograph is a single frame")
    try:
        array = ds.pixel_array
    except Exception as exc:  # pydicom raises several types for missing decoders or bad data
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if syntax is not None and getattr(syntax, "is_compressed", False):
            raise ValueError(f"DICOM compressed as '{syntax.name}' ({syntax}), which cannot be decoded here") from None
        raise ValueError(f"DICOM pixel data cannot be decoded: {exc}") from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        array = array[..., :3].astype(np.float64).mean(axis=-1)
    elif array.ndim != 2:
        raise ValueError(f"DICOM pixel data has unexpected shape {array.shape}")
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        array = apply_modality_lut(array, ds)
        if "WindowCenter" in ds or "VOILUTSequence" in ds:
            array = apply_voi_lut(array, ds)
    array = np.asarray(array, dtype=np.float64)
    pixels = _finish(array, None)
    if photometric == "MONOCHROME1":  # high values are dark: invert so bone is white
        pixels = 1.0 - pixels
    return XrayImage(pixels.astype(np.float32), "DICOM", header)


def load_image(source: Source, name: str | None = None) -> XrayImage:
    """Decode any supported radiograph file.

    Args:
        source: a path, raw bytes, or a binary file object (e.g. a Streamlit upload).
        name: the file name, when ``source`` carries none; used only to recognise DICOM.
    Returns:
        The image as (H, W) float32 in [0, 1], upright, bone white.
    Raises:
        ValueError: with a one-line reason when the file is not a usable image.
    """
    data, own_name = _read_bytes(source)
    name = name or own_name
    if len(data) == 0:
        raise ValueError("empty file (0 bytes)")
    if _is_dicom(data, name):
        return _load_dicom(data)
    return _load_pillow(data)


def read_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) from the header alone, or ValueError; cheap check for folder scans."""
    data, name = _read_bytes(path)
    if not data:
        raise ValueError("empty file (0 bytes)")
    if _is_dicom(data, name):
        image = _load_dicom(data)
        return image.size
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except UnidentifiedImageError:
        raise ValueError(_describe_non_image(data)) from None
