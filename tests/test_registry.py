"""Model registry: versions, the active marker, checksums, fallback, and atomic writes."""
from __future__ import annotations

import json

import pytest
import torch

import xray.atomic
import xray.model.registry
from xray.model.registry import ModelFileError, Registry


def _second_version(registry: Registry, shift: float = 0.01) -> str:
    """A new version with weights visibly different from the active one (no training needed)."""
    model = registry.load(device=torch.device("cpu"))
    with torch.no_grad():
        model.net.classifier.bias.add_(shift)
    return registry.save_version(model.net, model.card)


def _classifier_bias(registry: Registry, version: str | None = None) -> float:
    return float(registry.load(version, torch.device("cpu")).net.classifier.bias.detach())


def test_active_model_loads_with_its_card(tiny_registry):
    registry = Registry(tiny_registry)
    [version] = registry.versions()
    assert registry.active_version() == version
    model = registry.load()
    assert model.version == version
    assert 0.0 < model.threshold < 1.0
    assert model.image_size == 64
    assert not model.net.training  # ready for inference


def test_default_registry_follows_xray_weights(tiny_registry):
    assert Registry().root == tiny_registry


def test_save_version_is_inactive_and_listed(tiny_registry):
    registry = Registry(tiny_registry)
    active = registry.active_version()
    new = _second_version(registry)
    assert registry.versions() == [active, new]
    assert registry.active_version() == active
    assert registry.card(new)["version"] == new
    with pytest.raises(ValueError, match="already exists"):
        registry.save_version(registry.load(new).net, registry.card(new), version=new)


def test_activate_and_rollback(tiny_registry):
    registry = Registry(tiny_registry)
    first = registry.active_version()
    second = _second_version(registry, 0.5)
    registry.activate(second)
    assert registry.active_version() == second
    assert registry.history() == [first]
    assert _classifier_bias(registry) == pytest.approx(_classifier_bias(registry, first) + 0.5)
    assert registry.rollback() == first
    assert registry.active_version() == first
    with pytest.raises(ValueError, match="no earlier model version"):
        registry.rollback()


def test_invalid_and_unknown_versions_are_refused(tiny_registry):
    registry = Registry(tiny_registry)
    with pytest.raises(ValueError, match="invalid version id"):
        registry.activate("../outside")
    with pytest.raises(ModelFileError):
        registry.activate("20000101-000000")
    assert registry.active_version() is not None


def test_checksum_mismatch_is_refused(tiny_registry):
    registry = Registry(tiny_registry)
    first = registry.active_version()
    second = _second_version(registry)
    weights = tiny_registry / "versions" / second / "model.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: the file still unpickles, but is not what was saved
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="checksum"):
        registry.load(second)
    with pytest.raises(ModelFileError, match="checksum"):
        registry.activate(second)
    assert registry.active_version() == first


def test_missing_weights_file(tiny_registry):
    registry = Registry(tiny_registry)
    version = registry.active_version()
    (tiny_registry / "versions" / version / "model.pt").unlink()
    with pytest.raises(ModelFileError, match="no weights"):
        registry.load()


def test_load_with_fallback_uses_the_previous_good_version(tiny_registry):
    registry = Registry(tiny_registry)
    first = registry.active_version()
    second = _second_version(registry)
    registry.activate(second)
    model, problems = registry.load_with_fallback()
    assert model.version == second and problems == []
    (tiny_registry / "versions" / second / "model.pt").write_bytes(b"not a model")
    model, problems = registry.load_with_fallback()
    assert model.version == first
    assert len(problems) == 1 and second in problems[0]
    (tiny_registry / "versions" / first / "card.json").write_text("{ damaged")
    with pytest.raises(ModelFileError):
        registry.load_with_fallback()


