"""Build the committed fixture of field cases round 3 (issue 24) that cannot be made inside a test
without an encoder the suite does not need: a 12-bit JPEG Extended DICOM whose scan header is slightly
non-conformant. Deterministic; needs dcmtk's dcmcjpeg.

Source pixels: case 1 of the field cases (fo-dicom's CR-MONO1-10-chest, MS-PL; see
tests/fixtures/field-cases/README.md), halved to 220x220 and scaled from 10 to 12 bits.

Usage: python tests/make_round3_fixtures.py
"""
from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pydicom
from pydicom.encaps import encapsulate, generate_frames

HERE = Path(__file__).resolve().parent
CASES = HERE / "fixtures" / "field-cases"
OUT = CASES / "round3"


def jpeg_extended_12bit_bad_scan_header() -> None:
    """JPEG Extended (Process 2 and 4, 1.2.840.10008.1.2.4.51) written by dcmcjpeg, then the scan header's
    spectral selection end Se set to 0 instead of the 63 sequential DCT requires (ITU-T T.81 B.2.3), as
    in the file of pylibjpeg issue #73. IJG-based readers (DCMTK, GDCM) decode it with a warning."""
    ds = pydicom.dcmread(CASES / "presentation-lut-inverse" / "control_cr_chest_mono1.dcm")
    pixels = ds.pixel_array.astype(np.uint32)  # (440, 440), 10 bits stored
    halved = ((pixels[0::2, 0::2] + pixels[1::2, 0::2] + pixels[0::2, 1::2] + pixels[1::2, 1::2])).astype(np.uint16)
    ds.Rows, ds.Columns = halved.shape  # the sum of four 10-bit values: 12 bits
    ds.BitsStored, ds.HighBit = 12, 11
    ds.WindowCenter, ds.WindowWidth = 2200, 4096
    ds.PixelData = halved.tobytes()
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.24001"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    with tempfile.TemporaryDirectory() as tmp:
        plain, encoded = Path(tmp) / "plain.dcm", Path(tmp) / "encoded.dcm"
        ds.save_as(plain)
        subprocess.run(["dcmcjpeg", "+ee", "+un", str(plain), str(encoded)], check=True, capture_output=True)
        ds = pydicom.dcmread(encoded)
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    sos = frame.find(b"\xff\xda")
    frame[sos + 6 + 2 * frame[sos + 4]] = 0  # Se: 63 -> 0
    ds.PixelData = encapsulate([bytes(frame)])
    ds.save_as(OUT / "jpeg_extended_12bit_se0.dcm")


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    jpeg_extended_12bit_bad_scan_header()
