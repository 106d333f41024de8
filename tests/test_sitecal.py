"""Calibrating a version to a site (python -m xray calibrate) and the site's prevalence."""
from __future__ import annotations

import csv
import io
import json
import shutil

import numpy as np
import pytest

from conftest import DATASET, FULLRES
from xray.decide import prevalence as P
from xray.govern import promotion, sitecal
from xray.cli import main
from xray.govern.identity import operator
from xray.model.registry import Registry


def test_bayes_adjustment_matches_hand_computed_values():
    # p 0.9 at prevalence 0.74 (odds 9, prior odds 0.74/0.26 = 2.846): at 0.2 (prior odds 0.25) the odds are
    # 9 * 0.25 / 2.846 = 0.7905, so p = 0.4415
    assert float(P.adjust_to_prevalence(0.9, 0.74, 0.2)) == pytest.approx(0.7905 / 1.7905, abs=1e-4)
    assert float(P.adjust_to_prevalence(0.3, 0.5, 0.5)) == pytest.approx(0.3)
    ppv, npv = P.predictive_values(0.9, 0.8, 0.1)  # 0.09 / (0.09 + 0.18); 0.72 / (0.72 + 0.01)
    assert ppv == pytest.approx(1 / 3) and npv == pytest.approx(0.72 / 0.73)
    with pytest.raises(ValueError):
        P.adjust_to_prevalence(0.5, 0.0, 0.3)


def test_em_recovers_a_known_prior_on_synthetic_scores():
    rng = np.random.default_rng(0)
    train_prior, new_prior, n = 0.74, 0.2, 4000
    labels = rng.random(n) < new_prior
    # a calibrated classifier at the training prior: logit = prior log-odds + a class-dependent signal
    signal = np.where(labels, 1.5, -1.5) + rng.normal(0, 1.5, n)
    likelihood_ratio_logit = signal * (2 * 1.5 / 1.5 ** 2)  # log LR of N(+1.5, 1.5) against N(-1.5, 1.5)
    p = 1 / (1 + np.exp(-(np.log(train_prior / (1 - train_prior)) + likelihood_ratio_logit)))
    estimate = P.estimate_prevalence(p, train_prior)
    assert estimate == pytest.approx(labels.mean(), abs=0.03)
    assert abs(p.mean() - new_prior) > 0.15  # the naive mean is far off; EM is not


def _site_folder(tmp_path):
    site = tmp_path / "site"
    shutil.copytree(DATASET, site)
    return site


def test_calibrate_refuses_a_folder_too_small_or_missing_a_class(tiny_registry, tmp_path):
    with pytest.raises(SystemExit, match=f"needs at least {promotion.MIN_ACCEPTANCE_IMAGES} with "
                                         f"{promotion.MIN_PER_CLASS} of each"):
        main(["calibrate", str(_site_folder(tmp_path))])


def test_calibrate_writes_a_new_version_with_identical_weights_and_a_complete_card(tiny_registry, tmp_path,
                                                                                     monkeypatch, capsys):
    monkeypatch.setattr(promotion, "MIN_PER_CLASS", 4)  # the one minimum: the gate's (sitecal requires it too)
    monkeypatch.setattr(promotion, "MIN_ACCEPTANCE_IMAGES", 8)
    site = _site_folder(tmp_path)
    (site / "NORMAL" / "broken.jpeg").write_bytes(b"not a jpeg")
    registry = Registry(tiny_registry)
    parent = registry.active_version()
    assert main(["calibrate", str(site), "--rule", "sensitivity>=0.9"]) == 0
    err = capsys.readouterr().err
    assert "cross-validated" in err and "unreadable, skipped: NORMAL/broken.jpeg" in err
    new = [v for v in registry.versions() if v != parent][-1]
    assert registry.active_version() == parent  # inactive until someone activates it
    old_dir, new_dir = registry.version_dir(parent), registry.version_dir(new)
    assert (new_dir / "model.pt").read_bytes() == (old_dir / "model.pt").read_bytes()
    card, old = registry.card(new), registry.card(parent)
    assert card.weights_sha256 == old.weights_sha256 and card.derived_from["version"] == parent
    site_block = card["site_calibration"]
    assert site_block["parent"] == parent and site_block["counts"] == {"NORMAL": 8, "PNEUMONIA": 8}
    assert site_block["unreadable"] == 1 and len(site_block["data_fingerprint"]) == 64
    assert site_block["old"] == {"threshold": old.threshold, "scale": old.calibration[0], "bias": old.calibration[1]}
    assert site_block["new"]["threshold"] == card.threshold and tuple(site_block["new"].values())[1:] == card.calibration
    after = site_block["after_on_site_crossvalidated"]
    for key in ("sensitivity", "specificity"):
        low, high = after[f"{key}_ci"]
        assert 0 <= low <= after[key] <= high <= 1
    assert card.validation.n == 16 and card.threshold_rule.startswith("sensitivity>=0.9")
    model = registry.load(new)  # loads, checksums and all; activation and rollback work like any version
    assert model.calibration == card.calibration
    registry.activate(new)
    assert registry.rollback() == parent


