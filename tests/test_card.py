"""The typed model card (xray.model.card): every block parsed once, old cards on disk still load (issue 21)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cards import card_dict
from xray.model.card import (
    ActivationOverride,
    CardError,
    ModelCard,
    OperatingPoint,
    SiteCalibration,
    HeldOutFigures,
    build,
)
from xray.model.net import ModelConfig

SHIPPED = sorted((Path(__file__).resolve().parent.parent / "weights" / "versions").glob("*/card.json"))

SITE_BLOCK = {"parent": "20261129-225647", "data_root": "/site", "data_fingerprint": "a" * 64,
              "counts": {"NORMAL": 60, "PNEUMONIA": 140}, "unreadable": 2, "rule": "sensitivity>=0.95",
              "old": {"threshold": 0.3, "scale": 1.0, "bias": 0.0}, "new": {"threshold": 0.4, "scale": 0.9, "bias": 0.1},
              "before_on_site": {"sensitivity": 0.9}, "after_on_site_crossvalidated": {"sensitivity": 0.95},
              "note": "wide intervals"}
OVERRIDE = {"by": "Dr A", "at": "2026-12-01T10:00:00Z", "reason": "trial", "gate": ["too few images"]}


@pytest.mark.parametrize("path", SHIPPED, ids=[p.parent.name for p in SHIPPED])
def test_every_shipped_card_loads_typed_and_round_trips(path):
    raw = json.loads(path.read_text())
    card = ModelCard.from_dict(raw)
    assert card.version == path.parent.name and 0 <= card.threshold <= 1
    assert card.test is None and card.site_calibration is None and card.activation_overrides == ()
    assert card.validation.labels is not None and card.validation.n == len(card.validation.labels)
    assert card.to_dict() == raw and dict(card) == raw  # every key on disk survives


def test_a_card_written_today_parses_test_site_calibration_and_overrides_into_dataclasses():
    test = {"note": "the folder's test/ part", "n": 624, "roc_auc": 0.95, "sensitivity": 0.97, "specificity": float("nan")}
    card = ModelCard(card_dict(test=test, site_calibration=SITE_BLOCK, activation_overrides=[OVERRIDE, OVERRIDE]))
    assert isinstance(card.test, HeldOutFigures) and card.test.note == "the folder's test/ part" and card.test.n == 624
    assert card.test.roc_auc == 0.95 and card.test.figure("sensitivity") == 0.97 and card.test.specificity is None
    site = card.site_calibration
    assert isinstance(site, SiteCalibration) and site.parent == "20261129-225647" and site.images == 200
    assert site.old == OperatingPoint(0.3, 1.0, 0.0) and site.new.threshold == 0.4 and site.unreadable == 2
    assert site.before == {"sensitivity": 0.9} and site.after == {"sensitivity": 0.95}
    assert card.activation_overrides == (ActivationOverride("Dr A", "2026-12-01T10:00:00Z", "trial", ("too few images",)),) * 2
    assert card.activation_overrides[0].to_dict() == OVERRIDE
    with pytest.raises(AttributeError):
        card.site_calibration.parent = "other"  # frozen: the card never changes


def test_partial_blocks_get_defaults_not_errors():
    card = ModelCard(card_dict(site_calibration={"parent": "p"}, test={}))
    assert card.site_calibration.images == 0 and card.site_calibration.old == OperatingPoint()
    assert card.test.n == 0 and card.test.roc_auc is None
    assert ModelCard(card_dict(site_calibration="not a block", test=[1])).site_calibration is None


@pytest.mark.parametrize("change, message", [
    ({"threshold": 1.5}, "threshold must lie in"),
    ({"threshold": "high"}, "threshold must be a number"),
    ({"architecture": None}, "model card"),
    ({"preprocessing": {"image_size": 4}}, "too small"),
    ({"activation_overrides": {"by": "x"}}, "must be a list"),
    ({"activation_overrides": ["x"]}, "must be a JSON object"),
    ({"extra_files": ["ood.npz"]}, "extra_files"),
    ({"borderline": {"below": -1, "above": 1}}, "borderline below"),
])
def test_ill_formed_cards_are_refused_with_the_reason(change, message):
    with pytest.raises(CardError, match=message):
        ModelCard(card_dict(**change))


def test_old_cards_a_temperature_and_no_predictions_still_load():
    card = ModelCard(card_dict(calibration={"temperature": 2.0}, data={"counts": {"all": {"NORMAL": 1, "PNEUMONIA": 3}}}))
    assert card.calibration == (0.5, 0.0) and card.validation.labels is None
    assert card.calibration_prevalence == 0.75  # from the data counts when no predictions are stored
    assert ModelCard(card_dict(labels=[0, 1, 1, 1], scores=[0.1, 0.9, 0.8, 0.7])).calibration_prevalence == 0.75


def test_derived_and_updated_cards():
    card = ModelCard(card_dict(weights_sha256="0" * 64, activation_overrides=[OVERRIDE]))
    derived = card.derived("added OOD statistics (same weights)", {"ood": {"threshold": 3.0}})
    assert "weights_sha256" not in derived and "activation_overrides" not in derived and "version" not in derived
    assert derived["derived_from"] == {"version": "v1", "change": "added OOD statistics (same weights)"}
    assert derived["ood"] == {"threshold": 3.0} and derived["intended_use_spec"]["age_years"] == [1, 5]
    assert card.updated({"threshold": 0.25}).threshold == 0.25 and card.threshold == 0.5
    with pytest.raises(CardError, match="cannot change"):
        card.updated({"weights_sha256": "1" * 64})


def test_build_makes_a_card_the_registry_accepts():
    raw = build(config=ModelConfig(widths=(8, 16)), parameters=10, macs=20, image_size=64, tta="none", threshold=0.3,
                threshold_rule="youden", calibration={"method": "Platt", "scale": 1.0, "bias": 0.0},
                validation={"split": "s", "n": 2, "predictions": {"p_pneumonia": [0.2, 0.8], "label": [0, 1]}},
                training={}, data={}, environment={}, ood={}, test={"note": "t", "n": 2, "roc_auc": 1.0})
    card = ModelCard({**raw, "version": "v2"})
    assert card.validation.description == "s" and card.test.roc_auc == 1.0 and card.intended_use_spec["views"] == ["AP", "PA"]
