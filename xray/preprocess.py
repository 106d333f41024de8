"""Preprocessing shared by training, inference and evaluation: resize to the model's square input,
then per-image intensity standardisation. No other copy of this exists anywhere."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def resize_to_input(pixels: np.ndarray, image_size: int) -> np.ndarray:
    """(H, W) float in [0, 1] -> (S, S) uint8, squashed like the training set (aspect not kept)."""
    if pixels.shape == (image_size, image_size):
        resized = pixels
    else:
        # Pillow's bilinear filter widens its support when shrinking, so this is antialiased.
        resized = np.asarray(Image.fromarray(pixels.astype(np.float32), mode="F")
                             .resize((image_size, image_size), Image.BILINEAR))
    return np.clip(np.round(resized * 255.0), 0, 255).astype(np.uint8)


NORMALISATIONS = ("standardise", "equalise")
TTA_SHIFTS = ((4, 0), (-4, 0), (0, 4), (0, -4))  # (dx, dy) pixels of the "shift" test-time augmentation


def normalise(batch: torch.Tensor, method: str = "standardise") -> torch.Tensor:
    """(B, 1, S, S) in [0, 255] -> the network's input, by the method named in the model config."""
    if method == "standardise":
        return standardise(batch)
    if method == "equalise":
        return equalise(batch)
    raise ValueError(f"unknown normalisation {method!r}; one of {NORMALISATIONS}")


def equalise(batch: torch.Tensor) -> torch.Tensor:
    """(B, 1, S, S) in [0, 255] -> per-image histogram equalisation, scaled to zero mean, unit std.

    Every monotonic change of the grey scale (exposure, contrast, gamma, detector response curve)
    gives the same output, so the network cannot learn one hospital's look-up table as a shortcut.
    """
    b = batch.shape[0]
    levels = batch.float().clamp(0, 255).round().long().reshape(b, -1)  # (B, S*S)
    hist = torch.zeros(b, 256, device=batch.device).scatter_add_(1, levels, torch.ones_like(levels, dtype=torch.float))
    cdf = (hist.cumsum(1) - hist / 2) / levels.shape[1]  # mid-rank of each grey level, in (0, 1)
    uniform = torch.gather(cdf, 1, levels).reshape(batch.shape)
    return (uniform - 0.5) / 0.2887  # a uniform [0, 1] variable has std 1/sqrt(12)


def standardise(batch: torch.Tensor) -> torch.Tensor:
    """(B, 1, S, S) uint8 or float in [0, 255] -> float, each image to zero mean and unit std.

    Per-image standardisation removes exposure and contrast differences between machines, which
    a model would otherwise learn as a shortcut.
    """
    x = batch.float()
    centred = x - x.mean(dim=(1, 2, 3), keepdim=True)
    # unbiased std in two passes: Tensor.std to float rounding, at a tenth of its cost on CPU (1 thread)
    var = (centred * centred).sum(dim=(1, 2, 3), keepdim=True) / max(x[0].numel() - 1, 1)
    return centred / var.sqrt().clamp_min(1.0)  # 1 grey level: blank images stay finite
