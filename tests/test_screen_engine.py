"""The engine behind the pages' screens (issues 21 and 26): audited site choices, the prevalence rule,
downloads recorded before they are built (withheld means withheld), the DICOM results zip, the patient fields
the screen and the PDF share, the gate's shortfall said before work, rollback only to versions live here,
and one set of site-calibration figures."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from conftest import DATASET, FULLRES, GENERATED
from xray.decide.prevalence import ESTIMATE_MIN_IMAGES, estimate_if_enough
from xray.govern import promotion, siteconfig
from xray.govern.audit import AuditTrail
from xray.model.registry import Registry
from xray.report import exports, writers
from xray.serve import analysis
from xray.serve.pipeline import CSV_HEADER


def audit_lines() -> list[dict]:
    path = Path(os.environ["XRAY_AUDIT_LOG"])
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_siteconfig_change_the_settings_and_leave_one_audit_line_each(tiny_registry):
    registry = Registry(tiny_registry)
    version = registry.active_version()
    card_threshold = registry.card(version).threshold
    from xray.govern.identity import ADMINISTRATOR, Actor

    dr = Actor("s-ward", "dr.ward@ward.example", ADMINISTRATOR, "http://idp.example")
    saved = siteconfig.save_threshold(registry, version, 0.25, "local audit", actor=dr)
    assert registry.site.saved_threshold(version).threshold == 0.25 == saved.threshold
    assert {k: audit_lines()[-1][k] for k in ("event", "version", "threshold", "why")} == {
        "event": "threshold-saved", "version": version, "threshold": 0.25, "why": "local audit"}
    with pytest.raises(ValueError):
        siteconfig.save_threshold(registry, version, 1.5, "typo", actor=dr)
    count = len(audit_lines())
    assert siteconfig.restore_threshold(registry, version, actor=dr)
    assert registry.site.saved_threshold(version) is None and registry.load().default_threshold == card_threshold
    assert audit_lines()[-1]["event"] == "threshold-restored" and len(audit_lines()) == count + 1
    assert not siteconfig.restore_threshold(registry, version, actor=dr)  # nothing to restore: no line
    assert len(audit_lines()) == count + 1
    assert siteconfig.site_prevalence(registry, registry.card(version)) == registry.card(version).calibration_prevalence
    siteconfig.save_prevalence(registry, 0.3, actor=dr)
    assert siteconfig.site_prevalence(registry, registry.card(version)) == 0.3
    assert audit_lines()[-1]["event"] == "prevalence-saved" and audit_lines()[-1]["prevalence"] == 0.3


def test_the_prevalence_estimate_is_offered_from_its_minimum():
    scores = np.linspace(0.05, 0.95, ESTIMATE_MIN_IMAGES)
    assert estimate_if_enough(scores[:-1], 0.5) is None
    assert 0.0 < estimate_if_enough(scores, 0.5) < 1.0


@pytest.fixture
def worklist(tiny_model):
    """Three films: a verdict, one withheld (outside the intended use), one unreadable."""
    films = [(FULLRES / "NORMAL2-IM-1438-0001.jpeg"), (DATASET / "PNEUMONIA" / "person1000_bacteria_2931.jpeg")]
    analyses = [analysis.analyse(tiny_model, f.read_bytes(), f.name) for f in films]
    flagged = analyses[1].prediction
    analyses[1].prediction = replace(flagged, withheld_reason="unlike the training films (distance 9.0)",
                                     outcome="outside intended use")
    analyses.append(analysis.analyse(tiny_model, (GENERATED / "truncated.jpeg").read_bytes(), "truncated.jpeg"))
    return analyses


def test_worklist_csv_withholds_p_of_withheld_films_and_is_recorded(tiny_model, worklist, tmp_path):
    trail = AuditTrail(tmp_path / "audit.jsonl")
    text = exports.worklist_csv(worklist, 0.5, (0.5, 0.3), trail)
    rows = {r["path"]: r for r in csv.DictReader(io.StringIO(text))}
    assert list(csv.reader(io.StringIO(text)))[0] == CSV_HEADER
    withheld = rows[worklist[1].name]
    assert withheld["p_pneumonia"] == "" and withheld["p_pneumonia_at_prevalence"] == "" and withheld["label"] == ""
    assert withheld["error"].startswith("outside intended use")
    assert rows[worklist[0].name]["p_pneumonia"] != "" and rows[worklist[0].name]["label"] in ("PNEUMONIA", "NORMAL")
    logged = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert sorted(e["sha256"] for e in logged) == sorted(a.sha256 for a in worklist[:2])  # scored rows only
    assert {e["shown_in"] for e in logged} == {"csv"}


def test_downloads_are_recorded_before_they_are_built(tiny_model, worklist, tmp_path):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")  # the log's parent is a file: it cannot be written
    item = writers.ReportInput(worklist[0], 0.5, 0.5)
    with pytest.raises(OSError):
        exports.report_pdf(tiny_model, item, AuditTrail(blocked / "audit.jsonl"))
    trail = AuditTrail(tmp_path / "audit.jsonl")
    assert exports.report_pdf(tiny_model, item, trail).startswith(b"%PDF")
    assert json.loads((tmp_path / "audit.jsonl").read_text())["shown_in"] == "report"


def test_dicom_results_zip_holds_the_sc_and_sr_in_the_inputs_study(tiny_model, tmp_path):
    import pydicom


    data = (GENERATED / "chest.dcm").read_bytes()
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"  # results need the input's study and series
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    buffer = io.BytesIO()
    ds.save_as(buffer)
    data = buffer.getvalue()
    a = analysis.analyse(tiny_model, data, "chest.dcm")
    item = writers.ReportInput(a, 0.5, 0.5, writers.read_dicom_header(data))
    archive = zipfile.ZipFile(io.BytesIO(exports.dicom_results(tiny_model, item, AuditTrail(tmp_path / "a.jsonl"))))
    assert sorted(archive.namelist()) == ["chest.sc.dcm", "chest.sr.dcm"]
    for name in archive.namelist():
        assert pydicom.dcmread(io.BytesIO(archive.read(name))).StudyInstanceUID == ds.StudyInstanceUID
    withheld = replace(item, analysis=replace(a, prediction=replace(a.prediction, outcome="outside intended use",
                                                                    withheld_reason="adult")))
    sr = writers.structured_report(tiny_model, withheld, withheld.dicom)
    assert "122157" not in str(sr) and "122411" in str(sr)  # no Probability, the Threshold Value: withheld means withheld
    with pytest.raises(ValueError, match="DICOM inputs only"):
        exports.dicom_results(tiny_model, replace(item, dicom=None), AuditTrail(tmp_path / "a.jsonl"))


def test_patient_fields_are_what_the_dicom_carries_and_what_the_pdf_prints(tiny_model):
    data = (GENERATED / "chest.dcm").read_bytes()
    fields = dict(writers.read_patient(data))
    assert list(fields) == ["Patient", "Patient ID", "Birth date", "Study date", "Accession number"]
    assert fields["Patient"] == "Test^Fixture"
    assert writers.read_patient((FULLRES / "NORMAL2-IM-1438-0001.jpeg").read_bytes()) == []
    a = analysis.analyse(tiny_model, data, "chest.dcm")
    item = writers.ReportInput(a, 0.5, 0.5, None, writers.read_patient(data))
    assert writers._patient_lines(item)[0] == "Patient: Test^Fixture"


def test_the_gates_shortfall_is_one_wording_before_and_after():
    assert promotion.acceptance_shortfall(promotion.MIN_PER_CLASS, promotion.MIN_ACCEPTANCE_IMAGES) == ""
    assert "the gate needs at least 200 with 50 of each class" in promotion.acceptance_shortfall(30, 300)
    assert promotion.acceptance_shortfall(100, 99) != ""  # 199 images


def test_rollback_never_goes_to_a_version_that_was_only_live_where_the_model_was_built(tiny_registry, tmp_path):
    shipped = tmp_path / "shipped"
    shutil.copytree(tiny_registry, shipped)
    version = Registry(shipped).active_version()
    marker = json.loads((shipped / "active.json").read_text())
    (shipped / "active.json").write_text(json.dumps({**marker, "history": [version, "20200101-000000-elsewhere"]}))
    site = Registry(tmp_path / "site", shipped=shipped)
    assert site.active_version() == version and site.history() == []
    with pytest.raises(ValueError, match="no earlier model version"):
        site.rollback()


def test_site_calibration_preview_card_and_gate_read_one_set_of_figures(tiny_registry, tmp_path, monkeypatch):
    from xray.govern import sitecal
    from xray.govern.identity import operator

    monkeypatch.setattr(promotion, "MIN_PER_CLASS", 4)  # the one minimum: the gate's
    monkeypatch.setattr(promotion, "MIN_ACCEPTANCE_IMAGES", 8)
    registry = Registry(tiny_registry)
    model = registry.load()
    result = sitecal.recalibrate(model, sitecal.score_folder(model, str(DATASET)), "youden")  # no promise: fits 16
    new = sitecal.write_version(registry, model, result, actor=operator())
    figures = promotion.acceptance_figures(registry.card(new))
    assert registry.card(new).threshold == result.threshold
    assert figures["sensitivity"].value == pytest.approx(result.after["sensitivity"])
    assert figures["specificity"].value == pytest.approx(result.after["specificity"])


def test_a_16_bit_jpeg_2000_film_has_one_orientation_on_screen_in_the_worklist_and_in_the_report(tiny_model):
    """Field case 3 (tests/fixtures/field-cases): the screen, the worklist thumbnail and the PDF's pictures
    all come from one decoded array (``analysis.display_pixels``): none is turned against another."""
    import base64

    from PIL import Image

    data = (Path(__file__).parent / "fixtures" / "field-cases" / "jpeg2000-lossless-16bit"
            / "JPEG2KLossless_1s_1f_u_16_16.dcm").read_bytes()
    a = analysis.analyse(tiny_model, data, "j2k.dcm")
    screen = analysis.display_pixels(a.image).astype(np.float64)
    thumb = np.asarray(Image.open(io.BytesIO(base64.b64decode(analysis.thumbnail_data_uri(a.image).split(",")[1]))),
                       dtype=np.float64)
    film, _ = writers._pictures(tiny_model, writers.ReportInput(a, 0.5, 0.5))
    small = np.asarray(Image.fromarray(screen.astype(np.uint8)).resize(thumb.shape[::-1], Image.BILINEAR), np.float64)

    def corr(x, y):
        return float(np.corrcoef(x.ravel(), y.ravel())[0, 1])

    assert corr(thumb, small) > 0.99 and corr(thumb, small) > corr(thumb, np.rot90(small)) + 0.2
    assert np.array_equal(np.asarray(film), screen.astype(np.uint8))