def test_predict_writes_the_prevalence_and_keeps_the_decision(tiny_registry, capsys):
    image = FULLRES / "NORMAL2-IM-1438-0001.jpeg"
    main(["predict", str(image)])
    plain = next(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    main(["predict", str(image), "--prevalence", "0.2"])
    row = next(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    card = Registry(tiny_registry).card(Registry(tiny_registry).active_version())
    assert row["label"] == plain["label"] and row["p_pneumonia"] == plain["p_pneumonia"]
    assert row["prevalence"] == "0.2000"
    expected = P.adjust_to_prevalence(float(row["p_pneumonia"]), card.calibration_prevalence, 0.2)
    assert float(row["p_pneumonia_at_prevalence"]) == pytest.approx(float(expected), abs=1e-6)
    Registry(tiny_registry).site.set_prevalence(0.3)  # the site's saved setting is the default
    main(["predict", str(image)])
    assert next(csv.DictReader(io.StringIO(capsys.readouterr().out)))["prevalence"] == "0.3000"
    assert json.loads((tiny_registry / "site.json").read_text())["prevalence"] == 0.3


def test_site_calibration_promises_a_floor_only_with_enough_images(tiny_registry, tmp_path, monkeypatch):
    model = Registry(tiny_registry).load()
    assert sitecal.site_rule("min-sensitivity>=0.95") == "lcb-sensitivity>=0.95"
    assert sitecal.site_rule("youden") == "youden"
    rng = np.random.default_rng(1)
    labels = np.r_[np.ones(120, int), np.zeros(80, int)]
    data = sitecal.SiteData("site", "f" * 64, np.r_[rng.normal(2, 1, 120), rng.normal(-2, 1, 80)], labels,
                            {"NORMAL": 80, "PNEUMONIA": 120})
    result = sitecal.recalibrate(model, data, "lcb-sensitivity>=0.95")
    g = result.guarantee
    assert g["metric"] == "sensitivity" and g["n"] == 120 and g["lower_bound"] >= 0.95 and g["k"] >= 118
    assert "at least 0.95 on new films like the local ones, with 95% confidence" in sitecal.terminal_summary(result)
    registry = Registry(tiny_registry)
    card = registry.card(sitecal.write_version(registry, model, result, actor=operator()))
    assert card["site_calibration"]["guarantee"] == g and "95% confidence" in card["site_calibration"]["promise"]
    assert card.site_calibration.guarantee == g and card.site_calibration.promise == card["site_calibration"]["promise"]
    plain = sitecal.recalibrate(model, data, "sensitivity>=0.95")  # the point estimate: no promise made
    assert plain.guarantee is None and plain.threshold > result.threshold
    small = sitecal.SiteData("site", "f" * 64, data.logits[50:], labels[50:], {"NORMAL": 80, "PNEUMONIA": 70})
    with pytest.raises(ValueError, match="needs at least 59 pneumonia images to fit and 74 to cross-validate; the folder has 70"):
        sitecal.recalibrate(model, small, "lcb-sensitivity>=0.95")


def test_calibrate_by_default_refuses_a_promise_the_folder_cannot_keep(tiny_registry, tmp_path, monkeypatch):
    monkeypatch.setattr(promotion, "MIN_PER_CLASS", 4)
    monkeypatch.setattr(promotion, "MIN_ACCEPTANCE_IMAGES", 8)
    Registry(tiny_registry).update_card(Registry(tiny_registry).active_version(),
                                        {"threshold_rule": "min-sensitivity>=0.95"})
    with pytest.raises(SystemExit, match="lcb-sensitivity>=0.95 promises its floor .* the folder has 8"):
        main(["calibrate", str(_site_folder(tmp_path))])
