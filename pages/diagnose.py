"""Diagnose: drop chest X-rays (or try a sample), read p(pneumonia), the decision at the session's
threshold and where the evidence lies (HiResCAM heatmap on a fixed scale); the sidebar trades sensitivity against precision."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from pages.common import (
    PRESET_MIN_GAP,
    PRESET_RULES,
    audit_trail,
    current_actor,
    current_threshold,
    escape_markdown,
    is_administrator,
    record_shown,
    require_model,
    set_threshold,
    validation_predictions,
)
from xray.serve import analysis
from xray.decide import metrics
from xray.report import writers as report
from xray.govern import siteconfig
from xray.decide.decision import BORDERLINE, PNEUMONIA, band_limits
from xray.serve.hirescam import EVIDENCE_FLOOR, EVIDENCE_FULL_SCALE
from xray.serve.hirescam import legend as heatmap_legend
from xray.serve.guard import NOT_A_CHEST_RADIOGRAPH, OUTSIDE_INTENDED_USE, advice
from xray.model.ood import measured_phrase
from xray.io.loader import DICOM_DISPLAY_FIELDS
from xray.decide.prevalence import adjust_to_prevalence, estimate_prevalence, predictive_values
from xray.model.card import operating_figures
from xray.model.registry import LoadedModel, Registry, sha256_bytes

SAMPLES_DIR = Path(__file__).resolve().parent.parent / "samples"
SLIDER_KEY = "diagnose_threshold"  # mirrors pages.common.THRESHOLD_KEY
EXACT_KEY = "diagnose_threshold_exact"  # the same, typed to six decimals
RESULTS_KEY = "diagnose_results"  # {(sha256, model version): {"analysis": Analysis, "thumbnail": str}}
HEATMAPS_KEY = "diagnose_heatmaps"  # {(sha256, model version): (display pixels, display-size CAM)}
HEATMAP_CAPTION = "Evidence for pneumonia: colour marks the regions that raised p(pneumonia)"
HEATMAP_LEGEND = (f"Same scale on every image: no colour below {EVIDENCE_FLOOR} (little or no evidence, or evidence "
                  f"against), yellow = weak, red = strong (at least {EVIDENCE_FULL_SCALE} log-odds per region). "
                  "A normal film usually shows little or no colour.")
SAMPLES_KEY = "diagnose_samples"
PREVALENCE_KEY = "diagnose_prevalence"  # the session's prevalence (from the site's saved setting)
EM_MIN_IMAGES = 30
WORKLIST_ORDER_KEY = "diagnose_worklist_order"
DICOM_HEADERS_KEY = "diagnose_dicom_headers"  # {sha256: the DICOM input's header (no pixels) or None}  # sha256 of each worklist row, in display order
REVIEW_PICK_KEY = "diagnose_review_pick"  # the row a click chose, applied before the review selectbox  # bundled sample paths the clinician chose to try
DICOM_LABELS = {"Modality": "Modality", "ViewPosition": "View position", "BodyPartExamined": "Body part",
                "PatientAge": "Patient age", "PatientSex": "Patient sex",
                "PhotometricInterpretation": "Photometric interpretation"}


# -- engine calls, cached per (file content, model version) so reruns never re-run the model --------
SAVE_WHY_KEY, SAVE_CONFIRM_KEY = "diagnose_save_why", "diagnose_save_confirm"
SAVED_KEY, SAVE_ERROR_KEY = "diagnose_saved", "diagnose_save_error"

def cached_result(model: LoadedModel, name: str, data: bytes) -> dict:
    """Analysis (and worklist thumbnail) of one file, computed once per session and model."""
    results = st.session_state.setdefault(RESULTS_KEY, {})
    key = (sha256_bytes(data), model.version)
    if key not in results:
        result = analysis.analyse(model, data, name)
        thumbnail = analysis.thumbnail_data_uri(result.image) if result.image is not None else None
        header = report.read_dicom_header(data) if result.image is not None and result.image.format == "DICOM" else None
        st.session_state.setdefault(DICOM_HEADERS_KEY, {})[result.sha256] = header
        results[key] = {"analysis": result, "thumbnail": thumbnail}
    return results[key]


def cached_heatmap(model: LoadedModel, result: analysis.Analysis) -> tuple[np.ndarray, np.ndarray]:
    """(display pixels, evidence colour levels at display size) of one image, once per session and model."""
    heatmaps = st.session_state.setdefault(HEATMAPS_KEY, {})
    key = (result.sha256, model.version)
    if key not in heatmaps:
        with st.spinner("Computing the heatmap..."):
            heatmaps[key] = (analysis.display_pixels(result.image), analysis.display_colour_levels(model, result.image))
    return heatmaps[key]


def forget_other_files(keep: set[tuple[str, str]]) -> None:
    """Drop results of files no longer on the page: uploads live in this session's memory only."""
    for state_key in (RESULTS_KEY, HEATMAPS_KEY):
        store = st.session_state.get(state_key, {})
        for key in [k for k in store if k not in keep]:
            del store[key]


