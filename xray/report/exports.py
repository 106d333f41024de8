"""What a page lets a clinician download, each built from what the screen shows and recorded in the audit
log before its bytes are made (``AuditTrail``, shown_in ``report`` or ``csv``): the PDF of one image, the
DICOM results of a DICOM input, the worklist PDF and the worklist CSV.

Withheld means withheld in every download: the worklist CSV leaves p(pneumonia) empty for a film that got
no verdict (outside the intended use, not a chest radiograph), as the screen does. The command line's
research CSV (``python -m xray predict``) keeps the score; its column header says so.
"""
from __future__ import annotations

import csv
import io
from dataclasses import replace
from pathlib import Path
from typing import Iterable

from xray.govern.audit import AuditTrail
from xray.model.registry import LoadedModel
from xray.report import writers
from xray.report.writers import ReportInput
from xray.serve.analysis import Analysis, worklist_rows
from xray.serve.pipeline import CSV_HEADER


def file_stem(name: str) -> str:
    """The stem downloads of one file are named after (``xray`` for a name without one)."""
    return Path(name).stem or "xray"


def _record(trail: AuditTrail, items: Iterable[ReportInput], shown_in: str) -> None:
    for item in items:
        if item.analysis.prediction is not None:
            trail.shown(item.analysis.sha256, item.analysis.prediction, item.threshold, shown_in)


def report_pdf(model: LoadedModel, item: ReportInput, trail: AuditTrail) -> bytes:
    """The PDF report of one image, recorded first.

    Raises:
        OSError: the audit log cannot be written (no bytes are made).
    """
    _record(trail, [item], "report")
    return writers.pdf_bytes(model, [item])


def dicom_results(model: LoadedModel, item: ReportInput, trail: AuditTrail) -> bytes:
    """The zip of the Secondary Capture and structured report of one DICOM input, recorded first.

    Raises:
        OSError: the audit log cannot be written; ValueError: the input was not DICOM.
    """
    if item.dicom is None:
        raise ValueError("DICOM results are made for DICOM inputs only")
    _record(trail, [item], "report")
    return writers.dicom_results_zip(model, item, file_stem(item.analysis.name))


def worklist_pdf(model: LoadedModel, items: list[ReportInput], trail: AuditTrail) -> bytes:
    """The worklist PDF (a summary page, then one page per image), every image recorded first."""
    _record(trail, items, "report")
    return writers.worklist_pdf_bytes(model, items)


def worklist_csv(analyses: Iterable[Analysis], threshold: float, prevalence: tuple[float, float],
                 trail: AuditTrail) -> str:
    """The worklist as CSV in worklist order, the command line's columns (``pipeline.ResultRow``), every
    scored row recorded first; a withheld film's p(pneumonia) is left empty.

    Args:
        prevalence: (the version's calibration prevalence, the site's prevalence in force).
    """
    by_sha = {a.sha256: a for a in analyses}
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_HEADER)
    for row in worklist_rows(by_sha.values(), threshold, prevalence):
        prediction = by_sha[row.sha256].prediction
        if prediction is not None:
            trail.shown(row.sha256, prediction, threshold, "csv")
            if prediction.withheld:  # withheld means withheld: no score leaves the page with it
                row = replace(row, p_pneumonia=None, p_at_prevalence=None)
        writer.writerow(row.csv())
    return out.getvalue()
