"""The out-of-distribution part of the intended-use guard: statistics, the registry file that carries them, predict, the CLI."""
from __future__ import annotations

import csv
import dataclasses
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import DATASET, FULLRES
from xray.model import ood as O
from xray.serve.pipeline import CSV_HEADER
from xray.io.loader import load_image
from xray.serve.inference import Prediction, logits_and_features, logits_and_guard_features, model_inputs, predict
from xray.model.registry import ModelFileError, Registry
from xray.train.loop import fit_ood_for_version

ROOT = Path(__file__).resolve().parent.parent
XRAYS = sorted(DATASET.rglob("*.jpeg")) + sorted(FULLRES.glob("*.jpeg"))


def _colour_photo(path: Path) -> Path:
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((400, 300), Image.BICUBIC).save(path)
    return path


def _document(path: Path) -> Path:
    page = Image.new("L", (850, 1100), 255)
    draw = ImageDraw.Draw(page)
    for line in range(30):
        draw.text((60, 60 + 30 * line), "Discharge letter: chest clear, no findings. " * 2, fill=0)
    page.save(path)
    return path


# -- statistics -------------------------------------------------------------------------------------
def test_mahalanobis_distance_matches_hand_computation():
    stats = O.OodStats(np.array([1.0, 2.0]), np.array([[4.0, 0.0], [0.0, 1.0]]), 3.0, 99.0, 0.0, 10)
    # (x - mu) = (1, 2): sqrt(1*4*1 + 2*1*2) = sqrt(8)
    np.testing.assert_allclose(stats.distances(np.array([[2.0, 4.0], [1.0, 2.0]])), [np.sqrt(8.0), 0.0])


def test_ledoit_wolf_shrinkage_is_a_valid_weight_and_regularises():
    rng = np.random.default_rng(0)
    few = rng.normal(size=(20, 50))  # fewer samples than features: the plain covariance is singular
    mean, cov, shrinkage = O.ledoit_wolf(few)
    np.testing.assert_allclose(mean, few.mean(0))
    assert 0.0 < shrinkage <= 1.0
    assert np.linalg.eigvalsh(cov).min() > 0  # invertible
    many = rng.normal(size=(5000, 3)) @ np.diag([1.0, 2.0, 3.0])
    _, cov, shrinkage = O.ledoit_wolf(many)
    assert shrinkage < 0.05  # with plenty of data it trusts the sample covariance
    np.testing.assert_allclose(np.diag(cov), [1.0, 4.0, 9.0], rtol=0.1)


def test_threshold_is_the_chosen_percentile_of_validation_distances():
    rng = np.random.default_rng(0)
    train, val = rng.normal(size=(500, 4)), rng.normal(size=(200, 4))
    stats = O.fit_stats(train, val, percentile=90.0)
    flagged = np.mean(stats.distances(val) > stats.threshold)
    assert flagged == pytest.approx(0.10, abs=0.01)
    assert np.mean(stats.distances(rng.normal(size=(200, 4)) + 6.0) > stats.threshold) > 0.95  # shifted: caught


def test_stats_survive_a_round_trip_and_reject_damage():
    rng = np.random.default_rng(0)
    stats = O.fit_stats(rng.normal(size=(50, 32)), rng.normal(size=(20, 32)))
    again = O.OodStats.from_bytes(stats.to_bytes())
    np.testing.assert_array_equal(again.precision, stats.precision)
    assert again.threshold == stats.threshold and again.n_train == 50 and again.grid == O.DEFAULT_GRID == 4
    with pytest.raises(ValueError, match="damaged"):
        O.OodStats.from_bytes(stats.to_bytes()[:-40])
    with pytest.raises(ValueError, match="inconsistent"):  # 3 features cannot come from a 4x4 grid
        O.OodStats.from_bytes(O.fit_stats(rng.normal(size=(50, 3)), rng.normal(size=(20, 3))).to_bytes())


