"""Preprocessing shared by training, inference and evaluation: a decoded file -> the model's square
input (``ModelInput``), then per-image intensity normalisation. No other copy of this exists anywhere."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

import numpy as np
import torch
from PIL import Image

from xray.io.loader import XrayImage, load_image

ImageLike = Union[XrayImage, np.ndarray]


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


@dataclass(frozen=True)
class ModelInput:
    """One image as the network and the OOD input checks see it: 16 KB at 128 px, so worker processes
    can decode full-resolution files and hand over only this."""

    pixels: np.ndarray  # (S, S) uint8, squashed to the model's input like the training set
    shape: tuple[int, int]  # (H, W) of the decoded image
    colourfulness: float = 0.0  # XrayImage.colourfulness
    guard_fields: dict = field(default_factory=dict)  # XrayImage.guard_fields: what the DICOM header says


def model_input(image: "ImageLike | ModelInput", image_size: int) -> ModelInput:
    """A decoded image (or an already prepared one) -> its ModelInput at ``image_size``."""
    if isinstance(image, ModelInput):
        if image.pixels.shape != (image_size, image_size):
            raise ValueError(f"prepared for {image.pixels.shape[0]} px, the model takes {image_size} px")
        return image
    array = image.pixels if isinstance(image, XrayImage) else np.asarray(image)
    colour = image.colourfulness if isinstance(image, XrayImage) else 0.0
    fields = dict(image.guard_fields) if isinstance(image, XrayImage) else {}
    return ModelInput(resize_to_input(array, image_size), tuple(array.shape[:2]), colour, fields)


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
