"""The one rule that turns p(pneumonia) and a threshold into a decision.

The Diagnose page, the worklist, the CSV, the command line and the audit log all call ``decide``:
a decision is never stored apart from the probability and threshold it came from.
"""
from __future__ import annotations

import math

PNEUMONIA, NORMAL, BORDERLINE = "PNEUMONIA", "NORMAL", "BORDERLINE"


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def band_limits(threshold: float, band: tuple[float, float] | None) -> tuple[float, float] | None:
    """The probabilities (low, high) of the borderline band around ``threshold``: ``band`` is (below,
    above) in log-odds (``xray.borderline``); None when there is no band (or the threshold is 0 or 1)."""
    if band is None or not 0.0 < threshold < 1.0:
        return None
    centre = _logit(threshold)
    return 1 / (1 + math.exp(-(centre - band[0]))), 1 / (1 + math.exp(-(centre + band[1])))


def decide(p_pneumonia: float, threshold: float, band: tuple[float, float] | None = None) -> str:
    """PNEUMONIA when ``p_pneumonia >= threshold``, else NORMAL; BORDERLINE inside the band.

    Args:
        p_pneumonia: calibrated probability in [0, 1].
        threshold: operating threshold in [0, 1], used exactly (never rounded for display first).
        band: (below, above) log-odds offsets of the version's borderline band (``ModelCard.borderline``),
            or None for a plain two-way decision.
    Raises:
        ValueError: for a NaN probability or threshold (no decision can be made).
    """
    p, t = float(p_pneumonia), float(threshold)
    if p != p or t != t:
        raise ValueError("p(pneumonia) and the threshold must be numbers, not NaN")
    limits = band_limits(t, band)
    if limits is not None and limits[0] <= p < limits[1]:
        return BORDERLINE
    return PNEUMONIA if p >= t else NORMAL
