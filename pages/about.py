"""About: the active model's card in plain words: what it is, how well it did on validation, what it is for."""
from __future__ import annotations

import streamlit as st

from pages.common import require_model, rule_in_words
from xray.model.card import operating_figures
from xray.model.ood import measured_phrase

model = require_model()
card = model.card  # xray.model.card.ModelCard: typed, validated when the version was loaded
validation = card.validation

def network_phrase(members: int) -> str:
    """How the page names the network: one CNN, or a deep ensemble of several averaged in logit space."""
    if members > 1:
        return (f"A deep ensemble of {members} convolutional networks (each from its own random start; their "
                "outputs averaged)")
    return "A convolutional network"


st.title("About this model")
st.info("This assistant estimates the probability of pneumonia on a chest radiograph and shows where the "
        "model looked. **It assists a clinician and does not diagnose**: every decision stays with the "
        "clinician who reads the image.", icon=":material/health_and_safety:")

st.header("What it is")
st.markdown(
    f"- Model version **{model.version}**, created {card.created or 'unknown'}\n"
    f"- {network_phrase(model.net.config.members)} trained from scratch on one-channel radiographs, "
    f"{card.parameters or 0:,} parameters, input {card.image_size} x {card.image_size} pixels\n"
    f"- Heatmaps (Grad-CAM) show which regions of the image raised the probability most\n"
    f"- Default operating threshold **{model.threshold:.6f}**: {rule_in_words(card.threshold_rule)}\n"
    f"- Probabilities calibrated on validation films ({card.calibration_prevalence:.0%} had pneumonia)")
with st.expander("Details"):
    st.markdown(f"Threshold rule `{card.threshold_rule}`. Calibration: {card.calibration_method}.")

st.header("Intended use")
st.markdown(card.intended_use)

st.header("When it withholds its verdict")
st.markdown("Before a verdict is shown, an intended-use guard checks the film: the DICOM header first (age, view, "
            "body part, modality), then the pixels. A film unlike the pediatric films the model was made for "
            "(another kind of equipment or an older patient) gets **no verdict**: read it without the model.")
guard_figures = measured_phrase(card.ood)
st.markdown(guard_figures + " (Measured leave one source out: the guard was fitted on one outside hospital's "
            "films and counted on another's.)" if guard_figures else
            "This version's guard has no leave-one-source-out measurement recorded.")

st.header("Limits")
limits = card.limits or ("None stated in this model's card: treat every result with caution.",)
st.markdown("\n".join(f"- {limit}" for limit in limits))

st.header("Validation")
st.caption(validation.description or "How validation was formed is not recorded.")


def figure(key: str, block=validation) -> str:
    value = block.figure(key)
    return "n/a" if value is None else f"{value:.3f}"


rows = [("Area under the ROC curve", "roc_auc"), ("Area under the precision-recall curve", "pr_auc"),
        ("Sensitivity (recall)", "sensitivity"),
        ("Specificity", "specificity"), ("Precision (PPV)", "precision"), ("NPV", "npv"), ("F1", "f1"),
        ("Accuracy", "accuracy"), ("Calibration error (gap between probability and observed rate)", "ece")]
left, right = st.columns(2)
with left:
    st.dataframe({"Measure": [name for name, _ in rows], "Value": [figure(key) for _, key in rows]},
                 hide_index=True, key="about_validation")
with right:
    at = validation.threshold if validation.threshold is not None else model.threshold
    st.markdown(f"On **{validation.n or '?'}** validation images, at threshold **{at:.6f}**.")
    figures_at = operating_figures(validation, at)
    if figures_at is not None:
        st.markdown(f"Expect new films nearer the second figures: {figures_at.describe()}.")
    if card.ece_crossfit is not None:
        st.markdown(f"Calibration error with the calibration fitted on the other half of validation "
                    f"(an honest estimate): **{card.ece_crossfit:.3f}**.")
    cm = validation.confusion_matrix
    if cm:
        st.dataframe({"Actual": ["Pneumonia", "Normal"], "Called PNEUMONIA": [cm["tp"], cm["fp"]],
                      "Called NORMAL": [cm["fn"], cm["tn"]]}, hide_index=True, key="about_confusion")
if card.test is not None:
    st.caption(f"Held-out test part of the training folder: area under the ROC curve {figure('roc_auc', card.test)}, "
               f"sensitivity {figure('sensitivity', card.test)}, "
               f"specificity {figure('specificity', card.test)} ({card.test.note}).")

st.header("Training data")
data = card.data
st.dataframe({"Part": list(data.counts), "NORMAL": [row.get("NORMAL", 0) for row in data.counts.values()],
              "PNEUMONIA": [row.get("PNEUMONIA", 0) for row in data.counts.values()]}, hide_index=True,
             key="about_counts")
st.markdown(f"- {data.train_images if data.train_images is not None else '?'} images trained on, "
            f"{data.val_images if data.val_images is not None else '?'} held out for validation; "
            f"{data.duplicates} duplicate group(s), {data.unreadable} unreadable file(s)\n"
            f"- Data fingerprint `{data.fingerprint or 'not recorded'}`")
training = card.training
if training.command:
    best = training.best_epoch
    best = ", ".join(map(str, best)) + " for its members" if isinstance(best, (list, tuple)) else (best or "?")
    st.caption(f"Trained for {training.epochs_run or '?'} epochs in all (best {best}) "
               f"in {training.seconds if training.seconds is not None else '?'} s; recipe: `{training.recipe}`")
