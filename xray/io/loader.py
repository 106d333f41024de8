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

Every refusal is a ValueError with a one-line reason; two kinds have their own type, for callers that
act on the kind (the CLI, the page, the DICOM node): ``IncompleteFileError`` for a file that ends
before its own structure does (an interrupted transfer: send it again) and ``NotAnImageError`` for a
complete file that holds no image (an SR, a DICOMDIR, a PDF, a ZIP archive). Decoder faults are named
by what is wrong with the data, never by the decoder library; a sequential JPEG whose scan header
gives other spectral-selection values than T.81 allows is decoded as IJG-based readers do.
"""
from __future__ import annotations

import io
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from struct import error as struct_error
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


class IncompleteFileError(ValueError):
    """The file ends before its own structure does (an interrupted transfer, download or copy): the same
    file sent or exported again will load. ``reason`` is the same for every such file, for callers
    (the CLI, the page, the DICOM node) that act on the kind of fault rather than its wording."""

    reason = "incomplete"


class NotAnImageError(ValueError):
    """A complete, readable file that holds no image: a DICOM report, structured report or DICOMDIR
    index, a PDF, a text file, an archive. Sending it again will not help."""

    reason = "not an image"


INCOMPLETE_DICOM = "the DICOM file is incomplete (truncated: the transfer or copy was cut off): send or export it again"
ZIP_ARCHIVE = "a ZIP archive: extract it and give the folder (or drop the extracted files)"


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
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        if b"[Content_Types].xml" in head or b"word/" in head or b"xl/" in head or b"ppt/" in head:
            return "an Office document, not an image"
        return ZIP_ARCHIVE
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


def not_an_image_reason(path: str | os.PathLike) -> str:
    """Why a file ``sniff`` passed over is not read: what it is when its first bytes say (a PDF, a ZIP
    archive to extract, a text file), else "not an image or DICOM file"."""
    try:
        with open(path, "rb") as f:
            reason = _describe_non_image(f.read(1024))
    except OSError as exc:
        return f"cannot read: {exc.strerror or exc}"
    return "not an image or DICOM file" if reason.startswith("not a recognised") else reason


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
        raise NotAnImageError(_describe_non_image(data)) from None
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
        if "truncated" in msg:  # Pillow ran out of bytes: the end of the file is missing
            raise IncompleteFileError(f"the {fmt} file is incomplete (truncated: the transfer or copy was cut off): "
                                      "send or export it again") from None
        if "broken data stream" in msg or "unrecognized data stream" in msg:
            raise ValueError(f"damaged {fmt} file: its compressed data cannot be decoded; export it again") from None
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


class _ReadRecorder(io.BytesIO):
    """A byte stream that notes when a read got some but not all of the bytes asked for: the parser
    stopped inside an element, so the file ends early."""

    ended_early = False

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        if size is not None and size > 0 and 0 < len(chunk) < size:
            self.ended_early = True
        return chunk


def _is_image_storage(ds) -> bool:
    """The SOP Class is an image storage class (CR, DX, SC, ...), so the object must carry pixels."""
    sop_class = ds.get("SOPClassUID") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
    return "Image Storage" in str(getattr(sop_class, "name", ""))


def _read_dicom(data: bytes):
    """Parse the whole dataset; IncompleteFileError when the file ends inside it (PS3.5 7.1, 7.5:
    an element, a sequence or the encapsulated pixel data without its end)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    stream = _ReadRecorder(data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(stream, force=True)
        except (EOFError, struct_error):
            raise IncompleteFileError(INCOMPLETE_DICOM) from None
        except (InvalidDicomError, OSError, ValueError, AttributeError, KeyError, TypeError) as exc:
            raise ValueError(f"reading the DICOM header failed: {exc}") from None
    cut_delimiter = any("End of file reached" in str(w.message) for w in caught)
    empty_part10 = len(ds) == 0 and data[128:132] == b"DICM"  # the file meta alone, or less
    if stream.ended_early or cut_delimiter or empty_part10:
        raise IncompleteFileError(INCOMPLETE_DICOM)
    return ds


def _infer_file_meta(ds, notes: list[str]) -> None:
    """An ACR-NEMA style file has no file meta: the encoding is known once the dataset has been parsed."""
    if getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None) is not None:
        return
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    implicit, little = getattr(ds, "original_encoding", (True, True))
    syntax = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    ds.file_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    notes.append(f"no DICOM file meta: transfer syntax inferred from the dataset ({syntax.name})")


