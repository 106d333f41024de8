"""Hand-made model cards for unit tests of the card and the promotion gate (no weights, no training)."""
from __future__ import annotations

import numpy as np

from xray.model.card import ModelCard
from xray.model.net import ModelConfig


def card_dict(version: str = "v1", threshold: float = 0.5, labels=None, scores=None, fingerprint: str = "f" * 64,
              **extra) -> dict:
    """A minimal valid card; with ``labels`` and ``scores`` it holds validation predictions."""
    card = {"version": version, "threshold": threshold,
            "architecture": {"name": "PneumoniaNet", "config": ModelConfig(widths=(8, 16)).to_dict()},
            "preprocessing": {"image_size": 64}, "data": {"fingerprint": fingerprint},
            "validation": {"split": "a test split"}}
    if labels is not None:
        card["validation"]["predictions"] = {"label": [int(v) for v in labels],
                                             "p_pneumonia": [float(v) for v in scores]}
    return {**card, **extra}


def validated_card(version: str, pneumonia: int, normal: int, sensitivity: float, specificity: float,
                   auc_noise: float = 0.0, seed: int = 0, **extra) -> ModelCard:
    """A card whose validation predictions give exactly ``sensitivity`` and ``specificity`` at 0.5 (rounded to
    whole images); ``auc_noise`` > 0 mixes the scores inside each call to lower the ROC AUC."""
    rng = np.random.default_rng(seed)
    tp, tn = round(sensitivity * pneumonia), round(specificity * normal)
    calls = np.r_[np.ones(tp), np.zeros(pneumonia - tp), np.zeros(tn), np.ones(normal - tn)]
    labels = np.r_[np.ones(pneumonia), np.zeros(normal)]
    # called images above 0.5, others below; within each side pneumonia ranks higher unless noise mixes them
    rank = labels + auc_noise * rng.random(len(labels)) * 10
    scores = np.where(calls == 1, 0.6 + 0.3 * rank / rank.max(), 0.1 + 0.3 * rank / rank.max())
    return ModelCard(card_dict(version, 0.5, labels, scores, **extra))
