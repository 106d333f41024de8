"""Field cases, round 3 (issue 24): an interrupted transfer, the header's words for the chest, names that
are not UTF-8, folders behind links, ZIP archives, an odd JPEG scan header, a film exported as a negative,
and DICOM results from inputs in any character set. Fixtures are built here from committed files
(tests/fixtures/generated, tests/fixtures/field-cases; attribution in their READMEs), except the 12-bit
JPEG file, built by tests/make_round3_fixtures.py."""
from __future__ import annotations

import contextlib
import csv
import io
import os
import re
import shutil
import subprocess
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from conftest import DATASET, FIXTURES, FULLRES, GENERATED
from xray.io.folders import LINK_LOOP, scan_dataset
from xray.io.loader import IncompleteFileError, NotAnImageError, ZIP_ARCHIVE, load_image
from xray.model.card import DEFAULT_SPEC
from xray.model.registry import Registry
from xray.serve import guard
from xray.serve.inference import predict

ROOT = Path(__file__).resolve().parent.parent
CASES = FIXTURES / "field-cases"
SAMPLE = sorted((ROOT / "samples" / "NORMAL").glob("*.jp*g"))[0]
DECODER_NAMES = ("pylibjpeg", "pyjpegls", "pillow", "gdcm", "openjpeg", "libjpeg", "Traceback", "Error:")


@pytest.fixture(scope="module")
def shipped():
    return Registry(ROOT / "weights").load()


def child_dicom(path: Path, **fields) -> Path:
    """The generated child's chest CR (tests/fixtures/generated/chest.dcm) with an image SOP class, UIDs
    and the given fields."""
    ds = pydicom.dcmread(GENERATED / "chest.dcm")
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.PatientAge = "003Y"
    for key, value in fields.items():
        if value is None:
            if key in ds:
                delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def run_cli(*args) -> tuple[int, str]:
    """``python -m xray ARGS`` in this process (the tiny registry's model): (exit status, stderr)."""
    from xray.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, err.getvalue()


def csv_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# -- an interrupted transfer (F03) -----------------------------------------------------------------------
def cut(source: Path, fraction: float, target: Path) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[:int(len(data) * fraction)])
    return target