# -- sidebar: the operating threshold and what it means on validation ------------------------------
def save_site_threshold(model: LoadedModel, threshold: float) -> None:
    """Save the threshold for this site (not in the model's card), by the signed-in user, with why; audited."""
    why = st.session_state.get(SAVE_WHY_KEY, "")
    try:
        saved = siteconfig.save_threshold(Registry(), model.version, threshold, why, actor=current_actor())
    except (OSError, ValueError) as exc:  # PermissionError (the role) is an OSError
        st.session_state[SAVE_ERROR_KEY] = f"The threshold was not saved: {exc}"
        return
    st.session_state[SAVED_KEY] = f"Saved {saved.threshold:.6f} as this site's threshold for model {model.version}."


def restore_card_threshold(model: LoadedModel) -> None:
    """Forget the site's threshold: the model's own comes back, exactly."""
    try:
        siteconfig.restore_threshold(Registry(), model.version, actor=current_actor())
    except (OSError, ValueError) as exc:  # ModelFileError is a ValueError
        st.session_state[SAVE_ERROR_KEY] = f"The threshold was not restored: {exc}"
        return
    set_threshold(model.threshold)
    st.session_state[SAVED_KEY] = f"Restored the model's own threshold {model.threshold:.6f}."


def site_prevalence(model: LoadedModel) -> float:
    """The prevalence the page's figures assume: the session's setting (from the site's saved one, else
    the version's calibration prevalence)."""
    if PREVALENCE_KEY not in st.session_state:
        st.session_state[PREVALENCE_KEY] = Registry().site.prevalence_in_force(model.card.calibration_prevalence)
    return float(st.session_state[PREVALENCE_KEY])


def save_prevalence() -> None:
    try:
        siteconfig.save_prevalence(Registry(), st.session_state[PREVALENCE_KEY], actor=current_actor())
        st.session_state[SAVED_KEY] = f"Saved {st.session_state[PREVALENCE_KEY]:.1%} as this site's prevalence."
    except (OSError, ValueError) as exc:
        st.session_state[SAVE_ERROR_KEY] = f"The prevalence was not saved: {exc}"


def use_estimate(value: float) -> None:
    st.session_state[PREVALENCE_KEY] = value


