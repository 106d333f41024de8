"""Diagnose: drop chest X-rays (or try a sample), read p(pneumonia), the decision at the session's threshold
and where the evidence lies; the sidebar trades sensitivity against specificity. The page is the screen:
saving site settings, audit lines, prevalence and downloads are the engine's (xray.govern.siteconfig,
xray.model.site, xray.decide.prevalence, xray.report.exports); one film's view is pages.result_view."""
from __future__ import annotations

from pathlib import Path

import plotly.graph_objects as go
import streamlit as st

from pages.common import (PRESET_MIN_GAP, PRESET_RULES, audit_trail, current_actor, current_threshold,
                          ensure_app_navigation, escape_markdown, is_administrator, record_shown, require_model,
                          set_threshold, validation_predictions)
from pages.result_view import DECISION_BACKGROUND, forget_heatmaps, result_ui
from xray.decide import metrics
from xray.decide.prevalence import estimate_if_enough, predictive_values, ESTIMATE_MIN_IMAGES
from xray.govern import siteconfig
from xray.model.card import operating_figures
from xray.model.registry import LoadedModel, Registry, sha256_bytes
from xray.report import exports, writers
from xray.serve import analysis
from xray.serve.guard import plain_reason

SAMPLES_DIR = Path(__file__).resolve().parent.parent / "samples"
# The page's limit for one file. The transport's (server.maxUploadSize in .streamlit/config.toml) is set
# above it so that a larger film reaches the page and gets this message instead of a silent refusal.
UPLOAD_LIMIT_MB = 64
SLIDER_KEY = "diagnose_threshold"  # mirrors pages.common.THRESHOLD_KEY
EXACT_KEY = "diagnose_threshold_exact"  # the same, typed to six decimals
RESULTS_KEY = "diagnose_results"  # {(sha256, model version): {"analysis", "thumbnail", "dicom"}}
SAMPLES_KEY = "diagnose_samples"  # bundled sample paths the clinician chose to try
PREVALENCE_KEY = "diagnose_prevalence"  # the session's prevalence (from the site's saved setting)
WORKLIST_ORDER_KEY = "diagnose_worklist_order"  # sha256 of each worklist row, in display order
REVIEW_PICK_KEY = "diagnose_review_pick"  # the row a click chose, applied before the review selectbox
SAVE_WHY_KEY, SAVE_CONFIRM_KEY = "diagnose_save_why", "diagnose_save_confirm"
NOTICE_KEY = "diagnose_notice"  # (kind, text) of the last sidebar action, shown beside its button
THRESHOLD_PROBLEM_KEY = "diagnose_threshold_problem"


# -- the screen, top to bottom (its parts follow in the same order) -----------------------------------
def main() -> None:
    ensure_app_navigation()
    st.title("Diagnose")
    st.caption("Decision support for pediatric AP chest radiographs: it assists a clinician and does not diagnose.")
    # The uploader before the model and everything that needs it (the model's line, the sidebar's threshold and
    # figures): on a fresh server the browser asks for the uploader's code first and a clinician can drop films
    # sooner (issue 26, benchmarks/idle_and_first_use.py). A film dropped meanwhile is analysed once the model
    # has loaded; without any loadable model the uploader is taken away again (nothing could analyse a film).
    uploader = st.empty()
    with uploader.container():
        files = uploads_ui()
    model = require_model(withdraw=uploader)
    validation = validation_predictions(model)
    threshold = current_threshold(model)
    prevalence = site_prevalence(model)
    model_ui(model)
    with st.sidebar:
        sidebar_ui(model, threshold, validation, prevalence)
    results, seen = [], set()
    for name, data in files:
        result = cached_result(model, name, data)
        if result["analysis"].sha256 not in seen:  # the same film dropped twice is shown once
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
    with st.sidebar:
        prevalence_ui(model, [r["analysis"] for r in results if r["analysis"].ok])
    if not results:
        st.info("Drop one or more chest X-rays above, or try a bundled sample, to see p(pneumonia), the decision "
                "at the current threshold and where the model looked.", icon=":material/info:")
    elif len(results) > 1:
        st.subheader("Worklist")
        worklist_ui(model, results, threshold, prevalence)
    review_ui(model, results, threshold, prevalence)


