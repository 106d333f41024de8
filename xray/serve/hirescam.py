"""Heatmaps: where the evidence for pneumonia lies, on a fixed scale shared by every image.

``evidence_map`` is HiResCAM (Draelos and Carin, "Use HiResCAM instead of Grad-CAM for faithful
explanations of convolutional neural networks", 2020), which for a network ending in global average
pooling and one linear layer is exactly CAM (Zhou et al., CVPR 2016): cell (i, j) holds
``scale * sum_c w_c A_c(i, j) / (h w)``, its additive share of the calibrated log-odds of pneumonia.
The cells sum, with the biases, to the very logit the prediction came from, so the map is faithful by
construction and comparable between images: the same colour means the same evidence everywhere
(``heat_levels``: no colour below ``EVIDENCE_FLOOR``, full colour at ``EVIDENCE_FULL_SCALE``).

``GradCam`` (pytorch-grad-cam, each map scaled to its own maximum) is kept for the bench and for the
faithfulness comparison in ``docs/heatmaps.md``; the app no longer uses it. ``overlay`` is pure numpy.
"""
from __future__ import annotations

import threading

import numpy as np
import torch
from PIL import Image

from xray.decide.decision import PNEUMONIA
from xray.io.loader import XrayImage
from xray.serve.inference import model_inputs
from xray.model.net import to_input
from xray.model.registry import LoadedModel

# Hooks live on the shared module: two threads (two browser sessions) must not interleave.
_CAM_LOCK = threading.Lock()


# The fixed colour scale, in calibrated log-odds of pneumonia per cell of the 8x8 grid. Measured on the
# shipped model's 785 validation images (docs/heatmaps.md): positive cells of pneumonia images have
# median 0.10 and 99th percentile 0.38; 46% of their cells reach the floor, 1.0% of normal images' cells.
EVIDENCE_FLOOR = 0.05  # below this a cell gets no colour: too little evidence to point at
EVIDENCE_FULL_SCALE = 0.4  # at or above this, full colour


def evidence_map(model: LoadedModel, image: XrayImage | np.ndarray) -> np.ndarray:
    """(h, w) float64 map of each cell's additive contribution to the calibrated log-odds of pneumonia
    (HiResCAM = CAM for this head; see the module docstring). Positive = evidence for pneumonia.

    Exact for the unaugmented forward pass: ``sum(map) + scale * classifier bias + calibration bias``
    is the calibrated logit (test-time augmentation, when a card uses it, averages shifted passes)."""
    pixels = image.pixels if isinstance(image, XrayImage) else image
    net = model.net
    x = to_input(model_inputs([pixels], model.image_size), model.device, net.config)  # (1, 1, S, S)
    with torch.inference_mode():
        feature_map = net.feature_map(x)[0].double()  # (C, h, w)
        weight = net.classifier.weight[0].double()  # (C,)
        cells = torch.einsum("c,chw->hw", weight, feature_map) / (feature_map.shape[1] * feature_map.shape[2])
    scale, _ = model.calibration
    return (cells * scale).cpu().numpy()


def heat_levels(evidence: np.ndarray, floor: float = EVIDENCE_FLOOR,
                full_scale: float = EVIDENCE_FULL_SCALE) -> np.ndarray:
    """Evidence (log-odds per cell) -> colour level in [0, 1] on the fixed scale: 0 (no colour) below
    ``floor`` and for evidence against pneumonia, then linear up to 1 at ``full_scale``."""
    levels = (np.asarray(evidence, dtype=np.float64) - floor) / (full_scale - floor)
    return np.where(np.asarray(evidence) >= floor, np.clip(levels, 0.0, 1.0) * 0.85 + 0.15, 0.0)


