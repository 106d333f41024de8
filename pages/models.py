"""Models: every trained version side by side with the active one, ROC curves overlaid; make a version the
live model (through the promotion gate), roll back, or calibrate the active one to this site. Every change of
the live model is confirmed, says what changes, and is audited (xray.govern.promotion)."""
from __future__ import annotations

import math
from pathlib import Path

import plotly.graph_objects as go
import streamlit as st

from pages.common import current_actor, ensure_app_navigation, escape_markdown, is_administrator, rule_in_words
from xray.decide import metrics
from xray.govern import promotion, sitecal
from xray.model.card import ModelCard, operating_figures
from xray.model.registry import ModelFileError, Registry
from xray.train import adapt as adaptation
from xray.train import jobs

MESSAGE_KEY = "models_message"  # {place: (kind, text)}: what the last button did, shown beside that button
SELECTED_KEY = "models_selected"
OVERRIDE_REASON_KEY = "models_override_reason"
OVERRIDE_CONFIRM_KEY = "models_override_confirm"
ACTIVATE_CONFIRM_KEY = "models_activate_confirm"
ACTIVATE_REASON_KEY = "models_activate_reason"
ROLLBACK_CONFIRM_KEY = "models_rollback_confirm"
ROLLBACK_REASON_KEY = "models_rollback_reason"
CALIBRATE_FOLDER_KEY = "models_calibrate_folder"

FIGURES = [("Area under the ROC curve", "roc_auc"), ("Sensitivity (validation)", "sensitivity"),
           ("Specificity (validation)", "specificity"),
           ("PPV (precision)", "precision"), ("NPV", "npv"), ("Calibration error", "ece")]
GATE_WORDS = {"sensitivity": "Sensitivity at its threshold", "specificity": "Specificity at its threshold",
              "roc_auc": "Area under the ROC curve"}


# -- the screen, top to bottom (its parts follow in the same order) -----------------------------------
def main() -> None:
    registry = Registry()
    ensure_app_navigation()
    st.title("Model versions")
    st.caption("Every model trained on this machine, with its validation figures. The live (active) model is the "
               "one the Diagnose page uses; a change takes effect on the next film analysed.")
    try:
        versions = list(reversed(registry.versions()))  # newest first
        cards = {v: registry.card(v) for v in versions}
    except (ModelFileError, ValueError) as exc:
        st.error(f"The model registry at {registry.root} cannot be read: {exc}.")
        st.stop()
    if not versions:
        st.info("No model versions yet: train one on the Retrain page or with `python -m xray train`.")
        st.stop()
    active = registry.active_version()
    if active is None:
        st.warning("No version is active: activate one below.", icon=":material/warning:")
    versions_ui(registry, cards, active)
    selected = compare_ui(cards, versions, active)
    result = gate_ui(registry, selected, active)
    if not is_administrator(current_actor(), "Activating, rolling back and calibrating model versions"):
        st.stop()  # a clinician compares versions; the engine refuses the actions below to anyone else anyway
    activate_ui(selected, active, result)
    rollback_ui(registry, cards, active)
    calibrate_ui(active)
    adapt_ui(cards, active)


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
        fig.add_scatter(x=fpr.tolist(), y=tpr.tolist(), mode="lines", name=name,
                        line=dict(width=4 if version == active else 2), line_shape="hv")
    fig.update_layout(height=420, margin=dict(l=10, r=10, t=10, b=10), legend=dict(orientation="h", y=-0.2),
                      xaxis_title="1 - specificity (false positive rate)", yaxis_title="sensitivity")
    fig.update_xaxes(range=[0, 1])
    fig.update_yaxes(range=[0, 1.02])
    return fig


# -- callbacks: the engine changes the live model and audits it; the page says what happened ----------
def say(place: str, kind: str, text: str) -> None:
    st.session_state.setdefault(MESSAGE_KEY, {})[place] = (kind, text)


def message_ui(place: str) -> None:
    """What the last button here did, right below it."""
    kind, text = st.session_state.get(MESSAGE_KEY, {}).pop(place, (None, None))
    if kind:
        (st.success if kind == "success" else st.error)(text)


