"""The intended-use guard: which films get a verdict, and the true reason for those that do not.

Three outcomes, never confused:
- ``VERDICT``: a pediatric frontal chest radiograph like the training data: p(pneumonia) and a decision.
- ``OUTSIDE_INTENDED_USE``: a chest radiograph the version was not made for: an adult, a lateral view,
  other equipment or exposure (its features are unlike the training films, or it is turned). The
  clinician reads it without the model.
- ``NOT_A_CHEST_RADIOGRAPH``: a photo, a document, another body part or another modality.

The DICOM header is read first (PS3.3 C.7.3.1 Patient Age / Birth Date with Study or Acquisition Date,
C.8.11.5 DX View Position and the View Code Sequence, C.7.3.1 Modality, Body Part Examined and then the
Anatomic Region Sequence, C.8.6.1 Conversion Type); a value outside the version's intended use (its
card's ``intended_use_spec``) withholds the verdict with that reason; missing fields fall through to
the image checks (``ood``). Only evidence that the film is not a chest radiograph (another body part,
a modality that is not a radiograph, a scanned document) says so; a value the guard does not know is
"outside intended use", with what the header says.

Body parts are read against PS3.16 Table L-1 (Body Part Examined to SNOMED CT, as highdicom ships it):
THORAX and CHEST share SCT 816094009 "Chest", so both are the chest, as are the coded forms of that
concept in the Anatomic Region Sequence (CID 4031), including the older SRT T-D3000 and SCT 51185008.
"""
from __future__ import annotations

import datetime as dt
import re
from functools import lru_cache
from typing import Any, Mapping

import numpy as np

from xray.model.card import DEFAULT_SPEC  # noqa: F401 (the card owns a version's intended use)

# PS3.3 C.7.3.1.1.1 Modality defined terms, current and retired, by what they say about a chest film.
# Radiographs: computed and digital radiography, and RG (film/screen radiography, also used for
# digitised films). Other X-ray imaging of a chest that is not a plain radiograph: fluoroscopy and angiography.
RADIOGRAPH_MODALITIES = {"CR", "DX", "RG"}
XRAY_NOT_RADIOGRAPH = {"RF", "XA", "DF", "DS", "CF", "CD", "DM"}  # DF, DS, CF, CD, DM: retired fluoroscopy/angiography terms
# A modality whose objects are not a chest radiograph whatever they show: cross-sectional and nuclear imaging,
# ultrasound, photographs, endoscopy, mammography and dental X-ray, documents, reports and other non-image objects.
NOT_RADIOGRAPH_MODALITIES = {
    "CT", "MR", "US", "NM", "PT", "MG", "PX", "IO", "XC", "ES", "GM", "SM", "OP", "OPT", "OPM", "OPV", "OPTBSV",
    "OPTENF", "OCT", "IVOCT", "IVUS", "BMD", "BDUS", "TG", "KER", "LEN", "IOL", "OAM", "SRF", "VA", "DOC", "SR",
    "KO", "PR", "SEG", "REG", "RWV", "PLAN", "ASMT", "ANN", "AU", "ECG", "EEG", "EMG", "EOG", "EPS", "HD", "RESP",
    "BI", "CFM", "DG", "DMS", "FID", "HC", "LS", "M3D", "OSS", "POS", "SMR", "STAIN", "TEXTUREMAP", "RTIMAGE",
    "RTDOSE", "RTPLAN", "RTSTRUCT", "RTRECORD", "RTINTENT", "RTRAD", "RTSEGANN", "CTPROTOCOL", "XAPROTOCOL",
    "AR", "AS", "EC", "FA", "FS", "LP", "MA", "MS", "OPR", "ST", "VF", "CP", "DD"}
# PS3.3 C.8.6.1 Conversion Type: DF = digitised film (a radiograph); SD = scanned document.
DIGITISED_FILM, SCANNED_DOCUMENT = "DF", "SD"
# Legacy codes of the chest in the Anatomic Region Sequence: SNOMED RT and the SCT code Table L-1 used before 2019
LEGACY_CHEST_CODES = {("SRT", "T-D3000"), ("SNM3", "T-D3000"), ("SCT", "51185008")}
# Table L-1 entries that hold or lie inside the chest: a film of them is a chest film of another kind of
# examination, or labelled loosely, so at most outside the intended use, never "not a chest radiograph"
CHEST_PARTS = {"LUNG", "HEART", "MEDIASTINUM", "RIB", "STERNUM", "TSPINE", "CTSPINE", "TLSPINE", "THORACICAORTA",
               "CHESTABDOMEN", "CHESTABDPELVIS", "NECKCHEST", "NECKCHESTABDOMEN", "NECKCHESTABDPELV", "WHOLEBODY",
               "BREAST", "CLAVICLE", "ESOPHAGUS", "TRACHEA", "THYMUS", "DIAPHRAGM", "THORACIC"}