def colour_levels(model: LoadedModel, image: XrayImage | np.ndarray, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Colour levels (``heat_levels``) of ``evidence_map`` at ``shape`` (H, W), default the image's size."""
    pixels = image.pixels if isinstance(image, XrayImage) else image
    return resize_map(heat_levels(evidence_map(model, image)), shape or pixels.shape)


class PneumoniaTarget:
    """The scalar Grad-CAM explains: the pneumonia logit, or its negative to explain NORMAL."""

    def __init__(self, towards: str = PNEUMONIA):
        self.sign = 1.0 if towards == PNEUMONIA else -1.0

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        return self.sign * model_output  # per-image output is a 0-d logit


class GradCam:
    """``with GradCam(model) as cam: heat = cam(image)``: heat is (H, W) in [0, 1] at the image's size."""

    def __init__(self, model: LoadedModel):
        self.model = model
        self._cam = None

    def __enter__(self) -> "GradCam":
        from pytorch_grad_cam import GradCAM

        _CAM_LOCK.acquire()
        try:
            net = self.model.net  # an ensemble: every member's last stage (pytorch-grad-cam averages the layers' maps)
            layers = [m.target_layer for m in net.members] if hasattr(net, "members") else [net.target_layer]
            self._cam = GradCAM(model=net, target_layers=layers)
        except BaseException:
            _CAM_LOCK.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._cam.activations_and_grads.release()
        finally:
            self._cam = None
            _CAM_LOCK.release()

    def __call__(self, image: XrayImage | np.ndarray, towards: str = PNEUMONIA,
                 shape: tuple[int, int] | None = None) -> np.ndarray:
        """Heatmap at ``shape`` (H, W): the image's own size by default, or a display copy's size."""
        pixels = image.pixels if isinstance(image, XrayImage) else image
        x = model_inputs([pixels], self.model.image_size).to(self.model.device).float()  # (1, 1, S, S)
        with torch.enable_grad():
            cam = self._cam(input_tensor=x, targets=[PneumoniaTarget(towards)])[0]  # (S, S) in [0, 1]
        return resize_map(cam, shape or pixels.shape)


def resize_map(cam: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(s, s) map -> (H, W): the model input was a squash of the image, so scaling back aligns exactly."""
    h, w = shape
    resized = Image.fromarray(cam.astype(np.float32), mode="F").resize((w, h), Image.BILINEAR)
    return np.clip(np.asarray(resized), 0.0, 1.0)


def gradcam(model: LoadedModel, image: XrayImage | np.ndarray, towards: str = PNEUMONIA,
            shape: tuple[int, int] | None = None) -> np.ndarray:
    """One heatmap (at ``shape``, default the image's size), hooks released afterwards."""
    with GradCam(model) as cam:
        return cam(image, towards, shape)


def _jet(values: np.ndarray) -> np.ndarray:
    """(...) in [0, 1] -> (..., 3) uint8, the classic jet colour map (Grad-CAM comparisons only)."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    rgb = np.clip(1.5 - np.abs(4.0 * v - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)
    return np.round(rgb * 255).astype(np.uint8)


def evidence_colours(levels: np.ndarray) -> np.ndarray:
    """Colour levels in (0, 1] -> (..., 3) uint8 from yellow (weak) to red (strong); 0 is not coloured."""
    v = np.clip(levels, 0.0, 1.0)[..., None]
    rgb = np.concatenate([np.ones_like(v), 0.9 * (1 - v), np.zeros_like(v)], axis=-1)
    return np.round(rgb * 255).astype(np.uint8)


def legend(width: int = 256, height: int = 14) -> np.ndarray:
    """(height, width, 3) uint8 colour bar of the fixed scale, from no colour (left) to full (right)."""
    evidence = np.linspace(0.0, EVIDENCE_FULL_SCALE * 1.1, width)
    return overlay(np.full((height, width), 0.5, np.float32), np.tile(heat_levels(evidence), (height, 1)), 0.8)


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """Blend a heatmap over a grayscale image; pure numpy, knows nothing of models.

    Args:
        image: (H, W) float in [0, 1] or uint8.
        cam: (H, W) colour levels in [0, 1] (``heat_levels``), same size as ``image`` (see ``resize_map``);
            0 leaves the image uncoloured.
        alpha: heatmap opacity, 0 = image only, 1 = heatmap only.
    Returns:
        (H, W, 3) uint8 RGB.
    """
    if image.shape[:2] != cam.shape[:2]:
        raise ValueError(f"heatmap {cam.shape[:2]} and image {image.shape[:2]} differ in size")
    gray = np.clip(image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32), 0, 1)

    def blend(gray: np.ndarray, cam: np.ndarray) -> np.ndarray:  # (..., ) -> (..., 3) uint8
        heat = evidence_colours(cam).astype(np.float32) / 255.0
        weight = alpha * np.clip(cam.astype(np.float32) / 0.15, 0.0, 1.0)[..., None]
        return np.round(255 * ((1 - weight) * gray[..., None] + weight * heat)).astype(np.uint8)

    # no colour where there is no evidence: a normal film shows as the film, not as a blue wash. Where most of
    # the film has none, only the coloured pixels are blended (the same bytes, up to 7x faster: issue 26)
    coloured = (cam > 0) & (alpha > 0)
    if coloured.mean() > 0.5:
        return blend(gray, cam)
    out = np.repeat(np.round(255 * gray).astype(np.uint8)[..., None], 3, axis=2)
    out[coloured] = blend(gray[coloured], cam[coloured])
    return out
