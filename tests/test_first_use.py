"""First use (issue 26): the overlay's shortcut for films with little colour gives the very bytes of the plain
blend (xray.serve.hirescam.overlay), whatever the share of coloured pixels and the opacity."""
from __future__ import annotations

import numpy as np
import pytest

from xray.serve.hirescam import evidence_colours, overlay


def plain_blend(image: np.ndarray, cam: np.ndarray, alpha: float) -> np.ndarray:
    gray = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
    base = np.repeat(np.clip(gray, 0, 1)[..., None], 3, axis=2)
    heat = evidence_colours(cam).astype(np.float32) / 255.0
    weight = alpha * np.clip(cam.astype(np.float32) / 0.15, 0.0, 1.0)[..., None]
    return np.round(255 * ((1 - weight) * base + weight * heat)).astype(np.uint8)


@pytest.mark.parametrize("coloured", [0.0, 0.02, 0.4, 0.7, 1.0])
@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_overlay_is_the_plain_blend(coloured, alpha):
    rng = np.random.default_rng(int(coloured * 100))
    cam = np.where(rng.random((91, 103)) < coloured, rng.random((91, 103)), 0.0).astype(np.float32)
    for image in (rng.integers(0, 256, (91, 103), dtype=np.uint8),
                  (rng.random((91, 103)) * 1.2 - 0.1).astype(np.float32)):  # float, a little outside [0, 1]
        assert np.array_equal(overlay(image, cam, alpha), plain_blend(image, cam, alpha))
