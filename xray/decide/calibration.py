"""Probability calibration, used by training (fit) and inference (apply).

Platt scaling: p = sigmoid(scale * logit + bias), the two parameters fitted by minimising the
negative log-likelihood on held-out labels (J. Platt, "Probabilistic outputs for support vector
machines", 1999; for neural networks see Guo et al., "On calibration of modern neural networks",
ICML 2017, whose temperature scaling is the special case bias = 0).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from xray.decide import metrics as M

PLATT = "Platt scaling fitted on validation"
PLATT_PERTURBED = "Platt scaling fitted on validation and its acquisition perturbations"


def fit_platt(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(scale, bias) minimising the NLL of sigmoid(scale * logit + bias) on (N,) logits and 0/1 labels.

    Temperature scaling alone (bias 0) cannot undo the shift that class-balanced training puts into
    the logits; the bias does, so p(pneumonia) matches the observed frequency. A degenerate set
    (perfectly separated, one class) gives (1, 0): the logits are left as they are.
    """
    z, y = torch.from_numpy(np.asarray(logits)).double(), torch.from_numpy(np.asarray(labels)).double()
    params = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([params], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(params[0] * z + params[1], y)
        loss.backward()
        return loss

    optimizer.step(closure)
    scale, bias = (float(v) for v in params.detach())
    if not (np.isfinite(scale) and np.isfinite(bias)) or scale <= 0:
        return 1.0, 0.0
    return scale, bias


def apply(logits, scale: float, bias: float) -> np.ndarray:
    """(N,) raw logits (array or tensor) -> (N,) float64 calibrated probabilities, without overflow."""
    if isinstance(logits, torch.Tensor):
        logits = logits.detach().cpu().double().numpy()
    z = scale * np.asarray(logits, dtype=np.float64) + bias
    return np.exp(-np.logaddexp(0.0, -z))  # 1 / (1 + exp(-z))


def crossfit_ece(logits: np.ndarray, labels: np.ndarray, seed: int) -> float:
    """ECE (10 bins) of Platt scaling fitted on one half of the set and measured on the other, both ways."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    order = np.random.default_rng(seed).permutation(len(labels))
    halves = (order[: len(order) // 2], order[len(order) // 2:])
    p = np.zeros(len(labels))
    for fit, held in (halves, halves[::-1]):
        p[held] = apply(logits[held], *fit_platt(logits[fit], labels[fit]))
    return M.expected_calibration_error(labels, p)


def parameters(block: dict | None) -> tuple[float, float]:
    """A card's calibration block -> (scale, bias); an old card holding a temperature T means (1/T, 0)."""
    block = block or {}
    if "scale" in block:
        return float(block["scale"]), float(block.get("bias", 0.0))
    return 1.0 / float(block.get("temperature", 1.0)), 0.0
