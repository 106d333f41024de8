"""The About page states the active model's card: what it is, validation figures, intended use, limits."""
from __future__ import annotations

from pathlib import Path

from xray.model.registry import Registry

ROOT = Path(__file__).resolve().parent.parent


def about_page():
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.run()
    at.switch_page("pages/about.py").run()
    assert not at.exception, at.exception
    return at


def text_of(at) -> str:
    return "\n".join([m.value for m in at.markdown] + [c.value for c in at.caption] + [i.value for i in at.info])


def test_about_states_the_card(tiny_registry):
    registry = Registry(tiny_registry)
    card = registry.card(registry.active_version())
    at = about_page()
    assert at.title[0].value == "About this model"
    text = text_of(at)
    assert card["version"] in text
    assert "It assists a clinician and does not diagnose" in text
    assert card["intended_use"] in text
    assert all(limit in text for limit in card["limits"])
    assert "sigmoid" not in text and "stages[-1]" not in text  # no developer terms for clinicians
    primary = "\n".join([m.value for m in at.main.markdown if "Threshold rule `" not in m.value])
    assert card["threshold_rule"] not in primary and card["calibration"]["method"] not in primary  # under Details
    assert f"threshold **{card['threshold']:.6f}**" in text
    assert card["data"]["fingerprint"] in text
    table = next(d.value for d in at.dataframe if "Measure" in d.value.columns)
    figures = dict(zip(table["Measure"], table["Value"]))
    validation = card["validation"]
    assert figures["Calibration error (gap between probability and observed rate)"] == f"{validation['ece']:.3f}"
    assert figures["Area under the ROC curve"] == f"{validation['roc_auc']:.3f}"
    assert figures["Sensitivity (recall)"] == f"{validation['sensitivity']:.3f}"
    counts = next(d.value for d in at.dataframe if "Part" in d.value.columns)
    total = {c: sum(row.get(c, 0) for row in card["data"]["counts"].values()) for c in ("NORMAL", "PNEUMONIA")}
    assert counts["NORMAL"].sum() == total["NORMAL"] and counts["PNEUMONIA"].sum() == total["PNEUMONIA"]


def test_about_follows_a_new_default_threshold(tiny_registry):
    registry = Registry(tiny_registry)
    registry.update_card(registry.active_version(), {"threshold": 0.123, "threshold_rule": "set in the app (test)"})
    text = text_of(about_page())
    assert "threshold **0.123000**: set in the app (test)" in text


def test_about_without_a_model_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("XRAY_WEIGHTS", str(tmp_path / "nothing-here"))
    at = about_page()
    assert "No model is available" in at.error[0].value


def test_about_names_the_shipped_ensemble(monkeypatch, tmp_path):
    monkeypatch.setenv("XRAY_WEIGHTS", str(ROOT / "weights"))
    monkeypatch.setenv("XRAY_AUDIT_LOG", "off")
    monkeypatch.setenv("XRAY_DATA", str(tmp_path / "data"))
    card = Registry(ROOT / "weights").card(Registry(ROOT / "weights").active_version())
    members = card["architecture"]["config"].get("members", 1)
    text = text_of(about_page())
    assert members == 3  # the shipped model of issue 15 is a deep ensemble of three nets
    assert "A deep ensemble of 3 convolutional networks" in text
    assert ", ".join(map(str, card["training"]["best_epoch"])) + " for its members" in text
    assert f"{card['architecture']['parameters']:,} parameters" in text
    # the guard's figures are the leave-one-source-out ones recorded in the card, with their n
    assert "287 of 300 (95.7%) NIH films when fitted on Hannover" in text
    assert "229 of 243 (94.2%) Hannover films when fitted on NIH" in text
    assert "5 of 785 (0.6%) of the validation films" in text


def test_figures_on_screen_say_their_source_n_and_the_worst_perturbation(monkeypatch, tmp_path):
    import pytest

    from xray.model.card import operating_figures

    monkeypatch.setenv("XRAY_WEIGHTS", str(ROOT / "weights"))
    monkeypatch.setenv("XRAY_AUDIT_LOG", "off")
    monkeypatch.setenv("XRAY_DATA", str(tmp_path / "data"))
    registry = Registry(ROOT / "weights")
    card = registry.card(registry.active_version())  # the shipped ensemble (or its OOD-refitted copy: same films)
    f = operating_figures(card.validation, card.threshold)
    assert (f.positives, f.negatives) == (583, 202)
    assert f.sensitivity == pytest.approx(card.validation.sensitivity) and f.sensitivity_ci[0] < f.sensitivity
    # the card's rule keeps sensitivity >= 0.95 under every perturbation: the worst one sits on the floor
    assert f.worst_sensitivity[0] >= 0.95 and f.worst_sensitivity[1] == "gamma 1.4"
    assert f.worst_specificity[0] < f.specificity
    text = f.describe()
    assert "583 pneumonia / 202 normal films (the training hospital's)" in text
    assert "worst acquisition perturbation" in text
    assert "worst perturbation" in f.describe(short=True)
    assert operating_figures(type(card.validation).from_dict({}), 0.5) is None
    assert text in text_of(about_page())  # the page says exactly what the card gives
