"""Threshold rules compared on one version's stored calibration set (validation + its acquisition
perturbations, ``card.validation.calibration_set``): for each rule, the threshold it picks and the
sensitivity / specificity it gives on the clean validation images and under each perturbation.

Usage: python scripts/operating_points.py VERSION [--registry REG] [--rules 'sensitivity>=0.95' ...]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from xray.decide import metrics as M  # noqa: E402
from xray.io.augment import PERTURBATIONS  # noqa: E402
from xray.model.registry import Registry  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("version")
    parser.add_argument("--registry", default="")
    parser.add_argument("--rules", nargs="+", default=["sensitivity>=0.97", "sensitivity>=0.95", "min-sensitivity>=0.95",
                                                       "youden"])
    args = parser.parse_args()
    card = Registry(args.registry or None).card(args.version)
    fitted = card["validation"].get("calibration_set")
    if not fitted:
        raise SystemExit("error: this card has no calibration set (trained with --calibrate-on clean)")
    y, p = np.array(fitted["label"]), np.array(fitted["p_pneumonia"])
    n = len(y) // (1 + len(PERTURBATIONS))
    names = ["clean"] + list(PERTURBATIONS)
    print(f"{args.version}: card threshold {card['threshold']:.4f} ({card['threshold_rule']}); "
          f"{n} validation images x {len(names)} conditions")
    for rule in args.rules:
        t = M.choose_threshold(y, p, rule, np.repeat(np.arange(len(names)), n))
        cells = []
        for k, name in enumerate(names):
            m = M.metrics_at(y[k * n:(k + 1) * n], p[k * n:(k + 1) * n], t)
            cells.append(f"{name} {m['sensitivity']:.3f}/{m['specificity']:.3f}")
        pooled = M.metrics_at(y, p, t)
        print(f"  {rule:20s} threshold {t:.4f}  pooled sens/spec {pooled['sensitivity']:.3f}/{pooled['specificity']:.3f}")
        print("    " + "; ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
