"""Binary classification metrics in plain numpy: ROC/PR curves, AUCs, metrics at a threshold,
the operating-threshold rules, and calibration error. Positive class = PNEUMONIA (label 1)."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

THRESHOLD_RULES = ("youden", "sensitivity>=0.95", "min-sensitivity>=0.95", "lcb-sensitivity>=0.95",
                   "balanced-accuracy")
FLOOR_RULES = ("sensitivity>=", "specificity>=", "min-sensitivity>=",
               "lcb-sensitivity>=", "lcb-specificity>=")  # followed by any floor, e.g. 0.97
CONFIDENCE = 0.95  # of the lcb- rules' one-sided lower confidence bound


def is_threshold_rule(rule: str) -> bool:
    """Whether ``choose_threshold`` knows ``rule``."""
    if rule in THRESHOLD_RULES:
        return True
    if not rule.startswith(FLOOR_RULES):
        return False
    try:
        return 0.0 < float(rule.split(">=")[1]) < 1.0
    except ValueError:
        return False


def _binomial_upper_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed in log space (exact for any n this product sees)."""
    if k <= 0:
        return 1.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    log_factorial = np.r_[0.0, np.cumsum(np.log(np.arange(1, n + 1)))]
    i = np.arange(k, n + 1)
    log_pmf = (log_factorial[n] - log_factorial[i] - log_factorial[n - i]
               + i * math.log(p) + (n - i) * math.log1p(-p))
    top = log_pmf.max()
    return float(min(1.0, math.exp(top) * np.exp(log_pmf - top).sum()))


def clopper_pearson_lower(successes: int, n: int, confidence: float = CONFIDENCE) -> float:
    """One-sided lower confidence bound of a proportion successes/n (Clopper and Pearson, Biometrika 1934):
    the p at which P(X >= successes | n, p) = 1 - confidence; 0 when successes == 0, nan when n == 0.

    Exact (never below its nominal coverage). At the threshold set at the k-th highest of n positive
    scores, it is also the bound on the sensitivity of new films: the true sensitivity there is
    Beta(k, n - k + 1) distributed (order statistics), whose 1 - confidence quantile this is.
    """
    if n <= 0:
        return float("nan")
    if successes <= 0:
        return 0.0
    alpha = 1.0 - confidence
    if successes >= n:
        return float(alpha ** (1.0 / n))
    low, high = 0.0, successes / n
    for _ in range(60):  # bisection: the tail grows with p
        mid = (low + high) / 2
        if _binomial_upper_tail(successes, n, mid) < alpha:
            low = mid
        else:
            high = mid
    return float(low)


def minimum_for_bound(target: float, confidence: float = CONFIDENCE) -> int:
    """The fewest cases n whose lower confidence bound can reach ``target`` (all n right: (1-c)^(1/n) >= target)."""
    return int(math.ceil(math.log(1.0 - confidence) / math.log(target) - 1e-12))


class TooFewCases(ValueError):
    """A lower-confidence-bound rule cannot promise its floor on this few cases."""


@functools.lru_cache(maxsize=256)
def _confident_count(n: int, target: float, confidence: float, what: str) -> int:
    """The fewest k of n whose lower bound reaches ``target``; TooFewCases when not even n of n does."""
    if n < minimum_for_bound(target, confidence):
        raise TooFewCases(
            f"a {what} of at least {target:g} with {confidence:.0%} confidence needs at least "
            f"{minimum_for_bound(target, confidence)} {'pneumonia' if what == 'sensitivity' else 'normal'} "
            f"images; there are {n}")
    low, high = 1, n  # the bound grows with k: bisection for the smallest k that reaches the target
    while low < high:
        mid = (low + high) // 2
        if clopper_pearson_lower(mid, n, confidence) >= target:
            high = mid
        else:
            low = mid + 1
    return low


