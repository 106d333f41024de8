"""Adapting a version to a site's unlabelled films (python -m xray adapt): AdaBN, the guard, the card."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from torch import nn

from conftest import DATASET, FIXTURES
from xray.cli import main
from xray.govern.identity import operator
from xray.model.registry import Registry
from xray.train import adapt as A


def _site(tmp_path):
    """The 16 fixture films without their labels' folders, plus two films the guard must withhold."""
    site = tmp_path / "site"
    site.mkdir()
    for i, path in enumerate(sorted(DATASET.rglob("*.jp*g"))):
        shutil.copy(path, site / f"film{i:02d}{path.suffix}")
    shutil.copy(FIXTURES / "bad" / "all_black.png", site / "blank.png")
    shutil.copy(FIXTURES / "bad" / "rgba.png", site / "colour.png")
    (site / "notes.txt").write_text("not a film")
    return site


def test_adabn_sets_each_batchnorm_to_the_statistics_of_the_films(tiny_model):
    x = torch.randint(0, 256, (40, 1, tiny_model.image_size, tiny_model.image_size), dtype=torch.uint8)
    net = A.adabn(tiny_model.net, x)  # one pass: each layer's statistics are exactly its input's
    first = next(m for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    seen = {}
    hook = first.register_forward_pre_hook(lambda m, i: seen.setdefault("input", i[0].clone()))
    with torch.no_grad():
        net(x.float())
    hook.remove()
    activations = seen["input"]
    assert torch.allclose(first.running_mean, activations.mean(dim=(0, 2, 3)), atol=1e-4)
    assert torch.allclose(first.running_var, activations.var(dim=(0, 2, 3), unbiased=False), rtol=1e-4, atol=1e-6)
    learned = {k: v for k, v in tiny_model.net.state_dict().items() if "running" not in k and "num_batches" not in k}
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in learned.items())  # weights unchanged
    assert not net.training and tiny_model.net.state_dict()  # the parent is untouched
    assert not torch.equal(first.running_mean, next(m for m in tiny_model.net.modules()
                                                    if isinstance(m, nn.BatchNorm2d)).running_mean)


def test_adapt_writes_an_inactive_version_from_the_films_the_guard_accepts(tiny_registry, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(A, "MIN_FILMS", 8)
    site = _site(tmp_path)
    registry = Registry(tiny_registry)
    parent = registry.active_version()
    model = registry.load(parent, torch.device("cpu"))
    films = A.read_films(model, str(site))
    assert len(films.paths) + len(films.unreadable) == 18 and films.withheld.sum() >= 1  # the colour film
    assert [n for n, _ in films.skipped] == [str(site / "notes.txt")]
    assert main(["adapt", str(site)]) == 0
    err = capsys.readouterr().err
    assert "not checked: No labels" in err and "BatchNorm layers" in err
    new = [v for v in registry.versions() if v != parent][-1]
    assert registry.active_version() == parent  # inactive: it goes live through the gate like any version
    card, old = registry.card(new), registry.card(parent)
    block = card["adaptation"]
    assert block["parent"] == parent and block["used"] == int((~films.withheld).sum()) and block["films"] == len(films.paths)
    assert block["withheld_before"] == int(films.withheld.sum()) and "not_checked" in block
    assert 0 < block["prevalence_em_after"] < 1 and card.threshold == old.threshold
    assert card.calibration == old.calibration and card.derived_from["version"] == parent
    assert (registry.version_dir(new) / "ood.npz").read_bytes() == (registry.version_dir(parent) / "ood.npz").read_bytes()
    adapted = registry.load(new, torch.device("cpu"))  # checksums, weights and guard load like any version
    used = ~films.withheld  # withheld films not used; the others weighted to the training class mix
    prior = model.card.calibration_prevalence
    weights = A.prior_weights(films.p_before[used], prior, block["prevalence_em_before"], A.training_mix(old))
    expected = A.adabn(model.net, films.inputs[torch.from_numpy(used)], weights, A.SOURCE_WEIGHT)
    for (k, v), w in zip(expected.state_dict().items(), adapted.net.state_dict().values()):
        assert torch.allclose(v.float(), w.float(), atol=1e-5), k
    assert any("running_mean" in k and not torch.equal(v, model.net.state_dict()[k])
               for k, v in adapted.net.state_dict().items())


def test_adapt_refuses_too_few_films_and_says_why(tiny_registry, tmp_path):
    with pytest.raises(SystemExit, match=f"adapting needs at least {A.MIN_FILMS}"):
        main(["adapt", str(_site(tmp_path))])
    with pytest.raises(SystemExit, match="is not a folder"):
        main(["adapt", str(tmp_path / "nowhere")])
    assert len(Registry(tiny_registry).versions()) == 1


def test_film_weights_count_like_copies_and_the_parent_share_mixes_the_statistics(tiny_model):
    x = torch.randint(0, 256, (6, 1, tiny_model.image_size, tiny_model.image_size), dtype=torch.uint8)
    copies = A.adabn(tiny_model.net, x[[0, 0, 1, 2, 3, 4, 5]])
    weighted = A.adabn(tiny_model.net, x, weights=np.array([2, 1, 1, 1, 1, 1.0]))
    for (k, v), w in zip(copies.state_dict().items(), weighted.state_dict().values()):
        assert torch.allclose(v.float(), w.float(), rtol=1e-4, atol=1e-5), k
    first = [m for m in tiny_model.net.modules() if isinstance(m, nn.BatchNorm2d)][0]
    site = [m for m in A.adabn(tiny_model.net, x).modules() if isinstance(m, nn.BatchNorm2d)][0]
    half = [m for m in A.adabn(tiny_model.net, x, source_weight=0.5).modules() if isinstance(m, nn.BatchNorm2d)][0]
    assert torch.allclose(half.running_mean, (first.running_mean + site.running_mean) / 2, atol=1e-5)
    # a site at 30% pneumonia, weighted back to the training class mix (0.74): sure posteriors make it exact
    p = np.r_[np.full(30, 0.9999), np.full(70, 0.0001)]
    w = A.prior_weights(p, 0.74, 0.3)
    assert w[:30].sum() / w.sum() == pytest.approx(0.74, abs=1e-3)
    assert A.prior_weights(p, 0.74, 0.74) == pytest.approx(np.ones(100))
    w = A.prior_weights(p, 0.5, 0.3, target=0.85)  # calibrated at 0.5, statistics gathered at 85% pneumonia
    assert w[:30].sum() / w.sum() == pytest.approx(0.85, abs=1e-3)


def test_an_adapted_version_is_not_promoted_on_its_parents_figures(tiny_registry, tmp_path, monkeypatch):
    from xray.govern import promotion

    monkeypatch.setattr(A, "MIN_FILMS", 8)
    registry = Registry(tiny_registry)
    parent = registry.active_version()
    version, _ = A.adapt(registry, str(_site(tmp_path)), actor=operator())
    card = registry.card(version)
    assert card.validation.labels is None and card.validation.n == 0
    with pytest.raises(promotion.PromotionRefused, match="no evaluation on an acceptance set"):
        promotion.promote(registry, version, actor=operator())
    assert registry.active_version() == parent