# -- cached engine calls: once per (file content, model version), so reruns never re-run the model ------
def cached_result(model: LoadedModel, name: str, data: bytes) -> dict:
    """Analysis, worklist thumbnail and DICOM header (no pixels) of one file, once per session and model."""
    results = st.session_state.setdefault(RESULTS_KEY, {})
    key = (sha256_bytes(data), model.version)
    if key not in results:
        result = analysis.analyse(model, data, name)
        readable = result.image is not None
        dicom = readable and result.image.format == "DICOM"
        results[key] = {"analysis": result,
                        "thumbnail": analysis.thumbnail_data_uri(result.image) if readable else None,
                        "dicom": writers.read_dicom_header(data) if dicom else None,
                        "patient": writers.read_patient(data) if dicom else []}
    return results[key]


def forget_other_files(keep: set[tuple[str, str]]) -> None:
    """Drop results of files no longer on the page: uploads live in this session's memory only."""
    store = st.session_state.get(RESULTS_KEY, {})
    for key in [k for k in store if k not in keep]:
        del store[key]
    forget_heatmaps(keep)


def site_prevalence(model: LoadedModel) -> float:
    """The session's prevalence: starts at the site's saved one (else the version's calibration prevalence)."""
    if PREVALENCE_KEY not in st.session_state:
        st.session_state[PREVALENCE_KEY] = siteconfig.site_prevalence(Registry(), model.card)
    return float(st.session_state[PREVALENCE_KEY])


# -- callbacks: the engine does the work, the page says what happened ---------------------------------
def notice(kind: str, text: str) -> None:
    st.session_state[NOTICE_KEY] = (kind, text)


def typed_threshold() -> None:
    """The exact box: a value outside 0-1 is refused with a message; the threshold in force stays."""
    value = st.session_state[EXACT_KEY]
    if value is None or not 0.0 <= value <= 1.0:
        st.session_state[THRESHOLD_PROBLEM_KEY] = value
        return
    set_threshold(value)


def save_site_threshold(model: LoadedModel, threshold: float) -> None:
    try:
        saved = siteconfig.save_threshold(Registry(), model.version, threshold, st.session_state.get(SAVE_WHY_KEY, ""),
                                          actor=current_actor())
    except (OSError, ValueError) as exc:  # PermissionError (the role) is an OSError
        notice("error", f"The threshold was not saved: {exc}")
        return
    notice("success", f"Saved {saved.threshold:.6f} as this site's threshold for model {model.version}.")


def restore_card_threshold(model: LoadedModel) -> None:
    try:
        siteconfig.restore_threshold(Registry(), model.version, actor=current_actor())
    except (OSError, ValueError) as exc:  # ModelFileError is a ValueError
        notice("error", f"The threshold was not restored: {exc}")
        return
    set_threshold(model.threshold)
    notice("success", f"Restored the model's own threshold {model.threshold:.6f}.")


def save_prevalence() -> None:
    try:
        siteconfig.save_prevalence(Registry(), st.session_state[PREVALENCE_KEY], actor=current_actor())
    except (OSError, ValueError) as exc:
        notice("error", f"The prevalence was not saved: {exc}")
        return
    notice("success", f"Saved {st.session_state[PREVALENCE_KEY]:.1%} as this site's prevalence.")


def use_estimate(value: float) -> None:
    st.session_state[PREVALENCE_KEY] = value


def review_selected_row() -> None:
    """A click on a worklist row opens that film in the review below (if it was readable)."""
    rows = st.session_state.get("diagnose_worklist", {}).get("selection", {}).get("rows", [])
    order = st.session_state.get(WORKLIST_ORDER_KEY, [])
    if rows and rows[0] < len(order):
        st.session_state[REVIEW_PICK_KEY] = order[rows[0]]


# -- what the sidebar offers ----------------------------------------------------------------------------
def presets_for(model: LoadedModel, validation) -> dict[str, float]:
    """Operating points worth offering: the model's default, the site's, and each named preset only where
    it does what its name says on validation (more sensitive, or more specific, than the model's default)
    and differs from every other point by at least ``PRESET_MIN_GAP``."""
    presets = {"Model default": model.threshold}
    if model.site_threshold is not None:
        presets["Site threshold"] = model.site_threshold
    if validation is None:
        return presets
    labels, scores = validation
    default = metrics.metrics_at(labels, scores, model.threshold)
    for name, rule in PRESET_RULES.items():
        value = metrics.choose_threshold(labels, scores, rule)
        figures = metrics.metrics_at(labels, scores, value)
        kept = "sensitivity" if "sensitivity" in rule else "specificity"
        if not figures[kept] > default[kept]:
            continue  # a "High specificity" less specific than the default would say the opposite of its name
        if all(abs(value - other) >= PRESET_MIN_GAP for other in presets.values()):
            presets[name] = value
    return presets


