"""Results that leave the screen: a printable PDF report per image, a worklist PDF, and DICOM results
for the PACS (a Secondary Capture of the radiograph with its heatmap and a result banner, and a
Comprehensive SR), all made from the same ``Prediction``, threshold and prevalence as the screen.

PDF: fpdf2 (pure Python, embeds TrueType fonts, so any Unicode name prints; DejaVu Sans and, for the
scripts it lacks (CJK), Droid Sans Fallback ship in ``xray/report/fonts`` under their free licences). DICOM: highdicom (SC Image, PS3.3 A.8; Comprehensive SR,
PS3.3 A.35.3, with the Measurement Report template TID 1500/1501 and Algorithm Identification
TID 4019). Pneumonia is SNOMED CT 233604007; present/absent/indeterminate are SCT 52101004 / 2667000 /
82334004. Nothing is written over an existing file unless asked; every file is written atomically.
"""
from __future__ import annotations

import copy
import datetime as dt
import io
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from xray.serve import guard
from xray.serve.analysis import Analysis, display_colour_levels, display_pixels
from xray.atomic import atomic_write_bytes
from xray.decide.decision import BORDERLINE, PNEUMONIA, band_limits
from xray.decide.metrics import sensitivity_specificity
from xray.serve.hirescam import overlay
from xray.decide.prevalence import adjust_to_prevalence
from xray.model.registry import LoadedModel

FONT_DIR = Path(__file__).resolve().parent / "fonts"
FONT, FONT_BOLD = FONT_DIR / "DejaVuSans.ttf", FONT_DIR / "DejaVuSans-Bold.ttf"
FONT_FALLBACK = FONT_DIR / "DroidSansFallbackFull.ttf"  # CJK and other scripts DejaVu lacks (Apache 2.0)
MANUFACTURER = "Pneumonia X-ray assistant"
ALGORITHM = "Pneumonia X-ray assistant CNN"
NOT_ASSESSED = "Pneumonia not assessed"  # the SR's comment for a film without a verdict, then why
DISCLAIMER = "Decision support, not a diagnosis: the decision stays with the clinician who reads the image."


@dataclass
class ReportInput:
    """One image as a report shows it: the analysis, the settings in force, and the DICOM source if any."""

    analysis: Analysis
    threshold: float
    prevalence: float  # the site's prevalence the adjusted probability assumes
    dicom: object | None = None  # pydicom Dataset of the input (header only), when the input was DICOM
    patient: list[tuple[str, str]] | None = None  # ``read_patient`` of the input; None: from ``dicom``

    @property
    def patient_fields(self) -> list[tuple[str, str]]:
        """The patient and study as the screen shows them (``patient_fields``)."""
        return self.patient if self.patient is not None else patient_fields(self.dicom)

    @property
    def decision(self) -> str | None:
        prediction = self.analysis.prediction
        return prediction.decision(self.threshold) if prediction is not None else None


OUTPUT_CHARACTER_SET = "ISO_IR 192"  # UTF-8: every name in any script, declared (PS3.3 C.12.1.1.2)
_TEXT_VRS = {"PN", "LO", "SH", "ST", "LT", "UT", "UC"}  # the VRs Specific Character Set applies to (PS3.5 6.1.2.3)
_PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}


def _undeclared_set(ds) -> str | None:
    """The character set of a header that declares none but holds non-ASCII text: ISO_IR 192 when every
    such value is valid UTF-8, else ISO_IR 100 (Latin-1, what old Western systems write); None when all
    text is ASCII (the default repertoire is right)."""
    values = []
    for tag in ds.keys():
        raw = ds.get_item(tag)
        if getattr(raw, "VR", None) in _TEXT_VRS and isinstance(raw.value, (bytes, bytearray)):
            values.append(bytes(raw.value))
    if all(v.isascii() for v in values):
        return None
    try:
        for value in values:
            value.decode("utf-8")
    except UnicodeDecodeError:
        return "ISO_IR 100"
    return "ISO_IR 192"


