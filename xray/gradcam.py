"""Grad-CAM in three parts: the CAM computation (pytorch-grad-cam on the model's own target layer,
as a context manager so hooks are always released), the target, and a pure numpy ``overlay``."""
from __future__ import annotations

import importlib
import threading

import numpy as np
import torch
from PIL import Image

from .decision import PNEUMONIA
from .imageio import XrayImage
from .inference import model_inputs
from .registry import LoadedModel

# Hooks live on the shared module: two threads (two browser sessions) must not interleave.
_CAM_LOCK = threading.Lock()


def preload_gradcam() -> threading.Thread:
    """Import pytorch-grad-cam in the background (it pulls in torchvision, OpenCV and more: seconds)."""
    thread = threading.Thread(target=importlib.import_module, args=("pytorch_grad_cam",), daemon=True)
    thread.start()
    return thread


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
            self._cam = GradCAM(model=self.model.net, target_layers=[self.model.net.target_layer])
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
    """(...) in [0, 1] -> (..., 3) uint8, the classic jet colour map."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    rgb = np.clip(1.5 - np.abs(4.0 * v - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)
    return np.round(rgb * 255).astype(np.uint8)


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """Blend a heatmap over a grayscale image; pure numpy, knows nothing of models.

    Args:
        image: (H, W) float in [0, 1] or uint8.
        cam: (H, W) in [0, 1], same size as ``image`` (see ``resize_map``).
        alpha: heatmap opacity, 0 = image only, 1 = heatmap only.
    Returns:
        (H, W, 3) uint8 RGB.
    """
    if image.shape[:2] != cam.shape[:2]:
        raise ValueError(f"heatmap {cam.shape[:2]} and image {image.shape[:2]} differ in size")
    gray = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
    base = np.repeat(np.clip(gray, 0, 1)[..., None], 3, axis=2)
    heat = _jet(cam).astype(np.float32) / 255.0
    return np.round(255 * ((1 - alpha) * base + alpha * heat)).astype(np.uint8)
