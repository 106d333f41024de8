"""The one inference function, used by the app, the CLI and evaluation."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import torch

from . import ood as O
from .imageio import XrayImage
from .preprocess import resize_to_input
from .model import to_input
from .preprocess import TTA_SHIFTS
from .registry import LoadedModel

PNEUMONIA, NORMAL = "PNEUMONIA", "NORMAL"
ImageLike = Union[XrayImage, np.ndarray]


@dataclass(frozen=True)
class Prediction:
    p_pneumonia: float  # calibrated probability of pneumonia
    threshold: float  # operating threshold the label was decided at
    model_version: str
    ood: bool = False  # the image does not look like a chest X-ray: show no verdict
    ood_reason: str = ""  # one line saying why, when ``ood``

    @property
    def label(self) -> str:
        return PNEUMONIA if self.p_pneumonia >= self.threshold else NORMAL

    def at(self, threshold: float) -> "Prediction":
        """The same score decided at another threshold (no model re-run)."""
        return Prediction(self.p_pneumonia, float(threshold), self.model_version, self.ood, self.ood_reason)


def model_inputs(images: Sequence[ImageLike], image_size: int) -> torch.Tensor:
    """Decoded images -> (B, 1, S, S) uint8 tensor, exactly as training sees them."""
    arrays = [resize_to_input(im.pixels if isinstance(im, XrayImage) else im, image_size) for im in images]
    return torch.from_numpy(np.stack(arrays)).unsqueeze(1)


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision on a CUDA GPU (bf16 where supported, else fp16); plain float32 on the CPU."""
    if device.type != "cuda":
        # float32 on the CPU: bf16 is faster on CPUs with AVX512-BF16/AMX (xray/bench.py measures it)
        # but moves probabilities near the threshold away from those the card was calibrated on
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def logits_of(model: LoadedModel, inputs: torch.Tensor) -> torch.Tensor:
    """(B, 1, S, S) uint8 -> (B,) logits, with the card's test-time augmentation if any."""
    return logits_and_features(model, inputs)[0]


def logits_and_features(model: LoadedModel, inputs: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """(B, 1, S, S) uint8 -> (B,) logits (with the card's TTA) and (B, C) pooled features, one pass."""
    x = to_input(inputs, model.device, model.net.config)  # (B, 1, S, S) grey levels
    with torch.inference_mode(), autocast_for(model.device):
        features = model.net.features(x)  # (B, C): also what the OOD check measures
        logits = model.net.classify(features)  # identical to model.net(x)
        if model.card.get("preprocessing", {}).get("tta") == "shift":
            # mean logit over small shifts: cheap robustness to framing differences
            for dx, dy in TTA_SHIFTS:
                logits = logits + model.net(torch.roll(x, shifts=(dy, dx), dims=(2, 3)))
            logits = logits / (len(TTA_SHIFTS) + 1)
    return logits.float().cpu(), features.double().cpu().numpy()


def probabilities(model: LoadedModel, logits: torch.Tensor) -> np.ndarray:
    """Calibrated p(pneumonia) from raw logits (the card's Platt scaling)."""
    scale, bias = model.calibration
    return torch.sigmoid(logits.double() * scale + bias).numpy()


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
    stats = getattr(model, "ood_stats", None)
    out: list[Prediction] = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        inputs = model_inputs(batch, model.image_size)
        logits, features = logits_and_features(model, inputs)
        distances = stats.distances(features) if stats is not None else [None] * len(batch)
        for image, pixels, p, distance in zip(batch, inputs[:, 0].numpy(), probabilities(model, logits), distances):
            reason = ood_reason(image, pixels, distance, stats)
            out.append(Prediction(float(p), threshold, model.version, bool(reason), reason))
    return out


def ood_reason(image: ImageLike, inputs: np.ndarray, distance: float | None, stats: "O.OodStats | None") -> str:
    """Why this image does not look like a chest X-ray, or '' (cheap checks first, then features)."""
    array = image.pixels if isinstance(image, XrayImage) else np.asarray(image)
    colour = image.colourfulness if isinstance(image, XrayImage) else 0.0
    reason = O.input_reason(inputs, array.shape[:2], colour)
    if not reason and stats is not None and distance is not None:
        reason = O.feature_reason(float(distance), stats)
    return reason
