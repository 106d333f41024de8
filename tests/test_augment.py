"""Training augmentation (xray.io.augment): the class-matched width that breaks the width shortcut
(docs/experiments.md, "The width shortcut"), and the width check's transform."""
import pytest
import torch

from xray.io.augment import PRESETS, WIDTH_GAP, AugmentConfig, augment, scale_width

# Only the class-matched width acts: no zoom, rotation, shift, grey-level change, blur or noise.
WIDTH_ONLY = AugmentConfig(scale=(1.0, 1.0), aspect=0.0, rotation_deg=0.0, translate=0.0, gamma=(1.0, 1.0),
                           blur_p=0.0, noise_p=0.0, width_swap_p=1.0, width_gap=1.25)


def _bar(n: int = 4, size: int = 64, width: int = 16) -> torch.Tensor:
    """(n, 1, size, size): a bright vertical bar of ``width`` pixels in the middle, like a mediastinum."""
    x = torch.zeros(n, 1, size, size)
    x[..., (size - width) // 2:(size + width) // 2] = 200.0
    return x


def _bar_width(img: torch.Tensor) -> int:
    return int((img[0, img.shape[1] // 2] > 100).sum())


def test_pneumonia_films_are_widened_and_normal_films_narrowed_by_the_gap():
    out = augment(_bar(), WIDTH_ONLY, torch.Generator().manual_seed(0), labels=torch.tensor([0.0, 1.0, 0.0, 1.0]))
    widths = [_bar_width(img) for img in out]
    assert widths[0] == widths[2] and widths[1] == widths[3]
    assert widths[0] == pytest.approx(16 / 1.25, abs=1)  # normal: as narrow as a pneumonia film's anatomy
    assert widths[1] == pytest.approx(16 * 1.25, abs=1)  # pneumonia: as wide as a normal film's


def test_the_swap_happens_with_its_probability_and_never_without_labels():
    cfg = AugmentConfig(**{**WIDTH_ONLY.__dict__, "width_swap_p": 0.5})
    out = augment(_bar(400), cfg, torch.Generator().manual_seed(1), labels=torch.ones(400))
    widened = sum(_bar_width(img) > 17 for img in out)
    assert 160 < widened < 240  # about half of 400
    with pytest.raises(ValueError, match="labels"):
        augment(_bar(), WIDTH_ONLY, torch.Generator().manual_seed(0))


def test_the_width_presets_are_strong_plus_a_width_change_only():
    strong = PRESETS["strong"]
    assert strong.width == (1.0, 1.0) and strong.width_swap_p == 0.0  # the earlier versions' recipe is unchanged
    assert PRESETS["strong-width"].width == (0.72, 1.38) and PRESETS["strong-width"].width_swap_p == 0.0
    assert PRESETS["strong-width-swap"].width_swap_p == 0.5 and PRESETS["strong-width-swap"].width_gap == WIDTH_GAP
    for name in ("strong-width", "strong-width-mild", "strong-width-swap", "strong-width-swap1.1"):
        assert {k: v for k, v in PRESETS[name].__dict__.items() if not k.startswith("width")} == \
            {k: v for k, v in strong.__dict__.items() if not k.startswith("width")}, name


def test_the_class_independent_width_spans_its_range_for_either_class():
    cfg = AugmentConfig(**{**WIDTH_ONLY.__dict__, "width_swap_p": 0.0, "width": (0.75, 1.25)})
    widths = torch.tensor([_bar_width(img) for img in augment(_bar(400), cfg, torch.Generator().manual_seed(2))],
                          dtype=torch.float32)  # no labels needed
    assert widths.min() <= 13 and widths.max() >= 19 and 14.5 < widths.mean() < 17.5


def test_scale_width_narrows_and_widens_the_anatomy_and_keeps_its_height():
    x = _bar(1)
    assert _bar_width(scale_width(x, 0.8)[0]) == pytest.approx(16 * 0.8, abs=1)
    assert _bar_width(scale_width(x, 1.25)[0]) == pytest.approx(16 * 1.25, abs=1)
    assert torch.allclose(scale_width(x, 1.0), x, atol=1e-3)


def test_clip_highlights_burns_the_top_of_each_film_white_and_keeps_its_order():
    from xray.io.augment import clip_highlights
    film = torch.linspace(0, 200, 100).view(1, 1, 10, 10)  # a film whose brightest grey is 200
    out = clip_highlights(torch.cat([film, film]), torch.tensor([0.8, 0.9]))
    assert out.min() == 0 and out.max() == 255
    assert (out[0] >= 254.9).float().mean() == pytest.approx(0.2, abs=0.011)  # the top 20% white
    assert (out[1] >= 254.9).float().mean() == pytest.approx(0.1, abs=0.011)
    assert (out[0].flatten().diff() >= 0).all()  # monotone: no grey level overtakes another


def test_the_strong_clip_preset_clips_some_films_and_leaves_the_rest_to_strong():
    from dataclasses import replace
    cfg = replace(PRESETS["strong-clip"], scale=(1.0, 1.0), aspect=0.0, rotation_deg=0.0, translate=0.0,
                  gamma=(1.0, 1.0), blur_p=0.0, noise_p=0.0)
    film = torch.linspace(0, 200, 64 * 64).view(1, 1, 64, 64).repeat(200, 1, 1, 1)
    out = augment(film, cfg, torch.Generator().manual_seed(3))
    clipped = ((out >= 254.9).flatten(1).float().mean(1) > 0.02).sum()
    assert 35 < clipped < 85  # about 30% of 200