def guarantee_at(y_true, p, threshold: float, rule: str, confidence: float = CONFIDENCE) -> dict | None:
    """What an ``lcb-`` rule promises at ``threshold``: the metric, its floor, the confidence, k of n
    cases on the right side and their one-sided Clopper-Pearson bound; None for rules without a promise."""
    if not rule.startswith(("lcb-sensitivity>=", "lcb-specificity>=")):
        return None
    y, s = _as_arrays(y_true, p)
    what = "sensitivity" if rule.startswith("lcb-sensitivity") else "specificity"
    cases = s[y == 1] if what == "sensitivity" else s[y == 0]
    k = int(np.sum(cases >= threshold)) if what == "sensitivity" else int(np.sum(cases < threshold))
    n = int(cases.size)
    return {"metric": what, "floor": float(rule.split(">=")[1]), "confidence": confidence, "k": k, "n": n,
            "lower_bound": clopper_pearson_lower(k, n, confidence),
            "method": f"one-sided {confidence:.0%} Clopper-Pearson lower bound of {k}/{n}"}


def _as_arrays(y_true, p) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=np.int64).ravel()
    s = np.asarray(p, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError("labels and scores differ in length")
    return y, s


def roc_curve(y_true, p) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), thresholds decreasing; predicting positive means p >= threshold."""
    y, s = _as_arrays(y_true, p)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    distinct = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tps = np.cumsum(y)[distinct]
    fps = (distinct + 1) - tps
    pos, neg = max(int(y.sum()), 1), max(int(len(y) - y.sum()), 1)
    fpr = np.r_[0.0, fps / neg]
    tpr = np.r_[0.0, tps / pos]
    thresholds = np.r_[np.inf, s[distinct]]
    return fpr, tpr, thresholds


def roc_auc(y_true, p) -> float:
    """Area under the ROC curve (ties count half); nan when one class is absent."""
    y, s = _as_arrays(y_true, p)
    if y.size == 0 or y.min() == y.max():
        return float("nan")
    fpr, tpr, _ = roc_curve(y, s)
    return float(np.trapezoid(tpr, fpr))


def pr_curve(y_true, p) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, thresholds) with recall increasing from 0."""
    y, s = _as_arrays(y_true, p)
    _, tpr, thresholds = roc_curve(y, s)
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    distinct = np.r_[np.nonzero(np.diff(s_sorted))[0], len(s_sorted) - 1]
    tps = np.cumsum(y_sorted)[distinct]
    predicted = distinct + 1
    precision = np.r_[1.0, tps / predicted]
    return precision, tpr, thresholds


def pr_auc(y_true, p) -> float:
    """Average precision (step-wise area under the precision-recall curve)."""
    y, s = _as_arrays(y_true, p)
    if y.sum() == 0:
        return float("nan")
    precision, recall, _ = pr_curve(y, s)
    return float(np.sum(np.diff(recall) * precision[1:]))


def confusion(y_true, p, threshold: float) -> dict[str, int]:
    y, s = _as_arrays(y_true, p)
    pred = s >= threshold
    return {"tp": int(np.sum(pred & (y == 1))), "fp": int(np.sum(pred & (y == 0))),
            "tn": int(np.sum(~pred & (y == 0))), "fn": int(np.sum(~pred & (y == 1)))}


def _ratio(a: int, b: int) -> float:
    return a / b if b else float("nan")


def metrics_at(y_true, p, threshold: float) -> dict:
    """Every figure a clinician or an ML engineer asks for, at one operating threshold."""
    y, s = _as_arrays(y_true, p)
    c = confusion(y, s, threshold)
    tp, fp, tn, fn = c["tp"], c["fp"], c["tn"], c["fn"]
    sensitivity, precision = _ratio(tp, tp + fn), _ratio(tp, tp + fp)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    return {
        "n": int(len(y)), "threshold": float(threshold),
        "accuracy": _ratio(tp + tn, len(y)), "sensitivity": sensitivity,
        "specificity": _ratio(tn, tn + fp), "precision": precision, "npv": _ratio(tn, tn + fn),
        "f1": f1, "balanced_accuracy": (sensitivity + _ratio(tn, tn + fp)) / 2,
        "roc_auc": roc_auc(y, s), "pr_auc": pr_auc(y, s),
        "confusion_matrix": {"tp": tp, "fp": fp, "tn": tn, "fn": fn},
    }


