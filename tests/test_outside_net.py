"""The guard's home-vs-outside networks (issue 23): equalised input, training, the file that carries them
with a version, and the guard outcome they give through ``predict``."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DATASET
from xray.io.loader import load_image
from xray.io.preprocess import model_input
from xray.model import ood as O
from xray.model.outside_net import (OUTSIDE_NET_FILE, OutsideEnsemble, OutsideNetConfig, equalise,
                                    fit_outside_net)
from xray.model.registry import ModelFileError, Registry
from xray.serve import guard
from xray.serve.inference import predict

ROOT = Path(__file__).resolve().parent.parent
HOME = sorted(DATASET.rglob("*.jpeg"))
OUTSIDE = sorted((ROOT / "tests" / "fixtures" / "external").glob("*.png")) + sorted(
    (ROOT / "tests" / "fixtures" / "external-nih").glob("*.png"))
SMALL = OutsideNetConfig(size=32, widths=(4, 8, 8), members=2, epochs=40, batch_size=8, lr=1e-2)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny batches on a shared machine: more threads only wait on each other (60 s instead of 6 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _inputs(paths, size: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([model_input(load_image(p), size).pixels for p in paths]))  # (N, S, S) uint8


def test_equalising_removes_exposure():
    """Any monotone change of the grey levels (gamma, contrast) gives the same equalised image."""
    film = _inputs(HOME[:2], 64)
    darker = (255 * (film.float() / 255) ** 1.8).round()
    flatter = (0.5 * film.float() + 60).round()
    reference = equalise(film, 32)
    assert reference.shape == (2, 1, 32, 32) and 0.0 <= float(reference.min()) and float(reference.max()) <= 1.0
    # rounding merges a few neighbouring grey levels; the equalised images stay within a few per cent
    assert float((equalise(darker, 32) - reference).abs().mean()) < 0.02
    assert float((equalise(flatter, 32) - reference).abs().mean()) < 0.02
    assert abs(float(equalise(film, 64).mean()) - 0.5) < 0.05  # about uniform on [0, 1]


def test_the_networks_learn_home_against_outside_and_round_trip_through_their_file():
    home, outside = _inputs(HOME, 64), _inputs(OUTSIDE, 64)
    ensemble = fit_outside_net(home, outside, SMALL)
    scores = ensemble.score(torch.cat([home, outside]))
    assert scores.shape == (len(HOME) + len(OUTSIDE),) and np.isfinite(scores).all()
    assert scores[len(HOME):].min() > np.median(scores[:len(HOME)])  # the films it was fitted on score as outside
    again = OutsideEnsemble.from_bytes(ensemble.to_bytes())
    np.testing.assert_allclose(again.score(outside), ensemble.score(outside), rtol=1e-6)
    assert again.summary()["members"] == 2 and again.summary()["n_outside"] == len(OUTSIDE)
    with pytest.raises(ValueError, match="damaged"):
        OutsideEnsemble.from_bytes(ensemble.to_bytes()[:-100])
    with pytest.raises(ValueError, match="unknown"):
        OutsideNetConfig.from_dict({"members": 2, "colour": True})
    with pytest.raises(ValueError, match="home films and outside films"):
        fit_outside_net(home, outside[:0], SMALL)


def test_the_combined_limit_sits_at_the_validation_percentile():
    rng = np.random.default_rng(0)
    base = O.OodStats(np.zeros(2), np.eye(2), 3.0, 99.5, 0.0, 10, grid=1)
    distances, net = rng.gamma(4.0, size=1000), rng.normal(size=1000)
    stats = O.fit_net_limit(base, distances, net, n_outside=7, percentile=99.0)
    assert np.mean(stats.combined_scores(distances, net=net) > stats.combined_threshold) == pytest.approx(0.01, abs=0.002)
    again = O.OodStats.from_bytes(stats.to_bytes())
    np.testing.assert_array_equal(again.net_scale, stats.net_scale)
    assert (again.combined_threshold, again.n_outside, again.outside) == (stats.combined_threshold, 7, None)
    with pytest.raises(ValueError, match="networks"):
        stats.combined_scores(distances)  # never silently without the networks' term
    with pytest.raises(ValueError):
        O.OodStats.from_bytes(dataclasses.replace(stats, net_scale=np.array([0.0, -1.0])).to_bytes())


def _with_networks(registry: Registry, limit: float) -> str:
    """A version of the tiny model whose guard uses networks fitted on the fixture films, at ``limit``
    (None: the limit fitted on its validation films)."""
    model = registry.load()
    home, outside = _inputs(HOME, model.image_size), _inputs(OUTSIDE, model.image_size)
    ensemble = fit_outside_net(home, outside, SMALL)
    features = O.features_of(model.inference_net, home, model.device, model.ood_stats.grid)
    stats = O.fit_net_limit(model.ood_stats, model.ood_stats.distances(features), ensemble.score(home), len(OUTSIDE))
    if limit is not None:
        stats = dataclasses.replace(stats, combined_threshold=limit)
    card = model.card.derived("test: guard networks", {"ood": stats.summary()})
    return registry.save_derived_version(model.version, card, "nets", extras={
        O.OOD_FILE: stats.to_bytes(), OUTSIDE_NET_FILE: ensemble.to_bytes()})


def test_an_outside_film_is_withheld_with_the_clinicians_reason_and_home_films_are_not(tiny_registry):
    registry = Registry(tiny_registry)
    version = _with_networks(registry, None)
    model = registry.load(version)
    assert model.outside_net is not None and OUTSIDE_NET_FILE in model.card.extra_files
    outside = predict(model, [load_image(p) for p in OUTSIDE])
    assert all(p.outcome == guard.OUTSIDE_INTENDED_USE for p in outside), [p.withheld_reason for p in outside]
    assert all(p.withheld_reason.startswith("the film looks unlike the pediatric films the model was made for: "
                                            "another kind of equipment or an older patient") for p in outside)
    home = predict(model, [load_image(p) for p in HOME])
    by_networks = [p for p in home if p.withheld_reason.startswith(O.EQUIPMENT_OR_AGE)]
    assert len(by_networks) <= 1, [p.withheld_reason for p in by_networks]  # limit: 99.5th percentile of their sums


def test_a_version_whose_guard_needs_the_networks_refuses_to_load_without_them(tiny_registry):
    registry = Registry(tiny_registry)
    version = _with_networks(registry, 0.0)
    model = registry.load(version)
    stats = model.ood_stats
    broken = registry.save_derived_version(version, model.card.derived("test: file lost", {}), "broken",
                                           without=(OUTSIDE_NET_FILE,))
    with pytest.raises(ModelFileError, match=OUTSIDE_NET_FILE):
        registry.load(broken)
    (registry.version_dir(version) / OUTSIDE_NET_FILE).write_bytes(b"not a network")
    with pytest.raises(ModelFileError, match="damaged"):
        registry.load(version)
    assert stats.net_scale is not None