def activate(version: str, active: str | None, force: bool = False) -> None:
    """Activate through the promotion gate (audited there); with ``force``, the override reason is recorded."""
    reason = st.session_state.get(OVERRIDE_REASON_KEY if force else ACTIVATE_REASON_KEY, "")
    try:
        promotion.promote(Registry(), version, force=force, reason=reason, actor=current_actor())
    except promotion.PromotionRefused as exc:
        say("activate", "error", f"Model {version} was not activated: {exc}")
        return
    except (ModelFileError, ValueError, PermissionError) as exc:
        say("activate", "error", f"Model {version} was not activated: {exc}.")
        return
    note = f" Override recorded: {reason}." if force else ""
    replaced = f" in place of {active}" if active else ""
    say("activate", "success", f"Model {version} is now live{replaced}: the Diagnose page uses it for the next "
                               f"film, for everyone. Recorded in the audit log.{note}")
    for key in (ACTIVATE_CONFIRM_KEY, OVERRIDE_CONFIRM_KEY):
        st.session_state[key] = False


def roll_back(expected: str, active: str) -> None:
    """Roll back through ``promotion.rollback`` (audited, with the reason typed)."""
    try:
        version = promotion.rollback(Registry(), st.session_state.get(ROLLBACK_REASON_KEY, ""), actor=current_actor())
    except (ModelFileError, ValueError, OSError) as exc:  # OSError: the audit line; PermissionError: the role
        say("rollback", "error", f"Nothing was rolled back: {exc}.")
        return
    st.session_state[ROLLBACK_CONFIRM_KEY] = False
    say("rollback", "success", f"Rolled back: model {version} is now live in place of {active}, for everyone. "
                               "Recorded in the audit log.")
    if version != expected:  # another tab or user changed the history meanwhile
        say("rollback", "error", f"Model {version} is now live (not {expected}: the history changed meanwhile).")


@st.cache_data(ttl=600, max_entries=4, show_spinner=False)
def site_recalibration(folder: str, version: str) -> sitecal.Recalibration:
    """Score and recalibrate once per (folder, version); nothing is written."""
    model = Registry().load(version)
    return sitecal.recalibrate(model, sitecal.score_folder(model, folder))


def create_calibrated(folder: str, version: str) -> None:
    try:
        registry = Registry()
        new = sitecal.write_version(registry, registry.load(version), site_recalibration(folder, version),
                                    actor=current_actor())
        figures = promotion.acceptance_figures(registry.card(new))
    except (OSError, ValueError, ModelFileError) as exc:
        say("calibrate", "error", f"No calibrated version was written: {exc}.")
        return
    say("calibrate", "success",
        f"Created {new}: {version}'s weights with this site's calibration, threshold "
        f"{registry.card(new).threshold:.6f}, sensitivity {figures['sensitivity'].value:.3f} and specificity "
        f"{figures['specificity'].value:.3f} on this site's films (the figures above). It is not live yet: "
        "select it above and activate it when it passes the gate.")


# -- the page ---------------------------------------------------------------------------------------
def versions_ui(registry: Registry, cards: dict[str, ModelCard], active: str | None) -> None:
    st.dataframe([{"active": v == active, "version": v, "shipped": registry.is_shipped(v), "created": c.created,
                   "data fingerprint": c.data.fingerprint[:12],
                   "validation images": c.validation.n,
                   "area under ROC": c.validation.roc_auc,
                   "sensitivity": c.validation.sensitivity,
                   "specificity": c.validation.specificity,
                   "worst perturbation: sens / spec": worst_perturbation(c),
                   "threshold": c.threshold} for v, c in cards.items()],
                 hide_index=True, column_config={"area under ROC": st.column_config.NumberColumn(format="%.3f"),
                                                 "sensitivity": st.column_config.NumberColumn(format="%.3f"),
                                                 "specificity": st.column_config.NumberColumn(format="%.3f"),
                                                 "threshold": st.column_config.NumberColumn(format="%.6f")})
    st.subheader("Validation ROC curves")
    st.caption("Each curve is measured on its own version's validation split; versions trained on different data "
               "are not measured on the same images.")
    st.plotly_chart(roc_figure(cards, active), key="models_roc", config={"displayModeBar": False})


