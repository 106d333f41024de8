"""Reports for a batch of files (``python -m xray report``): one PDF per image, with ``dicom`` a Secondary
Capture and a structured report beside it, and a worklist PDF when there are several.

Two files of one name are both reported (``name.pdf``, ``name-2.pdf``); nothing is written when any
target exists already, unless ``force``; every result a report states is recorded in the audit log
(``shown_in`` = ``report``) before its files are written.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from xray.govern.audit import AuditTrail
from xray.model.registry import LoadedModel
from xray.report import writers as R
from xray.serve import analysis as A
from xray.serve.pipeline import path_text

WORKLIST = "worklist.pdf"


@dataclass(frozen=True)
class PlannedReport:
    """Where one input file's results go: ``<stem>.pdf`` and, with DICOM results, ``<stem>.sc.dcm``, ``<stem>.sr.dcm``."""

    source: Path
    stem: str
    targets: tuple[Path, ...]  # the PDF first


class ReportsExist(FileExistsError):
    """Report files are in the way and ``force`` was not given: nothing was written."""


def plan(paths: list[Path], out: Path, dicom: bool = False) -> list[PlannedReport]:
    """The files each input becomes under ``out``; a name seen before gets ``-2``, ``-3``, ..."""
    stems: dict[str, int] = {}
    planned = []
    for path in paths:
        stem = path.stem or path.name
        stems[stem] = stems.get(stem, 0) + 1
        stem = stem if stems[stem] == 1 else f"{stem}-{stems[stem]}"  # two files of one name: both reported
        targets = [out / f"{stem}.pdf"] + ([out / f"{stem}.sc.dcm", out / f"{stem}.sr.dcm"] if dicom else [])
        planned.append(PlannedReport(path, stem, tuple(targets)))
    return planned


def existing(planned: list[PlannedReport], out: Path) -> list[Path]:
    """The planned files (and the worklist, for several inputs) that exist already."""
    found = [t for p in planned for t in p.targets if t.exists()]
    if len(planned) > 1 and (out / WORKLIST).exists():
        found.append(out / WORKLIST)
    return found


def write_reports(model: LoadedModel, paths: list[Path], out: Path, threshold: float, prevalence: float,
                  dicom: bool = False, force: bool = False,
                  say: Callable[[str], None] = lambda line: None) -> list[R.ReportInput]:
    """Analyse each file and write its reports under ``out`` (created); one line per file to ``say``.

    Returns:
        One ``ReportInput`` per file, in order (unreadable files included: their PDF says why).
    Raises:
        ReportsExist: a target exists and ``force`` is False; nothing was written.
        OSError: ``out`` or a report cannot be written; the audit log cannot be written.
    """
    planned = plan(paths, out, dicom)
    found = existing(planned, out)
    if found and not force:
        raise ReportsExist(f"{len(found)} report file(s) exist already (first: {found[0]}); nothing was written. "
                           "Use --force to overwrite them")
    out.mkdir(parents=True, exist_ok=True)
    trail, items = AuditTrail(), []
    for p in planned:
        items.append(_report_one(model, p, threshold, prevalence, dicom, force, trail, say))
    if len(items) > 1:
        R.write(out / WORKLIST, R.worklist_pdf_bytes(model, items), force)
        say(f"worklist -> {out / WORKLIST}")
    return items


def _report_one(model: LoadedModel, p: PlannedReport, threshold: float, prevalence: float, dicom: bool, force: bool,
                trail: AuditTrail, say: Callable[[str], None]) -> R.ReportInput:
    """One file: analyse, audit what the report states, write its PDF (and DICOM results)."""
    try:
        data, error = p.source.read_bytes(), ""
    except OSError as exc:
        data, error = None, f"cannot read: {exc.strerror or exc}"
    name = path_text(p.source.name)  # a name that is not UTF-8, escaped as in the CSV
    result = (A.analyse(model, data, name) if data is not None else A.Analysis(name, "0" * 64, None, None, error))
    header = R.read_dicom_header(data) if data else None
    item = R.ReportInput(result, threshold, prevalence, header)
    if result.prediction is not None:
        trail.shown(result.sha256, result.prediction, threshold, "report")  # what the report states
    R.write(p.targets[0], R.pdf_bytes(model, [item]), force)
    if dicom and result.image is not None and result.prediction is not None:
        sc = R.secondary_capture(model, item)
        R.write(p.targets[1], R.dicom_bytes(sc), force)
        R.write(p.targets[2], R.dicom_bytes(R.structured_report(model, item, header if header is not None else sc)),
                force)
    elif dicom:
        say(f"  {p.source.name}: no DICOM results (the file could not be analysed: {result.error})")
    say(f"{p.source} -> {p.targets[0]}" + (" (+ .sc.dcm, .sr.dcm)" if dicom and result.prediction else ""))
    return item
