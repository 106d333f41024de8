"""Print docs/experiments.md table rows from scripts/run_experiment.sh results.

Usage: python scripts/experiments_table.py REGISTRY [TAG ...]
"""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path


def row(registry: Path, tag: str) -> str:
    report = json.loads((registry / "results" / f"{tag}.json").read_text())
    card = json.loads((registry / "versions" / report["version"] / "card.json").read_text())
    v, s = report["validation"], report.get("fullres_samples", {})
    nb = report["normal_batches"]
    options, skip = [], False
    for token in card["training"]["argv"][3:]:  # after: xray/__main__.py train DATA_DIR
        if skip:
            skip = False
        elif token in ("--registry", "--run-dir", "--tag", "--threads"):
            skip = True  # where it was written and how many cores it had: not part of the recipe
        else:
            options.append(shlex.quote(token))
    options = " ".join(options) or "(defaults)"
    return (f"| {tag} | `{options}` | {card['architecture']['parameters']/1e6:.2f} M | "
            f"{card['training']['seconds']/60:.1f} min ({card['training']['epochs_run']} ep, best {card['training']['best_epoch']}) | "
            f"{v['roc_auc']:.4f} | {v['sensitivity']:.3f} / {v['specificity']:.3f} | {v['ece']:.3f} | "
            f"{nb.get('IM-', {}).get('specificity', float('nan')):.3f} / {nb.get('NORMAL2-', {}).get('specificity', float('nan')):.3f} | "
            f"{report['perturbation_worst_auc']:.4f} | {report['perturbation_mean_flip_rate']:.3f} | "
            f"{s.get('accuracy', float('nan')):.3f} ({s.get('sensitivity', float('nan')):.2f} / {s.get('specificity', float('nan')):.2f}) |"
            + _width_cells(report))


def _width_cells(report: dict) -> str:
    """The width check (absent from reports made before it): spec. (mean p of normals) with the anatomy
    at 0.8 of its width, sens. at 1.25, and the full-resolution normals framed 1.5 wide."""
    w, s = report.get("width"), report.get("fullres_samples", {})
    if not w:
        return " - | - | - |"
    narrow, wide = w["width x0.8"], w["width x1.25"]
    padded = s.get("p_normals_at_aspect_1.5")
    return (f" {narrow['specificity']:.3f} ({narrow['mean_p_normals']:.3f}) | {wide['sensitivity']:.3f} | "
            + (f"{s['specificity_at_aspect_1.5'] * len(padded):.0f}/{len(padded)} (mean p {sum(padded) / len(padded):.2f}) |"
               if padded else "- |"))


if __name__ == "__main__":
    registry = Path(sys.argv[1])
    tags = sys.argv[2:] or sorted(p.stem for p in (registry / "results").glob("*.json"))
    print("| run | options | params | train time | val AUC | val sens / spec | val ECE | spec IM- / NORMAL2- | worst perturbed AUC | mean flip rate | 16 full-res samples acc (sens / spec) | width x0.8 spec (mean p normals) | width x1.25 sens | full-res normals framed 1.5 wide: right (mean p) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for tag in tags:
        print(row(registry, tag))