def _refuse_non_image(ds) -> None:
    """NotAnImageError for a DICOMDIR or an object without pixels (a report, an SR); an image object
    without its pixels is an incomplete file (cut off between two elements)."""
    if str(getattr(ds.file_meta, "MediaStorageSOPClassUID", "")) == DICOMDIR_CLASS or "DirectoryRecordSequence" in ds:
        raise NotAnImageError("this is a DICOMDIR (the index of a CD or PACS export), not an image: give its folder "
                              "to score every image it lists")
    if any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        return
    sop_class = ds.get("SOPClassUID") or getattr(ds.file_meta, "MediaStorageSOPClassUID", None)
    if _is_image_storage(ds):  # Pixel Data is type 1 in every image IOD: the file stops before it
        raise IncompleteFileError(f"the DICOM file is incomplete: a {sop_class.name} object with no pixel data "
                                  "(a transfer or copy cut off?): send or export it again")
    what = getattr(sop_class, "name", "") if sop_class is not None else ""
    what = f"a {what}" if what and what != str(sop_class) else "a report, a structured report or an index?"
    raise NotAnImageError(f"DICOM file has no pixel data (not an image object: {what})")


def _text_field(ds, key: str) -> str:
    try:
        return str(ds.get(key, "")).strip()
    except Exception:  # a malformed optional field must not lose the image
        return ""


def _dicom_fields(ds) -> tuple[dict[str, str], dict[str, str]]:
    """(the fields shown to the clinician, the fields the intended-use guard reads)."""
    header = {key: value for key in DICOM_DISPLAY_FIELDS if (value := _text_field(ds, key))}
    guard_fields = {k: v for k, v in header.items() if k in ("Modality", "BodyPartExamined", "PatientAge", "ViewPosition")}
    for key in ("PatientBirthDate", "StudyDate", "AcquisitionDate", "ConversionType"):
        if value := _text_field(ds, key):
            guard_fields[key] = value
    for sequence, prefix in (("ViewCodeSequence", "ViewCode"), ("AnatomicRegionSequence", "AnatomicRegion")):
        try:
            code = ds.get(sequence)
            if code:  # the first item: PS3.3 C.8.11.5 (view), C.7.6.2 / 10.5 (anatomic region)
                for part in ("CodeValue", "CodingSchemeDesignator", "CodeMeaning"):
                    if value := _text_field(code[0], part):
                        guard_fields[prefix + part.removeprefix("Code").removeprefix("Coding")] = value
        except Exception:  # a malformed sequence: the guard falls back to the plain fields
            pass
    return header, guard_fields


def _check_dicom_size(ds) -> None:
    """Rows, Columns and frames from the header: a bomb is refused before decoding."""
    try:
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"DICOM image size fields are malformed: {exc}") from None
    if not (rows and cols):
        raise ValueError("DICOM file has pixel data but no Rows/Columns")
    _check_shape(cols, rows)
    if frames > 1:
        raise ValueError(f"multi-frame DICOM ({frames} frames): a chest radiograph is a single frame")


# Which decoder said what is of no use to a clinician: the fault in the file is (the plugin's name,
# "does not support" lines of decoders that cannot read this syntax at all, and error codes go)
_DECODER_PREFIX = re.compile(r"^\s*[\w.-]+:\s*")
_DECODER_NOISE = (re.compile(r"libjpeg error code '-?\d+' returned from \w+\(\):\s*"), re.compile(r"^Decoding error:\s*"),
                  re.compile(r"^Error decoding the \w+ data:\s*"))
_SEQUENTIAL_SCAN_FAULT = "scan start must be zero and scan stop must be 63"


def _decoder_faults(message: str) -> list[str]:
    """The faults the decoders found in the data, without decoder names."""
    lines = [line for line in message.splitlines() if line.strip()]
    faults = []
    for line in (lines[1:] if len(lines) > 1 and lines[0].rstrip().endswith(":") else lines):
        fault = _DECODER_PREFIX.sub("", line, count=1)
        for noise in _DECODER_NOISE:
            fault = noise.sub("", fault)
        if fault and "does not support" not in fault and "not installed" not in fault and fault not in faults:
            faults.append(fault.strip())
    return faults


def _decode_pixels(ds, notes: list[str]) -> np.ndarray:
    """The stored pixel values; a missing decoder, an incomplete file and damaged data each get their
    own message, in the file's terms (never a decoder's name or a raw exception)."""
    try:
        return ds.pixel_array
    except Exception as exc:  # pydicom raises several types for missing decoders or bad data
        message = str(exc)
    syntax, compressed = _dicom_syntax(ds)
    if "less than expected" in message:  # native pixel data cut short (PS3.5 8.1.1)
        raise IncompleteFileError(f"{INCOMPLETE_DICOM} (the pixel data is shorter than the image size needs)")
    if compressed and ("missing dependencies" in message or "no decoding plugin" in message.lower()
                       or "no available plugins" in message.lower()):
        raise ValueError(f"decoding the DICOM pixel data failed: no decoder for {syntax} is installed here; "
                         "export the image uncompressed or with another transfer syntax")
    if compressed and _SEQUENTIAL_SCAN_FAULT in message:
        repaired = _repair_sequential_scan_headers(ds)
        if repaired is not None:
            notes.append("JPEG scan header repaired: a sequential JPEG scan must cover coefficients 0-63 "
                         "(ITU-T T.81 B.2.3); the file's header said otherwise, as IJG-based readers tolerate")
            return repaired
    faults = _decoder_faults(message) if compressed else []
    if compressed:
        fault = "; ".join(faults) if faults else "the decoder rejected the data"
        raise ValueError(f"decoding the DICOM pixel data ({syntax}) failed: the compressed data look damaged "
                         f"({fault}); export the image again")
    raise ValueError(f"decoding the DICOM pixel data failed: {message.splitlines()[-1].strip() if message else 'unknown fault'}")


