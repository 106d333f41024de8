"""The whole-acquisition-batch check of docs/experiments.md: a training folder without any
``NORMAL2-IM-`` normal, validated on all of them plus the id-range 15% of the pneumonia patients.

Usage:
  python scripts/batch_holdout.py make DATA_DIR OUT          # OUT/train, OUT/val: links to DATA_DIR's files
  python -m xray train OUT --registry REG [--members 1]      # then train on it
  python scripts/batch_holdout.py score REG VERSION [...]    # AUC, and specificity on the unseen batch at
                                                             # the threshold keeping validation sensitivity 0.95
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from xray.decide import metrics as M  # noqa: E402
from xray.io.folders import id_range_split, scan_dataset  # noqa: E402

HELD_OUT = "NORMAL2-"


def make(data_dir: str, out: str) -> None:
    scan = scan_dataset(data_dir)
    pneumonia = [s for s in scan.samples if s.label == 1]
    _, val = id_range_split(pneumonia, 0.15, 0)
    val_paths = {pneumonia[i].path for i in val}
    counts: dict[str, int] = {}
    for s in scan.samples:
        held = s.path.name.startswith(HELD_OUT) if s.label == 0 else s.path in val_paths
        folder = Path(out) / ("val" if held else "train") / ("NORMAL" if s.label == 0 else "PNEUMONIA")
        folder.mkdir(parents=True, exist_ok=True)
        link = folder / s.path.name
        if not link.exists():
            os.symlink(s.path.resolve(), link)
        key = f"{folder.parent.name}/{folder.name}"
        counts[key] = counts.get(key, 0) + 1
    print(json.dumps(counts, sort_keys=True))


def score(registry: str, versions: list[str]) -> None:
    for version in versions:
        card = json.loads((Path(registry) / "versions" / version / "card.json").read_text())
        predictions = card["validation"]["predictions"]
        y, p = np.array(predictions["label"]), np.array(predictions["p_pneumonia"])
        at = M.metrics_at(y, p, M.choose_threshold(y, p, "sensitivity>=0.95"))
        print(f"{version}: AUC {M.roc_auc(y, p):.4f}; specificity on the unseen batch at sensitivity "
              f"{at['sensitivity']:.3f}: {at['specificity']:.3f}; mean p of its normals {p[y == 0].mean():.3f}")


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "make":
        make(sys.argv[2], sys.argv[3])
    elif len(sys.argv) >= 4 and sys.argv[1] == "score":
        score(sys.argv[2], sys.argv[3:])
    else:
        raise SystemExit(__doc__)
