"""One film's result as the clinician reads it: the patient, the verdict (or why there is none), the film with
its heatmap, and the downloads. Any page showing a single result imports ``result_ui`` (Diagnose does; a
worklist page can too): the same screen everywhere, recorded in the audit log before it is shown.

    from pages.result_view import report_input_for, result_ui
    result_ui(model, report_input_for(analysis.analyse(model, data, name), threshold, prevalence, data))
"""
from __future__ import annotations

import numpy as np
import streamlit as st

from pages.common import audit_trail, escape_markdown, record_shown
from xray.decide.decision import BORDERLINE, PNEUMONIA, band_limits
from xray.decide.prevalence import adjust_to_prevalence
from xray.io.loader import DICOM_DISPLAY_FIELDS
from xray.model.registry import LoadedModel
from xray.report import exports, writers
from xray.serve import analysis, hirescam
from xray.model.ood import measured_phrase
from xray.serve.guard import NOT_A_CHEST_RADIOGRAPH, OUTSIDE_INTENDED_USE, advice, plain_reason

HEATMAPS_KEY = "result_heatmaps"  # {(sha256, model version): (display pixels, display-size colour levels)}
HEATMAP_CAPTION = "Evidence for pneumonia: colour marks the regions that raised p(pneumonia)"
DICOM_LABELS = {"Modality": "Modality", "ViewPosition": "View position", "BodyPartExamined": "Body part",
                "PatientAge": "Patient age", "PatientSex": "Patient sex",
                "PhotometricInterpretation": "Photometric interpretation"}
# the decision as the single-image view shows it: colour, icon and word (readable without colour vision)
DECISION_STYLE = {PNEUMONIA: ("red", ":material/warning:"), BORDERLINE: ("orange", ":material/help:"),
                  "NORMAL": ("green", ":material/check_circle:")}
DECISION_BACKGROUND = {PNEUMONIA: "#ffdede", BORDERLINE: "#ffe9cc", "NORMAL": "#dcf3e2"}  # the same, in tables


def report_input_for(result: analysis.Analysis, threshold: float, prevalence: float,
                     data: bytes | None = None) -> writers.ReportInput:
    """One film as ``result_ui`` and its reports show it, at the settings in force; ``data``, the file's bytes,
    gives the DICOM header (for the DICOM results) and the patient. For a page that has a film's bytes."""
    dicom = data is not None and result.image is not None and result.image.format == "DICOM"
    return writers.ReportInput(result, threshold, prevalence, writers.read_dicom_header(data) if dicom else None,
                               writers.read_patient(data) if dicom else [])


def heatmap_legend(model: LoadedModel) -> str:
    """What the colours mean, as measured on validation films (``hirescam``; docs/heatmaps.md)."""
    measured = "" if model.version == hirescam.MEASURED_ON else f" (measured for model {hirescam.MEASURED_ON})"
    return (f"Same colour scale on every film. No colour: little or no evidence for pneumonia. Yellow: some "
            f"evidence; orange: more. On validation films{measured}, about 1 normal film in "
            f"{round(1 / hirescam.NORMAL_FILMS_COLOURED)} showed a small yellow patch and "
            f"{hirescam.PNEUMONIA_FILMS_COLOURED:.0%} of pneumonia films showed colour: colour on its own is not "
            "a finding.")


def cached_heatmap(model: LoadedModel, result: analysis.Analysis) -> tuple[np.ndarray, np.ndarray]:
    """(display pixels, evidence colour levels at display size) of one film, once per session and model."""
    heatmaps = st.session_state.setdefault(HEATMAPS_KEY, {})
    key = (result.sha256, model.version)
    if key not in heatmaps:
        with st.spinner("Computing the heatmap..."):
            heatmaps[key] = (analysis.display_pixels(result.image), analysis.display_colour_levels(model, result.image))
    return heatmaps[key]


def forget_heatmaps(keep: set[tuple[str, str]]) -> None:
    """Drop heatmaps of films no longer on the page."""
    store = st.session_state.get(HEATMAPS_KEY, {})
    for key in [k for k in store if k not in keep]:
        del store[key]


def patient_ui(item: writers.ReportInput) -> None:
    """Who and which study, as the DICOM carries them (and the report prints them): before any result."""
    fields = item.patient_fields
    if not fields:
        st.caption("Not a DICOM file: no patient or study details are attached to it. Check the film belongs to "
                   "your patient before reading the result.")
        return
    with st.container(border=True):
        st.markdown("  \n".join(f"**{label}:** {escape_markdown(value)}" for label, value in fields))