_SEQUENTIAL_SOF = (0xC0, 0xC1)  # baseline and extended sequential DCT (ITU-T T.81 Table B.1)


def _repair_sequential_scan_headers(ds) -> np.ndarray | None:
    """Decode a JPEG Baseline/Extended frame whose scan header (SOS) gives a spectral selection or
    successive approximation other than Ss=0, Se=63, Ah=Al=0, which T.81 B.2.3 fixes for sequential
    DCT. IJG libjpeg (DCMTK, GDCM) ignores these fields with a warning; they carry no information in
    sequential mode, so setting them to the only valid values decodes the data as those readers do.
    None when the stream is not such a frame."""
    from pydicom.encaps import encapsulate, generate_frames
    from pydicom.uid import JPEGBaseline8Bit, JPEGExtended12Bit

    if ds.file_meta.TransferSyntaxUID not in (JPEGBaseline8Bit, JPEGExtended12Bit):
        return None
    try:
        frames = [bytearray(f) for f in generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1))]
    except Exception:
        return None
    for frame in frames:
        if not _fix_scan_headers(frame):
            return None
    copy = ds.copy()
    copy.PixelData = encapsulate([bytes(f) for f in frames])
    try:
        return copy.pixel_array
    except Exception:
        return None


def _fix_scan_headers(frame: bytearray) -> bool:
    """Set Ss, Se, Ah/Al of every SOS in a sequential-DCT frame to 0, 63, 0 in place; False when the
    frame is not sequential DCT or its markers cannot be followed."""
    position, sequential, fixed = 2, False, False
    while position + 4 <= len(frame) and frame[position] == 0xFF:
        marker = frame[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        length = int.from_bytes(frame[position + 2:position + 4], "big")
        if marker in _SEQUENTIAL_SOF:
            sequential = True
        elif 0xC2 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return False  # progressive, lossless or arithmetic: the fields mean something there
        if marker == 0xDA:  # SOS: Ls, Ns, Ns x (Cs, Td/Ta), Ss, Se, Ah/Al
            if not sequential or position + 4 + length - 2 > len(frame):
                return False
            count = frame[position + 4]
            tail = position + 5 + 2 * count
            frame[tail:tail + 3] = b"\x00\x3f\x00"
            fixed = True
            position = _next_marker(frame, position + 2 + length)  # past the entropy-coded segment
            continue
        position += 2 + length
    return fixed


def _next_marker(frame: bytearray, position: int) -> int:
    """The next marker after entropy-coded data (skipping stuffed 0xFF00 and restart markers)."""
    while position + 1 < len(frame):
        if frame[position] == 0xFF and frame[position + 1] not in (0x00, *range(0xD0, 0xD8)) and frame[position + 1] != 0xFF:
            return position
        position += 1
    return len(frame)


def _to_grey(array: np.ndarray, ds, notes: list[str]) -> tuple[np.ndarray, float]:
    """Stored values -> (H, W) grey levels through the Modality LUT and the VOI rule, and the colourfulness
    of colour pixel data (PS3.4 N.2)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

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
    return np.asarray(array, dtype=np.float64), colour


def _bone_white(pixels: np.ndarray, ds, notes: list[str]) -> np.ndarray:
    """MONOCHROME1 (high values dark) and a Presentation LUT Shape of INVERSE each mean "show inverted";
    for MONOCHROME1 an INVERSE shape states the same inversion again (PS3.3 C.8.11.6.1.2), not a second one."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    inverse = str(ds.get("PresentationLUTShape", "")).strip().upper() == "INVERSE"
    if photometric == "MONOCHROME1" or inverse:
        pixels = 1.0 - pixels
        if inverse and photometric != "MONOCHROME1":
            notes.append("Presentation LUT Shape INVERSE applied (bone shown white)")
    return pixels


def _load_dicom(data: bytes) -> XrayImage:
    """DICOM bytes -> XrayImage, one named step at a time (PS3.10 file, PS3.3 C.7.6.3 pixels, PS3.4 N.2)."""
    notes: list[str] = []
    ds = _read_dicom(data)
    _infer_file_meta(ds, notes)
    _refuse_non_image(ds)
    header, guard_fields = _dicom_fields(ds)
    _check_dicom_size(ds)
    array, colour = _to_grey(_decode_pixels(ds, notes), ds, notes)
    pixels = _bone_white(_finish(array, None), ds, notes)
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
    except ValueError as exc:  # the same kind of error (IncompleteFileError, NotAnImageError), one line
        kind = type(exc) if type(exc) in (IncompleteFileError, NotAnImageError) else ValueError
        raise kind(_one_line(str(exc))) from None
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
