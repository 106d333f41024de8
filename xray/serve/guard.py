"""The intended-use guard: which films get a verdict, and the true reason for those that do not.

Three outcomes, never confused:
- ``VERDICT``: a pediatric frontal chest radiograph like the training data: p(pneumonia) and a decision.
- ``OUTSIDE_INTENDED_USE``: a chest radiograph the version was not made for: an adult, a lateral view,
  other equipment or exposure (its features are unlike the training films, or it is turned). The
  clinician reads it without the model.
- ``NOT_A_CHEST_RADIOGRAPH``: a photo, a document, another body part or another modality.

The DICOM header is read first (PS3.3 C.7.3.1 Patient Age / Birth Date with Study or Acquisition Date,
C.8.11.5 DX View Position and the View Code Sequence, Body Part Examined, Modality CR/DX); a value
outside the version's intended use (its card's ``intended_use_spec``) withholds the verdict with that
reason; missing fields fall through to the image checks (``ood``).
"""
from __future__ import annotations

import datetime as dt
import re
from typing import Any, Mapping

from xray.model.card import DEFAULT_SPEC  # noqa: F401 (the card owns a version's intended use)

VERDICT = "verdict"
OUTSIDE_INTENDED_USE = "outside intended use"
NOT_A_CHEST_RADIOGRAPH = "not a chest radiograph"

FRONTAL_CODES = {"R-10206": "AP", "R-10214": "PA", "399348003": "AP", "399225005": "PA"}  # SNOMED / SRT codes
LATERAL_CODES = {"R-10232", "R-10236", "399198007", "399173006"}
WHAT_TO_DO = {
    OUTSIDE_INTENDED_USE: "Read the film without the model; the model was made for frontal chest radiographs of "
                          "children aged 1-5 from equipment like its training data's.",
    NOT_A_CHEST_RADIOGRAPH: "Upload the chest radiograph itself (DICOM from the PACS, or a PNG/JPEG export), not a "
                            "photo, a document or another examination.",
}


def age_in_years(fields: Mapping[str, str]) -> float | None:
    """Age from PatientAge (nnnY/M/W/D) or from PatientBirthDate and StudyDate/AcquisitionDate; None when unknown."""
    age = str(fields.get("PatientAge", "")).strip().upper()
    match = re.fullmatch(r"(\d{1,3})([YMWD])", age)
    if match:
        value, unit = int(match.group(1)), match.group(2)
        return value / {"Y": 1, "M": 12, "W": 52.18, "D": 365.25}[unit]
    birth = _date(fields.get("PatientBirthDate"))
    when = _date(fields.get("StudyDate")) or _date(fields.get("AcquisitionDate"))
    if birth and when and when >= birth:
        return (when - birth).days / 365.25
    return None


def _date(value) -> dt.date | None:
    try:
        return dt.datetime.strptime(str(value).strip()[:8], "%Y%m%d").date() if value else None
    except ValueError:
        return None


def view_of(fields: Mapping[str, str]) -> str | None:
    """"AP", "PA", "LATERAL", another ViewPosition value, or None when the header does not say."""
    code = str(fields.get("ViewCodeValue", "")).strip()
    if code in FRONTAL_CODES:
        return FRONTAL_CODES[code]
    if code in LATERAL_CODES:
        return "LATERAL"
    view = str(fields.get("ViewPosition", "")).strip().upper()
    if view in ("LL", "RL", "LLD", "RLD", "LAT", "LATERAL"):
        return "LATERAL"
    return view or None


def header_outcome(fields: Mapping[str, str], spec: Mapping[str, Any]) -> tuple[str, str]:
    """(outcome, reason) from the DICOM header; (VERDICT, "") when nothing in it rules the film out."""
    modality = str(fields.get("Modality", "")).strip().upper()
    if modality and modality not in spec["modalities"]:
        return NOT_A_CHEST_RADIOGRAPH, f"the DICOM header says modality {modality}, not a radiograph (CR or DX)"
    body = str(fields.get("BodyPartExamined", "")).strip().upper()
    if body and body not in spec["body_parts"]:
        return NOT_A_CHEST_RADIOGRAPH, f"the DICOM header says body part {body}, not the chest"
    age = age_in_years(fields)
    low, high = spec["age_years"]
    if age is not None and not (low <= age < high + 1):
        shown = f"{age:.0f} years" if age >= 2 else f"{age * 12:.0f} months"
        return OUTSIDE_INTENDED_USE, (f"the patient is {shown} old (DICOM header); the model was made for "
                                      f"children aged {low}-{high}")
    view = view_of(fields)
    if view is not None and view not in spec["views"]:
        name = "a lateral view" if view == "LATERAL" else f"view position {view}"
        return OUTSIDE_INTENDED_USE, (f"{name} (DICOM header); the model was made for frontal "
                                      f"({'/'.join(spec['views'])}) chest radiographs")
    return VERDICT, ""


def image_outcome(input_reason: str, feature_reason: str) -> tuple[str, str]:
    """(outcome, reason) from the image checks: the input checks find photos and documents (not a chest
    radiograph); the feature checks find films unlike the training data (outside intended use)."""
    if input_reason:
        return NOT_A_CHEST_RADIOGRAPH, input_reason
    if feature_reason:
        return OUTSIDE_INTENDED_USE, feature_reason
    return VERDICT, ""
