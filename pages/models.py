"""Models: every trained version side by side with the active one, ROC curves overlaid; activate a
version for the Diagnose page, or roll back to the previous one."""
from __future__ import annotations

import math
from pathlib import Path

import plotly.graph_objects as go
import streamlit as st

from pages.common import current_actor, ensure_app_navigation, is_administrator
from xray.govern import promotion
from xray.train import jobs
from xray.decide import metrics
from xray.govern import sitecal
from xray.model.card import ModelCard, operating_figures
from xray.model.registry import ModelFileError, Registry

MESSAGE_KEY = "models_message"  # what the last button did, shown after the rerun it causes
SELECTED_KEY = "models_selected"
OVERRIDE_REASON_KEY = "models_override_reason"
CALIBRATE_FOLDER_KEY = "models_calibrate_folder"
OVERRIDE_CONFIRM_KEY = "models_override_confirm"

FIGURES = [("Validation AUC", "roc_auc"), ("Sensitivity (validation)", "sensitivity"),
           ("Specificity (validation)", "specificity"),
           ("Precision (PPV)", "precision"), ("NPV", "npv"), ("Calibration error (ECE)", "ece")]


def number(value, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def summary(card: ModelCard) -> dict[str, str]:
    """One column of the comparison: what a version is, what it was trained on, how it validated."""
    validation, data, training = card.validation, card.data, card.training
    row = {"Created": card.created or "-",
           "Threshold": f"{card.threshold:.6f}",
           **{label: number(validation.figure(key)) for label, key in FIGURES},
           "Validation images": str(validation.n or "-"),
           "Sens. / spec. under the worst acquisition perturbation": worst_perturbation(card),
           "Validation split": validation.description or "-",
           "Trained on": (f"{Path(data.root).name} (folder '{data.root}' on the training machine)"
                          if data.root else "-"),
           "Data fingerprint": (data.fingerprint or "-")[:12],
           "Training images": str(data.train_images if data.train_images is not None else "-"),
           "Image size": str(card.image_size),
           "Epochs run (best)": f"{training.epochs_run or '-'} ({training.best_epoch or '-'})",
           "Started from": training.parent or "scratch"}
    if card.site_calibration is not None and card.site_calibration.promise:
        row["Site calibration promises"] = card.site_calibration.promise
    return row


def worst_perturbation(card: ModelCard) -> str:
    """At the card's threshold, the validation films under the worst acquisition perturbation the card stores."""
    f = operating_figures(card.validation, card.threshold)
    if f is None or f.worst_sensitivity is None:
        return "not stored"
    return (f"{f.worst_sensitivity[0]:.3f} ({f.worst_sensitivity[1]}) / "
            f"{f.worst_specificity[0]:.3f} ({f.worst_specificity[1]})")


def roc_figure(cards: dict[str, ModelCard], active: str | None) -> go.Figure:
    """Validation ROC curve of every version that stored its validation predictions."""
    fig = go.Figure()
    fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dot", color="grey"), name="chance",
                    hoverinfo="skip")
    for version, card in cards.items():
        labels, scores = card.validation.labels, card.validation.scores
        if labels is None:
            continue
        fpr, tpr, _ = metrics.roc_curve(labels, scores)
        name = f"{version}{' (active)' if version == active else ''}: AUC {number(metrics.roc_auc(labels, scores))}"
        fig.add_scatter(x=fpr.tolist(), y=tpr.tolist(), mode="lines", name=name, line=dict(width=4 if version == active else 2),
                        line_shape="hv")
    fig.update_layout(height=420, margin=dict(l=10, r=10, t=10, b=10), legend=dict(orientation="h", y=-0.2),
                      xaxis_title="1 - specificity (false positive rate)", yaxis_title="sensitivity")
    fig.update_xaxes(range=[0, 1])
    fig.update_yaxes(range=[0, 1.02])
    return fig


def activate(version: str, force: bool = False) -> None:
    """Activate through the promotion gate; with ``force``, the typed override reason is recorded."""
    reason = st.session_state.get(OVERRIDE_REASON_KEY, "")
    try:
        promotion.promote(Registry(), version, force=force, reason=reason, actor=current_actor())
        note = f" (override recorded: {reason})" if force else ""
        st.session_state[MESSAGE_KEY] = ("success", f"Model {version} is now active: the Diagnose page uses it{note}.")
    except promotion.PromotionRefused as exc:
        st.session_state[MESSAGE_KEY] = ("error", f"Model {version} was not activated: {exc}")
    except (ModelFileError, ValueError, PermissionError) as exc:
        st.session_state[MESSAGE_KEY] = ("error", f"Model {version} was not activated: {exc}.")


