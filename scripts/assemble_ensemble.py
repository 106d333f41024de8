"""Assemble trained versions (same architecture, same validation split, different init seeds) into one
deep-ensemble version, calibrated, thresholded and with its band and OOD statistics fitted exactly as
``python -m xray train --members K`` does. For experiments: members trained separately can be combined
without retraining. The shipped recipe is the one ``train`` command, which trains the members itself.

Usage: python scripts/assemble_ensemble.py DATA_DIR --registry REG V1 V2 [V3 ...] [--tag TAG]
A version may be given as VERSION@A-B: members A to B (1-based, inclusive) of an ensemble version, e.g.
the first three members of a five-member version, to measure a smaller recipe without retraining.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from xray.model.registry import Registry  # noqa: E402
from xray.io.folders import load_training_data  # noqa: E402
from xray.train.loop import assemble_ensemble, register  # noqa: E402
from xray.train.config import TrainConfig  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("data_dir")
    parser.add_argument("versions", nargs="+")
    parser.add_argument("--registry", required=True)
    parser.add_argument("--tag", default="ens")
    args = parser.parse_args()
    registry = Registry(args.registry)
    models, nets, best_epochs, history, seconds = [], [], [], [], 0.0
    for spec in args.versions:
        version, _, span = spec.partition("@")
        model = registry.load(version, torch.device("cpu"))
        members = list(model.net.members) if hasattr(model.net, "members") else [model.net]
        epochs = model.card.training.best_epoch
        epochs = list(epochs) if isinstance(epochs, (list, tuple)) else [epochs]
        first, last = (int(x) for x in span.split("-")) if span else (1, len(members))
        if not 1 <= first <= last <= len(members):
            raise SystemExit(f"error: {spec}: {version} has members 1-{len(members)}")
        models.append(model)
        nets += members[first - 1:last]
        best_epochs += epochs[first - 1:last]
        seconds += (model.card.training.seconds or 0) * (last - first + 1) / len(members)
        runs: list[list] = []  # the history, one list per member (each member's epochs start again at 1)
        for row in model.card.training.history:
            if row.get("epoch") == 1 or not runs:
                runs.append([])
            runs[-1].append(row)
        history += [row for run in (runs[first - 1:last] if len(runs) == len(members) else runs) for row in run]
    configs = {(m.card.training.config.get("seed"), m.card.training.config.get("val_fraction")) for m in models}
    if len(configs) != 1 or len({m.card.data.fingerprint for m in models}) != 1:
        raise SystemExit("error: the members must share the data, the split seed and the validation fraction")
    cfg = TrainConfig.from_dict({**models[0].card.training.config, "data_dir": args.data_dir})
    cfg = replace(cfg, members=len(nets), init_seed=-1, tag=args.tag, registry=args.registry, activate=False)
    data = load_training_data(cfg.data_dir, **cfg.folder_options())
    ensemble = assemble_ensemble(nets)
    started = time.time()
    version = register(ensemble, cfg, data, best_epochs, history, seconds, registry, None, torch.device("cpu"),
                       lambda e: None)
    print(version, f"(assembled in {time.time() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
