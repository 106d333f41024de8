"""Leave-one-source-out measurement of the intended-use guard's image checks (issue 23).

The guard's home-vs-outside networks (``xray.model.outside_net``) are trained on the training X-rays against
ONE outside hospital's films and measured on the OTHER: fit on Hannover -> measure on NIH, fit on NIH ->
measure on Hannover; the combined limit (distance + networks' score) is set on the validation split as
``fit-ood`` does (``ood.fit_net_limit``). The previous design (distance + 4x4 logistic regression,
20261202-081004-ood) is measured the same way beside it.
Each fold reports the held-out source's withheld share per group (adults, children of other hospitals,
NIH children under 6, PA/AP) and the share withheld with a true reason ("outside intended use"), beside
the home figures: the version's validation split (reproduced from its card, as scripts/measure_guard.py
does) and the 16 full-resolution samples. The distance-only check of the version (no outside films) is
reported on the same images as the baseline. Every film goes through ``load_image`` and the model input
that ``predict`` uses; outcomes come from ``inference.guard_outcome``.

Usage (decoding about 1 minute, then about 7 minutes per fold to train the networks, on 2 shared cores;
decoded features and each fold's network scores are cached beside --cache):
    python scripts/guard_loso.py ../shared/data/chest_xray/train [--registry weights] [--model V]
        [--hannover DIR] [--nih DIR] [--samples DIR] [--cache /tmp/guard-loso.npz] [--json OUT]
        [--record V] [--net-members K] [--net-epochs E]
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from xray.io.folders import SPLITS, scan_dataset  # noqa: E402
from xray.io.preprocess import ModelInput, try_read_model_input  # noqa: E402
from xray.model import ood as O  # noqa: E402
from xray.model.net import to_input  # noqa: E402
from xray.model.outside_net import OutsideNetConfig, fit_outside_net  # noqa: E402
from xray.model.registry import Registry  # noqa: E402
from xray.serve import guard  # noqa: E402
from xray.serve.inference import guard_outcome  # noqa: E402
from xray.train.config import TrainConfig  # noqa: E402


def films(args, card) -> list[dict]:
    """Every film of the protocol: path, source, split/group, age (-1 unknown), view."""
    scan = scan_dataset(args.data_dir)
    if scan.fingerprint() != card.data.fingerprint:
        raise SystemExit("DATA_DIR differs from the model's training data")
    cfg = TrainConfig.from_dict({**card.training.config, "data_dir": args.data_dir})
    train, val = SPLITS[cfg.split](scan.samples, cfg.val_fraction, cfg.seed)
    out = [{"path": str(scan.samples[i].path), "source": "home", "group": part, "age": -1, "view": "AP"}
           for part, indices in (("train", train), ("validation", val)) for i in indices]
    out += [{"path": str(p), "source": "samples", "group": "samples", "age": -1, "view": "AP"}
            for p in sorted(Path(args.samples).rglob("*.jp*g"))]
    for row in csv.DictReader(open(Path(args.hannover) / "images.csv")):
        out.append({"path": str(Path(args.hannover) / row["file"]), "source": "hannover", "group": "adult",
                    "age": 99, "view": row["projection"].upper()})
    for row in csv.DictReader(open(Path(args.nih) / "images.csv")):
        age = int(row["age"])
        out.append({"path": str(Path(args.nih) / row["file"]), "source": "nih",
                    "group": "adult" if age >= 18 else "child", "age": age, "view": row["view"].upper()})
    return out


@torch.no_grad()
def extract(model, rows: list[dict], stats: O.OodStats) -> dict:
    """Decode every film once; the model inputs and both grids of the last stage (one pass)."""
    inputs, shapes, colour, ok = [], [], [], []
    for row in rows:
        prepared, why = try_read_model_input(row["path"], model.image_size)
        ok.append(prepared is not None)
        prepared = prepared or ModelInput(np.zeros((model.image_size,) * 2, np.uint8), (1, 1))
        inputs.append(prepared.pixels), shapes.append(prepared.shape), colour.append(prepared.colourfulness)
    inputs = np.stack(inputs)
    net = model.inference_net
    grid, outside = [], []
    for start in range(0, len(inputs), 128):
        x = to_input(torch.from_numpy(inputs[start:start + 128]).unsqueeze(1), model.device, net.config)
        feature_map = net.feature_map(x)
        grid.append(O.grid_features(feature_map, stats.grid).double().numpy())
        outside.append(O.grid_features(feature_map, O.OUTSIDE_GRID).double().numpy())
    return {"inputs": inputs, "shapes": np.array(shapes), "colour": np.array(colour), "ok": np.array(ok),
            "grid": np.concatenate(grid), "outside": np.concatenate(outside)}


def outcomes(stats: O.OodStats, data: dict, spec: dict, net: np.ndarray | None = None) -> list[tuple[str, str]]:
    """The guard's (outcome, reason) per film, from ``inference.guard_outcome`` (no DICOM header here);
    ``net``: every film's ``OutsideEnsemble.score`` when the statistics use the networks."""
    distances = stats.distances(data["grid"])
    turned = stats.upside_down_scores(data["grid"])
    combined = (stats.combined_scores(distances, stats.outside_scores(data["outside"]), net)
                if stats.combined is not None else [None] * len(distances))
    return [guard_outcome(ModelInput(px, tuple(shape), float(col)), d, stats, u, spec, c)
            for px, shape, col, d, u, c in zip(data["inputs"], data["shapes"], data["colour"], distances, turned,
                                               combined)]


