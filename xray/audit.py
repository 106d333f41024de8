"""Audit log: one JSON line per prediction shown, appended safely by concurrent writers.

A line holds when, which file (its SHA-256 only), which model, the score, the threshold, the
decision and the OOD flag. Never pixels, file names or DICOM patient fields.
Path: $XRAY_AUDIT_LOG, default <repo>/audit/audit.jsonl (git-ignored); XRAY_AUDIT_LOG=off disables it.
"""
from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

from .registry import PACKAGE_ROOT

DEFAULT_AUDIT_LOG = PACKAGE_ROOT / "audit" / "audit.jsonl"
FIELDS = ("time", "sha256", "model_version", "p_pneumonia", "threshold", "decision", "ood")


def audit_path() -> Path | None:
    """Where lines go, or None when auditing is switched off."""
    value = os.environ.get("XRAY_AUDIT_LOG", "").strip()
    if value.lower() in ("off", "0", "false", "none"):
        return None
    return Path(value) if value else DEFAULT_AUDIT_LOG


def record(sha256: str, prediction, path: str | os.PathLike | None = None) -> dict | None:
    """Append one line for a prediction shown to a clinician; returns the entry (None when off).

    Args:
        sha256: hex SHA-256 of the file's bytes.
        prediction: an ``inference.Prediction``.
        path: log file; ``audit_path()`` when None.
    Raises:
        OSError: when the log cannot be written (the caller decides whether to go on).
    """
    target = Path(path) if path is not None else audit_path()
    if target is None:
        return None
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ValueError("sha256 must be 64 lower-case hex digits")
    entry = {
        "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "sha256": sha256,
        "model_version": prediction.model_version,
        "p_pneumonia": round(float(prediction.p_pneumonia), 6),
        "threshold": round(float(prediction.threshold), 6),
        "decision": None if prediction.ood else prediction.label,  # no verdict is shown for OOD images
        "ood": bool(prediction.ood),
    }
    append_line(target, json.dumps(entry, separators=(",", ":"), allow_nan=False))
    return entry


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append ``line`` + newline with one write(2) on an O_APPEND descriptor.

    O_APPEND makes the seek-to-end and the write one atomic step, so lines from concurrent
    processes and threads never interleave (a single short write to a local file is not split).
    """
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(f"short write to audit log {path} ({written} of {len(data)} bytes)")
    finally:
        os.close(fd)