@st.cache_data(ttl=600, max_entries=4, show_spinner=False)
def site_recalibration(folder: str, version: str) -> sitecal.Recalibration:
    """Score and recalibrate once per (folder, version); nothing is written."""
    registry = Registry()
    model = registry.load(version)
    return sitecal.recalibrate(model, sitecal.score_folder(model, folder))


def create_calibrated(folder: str, version: str) -> None:
    try:
        registry = Registry()
        new = sitecal.write_version(registry, registry.load(version), site_recalibration(folder, version),
                                    actor=current_actor())
        st.session_state[MESSAGE_KEY] = ("success", f"Created {new}: {version}'s weights with this site's calibration. "
                                                    "Compare it above and activate it when it passes the gate.")
    except (OSError, ValueError, ModelFileError) as exc:
        st.session_state[MESSAGE_KEY] = ("error", f"No calibrated version was written: {exc}.")


def roll_back() -> None:
    try:
        version = promotion.rollback(Registry(), actor=current_actor())
        st.session_state[MESSAGE_KEY] = ("success", f"Rolled back: model {version} is active again.")
    except (ModelFileError, ValueError, OSError) as exc:  # OSError: the audit line; PermissionError: the role
        st.session_state[MESSAGE_KEY] = ("error", f"Nothing was rolled back: {exc}.")


# -- the page -------------------------------------------------------------------------------------
registry = Registry()
registry_root = str(registry.root)
ensure_app_navigation()
st.title("Model versions")
st.caption("Every model trained on this machine, with its validation figures. The active model is the one "
           "the Diagnose page uses; activating another takes effect on the next image analysed. Validation figures "
           "come from each version's own validation films (at the training hospital: they flatter); beside them, "
           "the same films under the worst acquisition perturbation the card stores, nearer what new films give.")

if MESSAGE_KEY in st.session_state:
    kind, text = st.session_state.pop(MESSAGE_KEY)
    (st.success if kind == "success" else st.error)(text)

try:
    versions = list(reversed(registry.versions()))  # newest first
    cards = {v: registry.card(v) for v in versions}
except (ModelFileError, ValueError) as exc:
    st.error(f"The model registry at {registry_root} cannot be read: {exc}.")
    st.stop()
if not versions:
    st.info("No model versions yet: train one on the Retrain page or with `python -m xray train`.")
    st.stop()
active = registry.active_version()
if active is None:
    st.warning("No version is active: activate one below.", icon=":material/warning:")

st.dataframe([{"active": v == active, "version": v, "shipped": registry.is_shipped(v), "created": c.created,
               "data fingerprint": c.data.fingerprint[:12],
               "validation images": c.validation.n,
               "val AUC": c.validation.roc_auc,
               "sensitivity": c.validation.sensitivity,
               "specificity": c.validation.specificity,
               "worst perturbation: sens / spec": worst_perturbation(c),
               "threshold": c.threshold} for v, c in cards.items()],
             hide_index=True, column_config={"val AUC": st.column_config.NumberColumn(format="%.3f"),
                                             "sensitivity": st.column_config.NumberColumn(format="%.3f"),
                                             "specificity": st.column_config.NumberColumn(format="%.3f"),
                                             "threshold": st.column_config.NumberColumn(format="%.6f")})

st.subheader("Validation ROC curves")
st.caption("Each curve is measured on its own version's validation split; versions trained on different data "
           "are not measured on the same images.")
st.plotly_chart(roc_figure(cards, active), key="models_roc", config={"displayModeBar": False})

st.subheader("Compare with the active model")
others = [v for v in versions if v != active] or versions
selected = st.selectbox("Version", versions, index=versions.index(others[0]), key=SELECTED_KEY)
columns = {f"{selected}" + (" (active)" if selected == active else ""): summary(cards[selected])}
if active and active != selected:
    columns[f"{active} (active)"] = summary(cards[active])
names = list(columns)
st.dataframe([{"": label, **{name: columns[name][label] for name in names}} for label in columns[names[0]]],
             hide_index=True, height=(len(columns[names[0]]) + 1) * 35 + 3)