def share(rows: list[dict], results: list[tuple[str, str]], keep) -> dict:
    picked = [r for row, r in zip(rows, results) if keep(row)]
    withheld = [r for r in picked if r[0] != guard.VERDICT]
    true_reason = sum(r[0] == guard.OUTSIDE_INTENDED_USE for r in withheld)
    return {"n": len(picked), "withheld": len(withheld),
            "withheld_pct": round(100 * len(withheld) / len(picked), 1) if picked else None,
            "outside_intended_use_pct_of_withheld": round(100 * true_reason / len(withheld), 1) if withheld else None}


def table(rows, results, held_out: str) -> dict:
    src = lambda s: (lambda r: r["source"] == s)  # noqa: E731
    return {
        "home validation": share(rows, results, lambda r: r["group"] == "validation"),
        "full-resolution samples": share(rows, results, src("samples")),
        f"{held_out}: all": share(rows, results, src(held_out)),
        f"{held_out}: adults": share(rows, results, lambda r: r["source"] == held_out and r["group"] == "adult"),
        f"{held_out}: children (under 18)": share(rows, results,
                                                  lambda r: r["source"] == held_out and r["group"] == "child"),
        f"{held_out}: children under 6": share(rows, results, lambda r: r["source"] == held_out and 0 <= r["age"] < 6),
        f"{held_out}: PA": share(rows, results, lambda r: r["source"] == held_out and r["view"] == "PA"),
        f"{held_out}: AP": share(rows, results, lambda r: r["source"] == held_out and r["view"] == "AP"),
    }


NAMES = {"hannover": "Hannover", "nih": "NIH"}


def config_key(config: OutsideNetConfig) -> str:
    """A short stable key of the networks' settings, for the score cache's file name."""
    return hashlib.sha256(json.dumps(dataclasses.asdict(config), sort_keys=True).encode()).hexdigest()[:12]


def record(registry: Registry, version: str, report: dict) -> None:
    """The folds' held-out figures and the home figures into ``version``'s card, for the pages."""
    folds = []
    for name, fold in report["folds"].items():
        fitted_on, held_out = name.removeprefix("fit on ").split(", measure on ")
        cell = fold[f"{held_out}: all"]
        folds.append({"fitted_on": NAMES[fitted_on], "measured_on": NAMES[held_out], "n": cell["n"],
                      "withheld": cell["withheld"],
                      "outside_intended_use_pct_of_withheld": cell["outside_intended_use_pct_of_withheld"]})
    first = next(iter(report["folds"].values()))
    home = {"validation": [first["home validation"]["withheld"], first["home validation"]["n"]],
            "samples": [first["full-resolution samples"]["withheld"], first["full-resolution samples"]["n"]]}
    ood = dict(registry.card(version).ood)
    ood["leave_one_source_out"] = {"command": "python scripts/guard_loso.py DATA_DIR", "measured_with": report["model"],
                                   "folds": folds, "home": home}
    registry.update_card(version, {"ood": ood})


