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
MAX_MESSAGE = 240  # characters of a reason; decoders can be verbose
COLOUR_SAMPLE_PIXELS = 4_096  # colourfulness is measured on a regular subsample of about this size

Source = Union[str, os.PathLike, bytes, bytearray, BinaryIO]

# Fields shown to the clinician; never stored or logged.
DICOM_DISPLAY_FIELDS = ("Modality", "ViewPosition", "BodyPartExamined", "PatientAge", "PatientSex",
                        "PhotometricInterpretation")

# Magic numbers of the still-image formats Pillow reads, so a PNG named .dcm is not parsed as DICOM.
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


@dataclass
class XrayImage:
    """A decoded radiograph, as the clinician sees it."""

    pixels: np.ndarray  # (H, W) float32 in [0, 1]; 0 is black (air), 1 is white (bone)
    format: str  # "JPEG", "PNG", "DICOM", ...
    dicom_header: dict[str, str] = field(default_factory=dict)
    # Hasler-Suesstrunk colourfulness of the file's colour pixels before grey conversion, on the
    # 0-255 scale (0 = grey; about 15 is "slightly colourful", 33 "moderately"). An X-ray is grey.
    colourfulness: float = 0.0

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return int(self.pixels.shape[1]), int(self.pixels.shape[0])

    def to_uint8(self) -> np.ndarray:
        """(H, W) uint8 for display."""
        return np.round(self.pixels * 255.0).astype(np.uint8)


def _one_line(message: str) -> str:
    """Collapse whitespace and cap the length: every reason fits one line of a table."""
    message = " ".join(str(message).split())
    return message if len(message) <= MAX_MESSAGE else message[:MAX_MESSAGE - 3] + "..."


def colourfulness(rgb: np.ndarray) -> float:
    """Hasler & Suesstrunk (2003) colourfulness of (H, W, 3) values on the 0-255 scale."""
    step = max(1, int(np.ceil(np.sqrt(rgb.shape[0] * rgb.shape[1] / COLOUR_SAMPLE_PIXELS))))
    sample = np.asarray(rgb[::step, ::step, :3], dtype=np.float32)
    r, g, b = sample[..., 0], sample[..., 1], sample[..., 2]
    rg, yb = r - g, 0.5 * (r + g) - b
    return float(np.hypot(rg.std(dtype=np.float64), yb.std(dtype=np.float64))
                 + 0.3 * np.hypot(rg.mean(dtype=np.float64), yb.mean(dtype=np.float64)))


def _read_bytes(source: Source) -> tuple[bytes, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if len(data) > MAX_FILE_BYTES:
            raise ValueError(f"file too large ({len(data) / 2**20:.0f} MB; limit {MAX_FILE_BYTES // 2**20} MB)")
        return data, ""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise ValueError("no such file")
        if path.is_dir():
            raise ValueError("is a folder, not a file")
        try:
            size = path.stat().st_size
            if size > MAX_FILE_BYTES:
                raise ValueError(f"file too large ({size / 2**20:.0f} MB; limit {MAX_FILE_BYTES // 2**20} MB)")
            with open(path, "rb") as f:  # bounded read: the file may grow after stat()
                data = f.read(size + 1)  # asking for the limit would allocate 128 MB per file
                if len(data) > size:
                    data += f.read(MAX_FILE_BYTES + 1 - len(data))
        except OSError as exc:
            raise ValueError(f"cannot read file: {exc.strerror or exc}") from None
        if len(data) > MAX_FILE_BYTES:
            raise ValueError(f"file too large (over {MAX_FILE_BYTES // 2**20} MB)")
        return data, path.name
    try:
        data = source.read(MAX_FILE_BYTES + 1)
    except (OSError, ValueError) as exc:  # closed or unreadable upload
        raise ValueError(f"cannot read upload: {exc}") from None
    if not isinstance(data, (bytes, bytearray)):
        raise ValueError("upload is not binary data")
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"file too large (over {MAX_FILE_BYTES // 2**20} MB)")
    return bytes(data), str(getattr(source, "name", "") or "")


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
    if data[128:132] == b"DICM":
        return True
    if data.startswith(_IMAGE_MAGIC):  # a PNG/JPEG that merely carries a .dcm name
        return False
    return name.lower().endswith((".dcm", ".dicom"))  # headerless (raw dataset) DICOM files exist