def prevalence_sidebar(model: LoadedModel, readable: list) -> None:
    """The site's prevalence: what the adjusted probability, PPV and NPV assume; an EM estimate offered."""
    st.header("Prevalence at this site")
    site_prevalence(model)
    st.number_input("Pneumonia prevalence (share of patients with pneumonia)", 0.01, 0.99, step=0.01,
                    format="%.2f", key=PREVALENCE_KEY,
                    help=f"The model's probabilities are calibrated at {model.card.calibration_prevalence:.0%} "
                         "(its calibration set). PPV, NPV and the adjusted probability use this value.")
    if is_administrator(current_actor()):
        st.button("Save for this site", key="diagnose_save_prevalence", on_click=save_prevalence,
                  icon=":material/save:")
    scores = [a.prediction.p_pneumonia for a in readable if not a.prediction.withheld]
    if len(scores) >= EM_MIN_IMAGES:
        estimate = estimate_prevalence(scores, model.card.calibration_prevalence)
        st.caption(f"Estimated from the {len(scores)} images in the worklist (EM prior adjustment, Saerens et al. "
                   f"2002): {estimate:.1%}. An estimate, not a measurement: your choice.")
        st.button(f"Use {estimate:.0%}", key="diagnose_use_estimate", on_click=use_estimate, args=(round(estimate, 2),))
    else:
        st.caption(f"With at least {EM_MIN_IMAGES} scored images in the worklist, the page offers an estimate of the "
                   "prevalence from them.")


def calibration_in_force(model: LoadedModel) -> str:
    """One line: which calibration the probabilities carry."""
    site = model.card.site_calibration
    if site is not None:
        return (f"Calibration: refitted on this site's {site.images} labelled images "
                f"(from version {site.parent}; weights unchanged).")
    return f"Calibration: {model.card.calibration_method} (at {model.card.calibration_prevalence:.0%} prevalence)."


def presets_for(model: LoadedModel, validation) -> dict[str, float]:
    """Operating points that differ meaningfully: each named by what it keeps on validation."""
    presets = {"Model default": model.threshold}
    if model.site_threshold is not None:
        presets["Site threshold"] = model.site_threshold
    if validation is not None:
        labels, scores = validation
        for name, rule in PRESET_RULES.items():
            value = metrics.choose_threshold(labels, scores, rule)
            if all(abs(value - other) >= PRESET_MIN_GAP for other in presets.values()):
                presets[name] = value  # a point within PRESET_MIN_GAP of another would be the same choice
    return presets


