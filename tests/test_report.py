"""Results that leave the screen (issue 17): PDF reports (pdftotext, pdftoppm), a worklist PDF, DICOM
Secondary Capture and structured report (dciodvfy, pydicom, highdicom), from the CLI and the page."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from conftest import FIXTURES, GENERATED

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = sorted((ROOT / "samples" / "NORMAL").glob("*.jp*g"))[0]
ADULT = sorted((FIXTURES / "external").glob("*.png"))[0]


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (CI installs it: .ci/run)")
    return path


def run_report(tmp_path, *args, env_extra=None):
    env = {"PYTHONPATH": str(ROOT), "XRAY_WEIGHTS": str(ROOT / "weights"), "XRAY_AUDIT_LOG": str(tmp_path / "audit.jsonl"),
           "PATH": "/usr/bin:/bin", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "xray", "report", *map(str, args)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def unicode_dicom(tmp_path_factory) -> Path:
    ds = pydicom.dcmread(GENERATED / "chest.dcm")
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Müller^Zoë^^^肺"
    ds.PatientID = "PAT-ÅÄÖ-7"
    ds.PatientBirthDate = "20210304"
    ds.PatientAge = "003Y"
    from pydicom.uid import generate_uid

    ds.SOPClassUID = ds.get("SOPClassUID") or "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = tmp_path_factory.mktemp("dicom") / "child.dcm"
    ds.save_as(path)
    return path


@pytest.mark.slow
def test_pdf_report_states_result_version_intended_use_and_renders(tmp_path):
    pdftotext, pdftoppm = need("pdftotext"), need("pdftoppm")
    out = tmp_path / "out"
    result = run_report(tmp_path, SAMPLE, ADULT, "--out", out)
    assert result.returncode == 0, result.stderr
    text = subprocess.run([pdftotext, str(out / f"{SAMPLE.stem}.pdf"), "-"], capture_output=True, text=True).stdout
    from xray.model.registry import Registry

    model = Registry(ROOT / "weights").load()
    assert "p(pneumonia)" in text and f"at threshold {model.default_threshold:.6f}" in text
    assert f"Model version {model.version}" in text and "Intended use:" in text and "not a diagnosis" in text
    assert "sensitivity" in text and "prevalence" in text and "SHA-256" in text
    adult = subprocess.run([pdftotext, str(out / f"{ADULT.stem}.pdf"), "-"], capture_output=True, text=True).stdout
    assert "No verdict (outside intended use)" in adult and "Read the film without the model" in adult
    worklist = subprocess.run([pdftotext, str(out / "worklist.pdf"), "-"], capture_output=True, text=True).stdout
    assert worklist.index(SAMPLE.name) < worklist.index(ADULT.name)  # verdicts first, by p(pneumonia)
    subprocess.run([pdftoppm, "-r", "40", "-png", "-f", "1", "-l", "1", str(out / f"{SAMPLE.stem}.pdf"),
                    str(tmp_path / "page")], check=True)
    page = next(tmp_path.glob("page*.png"))
    from PIL import Image

    with Image.open(page) as image:
        assert image.size[0] > 200 and len(set(image.convert("L").getdata())) > 50  # pictures, not a blank page
    assert (tmp_path / "audit.jsonl").read_text().count('"shown_in":"report"') == 2


@pytest.mark.slow
def test_existing_reports_are_not_overwritten_without_force(tmp_path):
    out = tmp_path / "out"
    assert run_report(tmp_path, SAMPLE, "--out", out).returncode == 0
    before = (out / f"{SAMPLE.stem}.pdf").read_bytes()
    again = run_report(tmp_path, SAMPLE, "--out", out)
    assert again.returncode != 0 and "exist already" in again.stderr and "--force" in again.stderr
    assert (out / f"{SAMPLE.stem}.pdf").read_bytes() == before
    assert run_report(tmp_path, SAMPLE, "--out", out, "--force").returncode == 0


@pytest.mark.slow
def test_dicom_results_validate_belong_to_the_study_and_reference_the_source(tmp_path, unicode_dicom):
    dciodvfy, pdftotext = need("dciodvfy"), need("pdftotext")
    import highdicom as hd

    out = tmp_path / "out"
    result = run_report(tmp_path, unicode_dicom, SAMPLE, "--out", out, "--dicom")
    assert result.returncode == 0, result.stderr
    source = pydicom.dcmread(unicode_dicom)
    for path in sorted(out.glob("*.dcm")):
        check = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True)
        errors = [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]
        assert not errors, (path.name, errors)
    sc, sr = pydicom.dcmread(out / "child.sc.dcm"), pydicom.dcmread(out / "child.sr.dcm")
    assert sc.StudyInstanceUID == sr.StudyInstanceUID == source.StudyInstanceUID
    assert sc.SeriesInstanceUID != source.SeriesInstanceUID and sc.SOPInstanceUID != source.SOPInstanceUID
    assert str(sc.PatientName) == str(source.PatientName) == "Müller^Zoë^^^肺"  # Unicode round trip
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert evidence.ReferencedSOPInstanceUID == source.SOPInstanceUID
    report = hd.sr.ComprehensiveSR.from_dataset(sr)
    meanings = {str(item.ConceptNameCodeSequence[0].CodeMeaning) for item in report.ContentSequence}
    assert meanings  # read back with highdicom
    values = []

    def walk(dataset):
        for element in dataset:
            if element.VR == "SQ":
                for item in element.value:
                    walk(item)
            else:
                values.append(str(element.value))

    walk(sr)
    assert {"233604007", "122157", "Probability", "122411", "Threshold Value", "Algorithm Name",
            "Pneumonia X-ray assistant CNN"} <= set(values)
    pdf = subprocess.run([pdftotext, str(out / "child.pdf"), "-"], capture_output=True, text=True).stdout
    assert "Müller^Zoë^^^肺" in pdf and "PAT-ÅÄÖ-7" in pdf and "20210304" in pdf
    png_sc = pydicom.dcmread(out / f"{SAMPLE.stem}.sc.dcm")
    assert png_sc.StudyInstanceUID != source.StudyInstanceUID and "new study" in png_sc.SeriesDescription
    assert not (out / f"{SAMPLE.stem}.pdf").read_bytes().count(b"Patient ID")


def test_the_page_offers_report_downloads_that_match_the_screen(tiny_registry, unicode_dicom):
    from test_page_diagnose import drop, start_app, upload

    at = drop(start_app(), upload(unicode_dicom, mime="application/dicom"))
    labels = sorted(b.label for b in at.download_button)
    assert "Download report (PDF)" in labels and "Download DICOM results" in labels
    at = drop(start_app(), upload(unicode_dicom, mime="application/dicom"), upload(SAMPLE))
    assert "Download worklist report (PDF)" in [b.label for b in at.download_button]


def test_worklist_pdf_says_the_disclaimer_once_per_page_and_a_withheld_reason_in_the_screens_words(tmp_path):
    """The worklist PDF: the table page and each image's page end with the disclaimer, once; a withheld film's
    result line reads as the screen's (``guard.plain_reason``: no "feature distance 74.0; limit 41.8"), the
    measurements on a separate "Details" line, as under the screen's Details."""
    pdftotext = need("pdftotext")
    from xray.model.registry import Registry
    from xray.report import writers
    from xray.serve import analysis
    from xray.serve.guard import plain_reason

    model = Registry(ROOT / "weights").load()
    films = [analysis.analyse(model, path.read_bytes(), path.name) for path in (SAMPLE, ADULT)]
    adult = films[1].prediction
    assert adult.withheld and "(" in adult.withheld_reason  # the adult film is withheld, with its measurements
    items = [writers.ReportInput(a, model.default_threshold, 0.3) for a in films]
    (tmp_path / "worklist.pdf").write_bytes(writers.worklist_pdf_bytes(model, items))
    pages = subprocess.run([pdftotext, str(tmp_path / "worklist.pdf"), "-"], capture_output=True,
                           text=True).stdout.split("\f")
    pages = [" ".join(page.split()) for page in pages if page.strip()]
    assert len(pages) == 3  # the table, then one page per film
    for page in pages:
        assert page.count("Decision support, not a diagnosis") == 1, page
    table, adult_page = pages[0], pages[2]
    plain = " ".join(plain_reason(adult.withheld_reason).split())
    assert f"No verdict ({adult.outcome}): {plain}" in table and f"No verdict ({adult.outcome}): {plain}" in adult_page
    measured = adult.withheld_reason[adult.withheld_reason.index("(") + 1:adult.withheld_reason.index(")")]
    assert measured not in table  # the table gives the clinician's words only
    assert "Details:" in adult_page and " ".join(measured.split()) in adult_page
    assert adult_page.index(plain) < adult_page.index("Details:")