def utf8_header(ds):
    """A copy of a DICOM header (no pixel data) with its text decoded by its own Specific Character Set
    (single-byte, UTF-8 or ISO 2022 code extensions such as ISO 2022 IR 87; for bytes it does not declare,
    ``_undeclared_set``), declaring ISO_IR 192, so that results written from it are valid whatever the
    input's set. The caller's dataset is not changed."""
    import pydicom

    header = pydicom.Dataset()
    for tag in ds.keys():
        if int(tag) not in _PIXEL_TAGS:
            header[tag] = copy.deepcopy(ds.get_item(tag))  # raw elements stay raw until decoded below
    if "file_meta" in ds.__dict__ or getattr(ds, "file_meta", None) is not None:
        header.file_meta = copy.deepcopy(ds.file_meta)
    declared = header.get("SpecificCharacterSet")
    if not declared or declared == [] or all(not str(v).strip() for v in ([declared] if isinstance(declared, str) else declared)):
        guessed = _undeclared_set(header)
        if guessed is not None:
            header.SpecificCharacterSet = guessed
    with warnings.catch_warnings():  # a byte outside the declared set is replaced, not fatal
        warnings.simplefilter("ignore")
        header.decode()
    _reencode_names(header)
    header.SpecificCharacterSet = OUTPUT_CHARACTER_SET
    return header


def _reencode_names(ds) -> None:
    """Person names rebuilt from their decoded text with UTF-8 as their encoding, so none keeps the input's
    bytes or set (a PersonName carries its own encodings, which later writers use)."""
    from pydicom.charset import convert_encodings
    from pydicom.valuerep import PersonName

    utf8 = convert_encodings([OUTPUT_CHARACTER_SET])
    for element in ds.iterall():
        if element.VR == "PN" and element.value is not None:
            if isinstance(element.value, (list, tuple)) or type(element.value).__name__ == "MultiValue":
                element.value = [PersonName(str(v), encodings=utf8) for v in element.value]
            else:
                element.value = PersonName(str(element.value), encodings=utf8)


def read_dicom_header(data: bytes):
    """The input's DICOM header (no pixels), or None for other formats, with its text decoded and declared
    as ISO_IR 192 (``utf8_header``). Type 2 patient and study attributes a writer may have left out are
    added empty, as PS3.3 allows, so that results copy them."""
    try:
        import pydicom

        ds = utf8_header(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True))
    except Exception:
        return None
    if "SOPInstanceUID" not in ds or "StudyInstanceUID" not in ds or "SOPClassUID" not in ds:
        return None
    for key in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "ReferringPhysicianName", "AccessionNumber", "StudyID"):
        if key not in ds:
            setattr(ds, key, "")
    return ds


DECISION_COLOURS = {PNEUMONIA: (192, 57, 43), BORDERLINE: (211, 84, 0)}  # RGB; NORMAL green, no verdict grey


def decision_colour(decision: str | None) -> tuple[int, int, int]:
    """The colour a report prints ``decision`` in: red, orange, green, or grey for no verdict (None)."""
    if not decision:
        return (90, 90, 90)
    return DECISION_COLOURS.get(decision, (39, 119, 72))


def result_line(item: ReportInput) -> str:
    """The result in one line, exactly as the screen states it."""
    a = item.analysis
    if a.prediction is None:
        return f"Not analysed: {a.error}"
    p = a.prediction
    if p.withheld:  # in the screen's words; the measurements go on the page's "Details" line
        return f"No verdict ({p.outcome}): {guard.plain_reason(p.withheld_reason) or p.outcome}"
    return f"p(pneumonia) {p.p_pneumonia:.3f}: {item.decision} at threshold {item.threshold:.6f}"


PATIENT_FIELDS = (("PatientName", "Patient"), ("PatientID", "Patient ID"), ("PatientBirthDate", "Birth date"),
                  ("StudyDate", "Study date"), ("AccessionNumber", "Accession number"))


def patient_fields(ds) -> list[tuple[str, str]]:
    """(label, value) of the patient and study as the DICOM carries them (PS3.3 C.7.1.1, C.7.2.1), in
    ``PATIENT_FIELDS`` order; an absent or empty field reads "not recorded". Empty for non-DICOM inputs.
    The one list the screen and the PDF both print."""
    if ds is None:
        return []
    fields = []
    for key, label in PATIENT_FIELDS:
        value = " ".join(str(ds.get(key, "") or "").split())
        fields.append((label, value or "not recorded"))
    return fields


def read_patient(data: bytes) -> list[tuple[str, str]]:
    """``patient_fields`` of a DICOM file's bytes (any DICOM, study UIDs or not); empty for other formats."""
    try:
        import pydicom

        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
    except Exception:
        return []
    if "SOPClassUID" not in ds and "PatientName" not in ds and "PatientID" not in ds:
        return []
    return patient_fields(ds)


def _patient_lines(item: ReportInput) -> list[str]:
    return [f"{label}: {value}" for label, value in item.patient_fields]