def threshold_sidebar(model: LoadedModel, threshold: float, validation) -> float:
    """Slider, exact number, presets, the site threshold and live validation metrics; returns the
    session's threshold (``pages.common.THRESHOLD_KEY``, never the slider's rounded copy)."""
    st.header("Operating threshold")
    # the widgets mirror the one owner; their callbacks write it back
    st.session_state[SLIDER_KEY] = threshold
    st.session_state[EXACT_KEY] = threshold
    st.slider("p(pneumonia) at or above this is called PNEUMONIA", 0.0, 1.0, step=0.001,
              format="%.3f", key=SLIDER_KEY, on_change=lambda: set_threshold(st.session_state[SLIDER_KEY]))
    st.number_input("Exact threshold", 0.0, 1.0, step=0.000001, format="%.6f", key=EXACT_KEY,
                    on_change=lambda: set_threshold(st.session_state[EXACT_KEY]),
                    help="Type the exact value: the command line decides at the same number.")
    presets = presets_for(model, validation)
    for name, value in presets.items():
        figures_at = operating_figures(model.card.validation, value)
        kept = f" ({figures_at.describe(short=True)})" if figures_at is not None else ""
        st.button(f"{name}: {value:.3f}{kept}", key=f"diagnose_preset_{name}", on_click=set_threshold, args=(value,),
                  width="stretch", type="primary" if abs(value - threshold) < 1e-12 else "secondary")
    st.caption("Model default: chosen on validation when the model was trained. High sensitivity: misses at most "
               "1% of validation pneumonia. High specificity: calls at most 2% of validation normals pneumonia. "
               f"Figures in brackets: sensitivity / specificity at that point on the {model.card.validation.n} "
               "validation films (the training hospital's, so they flatter), and on the same films under the worst "
               "acquisition perturbation (gamma, contrast, blur, noise, crop, zoom, rotation): expect new films "
               "nearer the second.")
    if model.site_threshold is not None:
        st.caption(f"Site threshold {model.site_threshold:.6f}, {escape_markdown(model.site_threshold_note)}.")
    actor = current_actor()
    if is_administrator(actor):  # a clinician changes this session's threshold only
        with st.expander("Save this threshold for this site", icon=":material/save:"):
            st.caption("The model's card is never changed: the site's threshold is kept apart, and the model's own "
                       f"can be restored exactly. Recorded in the audit log as saved by {escape_markdown(actor.label)}.")
            st.text_input("Why this threshold", key=SAVE_WHY_KEY)
            confirmed = st.checkbox(f"Use {threshold:.6f} as the default for everyone at this site", key=SAVE_CONFIRM_KEY)
            st.button("Save the site threshold", key="diagnose_save_default", on_click=save_site_threshold,
                      args=(model, threshold), icon=":material/save:",
                      disabled=not (confirmed and st.session_state.get(SAVE_WHY_KEY, "").strip())
                      or abs(threshold - model.default_threshold) < 1e-12)
        st.button("Restore the model's own threshold", key="diagnose_restore_threshold",
                  on_click=restore_card_threshold, args=(model,), disabled=model.site_threshold is None,
                  icon=":material/undo:")
    saved = st.session_state.pop(SAVED_KEY, None)
    if saved:
        st.success(saved)
    if SAVE_ERROR_KEY in st.session_state:
        st.error(escape_markdown(st.session_state.pop(SAVE_ERROR_KEY)))
    if validation is None:
        st.info("This model's card holds no validation predictions, so the trade-off cannot be shown.")
        return threshold
    labels, scores = validation
    figures = metrics.metrics_at(labels, scores, threshold)
    st.subheader(f"At {threshold:.3f}, on validation ({figures['n']} images)")
    figures_at = operating_figures(model.card.validation, threshold)
    if figures_at is not None:
        st.caption(f"Where these come from: {figures_at.describe()}. Validation: {figures_at.source}.")
    left, right = st.columns(2)
    left.metric("Sensitivity (recall)", ratio(figures["sensitivity"]))
    right.metric("Specificity", ratio(figures["specificity"]))
    ppv, npv = predictive_values(figures["sensitivity"], figures["specificity"], site_prevalence(model))
    left.metric(f"PPV at {site_prevalence(model):.0%} prevalence", ratio(ppv))
    right.metric(f"NPV at {site_prevalence(model):.0%} prevalence", ratio(npv))
    left.metric("F1", ratio(figures["f1"]))
    right.metric("ROC AUC", ratio(figures["roc_auc"]))
    cm = figures["confusion_matrix"]
    st.markdown(f"**Confusion matrix**  \n{cm['tp']} true positive (pneumonia called PNEUMONIA)  \n"
                f"{cm['fn']} false negative (pneumonia called NORMAL)  \n"
                f"{cm['fp']} false positive (normal called PNEUMONIA)  \n"
                f"{cm['tn']} true negative (normal called NORMAL)")
    with st.expander("ROC and precision-recall curves", expanded=True):
        st.plotly_chart(roc_figure(labels, scores, figures), key="diagnose_roc", config={"displayModeBar": False})
        st.plotly_chart(pr_figure(labels, scores, figures), key="diagnose_pr", config={"displayModeBar": False})
    return threshold


def ratio(value: float) -> str:
    """A validation ratio to three decimals; n/a when undefined (e.g. precision with nothing called positive)."""
    return "n/a" if value != value else f"{value:.3f}"


