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


def standardise(batch: torch.Tensor) -> torch.Tensor:
    """(B, 1, S, S) uint8 or float in [0, 255] -> float, each image to zero mean and unit std.

    Per-image standardisation removes exposure and contrast differences between machines, which
    a model would otherwise learn as a shortcut.
    """
    x = batch.float()
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    std = x.std(dim=(1, 2, 3), keepdim=True).clamp_min(1.0)  # 1 grey level: blank images stay finite
    return (x - mean) / std
