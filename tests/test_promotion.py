"""The promotion gate (xray.govern.promotion) on its own: the figures, the minimum, the margins, and the record
every activation leaves (issue 21)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from cards import card_dict, validated_card
from xray.decide import metrics as M
from xray.govern import promotion
from xray.govern.identity import ADMINISTRATOR, Actor, operator
from xray.model.card import ModelCard
from xray.model.registry import Registry


def test_figures_carry_n_and_wilson_and_hanley_mcneil_intervals():
    card = validated_card("v", 120, 100, 0.95, 0.80)
    figures = promotion.acceptance_figures(card)
    sens, spec, auc = figures["sensitivity"], figures["specificity"], figures["roc_auc"]
    assert (sens.value, sens.n, spec.value, spec.n, auc.n) == (114 / 120, 120, 80 / 100, 100, 220)
    assert (sens.low, sens.high) == M.wilson_interval(114, 120) and (spec.low, spec.high) == M.wilson_interval(80, 100)
    assert (auc.low, auc.high) == M.auc_interval(auc.value, 120, 100)
    assert str(sens) == f"{114 / 120:.3f} (95% CI {sens.low:.3f}-{sens.high:.3f}, n=120)"
    # at another threshold the same images give other figures
    assert promotion.acceptance_figures(card, threshold=0.0)["sensitivity"].value == 1.0


def test_a_card_without_predictions_has_no_figures_and_fails():
    result = promotion.check_promotion(ModelCard(card_dict("v")), None)
    assert not result.passed and result.figures == {} and "holds no evaluation" in result.reasons[0]


@pytest.mark.parametrize("pneumonia, normal, passes", [(150, 50, True), (100, 100, True), (151, 49, False),
                                                      (50, 149, False), (120, 60, False)])
def test_the_one_minimum_of_an_acceptance_set(pneumonia, normal, passes):
    assert promotion.large_enough(pneumonia, normal) is passes
    result = promotion.check_promotion(validated_card("v", pneumonia, normal, 0.95, 0.8), None)
    assert result.passed is passes
    if not passes:
        assert f"evaluated on only {pneumonia + normal} images ({pneumonia} pneumonia, {normal} normal)" in result.reasons[0]


def test_the_minimum_can_be_lowered_in_one_place(monkeypatch):
    monkeypatch.setattr(promotion, "MIN_ACCEPTANCE_IMAGES", 10)
    monkeypatch.setattr(promotion, "MIN_PER_CLASS", 5)
    assert promotion.check_promotion(validated_card("v", 6, 6, 1.0, 1.0), None).passed


def test_sensitivity_may_drop_by_the_margin_but_not_more():
    active = validated_card("old", 200, 100, 0.95, 0.80)
    within = validated_card("new", 200, 100, 0.93, 0.90)  # 0.02 below: allowed
    below = validated_card("new", 200, 100, 0.92, 0.90)
    assert promotion.check_promotion(within, active).passed
    result = promotion.check_promotion(below, active)
    assert not result.passed and result.reasons == ("its sensitivity at its threshold 0.920 is more than 0.02 below "
                                                    "the active version's 0.950",)
    assert result.active_version == "old" and result.active_figures["sensitivity"].value == 0.95


def test_a_lower_roc_auc_fails_even_with_the_same_sensitivity():
    active = validated_card("old", 150, 150, 0.9, 0.9)
    worse = validated_card("new", 150, 150, 0.9, 0.9, auc_noise=1.0)
    assert promotion.acceptance_figures(worse)["roc_auc"].value < promotion.acceptance_figures(active)["roc_auc"].value - 0.01
    result = promotion.check_promotion(worse, active)
    assert not result.passed and len(result.reasons) == 1 and "ROC AUC" in result.reasons[0]


def test_same_acceptance_set_only_when_the_fingerprints_match():
    active = validated_card("old", 150, 150, 0.9, 0.9)
    assert promotion.check_promotion(validated_card("new", 150, 150, 0.9, 0.9), active).same_acceptance_set
    other = validated_card("new", 150, 150, 0.9, 0.9, fingerprint="0" * 64)
    assert not promotion.check_promotion(other, active).same_acceptance_set
    # the active version against itself is never compared
    assert promotion.check_promotion(active, active).active_figures == {}


def _audit_events() -> list[dict]:
    with open(os.environ["XRAY_AUDIT_LOG"]) as f:
        return [json.loads(line) for line in f if '"event"' in line]


def test_promote_refuses_then_records_an_override_in_marker_card_and_audit_log(tiny_registry):
    registry = Registry(tiny_registry)
    first = registry.active_version()
    model = registry.load()
    second = registry.save_version(model.net, model.card)
    with pytest.raises(promotion.PromotionRefused) as refused:
        promotion.promote(registry, second, actor=operator())
    assert not refused.value.result.passed and registry.active_version() == first
    with pytest.raises(ValueError, match="needs a reason"):
        promotion.promote(registry, second, force=True, reason="  ", actor=operator())
    dr = Actor("s-test", "dr.test@ward.example", ADMINISTRATOR, "http://idp.example")
    result = promotion.promote(registry, second, force=True, reason="a  tested\noverride", actor=dr)
    assert not result.passed and registry.active_version() == second
    (override,) = registry.card(second).activation_overrides  # typed on the card
    assert (override.by, override.subject, override.reason, override.gate) == ("dr.test@ward.example", "s-test",
                                                                               "a tested override", result.reasons)
    marker = json.loads(registry.marker.read_text())
    assert marker["override"]["reason"] == "a tested override"
    event = _audit_events()[-1]
    assert (event["event"], event["version"], event["previous"], event["user"], event["email"]) == (
        "activation-override", second, first, "s-test", "dr.test@ward.example")
    assert promotion.rollback(registry, reason="back", actor=dr) == first
    event = _audit_events()[-1]
    assert (event["event"], event["version"], event["previous"], event["reason"]) == ("rollback", first, second, "back")


def test_promote_of_a_passing_version_writes_an_activation_line(tiny_registry, monkeypatch):
    monkeypatch.setattr(promotion, "MIN_ACCEPTANCE_IMAGES", 1)
    monkeypatch.setattr(promotion, "MIN_PER_CLASS", 1)
    registry = Registry(tiny_registry)
    first = registry.active_version()
    model = registry.load()
    second = registry.save_version(model.net, model.card)  # the same figures: passes
    assert promotion.promote(registry, second, actor=operator()).passed
    event = _audit_events()[-1]
    assert (event["event"], event["version"], event["previous"], event["gate"]) == ("activation", second, first, "passed")
    assert registry.card(second).activation_overrides == ()
    assert np.isfinite(promotion.gate(registry, second).figures["roc_auc"].value)