# -- PDF --------------------------------------------------------------------------------------------------
def _pdf():
    from fpdf import FPDF

    pdf = FPDF(format="A4", unit="mm")
    pdf.set_auto_page_break(auto=True, margin=12)
    pdf.add_font("DejaVu", "", str(FONT))
    pdf.add_font("DejaVu", "B", str(FONT_BOLD))
    pdf.add_font("DroidFallback", "", str(FONT_FALLBACK))
    pdf.set_fallback_fonts(["DroidFallback"], exact_match=False)  # a character DejaVu lacks is never dropped
    pdf.set_title("Pneumonia X-ray assistant report")
    pdf.set_creator(MANUFACTURER)
    return pdf


def _pictures(model: LoadedModel, item: ReportInput) -> tuple[Image.Image, Image.Image | None]:
    """(film, film with heatmap or None when withheld) at display size, aspect ratio kept."""
    image = item.analysis.image
    pixels = display_pixels(image)
    film = Image.fromarray(pixels)
    prediction = item.analysis.prediction
    if prediction is None or prediction.withheld:
        return film, None
    return film, Image.fromarray(overlay(pixels, display_colour_levels(model, image), 0.45))


def _text(pdf, text: str, size: float = 10, bold: bool = False, height: float = 5.2) -> None:
    pdf.set_font("DejaVu", "B" if bold else "", size)
    pdf.multi_cell(0, height, text, new_x="LMARGIN", new_y="NEXT")


def add_page(pdf, model: LoadedModel, item: ReportInput) -> None:
    """One image's page: film and heatmap side by side, the result, what the threshold means, the model,
    the file's SHA-256, the patient (DICOM inputs that carry one), the intended use and limits."""
    card, a = model.card, item.analysis
    pdf.add_page()
    _text(pdf, "Chest radiograph: pneumonia assistant report", 15, True, 8)
    for line in _patient_lines(item):
        _text(pdf, line, 10)
    _text(pdf, f"File: {a.name}", 9)
    _text(pdf, f"SHA-256: {a.sha256}", 8)
    if a.image is not None:
        film, heat = _pictures(model, item)
        top, width = pdf.get_y() + 2, 88.0
        height = min(110.0, width * film.height / film.width)
        width = height * film.width / film.height
        pdf.image(film, x=pdf.l_margin, y=top, w=width, h=height)
        if heat is not None:
            pdf.image(heat, x=pdf.l_margin + 94, y=top, w=width, h=height)
        pdf.set_y(top + height + 2)
        pdf.set_font("DejaVu", "", 8)
        pdf.cell(94, 4, "As uploaded")
        pdf.cell(0, 4, "Evidence for pneumonia (same colour scale on every image)" if heat is not None
                 else "No heatmap: no verdict is given for this image", new_x="LMARGIN", new_y="NEXT")
        pdf.ln(2)
    decision = item.decision
    pdf.set_text_color(*decision_colour(decision))
    _text(pdf, result_line(item), 12, True, 6.5)
    pdf.set_text_color(0, 0, 0)
    p = a.prediction
    if p is not None and not p.withheld:
        limits = band_limits(item.threshold, p.band)
        if decision == BORDERLINE:
            _text(pdf, f"Borderline: p(pneumonia) lies between {limits[0]:.3f} and {limits[1]:.3f}, where a small "
                       "change of exposure or framing flips the model's call. Read the film without the model.", 9)
        validation = card.validation
        if validation.labels is not None:
            sens, spec = sensitivity_specificity(validation.labels, np.array(validation.scores) >= item.threshold)
            _text(pdf, f"What the threshold means: on this version's validation images (n={sens.n + spec.n}), "
                       f"sensitivity {sens.value:.3f} and specificity {spec.value:.3f} at {item.threshold:.6f}.", 9)
        calibrated_at = card.calibration_prevalence
        adjusted = float(adjust_to_prevalence(p.p_pneumonia, calibrated_at, item.prevalence))
        _text(pdf, f"Probabilities are calibrated at {calibrated_at:.0%} pneumonia prevalence; at this site's "
                   f"prevalence ({item.prevalence:.0%}) the same evidence means p(pneumonia) {adjusted:.3f}. The "
                   "decision compares the model's probability with the threshold.", 9)
    elif p is not None:
        _text(pdf, guard.advice(p.outcome, p.withheld_reason), 9)
        if guard.plain_reason(p.withheld_reason) != " ".join(p.withheld_reason.split()):
            _text(pdf, f"Details: {p.withheld_reason}.", 8, height=4.2)  # what the screen shows under "Details"
    pdf.ln(1)
    _text(pdf, f"Model version {model.version} (created {card.created or 'unknown'}); report made "
               f"{dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.", 9)
    _text(pdf, "Intended use: " + card.intended_use, 8, height=4.2)
    for limit in card.limits:
        _text(pdf, "Limit: " + limit, 8, height=4.2)
    _text(pdf, DISCLAIMER, 9, True)