@pytest.mark.parametrize("source, fraction", [
    (CASES / "encoded" / "cr_chest_jpegls.dcm", 0.5),  # F03: encapsulated pixel data without its delimiter
    (GENERATED / "chest.dcm", 0.5),  # native pixel data cut short
    (GENERATED / "chest.dcm", 0.3),
    (CASES / "headerless-cr" / "CR-MONO1-10-chest", 0.0016),  # an ACR-NEMA header cut inside an element
    (FIXTURES / "bad" / "truncated.png", 1.0),
])
def test_an_interrupted_transfer_is_an_incomplete_file_to_send_again(tmp_path, source, fraction):
    path = cut(source, fraction, tmp_path / source.name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the reader's own warning is not passed on
        with pytest.raises(IncompleteFileError) as caught:
            load_image(path)
    message = str(caught.value)
    assert caught.value.reason == "incomplete" and "incomplete" in message and "again" in message
    assert "not an image" not in message and "\n" not in message


def test_a_complete_object_without_an_image_is_not_an_image_not_incomplete(tmp_path):
    report = Dataset()
    report.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    report.SOPInstanceUID = generate_uid()
    report.Modality = "SR"
    report.file_meta = pydicom.dataset.FileMetaDataset()
    report.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    report.file_meta.MediaStorageSOPClassUID = report.SOPClassUID
    report.file_meta.MediaStorageSOPInstanceUID = report.SOPInstanceUID
    report.save_as(tmp_path / "report.dcm", enforce_file_format=True)
    with pytest.raises(NotAnImageError, match="no pixel data.*Basic Text SR") as caught:
        load_image(tmp_path / "report.dcm")
    assert caught.value.reason == "not an image" and not isinstance(caught.value, IncompleteFileError)


def test_the_cli_and_the_page_say_incomplete(tiny_registry, tmp_path):
    from xray.serve.analysis import analyse

    folder = tmp_path / "in"
    folder.mkdir()
    truncated = cut(CASES / "encoded" / "cr_chest_jpegls.dcm", 0.5, folder / "F03.dcm")
    shutil.copy(SAMPLE, folder / "z_after.jpeg")
    code, err = run_cli("predict", folder, "--csv", tmp_path / "out.csv", "--workers", "1")
    assert code == 0, err
    rows = {Path(r["path"]).name: r for r in csv_rows(tmp_path / "out.csv")}
    assert "incomplete" in rows["F03.dcm"]["error"] and "send or export it again" in rows["F03.dcm"]["error"]
    assert rows["z_after.jpeg"]["p_pneumonia"]  # the batch goes on
    assert "UserWarning" not in err
    page = analyse(Registry(tiny_registry).load(), truncated.read_bytes(), truncated.name)
    assert page.incomplete and page.error_reason == IncompleteFileError.reason and "incomplete" in page.error


# -- the header's words for the chest (F13) ------------------------------------------------------------
def test_thorax_is_the_chest_and_gets_the_same_verdict_as_chest(shipped, tmp_path):
    control = predict(shipped, [load_image(child_dicom(tmp_path / "chest.dcm", BodyPartExamined="CHEST"))])[0]
    thorax = predict(shipped, [load_image(child_dicom(tmp_path / "thorax.dcm", BodyPartExamined="THORAX"))])[0]
    assert thorax.outcome == control.outcome and thorax.p_pneumonia == pytest.approx(control.p_pneumonia, abs=1e-6)
    assert "THORAX" not in thorax.withheld_reason


def test_the_anatomic_region_sequence_is_read_where_body_part_is_absent(shipped, tmp_path):
    def region(value, scheme, meaning):
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
        return Sequence([item])

    chest = load_image(child_dicom(tmp_path / "a.dcm", BodyPartExamined=None,
                                   AnatomicRegionSequence=region("816094009", "SCT", "Chest")))
    assert chest.guard_fields["AnatomicRegionValue"] == "816094009"
    assert guard.header_outcome(chest.guard_fields, DEFAULT_SPEC) == (guard.VERDICT, "")
    hip = load_image(child_dicom(tmp_path / "b.dcm", BodyPartExamined=None,
                                 AnatomicRegionSequence=region("24136001", "SCT", "Hip joint")))
    outcome, reason = guard.header_outcome(hip.guard_fields, DEFAULT_SPEC)
    assert outcome == guard.NOT_A_CHEST_RADIOGRAPH and "Hip joint" in reason


@pytest.mark.parametrize("fields, outcome, words", [
    ({"BodyPartExamined": "THORAX"}, guard.VERDICT, ""),
    ({"BodyPartExamined": "chest"}, guard.VERDICT, ""),
    ({"BodyPartExamined": "PED CHEST"}, guard.VERDICT, ""),
    ({"AnatomicRegionValue": "T-D3000", "AnatomicRegionSchemeDesignator": "SRT"}, guard.VERDICT, ""),
    ({"BodyPartExamined": "BRUSTKORB"}, guard.OUTSIDE_INTENDED_USE, "body part BRUSTKORB"),
    ({"BodyPartExamined": "LUNG"}, guard.OUTSIDE_INTENDED_USE, "body part LUNG"),
    ({"BodyPartExamined": "HIP"}, guard.NOT_A_CHEST_RADIOGRAPH, "body part HIP"),
    ({"BodyPartExamined": "SKULL"}, guard.NOT_A_CHEST_RADIOGRAPH, "body part SKULL"),
    ({"Modality": "MR"}, guard.NOT_A_CHEST_RADIOGRAPH, "modality MR"),
    ({"Modality": "US"}, guard.NOT_A_CHEST_RADIOGRAPH, "modality US"),
    ({"Modality": "XC"}, guard.NOT_A_CHEST_RADIOGRAPH, "modality XC"),
    ({"Modality": "OT", "ConversionType": "SD"}, guard.NOT_A_CHEST_RADIOGRAPH, "scanned document"),
    ({"Modality": "RG"}, guard.VERDICT, ""),
    ({"Modality": "OT", "ConversionType": "DF"}, guard.VERDICT, ""),
    ({"Modality": "RF"}, guard.OUTSIDE_INTENDED_USE, "modality RF"),
    ({"Modality": "XR"}, guard.OUTSIDE_INTENDED_USE, "modality XR"),
    ({"Modality": "OT"}, guard.OUTSIDE_INTENDED_USE, "modality OT"),
])
def test_unknown_header_words_are_outside_intended_use_and_only_evidence_says_not_a_chest(fields, outcome, words):
    got, reason = guard.header_outcome(fields, DEFAULT_SPEC)
    assert got == outcome and words in reason
    if outcome == guard.OUTSIDE_INTENDED_USE:
        assert "not a chest" not in reason.lower()


def test_the_advice_matches_the_reason():
    assert "header" in guard.advice(guard.OUTSIDE_INTENDED_USE,
                                    guard.header_outcome({"Modality": "XR"}, DEFAULT_SPEC)[1])
    assert "not a photo" not in guard.advice(guard.OUTSIDE_INTENDED_USE, "the film looks inverted (a negative)")
    assert guard.advice(guard.NOT_A_CHEST_RADIOGRAPH, "x") == guard.WHAT_TO_DO[guard.NOT_A_CHEST_RADIOGRAPH]


# -- file names that are not UTF-8, folders behind links, ZIP archives ---------------------------------
def test_a_name_that_is_not_utf8_is_scored_escaped_and_resume_goes_on(tiny_registry, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    odd = os.fsdecode(str(folder).encode() + b"/Thorax_Kind_M\xfcller.jpg")
    shutil.copy(SAMPLE, odd)
    shutil.copy(SAMPLE, folder / "z_after.jpeg")
    out = tmp_path / "out.csv"
    code, err = run_cli("predict", folder, "--csv", out, "--workers", "1")
    assert code == 0, err
    rows = csv_rows(out)
    assert [Path(r["path"]).name for r in rows] == ["Thorax_Kind_M\\xfcller.jpg", "z_after.jpeg"]
    assert all(r["p_pneumonia"] for r in rows)
    code, err = run_cli("predict", folder, "--csv", out, "--workers", "1", "--resume")
    assert code == 0, err
    assert len(csv_rows(out)) == 2 and "2 already in the CSV" in err


@pytest.fixture
def linked_layout(tmp_path) -> Path:
    """worklist/ with one film, study_001 -> ../real_store (two films, one in a subfolder that holds a
    link back to its parent: a loop), and a second link to the same store."""
    store, worklist = tmp_path / "real_store", tmp_path / "worklist"
    (store / "sub").mkdir(parents=True)
    worklist.mkdir()
    films = sorted(DATASET.rglob("*.jpeg"))
    shutil.copy(films[0], worklist / "first.jpeg")
    shutil.copy(films[1], store / "a.jpeg")
    shutil.copy(films[2], store / "sub" / "b.jpeg")
    (worklist / "study_001").symlink_to("../real_store")
    (worklist / "study_002").symlink_to("../real_store")
    (store / "sub" / "loop").symlink_to("..")
    with zipfile.ZipFile(worklist / "export.zip", "w") as archive:
        archive.write(films[0], "IM000001.jpeg")
    return worklist


def test_folders_behind_links_are_scored_once_and_loops_are_listed(tiny_registry, linked_layout, tmp_path):
    out = tmp_path / "out.csv"
    code, err = run_cli("predict", linked_layout, "--csv", out, "--workers", "1")
    assert code == 0, err
    names = [Path(r["path"]).relative_to(linked_layout).as_posix() for r in csv_rows(out)]
    assert names == ["first.jpeg", "study_001/a.jpeg", "study_001/sub/b.jpeg"]  # each real film once
    assert f"study_002: {LINK_LOOP}" in err and f"study_001/sub/loop: {LINK_LOOP}" in err
    assert f"export.zip: {ZIP_ARCHIVE}" in err


def test_a_labelled_folder_behind_a_link_is_found(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "NORMAL").symlink_to(DATASET / "NORMAL")
    (root / "PNEUMONIA").symlink_to(DATASET / "PNEUMONIA")
    scan = scan_dataset(root)
    assert len(scan.samples) == len(list(DATASET.rglob("*.jpeg")))


def test_a_zip_archive_is_named_as_such(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("IM000001.jpeg", SAMPLE.read_bytes())
    with pytest.raises(NotAnImageError, match=f"^{re.escape(ZIP_ARCHIVE)}$"):
        load_image(buffer.getvalue(), name="films.zip")


# -- an odd compressed stream ---------------------------------------------------------------------------
ODD_JPEG = CASES / "round3" / "jpeg_extended_12bit_se0.dcm"


def test_a_sequential_jpeg_with_a_nonconformant_scan_header_decodes_as_dcmtk_does(tmp_path):
    image = load_image(ODD_JPEG)
    assert any("scan header repaired" in note for note in image.notes)
    dcmdjpeg = shutil.which("dcmdjpeg")
    if dcmdjpeg is None:
        pytest.skip("dcmdjpeg (dcmtk) is not installed (CI installs it: .ci/run)")
    subprocess.run([dcmdjpeg, str(ODD_JPEG), str(tmp_path / "plain.dcm")], check=True, capture_output=True)
    from xray.io.loader import _decode_pixels  # the stored values, before any grey-level step

    ours = _decode_pixels(pydicom.dcmread(ODD_JPEG), []).astype(int)
    reference = pydicom.dcmread(tmp_path / "plain.dcm").pixel_array.astype(int)
    assert ours.shape == reference.shape and np.abs(ours - reference).max() <= 1  # IDCT rounding only


@pytest.mark.parametrize("name", ["dicom_jpeg2000.dcm", "dicom_jpegls.dcm"])
def test_damaged_streams_name_the_fault_not_the_decoder(name):
    with pytest.raises(ValueError) as caught:
        load_image(FIXTURES / "bad" / name)
    message = str(caught.value)
    assert "damaged" in message and not any(word.lower() in message.lower() for word in DECODER_NAMES)


# -- a film exported as a negative ---------------------------------------------------------------------
def test_a_film_exported_inverted_is_withheld_as_inverted(shipped, tmp_path):
    negative = tmp_path / "negative.png"
    Image.fromarray(255 - np.asarray(Image.open(SAMPLE).convert("L"))).save(negative)
    prediction = predict(shipped, [load_image(negative)])[0]
    assert prediction.withheld and prediction.outcome == guard.OUTSIDE_INTENDED_USE
    assert "looks inverted" in prediction.withheld_reason and "negative" in prediction.withheld_reason
    assert "bone is white" in guard.advice(prediction.outcome, prediction.withheld_reason)
    assert not predict(shipped, [load_image(SAMPLE)])[0].withheld


def test_the_negative_film_check_spares_the_fixtures_and_catches_their_negatives(shipped):
    from xray.io.preprocess import read_model_input

    films = sorted((ROOT / "samples").rglob("*.jp*g")) + sorted(FULLRES.iterdir()) + sorted(DATASET.rglob("*.jpeg")) \
        + sorted((FIXTURES / "external").glob("*.png")) + [CASES / "presentation-lut-inverse" / "control_cr_chest_mono1.dcm"]
    for path in films:
        pixels = read_model_input(path, shipped.image_size).pixels
        assert not guard.looks_inverted(pixels), path.name
        assert not guard.looks_inverted(np.rot90(pixels)), path.name  # a film on its side is not a negative
        assert guard.looks_inverted(255 - pixels), path.name


# -- DICOM results from any character set --------------------------------------------------------------
JIS_NAME = "Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B=\x1b$B$d$^$@\x1b(B^\x1b$B$?$m$&\x1b(B".encode("latin-1")
CHARACTER_SETS = {  # case: (Specific Character Set, Patient's Name bytes, the name as it reads)
    "undeclared-latin1": (None, "Müller^Zoë".encode("latin-1"), "Müller^Zoë"),
    "iso-ir-100": ("ISO_IR 100", "Müller^Zoë".encode("latin-1"), "Müller^Zoë"),
    "iso-ir-192": ("ISO_IR 192", "Müller^Zoë^^^肺".encode("utf-8"), "Müller^Zoë^^^肺"),
    "iso-2022-ir-87": (["", "ISO 2022 IR 87"], JIS_NAME, "Yamada^Tarou=山田^太郎=やまだ^たろう"),
}


@pytest.mark.parametrize("case", sorted(CHARACTER_SETS))
def test_dicom_results_are_valid_whatever_the_input_character_set(shipped, tmp_path, case):
    dciodvfy = shutil.which("dciodvfy")
    if dciodvfy is None:
        pytest.skip("dciodvfy is not installed (CI installs it: .ci/run)")
    from xray.report import writers as R
    from xray.serve.analysis import analyse

    charset, raw_name, expected = CHARACTER_SETS[case]
    source = child_dicom(tmp_path / "in.dcm", SpecificCharacterSet=charset, PatientName=raw_name,
                         PatientID="0000", PatientBirthDate="20210304", StudyDate="20240101", StudyTime="120000",
                         StudyID="1", ReferringPhysicianName="", AccessionNumber="")
    data = source.read_bytes()
    header = R.read_dicom_header(data)
    item = R.ReportInput(analyse(shipped, data, source.name), shipped.default_threshold, 0.5, header)
    sc = R.secondary_capture(shipped, item)
    outputs = {"sc": R.dicom_bytes(sc), "sr": R.dicom_bytes(R.structured_report(shipped, item, header))}
    for kind, written in outputs.items():
        path = tmp_path / f"{case}.{kind}.dcm"
        path.write_bytes(written)
        check = subprocess.run([dciodvfy, str(path)], capture_output=True)
        errors = [line for line in (check.stdout + check.stderr).decode("utf-8", "replace").splitlines()
                  if line.startswith("Error")]
        assert not errors, (kind, errors)
        result = pydicom.dcmread(path)
        assert result.SpecificCharacterSet == "ISO_IR 192" and str(result.PatientName) == expected
    assert b"99XRAYAI" not in outputs["sr"] and b"122157" in outputs["sr"] and b"122411" in outputs["sr"]
