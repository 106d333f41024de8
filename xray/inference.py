"""The one inference function, used by the app, the CLI and evaluation."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import torch

from . import ood as O
from .imageio import XrayImage, load_image
from .model import to_input
from .preprocess import TTA_SHIFTS, resize_to_input
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


@dataclass(frozen=True)
class ModelInput:
    """One image as the network and the OOD input checks see it: 16 KB at 128 px, so worker processes
    can decode full-resolution files and hand over only this."""

    pixels: np.ndarray  # (S, S) uint8, squashed to the model's input like the training set
    shape: tuple[int, int]  # (H, W) of the decoded image
    colourfulness: float = 0.0  # XrayImage.colourfulness


def model_input(image: "ImageLike | ModelInput", image_size: int) -> ModelInput:
    """A decoded image (or an already prepared one) -> its ModelInput at ``image_size``."""
    if isinstance(image, ModelInput):
        if image.pixels.shape != (image_size, image_size):
            raise ValueError(f"prepared for {image.pixels.shape[0]} px, the model takes {image_size} px")
        return image
    array = image.pixels if isinstance(image, XrayImage) else np.asarray(image)
    colour = image.colourfulness if isinstance(image, XrayImage) else 0.0
    return ModelInput(resize_to_input(array, image_size), tuple(array.shape[:2]), colour)


def read_model_input(source, image_size: int) -> ModelInput:
    """File -> ModelInput (``load_image`` + ``model_input``); ValueError for an unusable file."""
    return model_input(load_image(source), image_size)


def try_read_model_input(source, image_size: int) -> tuple[ModelInput | None, str]:
    """``read_model_input`` for batch work: (ModelInput, '') or (None, one-line reason); a decoder bug
    costs one file, not a run over a whole folder."""
    try:
        return read_model_input(source, image_size), ""
    except ValueError as exc:
        return None, str(exc)
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"


def model_inputs(images: "Sequence[ImageLike | ModelInput]", image_size: int) -> torch.Tensor:
    """Decoded images -> (B, 1, S, S) uint8 tensor, exactly as training sees them."""
    return torch.from_numpy(np.stack([model_input(im, image_size).pixels for im in images])).unsqueeze(1)


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
    """(B, 1, S, S) uint8 -> (B,) logits (with the card's TTA) and the (B, F) features the OOD check
    measures (the last stage pooled on the grid of the version's OOD statistics), one pass."""
    stats = getattr(model, "ood_stats", None)
    net = model.inference_net  # BatchNorm folded: model.net's outputs to float rounding
    x = to_input(inputs, model.device, net.config)  # (B, 1, S, S) grey levels
    with torch.inference_mode(), autocast_for(model.device):
        feature_map = net.feature_map(x)  # (B, C, h, w)
        logits = net.classify(net.pool(feature_map).flatten(1))  # identical to net(x)
        features = O.grid_features(feature_map, stats.grid if stats is not None else 1)
        if model.card.get("preprocessing", {}).get("tta") == "shift":
            # mean logit over small shifts: cheap robustness to framing differences
            for dx, dy in TTA_SHIFTS:
                logits = logits + net(torch.roll(x, shifts=(dy, dx), dims=(2, 3)))
            logits = logits / (len(TTA_SHIFTS) + 1)
    return logits.float().cpu(), features.double().cpu().numpy()


def probabilities(model: LoadedModel, logits: torch.Tensor) -> np.ndarray:
    """Calibrated p(pneumonia) from raw logits (the card's Platt scaling)."""
    scale, bias = model.calibration
    return torch.sigmoid(logits.double() * scale + bias).numpy()


def predict(model: LoadedModel, images: "Sequence[ImageLike | ModelInput]", threshold: float | None = None,
            batch_size: int = 32) -> list[Prediction]:
    """Score decoded radiographs.

    Args:
        model: from ``Registry.load``.
        images: ``XrayImage`` objects, (H, W) float arrays in [0, 1] of any size, or ``ModelInput``.
        threshold: operating threshold; the model card's own when None.
        batch_size: images per forward pass.
    Returns:
        One ``Prediction`` per image, in order.
    """
    threshold = model.threshold if threshold is None else float(threshold)
    stats = getattr(model, "ood_stats", None)
    out: list[Prediction] = []
    for start in range(0, len(images), batch_size):
        batch = [model_input(im, model.image_size) for im in images[start:start + batch_size]]
        logits, features = logits_and_features(model, model_inputs(batch, model.image_size))
        distances = stats.distances(features) if stats is not None else [None] * len(batch)
        turned = stats.upside_down_scores(features) if stats is not None else [None] * len(batch)
        for prepared, p, distance, upside_down in zip(batch, probabilities(model, logits), distances, turned):
            reason = ood_reason(prepared, distance, stats, upside_down)
            out.append(Prediction(float(p), threshold, model.version, bool(reason), reason))
    return out


def ood_reason(prepared: ModelInput, distance: float | None, stats: "O.OodStats | None",
               upside_down: float | None = None) -> str:
    """Why this image does not look like a chest X-ray, or '' (cheap checks first, then features)."""
    reason = O.input_reason(prepared.pixels, prepared.shape, prepared.colourfulness)
    if not reason and stats is not None and distance is not None:
        reason = O.feature_reason(float(distance), float(upside_down if upside_down is not None else -np.inf), stats)
    return reason