@lru_cache(maxsize=1)
def body_part_table() -> dict[str, tuple[str, str, str]]:
    """PS3.16 Table L-1 as highdicom ships it: Body Part Examined -> (scheme, code, meaning); {} without highdicom."""
    try:
        from highdicom._standard_utils import get_anatomic_region_map
    except ImportError:  # highdicom missing or reorganised: the plain names in the spec still work
        return {}
    return {key: (code.scheme_designator, code.value, code.meaning) for key, (code, _) in get_anatomic_region_map().items()}

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


def _chest_codes(spec: Mapping[str, Any]) -> set[tuple[str, str]]:
    """(scheme, code) pairs that mean the spec's body parts (CHEST -> SCT 816094009, and its legacy codes)."""
    table = body_part_table()
    codes = {table[part][:2] for part in spec["body_parts"] if part in table}
    return codes | (LEGACY_CHEST_CODES if ("SCT", "816094009") in codes else set())


def _region_of_term(term: str, spec: Mapping[str, Any]) -> str | None:
    """"chest", "near chest", "other" or None (unknown) for one Body Part Examined term."""
    table, chest = body_part_table(), _chest_codes(spec)
    if term in spec["body_parts"] or (term in table and table[term][:2] in chest):
        return "chest"
    if term in CHEST_PARTS:
        return "near chest"
    return "other" if term in table else None


def body_region(fields: Mapping[str, str], spec: Mapping[str, Any]) -> tuple[str | None, str]:
    """What the header says was examined: ("chest" | "near chest" | "other" | None, what it says).

    Body Part Examined first (a defined term of Table L-1, or a free text whose words hold one, e.g.
    "PED CHEST"); where it is absent or unknown, the Anatomic Region Sequence's code (CID 4031)."""
    body = str(fields.get("BodyPartExamined", "")).strip().upper()
    said = f"body part {body}" if body else ""
    region = _region_of_term(body, spec) if body else None
    if body and region is None:
        words = {_region_of_term(word, spec) for word in re.split(r"[^A-Z]+", body) if word}
        words.discard(None)
        region = words.pop() if len(words) == 1 else None  # mixed words ("CHEST HIP") stay unknown
    if region is not None:
        return region, said
    value = str(fields.get("AnatomicRegionValue", "")).strip()
    if value:
        scheme = str(fields.get("AnatomicRegionSchemeDesignator", "")).strip().upper()
        meaning = str(fields.get("AnatomicRegionMeaning", "")).strip()
        coded = f"anatomic region {meaning or value} ({scheme} {value})"
        said = f"{said}, {coded}" if said else coded
        if (scheme, value) in _chest_codes(spec):
            return "chest", said
        keys = [key for key, code in body_part_table().items() if code[:2] == (scheme, value)]
        if keys:
            return ("near chest" if any(k in CHEST_PARTS for k in keys) else "other"), said
    return None, said


def modality_outcome(fields: Mapping[str, str], spec: Mapping[str, Any]) -> tuple[str, str]:
    """(outcome, reason) from Modality and Conversion Type (PS3.3 C.7.3.1.1.1, C.8.6.1)."""
    modality = str(fields.get("Modality", "")).strip().upper()
    conversion = str(fields.get("ConversionType", "")).strip().upper()
    if conversion == SCANNED_DOCUMENT:
        return NOT_A_CHEST_RADIOGRAPH, "the DICOM header says it is a scanned document (conversion type SD)"
    if not modality or modality in spec["modalities"] or modality in RADIOGRAPH_MODALITIES:
        return VERDICT, ""
    if conversion == DIGITISED_FILM:  # a digitised film keeps whatever modality its digitiser wrote (OT, SC, ...)
        return VERDICT, ""
    if modality in NOT_RADIOGRAPH_MODALITIES:
        return NOT_A_CHEST_RADIOGRAPH, f"the DICOM header says modality {modality}, not a radiograph (CR or DX)"
    if modality in XRAY_NOT_RADIOGRAPH:
        return OUTSIDE_INTENDED_USE, (f"the DICOM header says modality {modality} (fluoroscopy or angiography); the "
                                      f"model was made for radiographs ({'/'.join(spec['modalities'])})")
    return OUTSIDE_INTENDED_USE, (f"the DICOM header says modality {modality}, which the guard cannot place; the "
                                  f"model was made for radiographs ({'/'.join(spec['modalities'])})")


def header_outcome(fields: Mapping[str, str], spec: Mapping[str, Any]) -> tuple[str, str]:
    """(outcome, reason) from the DICOM header; (VERDICT, "") when nothing in it rules the film out."""
    outcome, reason = modality_outcome(fields, spec)
    if outcome == NOT_A_CHEST_RADIOGRAPH:
        return outcome, reason
    region, said = body_region(fields, spec)
    if region == "other":
        return NOT_A_CHEST_RADIOGRAPH, f"the DICOM header says {said}, not the chest"
    if outcome != VERDICT:
        return outcome, reason
    if region == "near chest":
        return OUTSIDE_INTENDED_USE, (f"the DICOM header says {said}, a part of the chest or a region holding it "
                                      "rather than the chest itself; the model was made for frontal chest radiographs")
    if region is None and said:
        return OUTSIDE_INTENDED_USE, (f"the DICOM header says {said}, which the guard cannot place (PS3.16 Table L-1); "
                                      "the model was made for chest radiographs")
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