def decision_ui(decision: str, threshold: float, limits) -> None:
    colour, icon = DECISION_STYLE[decision]
    with st.container(key="result_decision"):
        st.markdown(f"#### :{colour}-background[{icon} {decision}]")
        st.caption(f"Decision at threshold {threshold:.6f}.")
        if decision == BORDERLINE:
            st.caption(f"Borderline: p(pneumonia) lies between {limits[0]:.3f} and {limits[1]:.3f}, where a small "
                       "change of exposure or framing flips this model's call on validation films. Read the film "
                       "without relying on the model.")


def verdict_ui(model: LoadedModel, result: analysis.Analysis, threshold: float, prevalence: float) -> bool:
    """The verdict at ``threshold`` (or why there is none); False when it may not be shown (audit log down)."""
    prediction = result.prediction
    if not record_shown(result.sha256, prediction, threshold):  # logged before it is shown, or not shown
        return False
    if prediction.withheld:
        title = ("Not a chest radiograph" if prediction.outcome == NOT_A_CHEST_RADIOGRAPH
                 else "Outside the intended use")
        reason = plain_reason(prediction.withheld_reason)
        st.warning(f"**{title}**" + (f": {escape_markdown(reason)}." if reason else ".")
                   + "  \nNo pneumonia verdict is given for it. " + advice(prediction.outcome, prediction.withheld_reason),
                   icon=":material/block:")
        if prediction.outcome == OUTSIDE_INTENDED_USE and measured_phrase(model.card.ood):
            st.caption(measured_phrase(model.card.ood))  # how often the guard withholds, as measured
        with st.expander("Details"):
            st.markdown(escape_markdown(prediction.withheld_reason))
            # withheld means withheld: the score stays out of the screen's primary text and every download
            st.markdown(f":gray[The model's output was {prediction.p_pneumonia:.3f}; it is not interpretable for "
                        "this film and is not for clinical use.]")
        return True
    st.metric("p(pneumonia)", f"{prediction.p_pneumonia:.3f}")
    st.progress(prediction.p_pneumonia)
    calibrated_at = model.card.calibration_prevalence
    if abs(prevalence - calibrated_at) > 1e-9:
        adjusted = float(adjust_to_prevalence(prediction.p_pneumonia, calibrated_at, prevalence))
        st.markdown(f"At this site's prevalence ({prevalence:.0%}): **p(pneumonia) {adjusted:.3f}**")
    decision = prediction.decision(threshold)
    limits = band_limits(threshold, prediction.band)
    decision_ui(decision, threshold, limits)
    with st.expander("Details"):
        if limits is not None and decision != BORDERLINE:
            st.markdown(f"Outside the borderline band {limits[0]:.3f}-{limits[1]:.3f}.")
        if abs(prevalence - calibrated_at) > 1e-9:
            st.markdown(f"The model's probability is calibrated at {calibrated_at:.0%} prevalence; the decision "
                        "compares the model's probability with the threshold, so it does not depend on the "
                        "prevalence setting.")
    return True


def film_facts_ui(result: analysis.Analysis) -> None:
    """Model version, size and format; how the file was read and its DICOM fields one click away."""
    st.caption(f"Model version {result.prediction.model_version}. Image {result.image.size[0]} x "
               f"{result.image.size[1]} pixels, {result.image.format}.")
    header = result.image.dicom_header
    if result.image.notes or header:
        with st.expander("How the file was read"):
            if result.image.notes:  # VOI rule, TIFF page, inferred transfer syntax
                st.markdown(escape_markdown("; ".join(result.image.notes)))
            if header:
                keys = [k for k in DICOM_DISPLAY_FIELDS if k in header]
                # a dataframe renders cell text literally: header values never reach markdown or HTML
                st.dataframe({"Field": [DICOM_LABELS.get(k, k) for k in keys], "Value": [header[k] for k in keys]},
                             hide_index=True, key=f"result_dicom_{result.sha256[:12]}")


