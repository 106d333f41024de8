"""Every file a hospital exports (issue 14): one real-world file per failure kind, in
tests/fixtures/field-cases (attribution in its README). Each is decoded and scored like its control,
with what the loader did said in the image's notes; folders from CD exports are scored in full."""
from __future__ import annotations

import io
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xray.io.loader import load_image, sniff
from xray.serve.inference import predict
from xray.model.registry import Registry

ROOT = Path(__file__).resolve().parent.parent
CASES = ROOT / "tests" / "fixtures" / "field-cases"
@pytest.fixture(scope="module")
def shipped():
    return Registry(ROOT / "weights").load()  # the active shipped version: the product as a user gets it


def p_of(model, path, name=None) -> float:
    return predict(model, [load_image(path, name=name)])[0].p_pneumonia


CONTROL = CASES / "presentation-lut-inverse" / "control_cr_chest_mono1.dcm"


@pytest.mark.parametrize("case, note", [
    ("presentation-lut-inverse/cr_chest_mono2_plut_inverse.dcm", "Presentation LUT Shape INVERSE applied"),
    ("window-fields/ww_below_1_tiny_slope.dcm", "pixel range (window width 0.9 below 1)"),
    ("window-fields/window_outside_pixel_values.dcm", "lies outside the pixel values"),
    ("headerless-cr/CR-MONO1-10-chest", "transfer syntax inferred from the dataset (Implicit VR Little Endian)"),
    ("cd-export/PT000000/ST000000/SE000000/IM000000", "window (centre 550, width 1024)"),
])
def test_dicom_variants_are_read_and_score_like_the_control(shipped, case, note):
    image = load_image(CASES / case)
    assert any(note in n for n in image.notes), image.notes
    assert p_of(shipped, CASES / case) == pytest.approx(p_of(shipped, CONTROL), abs=0.02)
    assert load_image(CASES / case).pixels.mean() == pytest.approx(load_image(CONTROL).pixels.mean(), abs=0.05)


def test_headerless_dicom_is_recognised_by_content_with_or_without_a_dcm_name(shipped):
    data = (CASES / "headerless-cr" / "CR-MONO1-10-chest").read_bytes()
    assert sniff(CASES / "headerless-cr" / "CR-MONO1-10-chest") == "DICOM"
    for name in ("", "CR-MONO1-10-chest", "chest.dcm", "chest.jpg"):
        assert load_image(data, name=name).format == "DICOM"


@pytest.mark.parametrize("case, syntax", [
    ("jpeg-lossless/RG2_JPLL.dcm", "1.2.840.10008.1.2.4.70"),
    ("jpeg2000-lossless-16bit/JPEG2KLossless_1s_1f_u_16_16.dcm", "1.2.840.10008.1.2.4.90"),
])
def test_compressed_transfer_syntaxes_decode(shipped, case, syntax):
    import pydicom

    assert str(pydicom.dcmread(CASES / case, stop_before_pixels=True).file_meta.TransferSyntaxUID) == syntax
    image = load_image(CASES / case)
    assert min(image.size) > 1000 and image.pixels.std() > 0.05  # a real image, not "blank"
    prediction = predict(shipped, [image])[0]
    # a hip and an adult slot-scanner film: decoded, then withheld as outside what the model knows
    assert prediction.withheld


def test_a_16_bit_window_outside_the_values_falls_back_to_the_pixel_range():
    image = load_image(CASES / "jpeg2000-lossless-16bit" / "JPEG2KLossless_1s_1f_u_16_16.dcm")
    assert any("pixel range (window (centre 2725, width 5310) lies outside" in n for n in image.notes)


def test_multipage_tiff_uses_the_largest_page_and_equal_frames_are_still_refused(shipped, tmp_path):
    scan = load_image(CASES / "multipage-tiff" / "scan_with_thumbnail.tif")
    assert scan.size == (1024, 1024) and any("page 1 of 2 (the largest)" in n for n in scan.notes)
    assert p_of(shipped, CASES / "multipage-tiff" / "scan_with_thumbnail.tif") == pytest.approx(
        p_of(shipped, CASES / "multipage-tiff" / "control_single_page.tif"), abs=1e-6)
    frames = [Image.fromarray(np.full((64, 64), v, np.uint8)) for v in (10, 200)]
    path = tmp_path / "sequence.tif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    with pytest.raises(ValueError, match="multi-frame TIFF \\(2 frames of the same size\\)"):
        load_image(path)


def test_heic_photo_is_decoded_and_judged_like_its_jpeg_twin(shipped):
    heic, jpeg = CASES / "heic" / "IMG_4032.HEIC", CASES / "heic" / "IMG_4032.jpg"
    assert load_image(heic).format == "HEIF" and sniff(heic) == "image"
    a, b = predict(shipped, [load_image(heic), load_image(jpeg)])
    assert a.withheld and b.withheld and "colour image" in a.withheld_reason


