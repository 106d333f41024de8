"""Tiny real training runs on the fixture images: the card, determinism, resume, parts, fine-tuning."""
from __future__ import annotations

import hashlib
import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DATASET, TINY_SETTINGS, train_tiny
from xray.decide import calibration as C
from xray.decide import metrics as M
from xray.io.augment import PERTURBATIONS
from xray.cli import build_parser
from xray.model.registry import Registry
from xray.train.loop import Cancelled, main
from xray.train.config import TrainConfig, config_from_args


def _registry_state(root: Path) -> dict[str, str]:
    """Hash of every file of every version plus the marker: anything written there shows."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and "runs" not in p.relative_to(root).parts)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_trained_version_has_a_complete_card(tiny_registry):
    registry = Registry(tiny_registry)
    model = registry.load()
    card = model.card
    assert card["architecture"]["parameters"] == sum(p.numel() for p in model.net.parameters())
    assert card["architecture"]["config"]["widths"] == [8, 16, 32, 64]
    assert card["preprocessing"]["image_size"] == 64 and card["preprocessing"]["steps"]
    training = card["training"]
    assert TrainConfig.from_dict(training["config"]).image_size == 64  # the config round-trips
    # the recorded command, parsed by the real CLI, gives back exactly the configuration that ran
    words = shlex.split(training["command"])
    assert words[:4] == ["python", "-m", "xray", "train"]
    assert config_from_args(build_parser().parse_args(words[3:])).to_dict() == training["config"]
    assert training["epochs_run"] == len(training["history"]) == 3
    assert 1 <= training["best_epoch"] <= 3 and training["seconds"] > 0
    assert len(card["data"]["fingerprint"]) == 64
    assert card["data"]["counts"] == {"all": {"NORMAL": 8, "PNEUMONIA": 8}}
    validation = card["validation"]
    assert "patient-level split" in validation["split"]
    assert validation["threshold"] == card["threshold"]
    assert card["threshold_rule"] == TrainConfig().threshold_rule
    for key in ("n", "accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc", "pr_auc",
                "confusion_matrix"):
        assert key in validation
    predictions = validation["predictions"]
    assert len(predictions["p_pneumonia"]) == len(predictions["label"]) == validation["n"] == card["data"]["val_images"]
    assert card["data"]["train_images"] + card["data"]["val_images"] == 16
    assert sum(validation["confusion_matrix"].values()) == validation["n"]
    # the stored calibration set (validation + its acquisition perturbations) reproduces the threshold by
    # its rule; the stored validation predictions reproduce the figures at it
    fitted = validation["calibration_set"]
    assert len(fitted["label"]) == len(fitted["p_pneumonia"]) == validation["n"] * (1 + len(PERTURBATIONS))
    assert fitted["p_pneumonia"][:validation["n"]] == predictions["p_pneumonia"]
    conditions = np.repeat(np.arange(1 + len(PERTURBATIONS)), validation["n"])
    assert M.choose_threshold(fitted["label"], fitted["p_pneumonia"], card["threshold_rule"], conditions) == \
        pytest.approx(card["threshold"], abs=1e-5)
    assert card["calibration"]["method"] == C.PLATT_PERTURBED
    y, p = predictions["label"], predictions["p_pneumonia"]
    assert M.metrics_at(y, p, card["threshold"])["confusion_matrix"] == validation["confusion_matrix"]
    assert M.roc_auc(y, p) == pytest.approx(validation["roc_auc"], abs=1e-6)
    for library in ("python", "torch", "numpy", "pillow"):
        assert card["environment"][library]
    assert card["created"].endswith("Z")
    assert "does not diagnose" in card["intended_use"] and card["limits"]
    assert "test" not in card  # the fixture folder has no test/ part


def test_training_writes_events_and_a_checkpoint(tmp_path):
    events = []
    cfg = TrainConfig(data_dir=str(DATASET), registry=str(tmp_path / "weights"), run_dir=str(tmp_path / "run"),
                      **{**TINY_SETTINGS, "epochs": 2})
    version = main(cfg, [events.append])
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done"
    for kind in ("scan", "unreadable", "data", "step", "epoch"):
        assert kind in kinds
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [1, 2]
    assert all(json.dumps(e) for e in events)  # JSON-lines ready
    assert events[-1]["version"] == version
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    assert Registry(tmp_path / "weights").active_version() is None  # new versions are inactive


def test_same_seed_gives_identical_validation_predictions(tiny_registry, tmp_path):
    first = Registry(tiny_registry).load().card  # trained by conftest with TINY_SETTINGS, seed 0
    version = train_tiny(tmp_path / "again")
    second = Registry(tmp_path / "again").card(version)
    assert second["validation"]["predictions"] == first["validation"]["predictions"]
    assert second["threshold"] == first["threshold"]
    assert second["weights_sha256"] == first["weights_sha256"]


def test_resume_continues_from_the_checkpoint(tiny_registry, tmp_path):
    root, run_dir = tmp_path / "resumed", tmp_path / "run"  # beside, not inside, tiny_registry
    cfg = TrainConfig(data_dir=str(DATASET), registry=str(root), run_dir=str(run_dir), **TINY_SETTINGS)
    epochs_seen = []

    def stop_after_first_epoch(event):
        if event["event"] == "epoch":
            epochs_seen.append(event["epoch"])

    with pytest.raises(Cancelled):
        main(cfg, [stop_after_first_epoch], should_stop=lambda: bool(epochs_seen))
    assert epochs_seen == [1]
    assert Registry(root).versions() == []  # a cancelled run writes no version
    checkpoint = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert checkpoint["epoch"] == 1 and len(checkpoint["history"]) == 1

    events = []
    cfg.resume = True
    version = main(cfg, [events.append])
    assert [e["epoch"] for e in events if e["event"] == "resumed"] == [1]
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [2, 3]
    card = Registry(root).card(version)
    assert len(card["training"]["history"]) == card["training"]["epochs_run"] == 3
    assert card["training"]["history"][0] == checkpoint["history"][0]
    # an interrupted and resumed run ends where the uninterrupted run with the same seed ended
    uninterrupted = Registry(tiny_registry).load().card
    assert card["validation"]["predictions"] == uninterrupted["validation"]["predictions"]


def _parts_dataset(root: Path) -> Path:
    """train/val/test layout from the fixture images; val/ is deliberately tiny."""
    normals = sorted((DATASET / "NORMAL").iterdir())
    pneumonias = sorted((DATASET / "PNEUMONIA").iterdir())
    # person1000 and person1003 (two images each) stay within train/
    layout = {"train": (normals[:5], pneumonias[:6]), "val": (normals[5:6], pneumonias[6:7]),
              "test": (normals[6:], pneumonias[7:])}
    for part, (normal, pneumonia) in layout.items():
        for name, files in (("NORMAL", normal), ("PNEUMONIA", pneumonia)):
            folder = root / part / name
            folder.mkdir(parents=True)
            for f in files:
                shutil.copy(f, folder / f.name)
    return root


def test_train_val_test_layout(tmp_path):
    data = _parts_dataset(tmp_path / "chest_xray")
    root = tmp_path / "weights"
    version = train_tiny(root, data, epochs=2)
    card = Registry(root).card(version)
    split = card["validation"]["split"]
    assert "patient-level split" in split and "val/" in split  # the tiny val/ was supplemented, and it says so
    assert card["data"]["counts"] == {"train": {"NORMAL": 5, "PNEUMONIA": 6}, "val": {"NORMAL": 1, "PNEUMONIA": 1},
                                      "test": {"NORMAL": 2, "PNEUMONIA": 1}}
    assert card["data"]["train_images"] + card["data"]["val_images"] == 13  # test/ never trains or validates
    test = card["test"]
    assert test["n"] == 3 and test["threshold"] == card["threshold"]
    assert "nothing was chosen" in test["note"]


def test_unreadable_files_are_skipped_and_reported(tmp_path):
    from conftest import GENERATED

    data = tmp_path / "data"
    shutil.copytree(DATASET, data)
    shutil.copy(GENERATED / "truncated.jpeg", data / "NORMAL" / "truncated.jpeg")
    events = []
    cfg = TrainConfig(data_dir=str(data), registry=str(tmp_path / "weights"), run_dir=str(tmp_path / "run"),
                      **{**TINY_SETTINGS, "epochs": 1})
    version = main(cfg, [events.append])
    [unreadable] = [e for e in events if e["event"] == "unreadable"]
    assert [rel for rel, _ in unreadable["files"]] == ["NORMAL/truncated.jpeg"]
    card = Registry(tmp_path / "weights").card(version)
    assert card["data"]["unreadable"] == 1
    assert card["data"]["train_images"] + card["data"]["val_images"] == 16


@pytest.mark.slow
def test_fine_tune_starts_from_the_active_model_and_leaves_it_alone(tiny_registry):
    registry = Registry(tiny_registry)
    active = registry.active_version()
    before = _registry_state(tiny_registry)
    # A vanishing learning rate: the fine-tuned weights must still be the active model's.
    version = train_tiny(tiny_registry, init_from="active", epochs=1, lr=1e-12, weight_decay=0.0)
    card = registry.card(version)
    assert card["training"]["parent"] == active
    assert registry.active_version() == active
    after = _registry_state(tiny_registry)
    assert {k: v for k, v in after.items() if not k.startswith(f"versions/{version}/")} == before
    parent, child = registry.load(active, torch.device("cpu")).net, registry.load(version, torch.device("cpu")).net
    for name, weight in parent.state_dict().items():
        if name.endswith("weight") and weight.dim() > 1:  # conv and linear weights (BN statistics do move)
            torch.testing.assert_close(child.state_dict()[name], weight, rtol=0, atol=1e-6)


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown training settings"):
        TrainConfig.from_dict({"epochs": 1, "learning_rate": 0.1})
    with pytest.raises(ValueError, match="augment"):
        main(TrainConfig(data_dir=str(DATASET), registry=str(tmp_path), augment="wild"))
    with pytest.raises(ValueError, match="no such folder"):
        main(TrainConfig(data_dir=str(tmp_path / "absent"), registry=str(tmp_path), run_dir=str(tmp_path / "r"),
                         **{**TINY_SETTINGS, "epochs": 1}))


def test_a_deep_ensemble_is_one_version_whose_logit_is_the_members_mean(tmp_path):
    from xray.serve.hirescam import GradCam
    from xray.io.loader import load_image
    from xray.serve.inference import predict
    from xray.model.net import EnsembleNet

    root = tmp_path / "weights"
    version = train_tiny(root, members=2, epochs=2)
    registry = Registry(root)
    model = registry.load(version, torch.device("cpu"))
    net = model.net
    assert isinstance(net, EnsembleNet) and len(net.members) == 2
    card = registry.card(version)
    assert card["architecture"]["config"]["members"] == 2
    assert len(card["training"]["best_epoch"]) == 2  # one best epoch per member
    x = torch.rand(3, 1, 64, 64) * 255
    with torch.no_grad():
        members = torch.stack([m(x) for m in net.members])
        torch.testing.assert_close(net(x), members.mean(dim=0))
        assert not torch.allclose(members[0], members[1])  # differently seeded members
        # the combined head on the pooled concatenated features is exactly the mean logit (CAM stays exact)
        torch.testing.assert_close(net.classifier(net.features(x)).squeeze(1), net(x), rtol=1e-5, atol=1e-5)
    image = load_image(sorted((DATASET / "PNEUMONIA").iterdir())[0])
    prediction = predict(model, [image])[0]
    with GradCam(model) as cam:
        heat = cam(image)
    assert 0.0 <= prediction.p_pneumonia <= 1.0 and heat is not None
    # the OOD features fit the feature budget: 2 members x 64 channels -> a 2x2 grid (512 features)
    assert card["ood"]["features"] == 512


@pytest.mark.slow
def test_fine_tuning_an_ensemble_keeps_its_members(tmp_path):
    root = tmp_path / "weights"
    registry = Registry(root)
    source = train_tiny(root, members=2, epochs=1)
    version = train_tiny(root, init_from=source, epochs=1, lr=1e-12, weight_decay=0.0, members=1)
    assert registry.card(version)["architecture"]["config"]["members"] == 2  # the source's architecture
    parent, child = registry.load(source, torch.device("cpu")).net, registry.load(version, torch.device("cpu")).net
    for name, weight in parent.state_dict().items():
        if name.endswith("weight") and weight.dim() > 1:  # member k starts from the source's member k
            torch.testing.assert_close(child.state_dict()[name], weight, rtol=0, atol=1e-6)
