import numpy as np
import pytest

from xray.decide import metrics as M

Y = [0, 0, 1, 1]
P = [0.1, 0.4, 0.35, 0.8]


def test_auc_and_average_precision_hand_computed():
    # pairs (pos, neg): (0.35>0.1) (0.35<0.4) (0.8>0.1) (0.8>0.4) -> 3 of 4
    assert M.roc_auc(Y, P) == pytest.approx(0.75)
    # ranks: 0.8 (pos, precision 1), 0.4 (neg), 0.35 (pos, precision 2/3): AP = (1 + 2/3) / 2
    assert M.pr_auc(Y, P) == pytest.approx(5 / 6)


def test_auc_ties_count_half():
    assert M.roc_auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    assert np.isnan(M.roc_auc([1, 1], [0.2, 0.9]))


def test_metrics_at_threshold_hand_computed():
    m = M.metrics_at(Y, P, 0.5)
    assert m["confusion_matrix"] == {"tp": 1, "fp": 0, "tn": 2, "fn": 1}
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["sensitivity"] == pytest.approx(0.5)
    assert m["specificity"] == pytest.approx(1.0)
    assert m["precision"] == pytest.approx(1.0)
    assert m["npv"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    # threshold is inclusive: p >= t is PNEUMONIA
    assert M.confusion(Y, P, 0.8)["tp"] == 1


def test_youden_threshold_rule():
    # J = 0.5 at t=0.8 and at t=0.35; the higher wins, placed midway to the next lower score 0.4
    assert M.choose_threshold(Y, P, "youden") == pytest.approx(0.6)


def test_sensitivity_rule_reaches_target():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    p = np.clip(y * 0.3 + rng.normal(0.4, 0.2, 500), 0, 1)
    t = M.choose_threshold(y, p, "sensitivity>=0.95")
    m = M.metrics_at(y, p, t)
    assert m["sensitivity"] >= 0.95
    # the highest such threshold: just above the lowest score it still calls positive, the target is lost
    lowest_positive_call = p[p >= t].min()
    assert M.metrics_at(y, p, lowest_positive_call + 1e-9)["sensitivity"] < 0.95
    assert t < lowest_positive_call  # placed below that score, not on it


def test_unknown_rule_rejected():
    with pytest.raises(ValueError):
        M.choose_threshold(Y, P, "magic")


def test_matches_scikit_learn_on_random_data():
    sklearn = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    p = np.round(rng.random(300), 2)  # with ties
    assert M.roc_auc(y, p) == pytest.approx(sklearn.roc_auc_score(y, p))
    assert M.pr_auc(y, p) == pytest.approx(sklearn.average_precision_score(y, p))


def test_expected_calibration_error_hand_computed():
    # bin of 0.9: accuracy 0.5, confidence 0.9 (half the data); bin of 0.1: accuracy 0, confidence 0.1
    assert M.expected_calibration_error([1, 0, 0, 0], [0.9, 0.9, 0.1, 0.1]) == pytest.approx(0.25)
    assert M.expected_calibration_error([1, 0], [1.0, 0.0]) == pytest.approx(0.0)


def test_min_sensitivity_rule_holds_the_floor_in_every_condition():
    # two conditions of the same 4 positives and 2 negatives; the second lowers two positives' scores
    y = np.array([1, 1, 1, 1, 0, 0] * 2)
    p = np.array([0.9, 0.8, 0.7, 0.6, 0.3, 0.2,
                  0.9, 0.8, 0.5, 0.4, 0.3, 0.2])
    groups = np.repeat([0, 1], 6)
    # 0.75 of the positives at or above the threshold in each condition: condition 1 needs t <= 0.5
    t = M.choose_threshold(y, p, "min-sensitivity>=0.75", groups)
    assert t == pytest.approx((0.5 + 0.4) / 2)  # midway to the next lower score
    for g in (0, 1):
        m = M.metrics_at(y[groups == g], p[groups == g], t)
        assert m["sensitivity"] >= 0.75
    # pooled, the plain rule would allow a higher threshold that leaves condition 1 at 0.5
    pooled = M.choose_threshold(y, p, "sensitivity>=0.75")
    assert pooled > t and M.metrics_at(y[6:], p[6:], pooled)["sensitivity"] == 0.5
    # one condition: the same as the plain rule
    assert M.choose_threshold(y[:6], p[:6], "min-sensitivity>=0.75") == pytest.approx(
        M.choose_threshold(y[:6], p[:6], "sensitivity>=0.75"))
    with pytest.raises(ValueError):
        M.choose_threshold(y, p, "min-sensitivity>=0.75", groups[:3])


def test_clopper_pearson_lower_bound_matches_the_beta_quantile():
    beta = pytest.importorskip("scipy.stats").beta  # scikit-learn's dependency
    for k, n in [(150, 155), (57, 60), (1, 10), (3000, 3100)]:
        assert M.clopper_pearson_lower(k, n) == pytest.approx(beta.ppf(0.05, k, n - k + 1), abs=1e-9)
    assert M.clopper_pearson_lower(60, 60) == pytest.approx(0.05 ** (1 / 60))  # all right: (1 - c)^(1/n)
    assert M.clopper_pearson_lower(0, 10) == 0.0
    assert M.minimum_for_bound(0.95) == 59 and M.clopper_pearson_lower(58, 58) < 0.95 <= M.clopper_pearson_lower(59, 59)


def test_lcb_sensitivity_rule_keeps_its_floor_on_new_films_with_its_confidence():
    # positives' scores uniform on [0, 1]: the true sensitivity at threshold t is exactly 1 - t
    rng = np.random.default_rng(0)
    kept, kept_plain = [], []
    for _ in range(400):
        y = np.r_[np.ones(120, int), np.zeros(80, int)]
        s = np.r_[rng.random(120), rng.random(80) - 0.5]
        kept.append(1 - M.choose_threshold(y, s, "lcb-sensitivity>=0.9") >= 0.9)
        kept_plain.append(1 - M.choose_threshold(y, s, "sensitivity>=0.9") >= 0.9)
    assert np.mean(kept) >= 0.93  # nominal 95%; 400 draws
    assert np.mean(kept_plain) < 0.8  # the point estimate misses about half the time
    t = M.choose_threshold(y, s, "lcb-sensitivity>=0.9")
    g = M.guarantee_at(y, s, t, "lcb-sensitivity>=0.9")
    assert g["n"] == 120 and g["lower_bound"] >= 0.9 > M.clopper_pearson_lower(g["k"] - 1, 120)
    assert M.guarantee_at(y, s, t, "sensitivity>=0.9") is None


def test_lcb_rules_refuse_what_the_number_of_cases_cannot_support():
    y, s = np.r_[np.ones(58, int), np.zeros(30, int)], np.r_[np.linspace(0.5, 1, 58), np.linspace(0, 0.4, 30)]
    with pytest.raises(M.TooFewCases, match="at least 59 pneumonia images; there are 58"):
        M.choose_threshold(y, s, "lcb-sensitivity>=0.95")
    with pytest.raises(M.TooFewCases, match="normal images; there are 30"):
        M.choose_threshold(y, s, "lcb-specificity>=0.95")
    t = M.choose_threshold(y, s, "lcb-specificity>=0.9")  # 29 normals suffice for 0.90: all 30 below it
    assert M.metrics_at(y, s, t)["specificity"] == 1.0 and 0.4 < t < 0.5
    assert M.is_threshold_rule("lcb-sensitivity>=0.97") and not M.is_threshold_rule("lcb-sensitivity>=1.5")
