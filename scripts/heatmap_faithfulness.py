"""Deletion and insertion scores of the heatmaps (Petsiuk et al., "RISE", BMVC 2018): docs/heatmaps.md.

For each validation pneumonia image of a version, the 8x8 cells of the model input are ranked by a
heatmap; deletion replaces the top cells, one at a time, with a blurred copy of the image and records
p(pneumonia) (area under that curve: lower = the map found what the model used); insertion starts from
the blurred image and puts the top cells back (area: higher = better). Compared: Grad-CAM
(pytorch-grad-cam, the app's map before) and HiResCAM (xray.serve.hirescam.evidence_map, the app's map now),
with a random ranking as the floor.

Usage: python scripts/heatmap_faithfulness.py DATA_DIR [--registry weights] [--model VERSION] [--n 200]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from xray.serve.hirescam import GradCam, evidence_map  # noqa: E402
from xray.serve.inference import predict  # noqa: E402
from xray.model.registry import Registry  # noqa: E402
from xray.io.folders import load_training_data  # noqa: E402
from xray.train.config import TrainConfig  # noqa: E402


def cell_ranking(cell_scores: np.ndarray) -> np.ndarray:
    return np.argsort(-cell_scores.ravel(), kind="stable")


def curves(model, pixels: np.ndarray, order: np.ndarray, grid: int) -> tuple[float, float]:
    """(deletion AUC, insertion AUC) for one (S, S) uint8 input and a cell order."""
    size = pixels.shape[0]
    cell = size // grid
    blurred = np.asarray(Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(cell / 2)), dtype=np.uint8)
    deleted, inserted = [pixels.copy()], [blurred.copy()]
    current_d, current_i = pixels.copy(), blurred.copy()
    for index in order:
        r, c = divmod(int(index), grid)
        window = np.s_[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell]
        current_d[window] = blurred[window]
        current_i[window] = pixels[window]
        deleted.append(current_d.copy())
        inserted.append(current_i.copy())
    p_d = [q.p_pneumonia for q in predict(model, [d.astype(np.float32) / 255 for d in deleted], batch_size=65)]
    p_i = [q.p_pneumonia for q in predict(model, [d.astype(np.float32) / 255 for d in inserted], batch_size=65)]
    x = np.linspace(0, 1, len(p_d))
    return float(np.trapezoid(p_d, x)), float(np.trapezoid(p_i, x))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("data_dir")
    parser.add_argument("--registry", default="weights")
    parser.add_argument("--model", default="")
    parser.add_argument("--n", type=int, default=200)
    args = parser.parse_args()
    model = Registry(args.registry).load(args.model or None, torch.device("cpu"))
    cfg = TrainConfig.from_dict({**model.card.training.config, "data_dir": args.data_dir})
    data = load_training_data(cfg.data_dir, **cfg.folder_options())
    pneumonia = [i for i in data.val if data.labels[i] == 1][: args.n]
    rng = np.random.default_rng(0)
    scores: dict[str, list] = {"HiResCAM": [], "Grad-CAM": [], "random": []}
    with GradCam(model) as gradcam:
        for i in pneumonia:
            pixels = data.images[i]
            image = pixels.astype(np.float32) / 255
            evidence = evidence_map(model, image)
            grid = evidence.shape[0]
            cam = gradcam(image, shape=pixels.shape)  # (S, S) in [0, 1], each map scaled to its own max
            cam_cells = cam.reshape(grid, cam.shape[0] // grid, grid, cam.shape[1] // grid).mean(axis=(1, 3))
            scores["HiResCAM"].append(curves(model, pixels, cell_ranking(evidence), grid))
            scores["Grad-CAM"].append(curves(model, pixels, cell_ranking(cam_cells), grid))
            scores["random"].append(curves(model, pixels, rng.permutation(grid * grid), grid))
    report = {name: {"deletion_auc": round(float(np.mean([s[0] for s in v])), 4),
                     "insertion_auc": round(float(np.mean([s[1] for s in v])), 4), "images": len(v)}
              for name, v in scores.items()}
    report["model"] = model.version
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
