"""How much colour the heatmap's fixed scale puts on validation films, per class: docs/heatmaps.md.

For each validation image of a version: the largest cell's evidence (calibrated log-odds per cell), the
share of the 64 cells that get colour (at or above ``EVIDENCE_FLOOR``) and whether any cell reaches the
middle of the scale (yellow-orange) or full colour (red). Printed as JSON per class, with p(pneumonia).

Usage: python scripts/heatmap_normals.py DATA_DIR [--registry weights] [--model VERSION]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from xray.serve.hirescam import EVIDENCE_FLOOR, EVIDENCE_FULL_SCALE, evidence_map  # noqa: E402
from xray.serve.inference import predict  # noqa: E402
from xray.model.registry import Registry  # noqa: E402
from xray.io.folders import load_splits  # noqa: E402
from xray.train.config import TrainConfig  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("data_dir")
    parser.add_argument("--registry", default="weights")
    parser.add_argument("--model", default="")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = Registry(args.registry).load(args.model or None, torch.device("cpu"))
    cfg = TrainConfig.from_dict({**model.card.training.config, "data_dir": args.data_dir})
    splits = load_splits(cfg.data_dir, **cfg.folder_options())
    middle = (EVIDENCE_FLOOR + EVIDENCE_FULL_SCALE) / 2
    out = {"version": model.version, "floor": EVIDENCE_FLOOR, "full_scale": EVIDENCE_FULL_SCALE}
    for label, name in ((0, "NORMAL"), (1, "PNEUMONIA")):
        rows = []
        for i in [i for i in splits.val if splits.labels[i] == label]:
            image = splits.images[i].astype(np.float32) / 255
            evidence = evidence_map(model, image)
            p = predict(model, [image])[0].p_pneumonia
            rows.append((float(evidence.max()), float((evidence >= EVIDENCE_FLOOR).mean()), p))
        top = np.array([r[0] for r in rows])
        share = np.array([r[1] for r in rows])
        p = np.array([r[2] for r in rows])
        out[name] = {"images": len(rows),
                     "any_colour": round(float((top >= EVIDENCE_FLOOR).mean()), 4),
                     "any_cell_past_middle": round(float((top >= middle).mean()), 4),
                     "any_cell_full_colour": round(float((top >= EVIDENCE_FULL_SCALE).mean()), 4),
                     "coloured_cells_median": round(float(np.median(share)), 4),
                     "coloured_cells_p90": round(float(np.percentile(share, 90)), 4),
                     "max_cell_median": round(float(np.median(top)), 4),
                     "max_cell_p90": round(float(np.percentile(top, 90)), 4),
                     "any_colour_when_p_below_0.5": round(float((top[p < 0.5] >= EVIDENCE_FLOOR).mean()), 4)
                     if (p < 0.5).any() else None}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
