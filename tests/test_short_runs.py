"""Short training runs on small folders (issue 26): a 120-image folder at 5 epochs has one step per epoch, 5
steps in all, where torch's one-cycle schedule divided by zero; every short run, one net or an ensemble,
run after run into one registry, must train and register a version."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import train_tiny
from xray.model.registry import Registry
from xray.train.optim import make_optimizer


@pytest.mark.parametrize("epochs", range(1, 13))
@pytest.mark.parametrize("steps_per_epoch", range(1, 7))
def test_schedule_builds_and_runs_for_every_short_run(epochs, steps_per_epoch):
    optimizer, scheduler = make_optimizer(torch.nn.Linear(2, 1), 3e-3, 5e-4, epochs, steps_per_epoch)
    lrs = [scheduler.get_last_lr()[0]]
    for _ in range(epochs * steps_per_epoch - 1):
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    assert all(math.isfinite(v) and 0 <= v <= 3e-3 * (1 + 1e-9) for v in lrs)
    if epochs * steps_per_epoch >= 5:  # a real warm-up: starts low, peaks at the learning rate asked for
        assert lrs[0] < 3e-3 / 10 and max(lrs) == pytest.approx(3e-3, rel=0.1)


@pytest.mark.slow  # two 3-member runs: about 8 s on a quiet 2-core machine, 15 s on a loaded one
def test_small_folder_few_epochs_ensemble_run_after_run_into_one_registry(tmp_path):
    # the fixture folder at the tiny settings trains one step per epoch, like 120 images at the page's
    # batch of 64: 1 epoch (1 step in all), then 5 (the 5 steps that crashed), 3 members each, as reported
    root = tmp_path / "weights"
    versions = [train_tiny(root, epochs=epochs, members=3, tag=f"e{epochs}") for epochs in (1, 5)]
    registry = Registry(root)
    assert len(set(versions)) == 2
    for epochs, version in zip((1, 5), versions):
        card = registry.card(version)
        assert card.training.config["epochs"] == epochs and card.config.members == 3
        assert len(card.training.history) == 3 * epochs  # every member ran every epoch
        assert registry.load(version).net.config.members == 3