def _curve_figure(x, y, point, title: str, x_title: str, y_title: str) -> go.Figure:
    fig = go.Figure(go.Scatter(x=x, y=y, mode="lines", line={"shape": "hv"}, name=title, hoverinfo="skip"))
    fig.add_trace(go.Scatter(x=[point[0]], y=[point[1]], mode="markers", name="current threshold",
                             marker={"size": 12, "color": "#c0392b", "line": {"width": 2, "color": "white"}}))
    fig.update_layout(title=title, height=260, margin={"l": 10, "r": 10, "t": 36, "b": 10}, showlegend=False,
                      xaxis={"title": x_title, "range": [-0.02, 1.02]}, yaxis={"title": y_title, "range": [-0.02, 1.02]})
    return fig


def roc_figure(labels, scores, figures: dict) -> go.Figure:
    fpr, tpr, _ = metrics.roc_curve(labels, scores)
    point = (1 - figures["specificity"], figures["sensitivity"])
    return _curve_figure(fpr, tpr, point, "ROC", "1 - specificity", "sensitivity")


def pr_figure(labels, scores, figures: dict) -> go.Figure:
    precision, recall, _ = metrics.pr_curve(labels, scores)
    point = (figures["sensitivity"], figures["precision"])
    return _curve_figure(recall, precision, point, "Precision-recall", "recall (sensitivity)", "precision (PPV)")


# -- one image: verdict panel and heatmap ---------------------------------------------------------
def verdict_panel(model: LoadedModel, result: analysis.Analysis, threshold: float) -> None:
    prediction = result.prediction
    prediction_prevalence = model.card.calibration_prevalence
    if not record_shown(result.sha256, prediction, threshold):  # logged before it is shown, or not shown
        return
    if prediction.withheld:
        reason, outcome = prediction.withheld_reason, prediction.outcome
        title = "Not a chest radiograph" if outcome == NOT_A_CHEST_RADIOGRAPH else "Outside the intended use"
        st.warning(f"**{title}**" + (f": {escape_markdown(reason)}." if reason else ".")
                   + "  \nNo pneumonia verdict is given for it. " + advice(outcome, reason),
                   icon=":material/block:")
        if outcome == OUTSIDE_INTENDED_USE and measured_phrase(model.card.ood):
            st.caption(measured_phrase(model.card.ood))
        with st.expander("Show the model's output anyway (not for clinical use)"):  # withheld means withheld
            st.markdown(f":gray[p(pneumonia) {prediction.p_pneumonia:.3f} (not interpretable for this image)]")
    else:
        st.metric("p(pneumonia)", f"{prediction.p_pneumonia:.3f}")
        st.progress(prediction.p_pneumonia)
        prevalence = st.session_state.get(PREVALENCE_KEY)
        if prevalence is not None and abs(prevalence - prediction_prevalence) > 1e-9:
            adjusted = float(adjust_to_prevalence(prediction.p_pneumonia, prediction_prevalence, prevalence))
            st.markdown(f"At this site's prevalence ({prevalence:.0%}): **p(pneumonia) {adjusted:.3f}**")
            st.caption(f"The model's probability is calibrated at {prediction_prevalence:.0%} prevalence; the "
                       "decision compares the model's probability with the threshold, so it does not depend on the "
                       "prevalence setting.")
        decision = prediction.decision(threshold)
        with st.container(key="diagnose_decision"):  # colour, icon and word: readable without colour vision
            if decision == PNEUMONIA:
                st.markdown("#### :red-background[:material/warning: PNEUMONIA]")
            elif decision == BORDERLINE:
                st.markdown("#### :orange-background[:material/help: BORDERLINE]")
            else:
                st.markdown("#### :green-background[:material/check_circle: NORMAL]")
            st.caption(f"Decision at threshold {threshold:.6f}.")
            limits = band_limits(threshold, prediction.band)
            if decision == BORDERLINE:
                st.caption(f"Borderline: p(pneumonia) lies between {limits[0]:.3f} and {limits[1]:.3f}, where a "
                           "small change of exposure or framing flips this model's call on validation images. "
                           "Read the film without relying on the model.")
            elif limits is not None:
                st.caption(f"Outside the borderline band {limits[0]:.3f}-{limits[1]:.3f}.")
    st.caption(f"Model version {prediction.model_version}. Image {result.image.size[0]} x {result.image.size[1]} "
               f"pixels, {result.image.format}.")
    if result.image.notes:  # how the file was read: VOI rule, TIFF page, inferred transfer syntax
        st.caption("Read as: " + escape_markdown("; ".join(result.image.notes)) + ".")
    header = result.image.dicom_header
    if header:
        st.markdown("**DICOM header** (shown, not stored)")
        keys = [k for k in DICOM_DISPLAY_FIELDS if k in header]
        # a dataframe renders cell text literally: header values never reach markdown or HTML
        st.dataframe({"Field": [DICOM_LABELS.get(k, k) for k in keys], "Value": [header[k] for k in keys]},
                     hide_index=True, key=f"diagnose_dicom_{result.sha256[:12]}")


