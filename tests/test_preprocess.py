import numpy as np
import pytest
import torch

from conftest import DATASET
from xray.io.loader import load_image
from xray.model.net import ModelConfig, PneumoniaNet
from xray.io.preprocess import equalise, normalise, resize_to_input, standardise


def _batch() -> torch.Tensor:
    paths = sorted(DATASET.glob("*/*.jpeg"))[:4]
    arrays = [resize_to_input(load_image(p).pixels, 64) for p in paths]
    return torch.from_numpy(np.stack(arrays)).unsqueeze(1).float()  # (4, 1, 64, 64) grey levels


def test_resize_squashes_any_shape_to_the_square_input():
    pixels = np.linspace(0, 1, 300 * 500, dtype=np.float32).reshape(300, 500)
    out = resize_to_input(pixels, 64)
    assert out.shape == (64, 64) and out.dtype == np.uint8
    assert out[:, 0].mean() < out[:, -1].mean()  # left-to-right ramp kept, not transposed


@pytest.mark.parametrize("method", ["standardise", "equalise"])
def test_normalised_images_have_zero_mean_unit_std(method):
    x = normalise(_batch(), method)
    assert torch.allclose(x.mean(dim=(1, 2, 3)), torch.zeros(4), atol=1e-3)
    assert torch.allclose(x.std(dim=(1, 2, 3)), torch.ones(4), atol=0.05)


def test_equalise_ignores_any_monotonic_grey_scale_change_and_standardise_a_linear_one():
    x = _batch()
    gamma = 255 * (x / 255) ** 1.8  # a different detector response curve
    # after rounding to grey levels a few neighbouring levels merge; the ranks barely move
    assert (equalise(gamma) - equalise(x)).abs().mean() < 0.05
    assert (standardise(gamma) - standardise(x)).abs().mean() > 0.1
    linear = 0.5 * x + 40
    assert (standardise(linear) - standardise(x)).abs().max() < 0.02


def test_blank_input_stays_finite():
    assert torch.isfinite(standardise(torch.full((1, 1, 8, 8), 7.0))).all()
    assert torch.isfinite(equalise(torch.full((1, 1, 8, 8), 7.0))).all()


def test_the_network_applies_the_normalisation_its_config_names():
    x = _batch()
    for method in ("standardise", "equalise"):
        net = PneumoniaNet(ModelConfig(widths=(8, 16, 32, 64), normalisation=method)).eval()
        with torch.no_grad():
            inside = net(x)
            # what the network does with grey levels equals the stages run on normalise(x)
            manual = net.classify(net.pool(net.stages(net.stem(normalise(x, method)))).flatten(1))
        torch.testing.assert_close(inside, manual)
    with pytest.raises(ValueError):
        normalise(x, "magic")