def choose_threshold(y_true, p, rule: str = "youden", groups=None) -> float:
    """The operating threshold on validation predictions by a stated rule.

    min-sensitivity>=0.95: the highest threshold whose sensitivity is at least 0.95 in every group
        of ``groups`` (an (N,) array of condition labels: e.g. the validation images as they are and
        under each acquisition perturbation), i.e. maximum specificity while the worst condition
        keeps the floor; placed midway to the next lower score. Without ``groups``: one group.

    youden: maximise sensitivity + specificity - 1 (ties: the highest such threshold), placed
        midway to the next lower validation score.
    sensitivity>=0.95: the highest threshold whose sensitivity is at least 0.95 (maximum
        specificity under that floor), placed midway to the next lower validation score.
    specificity>=0.95: the lowest threshold whose specificity is at least 0.95 (maximum
        sensitivity under that floor), placed midway to the next lower validation score.
    balanced-accuracy: same optimum as youden (kept as an alias people search for).
    lcb-sensitivity>=0.95: the highest threshold at which the one-sided 95% (``CONFIDENCE``)
        Clopper-Pearson lower bound of sensitivity is at least 0.95: it keeps k of the n positives,
        k the fewest whose bound reaches the floor, so new films keep the floor with that confidence
        (a margin for the sampling error of a small set). Raises TooFewCases when n cannot support it
        (``minimum_for_bound``: 59 positives for 0.95). lcb-specificity>=X: the same for normals, the
        lowest such threshold.
    """
    y, s = _as_arrays(y_true, p)
    if rule.startswith(("lcb-sensitivity>=", "lcb-specificity>=")):
        target = float(rule.split(">=")[1])
        if rule.startswith("lcb-sensitivity"):
            positives = np.sort(s[y == 1])[::-1]  # descending: the k-th keeps k of them at or above it
            chosen = positives[_confident_count(positives.size, target, CONFIDENCE, "sensitivity") - 1]
            lower = s[s < chosen]
            return float((chosen + lower.max()) / 2) if lower.size else float(chosen)
        negatives = np.sort(s[y == 0])  # ascending: a threshold above the k-th lowest keeps k of them below
        chosen = negatives[_confident_count(negatives.size, target, CONFIDENCE, "specificity") - 1]
        higher = s[s > chosen]
        return float((chosen + higher.min()) / 2) if higher.size else float(np.nextafter(chosen, np.inf))
    if rule.startswith("min-sensitivity>="):
        target = float(rule.split(">=")[1])
        groups = np.zeros(len(y), int) if groups is None else np.asarray(groups)
        if groups.shape != y.shape:
            raise ValueError("groups must give one label per prediction")
        chosen = np.inf
        for g in np.unique(groups):
            positives = np.sort(s[(groups == g) & (y == 1)])[::-1]  # descending
            if positives.size:  # the k-th highest positive score keeps k of them at or above the threshold
                k = max(1, int(np.ceil(target * positives.size - 1e-9)))
                chosen = min(chosen, positives[k - 1])
        if not np.isfinite(chosen):
            raise ValueError("min-sensitivity needs positive examples")
        return _midway_below(chosen, s)
    fpr, tpr, thresholds = roc_curve(y, s)
    finite = np.isfinite(thresholds)
    if rule.startswith("specificity>="):
        # the lowest threshold whose specificity is at least the target (maximum sensitivity above that floor)
        target = float(rule.split(">=")[1])
        ok = np.nonzero((1 - fpr >= target) & finite)[0]
        chosen = thresholds[ok[-1]] if len(ok) else s.max()
        return _midway_below(chosen, s)
    if rule.startswith("sensitivity>="):
        target = float(rule.split(">=")[1])
        ok = np.nonzero((tpr >= target) & finite)[0]
        chosen = thresholds[ok[0]] if len(ok) else s.min()
        return _midway_below(chosen, s)
    if rule not in ("youden", "balanced-accuracy"):
        raise ValueError(f"unknown threshold rule {rule!r}; one of {THRESHOLD_RULES}")
    j = np.where(finite, tpr - fpr, -np.inf)
    best = int(np.nonzero(j >= j.max() - 1e-12)[0][0])  # ties: the highest threshold (more specific)
    return _midway_below(thresholds[best], s)


