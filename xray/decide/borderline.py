"""The borderline band: where a decision at the threshold is not stable under acquisition changes.

For each validation image the calibrated log-odds are measured on the image and under every
acquisition perturbation of ``augment.PERTURBATIONS`` (gamma, contrast, blur, noise, crop, zoom,
rotation). ``rise`` is the 90th percentile of the largest upward move of the log-odds, ``fall`` that
of the largest downward move. An image whose log-odds lie within ``rise`` below the threshold's, or
within ``fall`` above it, has its decision flipped by a typical change of exposure or framing: it is
reported as BORDERLINE (``decision.decide``), never as a confident NORMAL or PNEUMONIA.

The band is stored in the card as offsets in log-odds, so it moves with the threshold the clinician
chooses.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from xray.io.augment import PERTURBATIONS

PERCENTILE = 90.0
METHOD = ("90th percentile of the largest log-odds move of each validation image under 8 acquisition "
          "perturbations (gamma, contrast, blur, noise, crop, zoom, rotation), upward and downward")


def fit_band(calibrated_logits: Callable[[torch.Tensor], np.ndarray], inputs: torch.Tensor,
             percentile: float = PERCENTILE) -> dict:
    """The card's ``borderline`` block from validation inputs.

    Args:
        calibrated_logits: (N, 1, S, S) float in [0, 255] -> (N,) calibrated log-odds.
        inputs: (N, 1, S, S) uint8 validation images.
    Returns:
        ``{"below": rise, "above": fall, "percentile", "n", "method"}``, offsets in log-odds (>= 0).
    """
    x = inputs.float()
    return band_from_logits(np.stack([calibrated_logits(x)] + [calibrated_logits(fn(x).clamp(0, 255).round())
                                                               for fn in PERTURBATIONS.values()]), percentile)


def band_from_logits(conditions: np.ndarray, percentile: float = PERCENTILE) -> dict:
    """``fit_band`` from logits already computed: (1 + P, N) calibrated log-odds of N validation images
    as they are (row 0) and under each of the P perturbations of ``augment.PERTURBATIONS`` (rows 1..P)."""
    moves = conditions[1:] - conditions[0]
    rise = float(np.percentile(np.maximum(moves.max(axis=0), 0.0), percentile))
    fall = float(np.percentile(np.maximum(-moves.min(axis=0), 0.0), percentile))
    return {"below": round(rise, 4), "above": round(fall, 4), "percentile": percentile, "n": int(conditions.shape[1]),
            "method": METHOD}