st.subheader("Promotion gate")
result = promotion.gate(registry, selected) if selected != active else None
if result is not None:
    rows = [{"figure": name, selected: str(figure), f"{active} (active)": str(result.active_figures.get(name, "-"))}
            for name, figure in result.figures.items()]
    if rows:
        st.dataframe(rows, hide_index=True, key="models_gate_figures")
    if not result.same_acceptance_set and result.active_version:
        st.caption("The two versions were validated on different images: each figure is on its own version's set.")
    if result.passed:
        st.success(f"{selected} passes the promotion gate (at least {promotion.MIN_ACCEPTANCE_IMAGES} acceptance "
                   f"images, {promotion.MIN_PER_CLASS} per class; sensitivity within "
                   f"{promotion.SENSITIVITY_MARGIN:.2f} and AUC within {promotion.AUC_MARGIN:.2f} of the active "
                   "version).", icon=":material/verified:")
    else:
        st.error(f"{selected} does not pass the promotion gate: " + "; ".join(result.reasons) + ".",
                 icon=":material/gpp_bad:")

if not is_administrator(current_actor(), "Activating, rolling back and calibrating model versions"):
    st.stop()  # a clinician compares versions; the engine refuses the actions below to anyone else anyway
activate_col, rollback_col = st.columns(2)
activate_col.button(f"Activate {selected}", key="models_activate", type="primary",
                    disabled=selected == active or (result is not None and not result.passed),
                    on_click=activate, args=(selected,), icon=":material/check:",
                    help="Make this version the one the Diagnose page uses (it must pass the promotion gate).")
previous = [v for v in registry.history() if v in cards]
rollback_col.button(f"Roll back to {previous[-1]}" if previous else "Roll back", key="models_rollback",
                    disabled=not previous, on_click=roll_back, icon=":material/undo:",
                    help="Re-activate the previously active version (it was live before: not gated).")
if result is not None and not result.passed:
    with st.expander("Override the gate (not recommended)", icon=":material/warning:"):
        st.text_input("Reason for activating a version that fails the gate (recorded in the audit log)",
                      key=OVERRIDE_REASON_KEY)
        confirmed = st.checkbox(f"I take responsibility for activating {selected}", key=OVERRIDE_CONFIRM_KEY)
        st.button(f"Activate {selected} anyway", key="models_activate_override", on_click=activate,
                  args=(selected, True), disabled=not (confirmed and st.session_state.get(OVERRIDE_REASON_KEY, "").strip()))

st.subheader("Calibrate to this site")
st.caption("Refit the active model's probability calibration and threshold on a labelled folder from this site "
           f"(NORMAL/ and PNEUMONIA/ at any depth, at least {promotion.MIN_ACCEPTANCE_IMAGES} images with "
           f"{promotion.MIN_PER_CLASS} of each class, as the promotion gate requires). The network's weights are not changed: the result is a new, "
           "inactive version, activated like any other, through the gate.")
site_folder = st.text_input("Labelled folder", key=CALIBRATE_FOLDER_KEY, placeholder="/path/to/site/labelled",
                            help="Allowed locations: " + ", ".join(map(str, jobs.data_roots())))
if site_folder.strip() and active:
    try:
        folder = jobs.check_data_root(site_folder)
        with st.spinner("Scoring the folder with the active model..."):
            result = site_recalibration(str(folder), active)
    except (ValueError, ModelFileError) as exc:
        st.error(f"This folder cannot be used: {exc}.", icon=":material/folder_off:")
    else:
        before, after = result.before, result.after

        def with_ci(d: dict, key: str) -> str:
            low, high = d[f"{key}_ci"]
            return f"{d[key]:.3f} ({low:.3f}-{high:.3f})"

        st.dataframe([{"": "threshold", "now (active model)": f"{before['threshold']:.6f}",
                       "after recalibration (cross-validated)": f"{result.threshold:.6f}"},
                      {"": "sensitivity (95% CI)", "now (active model)": with_ci(before, "sensitivity"),
                       "after recalibration (cross-validated)": with_ci(after, "sensitivity")},
                      {"": "specificity (95% CI)", "now (active model)": with_ci(before, "specificity"),
                       "after recalibration (cross-validated)": with_ci(after, "specificity")},
                      {"": "ECE (10 bins)", "now (active model)": f"{before['ece']:.3f}",
                       "after recalibration (cross-validated)": f"{after['ece']:.3f}"}],
                     hide_index=True, key="models_calibration_figures")
        counts = result.data.counts
        st.markdown(f"**What the new threshold promises:** {sitecal.promise(result.guarantee)}.")
        st.caption(f"{counts['NORMAL']} normal and {counts['PNEUMONIA']} pneumonia images; "
                   f"{len(result.data.unreadable)} unreadable (skipped). With this many images the intervals are "
                   f"wide. Threshold rule: {result.rule}.")
        if result.data.unreadable:
            with st.expander("Unreadable files"):
                st.dataframe([{"file": n, "reason": w} for n, w in result.data.unreadable], hide_index=True)
        st.button("Create the calibrated version", key="models_calibrate", type="primary",
                  on_click=create_calibrated, args=(str(folder), active), icon=":material/tune:")