def test_statistics_written_before_the_grid_existed_mean_global_pooling():
    rng = np.random.default_rng(0)
    stats = O.fit_stats(rng.normal(size=(50, 3)), rng.normal(size=(20, 3)), grid=1)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **{k: getattr(stats, k) for k in ("mean", "precision", "threshold", "percentile",
                                                                  "shrinkage", "n_train")})  # no "grid" key
    old = O.OodStats.from_bytes(buffer.getvalue())
    assert old.grid == 1 and old.threshold == stats.threshold and old.upside_down is None


def test_grid_features_see_the_layout_that_global_pooling_loses():
    top_bright = torch.zeros(1, 4, 8, 8)
    top_bright[:, :, :4] = 1.0
    upside_down = torch.flip(top_bright, dims=(2,))
    assert torch.equal(O.grid_features(top_bright, 1), O.grid_features(upside_down, 1))  # same textures
    assert not torch.equal(O.grid_features(top_bright, 2), O.grid_features(upside_down, 2))
    assert O.grid_features(top_bright, 2).shape == (1, 16)
    np.testing.assert_allclose(O.grid_features(top_bright, 2).reshape(4, 4).mean(1), O.grid_features(top_bright, 1)[0])


# -- cheap input checks -----------------------------------------------------------------------------
def test_input_checks_pass_real_xrays_of_any_size():
    for path in XRAYS:
        image = load_image(path)
        inputs = model_inputs([image], 64)[0, 0].numpy()
        assert O.input_reason(inputs, image.pixels.shape, image.colourfulness) == "", path.name


def test_input_checks_name_colour_shape_and_missing_midtones(tmp_path):
    photo = load_image(_colour_photo(tmp_path / "photo.png"))
    assert "colour" in O.input_reason(model_inputs([photo], 64)[0, 0].numpy(), photo.pixels.shape, photo.colourfulness)
    xray = load_image(XRAYS[0])
    inputs = model_inputs([xray], 64)[0, 0].numpy()
    assert "shape" in O.input_reason(inputs, (300, 1000), 0.0)
    document = load_image(_document(tmp_path / "letter.png"))
    reason = O.input_reason(model_inputs([document], 64)[0, 0].numpy(), document.pixels.shape, 0.0)
    assert "mid-grey" in reason


# -- the model version carries its statistics --------------------------------------------------------
def test_training_saves_checksummed_ood_stats_with_the_version(tiny_registry):
    registry = Registry(tiny_registry)
    version = registry.active_version()
    card = registry.card(version)
    assert set(card["extra_files"]) == {O.OOD_FILE}
    assert card["ood"]["threshold"] > 0 and 0.0 <= card["ood"]["val_flagged"] <= 1.0
    model = registry.load()
    assert model.ood_stats is not None and model.ood_stats.threshold == pytest.approx(card["ood"]["threshold"], abs=1e-4)
    # the last stage's channels on a 2x2 grid: layout counts (an upside-down chest is caught)
    assert model.ood_stats.grid == 4 and model.ood_stats.mean.shape == (16 * model.net.classifier.in_features,)


def test_damaged_or_missing_ood_file_refuses_the_version(tiny_registry):
    registry = Registry(tiny_registry)
    version = registry.active_version()
    path = registry.version_dir(version) / O.OOD_FILE
    data = path.read_bytes()
    path.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    with pytest.raises(ModelFileError, match="checksum"):
        registry.load(version)
    path.unlink()
    with pytest.raises(ModelFileError, match="lacks"):
        registry.load(version)


