"""The one image loader: PNG/JPEG/TIFF/HEIC/DICOM (and other still formats Pillow reads) in, a
normalised single-channel array out, or a ValueError that names the step that failed and what to do.

Files are recognised by their content, never by their name alone (``sniff``): DICOM with or without
the Part 10 preamble (ACR-NEMA style datasets that start at byte 0, with the transfer syntax inferred
from how the dataset parsed), DICOMDIR indexes, and the image formats' magic numbers.

DICOM (PS3.3 C.11 and C.7.6.3, PS3.4 N.2): compressed transfer syntaxes are decoded by pydicom's
pylibjpeg plugins (JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, RLE); grey levels go through
the Modality LUT, then the first usable VOI rule (VOI LUT sequence, then the window, then the
pixel range: a window narrower than 1 or lying outside the stored values is skipped, and the
image's ``notes`` say which rule was used); MONOCHROME1 or a Presentation LUT Shape of INVERSE
makes bone white. A multi-page TIFF (a scan and its thumbnail) gives its largest page.
"""
from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

try:  # HEIC/HEIF from phones (pillow-heif registers a Pillow opener)
    import pillow_heif

    pillow_heif.register_heif_opener()
    HEIF_SUPPORTED = True
except ImportError:  # optional: without it HEIC files get a clear message
    HEIF_SUPPORTED = False

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
_HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1", b"avif")
IMAGE_EXTENSIONS = {".jpeg", ".jpg", ".png", ".dcm", ".dicom", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".heic",
                    ".heif"}
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage (PS3.10)
# Group 0x0008 elements an ACR-NEMA style dataset (no preamble, no file meta) starts with
_ACR_NEMA_FIRST_GROUPS = (0x0008, 0x0010, 0x0018, 0x0020, 0x0028)


@dataclass
class XrayImage:
    """A decoded radiograph, as the clinician sees it."""

    pixels: np.ndarray  # (H, W) float32 in [0, 1]; 0 is black (air), 1 is white (bone)
    format: str  # "JPEG", "PNG", "DICOM", ...
    dicom_header: dict[str, str] = field(default_factory=dict)
    # Hasler-Suesstrunk colourfulness of the file's colour pixels before grey conversion, on the
    # 0-255 scale (0 = grey; about 15 is "slightly colourful", 33 "moderately"). An X-ray is grey.
    colourfulness: float = 0.0
    notes: list[str] = field(default_factory=list)  # how it was decoded: VOI rule, TIFF page, inferred syntax
    # DICOM fields the intended-use guard reads (xray.guard), never shown or stored: age, dates, view code
    guard_fields: dict[str, str] = field(default_factory=dict)

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


def _looks_like_acr_nema(data: bytes) -> bool:
    """A DICOM dataset written from byte 0 (no preamble, no DICM, no file meta): its first element is
    a small group (0008, 0010, ...) in little endian, with an implicit 4-byte length or an explicit VR."""
    if len(data) < 16:
        return False
    group = int.from_bytes(data[0:2], "little")
    if group not in _ACR_NEMA_FIRST_GROUPS:
        return False
    vr = data[4:6]
    if vr.isalpha() and vr.isupper():
        return True  # explicit VR little endian
    length = int.from_bytes(data[4:8], "little")
    return length < len(data)  # implicit VR: a plausible length


def _is_heif(data: bytes) -> bool:
    return data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS


def _is_dicom(data: bytes, name: str) -> bool:
    """DICOM by content: the Part 10 marker, or an ACR-NEMA style dataset; a name alone is not enough."""
    if data[128:132] == b"DICM":
        return True
    if data.startswith(_IMAGE_MAGIC) or _is_heif(data):  # a PNG/JPEG that merely carries a .dcm name
        return False
    return _looks_like_acr_nema(data)


def sniff(path: str | os.PathLike) -> str | None:
    """What a file is, from its first bytes (and its name only for image formats Pillow sniffs itself):
    "DICOMDIR", "DICOM", "image", or None when it is not something the loader reads.

    Raises:
        OSError: the file cannot be read.
    """
    path = Path(path)
    with open(path, "rb") as f:
        return sniff_bytes(f.read(512), path.name)