@st.fragment
def heatmap_view(model: LoadedModel, result: analysis.Analysis) -> None:
    """Image and Grad-CAM overlay; its controls rerun only this fragment, from cached maps."""
    if result.prediction.withheld:
        st.image(analysis.display_pixels(result.image), caption="As uploaded", width="stretch")
        return
    show_column, side_column, opacity_column = st.columns([1, 1, 2], vertical_alignment="center")
    show = show_column.toggle("Heatmap", value=True, key="diagnose_heatmap_on")
    side_by_side = side_column.toggle("Side by side", value=False, key="diagnose_side_by_side", disabled=not show)
    opacity = opacity_column.slider("Heatmap opacity", 0.0, 1.0, 0.4, 0.05, key="diagnose_opacity", disabled=not show)
    if not show:
        st.image(analysis.display_pixels(result.image), caption="As uploaded", width="stretch")
        return
    pixels, cam = cached_heatmap(model, result)
    overlay = analysis.overlay_jpeg(pixels, cam, opacity)
    if side_by_side:
        left, right = st.columns(2)
        left.image(pixels, caption="As uploaded", width="stretch")
        right.image(overlay, caption=HEATMAP_CAPTION, width="stretch")
    else:
        st.image(overlay, caption=HEATMAP_CAPTION, width="stretch")
    st.image(heatmap_legend(), caption=HEATMAP_LEGEND, width=256)
    # PNG encoding is slow at full size: done only when the clinician clicks
    st.download_button("Download overlay (PNG)", data=lambda: analysis.overlay_png(pixels, cam, opacity),
                       mime="image/png", on_click="ignore",
                       file_name=f"{Path(result.name).stem or 'xray'}-evidence.png", icon=":material/download:",
                       key="diagnose_download_overlay")


def image_detail(model: LoadedModel, result: analysis.Analysis, threshold: float) -> None:
    st.subheader(escape_markdown(result.name))
    image_column, verdict_column = st.columns([3, 2], gap="large")
    with verdict_column:
        verdict_panel(model, result, threshold)
        report_downloads(model, result, threshold)
    with image_column:
        heatmap_view(model, result)


def report_input(model: LoadedModel, result: analysis.Analysis, threshold: float) -> report.ReportInput:
    """The report of one image at the settings on screen: threshold, prevalence, the DICOM source."""
    header = st.session_state.get(DICOM_HEADERS_KEY, {}).get(result.sha256)
    return report.ReportInput(result, threshold, site_prevalence(model), header)


