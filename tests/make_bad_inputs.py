"""Regenerate the corpus of bad and awkward inputs in tests/fixtures/bad from a real fixture image.

Run: python tests/make_bad_inputs.py   (deterministic; the outputs are committed)
Every entry point (loader, CLI, Diagnose upload, Retrain folder check) is tested over this corpus.
"""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent / "fixtures"
OUT = HERE / "bad"
SOURCE = HERE / "dataset" / "PNEUMONIA" / "person1000_bacteria_2931.jpeg"
# A name a shell would mangle: spaces, unicode, quotes, $(...), ;, &, backtick.
NASTY_NAME = "chest x-ray ñ 肺 $(echo pwned); rm 'x' & `id`.png"


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_bomb(width: int, height: int) -> bytes:
    """A valid-looking PNG whose header claims width x height 8-bit grey pixels (a few rows of data)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" + bytes(width) * 1, 9) if width <= 200_000 else b""
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", rows)
            + _png_chunk(b"IEND", b""))


def _dicom(path: Path, rows: int, cols: int, pixel_bytes: bytes | None, *, photometric: str = "MONOCHROME2",
           syntax=None, float_pixels: bool = False, window: tuple[float, float] | None = None) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    # Float pixel data exists only in a few IODs; the parametric map is one.
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.30" if float_pixels else SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[path.name])
    meta.TransferSyntaxUID = syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.ViewPosition, ds.BodyPartExamined = "CR", "AP", "CHEST"
    ds.PatientName, ds.PatientID = "Doe^Jane", "PATIENT-12345"  # must never reach a log
    if pixel_bytes is not None:
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        if float_pixels:
            ds.BitsAllocated = 32
            ds.FloatPixelData = pixel_bytes
        else:
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
            ds.PixelRepresentation = 0
            if window:
                ds.WindowCenter, ds.WindowWidth = window
            if syntax is not None and syntax.is_compressed:
                ds.PixelData = encapsulate([pixel_bytes])
                ds["PixelData"].VR = "OB"
            else:
                ds.PixelData = pixel_bytes
    ds.save_as(path, enforce_file_format=True)


def main() -> None:
    from pydicom.uid import JPEG2000Lossless, JPEGLSLossless

    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.iterdir():
        old.unlink()
    source = Image.open(SOURCE).convert("L")  # (224, 224) real radiograph
    gray = np.asarray(source)
    twelve_bit = np.round(gray.astype(np.float64) / 255 * 4095).astype(np.uint16)

    # Not images at all.
    (OUT / "empty.png").write_bytes(b"")
    (OUT / "text_renamed.png").write_text("Discharge letter: patient well, no findings.\n")
    (OUT / "pdf_renamed.jpg").write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n")

    # Damaged images.
    jpeg = io.BytesIO()
    source.save(jpeg, "JPEG", quality=90)
    (OUT / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    png = io.BytesIO()
    source.save(png, "PNG")
    (OUT / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (OUT / "bomb_100000x100000.png").write_bytes(png_bomb(100_000, 100_000))

    # Awkward sizes and a blank image.
    Image.new("L", (1, 1), 128).save(OUT / "tiny_1x1.png")
    Image.fromarray(np.tile(np.linspace(0, 255, 10000, dtype=np.uint8), (10, 1))).save(OUT / "strip_10000x10.png")
    Image.new("L", (256, 256), 0).save(OUT / "all_black.png")

    # Valid radiographs in unusual encodings: each must load.
    Image.fromarray(gray.astype(np.uint16) * 257).save(OUT / "gray16.png")
    rgba = source.convert("RGBA")
    rgba.putalpha(255)
    rgba.save(OUT / "rgba.png")
    source.convert("RGB").quantize(64).save(OUT / "palette.png")
    source.convert("CMYK").save(OUT / "cmyk.jpg", "JPEG", quality=95)
    upright = source.crop((0, 0, 160, 224))  # (W 160, H 224): portrait, so rotation is visible
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation 6: stored rotated, "rotate 90 CW to display"
    upright.transpose(Image.Transpose.ROTATE_90).save(OUT / "exif_rotated.jpg", "JPEG", quality=95, exif=exif)
    upright.save(OUT / "exif_reference_upright.png")
    source.save(OUT / NASTY_NAME)
    source.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(OUT / "png_named.dcm", "PNG")  # distinct bytes

    frames = [source, source.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    frames[0].save(OUT / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)

    # DICOM.
    _dicom(OUT / "dicom_no_pixels.dcm", 0, 0, None)
    _dicom(OUT / "dicom_monochrome2.dcm", *twelve_bit.shape, twelve_bit.tobytes(), window=(2048, 4096))
    _dicom(OUT / "dicom_monochrome1.dcm", *twelve_bit.shape, (4095 - twelve_bit).tobytes(), photometric="MONOCHROME1")
    fake_codestream = b"\xff\x4f\xff\x51" + bytes(60)  # a JPEG 2000 / JPEG-LS stream that ends at once
    _dicom(OUT / "dicom_jpeg2000.dcm", 224, 224, fake_codestream, syntax=JPEG2000Lossless)
    _dicom(OUT / "dicom_jpegls.dcm", 224, 224, b"\xff\xd8\xff\xf7" + bytes(60), syntax=JPEGLSLossless)
    _dicom(OUT / "dicom_bomb_65535x65535.dcm", 65535, 65535, bytes(1024))
    floats = (gray.astype(np.float32) / 255)
    floats[10, 10], floats[20, 20] = np.nan, np.inf
    _dicom(OUT / "dicom_float_nan_inf.dcm", *floats.shape, floats.tobytes(), float_pixels=True)


if __name__ == "__main__":
    main()