def sniff_bytes(head: bytes, name: str) -> str | None:
    """``sniff`` on a file's first bytes (at least 512 when the file has them) and its name."""
    path = Path(name)
    if head[128:132] == b"DICM":
        return "DICOMDIR" if DICOMDIR_CLASS.encode() in head else "DICOM"
    if path.name.upper() == "DICOMDIR":
        return "DICOMDIR"
    if head.startswith(_IMAGE_MAGIC) or _is_heif(head) or head[:4] == b"RIFF":
        return "image"
    if _looks_like_acr_nema(head):
        return "DICOM"
    if path.suffix.lower() in IMAGE_EXTENSIONS - {".dcm", ".dicom"}:
        return "image"  # a named image format: the loader will say precisely what is wrong with it
    return None


def dicomdir_files(path: str | os.PathLike) -> list[Path]:
    """The image files a DICOMDIR lists (its IMAGE records' Referenced File IDs), in order.

    Raises:
        ValueError: the DICOMDIR cannot be read.
    """
    import pydicom

    path = Path(path)
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as exc:
        raise ValueError(f"unreadable DICOMDIR: {exc}") from None
    files = []
    for record in ds.get("DirectoryRecordSequence", []):
        file_id = record.get("ReferencedFileID")
        if file_id is None:
            continue
        parts = [file_id] if isinstance(file_id, str) else list(file_id)
        files.append(path.parent.joinpath(*[str(p) for p in parts]))
    return files


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
    notes: list[str] = []
    frames = getattr(image, "n_frames", 1)
    if frames > 1 and fmt == "TIFF":
        # a scanner's page and its thumbnail: use the largest page; equal pages are a real sequence
        sizes = []
        for index in range(frames):
            image.seek(index)
            sizes.append(image.size[0] * image.size[1])
        if len(set(sizes)) > 1:
            largest = int(np.argmax(sizes))
            image.seek(largest)
            notes.append(f"multi-page TIFF: page {largest + 1} of {frames} (the largest) used")
            frames = 1
        else:
            image.seek(0)
    _check_shape(*image.size)  # before decoding: a bomb is refused from its header alone
    if frames > 1 and fmt != "MPO":  # MPO: a phone JPEG with a preview frame; the first is the photo
        raise ValueError(f"animated or multi-frame {fmt} ({frames} frames of the same size): upload a single "
                         "still radiograph")
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
        return XrayImage(_finish(array, None), fmt, notes=notes)
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
    return XrayImage(_finish(array, 255.0), fmt, colourfulness=colour, notes=notes)


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
        raise ValueError(f"reading the DICOM header failed: {exc}") from None
    notes: list[str] = []
    if getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None) is None:
        # ACR-NEMA style file: no file meta. The encoding is known once the dataset has been parsed.
        from pydicom.dataset import FileMetaDataset
        from pydicom.uid import (
            ExplicitVRBigEndian,
            ExplicitVRLittleEndian,
            ImplicitVRLittleEndian,
        )

        implicit, little = getattr(ds, "original_encoding", (True, True))
        syntax = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        ds.file_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = syntax
        notes.append(f"no DICOM file meta: transfer syntax inferred from the dataset ({syntax.name})")
    if str(getattr(ds.file_meta, "MediaStorageSOPClassUID", "")) == DICOMDIR_CLASS or "DirectoryRecordSequence" in ds:
        raise ValueError("this is a DICOMDIR (the index of a CD or PACS export), not an image: give its folder "
                         "to score every image it lists")
    header = {}
    for key in DICOM_DISPLAY_FIELDS:
        try:
            value = str(ds.get(key, "")).strip()
        except Exception:  # a malformed optional field must not lose the image
            continue
        if value:
            header[key] = value
    guard_fields = {k: v for k, v in header.items() if k in ("Modality", "BodyPartExamined", "PatientAge", "ViewPosition")}
    for key in ("PatientBirthDate", "StudyDate", "AcquisitionDate"):
        try:
            value = str(ds.get(key, "")).strip()
        except Exception:
            continue
        if value:
            guard_fields[key] = value
    try:
        code = ds.get("ViewCodeSequence")
        if code:
            guard_fields["ViewCodeValue"] = str(code[0].get("CodeValue", "")).strip()
    except Exception:  # a malformed sequence: the view falls back to ViewPosition
        pass
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ValueError("DICOM file has no pixel data (not an image object: a report, a structured report or "
                         "an index?)")
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
        if compressed and ("missing dependencies" in message or "no decoding plugin" in message.lower()):
            raise ValueError(f"decoding the DICOM pixel data failed: no decoder for {syntax} is installed here; "
                             "export the image uncompressed or with another transfer syntax") from None
        if compressed:
            raise ValueError(f"decoding the DICOM pixel data ({syntax}) failed: the data look damaged "
                             f"({message.splitlines()[-1].strip()}); export the image again") from None
        raise ValueError(f"decoding the DICOM pixel data failed: {message}") from None
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
            try:
                array = apply_modality_lut(array, ds)
            except Exception as exc:  # a malformed Modality LUT: the stored values still show the image
                notes.append(f"Modality LUT/rescale ignored (malformed: {_one_line(str(exc))[:80]})")
            array, rule = _apply_voi(np.asarray(array, dtype=np.float64), ds, apply_voi_lut)
            notes.append(f"grey levels: {rule}")
    except ValueError:
        raise
    except Exception as exc:  # anything else in the intensity fields
        raise ValueError(f"applying the DICOM grey-level (LUT/window) fields failed: {exc}") from None
    array = np.asarray(array, dtype=np.float64)
    pixels = _finish(array, None)
    inverse = str(ds.get("PresentationLUTShape", "")).strip().upper() == "INVERSE"
    # MONOCHROME1 (high values dark) and a Presentation LUT Shape of INVERSE each mean "show inverted";
    # for MONOCHROME1 an INVERSE shape states the same inversion again (PS3.3 C.8.11.6.1.2), not a second one
    if photometric == "MONOCHROME1" or inverse:
        pixels = 1.0 - pixels
        if inverse and photometric != "MONOCHROME1":
            notes.append("Presentation LUT Shape INVERSE applied (bone shown white)")
    return XrayImage(pixels.astype(np.float32), "DICOM", header, colour, notes, guard_fields)