def pdf_bytes(model: LoadedModel, items: list[ReportInput]) -> bytes:
    """One page per image."""
    pdf = _pdf()
    for item in items:
        add_page(pdf, model, item)
    return bytes(pdf.output())


def worklist_pdf_bytes(model: LoadedModel, items: list[ReportInput]) -> bytes:
    """A table of every image, highest p(pneumonia) first with thumbnails, then one page per image."""
    order = sorted(items, key=lambda i: (i.decision is None, -(i.analysis.prediction.p_pneumonia
                                                              if i.analysis.prediction else 0.0)))
    pdf = _pdf()
    pdf.add_page()
    _text(pdf, "Worklist: pneumonia assistant", 15, True, 8)
    _text(pdf, f"Model version {model.version}; {len(items)} image(s); highest p(pneumonia) first.", 9)
    for item in order:
        y = pdf.get_y()
        if y > 265:
            pdf.add_page()
            y = pdf.get_y()
        if item.analysis.image is not None:
            thumb = Image.fromarray(display_pixels(item.analysis.image, 96))
            pdf.image(thumb, x=pdf.l_margin, y=y, h=14)
        pdf.set_xy(pdf.l_margin + 24, y)
        pdf.set_font("DejaVu", "B", 9)
        pdf.multi_cell(0, 4.5, item.analysis.name, new_x="LMARGIN", new_y="NEXT")
        pdf.set_x(pdf.l_margin + 24)
        pdf.set_font("DejaVu", "", 9)
        pdf.multi_cell(0, 4.5, result_line(item), new_x="LMARGIN", new_y="NEXT")
        pdf.set_y(max(pdf.get_y(), y + 16))
    _text(pdf, DISCLAIMER, 9, True)  # under the table; each image's page below ends with it too
    for item in order:
        add_page(pdf, model, item)
    return bytes(pdf.output())