def test_predict_keeps_logits_identical_and_flags_from_the_same_pass(tiny_model):
    images = [load_image(p) for p in XRAYS[:6]]
    inputs = model_inputs(images, tiny_model.image_size)
    logits, features = logits_and_features(tiny_model, inputs)
    with torch.inference_mode():
        direct = tiny_model.net(inputs.float().contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(logits, direct.float())
    predictions = predict(tiny_model, images)
    scale, bias = tiny_model.calibration
    expected = 1 / (1 + np.exp(-(scale * logits.double().numpy() + bias)))
    np.testing.assert_allclose([p.p_pneumonia for p in predictions], expected, rtol=1e-6)
    stats = tiny_model.ood_stats
    for p, d, u in zip(predictions, stats.distances(features), stats.upside_down_scores(features)):
        assert p.withheld == (d > stats.threshold or u > stats.upside_down_threshold)
        assert ("feature distance" in p.withheld_reason or "upside down" in p.withheld_reason) == p.withheld


def test_upside_down_check_fires_on_its_own_threshold(tiny_model):
    images = [load_image(p) for p in XRAYS[:4]]
    assert tiny_model.ood_stats.upside_down is not None  # fitted at the end of training
    strict = dataclasses.replace(tiny_model.ood_stats, threshold=np.inf, upside_down_threshold=-np.inf)
    flagged = predict(dataclasses.replace(tiny_model, ood_stats=strict), images)
    assert all(p.withheld and "turned upside down" in p.withheld_reason and p.outcome == "outside intended use" for p in flagged)


def test_upside_down_direction_separates_turned_features_at_the_chosen_percentile():
    rng = np.random.default_rng(0)
    shift = np.zeros(8)
    shift[[0, 5]] = (5.0, -4.0)  # what turning the images does to the features, in this toy (6.4 sd)
    train, val = rng.normal(size=(2000, 8)), rng.normal(size=(2000, 8))
    stats = O.fit_upside_down(O.fit_stats(train, val, grid=2), train, train + shift, val, percentile=99.0)
    assert np.mean(stats.upside_down_scores(val) > stats.upside_down_threshold) == pytest.approx(0.01, abs=0.002)
    assert np.mean(stats.upside_down_scores(rng.normal(size=(500, 8)) + shift) > stats.upside_down_threshold) > 0.95
    again = O.OodStats.from_bytes(stats.to_bytes())
    np.testing.assert_array_equal(again.upside_down, stats.upside_down)
    assert again.upside_down_threshold == stats.upside_down_threshold
    assert O.fit_stats(train, val).upside_down_scores(val[:3]).tolist() == [-np.inf] * 3  # no direction: no check


def test_feature_check_fires_and_a_model_without_stats_skips_it(tiny_model):
    images = [load_image(p) for p in XRAYS[:4]]
    strict = dataclasses.replace(tiny_model.ood_stats, threshold=0.0)  # every image is "far"
    flagged = predict(dataclasses.replace(tiny_model, ood_stats=strict), images)
    assert all(p.withheld and "unlike the pediatric training films" in p.withheld_reason for p in flagged)
    plain = predict(dataclasses.replace(tiny_model, ood_stats=None), images)
    assert not any(p.withheld for p in plain)
    assert [p.p_pneumonia for p in plain] == [p.p_pneumonia for p in flagged]  # the score never changes


def test_colour_photo_and_document_are_flagged_whatever_their_size(tiny_model, tmp_path):
    photo, document = load_image(_colour_photo(tmp_path / "p.png")), load_image(_document(tmp_path / "d.png"))
    for p in predict(tiny_model, [photo, document]):
        assert p.withheld and p.withheld_reason and 0.0 <= p.p_pneumonia <= 1.0


def test_a_withheld_prediction_has_no_decision_at_any_threshold():
    p = Prediction(0.9, "v", "not a chest radiograph", "a colour image")
    assert p.decision(0.5) is None and p.decision(0.95) is None and p.withheld
    assert Prediction(0.9, "v").decision(0.5) == "PNEUMONIA" and Prediction(0.9, "v").decision(0.95) == "NORMAL"


# -- adding statistics to a version trained without them ----------------------------------------------
@pytest.mark.slow
def test_fit_ood_adds_stats_as_a_new_version_and_leaves_the_old_one_alone(tiny_registry):
    registry = Registry(tiny_registry)
    old = registry.active_version()
    # a version as trained before the OOD check existed: same weights, no extra files
    model = registry.load(old)
    card = {k: v for k, v in model.card.items() if k not in ("ood",)}
    bare = registry.save_version(model.net, card, "bare")
    registry.activate(bare)
    assert registry.load().ood_stats is None
    old_card = (registry.version_dir(bare) / "card.json").read_bytes()
    env = {**os.environ, "XRAY_WEIGHTS": str(tiny_registry)}
    result = subprocess.run([sys.executable, "-m", "xray", "fit-ood", str(DATASET), "--workers", "1"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    new = [v for v in registry.versions() if v not in (old, bare)]
    assert len(new) == 1
    assert registry.active_version() == bare  # activation stays an explicit step
    assert (registry.version_dir(bare) / "card.json").read_bytes() == old_card
    fitted = registry.load(new[0])
    assert fitted.ood_stats is not None and fitted.card["derived_from"]["version"] == bare
    assert fitted.threshold == model.threshold
    images = [load_image(p) for p in XRAYS[:4]]
    assert [p.p_pneumonia for p in predict(fitted, images)] == [p.p_pneumonia for p in predict(model, images)]


def _audit_events() -> list[dict]:
    import json

    log = Path(os.environ["XRAY_AUDIT_LOG"])
    return [json.loads(line) for line in log.read_text().splitlines() if '"event"' in line] if log.is_file() else []


@pytest.mark.slow
def test_fit_ood_activate_goes_through_the_promotion_gate(tiny_registry):
    """``fit-ood --activate`` makes a version live only through the gate: a tiny version fails it, stays inactive,
    and the command says why (before issue 21 it called ``registry.activate`` directly)."""
    registry = Registry(tiny_registry)
    old = registry.active_version()
    before = len(_audit_events())
    env = {**os.environ, "XRAY_WEIGHTS": str(tiny_registry)}
    result = subprocess.run([sys.executable, "-m", "xray", "fit-ood", str(DATASET), "--workers", "1", "--activate"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    new = [v for v in registry.versions() if v != old]
    assert len(new) == 1 and registry.load(new[0]).ood_stats is not None  # saved, inactive
    assert registry.active_version() == old
    assert f"new version {new[0]} saved but not activated" in result.stderr
    assert "does not pass the promotion gate" in result.stderr and "evaluated on only" in result.stderr
    assert not [e for e in _audit_events()[before:] if e.get("version") == new[0]]  # nothing went live


def test_fit_ood_activate_that_passes_the_gate_is_audited(tiny_registry, monkeypatch, capsys):
    from xray.cli import main
    from xray.govern import promotion

    monkeypatch.setattr(promotion, "MIN_ACCEPTANCE_IMAGES", 1)  # the tiny model's handful of validation images
    monkeypatch.setattr(promotion, "MIN_PER_CLASS", 1)
    registry = Registry(tiny_registry)
    old = registry.active_version()
    assert main(["fit-ood", str(DATASET), "--workers", "1", "--activate"]) == 0
    new = registry.active_version()
    assert new != old and registry.load(new).ood_stats is not None and "activated" in capsys.readouterr().err
    event = _audit_events()[-1]
    assert (event["event"], event["version"], event["previous"], event["gate"]) == ("activation", new, old, "passed")


def test_fit_ood_refuses_other_data(tiny_registry, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(DATASET, other)
    next(other.rglob("*.jpeg")).unlink()
    with pytest.raises(ValueError, match="differs"):
        fit_ood_for_version(Registry(tiny_registry), None, str(other))


# -- the CLI marks such rows ---------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_marks_not_chest_xray_rows_with_score_but_no_label(tiny_registry, tmp_path):
    photo = _colour_photo(tmp_path / "holiday photo.png")
    xray = XRAYS[0]
    out = tmp_path / "out.csv"
    env = {**os.environ, "XRAY_WEIGHTS": str(tiny_registry)}
    result = subprocess.run([sys.executable, "-m", "xray", "predict", str(photo), str(xray), "--csv", str(out)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = list(csv.reader(out.open(newline="")))
    assert rows[0] == CSV_HEADER and CSV_HEADER[:5] == ["path", "p_pneumonia", "label", "threshold", "error"]
    photo_row = dict(zip(CSV_HEADER, rows[1]))
    assert photo_row["label"] == "" and 0.0 <= float(photo_row["p_pneumonia"]) <= 1.0
    assert photo_row["error"].startswith("not a chest radiograph: a colour image")
    assert "got no verdict (withheld)" in result.stderr


# -- the home-vs-outside score and the combined limit (issue 23) ---------------------------------------
def test_logistic_regression_reaches_the_optimum_of_its_objective():
    rng = np.random.default_rng(0)
    home, outside = rng.normal(size=(300, 5)), rng.normal(size=(60, 5)) + np.array([1.5, 0, 0, -1.0, 0])
    x, y = np.concatenate([home, outside]), np.r_[np.zeros(300), np.ones(60)]
    weights, bias = O.logistic_regression(x, y, c=0.05)
    # stationarity on the standardised features: w = c * sum_i s_i y_i sigmoid(-y_i f_i) z_i, and the
    # same sum without z (the unpenalised intercept) is zero
    centre, scale = home.mean(0), home.std(0)
    z = (x - centre) / scale
    sign = np.where(y == 1, 1.0, -1.0)
    sample = np.where(y == 1, 360 / 120, 360 / 600)
    f = x @ weights + bias
    residual = 0.05 * sample * sign / (1 + np.exp(sign * f))
    np.testing.assert_allclose(weights * scale, residual @ z, rtol=1e-4, atol=1e-5)
    assert abs(residual.sum()) < 1e-6
    assert weights[0] > 0 and weights[3] < 0  # points from home towards outside
    with pytest.raises(ValueError, match="both classes"):
        O.logistic_regression(home, np.zeros(300))


def test_combined_limit_flags_its_percentile_of_validation_and_survives_a_round_trip():
    rng = np.random.default_rng(1)
    films = lambda n, shift: rng.normal(size=(n, 2 * 4 * 4)) + shift  # noqa: E731 (2 channels on the 4x4 grid)
    to_2x2 = lambda f: f.reshape(-1, 2, 2, 2, 2, 2).mean(axis=(3, 5)).reshape(-1, 8)  # noqa: E731 (the distance's grid)
    train, val = films(2000, 0.0), films(2000, 0.0)
    outside = films(400, 0.7)  # other hospitals: shifted a little in every feature
    base = O.fit_stats(to_2x2(train), to_2x2(val), percentile=99.0, grid=2)
    stats = O.fit_outside(base, train, outside, val, base.distances(to_2x2(val)))
    val_scores = stats.combined_scores(base.distances(to_2x2(val)), stats.outside_scores(val))
    assert np.mean(val_scores > stats.combined_threshold) == pytest.approx(0.01, abs=0.002)
    new = films(500, 0.7)  # more films from elsewhere
    caught = np.mean(stats.combined_scores(base.distances(to_2x2(new)), stats.outside_scores(new))
                     > stats.combined_threshold)
    alone = np.mean(base.distances(to_2x2(new)) > base.threshold)
    assert caught > 0.9 and alone < 0.7  # the discriminative part sees what the distance misses
    again = O.OodStats.from_bytes(stats.to_bytes())
    np.testing.assert_array_equal(again.outside, stats.outside)
    np.testing.assert_array_equal(again.combined, stats.combined)
    assert (again.outside_bias, again.combined_threshold, again.n_outside) == (
        stats.outside_bias, stats.combined_threshold, 400)
    assert O.OodStats.from_bytes(base.to_bytes()).outside is None  # versions without it keep the distance check
    broken = dataclasses.replace(stats, outside=stats.outside[:-1])
    with pytest.raises(ValueError, match="inconsistent"):
        O.OodStats.from_bytes(broken.to_bytes())


def _with_outside_score(model, combined_threshold: float, distance_threshold: float = np.inf):
    """The tiny model with a home-vs-outside score (weights on its 4x4 features) at the given limits."""
    stats = model.ood_stats
    channels = stats.mean.shape[0] // (stats.grid * stats.grid)
    rng = np.random.default_rng(0)
    return dataclasses.replace(model, ood_stats=dataclasses.replace(
        stats, threshold=distance_threshold, outside=rng.normal(size=channels * O.OUTSIDE_GRID ** 2),
        outside_bias=0.0, combined=np.array([0.0, 1.0, 0.0, 1.0]), combined_threshold=combined_threshold))


def test_the_combined_limit_replaces_the_distance_limit_and_names_equipment_or_age(tiny_model):
    images = [load_image(p) for p in XRAYS[:4]]
    flagged = predict(_with_outside_score(tiny_model, -np.inf), images)
    assert all(p.withheld and p.outcome == "outside intended use" and p.withheld_reason.startswith(O.EQUIPMENT_OR_AGE)
               for p in flagged)
    # with the score, the distance's own limit no longer applies (the sum has one limit)
    passed = predict(_with_outside_score(tiny_model, np.inf, distance_threshold=0.0), images)
    assert not any(p.withheld for p in passed)
    assert [p.p_pneumonia for p in passed] == [p.p_pneumonia for p in flagged]  # the score never changes


def test_predict_computes_the_combined_score_from_the_same_pass(tiny_model):
    model = _with_outside_score(tiny_model, 0.0)
    images = [load_image(p) for p in XRAYS[:6]]
    logits, features, outside = logits_and_guard_features(model, model_inputs(images, model.image_size))
    stats = model.ood_stats
    scores = stats.combined_scores(stats.distances(features), stats.outside_scores(outside))
    for p, score in zip(predict(model, images), scores):
        assert p.withheld == (score > 0.0)


def test_fit_ood_with_outside_films_saves_the_networks_with_the_new_version(tiny_registry, tmp_path):
    """``fit-ood --outside``: the guard's home-vs-outside networks are trained, saved as ``outside_net.pt`` in a
    new version (declared in its card, checksummed, loaded with it), and the classifier's weights stay
    byte-identical; a fit without outside films drops the file again."""
    from xray.model.outside_net import OUTSIDE_NET_FILE, OutsideNetConfig

    outside = tmp_path / "outside"
    outside.mkdir()
    for path in sorted((ROOT / "tests" / "fixtures" / "external").glob("*.png")):
        (outside / path.name).write_bytes(path.read_bytes())
    registry = Registry(tiny_registry)
    old = registry.active_version()
    new = fit_ood_for_version(registry, None, str(DATASET), outside=[str(outside)],
                              net_config=OutsideNetConfig(members=2, epochs=2, batch_size=8))
    fitted = registry.load(new)
    stats = fitted.ood_stats
    assert stats.net_scale is not None and stats.outside is None and stats.n_outside == 3
    assert np.isfinite(stats.combined_threshold) and stats.combined.shape == (2,)
    assert fitted.outside_net is not None and len(fitted.outside_net.members) == 2
    assert OUTSIDE_NET_FILE in fitted.card.extra_files and (registry.version_dir(new) / OUTSIDE_NET_FILE).is_file()
    assert fitted.card["ood"]["n_outside"] == 3 and "CNNs" in fitted.card["ood"]["method"]
    assert fitted.card["ood"]["outside_net"]["members"] == 2 and fitted.card["ood"]["outside_net"]["n_outside"] == 3
    assert "3 outside films" in fitted.card["derived_from"]["change"]
    weights = registry.version_dir(new) / "model.pt", registry.version_dir(old) / "model.pt"
    assert weights[0].read_bytes() == weights[1].read_bytes()
    # the validation films' share over the combined limit is what the card says
    images = [load_image(p) for p in XRAYS]
    assert all(0.0 <= p.p_pneumonia <= 1.0 for p in predict(fitted, images))
    again = registry.load(fit_ood_for_version(registry, new, str(DATASET)))  # no --outside: distance alone
    assert again.outside_net is None and again.ood_stats.net_scale is None
    assert OUTSIDE_NET_FILE not in again.card.extra_files
    with pytest.raises(ValueError, match="no readable images"):
        fit_ood_for_version(registry, None, str(DATASET), outside=[str(tmp_path / "empty")])