def ratio(value: float) -> str:
    """A validation ratio to three decimals; n/a when undefined (nothing called positive, say)."""
    return "n/a" if value != value else f"{value:.3f}"


def curve_figure(x, y, point, title: str, x_title: str, y_title: str) -> go.Figure:
    fig = go.Figure(go.Scatter(x=x, y=y, mode="lines", line={"shape": "hv"}, name=title, hoverinfo="skip"))
    fig.add_trace(go.Scatter(x=[point[0]], y=[point[1]], mode="markers", name="current threshold",
                             marker={"size": 12, "color": "#c0392b", "line": {"width": 2, "color": "white"}}))
    fig.update_layout(title=title, height=260, margin={"l": 10, "r": 10, "t": 36, "b": 10}, showlegend=False,
                      xaxis={"title": x_title, "range": [-0.02, 1.02]}, yaxis={"title": y_title, "range": [-0.02, 1.02]})
    return fig


# -- the sidebar ------------------------------------------------------------------------------------------
def threshold_ui(threshold: float) -> None:
    """Slider and exact box over the one owner (``pages.common.THRESHOLD_KEY``); a bad typed value is named."""
    st.session_state[SLIDER_KEY] = threshold  # the widgets mirror the owner; their callbacks write it back
    st.session_state[EXACT_KEY] = threshold
    st.slider("p(pneumonia) at or above this is called PNEUMONIA", 0.0, 1.0, step=0.001, format="%.3f",
              key=SLIDER_KEY, on_change=lambda: set_threshold(st.session_state[SLIDER_KEY]))
    # no min/max on the box: the browser would keep an out-of-range value red and unexplained
    st.number_input("Exact threshold", step=0.000001, format="%.6f", key=EXACT_KEY, on_change=typed_threshold,
                    help="Type the exact value, between 0 and 1: the command line decides at the same number.")
    if THRESHOLD_PROBLEM_KEY in st.session_state:
        typed = st.session_state.pop(THRESHOLD_PROBLEM_KEY)
        st.error("The threshold must be between 0 and 1" + (f" ({typed:g} was not applied)" if typed is not None
                                                             else "") + f". In force: {threshold:.6f}.",
                 icon=":material/error:")


def presets_ui(model: LoadedModel, threshold: float, validation) -> None:
    for name, value in presets_for(model, validation).items():
        figures_at = operating_figures(model.card.validation, value)
        kept = f" ({figures_at.describe(short=True)})" if figures_at is not None else ""
        st.button(f"{name}: {value:.3f}{kept}", key=f"diagnose_preset_{name}", on_click=set_threshold, args=(value,),
                  width="stretch", type="primary" if abs(value - threshold) < 1e-12 else "secondary")
    st.caption("Model default: chosen when the model was trained. High sensitivity: misses at most 1 in 100 "
               "pneumonia films on validation. High specificity: calls at most 2 in 100 normal films pneumonia. "
               "A preset is offered only where it is more sensitive (or more specific) than the model's default. "
               f"In brackets: sensitivity / specificity at that point on the {model.card.validation.n} validation films "
               "(the training hospital's, so they flatter), and on the same films under the worst acquisition "
               "perturbation (gamma, contrast, blur, noise, crop, zoom, rotation): expect new films nearer the second.")
    if model.site_threshold is not None:
        st.caption(f"Site threshold {model.site_threshold:.6f}, {escape_markdown(model.site_threshold_note)}.")