def compare_ui(cards: dict[str, ModelCard], versions: list[str], active: str | None) -> str:
    st.subheader("Compare with the active model")
    others = [v for v in versions if v != active] or versions
    selected = st.selectbox("Version", versions, index=versions.index(others[0]), key=SELECTED_KEY)
    columns = {f"{selected}" + (" (active)" if selected == active else ""): summary(cards[selected])}
    if active and active != selected:
        columns[f"{active} (active)"] = summary(cards[active])
    names = list(columns)
    st.dataframe([{"": label, **{name: columns[name][label] for name in names}} for label in columns[names[0]]],
                 hide_index=True, height=(len(columns[names[0]]) + 1) * 35 + 3)
    return selected


def gate_ui(registry: Registry, selected: str, active: str | None) -> promotion.GateResult | None:
    st.subheader("Promotion gate")
    if selected == active:
        st.caption(f"{selected} is the live model.")
        return None
    result = promotion.gate(registry, selected)
    rows = [{"figure": GATE_WORDS.get(name, name), selected: str(figure),
             f"{active} (active)": str(result.active_figures.get(name, "-"))}
            for name, figure in result.figures.items()]
    if rows:
        st.dataframe(rows, hide_index=True, key="models_gate_figures")
    if not result.same_acceptance_set and result.active_version:
        st.caption("The two versions were validated on different images: each figure is on its own version's set.")
    if result.passed:
        st.success(f"{selected} passes the promotion gate (at least {promotion.MIN_ACCEPTANCE_IMAGES} validation "
                   f"images, {promotion.MIN_PER_CLASS} of each class; sensitivity within "
                   f"{promotion.SENSITIVITY_MARGIN:.2f} and area under the ROC curve within "
                   f"{promotion.AUC_MARGIN:.2f} of the live version).", icon=":material/verified:")
    else:
        st.error(f"{selected} does not pass the promotion gate: " + "; ".join(result.reasons) + ".",
                 icon=":material/gpp_bad:")
    return result


def activate_ui(selected: str, active: str | None, result: promotion.GateResult | None) -> None:
    """Activation, confirmed: says which model stops and which starts being used for every film."""
    if result is None:
        message_ui("activate")
        return
    change = (f"The Diagnose page, for everyone, will use {selected} instead of {active} from the next film."
              if active else f"The Diagnose page, for everyone, will use {selected} from the next film.")
    if result.passed:
        st.text_input("Reason (recorded in the audit log)", key=ACTIVATE_REASON_KEY)
        confirmed = st.checkbox(change, key=ACTIVATE_CONFIRM_KEY)
        st.button(f"Activate {selected}", key="models_activate", type="primary", disabled=not confirmed,
                  on_click=activate, args=(selected, active), icon=":material/check:")
    else:
        st.button(f"Activate {selected}", key="models_activate", type="primary", disabled=True,
                  icon=":material/check:", help="It does not pass the promotion gate.")
        with st.expander("Override the gate (not recommended)", icon=":material/warning:"):
            st.text_input("Reason for activating a version that fails the gate (recorded in the audit log)",
                          key=OVERRIDE_REASON_KEY)
            confirmed = st.checkbox(f"I take responsibility. {change}", key=OVERRIDE_CONFIRM_KEY)
            st.button(f"Activate {selected} anyway", key="models_activate_override", on_click=activate,
                      args=(selected, active, True),
                      disabled=not (confirmed and st.session_state.get(OVERRIDE_REASON_KEY, "").strip()))
    message_ui("activate")


def rollback_ui(registry: Registry, cards: dict[str, ModelCard], active: str | None) -> None:
    """Roll back to the version live here before the current one: confirmed, with a reason, audited."""
    previous = [v for v in registry.history() if v in cards]
    st.subheader("Roll back")
    if not previous or active is None:
        st.caption("No earlier version was live at this site: there is nothing to roll back to.")
        st.button("Roll back", key="models_rollback", disabled=True, icon=":material/undo:")
        message_ui("rollback")
        return
    target = previous[-1]
    st.caption(f"Makes {target}, the version live here before {active}, the live model again. It is not gated "
               "(it was live before).")
    st.text_input("Reason for rolling back (recorded in the audit log)", key=ROLLBACK_REASON_KEY)
    confirmed = st.checkbox(f"The Diagnose page, for everyone, will use {target} instead of {active} from the next "
                            "film.", key=ROLLBACK_CONFIRM_KEY)
    st.button(f"Roll back to {target}", key="models_rollback", icon=":material/undo:", on_click=roll_back,
              args=(target, active),
              disabled=not (confirmed and st.session_state.get(ROLLBACK_REASON_KEY, "").strip()))
    message_ui("rollback")


