"""The shipped models' behaviour is pinned: their predictions on every readable fixture and sample are the
ones recorded before the layering refactor (tests/fixtures/shipped_predictions.json, the single net shipped
then), when the ensemble of issue 15 shipped (shipped_predictions_20261129-225647.json) and when its guard
gained the home-vs-outside score of issue 23 (same weights: identical p, only the guard outcome pinned anew)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from xray.io.loader import load_image
from xray.serve.inference import predict
from xray.model.registry import Registry

ROOT = Path(__file__).resolve().parent.parent
RECORDS = ["shipped_predictions.json", "shipped_predictions_20261129-225647.json",
           "shipped_predictions_20261202-081004-ood.json"]


@pytest.mark.parametrize("record", RECORDS)
def test_shipped_predictions_are_unchanged(monkeypatch, record):
    RECORD = json.loads((ROOT / "tests" / "fixtures" / record).read_text())
    monkeypatch.chdir(ROOT)
    model = Registry(ROOT / "weights").load(RECORD["version"])
    paths = sorted(RECORD["predictions"])
    predictions = [predict(model, [load_image(ROOT / p)])[0] for p in paths]  # one at a time, as recorded
    for path, prediction in zip(paths, predictions):
        p, withheld, reason = RECORD["predictions"][path]
        assert prediction.p_pneumonia == pytest.approx(p, abs=1e-9), path
        assert (prediction.withheld, prediction.withheld_reason) == (withheld, reason), path


def test_the_issue_23_guard_kept_the_ensembles_weights_and_scores():
    before, after = (json.loads((ROOT / "tests" / "fixtures" / r).read_text()) for r in RECORDS[1:])
    assert {p: v[0] for p, v in before["predictions"].items()} == {p: v[0] for p, v in after["predictions"].items()}
    versions = ROOT / "weights" / "versions"
    weights = versions / before["version"] / "model.pt", versions / after["version"] / "model.pt"
    assert weights[0].read_bytes() == weights[1].read_bytes()