def site_threshold_ui(model: LoadedModel, threshold: float) -> None:
    """Administrators save the session's threshold for everyone (by their signed-in name); a clinician
    changes this session's threshold only."""
    actor = current_actor()
    if not is_administrator(actor):
        return
    with st.expander("Save this threshold for this site", icon=":material/save:"):
        st.caption("The model's card is never changed: the site's threshold is kept apart, and the model's own "
                   f"can be restored exactly. Recorded in the audit log as saved by {escape_markdown(actor.label)}.")
        st.text_input("Why this threshold", key=SAVE_WHY_KEY)
        confirmed = st.checkbox(f"Use {threshold:.6f} as the default for everyone at this site", key=SAVE_CONFIRM_KEY)
        st.button("Save the site threshold", key="diagnose_save_default", on_click=save_site_threshold,
                  args=(model, threshold), icon=":material/save:",
                  disabled=not (confirmed and st.session_state.get(SAVE_WHY_KEY, "").strip())
                  or abs(threshold - model.default_threshold) < 1e-12)
    st.button("Restore the model's own threshold", key="diagnose_restore_threshold", on_click=restore_card_threshold,
              args=(model,), disabled=model.site_threshold is None, icon=":material/undo:")


def notice_ui() -> None:
    """What the last sidebar button did, right below it."""
    if NOTICE_KEY in st.session_state:
        kind, text = st.session_state.pop(NOTICE_KEY)
        (st.success if kind == "success" else st.error)(escape_markdown(text) if kind == "error" else text)


def validation_ui(model: LoadedModel, threshold: float, validation, prevalence: float) -> None:
    """What the threshold means on validation, in a clinician's words; the rest one click away."""
    if validation is None:
        st.info("This model's card holds no validation results, so the trade-off cannot be shown.")
        return
    labels, scores = validation
    figures = metrics.metrics_at(labels, scores, threshold)
    cm = figures["confusion_matrix"]
    st.subheader(f"At {threshold:.3f}, on {figures['n']} validation films")
    figures_at = operating_figures(model.card.validation, threshold)
    if figures_at is not None:
        st.caption(f"Where these come from: {figures_at.describe()}. Validation: {figures_at.source}.")
    left, right = st.columns(2)
    left.metric("Sensitivity", ratio(figures["sensitivity"]), help="Share of pneumonia films called PNEUMONIA.")
    right.metric("Specificity", ratio(figures["specificity"]), help="Share of normal films called NORMAL.")
    ppv, npv = predictive_values(figures["sensitivity"], figures["specificity"], prevalence)
    left.metric("PPV", ratio(ppv), help="Of films called PNEUMONIA, the share that have pneumonia.")
    right.metric("NPV", ratio(npv), help="Of films called NORMAL, the share that are normal.")
    st.caption(f"PPV and NPV at this site's prevalence, {prevalence:.0%}. Missed: {cm['fn']} of "
               f"{cm['tp'] + cm['fn']} pneumonia films; false alarms: {cm['fp']} of {cm['fp'] + cm['tn']} normal films.")
    with st.expander("Details"):
        st.markdown(f"F1 {ratio(figures['f1'])}; area under the ROC curve {ratio(figures['roc_auc'])}.  \n"
                    f"{cm['tp']} true positive, {cm['fn']} false negative, {cm['fp']} false positive, "
                    f"{cm['tn']} true negative.")
        # Drawn on request only: the charting library is the heaviest thing the browser loads for this page,
        # and the first screen should not wait for it (issue 26, first use: benchmarks/idle_and_first_use.py).
        if not st.checkbox("Show the ROC and precision-recall curves", key="diagnose_show_curves"):
            return
        fpr, tpr, _ = metrics.roc_curve(labels, scores)
        st.plotly_chart(curve_figure(fpr, tpr, (1 - figures["specificity"], figures["sensitivity"]), "ROC",
                                     "1 - specificity", "sensitivity"), key="diagnose_roc",
                        config={"displayModeBar": False})
        precision, recall, _ = metrics.pr_curve(labels, scores)
        st.plotly_chart(curve_figure(recall, precision, (figures["sensitivity"], figures["precision"]),
                                     "Precision-recall", "recall (sensitivity)", "precision (PPV)"),
                        key="diagnose_pr", config={"displayModeBar": False})