def downloads_ui(model: LoadedModel, item: writers.ReportInput) -> None:
    """PDF report (and DICOM results for DICOM inputs) of what the screen shows; each download is audited."""
    result, trail = item.analysis, audit_trail()
    stem = exports.file_stem(result.name)
    st.download_button("Download report (PDF)", data=lambda: exports.report_pdf(model, item, trail),
                       file_name=f"{stem}-report.pdf", mime="application/pdf", on_click="ignore",
                       icon=":material/picture_as_pdf:", key=f"result_report_{result.sha256[:12]}")
    if item.dicom is not None:
        st.download_button("Download DICOM results", data=lambda: exports.dicom_results(model, item, trail),
                           file_name=f"{stem}-results.zip", mime="application/zip", on_click="ignore",
                           icon=":material/download:", key=f"result_dicom_results_{result.sha256[:12]}",
                           help="A Secondary Capture with the heatmap and the result, and a structured report, in "
                                "this film's study, for the PACS")


def film_ui(model: LoadedModel, result: analysis.Analysis, show: bool, opacity: float, where) -> None:
    """The film alone, or under its heatmap, in the container ``where``."""
    if not show or result.prediction.withheld:
        where.image(analysis.display_pixels(result.image), caption="As uploaded", width="stretch")
        return
    pixels, cam = cached_heatmap(model, result)
    where.image(analysis.overlay_jpeg(pixels, cam, opacity), caption=HEATMAP_CAPTION, width="stretch")


def legend_ui(model: LoadedModel, result: analysis.Analysis, opacity: float) -> None:
    pixels, cam = cached_heatmap(model, result)
    st.image(hirescam.legend(), width=256)
    st.caption(heatmap_legend(model))
    with st.expander("Details of the colour scale"):
        st.markdown(f"Each of the 8 x 8 regions is coloured by its share of the calibrated log-odds of pneumonia: "
                    f"no colour below {hirescam.EVIDENCE_FLOOR}, full colour at {hirescam.EVIDENCE_FULL_SCALE} per "
                    f"region. On the {hirescam.MEASURED_ON} validation films: {hirescam.NORMAL_FILMS_COLOURED:.1%} "
                    f"of normal films had a coloured region and {hirescam.NORMAL_FILMS_PAST_MIDDLE:.1%} one past the "
                    f"middle of the scale; {hirescam.PNEUMONIA_FILMS_COLOURED:.1%} of pneumonia films had a coloured "
                    f"region, {hirescam.PNEUMONIA_FILMS_PAST_MIDDLE:.1%} one past the middle; the strongest region "
                    f"of a pneumonia film had median {hirescam.PNEUMONIA_STRONGEST_CELL_MEDIAN:.2f}.")
    # PNG encoding is slow at full size: done only when the clinician clicks
    st.download_button("Download overlay (PNG)", data=lambda: analysis.overlay_png(pixels, cam, opacity),
                       mime="image/png", on_click="ignore",
                       file_name=f"{exports.file_stem(result.name)}-evidence.png", icon=":material/download:",
                       key=f"result_download_overlay_{result.sha256[:12]}")


@st.fragment
def result_ui(model: LoadedModel, item: writers.ReportInput) -> None:
    """One film's screen: patient first, then verdict and downloads beside the film (or, side by side,
    above the film and its heatmap at half the page width each). Its own controls rerun only this part."""
    result, threshold = item.analysis, item.threshold
    st.subheader(escape_markdown(result.name))
    patient_ui(item)
    show, side_by_side, opacity = True, False, 0.4
    if not result.prediction.withheld:
        show_column, side_column, opacity_column = st.columns([1, 1, 2], vertical_alignment="center")
        show = show_column.toggle("Heatmap", value=True, key="result_heatmap_on")
        side_by_side = side_column.toggle("Side by side", value=False, key="result_side_by_side", disabled=not show)
        opacity = opacity_column.slider("Heatmap opacity", 0.0, 1.0, 0.4, 0.05, key="result_opacity",
                                        disabled=not show)
    if show and side_by_side:
        if not verdict_ui(model, result, threshold, item.prevalence):
            return
        downloads_ui(model, item)
        left, right = st.columns(2)
        left.image(analysis.display_pixels(result.image), caption="As uploaded", width="stretch")
        film_ui(model, result, True, opacity, right)
    else:
        image_column, verdict_column = st.columns([3, 2], gap="large")
        with verdict_column:
            if not verdict_ui(model, result, threshold, item.prevalence):
                return
            downloads_ui(model, item)
        film_ui(model, result, show, opacity, image_column)
    if show and not result.prediction.withheld:
        legend_ui(model, result, opacity)
    film_facts_ui(result)
