"""Heatmaps: HiResCAM on a fixed, shared scale (xray/gradcam.py). Faithful by construction (the cells add
up to the logit), the same colour means the same evidence on every image, no colour below the floor, and
the maps depend on the learned weights (the sanity check of Adebayo et al., NeurIPS 2018)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import DATASET, FULLRES
from xray.serve import hirescam as G
from xray.io.loader import load_image
from xray.serve.inference import predict

IMAGES = sorted(DATASET.rglob("*.jpeg"))


def test_cells_add_up_to_the_calibrated_logit(tiny_model):
    scale, bias = tiny_model.calibration
    for path in IMAGES[:6]:
        image = load_image(path)
        evidence = G.evidence_map(tiny_model, image)
        assert evidence.shape == (4, 4)  # 64 px input, last stage at 1/16
        logit = evidence.sum() + scale * float(tiny_model.net.classifier.bias.detach()[0]) + bias
        assert 1 / (1 + np.exp(-logit)) == pytest.approx(predict(tiny_model, [image])[0].p_pneumonia, abs=1e-5)


def test_the_colour_scale_is_fixed_and_shared_with_no_colour_below_the_floor():
    evidence = np.array([-1.0, 0.0, G.EVIDENCE_FLOOR * 0.99, G.EVIDENCE_FLOOR, G.EVIDENCE_FULL_SCALE, 10.0])
    levels = G.heat_levels(evidence)
    assert list(levels[:3]) == [0.0, 0.0, 0.0]  # evidence against, none, or too little: uncoloured
    assert 0 < levels[3] < levels[4] == levels[5] == 1.0
    # the same evidence gets the same colour whatever else is on the image (no per-image max scaling)
    assert G.heat_levels(np.array([0.2, 0.01]))[0] == G.heat_levels(np.array([0.2, 5.0]))[0]


def test_uncoloured_cells_leave_the_film_as_it_is_and_the_map_aligns_with_the_display():
    image = np.linspace(0, 1, 60 * 40, dtype=np.float32).reshape(60, 40)
    blended = G.overlay(image, np.zeros((60, 40), np.float32), alpha=0.9)
    assert np.array_equal(blended[..., 0], np.round(image * 255).astype(np.uint8))
    hot = G.overlay(image, np.ones((60, 40), np.float32), alpha=0.9)
    assert (hot[..., 0] >= hot[..., 2]).all() and hot[..., 2].mean() < blended[..., 2].mean()  # red, not blue
    assert G.legend().shape == (14, 256, 3)


def test_heatmap_has_the_requested_shape(tiny_model):
    image = load_image(next(FULLRES.iterdir()))
    levels = G.colour_levels(tiny_model, image, shape=(300, 200))
    assert levels.shape == (300, 200) and levels.min() >= 0 and levels.max() <= 1


def test_maps_change_when_the_learned_weights_are_randomised(tiny_model):
    """Model-parameter randomisation test (Adebayo et al., "Sanity checks for saliency maps", 2018)."""
    images = [load_image(p) for p in IMAGES[:8]]
    trained = np.stack([G.evidence_map(tiny_model, im).ravel() for im in images])
    randomised = copy.copy(tiny_model)
    randomised.net = copy.deepcopy(tiny_model.net)
    torch.manual_seed(0)
    with torch.no_grad():
        for module in list(randomised.net.stages[-1].modules()) + [randomised.net.classifier]:
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                module.weight.normal_(0, module.weight.std().item() or 0.1)
    other = np.stack([G.evidence_map(randomised, im).ravel() for im in images])

    def rank_correlation(a, b):
        ra, rb = a.argsort().argsort(), b.argsort().argsort()
        return np.corrcoef(ra, rb)[0, 1]

    correlations = [rank_correlation(a, b) for a, b in zip(trained, other)]
    assert np.mean(correlations) < 0.5, correlations