# -- adapt to this site's films, without labels (issue 25; self-contained section) --------------------
from xray.train import adapt as adaptation  # noqa: E402  (kept with its section)

ADAPT_FOLDER_KEY = "models_adapt_folder"


@st.cache_resource(ttl=600, max_entries=2, show_spinner=False)
def site_adaptation(folder: str, version: str) -> adaptation.Adaptation:
    """Read the folder and adapt once per (folder, version); nothing is written."""
    model = Registry().load(version)
    return adaptation.adapt_model(model, adaptation.read_films(model, folder))


def create_adapted(folder: str, version: str) -> None:
    try:
        registry = Registry()
        new = adaptation.write_version(registry, registry.load(version), site_adaptation(folder, version), folder,
                                       actor=current_actor())
        st.session_state[MESSAGE_KEY] = ("success", f"Created {new}: {version} adapted to this site's films. Check "
                                                    "it on labelled films before you activate it through the gate.")
    except (OSError, ValueError, ModelFileError) as exc:
        st.session_state[MESSAGE_KEY] = ("error", f"No adapted version was written: {exc}.")


st.subheader("Adapt to this site's films (no labels)")
st.caption(f"Re-estimate the active network's normalisation statistics on a folder of this site's films (labels not "
           f"needed, any depth, at least {adaptation.MIN_FILMS} films the guard accepts; films it withholds are not used). "
           "The result is a new, inactive version, activated through the gate like any other.")
adapt_folder = st.text_input("Folder of unlabelled films", key=ADAPT_FOLDER_KEY, placeholder="/path/to/site/worklist",
                             help="Allowed locations: " + ", ".join(map(str, jobs.data_roots())))
if adapt_folder.strip() and active:
    try:
        folder = jobs.check_data_root(adapt_folder)
        with st.spinner("Reading the films and adapting the active model..."):
            adapted_result = site_adaptation(str(folder), active)
    except (ValueError, ModelFileError) as exc:
        st.error(f"This folder cannot be used: {exc}.", icon=":material/folder_off:")
    else:
        s = adapted_result.summary(cards[active].threshold)
        st.dataframe([{"": "films used (withheld by the guard, not used)", "before": f"{s['used']} ({s['withheld_before']})",
                       "after adaptation": "-"},
                      {"": "called pneumonia at the threshold", "before": f"{s['called_pneumonia_before']:.1%}",
                       "after adaptation": f"{s['called_pneumonia_after']:.1%}"},
                      {"": "mean p(pneumonia)", "before": f"{s['mean_p_before']:.3f}", "after adaptation": f"{s['mean_p_after']:.3f}"},
                      {"": "withheld by the guard (all films)", "before": str(s["withheld_before"]),
                       "after adaptation": str(s["withheld_after"])},
                      {"": "site prevalence, EM estimate", "before": f"{s['prevalence_em_before']:.3f}",
                       "after adaptation": f"{s['prevalence_em_after']:.3f}"}],
                     hide_index=True, key="models_adapt_figures")
        st.markdown(f"**What changes:** {adaptation.METHOD}. {s['decisions_changed']:.1%} of these films' decisions change.")
        st.warning(f"**Not checked:** {adaptation.NOT_CHECKED}", icon=":material/help:")
        if adapted_result.films.unreadable:
            with st.expander("Unreadable files"):
                st.dataframe([{"file": n, "reason": w} for n, w in adapted_result.films.unreadable], hide_index=True)
        st.button("Create the adapted version", key="models_adapt", type="primary",
                  on_click=create_adapted, args=(str(folder), active), icon=":material/auto_fix_high:")
