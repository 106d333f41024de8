"""Adaptation without labels (``xray.train.adapt``, AdaBN) measured on the drift we can build.

Usage:
  python scripts/adapt_drift.py REG VERSION [--repeats 3] [--samples DIR] [--external DIR] [--data DIR]

For the version's validation images (its card's split of its training folder), as they are and under
each acquisition perturbation (``xray.io.augment.PERTURBATIONS``: a "site" whose every film is
acquired that way), and once as they are but with the adapting half drawn at 20% pneumonia (a site
whose prevalence differs from training): adapt on a random half (labels unused; films the guard
withholds unused), score the other half with the parent and with the adapted net at the parent's
threshold: AUC, sensitivity, specificity, ECE, films withheld; and the EM prevalence estimate against
the truth. With ``--samples``: the full-resolution samples, adapted on themselves (unlabelled,
transductive). With ``--external``: a folder of films the guard should withhold (adults), scored by the
parent and by a net adapted on the clean validation images: how many the kept guard still withholds.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from xray.decide import metrics as M  # noqa: E402
from xray.io.augment import PERTURBATIONS  # noqa: E402
from xray.io.loader import load_image  # noqa: E402
from xray.io.preprocess import ModelInput, model_input  # noqa: E402
from xray.model.registry import Registry  # noqa: E402
from xray.serve.inference import model_inputs, predict  # noqa: E402
from xray.train import adapt as A  # noqa: E402
from xray.train.config import TrainConfig  # noqa: E402
from xray.io.folders import load_training_data  # noqa: E402
from xray.serve.pipeline import iter_image_paths  # noqa: E402


VARIANTS = {"AdaBN": (False, 0.0), "AdaBN, prior-weighted": (True, 0.0),
            "prior-weighted, half parent": (True, 0.5)}


def films_of(model, prepared: list[ModelInput]) -> A.Films:
    predictions = predict(model, prepared, batch_size=128)
    return A.Films("", [Path(str(i)) for i in range(len(prepared))], prepared,
                   model_inputs(prepared, model.image_size), np.array([p.withheld for p in predictions]),
                   np.array([p.p_pneumonia for p in predictions]))


def scores(model, prepared):
    predictions = predict(model, prepared, batch_size=128)
    return np.array([p.p_pneumonia for p in predictions]), np.array([p.withheld for p in predictions])


def figures(y, p, withheld, t):
    m = M.metrics_at(y, p, t)
    return np.array([m["roc_auc"], m["sensitivity"], m["specificity"], M.expected_calibration_error(y, p),
                     withheld.sum()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("registry")
    parser.add_argument("version")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", default="")
    parser.add_argument("--external", default="")
    parser.add_argument("--conditions", default="", help="comma-separated subset of the conditions")
    parser.add_argument("--data", default="", help="the training folder, where the card's path does not resolve here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = Registry(args.registry).load(args.version, torch.device("cpu"))
    t = model.threshold
    cfg = TrainConfig.from_dict({**model.card.training.config, **({"data_dir": args.data} if args.data else {})})
    splits = load_training_data(cfg.data_dir, **cfg.folder_options())
    y = splits.labels[splits.val]
    clean = torch.from_numpy(splits.images[splits.val]).unsqueeze(1)
    conditions = {"clean": lambda x: x, "clean, adapted at 20% pneumonia": lambda x: x, **PERTURBATIONS}
    if args.conditions:
        conditions = {k: v for k, v in conditions.items() if k in args.conditions.split(",")}
    rng = np.random.default_rng(0)
    print(f"{args.version}: {len(y)} validation images ({int(y.sum())} pneumonia), threshold {t:.4f}; "
          f"adapt on a random half, score the other; mean of {args.repeats} repeats")
    print("condition | variant | AUC before/after | sens before/after | spec before/after | ECE before/after | "
          "withheld on the scored half before/after | prevalence of the adapting half: truth, EM before, EM after")
    for name, fn in conditions.items():
        x = fn(clean.float()).clamp(0, 255).round().to(torch.uint8)
        prepared = [ModelInput(im[0].numpy(), (224, 224)) for im in x]
        p0, w0 = scores(model, prepared)
        rows = {v: [] for v in VARIANTS}
        for _ in range(args.repeats):
            order = rng.permutation(len(y))
            fit, held = order[: len(y) // 2], order[len(y) // 2:]
            if "20%" in name:  # the adapting half at 20% pneumonia: all its normals, a quarter as many pneumonias
                normals = fit[y[fit] == 0]
                fit = np.r_[normals, fit[y[fit] == 1][: len(normals) // 4]]
            films = films_of(model, [prepared[i] for i in fit])
            for variant, (prior_correction, source_weight) in VARIANTS.items():
                result = A.adapt_model(model, films, prior_correction, source_weight)
                adapted = A.loaded_like(model, result.net)
                p1, w1 = scores(adapted, [prepared[i] for i in held])
                rows[variant].append(np.r_[figures(y[held], p0[held], w0[held], t), figures(y[held], p1, w1, t),
                                           y[fit].mean(), result.prevalence_before, result.prevalence_after])
        for variant in VARIANTS:
            r = np.mean(rows[variant], axis=0)
            print(f"{name} | {variant} | {r[0]:.4f} / {r[5]:.4f} | {r[1]:.3f} / {r[6]:.3f} | {r[2]:.3f} / {r[7]:.3f} | "
                  f"{r[3]:.3f} / {r[8]:.3f} | {r[4]:.1f} / {r[9]:.1f} | {r[10]:.2f}, {r[11]:.2f}, {r[12]:.2f}", flush=True)
    if args.samples:
        paths, labels = [], []
        for label, cls in enumerate(("NORMAL", "PNEUMONIA")):
            for f in sorted((Path(args.samples) / cls).glob("*")):
                paths.append(f)
                labels.append(label)
        prepared = [model_input(load_image(f), model.image_size) for f in paths]
        labels = np.array(labels)
        films = films_of(model, prepared)
        result = A.adapt_model(model, films)
        before = figures(labels, films.p_before, films.withheld, t)
        after = figures(labels, result.p_after, result.withheld_after, t)
        print(f"full-resolution samples ({len(labels)}, adapted on themselves): AUC {before[0]:.3f} / {after[0]:.3f}, "
              f"sens {before[1]:.3f} / {after[1]:.3f}, spec {before[2]:.3f} / {after[2]:.3f}, withheld "
              f"{before[4]:.0f} / {after[4]:.0f}; normals' p before {np.round(films.p_before[labels == 0], 2)}, "
              f"after {np.round(result.p_after[labels == 0], 2)}")
    if args.external:
        prepared = []
        for f in iter_image_paths([args.external]):
            try:
                prepared.append(model_input(load_image(f), model.image_size))
            except ValueError:
                continue
        films = films_of(model, [ModelInput(im[0].numpy(), (224, 224)) for im in clean.to(torch.uint8)])
        adapted = A.loaded_like(model, A.adapt_model(model, films).net)
        _, w0 = scores(model, prepared)
        _, w1 = scores(adapted, prepared)
        print(f"external films the guard should withhold ({args.external}, {len(prepared)}): withheld by the parent "
              f"{int(w0.sum())}, by the net adapted on the clean validation images {int(w1.sum())}")


if __name__ == "__main__":
    main()
