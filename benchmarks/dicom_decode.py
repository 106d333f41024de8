"""Decode cost of each compressed DICOM transfer syntax on a 2-3 megapixel radiograph: figures for the
README ("Files a hospital exports"). Builds the encoded files in a temporary folder from a real JPEG
Lossless CR (tests/fixtures/field-cases/jpeg-lossless/RG2_JPLL.dcm, 2140x1760, 10-bit), times
``xray.io.loader.load_image`` (pydicom with its pylibjpeg plugins) on each, and, when python-gdcm is
installed, pydicom's GDCM plugin on the same files for comparison. With dcmtk's dcmcjpeg it adds a 12-bit
JPEG Extended file whose scan header is slightly non-conformant (Se=0), which pylibjpeg refuses and
``load_image`` repairs.

Usage: python benchmarks/dicom_decode.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from xray.io.loader import load_image  # noqa: E402

SOURCE = ROOT / "tests" / "fixtures" / "field-cases" / "jpeg-lossless" / "RG2_JPLL.dcm"


def encoded_files(folder: Path) -> dict[str, Path]:
    """{syntax name: file} for every syntax an encoder here can write, plus the real JPEG Lossless file."""
    import pydicom
    from PIL import Image
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit, RLELossless

    files = {"JPEG Lossless SV1 (real file)": SOURCE}
    ds = pydicom.dcmread(SOURCE)
    pixels = ds.pixel_array
    ds.decompress()
    plain = folder / "explicit_vr_little_endian.dcm"
    ds.save_as(plain)
    files["Explicit VR Little Endian (uncompressed)"] = plain
    for name, uid, kwargs in (("RLE Lossless", RLELossless, {}),
                              ("JPEG 2000 Lossless", JPEG2000Lossless, {}),
                              ("JPEG 2000 (lossy, 20:1)", JPEG2000, {"j2k_cr": [20]})):
        try:
            copy = pydicom.dcmread(plain)
            copy.compress(uid, **kwargs)
            path = folder / f"{uid.name}.dcm"
            copy.save_as(path)
            files[name] = path
        except Exception as exc:  # an encoder missing here: say so, measure the rest
            print(f"  ({name}: no encoder here: {exc})", file=sys.stderr)
    eight = np.round(pixels.astype(np.float64) / pixels.max() * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(eight).save(buffer, format="JPEG", quality=90)
    copy = pydicom.dcmread(plain)
    copy.BitsAllocated, copy.BitsStored, copy.HighBit, copy.PixelRepresentation = 8, 8, 7, 0
    copy.PixelData = encapsulate([buffer.getvalue()])
    copy.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    for key in ("WindowCenter", "WindowWidth"):
        if key in copy:
            del copy[key]
    path = folder / "jpeg_baseline.dcm"
    copy.save_as(path, enforce_file_format=False)
    files["JPEG Baseline (8-bit, quality 90)"] = path
    extended = jpeg_extended_bad_scan_header(plain, folder)
    if extended is not None:
        files["JPEG Extended 12-bit, scan header Se=0 (non-conformant)"] = extended
    return files


def jpeg_extended_bad_scan_header(plain: Path, folder: Path) -> Path | None:
    """The file as DCMTK's dcmcjpeg writes it in JPEG Extended (Process 2 and 4, 12-bit), then with the
    scan header's spectral selection end set to 0 instead of 63, as some devices write it (pylibjpeg
    issue #73); None when dcmcjpeg is not installed."""
    import shutil
    import subprocess

    import pydicom
    from pydicom.encaps import encapsulate, generate_frames

    if shutil.which("dcmcjpeg") is None:
        print("  (JPEG Extended: dcmcjpeg (dcmtk) not installed here)", file=sys.stderr)
        return None
    encoded = folder / "jpeg_extended.dcm"
    subprocess.run(["dcmcjpeg", "+ee", str(plain), str(encoded)], check=True, capture_output=True)
    ds = pydicom.dcmread(encoded)
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    sos = frame.find(b"\xff\xda")
    frame[sos + 6 + 2 * frame[sos + 4]] = 0  # Se
    ds.PixelData = encapsulate([bytes(frame)])
    path = folder / "jpeg_extended_se0.dcm"
    ds.save_as(path)
    return path


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import pydicom
    from pydicom.pixels import pixel_array

    try:
        import gdcm  # noqa: F401
        have_gdcm = True
    except ImportError:
        have_gdcm = False
    with tempfile.TemporaryDirectory() as tmp:
        files = encoded_files(Path(tmp))
        print("| transfer syntax | file size | load_image (pylibjpeg), ms | pixel decode only, pylibjpeg, ms |"
              + (" pixel decode only, GDCM, ms |" if have_gdcm else ""))
        print("|---|---|---|---|" + ("---|" if have_gdcm else ""))
        for name, path in files.items():
            ds = pydicom.dcmread(path)
            size = f"{path.stat().st_size / 2**20:.2f} MB"
            load = median_seconds(lambda: load_image(path), args.repeats) * 1000
            plugin = "pylibjpeg" if ds.file_meta.TransferSyntaxUID.is_compressed else ""
            try:
                decode = f"{median_seconds(lambda: pixel_array(path, decoding_plugin=plugin), args.repeats) * 1000:.0f}"
            except Exception:  # the plugin refuses the stream (load_image repairs or names the fault)
                decode = "refused"
            row = f"| {name} ({ds.Columns}x{ds.Rows}) | {size} | {load:.0f} | {decode} |"
            if have_gdcm:
                if ds.file_meta.TransferSyntaxUID.is_compressed:
                    try:
                        row += f" {median_seconds(lambda: pixel_array(path, decoding_plugin='gdcm'), args.repeats) * 1000:.0f} |"
                    except Exception as exc:
                        row += f" n/a ({type(exc).__name__}) |"
                else:
                    row += " - |"
            print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
