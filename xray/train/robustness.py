"""Evidence that generalises beyond a random patient split: the checks behind docs/experiments.md.

For one model version: metrics on its own patient-level validation split (rebuilt from the card's
training config), specificity on each batch of normal images (IM- vs NORMAL2-), metrics on the
full-resolution official validation images, and the same validation set under acquisition-like
perturbations (gamma, blur, noise, crop, zoom-out, rotation), with how many decisions flip.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from xray.decide import metrics as M
from xray.io.augment import CLIP_CHECKS, PERTURBATIONS, WIDTH_CHECKS, clip_highlights, scale_width
from xray.io.loader import load_image
from xray.serve.inference import logits_of, predict, probabilities
from xray.model.registry import LoadedModel, Registry
from xray.io.folders import load_training_data
from xray.train.config import TrainConfig


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0, 255).round().to(torch.uint8)


def _p(model: LoadedModel, inputs: torch.Tensor, batch: int = 256) -> np.ndarray:
    return np.concatenate([probabilities(model, logits_of(model, inputs[i:i + batch]))
                           for i in range(0, len(inputs), batch)])


# The full-resolution normal samples are 1.12-1.39 wide; the pneumonia samples 1.25-1.73.
WIDER_ASPECT = 1.5


def _widen(pixels: np.ndarray, aspect: float) -> np.ndarray:
    """(H, W) -> (H, round(H * aspect)): the film padded at both sides with its edge columns, as if the
    detector had framed it wider; unchanged when it already is that wide."""
    h, w = pixels.shape
    extra = max(0, int(round(h * aspect)) - w)
    return np.pad(pixels, ((0, 0), (extra // 2, extra - extra // 2)), mode="edge")


def _summary(y: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    m = M.metrics_at(y, p, threshold)
    return {k: m[k] for k in ("n", "accuracy", "sensitivity", "specificity", "roc_auc")}


def check(model: LoadedModel, samples_dir: str | None = None) -> dict:
    """All checks for one loaded model; returns a JSON-able dict."""
    cfg = TrainConfig.from_dict(dict(model.card.training.config))
    data = load_training_data(cfg.data_dir, **cfg.folder_options())
    val = data.val
    y = data.labels[val]
    inputs = torch.from_numpy(data.images[val]).unsqueeze(1)  # (N, 1, S, S) uint8
    t = model.threshold
    p = _p(model, inputs)
    report: dict = {"version": model.version, "threshold": t, "validation": _summary(y, p, t)}
    report["validation"]["ece"] = M.expected_calibration_error(y, p)
    names = [data.scan.samples[i].path.name for i in val]
    batches = {}
    for prefix in ("IM-", "NORMAL2-"):
        mask = np.array([n.startswith(prefix) for n in names]) & (y == 0)
        if mask.any():
            batches[prefix] = {"n": int(mask.sum()), "specificity": float(np.mean(p[mask] < t)),
                               "mean_p": float(p[mask].mean())}
    report["normal_batches"] = batches
    def under(change) -> tuple[np.ndarray, dict]:
        """p of the validation films under ``change``, and its summary with the decisions it flips."""
        q = _p(model, _to_uint8(change(inputs.float())))
        return q, {**_summary(y, q, t), "flip_rate": float(np.mean((q >= t) != (p >= t)))}

    report["perturbations"] = {name: under(fn)[1] for name, fn in PERTURBATIONS.items()}
    aucs = [v["roc_auc"] for v in report["perturbations"].values()]
    report["perturbation_worst_auc"] = float(min(aucs))
    report["perturbation_mean_flip_rate"] = float(np.mean([v["flip_rate"] for v in report["perturbations"].values()]))
    # The width check: the training copies were squashed to a square, so a film from a wider original
    # shows narrower anatomy; a model that reads width as pneumonia fails normals from wider originals.
    # Clipped highlights: a narrower VOI window burns the mediastinum and heart out white.
    for section, checks, change in (("width", WIDTH_CHECKS, scale_width), ("highlights", CLIP_CHECKS, clip_highlights)):
        report[section] = {}
        for name, value in checks.items():
            q, row = under(lambda x: change(x, value))
            report[section][name] = {**row, "mean_p_normals": float(q[y == 0].mean()),
                                     "mean_p_pneumonia": float(q[y == 1].mean())}
    if samples_dir and not Path(samples_dir).is_dir():
        report["fullres_samples"] = {"skipped": f"no folder {samples_dir}"}
    elif samples_dir:
        paths, labels = [], []
        for label, cls in enumerate(("NORMAL", "PNEUMONIA")):
            for f in sorted((Path(samples_dir) / cls).glob("*")):
                paths.append(f)
                labels.append(label)
        images = [load_image(f) for f in paths]
        ps = np.array([pr.p_pneumonia for pr in predict(model, images)])
        normals = [im.pixels for im, label in zip(images, labels) if label == 0]
        wider = np.array([pr.p_pneumonia for pr in predict(model, [_widen(a, WIDER_ASPECT) for a in normals])])
        report["fullres_samples"] = {**_summary(np.array(labels), ps, t),
                                     "p_normals": [round(float(v), 3) for v in ps[np.array(labels) == 0]],
                                     # the same normal films framed wider: the width check on real files
                                     f"p_normals_at_aspect_{WIDER_ASPECT}": [round(float(v), 3) for v in wider],
                                     f"specificity_at_aspect_{WIDER_ASPECT}": float(np.mean(wider < t))}
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m xray.train.robustness", description=__doc__)
    parser.add_argument("--model", default="", help="version id (default: active)")
    parser.add_argument("--registry", default="")
    parser.add_argument("--samples", default=str(Path(__file__).resolve().parents[3] / "shared" / "data" / "samples"),
                        help="folder with NORMAL/ and PNEUMONIA/ full-resolution images")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    model = Registry(args.registry or None).load(args.model or None)
    report = check(model, args.samples)
    text = json.dumps(report, indent=2)
    if args.json:
        Path(args.json).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
