"""The audit log: one JSON line per analysed upload, no names, pixels or patient fields; safe appends;
and uploads never written to disk."""
from __future__ import annotations

import builtins
import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from conftest import FIXTURES, FULLRES
from xray.serve import analysis
from xray.govern import audit

DICOM = FIXTURES / "bad" / "dicom_monochrome2.dcm"  # carries PatientName Doe^Jane, PatientID PATIENT-12345
XRAY = FULLRES / "NORMAL2-IM-1438-0001.jpeg"


@pytest.fixture
def log(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "audit" / "audit.jsonl"
    monkeypatch.setenv("XRAY_AUDIT_LOG", str(path))
    return path


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_shown_result_writes_exactly_one_line_with_the_audit_fields(tiny_model, log):
    data = DICOM.read_bytes()
    result = analysis.analyse(tiny_model, data, "Doe_Jane chest 2024.dcm")
    assert result.ok and not log.exists()  # analysing is not showing: nothing logged yet
    trail = audit.AuditTrail()
    threshold = 0.123456789
    entry = trail.shown(result.sha256, result.prediction, threshold)
    [line] = _lines(log)
    assert line == entry and tuple(line) == audit.FIELDS
    assert line["sha256"] == hashlib.sha256(data).hexdigest()
    assert line["model_version"] == tiny_model.version
    assert line["p_pneumonia"] == pytest.approx(result.prediction.p_pneumonia, abs=1e-6)
    assert line["threshold"] == threshold  # exactly the value in force, not rounded
    assert line["withheld"] is result.prediction.withheld
    assert line["decision"] == result.prediction.decision(threshold)
    assert line["outcome"] == result.prediction.outcome
    assert line["time"].endswith("+00:00")
    raw = log.read_text()
    for secret in ("Doe_Jane", "chest 2024", ".dcm", "Doe^Jane", "PATIENT-12345", "CHEST", "003Y"):
        assert secret not in raw


def test_each_distinct_threshold_and_decision_is_logged_once_per_session(tiny_model, log):
    from xray.serve.inference import Prediction

    trail = audit.AuditTrail()
    sha = "a" * 64
    p = Prediction(0.5, tiny_model.version)
    assert trail.shown(sha, p, 0.734)["decision"] == "NORMAL"
    assert trail.shown(sha, p, 0.734) is None  # a rerun shows the same thing: no new line
    assert trail.shown(sha, p, 0.30)["decision"] == "PNEUMONIA"  # moved threshold: its own line
    assert trail.shown(sha, p, 0.734) is None
    assert [(e["threshold"], e["decision"]) for e in _lines(log)] == [(0.734, "NORMAL"), (0.30, "PNEUMONIA")]


def test_unreadable_files_are_not_predictions_and_write_nothing(tiny_model, log):
    result = analysis.analyse(tiny_model, b"not an image", "letter.png")
    assert result.error and not log.exists()


def test_withheld_images_are_logged_without_a_decision_and_with_the_reason(tiny_model, log, tmp_path):
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(2)
    path = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((400, 300)).save(path)
    result = analysis.analyse(tiny_model, path.read_bytes(), "photo.png")
    assert result.prediction.withheld
    audit.AuditTrail().shown(result.sha256, result.prediction, 0.5)
    [entry] = _lines(log)
    assert entry["withheld"] is True and entry["decision"] is None and entry["outcome"] == result.prediction.outcome != "verdict"
    assert entry["reason"] == result.prediction.withheld_reason


def test_audit_can_be_switched_off(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("XRAY_AUDIT_LOG", "off")
    assert audit.audit_path() is None
    result = analysis.analyse(tiny_model, XRAY.read_bytes(), XRAY.name)
    assert audit.AuditTrail().shown(result.sha256, result.prediction, 0.5) is None


def test_default_path_is_the_user_data_folder_outside_the_repository(monkeypatch, tmp_path):
    monkeypatch.delenv("XRAY_AUDIT_LOG", raising=False)
    monkeypatch.delenv("XRAY_DATA", raising=False)
    root = Path(__file__).resolve().parent.parent
    path = audit.audit_path()
    assert path.name == "audit.jsonl" and not path.resolve().is_relative_to(root)
    monkeypatch.setenv("XRAY_DATA", str(tmp_path))
    assert audit.audit_path() == tmp_path / "audit.jsonl"


def test_an_unwritable_log_raises_so_the_page_withholds_the_result(tiny_model, tmp_path, monkeypatch):
    blocker = tmp_path / "file-not-folder"
    blocker.write_text("")
    monkeypatch.setenv("XRAY_AUDIT_LOG", str(blocker / "audit.jsonl"))
    result = analysis.analyse(tiny_model, XRAY.read_bytes(), XRAY.name)
    trail = audit.AuditTrail()
    with pytest.raises(OSError):
        trail.shown(result.sha256, result.prediction, 0.5)
    assert not trail.logged  # a later retry writes it


def test_uploads_never_touch_the_disk(tiny_model, log, monkeypatch):
    """Every file opened for writing while analysing and showing uploads is the audit log."""
    written: list[str] = []
    real_open, real_os_open = builtins.open, os.open

    def spy_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            written.append(str(file))
        return real_open(file, mode, *args, **kwargs)

    def spy_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            written.append(str(path))
        return real_os_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    trail = audit.AuditTrail()
    for source in (DICOM, XRAY):
        result = analysis.analyse(tiny_model, source.read_bytes(), source.name)
        trail.shown(result.sha256, result.prediction, 0.5)
    assert written and set(written) == {str(log)}


def _append_many(args: tuple[str, int, int]) -> None:
    path, writer, count = args
    for i in range(count):
        # long lines make interleaving visible if appends were not atomic
        audit.append_line(path, json.dumps({"writer": writer, "i": i, "pad": "x" * 2000}))


def test_concurrent_writers_never_interleave_lines(tmp_path):
    path = tmp_path / "audit.jsonl"
    writers, count = 4, 150
    with ProcessPoolExecutor(writers) as pool:
        list(pool.map(_append_many, [(str(path), w, count) for w in range(writers)]))
    lines = _lines(path)
    assert len(lines) == writers * count
    for w in range(writers):
        assert [e["i"] for e in lines if e["writer"] == w] == list(range(count))


def test_bad_hash_is_refused(tmp_path):
    from xray.serve.inference import Prediction

    with pytest.raises(ValueError):
        audit.record("Doe_Jane.dcm", Prediction(0.5, "v"), 0.5, path=tmp_path / "a.jsonl")


def test_a_report_of_a_result_already_on_screen_is_its_own_record(tiny_model, log):
    from xray.serve.inference import Prediction

    trail = audit.AuditTrail()
    p = Prediction(0.5, tiny_model.version)
    assert trail.shown("b" * 64, p, 0.4)["shown_in"] == "screen"
    assert trail.shown("b" * 64, p, 0.4, "worklist") is None  # the same display
    assert trail.shown("b" * 64, p, 0.4, "report")["shown_in"] == "report"  # an export: recorded
    assert trail.shown("b" * 64, p, 0.4, "report") is None
    assert [e["shown_in"] for e in _lines(log)] == ["screen", "report"]