def prevalence_ui(model: LoadedModel, readable: list[analysis.Analysis]) -> None:
    """The site's prevalence: what the adjusted probability, PPV and NPV assume; an estimate offered."""
    st.header("Prevalence at this site")
    site_prevalence(model)
    st.number_input("Pneumonia prevalence (share of patients with pneumonia)", 0.01, 0.99, step=0.01,
                    format="%.2f", key=PREVALENCE_KEY,
                    help=f"The model's probabilities are calibrated at {model.card.calibration_prevalence:.0%}. "
                         "PPV, NPV and the adjusted probability use this value; the decision does not.")
    if is_administrator(current_actor()):
        st.button("Save for this site", key="diagnose_save_prevalence", on_click=save_prevalence,
                  icon=":material/save:")
    scores = [a.prediction.p_pneumonia for a in readable if not a.prediction.withheld]
    estimate = estimate_if_enough(scores, model.card.calibration_prevalence)
    if estimate is None:
        st.caption(f"With at least {ESTIMATE_MIN_IMAGES} scored films in the worklist, the page offers an estimate "
                   "of the prevalence from them.")
        return
    st.caption(f"Estimated from the {len(scores)} films in the worklist: {estimate:.1%}. An estimate, not a "
               "measurement: your choice.")
    st.button(f"Use {estimate:.0%}", key="diagnose_use_estimate", on_click=use_estimate, args=(round(estimate, 2),))


def sidebar_ui(model: LoadedModel, threshold: float, validation, prevalence: float) -> None:
    st.header("Operating threshold")
    threshold_ui(threshold)
    presets_ui(model, threshold, validation)
    site_threshold_ui(model, threshold)
    notice_ui()
    validation_ui(model, threshold, validation, prevalence)


# -- the main area ----------------------------------------------------------------------------------------
def model_ui(model: LoadedModel) -> None:
    """Which model scores the films, and on whose films its probabilities were calibrated."""
    site = model.card.site_calibration
    calibrated = (f"on this site's {site.images} labelled films" if site is not None else
                  f"on the model's validation films ({model.card.calibration_prevalence:.0%} had pneumonia)")
    st.caption(f"Model {model.version}. Probabilities calibrated {calibrated}.")


def uploads_ui() -> list[tuple[str, bytes]]:
    """The files on the page: uploads (a file over the limit is named, with what to do) and chosen samples."""
    # No type filter: DICOM files often come without an extension; unreadable files get a clear message.
    uploads = st.file_uploader(f"Drop chest X-rays here (DICOM with or without extension, PNG, JPEG, TIFF, HEIC), "
                               f"one or many, up to {UPLOAD_LIMIT_MB} MB each", accept_multiple_files=True,
                               key="diagnose_uploads")
    files = []
    for upload in uploads or []:
        if upload.size > UPLOAD_LIMIT_MB * 2**20:
            st.error(f"**{escape_markdown(upload.name)}** is {upload.size / 2**20:.1f} MB, over the "
                     f"{UPLOAD_LIMIT_MB} MB limit for one file, so it was not analysed. Export the film from the "
                     "PACS as a single image (one frame, or PNG/JPEG), or score it with the command line: "
                     "`python -m xray predict FILE`.", icon=":material/file_present:")
            continue
        files.append((upload.name, upload.getvalue()))
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
    return files + [(path.name, path.read_bytes()) for path in st.session_state.get(SAMPLES_KEY, [])]


