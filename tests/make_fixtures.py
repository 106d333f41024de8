"""Regenerate the synthetic fixtures in tests/fixtures/generated from the real fixture images.

Run: python tests/make_fixtures.py   (deterministic; the outputs are committed)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent / "fixtures"
OUT = HERE / "generated"
SOURCE = HERE / "dataset" / "PNEUMONIA" / "person1000_bacteria_2931.jpeg"


def _dicom(pixels: np.ndarray, path: Path, photometric: str = "MONOCHROME2", with_pixels: bool = True,
           window: tuple[float, float] | None = None, syntax=None) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[path.name])
    meta.TransferSyntaxUID = syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.ViewPosition = "AP"
    ds.BodyPartExamined = "CHEST"
    ds.PatientSex = "F"
    ds.PatientAge = "003Y"
    ds.PatientName = "Test^Fixture"
    if with_pixels:
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        if window:
            ds.WindowCenter, ds.WindowWidth = window
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    gray = np.asarray(Image.open(SOURCE).convert("L"), dtype=np.float64)  # (224, 224)
    twelve_bit = np.round(gray / 255 * 4095).astype(np.uint16)
    _dicom(twelve_bit, OUT / "chest.dcm", window=(2048, 4096))
    _dicom(4095 - twelve_bit, OUT / "chest_monochrome1.dcm", photometric="MONOCHROME1")
    _dicom(twelve_bit, OUT / "no_pixels.dcm", with_pixels=False)
    Image.fromarray((gray * 256).astype(np.uint16)).save(OUT / "gray16.png")
    rgba = Image.open(SOURCE).convert("RGBA")
    rgba.save(OUT / "rgba.png")
    Image.open(SOURCE).convert("RGB").quantize(64).save(OUT / "palette.png")
    (OUT / "empty.png").write_bytes(b"")
    (OUT / "text_renamed.png").write_text("This is a discharge letter, not an image.\n")
    data = SOURCE.read_bytes()
    (OUT / "truncated.jpeg").write_bytes(data[: len(data) // 2])


if __name__ == "__main__":
    main()