# A chest film shows the mediastinum and spine (a vertical band in the middle) brighter than the lung fields
# either side of it; a negative (a MONOCHROME1 image exported as PNG/JPEG without inversion, the commonest
# DICOM-to-PNG mistake) shows them darker. On all 5,216 training films the band is brighter than the lungs by at
# least NEGATIVE_FILM_LIMIT of the grey range (docs/ood.md, scripts/measure_negative_films.py).
NEGATIVE_FILM_LIMIT = 0.02
_LUNG_ROWS, _LEFT_LUNG, _RIGHT_LUNG = (0.25, 0.70), (0.15, 0.35), (0.65, 0.85)
_BAND_ROWS, _BAND_COLUMNS = (0.20, 0.80), (0.44, 0.56)


def negative_film_score(pixels: np.ndarray) -> float:
    """Mean brightness of the lung fields minus that of the central band, on the 0-1 scale.

    Args:
        pixels: (S, S) uint8 model input, bone white (``ModelInput.pixels``).
    Returns:
        Below 0 for a film shown as a radiograph is (bright mediastinum); above ``NEGATIVE_FILM_LIMIT``
        for a film that looks inverted.
    """
    x = np.asarray(pixels, dtype=np.float64) / 255.0
    h, w = x.shape

    def box(rows, columns):
        return x[int(rows[0] * h):int(rows[1] * h), int(columns[0] * w):int(columns[1] * w)]

    lungs = np.concatenate([box(_LUNG_ROWS, _LEFT_LUNG).ravel(), box(_LUNG_ROWS, _RIGHT_LUNG).ravel()])
    return float(lungs.mean() - box(_BAND_ROWS, _BAND_COLUMNS).mean())


def looks_inverted(pixels: np.ndarray) -> bool:
    """The central band darker than the lungs by more than the limit, and more so than the film read turned
    by 90 degrees shows its band brighter (a film stored on its side puts the spine across the middle
    rows; read turned, it is a normal film)."""
    score = negative_film_score(pixels)
    return score > NEGATIVE_FILM_LIMIT and score + negative_film_score(np.asarray(pixels).T) > 0


def negative_film_reason(pixels: np.ndarray, dicom: bool = False) -> str:
    """The reason to withhold a film that looks inverted (negative), or ''. ``dicom``: the film came as a
    DICOM object, whose header (Photometric Interpretation, Presentation LUT Shape) was applied already."""
    if not looks_inverted(pixels):
        return ""
    score = negative_film_score(pixels)
    cause = ("its stored grey levels run opposite to what its header's Photometric Interpretation says" if dicom
             else "as when a MONOCHROME1 DICOM is exported to PNG/JPEG without inverting it")
    return (f"the film looks inverted (a negative: lungs brighter than the spine and mediastinum, by {score:.2f}; "
            f"limit {NEGATIVE_FILM_LIMIT:.2f}), {cause}")


def plain_reason(reason: str) -> str:
    """A withheld film's reason in a clinician's words: without the measurements and header codes in brackets
    (the whole reason stays one click away on the screen, and on a "Details" line in a report)."""
    return " ".join(re.sub(r"\s*\([^()]*\)", "", reason).split())


def advice(outcome: str, reason: str) -> str:
    """What the clinician can do about a withheld verdict, fitted to its reason."""
    if "looks inverted" in reason and "Photometric Interpretation" in reason:
        return ("Read the film without the model, and ask for it to be sent again from the modality or the PACS "
                "with bone shown white (its header and its pixels disagree).")
    if "looks inverted" in reason:
        return ("Export the film again so that bone is white (a MONOCHROME1 image must be inverted when saved as "
                "PNG/JPEG), or upload the DICOM from the PACS.")
    if "DICOM header says" in reason and "cannot place" in reason:
        return ("The DICOM header does not say plainly that this is a chest radiograph: read the film without the "
                "model, or ask for the header to be corrected at the source.")
    return WHAT_TO_DO.get(outcome, "")


def image_outcome(input_reason: str, feature_reason: str) -> tuple[str, str]:
    """(outcome, reason) from the image checks: the input checks find photos and documents (not a chest
    radiograph); the feature checks find films unlike the training data (outside intended use)."""
    if input_reason:
        return NOT_A_CHEST_RADIOGRAPH, input_reason
    if feature_reason:
        return OUTSIDE_INTENDED_USE, feature_reason
    return VERDICT, ""