def calibrate_ui(active: str | None) -> None:
    """Calibrate the active version to this site: the minimum first, one set of figures, the result beside it."""
    st.subheader("Calibrate to this site")
    need_images, need_class = promotion.MIN_ACCEPTANCE_IMAGES, promotion.MIN_PER_CLASS
    st.caption("Refit the live model's probabilities and threshold on a labelled folder from this site (NORMAL/ and "
               "PNEUMONIA/ at any depth). The network's weights are not changed: the result is a new version, "
               "activated like any other, through the promotion gate.")
    st.info(f"To be activated without an override, the folder needs at least {need_images} readable films with "
            f"{need_class} of each class (the promotion gate's minimum). Fewer are refused before any work starts.",
            icon=":material/info:")
    site_folder = st.text_input("Labelled folder", key=CALIBRATE_FOLDER_KEY, placeholder="/path/to/site/labelled",
                                help="Allowed locations: " + ", ".join(map(str, jobs.data_roots())))
    if not (site_folder.strip() and active):
        message_ui("calibrate")
        return
    try:
        folder = jobs.check_data_root(site_folder)
        with st.spinner("Scoring the folder with the live model..."):
            result = site_recalibration(str(folder), active)
    except (ValueError, ModelFileError) as exc:
        st.error(f"This folder cannot be used: {exc}.", icon=":material/folder_off:")
        message_ui("calibrate")
        return
    before, after = result.before, result.after

    def with_ci(d: dict, key: str) -> str:
        low, high = d[f"{key}_ci"]
        return f"{d[key]:.3f} ({low:.3f}-{high:.3f})"

    st.dataframe([{"": "threshold", "now (live model)": f"{before['threshold']:.6f}",
                   "after calibration": f"{result.threshold:.6f}"},
                  {"": "sensitivity (95% CI)", "now (live model)": with_ci(before, "sensitivity"),
                   "after calibration": with_ci(after, "sensitivity")},
                  {"": "specificity (95% CI)", "now (live model)": with_ci(before, "specificity"),
                   "after calibration": with_ci(after, "specificity")}],
                 hide_index=True, key="models_calibration_figures")
    counts = result.data.counts
    st.markdown(f"**What the new threshold promises:** {sitecal.promise(result.guarantee)}.")
    st.caption(f"On this site's {counts['NORMAL']} normal and {counts['PNEUMONIA']} pneumonia films "
               f"({len(result.data.unreadable)} unreadable, skipped). The figures after calibration are what the new "
               "version's card records and the gate reads; each film is scored by a calibration fitted without it. "
               "With this many films the intervals are wide.")
    with st.expander("Details"):
        st.markdown(f"Calibration error (10 bins): now {before['ece']:.3f}, after {after['ece']:.3f}.  \n"
                    f"Threshold rule: {rule_in_words(result.rule)}.  \nMethod: {escape_markdown(sitecal.METHOD)}; "
                    f"{escape_markdown(after['method'])}.")
    if result.data.unreadable:
        with st.expander("Unreadable files"):
            st.dataframe([{"file": n, "reason": w} for n, w in result.data.unreadable], hide_index=True)
    st.button("Create the calibrated version", key="models_calibrate", type="primary",
              on_click=create_calibrated, args=(str(folder), active), icon=":material/tune:")
    message_ui("calibrate")


# -- adapt to this site's films, without labels (issue 25) ------------------------------------------

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
        say("adapt", "success", f"Created {new}: {version} adapted to this site's films. Check it on labelled "
                             "films before you activate it through the gate.")
    except (OSError, ValueError, ModelFileError) as exc:
        say("adapt", "error", f"No adapted version was written: {exc}.")



def adapt_ui(cards: dict[str, ModelCard], active: str | None) -> None:
    """Adapt the live model to this site's unlabelled films (issue 25), as a new inactive version."""
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
    message_ui("adapt")


if __name__ == "__main__":  # Streamlit runs a page as __main__
    main()