def _check_shape(width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise ValueError(f"image has no pixels ({width}x{height})")
    if width * height > MAX_PIXELS:
        raise ValueError(f"image too large ({width}x{height} pixels; limit {MAX_PIXELS // 1_000_000} megapixels)")
    if min(width, height) < MIN_SIDE:
        raise ValueError(f"image too small ({width}x{height} pixels; at least {MIN_SIDE} a side)")
    if max(width, height) / min(width, height) > MAX_ASPECT:
        raise ValueError(f"implausible shape for a chest radiograph ({width}x{height} pixels)")


def _finish(array: np.ndarray, fixed_range: float | None) -> np.ndarray:
    """Scale to [0, 1]: by the format's range for 8-bit data, else by the image's own min/max."""
    if array.dtype == np.uint8 and fixed_range == 255.0:  # the common case, without float passes
        if array.min() == array.max():
            raise ValueError("blank image: every pixel has the same value")
        return array.astype(np.float32) / np.float32(255.0)
    array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        raise ValueError("pixel data contains NaN or infinite values")
    low, high = float(array.min()), float(array.max())
    if high - low < 1e-6 * max(1.0, abs(high)):
        raise ValueError("blank image: every pixel has the same value")
    if fixed_range is not None:
        return np.clip(array / fixed_range, 0.0, 1.0)
    return (array - low) / (high - low)


def _open_pillow(data: bytes) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError("image too large (decompression bomb: header claims too many pixels)") from None
    except UnidentifiedImageError:
        raise ValueError(_describe_non_image(data)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ValueError(f"corrupt image header: {exc}") from None


def _load_pillow(data: bytes) -> XrayImage:
    image = _open_pillow(data)
    fmt = image.format or "image"
    _check_shape(*image.size)  # before decoding: a bomb is refused from its header alone
    frames = getattr(image, "n_frames", 1)
    if frames > 1 and fmt != "MPO":  # MPO: a phone JPEG with a preview frame; the first is the photo
        raise ValueError(f"animated or multi-frame {fmt} ({frames} frames): upload a single still radiograph")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        msg = str(exc)
        if "truncated" in msg or "broken data stream" in msg or "unrecognized data stream" in msg:
            raise ValueError(f"truncated or damaged {fmt} file") from None
        raise ValueError(f"damaged {fmt} file: {msg}") from None
    try:
        image = ImageOps.exif_transpose(image)  # phones and some exporters rotate through EXIF
    except Exception:  # a malformed EXIF block: show the pixels as stored, as most viewers do
        pass
    _check_shape(*image.size)
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        return XrayImage(_finish(array, None), fmt)
    try:
        if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
            # Transparent parts are shown as black, as a viewer on a dark background would.
            background = Image.new("RGBA", image.size, (0, 0, 0, 255))
            image = Image.alpha_composite(background, image.convert("RGBA"))
        if image.mode not in ("L", "1"):
            image = image.convert("RGB")  # CMYK, palette, YCbCr, ...: colour as a viewer shows it
    except (ValueError, OSError) as exc:
        raise ValueError(f"unsupported colour mode {mode} in {fmt} file: {exc}") from None
    colour = colourfulness(np.asarray(image)) if image.mode == "RGB" else 0.0
    array = np.asarray(image.convert("L"))  # uint8
    return XrayImage(_finish(array, 255.0), fmt, colourfulness=colour)


def _dicom_syntax(ds) -> tuple[str, bool]:
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None:
        return "", False
    return f"{syntax.name} ({syntax})", bool(getattr(syntax, "is_compressed", False))


def _load_dicom(data: bytes) -> XrayImage:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, AttributeError, KeyError, TypeError) as exc:
        raise ValueError(f"unreadable DICOM file: {exc}") from None
    header = {}
    for key in DICOM_DISPLAY_FIELDS:
        try:
            value = str(ds.get(key, "")).strip()
        except Exception:  # a malformed optional field must not lose the image
            continue
        if value:
            header[key] = value
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ValueError("DICOM file has no pixel data (not an image object)")
    try:
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"DICOM image size fields are malformed: {exc}") from None
    if not (rows and cols):
        raise ValueError("DICOM file has pixel data but no Rows/Columns")
    _check_shape(cols, rows)  # before decoding: a bomb is refused from its header alone
    if frames > 1:
        raise ValueError(f"multi-frame DICOM ({frames} frames): a chest radiograph is a single frame")
    try:
        array = ds.pixel_array
    except Exception as exc:  # pydicom raises several types for missing decoders or bad data
        syntax, compressed = _dicom_syntax(ds)
        message = str(exc)
        if compressed and "missing dependencies" in message:
            raise ValueError(f"DICOM compressed as {syntax}: no decoder for it is installed here; "
                             "export the image uncompressed") from None
        if compressed:
            raise ValueError(f"DICOM compressed as {syntax} could not be decoded (damaged data?): "
                             f"{message.splitlines()[-1].strip()}") from None
        raise ValueError(f"DICOM pixel data cannot be decoded: {message}") from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    colour = 0.0
    try:
        if array.ndim == 3 and array.shape[-1] in (3, 4):
            rgb = array[..., :3].astype(np.float64)
            top = float(rgb.max()) or 1.0
            colour = colourfulness(rgb * (255.0 / top)) if top > 255 else colourfulness(rgb)
            array = rgb.mean(axis=-1)
        elif array.ndim != 2:
            raise ValueError(f"DICOM pixel data has unexpected shape {array.shape}")
        array = np.asarray(array)
        if not np.issubdtype(array.dtype, np.floating):
            array = apply_modality_lut(array, ds)
            if "WindowCenter" in ds or "VOILUTSequence" in ds:
                array = apply_voi_lut(array, ds)
    except ValueError:
        raise
    except Exception as exc:  # malformed LUT or window fields
        raise ValueError(f"DICOM intensity (LUT/window) fields are malformed: {exc}") from None
    array = np.asarray(array, dtype=np.float64)
    pixels = _finish(array, None)
    if photometric == "MONOCHROME1":  # high values are dark: invert so bone is white
        pixels = 1.0 - pixels
    return XrayImage(pixels.astype(np.float32), "DICOM", header, colour)


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
    try:
        data, own_name = _read_bytes(source)
        name = name or own_name
        if len(data) == 0:
            raise ValueError("empty file (0 bytes)")
        if _is_dicom(data, name):
            return _load_dicom(data)
        return _load_pillow(data)
    except ValueError as exc:
        raise ValueError(_one_line(str(exc))) from None
    except MemoryError:
        raise ValueError("not enough memory to decode this image") from None
    except Exception as exc:  # a decoder bug on a hostile file is still just a bad file
        raise ValueError(_one_line(f"cannot decode file ({type(exc).__name__}: {exc})")) from None


def read_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) from the header alone, or ValueError; cheap check for folder scans."""
    data, name = _read_bytes(path)
    if not data:
        raise ValueError("empty file (0 bytes)")
    if _is_dicom(data, name):
        image = _load_dicom(data)
        return image.size
    with _open_pillow(data) as image:
        return image.size
