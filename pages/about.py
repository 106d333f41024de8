"""About: the active model's card in plain words: what it is, how well it did on validation, what it is for."""
from __future__ import annotations

import math

import streamlit as st

from pages.common import require_model

model = require_model()
card = model.card
validation = card.get("validation", {})

st.title("About this model")
st.info("This assistant estimates the probability of pneumonia on a chest radiograph and shows where the "
        "model looked. **It assists a clinician and does not diagnose**: every decision stays with the "
        "clinician who reads the image.", icon=":material/health_and_safety:")

st.header("What it is")
architecture = card.get("architecture", {})
preprocessing = card.get("preprocessing", {})
st.markdown(
    f"- Model version **{model.version}**, created {card.get('created', 'unknown')}\n"
    f"- {architecture.get('name', 'CNN')}: a convolutional network trained from scratch on one-channel "
    f"radiographs, {architecture.get('parameters', 0):,} parameters, input "
    f"{preprocessing.get('image_size', '?')} x {preprocessing.get('image_size', '?')} pixels\n"
    f"- Grad-CAM heatmaps from layer `{architecture.get('gradcam_layer', 'last stage')}`\n"
    f"- Default operating threshold **{model.threshold:.3f}** (rule: {card.get('threshold_rule', 'not recorded')})\n"
    f"- Probabilities calibrated by {card.get('calibration', {}).get('method', 'no calibration')}: "
    f"p = sigmoid(**{model.calibration[0]:.3f}** x logit + **{model.calibration[1]:.3f}**)")

st.header("Intended use")
st.markdown(card.get("intended_use", "Not stated in this model's card."))

st.header("Limits")
limits = card.get("limits") or ["None stated in this model's card: treat every result with caution."]
st.markdown("\n".join(f"- {limit}" for limit in limits))

st.header("Validation")
st.caption(validation.get("split", "How validation was formed is not recorded."))


def figure(key: str) -> str:
    value = validation.get(key)
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


rows = [("ROC AUC", "roc_auc"), ("PR AUC (average precision)", "pr_auc"), ("Sensitivity (recall)", "sensitivity"),
        ("Specificity", "specificity"), ("Precision (PPV)", "precision"), ("NPV", "npv"), ("F1", "f1"),
        ("Accuracy", "accuracy"), ("Expected calibration error (ECE)", "ece")]
left, right = st.columns(2)
with left:
    st.dataframe({"Measure": [name for name, _ in rows], "Value": [figure(key) for _, key in rows]},
                 hide_index=True, key="about_validation")
with right:
    st.markdown(f"On **{validation.get('n', '?')}** validation images, at threshold "
                f"**{float(validation.get('threshold', model.threshold)):.3f}**.")
    crossfit = card.get("calibration", {}).get("ece_crossfit")
    if crossfit is not None:
        st.markdown(f"Calibration error with the calibration fitted on the other half of validation "
                    f"(an honest estimate): **{crossfit:.3f}**.")
    cm = validation.get("confusion_matrix")
    if cm:
        st.dataframe({"Actual": ["Pneumonia", "Normal"], "Called PNEUMONIA": [cm["tp"], cm["fp"]],
                      "Called NORMAL": [cm["fn"], cm["tn"]]}, hide_index=True, key="about_confusion")
if "test" in card:
    st.caption(f"Held-out test part of the training folder: ROC AUC {card['test'].get('roc_auc', float('nan')):.3f}, "
               f"sensitivity {card['test'].get('sensitivity', float('nan')):.3f}, "
               f"specificity {card['test'].get('specificity', float('nan')):.3f} ({card['test'].get('note', '')}).")

st.header("Training data")
data = card.get("data", {})
counts = data.get("counts", {})
st.dataframe({"Part": list(counts), "NORMAL": [row.get("NORMAL", 0) for row in counts.values()],
              "PNEUMONIA": [row.get("PNEUMONIA", 0) for row in counts.values()]}, hide_index=True,
             key="about_counts")
st.markdown(f"- {data.get('train_images', '?')} images trained on, {data.get('val_images', '?')} held out for "
            f"validation; {data.get('duplicates', 0)} duplicate group(s), {data.get('unreadable', 0)} unreadable file(s)\n"
            f"- Data fingerprint `{data.get('fingerprint', 'not recorded')}`")
training = card.get("training", {})
if training:
    st.caption(f"Trained for {training.get('epochs_run', '?')} epochs (best {training.get('best_epoch', '?')}) "
               f"in {training.get('seconds', '?')} s; command: `{training.get('command', '')}`")
if card.get("experiment"):
    st.caption(f"Why this recipe: {card['experiment']}")
