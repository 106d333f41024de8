"""The DICOM node's spool and durable queue: received objects as files, their state in SQLite.

One folder per node (``settings.node_spool_path()``): ``in/`` holds the received objects, ``out/`` the
results waiting for delivery, ``queue.sqlite`` one row per received SOP Instance UID and one per
refusal. SQLite in WAL mode with ``synchronous=FULL``: a row committed before the C-STORE response
survives a kill -9 or a power cut, so every object the node acknowledged is scored and answered once.

A film's states: ``received`` (spooled, not scored) -> ``scored`` (results written, waiting for the
destination) -> ``delivered``. Nothing leaves the queue: a delivered row keeps what the audit and the
Worklist need (scores, reasons, UIDs, delivery times), only the spooled files are deleted.
No pynetdicom here: the Worklist page reads this module.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterator

from xray.clock import utc_now_ms

RECEIVED, SCORED, DELIVERED = "received", "scored", "delivered"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS films (
    sop_uid TEXT PRIMARY KEY,
    received TEXT NOT NULL,          -- UTC, when the C-STORE was acknowledged
    calling_ae TEXT NOT NULL,
    sop_class TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    patient_name TEXT NOT NULL,      -- as the DICOM carried them, never changed
    patient_id TEXT NOT NULL,
    accession TEXT NOT NULL,
    study_date TEXT NOT NULL,
    file TEXT NOT NULL,              -- name under in/
    bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    state TEXT NOT NULL,
    scored TEXT,                     -- UTC
    model_version TEXT,
    p_pneumonia REAL,
    threshold REAL,
    label TEXT,                      -- the CSV's label column (PNEUMONIA / NORMAL / BORDERLINE, '' without a verdict)
    error TEXT,                      -- the CSV's error column (why there is no verdict)
    outcome TEXT,                    -- the guard's outcome, or 'unreadable'
    band TEXT,                       -- the version's borderline band, JSON
    csv_row TEXT,                    -- the whole CSV row, JSON (xray.serve.pipeline.csv_row)
    results TEXT,                    -- JSON list of result file names under out/ (SC first, then SR)
    sr_uid TEXT,
    sc_uid TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL DEFAULT 0,   -- epoch seconds
    last_error TEXT NOT NULL DEFAULT '',
    delivered TEXT,                  -- UTC
    cleaned INTEGER NOT NULL DEFAULT 0      -- 1 once the received object was deleted from in/
);
CREATE INDEX IF NOT EXISTS films_state ON films (state, received);
CREATE TABLE IF NOT EXISTS refusals (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    calling_ae TEXT NOT NULL,
    sop_uid TEXT NOT NULL,
    reason TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class Received:
    """What the C-STORE handler records about one object (header fields as the DICOM carried them)."""

    sop_uid: str
    calling_ae: str
    sop_class: str
    transfer_syntax: str
    study_uid: str
    patient_name: str
    patient_id: str
    accession: str
    study_date: str


def file_key(sop_uid: str) -> str:
    """A file name for a SOP Instance UID (a UID may hold nothing but digits and dots; this is fixed length)."""
    return hashlib.sha256(sop_uid.encode("ascii", "replace")).hexdigest()[:40]


class Spool:
    """The node's folder: ``in/``, ``out/`` and ``queue.sqlite``. Safe across threads and processes
    (a connection per call; SQLite's locks)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.inbox, self.outbox = self.root / "in", self.root / "out"
        self.db_path = self.root / "queue.sqlite"
        self._ready = False

    # -- plumbing -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        if not self._ready:
            for folder in (self.root, self.inbox, self.outbox):
                folder.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        try:
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            if not self._ready:
                db.executescript(_SCHEMA)
                self._ready = True
            yield db
        finally:
            db.close()

    def exists(self) -> bool:
        return self.db_path.is_file()

    # -- receiving ----------------------------------------------------------------------------------
    def has(self, sop_uid: str) -> bool:
        with self._db() as db:
            return db.execute("SELECT 1 FROM films WHERE sop_uid = ?", (sop_uid,)).fetchone() is not None

    def inbox_path(self, sop_uid: str) -> Path:
        return self.inbox / f"{file_key(sop_uid)}.dcm"

    def add(self, item: Received, size: int, sha256: str) -> bool:
        """Record an object already written to ``inbox_path``; False when that UID was queued before
        (the earlier object keeps its result: one result per SOP Instance UID)."""
        with self._db() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO films (sop_uid, received, calling_ae, sop_class, transfer_syntax, study_uid, "
                "patient_name, patient_id, accession, study_date, file, bytes, sha256, state) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (item.sop_uid, utc_now_ms(), item.calling_ae, item.sop_class, item.transfer_syntax, item.study_uid,
                 item.patient_name, item.patient_id, item.accession, item.study_date,
                 self.inbox_path(item.sop_uid).name, size, sha256, RECEIVED))
            return cursor.rowcount == 1

    def refuse(self, calling_ae: str, sop_uid: str, reason: str) -> None:
        """Record a refusal (the Worklist lists them with their reasons)."""
        with self._db() as db:
            db.execute("INSERT INTO refusals (time, calling_ae, sop_uid, reason) VALUES (?, ?, ?, ?)",
                       (utc_now_ms(), calling_ae, sop_uid, reason))

    def used_bytes(self) -> int:
        """Bytes of the files in ``in/`` and ``out/`` (what the spool limit counts)."""
        total = 0
        for folder in (self.inbox, self.outbox):
            if folder.is_dir():
                for path in folder.iterdir():
                    try:
                        total += path.stat().st_size
                    except FileNotFoundError:
                        pass
        return total

    def orphans(self) -> list[Path]:
        """Files in ``in/`` with no row: written by a handler killed before it acknowledged (the sender
        saw no Success and sends again), and temporary files of torn writes."""
        with self._db() as db:
            known = {row[0] for row in db.execute("SELECT file FROM films")}
        return [p for p in self.inbox.iterdir() if p.name not in known] if self.inbox.is_dir() else []

    # -- scoring and delivery -----------------------------------------------------------------------
    def to_score(self, limit: int) -> list[sqlite3.Row]:
        with self._db() as db:
            return db.execute("SELECT * FROM films WHERE state = ? ORDER BY received LIMIT ?",
                              (RECEIVED, limit)).fetchall()

    def scored(self, sop_uid: str, fields: dict) -> None:
        """Record a film's result (its result files are already in ``out/``)."""
        fields = {**fields, "state": SCORED, "scored": utc_now_ms(), "next_attempt": 0.0}
        names = ", ".join(f"{k} = ?" for k in fields)
        with self._db() as db:
            db.execute(f"UPDATE films SET {names} WHERE sop_uid = ?", (*fields.values(), sop_uid))

    def to_deliver(self, now: float | None = None) -> list[sqlite3.Row]:
        with self._db() as db:
            return db.execute("SELECT * FROM films WHERE state = ? AND next_attempt <= ? ORDER BY received",
                              (SCORED, time.time() if now is None else now)).fetchall()

    def delivery_failed(self, sop_uid: str, error: str, retry_in: float) -> None:
        with self._db() as db:
            db.execute("UPDATE films SET attempts = attempts + 1, next_attempt = ?, last_error = ? WHERE sop_uid = ?",
                       (time.time() + retry_in, error, sop_uid))

    def delivered(self, sop_uid: str) -> None:
        with self._db() as db:
            db.execute("UPDATE films SET state = ?, delivered = ?, attempts = attempts + 1, last_error = '' "
                       "WHERE sop_uid = ?", (DELIVERED, utc_now_ms(), sop_uid))

    def to_clean(self, older_than_s: float) -> list[sqlite3.Row]:
        """Delivered films whose received object is still in ``in/`` and was delivered over ``older_than_s`` ago."""
        cutoff = time.time() - older_than_s
        with self._db() as db:
            rows = db.execute("SELECT * FROM films WHERE state = ? AND cleaned = 0 ORDER BY delivered",
                              (DELIVERED,)).fetchall()
        return [r for r in rows if _epoch(r["delivered"]) <= cutoff]

    def cleaned(self, sop_uid: str) -> None:
        with self._db() as db:
            db.execute("UPDATE films SET cleaned = 1 WHERE sop_uid = ?", (sop_uid,))

    # -- reading (the Worklist, the tests) -----------------------------------------------------------
    def films(self) -> list[dict]:
        """Every film, newest first, as dicts (``band``, ``csv_row`` and ``results`` parsed)."""
        if not self.exists():
            return []
        with self._db() as db:
            rows = db.execute("SELECT * FROM films ORDER BY received DESC").fetchall()
        out = []
        for row in rows:
            film = dict(row)
            for key in ("band", "csv_row", "results"):
                film[key] = json.loads(film[key]) if film[key] else None
            out.append(film)
        return out

    def refusals(self) -> list[dict]:
        """Every refusal, newest first."""
        if not self.exists():
            return []
        with self._db() as db:
            return [dict(r) for r in db.execute("SELECT * FROM refusals ORDER BY id DESC")]


def _epoch(utc: str | None) -> float:
    return datetime.fromisoformat(utc).timestamp() if utc else 0.0