def report_downloads(model: LoadedModel, result: analysis.Analysis, threshold: float) -> None:
    """PDF report (and DICOM results for DICOM inputs) of what the screen shows; each download is audited."""
    item = report_input(model, result, threshold)
    trail = audit_trail()

    def pdf() -> bytes:
        trail.shown(result.sha256, result.prediction, threshold, "report")
        return report.pdf_bytes(model, [item])

    def dicom_results() -> bytes:
        trail.shown(result.sha256, result.prediction, threshold, "report")
        sc = report.secondary_capture(model, item)
        sr = report.structured_report(model, item, item.dicom)
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr(f"{stem}.sc.dcm", report.dicom_bytes(sc))
            archive.writestr(f"{stem}.sr.dcm", report.dicom_bytes(sr))
        return buffer.getvalue()

    stem = Path(result.name).stem or "xray"
    st.download_button("Download report (PDF)", data=pdf, file_name=f"{stem}-report.pdf", mime="application/pdf",
                       on_click="ignore", icon=":material/picture_as_pdf:", key=f"diagnose_report_{result.sha256[:12]}")
    if item.dicom is not None:
        st.download_button("Download DICOM results", data=dicom_results, file_name=f"{stem}-results.zip",
                           mime="application/zip", on_click="ignore", icon=":material/download:",
                           key=f"diagnose_dicom_results_{result.sha256[:12]}",
                           help="A Secondary Capture with the heatmap and the result, and a structured report, in "
                                "this image's study, for the PACS")


def review_selected_row() -> None:
    """A click on a worklist row opens that image in the review below (if it was readable)."""
    rows = st.session_state.get("diagnose_worklist", {}).get("selection", {}).get("rows", [])
    order = st.session_state.get(WORKLIST_ORDER_KEY, [])
    if rows and rows[0] < len(order):
        st.session_state[REVIEW_PICK_KEY] = order[rows[0]]


def worklist(model: LoadedModel, results: list[dict], threshold: float) -> None:
    """Every readable file, highest p(pneumonia) first, with a CSV like the command line's."""
    model_prevalence, prevalence = model.card.calibration_prevalence, site_prevalence(model)
    analyses = [r["analysis"] for r in results]
    for a in analyses:  # every decision in the table is shown: each is logged first
        if a.ok and not record_shown(a.sha256, a.prediction, threshold, "worklist"):
            return
    thumbnails = {r["analysis"].sha256: r["thumbnail"] for r in results}
    rows = analysis.worklist_rows(analyses, threshold)
    st.session_state[WORKLIST_ORDER_KEY] = [r.sha256 for r in rows]
    st.dataframe(
        {"Image": [thumbnails.get(r.sha256) for r in rows], "File": [r.path for r in rows],
         # withheld and unreadable rows show no probability: withheld means withheld
         "p(pneumonia)": [r.p_pneumonia if r.label else None for r in rows],
         "Decision": [r.label or r.outcome for r in rows],
         "Note": [r.error for r in rows]},
        hide_index=True, key="diagnose_worklist", row_height=56, on_select=review_selected_row,
        selection_mode="single-row",
        column_config={"Image": st.column_config.ImageColumn("Image", width="small"),
                       "p(pneumonia)": st.column_config.ProgressColumn("p(pneumonia)", min_value=0.0,
                                                                        max_value=1.0, format="%.3f")})
    st.caption("Click a row to review that image below.")
    st.download_button("Download worklist (CSV)", data=analysis.worklist_csv(analyses, threshold,
                                                                                   (model_prevalence, prevalence)),
                       file_name="worklist.csv", mime="text/csv", on_click="ignore", icon=":material/download:",
                       key="diagnose_download_csv")
    readable = [a for a in analyses if a.ok]

    trail = audit_trail()

    def worklist_pdf() -> bytes:
        for a in readable:
            trail.shown(a.sha256, a.prediction, threshold, "report")
        return report.worklist_pdf_bytes(model, [report_input(model, a, threshold) for a in readable])

    st.download_button("Download worklist report (PDF)", data=worklist_pdf, file_name="worklist-report.pdf",
                       mime="application/pdf", on_click="ignore", icon=":material/picture_as_pdf:",
                       key="diagnose_download_worklist_pdf", disabled=not readable)


