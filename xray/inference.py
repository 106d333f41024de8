"""The one inference function, used by the app, the CLI and evaluation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import torch

from .imageio import XrayImage
from .preprocess import resize_to_input, standardise
from .registry import LoadedModel

PNEUMONIA, NORMAL = "PNEUMONIA", "NORMAL"
ImageLike = Union[XrayImage, np.ndarray]


@dataclass(frozen=True)
class Prediction:
    p_pneumonia: float  # calibrated probability of pneumonia
    threshold: float  # operating threshold the label was decided at
    model_version: str

    @property
    def label(self) -> str:
        return PNEUMONIA if self.p_pneumonia >= self.threshold else NORMAL

    def at(self, threshold: float) -> "Prediction":
        """The same score decided at another threshold (no model re-run)."""
        return Prediction(self.p_pneumonia, float(threshold), self.model_version)


def model_inputs(images: Sequence[ImageLike], image_size: int) -> torch.Tensor:
    """Decoded images -> (B, 1, S, S) uint8 tensor, exactly as training sees them."""
    arrays = [resize_to_input(im.pixels if isinstance(im, XrayImage) else im, image_size) for im in images]
    return torch.from_numpy(np.stack(arrays)).unsqueeze(1)


def logits_of(model: LoadedModel, inputs: torch.Tensor) -> torch.Tensor:
    """(B, 1, S, S) uint8 -> (B,) logits, with the card's test-time augmentation if any."""
    x = standardise(inputs.to(model.device))
    if model.device.type == "cpu":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        logits = model.net(x)
        if model.card.get("preprocessing", {}).get("tta") == "shift":
            # mean logit over small shifts: cheap robustness to framing differences
            for dx, dy in ((4, 0), (-4, 0), (0, 4), (0, -4)):
                logits = logits + model.net(torch.roll(x, shifts=(dy, dx), dims=(2, 3)))
            logits = logits / 5
    return logits.float().cpu()


def probabilities(model: LoadedModel, logits: torch.Tensor) -> np.ndarray:
    """Calibrated p(pneumonia) from raw logits (temperature scaling from the card)."""
    return torch.sigmoid(logits / model.temperature).numpy().astype(np.float64)


def predict(model: LoadedModel, images: Sequence[ImageLike], threshold: float | None = None,
            batch_size: int = 32) -> list[Prediction]:
    """Score decoded radiographs.

    Args:
        model: from ``Registry.load``.
        images: ``XrayImage`` objects or (H, W) float arrays in [0, 1], any size.
        threshold: operating threshold; the model card's own when None.
        batch_size: images per forward pass.
    Returns:
        One ``Prediction`` per image, in order.
    """
    threshold = model.threshold if threshold is None else float(threshold)
    out: list[Prediction] = []
    for start in range(0, len(images), batch_size):
        inputs = model_inputs(images[start:start + batch_size], model.image_size)
        for p in probabilities(model, logits_of(model, inputs)):
            out.append(Prediction(float(p), threshold, model.version))
    return out
