"""The hidden protocol of site calibration, simulated on labelled predictions we have: fit Platt scaling
and the threshold on a random part of a set (310 films, as the hidden check does with half of the
official test split), score the rest (314), repeat over random draws; how often is sensitivity on the
other part at least the floor, and at what specificity and ECE, for each threshold rule.

Usage:
  python scripts/site_halves.py REG VERSION [--condition NAME] [--repeats 2000] [--rules R1,R2] [--logit-noise SD]

Predictions: the version's card, validation predictions (``--condition clean``, default), or one
acquisition perturbation of its calibration set (``--condition 'gamma 1.4'``: every film of the "site"
under that perturbation). Each repeat draws 390 pneumonia and 234 normal images (the hidden split's
composition) from those predictions when there are enough, else all of them, and splits them 310 / rest
at random (not stratified), like the hidden check.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from xray.decide import calibration as C  # noqa: E402
from xray.decide import metrics as M  # noqa: E402

COMPOSITION = (234, 390)  # normals, pneumonias of the hidden split
FIT = 310


def predictions(registry: str, version: str, condition: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels, logit of the card's p) of the validation images, or of one perturbation of them."""
    validation = json.loads((Path(registry) / "versions" / version / "card.json").read_text())["validation"]
    if condition == "clean":
        block = validation["predictions"]
        y, p = np.array(block["label"]), np.array(block["p_pneumonia"])
    else:
        block = validation["calibration_set"]
        names = ["clean"] + block["images"].split("under each of ")[1].split(", ")
        y, p = np.array(block["label"]), np.array(block["p_pneumonia"])
        n = len(y) // len(names)
        k = names.index(condition)
        y, p = y[k * n:(k + 1) * n], p[k * n:(k + 1) * n]
    p = np.clip(p, 1e-6, 1 - 1e-6)  # the card's p is Platt-calibrated: its logit is linear in the network's
    return y, np.log(p / (1 - p))


def simulate(y: np.ndarray, z: np.ndarray, rules: list[str], repeats: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    by_class = [np.nonzero(y == c)[0] for c in (0, 1)]
    take = [min(COMPOSITION[c], len(by_class[c])) for c in (0, 1)]
    results = {rule: [] for rule in rules}
    for _ in range(repeats):
        pool = np.concatenate([rng.choice(by_class[c], take[c], replace=False) for c in (0, 1)])
        pool = rng.permutation(pool)
        fit, held = pool[:FIT], pool[FIT:]
        scale, bias = C.fit_platt(z[fit], y[fit])
        p_fit, p_held = C.apply(z[fit], scale, bias), C.apply(z[held], scale, bias)
        for rule in rules:
            try:
                t = M.choose_threshold(y[fit], p_fit, rule)
            except M.TooFewCases:
                results[rule].append(None)
                continue
            at = M.metrics_at(y[held], p_held, t)
            results[rule].append((at["sensitivity"], at["specificity"], M.expected_calibration_error(y[held], p_held)))
    summary = {"n": int(len(y)), "drawn": {"NORMAL": take[0], "PNEUMONIA": take[1]}, "repeats": repeats}
    for rule, rows in results.items():
        ok = np.array([r for r in rows if r is not None])
        floor = float(rule.split(">=")[1]) if ">=" in rule else 0.95
        summary[rule] = {"refused": sum(r is None for r in rows),
                         "P(sens>=floor)": float(np.mean(ok[:, 0] >= floor - 1e-12)),
                         "sens mean": float(ok[:, 0].mean()), "sens 5th pct": float(np.percentile(ok[:, 0], 5)),
                         "spec mean": float(ok[:, 1].mean()), "P(spec>=0.93)": float(np.mean(ok[:, 1] >= 0.93)),
                         "ECE mean": float(ok[:, 2].mean())}
    return summary


def main() -> None:
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("registry")
    parser.add_argument("version")
    parser.add_argument("--condition", default="clean")
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--rules", default="sensitivity>=0.95,lcb-sensitivity>=0.95")
    parser.add_argument("--logit-noise", type=float, default=0.0,
                        help="Gaussian noise (sd, log-odds) added once to every film's logit: a site where the "
                             "model separates the classes less well (the hidden split's AUC is about 0.985)")
    args = parser.parse_args()
    y, z = predictions(args.registry, args.version, args.condition)
    if args.logit_noise:
        z = z + np.random.default_rng(1).normal(0, args.logit_noise, len(z))
        print(f"logit noise sd {args.logit_noise}: AUC {M.roc_auc(y, z):.4f}")
    summary = simulate(y, z, args.rules.split(","), args.repeats)
    print(f"{args.version} {args.condition}: {summary['n']} predictions, each repeat draws "
          f"{summary['drawn']['NORMAL']} normal + {summary['drawn']['PNEUMONIA']} pneumonia, fits on {FIT}, "
          f"scores the rest; {args.repeats} repeats")
    for rule in args.rules.split(","):
        r = summary[rule]
        print(f"  {rule:24s} sens>=floor in {r['P(sens>=floor)']:.1%} (mean {r['sens mean']:.3f}, 5th pct "
              f"{r['sens 5th pct']:.3f}); spec mean {r['spec mean']:.3f} (>=0.93 in {r['P(spec>=0.93)']:.1%}); "
              f"ECE {r['ECE mean']:.3f}; refused {r['refused']}")


if __name__ == "__main__":
    main()
