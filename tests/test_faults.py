"""Faults: damaged weights are refused and the previous good version is used; a crash mid-write
(simulated, and real kill -9 during training) never leaves a partial version or a bad marker."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import DATASET
from xray.serve.inference import predict
from xray.io.loader import load_image
from xray.model.registry import ModelFileError, Registry

ROOT = Path(__file__).resolve().parent.parent
XRAY = DATASET / "NORMAL" / "IM-0115-0001.jpeg"


@pytest.fixture
def two_versions(tiny_registry) -> tuple[Registry, str, str]:
    """A registry whose active version ``second`` was activated after ``first``."""
    registry = Registry(tiny_registry)
    first = registry.active_version()
    model = registry.load(first)
    second = registry.save_version(model.net, {**model.card, "threshold": 0.4}, "second",
                                   extras={"ood.npz": (registry.version_dir(first) / "ood.npz").read_bytes()})
    registry.activate(second)
    return registry, first, second


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "bit-flipped":
        i = len(data) // 2
        path.write_bytes(data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:])
    elif how == "empty":
        path.write_bytes(b"")


@pytest.mark.parametrize("how", ["truncated", "bit-flipped", "empty"])
def test_damaged_weights_are_refused_and_the_previous_good_version_is_used(two_versions, how):
    registry, first, second = two_versions
    _damage(registry.version_dir(second) / "model.pt", how)
    with pytest.raises(ModelFileError, match="checksum mismatch"):
        registry.load(second)
    model, problems = registry.load_with_fallback()
    assert model.version == first
    assert len(problems) == 1 and second in problems[0] and "checksum" in problems[0]
    assert predict(model, [load_image(XRAY)])[0].model_version == first  # it still serves predictions


def test_damaged_card_or_missing_weights_fall_back_too(two_versions):
    registry, first, second = two_versions
    (registry.version_dir(second) / "card.json").write_text('{"version": "second", "thresh')
    assert registry.load_with_fallback()[0].version == first
    (registry.version_dir(second) / "card.json").unlink()
    (registry.version_dir(first) / "model.pt").unlink()
    with pytest.raises(ModelFileError):
        registry.load_with_fallback()  # nothing good left: a clear error, never a crash


@pytest.mark.slow
def test_app_and_cli_survive_damaged_active_weights(two_versions, tmp_path):
    registry, first, second = two_versions
    _damage(registry.version_dir(second) / "model.pt", "bit-flipped")
    env = {**os.environ, "XRAY_WEIGHTS": str(registry.root)}
    result = subprocess.run([sys.executable, "-m", "xray", "predict", str(XRAY)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"using model {first}" in result.stderr and "checksum mismatch" in result.stderr
    assert result.stdout.splitlines()[1].startswith(str(XRAY) + ",")


def _fail_replace_into(monkeypatch, predicate) -> None:
    """os.replace raises (as a crash at that instant would stop it) when ``predicate(dst)`` holds."""
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if predicate(Path(dst)):
            raise OSError("simulated crash mid-write")
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("stage", ["model.pt", "ood.npz", "card.json", "version folder"])
def test_crash_while_saving_a_version_leaves_no_partial_version(two_versions, monkeypatch, stage):
    registry, first, second = two_versions
    marker = registry.marker.read_bytes()
    model = registry.load(first)
    if stage == "version folder":
        _fail_replace_into(monkeypatch, lambda dst: dst.parent == registry.versions_dir)
    else:
        _fail_replace_into(monkeypatch, lambda dst: dst.name == stage)
    with pytest.raises(OSError, match="simulated"):
        registry.save_version(model.net, model.card, "third", extras={"ood.npz": b"stats"})
    monkeypatch.undo()
    assert set(registry.versions()) == {first, second}
    assert not (registry.versions_dir / "third").exists()
    assert registry.marker.read_bytes() == marker and registry.active_version() == second
    for version in registry.versions():
        registry.load(version)
    assert registry.clean_partials() == [".third.partial"]
    assert registry.save_version(model.net, model.card, "third") == "third"  # the id is usable again


def test_crash_while_activating_keeps_the_marker_on_a_complete_version(two_versions, monkeypatch):
    registry, first, second = two_versions
    marker = registry.marker.read_bytes()
    _fail_replace_into(monkeypatch, lambda dst: dst == registry.marker)
    with pytest.raises(OSError, match="simulated"):
        registry.activate(first)
    with pytest.raises(OSError, match="simulated"):
        registry.rollback()
    monkeypatch.undo()
    assert registry.marker.read_bytes() == marker
    assert registry.active_version() == second and registry.load().version == second
    assert not [p for p in registry.root.iterdir() if p.name.endswith(".tmp")]  # no temp file left behind


def test_crash_while_updating_a_card_keeps_the_old_card(two_versions, monkeypatch):
    registry, first, second = two_versions
    card = registry.card(second)
    _fail_replace_into(monkeypatch, lambda dst: dst.name == "card.json")
    with pytest.raises(OSError, match="simulated"):
        registry.update_card(second, {"threshold": 0.9})
    monkeypatch.undo()
    assert registry.card(second) == card and registry.load(second).threshold == 0.4


def test_marker_pointing_at_a_missing_version_falls_back(two_versions):
    registry, first, second = two_versions
    import shutil

    shutil.rmtree(registry.version_dir(second))
    assert registry.active_version() is None  # never reported as active when it is not there
    model, problems = registry.load_with_fallback()
    assert model.version == first and problems


# -- real crashes: kill -9 during training ----------------------------------------------------------
def _events(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


@pytest.mark.slow
def test_kill_9_at_random_points_of_training_never_damages_the_registry(tiny_registry, tmp_path):
    registry = Registry(tiny_registry)
    active = registry.active_version()
    marker = registry.marker.read_bytes()
    before = set(registry.versions())
    rng = random.Random(5)
    # (event to wait for, extra seconds): start-up, mid-training, and around the final save
    kill_points = [("start", rng.uniform(0.0, 0.5)), ("epoch", 0.0), ("last_epoch", 0.0),
                   ("last_epoch", rng.uniform(0.0, 0.2)), ("last_epoch", rng.uniform(0.1, 0.6))]
    outcomes = []
    for n, (wait_for, delay) in enumerate(kill_points):
        events = tmp_path / f"events-{n}.jsonl"
        cmd = [sys.executable, "-m", "xray", "train", str(DATASET), "--registry", str(tiny_registry),
               "--image-size", "64", "--epochs", "3", "--widths", "8,16,32,64", "--batch-size", "8",
               "--threads", "1", "--workers", "1", "--ema", "0", "--run-dir", str(tmp_path / f"run-{n}"),
               "--events", str(events)]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 240
            while proc.poll() is None and time.time() < deadline:
                seen = _events(events)
                if wait_for == "start" and seen:
                    break
                if wait_for == "epoch" and any(e["event"] == "epoch" for e in seen):
                    break
                if wait_for == "last_epoch" and any(e["event"] == "epoch" and e["epoch"] == 3 for e in seen):
                    break
                time.sleep(0.005)
            time.sleep(delay)
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        outcomes.append(proc.returncode)
        # after every crash: the marker is intact, every listed version is whole and loads
        assert registry.marker.read_bytes() == marker and registry.active_version() == active
        for version in registry.versions():
            assert not version.startswith(".")
            registry.load(version)
        for folder in registry.versions_dir.iterdir():  # visible folders are complete versions
            assert folder.name.startswith(".") or (folder / "card.json").is_file()
    assert -signal.SIGKILL in outcomes  # the loop really killed training (not just watched it finish)
    assert before <= set(registry.versions())
    registry.clean_partials()
    assert not [p for p in registry.versions_dir.iterdir() if p.name.startswith(".")]
