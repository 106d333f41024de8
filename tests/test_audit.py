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
from xray import analysis, audit

DICOM = FIXTURES / "bad" / "dicom_monochrome2.dcm"  # carries PatientName Doe^Jane, PatientID PATIENT-12345
XRAY = FULLRES / "NORMAL2-IM-1438-0001.jpeg"


@pytest.fixture
def log(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "audit" / "audit.jsonl"
    monkeypatch.setenv("XRAY_AUDIT_LOG", str(path))
    return path


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_prediction_writes_exactly_one_line_with_the_audit_fields(tiny_model, log):
    data = DICOM.read_bytes()
    result = analysis.analyse(tiny_model, data, "Doe_Jane chest 2024.dcm")
    assert result.ok
    [entry] = _lines(log)
    assert tuple(entry) == audit.FIELDS
    assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert entry["model_version"] == tiny_model.version
    assert entry["p_pneumonia"] == pytest.approx(result.prediction.p_pneumonia, abs=1e-6)
    assert entry["threshold"] == pytest.approx(tiny_model.threshold, abs=1e-6)
    assert entry["ood"] is result.prediction.ood
    assert entry["decision"] == (None if result.prediction.ood else result.prediction.label)
    assert entry["time"].endswith("+00:00")
    raw = log.read_text()
    for secret in ("Doe_Jane", "chest 2024", ".dcm", "Doe^Jane", "PATIENT-12345", "CHEST", "003Y"):
        assert secret not in raw


def test_unreadable_files_are_not_predictions_and_write_nothing(tiny_model, log):
    result = analysis.analyse(tiny_model, b"not an image", "letter.png")
    assert result.error and not log.exists()


def test_out_of_distribution_images_are_logged_without_a_decision(tiny_model, log, tmp_path):
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(2)
    path = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((400, 300)).save(path)
    result = analysis.analyse(tiny_model, path.read_bytes(), "photo.png")
    assert result.prediction.ood
    [entry] = _lines(log)
    assert entry["ood"] is True and entry["decision"] is None


def test_audit_can_be_switched_off(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("XRAY_AUDIT_LOG", "off")
    assert audit.audit_path() is None
    assert analysis.analyse(tiny_model, XRAY.read_bytes(), XRAY.name).ok


def test_default_path_is_the_git_ignored_audit_folder(monkeypatch):
    monkeypatch.delenv("XRAY_AUDIT_LOG", raising=False)
    root = Path(__file__).resolve().parent.parent
    assert audit.audit_path() == root / "audit" / "audit.jsonl"
    assert "/audit/" in (root / ".gitignore").read_text().split()


def test_an_unwritable_log_withholds_the_result_with_a_reason(tiny_model, tmp_path, monkeypatch):
    blocker = tmp_path / "file-not-folder"
    blocker.write_text("")
    monkeypatch.setenv("XRAY_AUDIT_LOG", str(blocker / "audit.jsonl"))
    result = analysis.analyse(tiny_model, XRAY.read_bytes(), XRAY.name)
    assert result.prediction is None and result.image is not None
    assert result.error.startswith("result withheld: the audit log cannot be written")


def test_uploads_never_touch_the_disk(tiny_model, log, monkeypatch):
    """Every file opened for writing during an analysis is the audit log."""
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
    analysis.analyse(tiny_model, DICOM.read_bytes(), DICOM.name)
    analysis.analyse(tiny_model, XRAY.read_bytes(), XRAY.name)
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
    from xray.inference import Prediction

    with pytest.raises(ValueError):
        audit.record("Doe_Jane.dcm", Prediction(0.5, 0.5, "v"), tmp_path / "a.jsonl")