def worklist_ui(model: LoadedModel, results: list[dict], threshold: float, prevalence: float) -> None:
    """Every file, highest p(pneumonia) first, every row shown, decisions coloured as in the single view."""
    analyses = [r["analysis"] for r in results]
    for a in analyses:  # every decision in the table is shown: each is logged first
        if a.ok and not record_shown(a.sha256, a.prediction, threshold, "worklist"):
            return
    thumbnails = {r["analysis"].sha256: r["thumbnail"] for r in results}
    by_sha = {a.sha256: a for a in analyses}
    rows = analysis.worklist_rows(analyses, threshold)
    st.session_state[WORKLIST_ORDER_KEY] = [r.sha256 for r in rows]

    def decision_and_reason(a: analysis.Analysis) -> tuple[str, str]:
        if a.prediction is None:
            return "Unreadable", a.error
        if a.prediction.withheld:
            return "No verdict", plain_reason(a.prediction.withheld_reason) or a.prediction.outcome
        return a.prediction.decision(threshold), ""

    shown = [decision_and_reason(by_sha[r.sha256]) for r in rows]
    patients = {r["analysis"].sha256: r["patient"] for r in results}
    table = {"Image": [thumbnails.get(r.sha256) for r in rows], "File": [r.path for r in rows],
             "Patient": [patient_line(patients.get(r.sha256)) for r in rows],
             # withheld and unreadable rows show no probability: withheld means withheld
             "p(pneumonia)": [by_sha[r.sha256].prediction.p_pneumonia if decision in DECISION_BACKGROUND else None
                              for r, (decision, _) in zip(rows, shown)],
             "Decision": [decision for decision, _ in shown], "Reason": [reason for _, reason in shown]}
    styled = _styled(table)
    row_height = 56
    st.dataframe(styled, hide_index=True, key="diagnose_worklist", row_height=row_height,
                 height=(len(rows) + 1) * row_height + 3,  # every row visible, no inner scrolling
                 on_select=review_selected_row, selection_mode="single-row",
                 column_config={"Image": st.column_config.ImageColumn("Image", width="small"),
                                "Reason": st.column_config.TextColumn("Reason", width="large"),
                                "p(pneumonia)": st.column_config.ProgressColumn("p(pneumonia)", min_value=0.0,
                                                                                max_value=1.0, format="%.3f")})
    for (decision, reason), row in zip(shown, rows):  # the whole reason, never cut by the table's cell
        if reason:
            st.markdown(f"**{escape_markdown(row.path)}** ({decision.lower()}): {escape_markdown(reason)}.")
    st.caption("Click a row to review that film below.")
    trail = audit_trail()
    readable = [a for a in analyses if a.ok]
    st.download_button("Download worklist (CSV)", on_click="ignore", icon=":material/download:",
                       data=lambda: exports.worklist_csv(analyses, threshold, (model.card.calibration_prevalence,
                                                                               prevalence), trail),
                       file_name="worklist.csv", mime="text/csv", key="diagnose_download_csv")
    st.download_button("Download worklist report (PDF)", file_name="worklist-report.pdf", mime="application/pdf",
                       data=lambda: exports.worklist_pdf(model, [report_input(results, a, threshold, prevalence)
                                                                 for a in readable], trail),
                       on_click="ignore", icon=":material/picture_as_pdf:", key="diagnose_download_worklist_pdf",
                       disabled=not readable)


def patient_line(fields: list[tuple[str, str]] | None) -> str:
    """Name and ID as the DICOM carries them, for a worklist row ("" for a file without a patient)."""
    values = dict(fields or [])
    return " / ".join(v for v in (values.get("Patient"), values.get("Patient ID")) if v and v != "not recorded")


def _styled(table: dict):
    """The worklist with each decision cell in the single view's background colour."""
    import pandas as pd  # here, not at the top: 0.25 s to import, and only a worklist needs it (issue 26)

    frame = pd.DataFrame(table)
    return frame.style.map(lambda d: f"background-color: {DECISION_BACKGROUND[d]}" if d in DECISION_BACKGROUND
                           else "", subset=["Decision"])


def report_input(results: list[dict], a: analysis.Analysis, threshold: float, prevalence: float) -> writers.ReportInput:
    """One film as its report (and the screen) shows it: the settings in force and its DICOM source."""
    source = next(r for r in results if r["analysis"].sha256 == a.sha256)
    return writers.ReportInput(a, threshold, prevalence, source["dicom"], source["patient"])


def review_ui(model: LoadedModel, results: list[dict], threshold: float, prevalence: float) -> None:
    """One film's full result: the only readable one, or the one picked from the worklist."""
    readable = [r["analysis"] for r in results if r["analysis"].ok]
    if not readable:
        return
    chosen = readable[0]
    if len(readable) > 1:
        by_sha = {a.sha256: a for a in readable}
        order = [row.sha256 for row in analysis.worklist_rows(readable, threshold)]  # worklist order
        picked = st.session_state.pop(REVIEW_PICK_KEY, None)
        if picked in by_sha:
            st.session_state["diagnose_review_choice"] = picked
        chosen = by_sha[st.selectbox("Film to review", order, key="diagnose_review_choice",
                                     format_func=lambda sha: by_sha[sha].name)]
    result_ui(model, report_input(results, chosen, threshold, prevalence))


if __name__ == "__main__":  # Streamlit runs a page as __main__; other pages import its parts
    main()
