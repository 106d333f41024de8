"""The borderline band: fitted from acquisition perturbations, stored in the card as log-odds offsets,
and the one decision rule says BORDERLINE inside it on the page, in the CLI and in the audit log."""
from __future__ import annotations

import csv
import io
import math

import numpy as np
import pytest
import torch

from conftest import FULLRES
from xray.decide import borderline
from xray.decide.decision import BORDERLINE, NORMAL, PNEUMONIA, band_limits, decide
from xray.model.registry import Registry


def _logit(p):
    return math.log(p / (1 - p))


def test_decide_inside_and_outside_the_band():
    band = (1.0, 0.5)  # log-odds below and above the threshold
    low, high = band_limits(0.5, band)
    assert _logit(low) == pytest.approx(-1.0) and _logit(high) == pytest.approx(0.5)
    assert decide(0.5, 0.5, band) == BORDERLINE and decide(low, 0.5, band) == BORDERLINE
    assert decide(low - 1e-9, 0.5, band) == NORMAL and decide(high, 0.5, band) == PNEUMONIA
    assert decide(0.55, 0.5) == PNEUMONIA  # no band: a two-way call
    assert band_limits(0.0, band) is None and band_limits(1.0, band) is None
    # the band moves with the threshold the clinician chooses
    assert band_limits(0.2, band)[0] < band_limits(0.8, band)[0]


def test_fit_band_measures_how_far_perturbations_move_the_log_odds():
    def fragile(x):  # log-odds driven by mean brightness: gamma and contrast move it a lot
        return (x.mean(dim=(1, 2, 3)).numpy() - 128.0) / 8.0

    def robust(x):
        return np.zeros(len(x))

    images = torch.randint(40, 220, (20, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    wide, none = borderline.fit_band(fragile, images), borderline.fit_band(robust, images)
    assert wide["below"] > 0.5 and wide["above"] > 0.5 and wide["n"] == 20
    assert none["below"] == 0.0 and none["above"] == 0.0


@pytest.mark.slow
def test_training_stores_the_band_and_the_cli_labels_borderline(tiny_registry, tmp_path, capsys):
    from conftest import train_tiny
    from xray.cli import main

    trained = Registry(tmp_path / "fresh")
    fitted = trained.card(train_tiny(trained.root))
    assert fitted.borderline is not None and fitted.borderline_info["n"] == fitted.validation.n
    registry = Registry(tiny_registry)
    card = registry.card(registry.active_version())
    image = FULLRES / "NORMAL2-IM-1438-0001.jpeg"
    main(["predict", str(image)])
    row = next(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    p = float(row["p_pneumonia"])
    # a threshold right at p puts the image inside any non-empty band
    registry.update_card(card.version, {"borderline": {"below": 0.5, "above": 0.5}})
    main(["predict", str(image), "--threshold", f"{p:.6f}"])
    row = next(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert row["label"] == BORDERLINE
    main(["predict", str(image), "--threshold", f"{min(p + 0.4, 0.999):.6f}" if p < 0.5 else "0.000001"])
    row = next(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert row["label"] in (NORMAL, PNEUMONIA)


@pytest.mark.slow
def test_the_page_says_borderline_in_words_and_colour_and_logs_it(tiny_registry):
    import json
    import os
    from pathlib import Path

    from test_page_diagnose import drop, metric, start_app, upload

    registry = Registry(tiny_registry)
    registry.update_card(registry.active_version(), {"borderline": {"below": 0.5, "above": 0.5}})
    image = FULLRES / "NORMAL2-IM-1438-0001.jpeg"
    at = drop(start_app(), upload(image))
    p = float(metric(at, "p(pneumonia)"))
    at.number_input(key="diagnose_threshold_exact").set_value(round(p, 6)).run()
    texts = [m.value for m in at.markdown if "-background[" in m.value]
    assert texts == ["#### :orange-background[:material/help: BORDERLINE]"]
    assert any("Borderline: p(pneumonia) lies between" in c.value for c in at.caption)
    last = json.loads(Path(os.environ["XRAY_AUDIT_LOG"]).read_text().splitlines()[-1])
    assert last["decision"] == BORDERLINE and last["threshold"] == round(p, 6)