@pytest.mark.slow
def test_cd_export_folder_and_its_dicomdir_are_scored_in_full(tmp_path):
    env = {"XRAY_WEIGHTS": str(ROOT / "weights"), "PYTHONPATH": str(ROOT), "XRAY_AUDIT_LOG": "off",
           "PATH": "/usr/bin:/bin"}
    for target in (CASES / "cd-export", CASES / "cd-export" / "DICOMDIR"):
        result = subprocess.run([sys.executable, "-m", "xray", "predict", str(target)], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        rows = [line.split(",") for line in result.stdout.splitlines()[1:]]
        assert [Path(r[0]).name for r in rows] == ["IM000000", "IM000001"]
        # IM000000 is an adult's film (case 1): outside intended use; IM000001 a child's
        assert [r[2] for r in rows] == ["", "PNEUMONIA"] and rows[0][4].lstrip('"').startswith("outside intended use: ")
        assert "2 image file(s) found" in result.stderr


@pytest.mark.slow
def test_a_folder_with_nothing_readable_is_an_error_that_lists_what_was_skipped(tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "notes.txt").write_text("not an image")
    (folder / "scan.jpg").write_bytes(b"\xff\xd8\xff" + bytes(20))
    env = {"XRAY_WEIGHTS": str(ROOT / "weights"), "PYTHONPATH": str(ROOT), "XRAY_AUDIT_LOG": "off",
           "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-m", "xray", "predict", str(folder)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "nothing readable" in result.stderr and "skipped" in result.stderr and "notes.txt" in result.stderr


def test_training_scan_finds_extensionless_dicom_and_reports_what_it_skips(tmp_path):
    from xray.io.folders import scan_dataset

    for label in ("NORMAL", "PNEUMONIA"):
        (tmp_path / label).mkdir()
        (tmp_path / label / "IM000000").write_bytes((CASES / "headerless-cr" / "CR-MONO1-10-chest").read_bytes())
        (tmp_path / label / "readme.txt").write_text("hello")
    scan = scan_dataset(tmp_path)
    assert sorted(s.path.name for s in scan.samples) == ["IM000000", "IM000000"]
    assert sorted(reason for _, reason in scan.skipped) == ["not an image or DICOM file"] * 2


def test_a_100_megapixel_tiff_is_refused_from_its_header_with_bounded_memory(tmp_path):
    path = tmp_path / "huge.tif"
    # a 10000x10000 8-bit TIFF of zeros, deflate-compressed: a few hundred KB on disk, 100 MB decoded
    Image.frombuffer("L", (10000, 10000), bytes(10000 * 10000), "raw", "L", 0, 1).save(path, compression="tiff_adobe_deflate")
    data = path.read_bytes()
    tracemalloc.start()
    with pytest.raises(ValueError, match="too large|decompression bomb"):
        load_image(io.BytesIO(data))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 30 * 2**20, peak  # far below the 100 MB of pixels


def test_decoder_and_reader_errors_are_one_line_naming_the_step(tmp_path):
    damaged = ROOT / "tests" / "fixtures" / "bad" / "dicom_jpeg2000.dcm"
    with pytest.raises(ValueError) as exc:
        load_image(damaged)
    message = str(exc.value)
    assert "\n" not in message and message.startswith("decoding the DICOM pixel data")
    assert "JPEG 2000" in message and "1.2.840.10008.1.2.4.90" in message
    with pytest.raises(ValueError, match="DICOMDIR"):
        load_image(CASES / "cd-export" / "DICOMDIR")


REFERENCE = CASES / "cd-export" / "PT000000" / "ST000000" / "SE000000" / "IM000000"


def test_jpeg_ls_decodes_to_the_same_pixels_as_the_uncompressed_file():
    assert np.array_equal(load_image(CASES / "encoded" / "cr_chest_jpegls.dcm").pixels, load_image(REFERENCE).pixels)


@pytest.mark.parametrize("syntax", ["RLELossless", "JPEG2000Lossless"])
def test_rle_and_jpeg_2000_written_here_decode_to_the_same_pixels(tmp_path, syntax):
    import pydicom
    from pydicom import uid

    ds = pydicom.dcmread(REFERENCE)
    ds.compress(getattr(uid, syntax))
    path = tmp_path / f"{syntax}.dcm"
    ds.save_as(path)
    assert np.array_equal(load_image(path).pixels, load_image(REFERENCE).pixels)


def test_the_page_reads_an_extensionless_export_and_says_how_it_read_it(tiny_registry):
    from test_page_diagnose import drop, start_app

    data = (CASES / "window-fields" / "window_outside_pixel_values.dcm").read_bytes()
    at = drop(start_app(), ("IM000007", data, "application/octet-stream"))
    assert not at.error, [e.value for e in at.error]
    # how it was read is one click away (the "How the file was read" expander), in the loader's words
    notes = [m.value.replace("\\", "") for m in at.markdown if "pixel range" in m.value]
    assert notes and "lies outside the pixel values" in notes[0]
