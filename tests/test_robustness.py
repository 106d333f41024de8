"""The generalisation checks behind docs/experiments.md (``python -m xray.train.robustness``) on the tiny model."""
import json
import shutil
from pathlib import Path

import numpy as np

from xray.io.augment import CLIP_CHECKS, PERTURBATIONS, WIDTH_CHECKS
from xray.train import robustness

DATASET = Path(__file__).parent / "fixtures" / "dataset"


def _samples(tmp_path: Path) -> Path:
    """A samples folder like ../shared/data/samples: two images of each class from the fixtures."""
    root = tmp_path / "samples"
    for cls in ("NORMAL", "PNEUMONIA"):
        (root / cls).mkdir(parents=True)
        for f in sorted(next(DATASET.rglob(cls)).glob("*"))[:2]:
            shutil.copy(f, root / cls / f.name)
    return root


def test_check_reports_every_perturbation_and_the_samples(tiny_model, tmp_path):
    report = robustness.check(tiny_model, str(_samples(tmp_path)))
    assert set(report["perturbations"]) == set(PERTURBATIONS)
    assert 0.0 <= report["perturbation_mean_flip_rate"] <= 1.0
    assert report["perturbation_worst_auc"] == min(v["roc_auc"] for v in report["perturbations"].values())
    assert set(report["width"]) == set(WIDTH_CHECKS)
    assert set(report["highlights"]) == set(CLIP_CHECKS)
    for row in report["width"].values():
        assert 0.0 <= row["mean_p_normals"] <= 1.0 and 0.0 <= row["flip_rate"] <= 1.0
    assert report["fullres_samples"]["n"] == 4
    assert len(report["fullres_samples"]["p_normals"]) == 2
    assert len(report["fullres_samples"]["p_normals_at_aspect_1.5"]) == 2


def test_widen_pads_the_sides_to_the_aspect_and_leaves_wide_films_alone():
    film = np.arange(12, dtype=np.float32).reshape(3, 4)
    wide = robustness._widen(film, 2.0)
    assert wide.shape == (3, 6)
    assert (wide[:, 1:5] == film).all() and (wide[:, 0] == film[:, 0]).all() and (wide[:, 5] == film[:, 3]).all()
    assert robustness._widen(film, 1.0).shape == (3, 4)


def test_a_missing_samples_folder_is_reported_not_skipped_silently(tiny_model, tmp_path):
    report = robustness.check(tiny_model, str(tmp_path / "nowhere"))
    assert report["fullres_samples"] == {"skipped": f"no folder {tmp_path / 'nowhere'}"}


def test_cli_writes_the_report(tiny_registry, tmp_path):
    out = tmp_path / "report.json"
    robustness.main(["--registry", str(tiny_registry), "--samples", str(_samples(tmp_path)), "--json", str(out)])
    assert json.loads(out.read_text())["fullres_samples"]["n"] == 4
