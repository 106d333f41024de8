"""Add the borderline band (xray/borderline.py) to an existing version's card, from its own validation
split: a release step for versions trained before the band existed (training now fits it itself).

Usage: XRAY_WEIGHTS=weights python scripts/fit_borderline.py DATA_DIR VERSION
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from xray.model.registry import Registry  # noqa: E402
from xray.io.folders import load_training_data  # noqa: E402
from xray.train.loop import fit_borderline  # noqa: E402
from xray.train.config import TrainConfig  # noqa: E402


def main(data_dir: str, version: str) -> int:
    registry = Registry()
    model = registry.load(version, torch.device("cpu"))
    cfg = TrainConfig.from_dict({**model.card.training.config, "data_dir": data_dir})
    data = load_training_data(cfg.data_dir, **cfg.folder_options())
    if data.scan.fingerprint() != model.card.data.fingerprint:
        raise SystemExit("error: this folder is not the data the version was trained on")
    scale, bias = model.calibration
    band = fit_borderline(model.net, torch.from_numpy(data.images[data.val]), scale, bias, model.device,
                          model.card.tta)
    registry.update_card(version, {"borderline": band})
    print(json.dumps(band, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:3]))