# -- the page -------------------------------------------------------------------------------------
def main() -> None:
    """The page (not run when pages/worklist.py imports this module for its detail view)."""
    model = require_model()
    validation = validation_predictions(model)

    st.title("Diagnose")
    st.caption(f"Model {model.version}. Decision support for pediatric AP chest radiographs: "
               "it assists a clinician and does not diagnose.")
    st.caption(calibration_in_force(model))

    # No type filter: DICOM files often come without an extension; unreadable files get a clear message.
    uploads = st.file_uploader("Drop chest X-rays here (DICOM with or without extension, PNG, JPEG, TIFF, HEIC), one "
                               "or many", accept_multiple_files=True,
                               key="diagnose_uploads")
    samples = sorted(SAMPLES_DIR.glob("*/*.jp*g")) + sorted(SAMPLES_DIR.glob("*/*.png"))
    if samples:
        pick, add, clear = st.columns([3, 1, 1], vertical_alignment="bottom")
        chosen = pick.selectbox("Or try a bundled sample", samples, key="diagnose_sample_choice",
                                format_func=lambda p: f"{p.parent.name} / {p.name}")
        if add.button("Try this sample", key="diagnose_try_sample", type="primary", width="stretch"):
            chosen_samples = st.session_state.setdefault(SAMPLES_KEY, [])
            if chosen not in chosen_samples:
                chosen_samples.append(chosen)
        if clear.button("Clear samples", key="diagnose_clear_samples", width="stretch",
                        disabled=not st.session_state.get(SAMPLES_KEY)):
            st.session_state[SAMPLES_KEY] = []

    # the sidebar's figures and curves after the uploader: the page is usable sooner on a fresh server (issue 26,
    # benchmarks/idle_and_first_use.py); the sidebar shows the same, it only fills in a moment later
    with st.sidebar:
        threshold = threshold_sidebar(model, current_threshold(model), validation)
    files = [(upload.name, upload.getvalue()) for upload in uploads or []]
    files += [(path.name, path.read_bytes()) for path in st.session_state.get(SAMPLES_KEY, [])]
    results, seen = [], set()
    for name, data in files:
        result = cached_result(model, name, data)
        if result["analysis"].sha256 not in seen:  # the same image dropped twice is shown once
            seen.add(result["analysis"].sha256)
            results.append(result)
    forget_other_files({(r["analysis"].sha256, model.version) for r in results})

    for result in results:
        if result["analysis"].incomplete:  # an interrupted transfer: the same file sent again will load
            st.error(f"**{escape_markdown(result['analysis'].name)}** arrived incomplete: "
                     f"{escape_markdown(result['analysis'].error)}", icon=":material/sync_problem:")
        elif result["analysis"].error:
            st.error(f"**{escape_markdown(result['analysis'].name)}** cannot be analysed: "
                     f"{escape_markdown(result['analysis'].error)}", icon=":material/broken_image:")
    readable = [r["analysis"] for r in results if r["analysis"].ok]
    with st.sidebar:
        prevalence_sidebar(model, readable)
    if not results:
        st.info("Drop one or more chest X-rays above, or try a bundled sample, to see p(pneumonia), "
                "the decision at the current threshold and where the model looked.", icon=":material/info:")
    elif len(results) > 1:
        st.subheader("Worklist")
        worklist(model, results, threshold)
    if len(readable) == 1:
        image_detail(model, readable[0], threshold)
    elif readable:
        by_sha = {a.sha256: a for a in readable}
        order = [row.sha256 for row in analysis.worklist_rows(readable, threshold)]  # worklist order
        picked = st.session_state.pop(REVIEW_PICK_KEY, None)
        if picked in by_sha:
            st.session_state["diagnose_review_choice"] = picked
        chosen_sha = st.selectbox("Image to review", order, key="diagnose_review_choice",
                                  format_func=lambda sha: by_sha[sha].name)
        image_detail(model, by_sha[chosen_sha], threshold)


if __name__ == "__main__":  # Streamlit runs a page as __main__
    main()
