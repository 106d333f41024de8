"""Shared fixtures: real images committed under tests/fixtures, and a tiny model trained on them."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures"
DATASET = FIXTURES / "dataset"
FULLRES = FIXTURES / "fullres"
GENERATED = FIXTURES / "generated"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep the decode cache, audit log and site registry of test runs out of the user's home."""
    cache = tmp_path_factory.mktemp("cache")
    old = {k: os.environ.get(k) for k in ("XRAY_CACHE", "XRAY_AUDIT_LOG", "XRAY_DATA")}
    os.environ["XRAY_CACHE"] = str(cache)
    os.environ["XRAY_AUDIT_LOG"] = str(cache / "audit.jsonl")
    os.environ["XRAY_DATA"] = str(cache / "user-data")
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


TINY_SETTINGS = dict(epochs=3, image_size=64, batch_size=8, widths=(8, 16, 32, 64), patience=10,
                     val_fraction=0.3, threads=1, workers=1, ema=0.0, augment="standard", members=1, split="patients")


def train_tiny(registry: Path, data_dir: Path = DATASET, **overrides) -> str:
    """A real training run on the fixture images, in about a second."""
    from xray.train.loop import TrainConfig, main

    cfg = TrainConfig(data_dir=str(data_dir), registry=str(registry), run_dir=str(registry / "runs" / "tiny"),
                      **{**TINY_SETTINGS, **overrides})
    return main(cfg)


@pytest.fixture(scope="session")
def tiny_registry_template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("registry-template")
    from xray.model.registry import Registry

    version = train_tiny(root)
    # A 16-image model is unstable under perturbations, so its fitted borderline band is wide; the
    # tests of two-way decisions use it without a band (tests/test_borderline.py sets bands itself).
    Registry(root).update_card(version, {"borderline": None})
    Registry(root).activate(version)
    return root


@pytest.fixture
def tiny_registry(tiny_registry_template, tmp_path, monkeypatch) -> Path:
    """A private copy of a registry holding one active tiny model; $XRAY_WEIGHTS points at it."""
    root = tmp_path / "weights"
    shutil.copytree(tiny_registry_template, root)
    monkeypatch.setenv("XRAY_WEIGHTS", str(root))
    return root


@pytest.fixture
def tiny_model(tiny_registry):
    from xray.model.registry import Registry

    return Registry(tiny_registry).load()