def _midway_below(chosen: float, scores: np.ndarray) -> float:
    """Midway between the chosen score and the next lower one (``chosen`` when none is lower).

    Any threshold in (next lower score, chosen score] gives the same decisions on these scores: the
    midpoint keeps the operating point off every validation image, so float noise cannot flip one.
    """
    lower = scores[scores < chosen]
    return float((chosen + lower.max()) / 2) if lower.size else float(chosen)


ECE_BINS = 10  # the bins of every ECE the product reports (issue 15 measures the hidden split with 10);
# cards written before 2026-11-29 23:00 hold 15-bin figures


def expected_calibration_error(y_true, p, bins: int = ECE_BINS) -> float:
    """ECE with ``bins`` equal-width bins of p(pneumonia): the mean |observed frequency - mean
    predicted probability| over the bins, weighted by bin size (Naeini et al., AAAI 2015; Guo et al.,
    ICML 2017 use the same with bins of the top-class confidence)."""
    y, s = _as_arrays(y_true, p)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(s, edges[1:-1]), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = index == b
        if mask.any():
            ece += mask.mean() * abs(y[mask].mean() - s[mask].mean())
    return float(ece)


@dataclass(frozen=True)
class Figure:
    """A figure with the number of images it rests on and its 95% interval (nan when undefined)."""

    value: float
    n: int
    low: float
    high: float

    def __str__(self) -> str:
        if self.value != self.value:
            return "n/a"
        return f"{self.value:.3f} (95% CI {self.low:.3f}-{self.high:.3f}, n={self.n})"


def sensitivity_specificity(y_true, called) -> tuple[Figure, Figure]:
    """(sensitivity, specificity) of the calls ``called`` ((N,) bool, True = PNEUMONIA) against ``y_true``
    ((N,) 0/1), each with its n (pneumonia, resp. normal images) and Wilson 95% interval; nan for an absent class."""
    y = np.asarray(y_true, dtype=np.int64).ravel()
    c = np.asarray(called, dtype=bool).ravel()
    if y.shape != c.shape:
        raise ValueError("labels and calls differ in length")
    positives, negatives = int(y.sum()), int(len(y) - y.sum())
    tp, tn = int(np.sum(c & (y == 1))), int(np.sum(~c & (y == 0)))
    return (Figure(_ratio(tp, positives), positives, *wilson_interval(tp, positives)),
            Figure(_ratio(tn, negatives), negatives, *wilson_interval(tn, negatives)))


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% (by default) Wilson score interval of a proportion successes/n; (nan, nan) when n == 0.

    E. B. Wilson, "Probable inference, the law of succession, and statistical inference", JASA 1927;
    unlike the normal approximation it stays inside [0, 1] and is honest at small n (Brown, Cai and
    DasGupta, Statistical Science 2001).
    """
    if n <= 0:
        return float("nan"), float("nan")
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def auc_interval(auc: float, n_positive: int, n_negative: int, z: float = 1.959964) -> tuple[float, float]:
    """95% interval of a ROC AUC from its Hanley-McNeil standard error (Radiology 143:29-36, 1982).

    Returns (nan, nan) when a class is empty or the AUC is undefined.
    """
    if n_positive <= 0 or n_negative <= 0 or auc != auc:
        return float("nan"), float("nan")
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    variance = (auc * (1 - auc) + (n_positive - 1) * (q1 - auc * auc)
                + (n_negative - 1) * (q2 - auc * auc)) / (n_positive * n_negative)
    half = z * float(np.sqrt(max(variance, 0.0)))
    return max(0.0, auc - half), min(1.0, auc + half)
