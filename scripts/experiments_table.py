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
            f"{s.get('accuracy', float('nan')):.3f} ({s.get('sensitivity', float('nan')):.2f} / {s.get('specificity', float('nan')):.2f}) |")


if __name__ == "__main__":
    registry = Path(sys.argv[1])
    tags = sys.argv[2:] or sorted(p.stem for p in (registry / "results").glob("*.json"))
    print("| run | options | params | train time | val AUC | val sens / spec | val ECE | spec IM- / NORMAL2- | worst perturbed AUC | mean flip rate | 16 full-res samples acc (sens / spec) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for tag in tags:
        print(row(registry, tag))
