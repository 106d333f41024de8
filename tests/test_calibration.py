import numpy as np
import pytest

from xray.decide import metrics as M
from xray.decide.calibration import apply as calibrated, crossfit_ece, fit_platt


def test_platt_recovers_a_known_scale_and_bias():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, 20000)
    labels = (rng.random(20000) < 1 / (1 + np.exp(-(0.5 * logits - 1.0)))).astype(int)
    scale, bias = fit_platt(logits, labels)
    assert scale == pytest.approx(0.5, abs=0.03)
    assert bias == pytest.approx(-1.0, abs=0.06)
    # calibrated probabilities match observed frequencies; the raw sigmoid does not
    assert M.expected_calibration_error(labels, calibrated(logits, scale, bias)) < 0.02
    assert M.expected_calibration_error(labels, calibrated(logits, 1.0, 0.0)) > 0.1
    assert crossfit_ece(logits, labels, seed=0) < 0.03


def test_platt_keeps_the_ranking():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, 500)
    labels = (logits + rng.normal(0, 1, 500) > 0).astype(int)
    p = calibrated(logits, *fit_platt(logits, labels))
    assert M.roc_auc(labels, p) == pytest.approx(M.roc_auc(labels, logits))
