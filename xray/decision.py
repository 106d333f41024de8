"""The one rule that turns p(pneumonia) and a threshold into a decision; floor 0.

The Diagnose page, the worklist, the CSV, the command line and the audit log all call ``decide``:
a decision is never stored apart from the probability and threshold it came from.
"""
from __future__ import annotations

PNEUMONIA, NORMAL = "PNEUMONIA", "NORMAL"


def decide(p_pneumonia: float, threshold: float) -> str:
    """PNEUMONIA when ``p_pneumonia >= threshold``, else NORMAL.

    Args:
        p_pneumonia: calibrated probability in [0, 1].
        threshold: operating threshold in [0, 1], used exactly (never rounded for display first).
    Raises:
        ValueError: for a NaN probability or threshold (no decision can be made).
    """
    p, t = float(p_pneumonia), float(threshold)
    if p != p or t != t:
        raise ValueError("p(pneumonia) and the threshold must be numbers, not NaN")
    return PNEUMONIA if p >= t else NORMAL