def main() -> int:
    root = Path(__file__).resolve().parents[2] / "shared" / "data"
    parser = argparse.ArgumentParser()
    parser.add_argument("data_dir")
    parser.add_argument("--registry", default="weights")
    parser.add_argument("--model", default="")
    parser.add_argument("--hannover", default=str(root / "external-dev"))
    parser.add_argument("--nih", default=str(root / "external-dev-nih"))
    parser.add_argument("--samples", default=str(root / "samples"))
    parser.add_argument("--cache", default="/tmp/guard-loso.npz", help="decoded features (reused when present)")
    parser.add_argument("--json", default="")
    parser.add_argument("--net-members", type=int, default=OutsideNetConfig().members,
                        help=f"home-vs-outside networks per fold (default {OutsideNetConfig().members})")
    parser.add_argument("--net-epochs", type=int, default=OutsideNetConfig().epochs,
                        help=f"training passes of each (default {OutsideNetConfig().epochs})")
    parser.add_argument("--record", default="", metavar="VERSION",
                        help="write the folds' figures into this version's card (ood.leave_one_source_out), which the "
                             "pages show")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = Registry(args.registry).load(args.model or None, torch.device("cpu"))
    base = model.ood_stats
    if base is None:
        raise SystemExit("this version has no OOD statistics (python -m xray fit-ood)")
    base = dataclasses.replace(base, outside=None, combined=None, combined_threshold=float("inf"), n_outside=0,
                               net_scale=None)
    rows = films(args, model.card)
    cache = Path(args.cache)
    # same weights and films, same features
    key = f"{model.card.weights_sha256}:{base.grid}:{len(rows)}:{rows[0]['path']}:{rows[-1]['path']}"
    if cache.exists() and str(np.load(cache)["key"]) == key:
        data = dict(np.load(cache))
    else:
        data = extract(model, rows, base)
        np.savez(cache, key=key, **data)
    bad = [r["path"] for r, ok in zip(rows, data["ok"]) if not ok]
    if bad:
        raise SystemExit(f"unreadable films: {bad[:5]}")
    source = np.array([r["source"] for r in rows])
    train = np.array([r["group"] == "train" for r in rows])
    val = np.array([r["group"] == "validation" for r in rows])
    spec = model.card.intended_use_spec
    val_distances = base.distances(data["grid"][val])
    report = {"model": model.version, "protocol": "fit the home-vs-outside networks on one outside source, measure "
              "on the other; home limits from the version's validation split", "folds": {}}
    results = outcomes(base, data, spec)
    report["distance only (no outside films)"] = {
        **table(rows, results, "hannover"), **{k: v for k, v in table(rows, results, "nih").items() if "nih" in k}}
    report["distance + 4x4 logistic regression (20261202-081004-ood's design)"] = previous = {}
    config = dataclasses.replace(OutsideNetConfig(), members=args.net_members, epochs=args.net_epochs)
    report["outside_net"] = {**dataclasses.asdict(config), "widths": list(config.widths)}
    inputs = torch.from_numpy(data["inputs"])
    for fitted_on, held_out in (("hannover", "nih"), ("nih", "hannover")):
        fold = f"fit on {fitted_on}, measure on {held_out}"
        logistic = O.fit_outside(base, data["outside"][train], data["outside"][source == fitted_on],
                                 data["outside"][val], val_distances)
        previous[fold] = table(rows, outcomes(logistic, data, spec), held_out)
        # the networks of this fold, trained on the training films against the fitted source only
        scores_file = cache.with_name(f"{cache.stem}-net-{fitted_on}-{config_key(config)}.npy")
        if scores_file.exists() and np.load(scores_file).shape == (len(rows),):
            net = np.load(scores_file)
        else:
            print(f"training {config.members} networks on home vs {fitted_on} ...", file=sys.stderr, flush=True)
            ensemble = fit_outside_net(inputs[train], inputs[source == fitted_on], config)
            net = ensemble.score(inputs)
            np.save(scores_file, net)
        stats = O.fit_net_limit(base, val_distances, net[val], int((source == fitted_on).sum()))
        child = next((i for i, r in enumerate(rows) if r["source"] == "nih" and 0 <= r["age"] < 6), None)
        report["folds"][fold] = {
            "combined_threshold": round(stats.combined_threshold, 4),
            **table(rows, outcomes(stats, data, spec, net), held_out),
            **({"NIH child under 6: guard score, limit": [
                round(float(stats.combined_scores(base.distances(data["grid"][child:child + 1]), net=net[child:child + 1])[0]), 2),
                round(stats.combined_threshold, 2)]} if held_out == "nih" and child is not None else {})}
    if args.record:
        record(Registry(args.registry), args.record, report)
    text = json.dumps(report, indent=1)
    if args.json:
        Path(args.json).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
