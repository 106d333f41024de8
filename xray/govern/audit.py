"""Audit log: one JSON line per result a clinician was shown, appended safely by concurrent writers.

A line records what was on the screen (or in a downloaded CSV/report): when, which file (its SHA-256
only), which model version, the score, the threshold in force, the decision made at that threshold
by ``decision.decide``, whether the verdict was withheld and why, and who was at the screen (the
signed-in user's provider subject, e-mail, role and issuer; the OS login in local mode and on the command
line: ``identity.Actor.audit_fields``). Governance events (``record_event``) carry the same four fields.
Never pixels, file names, DICOM patient fields, tokens or cookies. A result that was never displayed is
never logged; the same (file, version, threshold, decision) shown again in one session is logged once
(``AuditTrail``).

Path: ``settings.audit_log_path()`` ($XRAY_AUDIT_LOG, default ``<user data folder>/audit.jsonl``,
outside the repository); XRAY_AUDIT_LOG=off disables it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from xray.clock import utc_now_ms
from xray import settings
from xray.govern.identity import Actor, operator

FIELDS = ("time", "sha256", "model_version", "p_pneumonia", "threshold", "decision", "outcome", "reason",
          "withheld", "shown_in", "user", "email", "role", "issuer")
# lines written before 2026-12-02 say "ood" for "withheld" and carry no user, email, role or issuer


def audit_path() -> Path | None:
    """Where lines go, or None when auditing is switched off."""
    return settings.audit_log_path()


def entry_for(sha256: str, prediction, threshold: float, shown_in: str = "screen", actor: Actor | None = None) -> dict:
    """The line that records ``prediction`` as shown at ``threshold`` (not written).

    Args:
        sha256: hex SHA-256 of the file's bytes.
        prediction: an ``inference.Prediction`` (score and check results).
        threshold: the operating threshold in force where it was shown, exactly.
        shown_in: where it was shown: ``screen``, ``worklist``, ``csv``, ``report``.
        actor: who was shown it (the machine's operator when None: the command line).
    Raises:
        ValueError: a malformed hash.
    """
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ValueError("sha256 must be 64 lower-case hex digits")
    withheld = prediction.withheld
    return {
        "time": utc_now_ms(),
        "sha256": sha256,
        "model_version": prediction.model_version,
        "p_pneumonia": round(float(prediction.p_pneumonia), 6),
        "threshold": float(threshold),  # exact: the screen and the CSV decide at this very value
        "decision": prediction.decision(threshold),  # None when withheld: no verdict was shown
        "outcome": prediction.outcome,
        "reason": " ".join(prediction.withheld_reason.split()) if withheld else "",
        "withheld": withheld,
        "shown_in": shown_in,
        **(actor or operator()).audit_fields(),
    }


def record(sha256: str, prediction, threshold: float, shown_in: str = "screen",
           path: str | os.PathLike | None = None, actor: Actor | None = None) -> dict | None:
    """Append one line for a result shown to a clinician; returns the entry (None when auditing is off).

    Raises:
        OSError: when the log cannot be written (the caller then withholds the result).
    """
    target = Path(path) if path is not None else audit_path()
    entry = entry_for(sha256, prediction, threshold, shown_in, actor)
    if target is None:
        return None
    append_line(target, json.dumps(entry, separators=(",", ":"), allow_nan=False))
    return entry


def record_event(event: str, path: str | os.PathLike | None = None, actor: Actor | None = None,
                 **fields) -> dict | None:
    """Append one governance line (e.g. ``activation-override``, ``threshold-saved``): who, when, what.

    ``actor`` is who acted (the machine's operator when None: the command line); its fields win over any
    of the same name in ``fields``.

    Raises:
        OSError: the log cannot be written.
    """
    target = Path(path) if path is not None else audit_path()
    entry = {"time": utc_now_ms(), "event": event, **fields, **(actor or operator()).audit_fields()}
    if target is None:
        return None
    append_line(target, json.dumps(entry, separators=(",", ":"), allow_nan=False, default=str))
    return entry


class AuditTrail:
    """One session's memory of what it logged: each distinct (sha256, version, threshold, decision)
    is written once, however often the page reruns; a new threshold or decision writes a new line."""

    def __init__(self, path: str | os.PathLike | None = None, actor: Actor | None = None):
        self.path = path
        self.actor = actor  # who this session is (the machine's operator when None)
        self.logged: set[tuple] = set()

    def shown(self, sha256: str, prediction, threshold: float, shown_in: str = "screen") -> dict | None:
        """Record that this result was displayed at ``threshold``; returns the new entry or None when
        it was already logged in this session (or auditing is off).

        Raises:
            OSError: the log cannot be written: the caller must not show the result.
        """
        # the screen and the worklist are one display; a report or download is its own record
        channel = "export" if shown_in in ("report", "csv") else "screen"
        key = (sha256, prediction.model_version, float(threshold), prediction.decision(threshold), prediction.withheld,
               channel)
        if key in self.logged:
            return None
        entry = record(sha256, prediction, threshold, shown_in, self.path, self.actor)
        self.logged.add(key)
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
