"""Prevalence: p(pneumonia) is only meaningful at a stated prevalence. Bayes' rule on the odds moves a
calibrated probability, PPV and NPV to a site's prevalence; the EM method of Saerens et al. (2002)
estimates an unknown prevalence from unlabelled scores.
"""
from __future__ import annotations

import numpy as np


def adjust_to_prevalence(p, from_prevalence: float, to_prevalence: float) -> np.ndarray:
    """p(pneumonia) calibrated where the prevalence was ``from_prevalence`` -> the same evidence at
    ``to_prevalence``, by Bayes' rule on the odds (the likelihood ratio is unchanged):
    odds' = odds * [pi' / (1 - pi')] / [pi / (1 - pi)]. Shapes are kept; p in [0, 1].

    Raises:
        ValueError: a prevalence outside (0, 1).
    """
    for value in (from_prevalence, to_prevalence):
        if not 0.0 < value < 1.0:
            raise ValueError("a prevalence must lie strictly between 0 and 1")
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12)
    ratio = (to_prevalence / (1 - to_prevalence)) / (from_prevalence / (1 - from_prevalence))
    odds = p / (1 - p) * ratio
    return odds / (1 + odds)


def predictive_values(sensitivity: float, specificity: float, prevalence: float) -> tuple[float, float]:
    """(PPV, NPV) at ``prevalence`` from sensitivity and specificity (Bayes' rule)."""
    tp, fn = sensitivity * prevalence, (1 - sensitivity) * prevalence
    tn, fp = specificity * (1 - prevalence), (1 - specificity) * (1 - prevalence)
    ppv = tp / (tp + fp) if tp + fp > 0 else float("nan")
    npv = tn / (tn + fn) if tn + fn > 0 else float("nan")
    return ppv, npv


def estimate_prevalence(p, training_prevalence: float, iterations: int = 200, tol: float = 1e-7) -> float:
    """The prevalence of a set of unlabelled images, by the EM prior adjustment of Saerens, Latinne and
    Decaestecker ("Adjusting the outputs of a classifier to new a priori probabilities", Neural
    Computation 14(1), 2002): alternate adjusting each p to the current prior and taking their mean.

    Raises:
        ValueError: no scores.
    """
    p = np.asarray(p, dtype=np.float64)
    if p.size == 0:
        raise ValueError("no scores to estimate a prevalence from")
    prior = float(np.clip(p.mean(), 1e-4, 1 - 1e-4))
    for _ in range(iterations):
        new = float(np.clip(adjust_to_prevalence(p, training_prevalence, prior).mean(), 1e-4, 1 - 1e-4))
        if abs(new - prior) < tol:
            return new
        prior = new
    return prior


ESTIMATE_MIN_IMAGES = 30  # fewer scored images and the EM estimate swings with a single film


def estimate_if_enough(p, training_prevalence: float, minimum: int = ESTIMATE_MIN_IMAGES) -> float | None:
    """``estimate_prevalence`` of at least ``minimum`` scores, else None (too few to offer an estimate)."""
    p = np.asarray(p, dtype=np.float64)
    return estimate_prevalence(p, training_prevalence) if p.size >= minimum else None
