"""The shipped models' behaviour is pinned: their predictions on every readable fixture and sample are the
ones recorded before the layering refactor (tests/fixtures/shipped_predictions.json, the single net shipped
then) and when the ensemble of issue 15 shipped (shipped_predictions_20261129-225647.json)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from xray.io.loader import load_image
from xray.serve.inference import predict
from xray.model.registry import Registry

ROOT = Path(__file__).resolve().parent.parent
RECORDS = ["shipped_predictions.json", "shipped_predictions_20261129-225647.json"]


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