# -- DICOM ------------------------------------------------------------------------------------------------
def _banner(picture: Image.Image, text: str, colour: tuple[int, int, int]) -> np.ndarray:
    """(H + band, W, 3) uint8: the picture under a result banner."""
    width = picture.width
    size = max(12, width // 40)
    font = ImageFont.truetype(str(FONT_BOLD), size)
    band = Image.new("RGB", (width, int(size * 2.2)), colour)
    ImageDraw.Draw(band).text((size // 2, size // 2), text[:200], fill=(255, 255, 255), font=font)
    out = Image.new("RGB", (width, band.height + picture.height))
    out.paste(band, (0, 0))
    out.paste(picture.convert("RGB"), (0, band.height))
    return np.asarray(out)


def secondary_capture(model: LoadedModel, item: ReportInput, series_uid: str | None = None,
                      sop_uid: str | None = None):
    """A Secondary Capture Image of the radiograph (with the heatmap when a verdict was given) under a
    result banner; in the input's study when the input was DICOM, else in a new study (said in the
    series description). ``sop_uid``: fixed by the DICOM node (one result per input), else new."""
    import highdicom as hd

    film, heat = _pictures(model, item)
    decision = item.decision
    colour = decision_colour(decision)
    pixels = _banner(heat or film, result_line(item) + f" | model {model.version} | decision support only", colour)
    common = dict(pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=8, coordinate_system="PATIENT",
                  series_instance_uid=series_uid or hd.UID(), series_number=900, sop_instance_uid=sop_uid or hd.UID(),
                  instance_number=1, manufacturer=MANUFACTURER,
                  series_description="Pneumonia assistant result", patient_orientation=("L", "F"))
    if item.dicom is not None:
        sc = hd.sc.SCImage.from_ref_dataset(utf8_header(item.dicom), **common)
    else:
        now = dt.datetime.now()
        sc = hd.sc.SCImage(study_instance_uid=hd.UID(), patient_id="", patient_name="", study_date=now.date(),
                           study_time=now.time(), **common)
        sc.SeriesDescription = "Pneumonia assistant result (new study: the input was not DICOM)"
    sc.ContentDate = dt.date.today().strftime("%Y%m%d")
    sc.ContentTime = dt.datetime.now().strftime("%H%M%S")
    sc.SpecificCharacterSet = OUTPUT_CHARACTER_SET
    sc.BurnedInAnnotation = "YES"
    if "Laterality" not in sc:
        sc.Laterality = ""  # type 2C of General Series: the chest is not a paired structure (present, empty)
    return sc


def _codes():
    import highdicom as hd

    return (hd.sr.CodedConcept("122157", "DCM", "Probability"), hd.sr.CodedConcept("122411", "DCM", "Threshold Value"),
            hd.sr.CodedConcept("1", "UCUM", "no units"))


def structured_report(model: LoadedModel, item: ReportInput, evidence, uids: tuple[str, str] | None = None):
    """A Comprehensive SR (TID 1500) holding the finding (pneumonia present / absent / indeterminate,
    or 'not assessed' with its reason, and then no p(pneumonia): a withheld verdict, or a film that could
    not be read), the threshold and the algorithm (TID 4019). It references ``evidence`` (the
    input's DICOM image, or the Secondary Capture for other inputs). ``uids``: (series, SOP instance),
    fixed by the DICOM node (one result per input), else new."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    evidence = evidence if "PixelData" in evidence and evidence.get("SpecificCharacterSet") == OUTPUT_CHARACTER_SET \
        else utf8_header(evidence)  # our own SC is UTF-8 already; an input header is decoded and declared
    pneumonia = hd.sr.CodedConcept("233604007", "SCT", "Pneumonia")
    present = {PNEUMONIA: hd.sr.CodedConcept("52101004", "SCT", "Present"),
               "NORMAL": hd.sr.CodedConcept("2667000", "SCT", "Absent"),
               BORDERLINE: hd.sr.CodedConcept("82334004", "SCT", "Indeterminate")}
    p = item.analysis.prediction
    probability, threshold_value, no_units = _codes()
    # DCM 122157 "Probability" in the group whose finding is pneumonia; DCM 122411 "Threshold Value";
    # UCUM "1" (no units): standard codes (PS3.16 Annex D), so no private coding scheme to declare.
    # No p(pneumonia) without a verdict, as on the PDF: withheld means withheld.
    measurements = [] if p is None or p.withheld else [
        hd.sr.Measurement(name=probability, value=round(float(p.p_pneumonia), 6), unit=no_units,
                          algorithm_id=hd.sr.AlgorithmIdentification(name=ALGORITHM, version=model.version))]
    measurements.append(hd.sr.Measurement(name=threshold_value, value=round(float(item.threshold), 6), unit=no_units))
    decision = item.decision
    evaluations = [hd.sr.QualitativeEvaluation(pneumonia, present[decision])] if decision in present else []
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="pneumonia assessment"),
        algorithm_id=hd.sr.AlgorithmIdentification(name=ALGORITHM, version=model.version),
        finding_type=pneumonia, measurements=measurements, qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(evidence)])
    if p is None or p.withheld:
        why = f"unreadable): {item.analysis.error}" if p is None else f"no verdict, {p.outcome}): {p.withheld_reason}"
        group[0].ContentSequence.append(hd.sr.TextContentItem(
            name=hd.sr.CodedConcept("121106", "DCM", "Comment"), value=f"{NOT_ASSESSED} ({why}"[:1024],
            relationship_type="CONTAINS"))
    observer = hd.sr.ObserverContext(observer_type=codes.cid270.Device,
                                     observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                                         uid=hd.UID(), name=ALGORITHM, model_name=model.version))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray"),
        imaging_measurements=[group])
    series_uid, sop_uid = uids or (hd.UID(), hd.UID())
    sr = hd.sr.ComprehensiveSR(evidence=[evidence], content=report[0], series_instance_uid=series_uid,
                               series_number=901, sop_instance_uid=sop_uid, instance_number=1,
                               manufacturer=MANUFACTURER, is_complete=True, is_final=False, is_verified=False,
                               series_description="Pneumonia assistant result (structured report)")
    sr.SpecificCharacterSet = OUTPUT_CHARACTER_SET
    return sr


def dicom_results_zip(model: LoadedModel, item: ReportInput, stem: str) -> bytes:
    """A zip of the DICOM results of one DICOM input: ``{stem}.sc.dcm`` (Secondary Capture with the
    heatmap and the result) and ``{stem}.sr.dcm`` (the structured report referencing the input), both
    in the input's study.

    Raises:
        ValueError: the input was not DICOM (``item.dicom`` is None).
    """
    if item.dicom is None:
        raise ValueError("DICOM results are made for DICOM inputs only")
    sc = secondary_capture(model, item)
    sr = structured_report(model, item, item.dicom)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(f"{stem}.sc.dcm", dicom_bytes(sc))
        archive.writestr(f"{stem}.sr.dcm", dicom_bytes(sr))
    return buffer.getvalue()


def dicom_bytes(dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write(path: Path, data: bytes, force: bool) -> None:
    """Atomically, never over an existing file unless ``force``."""
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists (use --force to overwrite it)")
    atomic_write_bytes(path, data)
