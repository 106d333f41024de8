"""Command line: ``python -m xray {predict,evaluate,train,versions,activate,rollback}``."""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from .atomic import atomic_write_json
from .data import IMAGE_EXTENSIONS, scan_dataset
from .registry import ModelFileError, Registry

CSV_HEADER = ["path", "p_pneumonia", "label", "threshold", "error"]


def iter_image_paths(paths: list[str]) -> Iterator[Path]:
    """Files as given, and image files found recursively under folders, in a stable order."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames.sort()
                for name in sorted(filenames):
                    if Path(name).suffix.lower() in IMAGE_EXTENSIONS and not name.startswith("."):
                        yield Path(dirpath) / name
        else:
            yield path


def _progress(total: int | None, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, file=sys.stderr, disable=not sys.stderr.isatty(), unit="img")


def _load_model(args) -> "LoadedModel":  # noqa: F821
    registry = Registry(args.registry or None)
    try:
        if args.model:
            return registry.load(args.model)
        model, problems = registry.load_with_fallback()
        for problem in problems:
            print(f"warning: {problem}; using model {model.version}", file=sys.stderr)
        return model
    except (ModelFileError, ValueError) as exc:
        raise SystemExit(f"error: {exc}")


def score_paths(model, paths: Iterator[Path], threshold: float | None, batch_size: int = 32):
    """Yield (path, Prediction or None, error) for each file, decoding in bounded batches."""
    from .imageio import load_image
    from .inference import predict

    def flush(batch):
        predictions = predict(model, [image for _, image in batch], threshold)
        for (path, _), prediction in zip(batch, predictions):
            yield path, prediction, ""

    batch = []
    for path in paths:
        try:
            batch.append((path, load_image(path)))
        except ValueError as exc:
            yield path, None, str(exc)
            continue
        if len(batch) == batch_size:
            yield from flush(batch)
            batch = []
    if batch:
        yield from flush(batch)


def cmd_predict(args) -> int:
    model = _load_model(args)
    out = open(args.csv, "w", newline="") if args.csv else sys.stdout
    writer = csv.writer(out)
    writer.writerow(CSV_HEADER)
    failures = 0
    with _progress(None, "predict") as bar:
        for path, prediction, error in score_paths(model, iter_image_paths(args.paths), args.threshold):
            error = " ".join(error.split())  # one line, whatever the decoder said
            if prediction is None:
                failures += 1
                writer.writerow([str(path), "", "", f"{args.threshold if args.threshold is not None else model.threshold:.6f}", error])
            else:
                writer.writerow([str(path), f"{prediction.p_pneumonia:.6f}", prediction.label,
                                 f"{prediction.threshold:.6f}", ""])
            bar.update(1)
    if args.csv:
        out.close()
    if failures:
        print(f"{failures} file(s) could not be scored; see the error column", file=sys.stderr)
    return 0


def evaluate_folder(model, data_dir: str, threshold: float | None) -> dict:
    """Metrics of ``model`` on a labelled folder (every part of it)."""
    from . import metrics as M

    scan = scan_dataset(data_dir)
    labels, scores, errors = [], [], []
    by_path = {s.path: s.label for s in scan.samples}
    for path, prediction, error in score_paths(model, iter(by_path), threshold):
        if prediction is None:
            errors.append([scan.relative(path), error])
        else:
            labels.append(by_path[path])
            scores.append(prediction.p_pneumonia)
    threshold = model.threshold if threshold is None else threshold
    result = M.metrics_at(np.array(labels), np.array(scores), threshold)
    result.update({"ece": M.expected_calibration_error(labels, scores), "model_version": model.version,
                   "data_dir": str(scan.root), "unreadable": errors})
    return result


def cmd_evaluate(args) -> int:
    model = _load_model(args)
    try:
        result = evaluate_folder(model, args.data_dir, args.threshold)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}")
    text = json.dumps(result, indent=2)
    if args.json:
        atomic_write_json(args.json, result)
    print(text)
    return 0


class EventLog:
    """Appends each training event as one JSON line (the Retrain page's source of truth)."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, event: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(event, default=str) + "\n")


class ConsolePrinter:
    """Human progress on stderr: a bar per epoch on a terminal, one line per epoch always."""

    def __init__(self):
        self.bar = None

    def __call__(self, e: dict) -> None:
        kind = e["event"]
        if kind == "scan":
            print(f"data: {e['root']}  ({e['n']} images, {e['patients']} patients)", file=sys.stderr)
            for part, row in e["counts"].items():
                print(f"  {part:>6}: " + ", ".join(f"{k} {v}" for k, v in row.items()), file=sys.stderr)
            print(f"  duplicates (identical files): {len(e['duplicates'])} group(s)", file=sys.stderr)
            for group in e["duplicates"][:10]:
                print("    " + " = ".join(group), file=sys.stderr)
            for rel, why in e["skipped"]:
                print(f"  skipped {rel}: {why}", file=sys.stderr)
        elif kind == "unreadable":
            print(f"  unreadable, skipped: {len(e['files'])}", file=sys.stderr)
            for rel, why in e["files"]:
                print(f"    {rel}: {why}", file=sys.stderr)
        elif kind == "data":
            print(f"train {e['train']} / validation {e['val']} ({e['validation']}) / test {e['test']}", file=sys.stderr)
        elif kind == "step":
            if self.bar is None:
                self.bar = _progress(e["steps"], f"epoch {e['epoch']}")
            self.bar.n = e["step"]
            self.bar.set_postfix(loss=f"{e['loss']:.3f}")
            self.bar.refresh()
            if e["step"] == e["steps"]:
                self.bar.close()
                self.bar = None
        elif kind == "epoch":
            print(f"epoch {e['epoch']:3d}/{e['epochs']}  train loss {e['train_loss']:.4f}  val loss {e['val_loss']:.4f}  "
                  f"val AUC {e['val_auc']:.4f}  val acc {e['val_accuracy']:.4f}  {e['seconds']:.1f}s  "
                  f"ETA {e['eta_s'] / 60:.1f} min", file=sys.stderr)
        elif kind in ("early_stop", "time_limit"):
            print(f"stopping: {kind.replace('_', ' ')} at epoch {e['epoch']}", file=sys.stderr)
        elif kind == "done":
            m = e["val_metrics"]
            print(f"new version {e['version']} (threshold {e['threshold']:.4f}; validation AUC {m['roc_auc']:.4f}, "
                  f"sensitivity {m['sensitivity']:.3f}, specificity {m['specificity']:.3f})"
                  + (" - activated" if e["activated"] else " - not active; activate with: python -m xray activate "
                     + e["version"]), file=sys.stderr)


def cmd_train(args) -> int:
    from .train import Cancelled, config_from_args, main

    cfg = config_from_args(args)
    registry = Registry(cfg.registry or None)
    if not cfg.run_dir:
        cfg.run_dir = str(registry.root / "runs" / time.strftime("%Y%m%d-%H%M%S"))
    events = Path(args.events) if args.events else Path(cfg.run_dir) / "events.jsonl"
    callbacks = [ConsolePrinter(), EventLog(events)]
    try:
        main(cfg, callbacks)
    except Cancelled:
        for cb in callbacks[1:]:
            cb({"event": "cancelled", "time": time.time()})
        print("training cancelled; no version written", file=sys.stderr)
        return 3
    except ValueError as exc:
        for cb in callbacks[1:]:
            cb({"event": "error", "message": str(exc), "time": time.time()})
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_versions(args) -> int:
    registry = Registry(args.registry or None)
    active = registry.active_version()
    for version in registry.versions():
        card = registry.card(version)
        v = card.get("validation", {})
        print(f"{'*' if version == active else ' '} {version}  AUC {v.get('roc_auc', float('nan')):.4f}  "
              f"threshold {card.get('threshold', float('nan')):.4f}  {card.get('created', '')}")
    return 0


def cmd_activate(args) -> int:
    try:
        Registry(args.registry or None).activate(args.version)
    except (ModelFileError, ValueError) as exc:
        raise SystemExit(f"error: {exc}")
    print(f"active model: {args.version}", file=sys.stderr)
    return 0


def cmd_rollback(args) -> int:
    try:
        version = Registry(args.registry or None).rollback()
    except (ModelFileError, ValueError) as exc:
        raise SystemExit(f"error: {exc}")
    print(f"active model: {version}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .train import add_arguments

    parser = argparse.ArgumentParser(prog="python -m xray", description="Pneumonia chest X-ray assistant engine")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_options(p):
        p.add_argument("--model", default="", help="model version id (default: the active one)")
        p.add_argument("--registry", default="", help="registry folder (default weights/ or $XRAY_WEIGHTS)")
        p.add_argument("--threshold", type=float, default=None, help="operating threshold (default: the model's own)")

    p = sub.add_parser("predict", help="score image files and folders; CSV out")
    p.add_argument("paths", nargs="+", help="image files and/or folders (searched recursively)")
    model_options(p)
    p.add_argument("--csv", default="", help="write CSV here instead of stdout")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", help="metrics on a labelled folder")
    p.add_argument("data_dir")
    model_options(p)
    p.add_argument("--json", default="", help="also write the metrics as JSON here")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("train", help="train a new (inactive) model version")
    add_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("versions", help="list model versions (* = active)")
    p.add_argument("--registry", default="")
    p.set_defaults(func=cmd_versions)

    p = sub.add_parser("activate", help="make a version the active model")
    p.add_argument("version")
    p.add_argument("--registry", default="")
    p.set_defaults(func=cmd_activate)

    p = sub.add_parser("rollback", help="re-activate the previously active version")
    p.add_argument("--registry", default="")
    p.set_defaults(func=cmd_rollback)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