@pytest.mark.parametrize("damage", ["{ damaged", "[]", "\udcff"])
def test_a_damaged_old_card_does_not_hide_the_active_model(tiny_registry, damage):
    registry = Registry(tiny_registry)
    first = registry.active_version()
    second = _second_version(registry)
    registry.activate(second)
    card = tiny_registry / "versions" / first / "card.json"
    card.write_bytes(damage.encode("utf-8", "surrogateescape"))
    (tiny_registry / "versions" / "not a version id").mkdir()  # a stray folder someone copied in
    assert sorted(registry.versions()) == sorted([first, second])
    assert registry.active_version() == second
    assert registry.load().version == second
    assert registry.load_with_fallback()[0].version == second
    with pytest.raises(ModelFileError, match="damaged"):
        registry.load(first)


def test_empty_registry(tmp_path):
    registry = Registry(tmp_path / "nothing")
    assert registry.versions() == [] and registry.active_version() is None
    with pytest.raises(ModelFileError, match="no active model"):
        registry.load()
    with pytest.raises(ModelFileError):
        registry.load_with_fallback()


def test_interrupted_save_leaves_no_partial_version(tiny_registry, monkeypatch):
    registry = Registry(tiny_registry)
    active = registry.active_version()
    model = registry.load(device=torch.device("cpu"))
    real_write = xray.model.registry.atomic_write_json

    def crash_on_card(path, obj):
        if path.name == "card.json":
            raise OSError("disk full")  # as if the process died while writing the card
        real_write(path, obj)

    monkeypatch.setattr(xray.model.registry, "atomic_write_json", crash_on_card)
    with pytest.raises(OSError, match="disk full"):
        registry.save_version(model.net, model.card, version="half-written")
    monkeypatch.undo()
    registry = Registry(tiny_registry)
    assert registry.versions() == [active]
    assert not (tiny_registry / "versions" / "half-written").exists()
    assert registry.active_version() == active
    assert registry.load().version == active
    assert registry.clean_partials() == [".half-written.partial"]
    assert [p.name for p in (tiny_registry / "versions").iterdir()] == [active]
    # the same id can be saved properly afterwards
    assert registry.save_version(model.net, model.card, version="half-written") == "half-written"
    assert registry.load("half-written").version == "half-written"


def test_update_card_merges_and_protects_keys(tiny_registry):
    registry = Registry(tiny_registry)
    version = registry.active_version()
    card = registry.update_card(version, {"threshold": 0.42, "note": "set by the clinical lead"})
    assert card["threshold"] == 0.42
    assert registry.card(version)["note"] == "set by the clinical lead"
    assert registry.load().threshold == 0.42  # the weights' checksum is unaffected by card edits
    before = (tiny_registry / "versions" / version / "card.json").read_text()
    for key in ("version", "weights_sha256", "weights_bytes", "extra_files"):
        with pytest.raises(ValueError, match=key):
            registry.update_card(version, {key: "x", "threshold": 0.1})
    assert (tiny_registry / "versions" / version / "card.json").read_text() == before


def test_update_card_is_atomic(tiny_registry, monkeypatch):
    registry = Registry(tiny_registry)
    version = registry.active_version()
    folder = tiny_registry / "versions" / version
    before = (folder / "card.json").read_text()
    files_before = sorted(p.name for p in folder.iterdir())

    def crash(*args, **kwargs):
        raise OSError("power cut")

    monkeypatch.setattr(xray.atomic.os, "replace", crash)  # dies between writing and renaming
    with pytest.raises(OSError, match="power cut"):
        registry.update_card(version, {"threshold": 0.9})
    monkeypatch.undo()
    assert (folder / "card.json").read_text() == before
    assert json.loads(before)["threshold"] != 0.9
    assert sorted(p.name for p in folder.iterdir()) == files_before  # no stray temporary file


def test_active_marker_is_written_atomically(tiny_registry, monkeypatch):
    registry = Registry(tiny_registry)
    first = registry.active_version()
    second = _second_version(registry)
    marker_before = registry.marker.read_text()
    monkeypatch.setattr(xray.atomic.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("power cut")))
    with pytest.raises(OSError):
        registry.activate(second)
    monkeypatch.undo()
    assert registry.marker.read_text() == marker_before
    assert registry.active_version() == first
