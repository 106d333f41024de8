"""One uploaded file in, one analysis out: the engine behind the Diagnose page (no streamlit here).

Everything a page shows about an image is computed here from the bytes the clinician dropped:
decoded image, calibrated probability and check results, and (on demand) the Grad-CAM map at display
size. The upload itself is never written to disk. Nothing here decides at a threshold or writes the
audit log: the page does both at the threshold on screen, when it shows a result (``audit.AuditTrail``).
"""
from __future__ import annotations

import base64
import csv
import io
from dataclasses import dataclass
from typing import Iterable

import numpy as np
from PIL import Image

from xray.serve.hirescam import colour_levels
from xray.serve.hirescam import overlay
from xray.io.loader import IncompleteFileError, XrayImage, load_image
from xray.serve.inference import Prediction, predict
from xray.serve.pipeline import CSV_HEADER, ResultRow
from xray.model.registry import LoadedModel, sha256_bytes

# Longest side of the copy shown on screen: a 2000-pixel radiograph is downscaled (aspect ratio
# kept) so a rerun does not ship megabytes to the browser; downloads use the same copy.
DISPLAY_SIDE = 1024
THUMBNAIL_SIDE = 64


@dataclass
class Analysis:
    """The result for one file; ``error`` is '' when the file was read and scored."""

    name: str
    sha256: str  # of the uploaded bytes: the cache key for results and heatmaps
    image: XrayImage | None
    prediction: Prediction | None
    error: str = ""
    # the kind of fault when unreadable: IncompleteFileError.reason ("incomplete": send it again),
    # NotAnImageError.reason ("not an image"), or "unreadable"
    error_reason: str = ""

    @property
    def ok(self) -> bool:
        return self.prediction is not None

    @property
    def incomplete(self) -> bool:
        """The file arrived cut off (an interrupted transfer): the same file sent again will load."""
        return self.error_reason == IncompleteFileError.reason


def analyse(model: LoadedModel, data: bytes, name: str) -> Analysis:
    """Decode and score one uploaded file (no decision, no audit line: see the module docstring).

    Args:
        model: from ``Registry.load`` / ``load_with_fallback``.
        data: the file's bytes, as uploaded.
        name: the file name (recognises DICOM without a preamble; shown to the clinician).
    Returns:
        An ``Analysis``; a file that cannot be read has ``error`` set to a one-line reason.
    """
    data = bytes(data)
    digest = sha256_bytes(data)
    try:
        image = load_image(data, name=name)
    except ValueError as exc:
        return Analysis(name, digest, None, None, " ".join(str(exc).split()), getattr(exc, "reason", "unreadable"))
    prediction = predict(model, [image])[0]  # includes the OOD check (xray/ood.py)
    return Analysis(name, digest, image, prediction, "")


def display_size(width: int, height: int, longest: int = DISPLAY_SIDE) -> tuple[int, int]:
    """(width, height) scaled so the longest side is at most ``longest``, aspect ratio kept."""
    scale = min(1.0, longest / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def display_pixels(image: XrayImage, longest: int = DISPLAY_SIDE) -> np.ndarray:
    """(h, w) uint8 copy for the screen, same aspect ratio as the original."""
    size = display_size(*image.size, longest)
    if size == image.size:
        return image.to_uint8()
    return np.asarray(Image.fromarray(image.to_uint8()).resize(size, Image.BILINEAR))


def display_colour_levels(model: LoadedModel, image: XrayImage, longest: int = DISPLAY_SIDE) -> np.ndarray:
    """The heatmap: evidence for pneumonia (``hirescam.colour_levels``: HiResCAM on a fixed, shared scale) at display size:
    (h, w) float32 colour levels in [0, 1], aligned with ``display_pixels``."""
    width, height = display_size(*image.size, longest)
    # explains exactly the input the prediction came from; the grid is scaled straight to the display
    # copy's size (the model saw a squash of the whole image, so this aligns)
    return colour_levels(model, image, shape=(height, width)).astype(np.float32)


def overlay_png(pixels: np.ndarray, cam: np.ndarray, alpha: float) -> bytes:
    """The heatmap blended over the image, as lossless PNG bytes (the download)."""
    return encode(overlay(pixels, cam, alpha), "PNG")


def overlay_jpeg(pixels: np.ndarray, cam: np.ndarray, alpha: float) -> bytes:
    """The same blend as high-quality JPEG for the screen: about 50x faster to encode than PNG."""
    return encode(overlay(pixels, cam, alpha), "JPEG")


def encode(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    options = {"quality": 92} if fmt == "JPEG" else {}
    Image.fromarray(array).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def thumbnail_data_uri(image: XrayImage, side: int = THUMBNAIL_SIDE) -> str:
    """A small PNG as a data: URI, for a worklist table cell."""
    return "data:image/png;base64," + base64.b64encode(encode(display_pixels(image, side))).decode("ascii")


def worklist_rows(analyses: Iterable[Analysis], threshold: float,
                  prevalence: tuple[float, float] | None = None) -> list[ResultRow]:
    """One ``pipeline.ResultRow`` per file (the CLI's CSV row, with the file's sha256), highest p(pneumonia)
    first; withheld and unreadable files below every verdict."""
    rows = [ResultRow.of(a.name, a.prediction, a.error, threshold, prevalence, a.sha256) for a in analyses]
    return sorted(rows, key=lambda r: (r.label == "", -(r.p_pneumonia or 0.0)))


def worklist_csv(analyses: Iterable[Analysis], threshold: float, prevalence: tuple[float, float] | None = None) -> str:
    """The worklist as CSV, row for row what ``python -m xray predict`` writes (``pipeline.ResultRow``),
    in worklist order, the file name as path."""
    by_sha = {a.sha256: a for a in analyses}
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_HEADER)
    for row in worklist_rows(by_sha.values(), threshold, prevalence):
        writer.writerow(row.csv())
    return out.getvalue()
