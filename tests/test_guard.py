"""The intended-use guard (issue 13): three outcomes never confused, the DICOM header read first, the
image checks on the shipped version, and "withheld means withheld" on the page and in the CLI."""
from __future__ import annotations

import csv
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from conftest import FIXTURES, FULLRES, GENERATED
from xray.serve import guard
from xray.io.loader import load_image
from xray.serve.inference import predict
from xray.model.registry import Registry

ROOT = Path(__file__).resolve().parent.parent
EXTERNAL = sorted((FIXTURES / "external").glob("*.png"))  # adult films from another hospital (ATTRIBUTION.md)


@pytest.fixture(scope="module")
def shipped():
    return Registry(ROOT / "weights").load()


def dicom_with(tmp_path: Path, name: str, **fields) -> Path:
    ds = pydicom.dcmread(GENERATED / "chest.dcm")
    for key, value in fields.items():
        setattr(ds, key, value)
    path = tmp_path / name
    ds.save_as(path)
    return path


def test_age_from_patient_age_or_from_birth_and_study_dates():
    assert guard.age_in_years({"PatientAge": "062Y"}) == 62
    assert guard.age_in_years({"PatientAge": "030M"}) == pytest.approx(2.5)
    assert guard.age_in_years({"PatientBirthDate": "20200115", "StudyDate": "20230116"}) == pytest.approx(3.0, abs=0.01)
    assert guard.age_in_years({"PatientAge": ""}) is None and guard.age_in_years({}) is None


@pytest.mark.parametrize("fields, outcome, words", [
    ({"PatientAge": "062Y", "ViewPosition": "PA"}, guard.OUTSIDE_INTENDED_USE, "62 years old"),
    ({"ViewPosition": "LL"}, guard.OUTSIDE_INTENDED_USE, "a lateral view"),
    ({"PatientAge": "", "PatientBirthDate": "19500101", "StudyDate": "20240101"}, guard.OUTSIDE_INTENDED_USE,
     "74 years old"),
    ({"Modality": "CT"}, guard.NOT_A_CHEST_RADIOGRAPH, "modality CT"),
    ({"BodyPartExamined": "HIP"}, guard.NOT_A_CHEST_RADIOGRAPH, "body part HIP"),
])
def test_the_dicom_header_withholds_with_its_reason(tiny_model, tmp_path, fields, outcome, words):
    prediction = predict(tiny_model, [load_image(dicom_with(tmp_path, "x.dcm", **fields))])[0]
    assert prediction.withheld and prediction.outcome == outcome and words in prediction.withheld_reason
    assert prediction.decision(0.5) is None


def test_a_child_in_the_age_band_falls_through_to_the_image_checks(tiny_model, tmp_path):
    prediction = predict(tiny_model, [load_image(dicom_with(tmp_path, "x.dcm", PatientAge="003Y", ViewPosition="AP"))])[0]
    assert "DICOM header" not in prediction.withheld_reason


def test_adult_films_from_another_hospital_are_outside_intended_use_never_not_a_chest_radiograph(shipped):
    for path in EXTERNAL:
        prediction = predict(shipped, [load_image(path)])[0]
        assert prediction.outcome == guard.OUTSIDE_INTENDED_USE, (path.name, prediction.withheld_reason)
        assert "not a chest" not in prediction.withheld_reason.lower()


def test_the_shipped_guard_gives_a_verdict_on_the_pediatric_samples(shipped):
    for path in sorted((ROOT / "samples").rglob("*.jp*g")) + sorted(FULLRES.iterdir()):
        assert predict(shipped, [load_image(path)])[0].outcome == guard.VERDICT, path.name


@pytest.mark.slow
def test_cli_three_outcomes(tmp_path):
    photo = tmp_path / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((400, 300)).save(photo)
    sample = sorted((ROOT / "samples" / "NORMAL").glob("*.jp*g"))[0]
    env = {"PYTHONPATH": str(ROOT), "XRAY_WEIGHTS": str(ROOT / "weights"), "XRAY_AUDIT_LOG": "off", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-m", "xray", "predict", str(sample), str(EXTERNAL[0]), str(photo)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = {Path(r["path"]).name: r for r in csv.DictReader(io.StringIO(result.stdout))}
    assert rows[sample.name]["label"] in ("NORMAL", "PNEUMONIA", "BORDERLINE") and not rows[sample.name]["error"]
    adult = rows[EXTERNAL[0].name]
    assert adult["label"] == "" and adult["p_pneumonia"] and adult["error"].startswith("outside intended use: ")
    assert rows["photo.png"]["label"] == "" and rows["photo.png"]["error"].startswith("not a chest radiograph: ")


def test_the_page_shows_three_outcomes_and_withheld_means_withheld(tmp_path, monkeypatch):
    from test_page_diagnose import drop, start_app, upload

    monkeypatch.setenv("XRAY_WEIGHTS", str(ROOT / "weights"))
    monkeypatch.setenv("XRAY_DATA", str(tmp_path))
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((400, 300)).save(photo)
    sample = sorted((ROOT / "samples" / "NORMAL").glob("*.jp*g"))[0]
    at = drop(start_app(), upload(sample))
    assert [m for m in at.metric if m.label == "p(pneumonia)"] and not at.warning
    at = drop(start_app(), upload(EXTERNAL[0], mime="image/png"))
    assert "Outside the intended use" in at.warning[0].value and "not a chest" not in at.warning[0].value.lower()
    assert not [m for m in at.metric if m.label == "p(pneumonia)"]  # no probability by default,
    assert not [m for m in at.markdown if "-background[" in m.value]  # no decision colour,
    assert not at.toggle  # and no heatmap
    assert any("not for clinical use" in e.label for e in at.expander)
    at = drop(start_app(), upload(photo, mime="image/png"))
    assert "Not a chest radiograph" in at.warning[0].value