def _visible_fraction(windowed: np.ndarray) -> float:
    """Share of pixels strictly between the darkest and the brightest value after a VOI transform."""
    low, high = float(windowed.min()), float(windowed.max())
    if high <= low:
        return 0.0
    return float(np.mean((windowed > low) & (windowed < high)))


def _apply_voi(array: np.ndarray, ds, apply_voi_lut) -> tuple[np.ndarray, str]:
    """The first usable VOI rule of PS3.4 N.2.1.1: the VOI LUT sequence, then the window, then the pixel
    range. A rule is skipped when its fields are invalid (a window width below 1) or when it leaves
    fewer than 1% of the pixels between black and white (a window lying outside the stored values)."""
    skipped = []
    if "VOILUTSequence" in ds:
        try:
            windowed = np.asarray(apply_voi_lut(array, ds, prefer_lut=True), dtype=np.float64)
            if _visible_fraction(windowed) >= 0.01:
                return windowed, "VOI LUT"
            skipped.append("VOI LUT leaves nothing visible")
        except Exception as exc:
            skipped.append(f"VOI LUT unusable ({_one_line(str(exc))[:60]})")
    if "WindowCenter" in ds and "WindowWidth" in ds:
        try:
            center, width = ds.WindowCenter, ds.WindowWidth
            center = float(center[0] if hasattr(center, "__len__") and not isinstance(center, str) else center)
            width = float(width[0] if hasattr(width, "__len__") and not isinstance(width, str) else width)
        except (TypeError, ValueError, IndexError):
            center, width = None, None
            skipped.append("window fields unreadable")
        if width is not None and width < 1:
            skipped.append(f"window width {width:g} below 1")
        elif width is not None:
            try:
                windowed = np.asarray(apply_voi_lut(array, ds, prefer_lut=False), dtype=np.float64)
                if _visible_fraction(windowed) >= 0.01:
                    return windowed, f"window (centre {center:g}, width {width:g})"
                skipped.append(f"window (centre {center:g}, width {width:g}) lies outside the pixel values")
            except Exception as exc:
                skipped.append(f"window unusable ({_one_line(str(exc))[:60]})")
    rule = "pixel range"
    return array, rule + (f" ({'; '.join(skipped)})" if skipped else "")


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
        if _is_heif(data) and not HEIF_SUPPORTED:
            raise ValueError("a HEIC/HEIF photo: its decoder (pillow-heif) is not installed here; export it as JPEG")
        if not data.startswith(_IMAGE_MAGIC) and not _is_heif(data) and name.lower().endswith((".dcm", ".dicom")):
            return _load_dicom(data)  # named DICOM, no recognisable content: let the DICOM reader say why
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
