"""Command line: ``python -m xray {predict,evaluate,train,jobs,bench,fit-ood,versions,activate,rollback}``."""
from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np

from .atomic import atomic_write_json
from .data import IMAGE_EXTENSIONS, scan_dataset
from .registry import LoadedModel, ModelFileError, Registry

if TYPE_CHECKING:  # for annotations only; predict imports it when a command scores images
    from .inference import ModelInput, Prediction

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


def shard_of(key: str, count: int) -> int:
    """Which of ``count`` shards a file belongs to, from a hash of its path relative to the folder
    given: every machine agrees whatever the mount point, and new files never move the others."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % count


def iter_shard(paths: list[str], shard: tuple[int, int] = (0, 1)) -> Iterator[Path]:
    """``iter_image_paths``, keeping only shard ``index`` of ``count`` (lazily: nothing is listed ahead)."""
    index, count = shard
    for raw in paths:
        root = Path(raw)
        for path in iter_image_paths([raw]):
            key = path.relative_to(root).as_posix() if path != root else root.as_posix()
            if count == 1 or shard_of(key, count) == index:
                yield path


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n."""
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shard {text!r}: expected i/n, e.g. 0/4") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"shard {text!r}: need 0 <= i < n")
    return index, count


def done_paths(csv_path: Path) -> set[str]:
    """Paths already in a predict CSV (for --resume); a last line torn by a crash is cut off first."""
    with open(csv_path, "r+b") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)  # that file is scored again
    rows = list(csv.reader(open(csv_path, newline="")))
    if rows and rows[0] != CSV_HEADER:
        raise ValueError(f"{csv_path} is not a predict CSV with columns {','.join(CSV_HEADER)}; cannot resume it")
    return {row[0] for row in rows[1:] if len(row) == len(CSV_HEADER)}


def _progress(total: int | None, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, file=sys.stderr, disable=not sys.stderr.isatty(), unit="img")


def _load_model(args) -> LoadedModel:
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


def _prepare_chunk(paths: list[Path], image_size: int) -> list[tuple["ModelInput | None", str]]:
    """In a worker process: decode and squash each file; (ModelInput or None, error) per path."""
    from .inference import try_read_model_input

    return [try_read_model_input(path, image_size) for path in paths]


def pipeline_split(workers: int = 0) -> tuple[int, int]:
    """(network threads, decoding processes) for ``score_paths`` on this machine's cores."""
    import torch

    cores = os.cpu_count() or 1
    threads = max(1, min(torch.get_num_threads(), cores // 2))
    return threads, workers or max(1, cores - threads + 1)


def score_paths(model, paths: Iterable[Path], threshold: float | None, batch_size: int = 32,
                workers: int = 0, chunk: int = 16) -> Iterator[tuple[Path, Prediction | None, str]]:
    """Yield (path, Prediction or None, error) for each file, in the files' order (unreadable ones
    included). Worker processes decode ``chunk`` files at a time and hand back only the small model
    inputs, while this process runs the network; never more than ``(2 * workers + 2) * chunk`` files
    are in flight, so memory stays flat over any number of files.

    The cores are shared: the network gets half of them (its OpenMP threads would otherwise spin on
    cores the decoders need), the decoders the rest plus one. On 2 cores that is 1 thread + 2 workers:
    987 images/s vs 568 with 2 threads + 2 workers (docs/scaling.md)."""
    from collections import deque
    from concurrent.futures.process import BrokenProcessPool

    import torch

    from .inference import predict

    threads = torch.get_num_threads()
    net_threads, workers = pipeline_split(workers)
    if model.device.type == "cpu":
        torch.set_num_threads(net_threads)
    source, pending, batch = iter(paths), deque(), []
    pool = _decoding_pool(workers)

    def flush():
        predictions = predict(model, [prepared for _, prepared in batch], threshold, batch_size)
        done = [(path, prediction, "") for (path, _), prediction in zip(batch, predictions)]
        batch.clear()
        return done

    try:
        while True:
            while len(pending) < 2 * workers + 2:
                paths_chunk = list(itertools.islice(source, chunk))
                if not paths_chunk:
                    break
                pending.append((paths_chunk, pool.submit(_prepare_chunk, paths_chunk, model.image_size)))
            if not pending:
                break
            paths_chunk, future = pending.popleft()
            try:
                results = future.result()
            except BrokenProcessPool:  # a worker died (a decoder crashed on some file): lose only that file
                pool.shutdown(wait=True, cancel_futures=True)
                results = _isolated(paths_chunk, model.image_size)
                pool = _decoding_pool(workers)
                pending = deque((c, pool.submit(_prepare_chunk, c, model.image_size)) for c, _ in pending)
            for path, (prepared, error) in zip(paths_chunk, results):
                if prepared is None:
                    yield from flush()  # an unreadable file comes out in its place
                    yield path, None, error
                    continue
                batch.append((path, prepared))
                if len(batch) == batch_size:
                    yield from flush()
            if not pending and batch:
                yield from flush()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)


def _decoding_pool(workers: int):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # fork: workers start in milliseconds and only run Pillow and NumPy (no torch threads)
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    return ProcessPoolExecutor(workers, mp_context=context)


def _isolated(paths: list[Path], image_size: int) -> list[tuple["ModelInput | None", str]]:
    """Each file in a process of its own, after a worker died: which file kills the decoder?"""
    from concurrent.futures.process import BrokenProcessPool

    out = []
    for path in paths:
        pool = _decoding_pool(1)
        try:
            out.extend(pool.submit(_prepare_chunk, [path], image_size).result())
        except BrokenProcessPool:
            out.append((None, "the image decoder crashed on this file (damaged or hostile data)"))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return out


def cmd_predict(args) -> int:
    if args.resume and not args.csv:
        raise SystemExit("error: --resume needs --csv (the file to continue)")
    done: set[str] = set()
    if args.resume and args.csv and Path(args.csv).is_file() and Path(args.csv).stat().st_size:
        try:
            done = done_paths(Path(args.csv))
        except (OSError, ValueError) as exc:
            raise SystemExit(f"error: {exc}")
    model = _load_model(args)
    try:
        out = open(args.csv, "a" if done else "w", newline="") if args.csv else sys.stdout
    except OSError as exc:
        raise SystemExit(f"error: cannot write {args.csv}: {exc.strerror or exc}")
    writer = csv.writer(out)
    if not done:
        writer.writerow(CSV_HEADER)
    paths = (p for p in iter_shard(args.paths, args.shard) if str(p) not in done)
    failures = not_xray = 0
    with _progress(None, "predict") as bar:
        for path, prediction, error in score_paths(model, paths, args.threshold, args.batch_size, args.workers):
            error = " ".join(error.split())  # one line, whatever the decoder said
            if prediction is None:
                failures += 1
                writer.writerow([str(path), "", "", f"{args.threshold if args.threshold is not None else model.threshold:.6f}", error])
            elif prediction.ood:  # no verdict, but the score stays visible (docs/ood.md)
                not_xray += 1
                writer.writerow([str(path), f"{prediction.p_pneumonia:.6f}", "", f"{prediction.threshold:.6f}",
                                 "not a chest X-ray: " + " ".join(prediction.ood_reason.split())])
            else:
                writer.writerow([str(path), f"{prediction.p_pneumonia:.6f}", prediction.label,
                                 f"{prediction.threshold:.6f}", ""])
            out.flush()  # a crash loses at most the row being written; --resume continues after it
            bar.update(1)
    if args.csv:
        out.close()
    if failures:
        print(f"{failures} file(s) could not be scored; see the error column", file=sys.stderr)
    if not_xray:
        print(f"{not_xray} file(s) do not look like chest X-rays: no label given; see the error column", file=sys.stderr)
    return 0


def cmd_fit_ood(args) -> int:
    from .ood import fit_for_version

    registry = Registry(args.registry or None)
    try:
        version = fit_for_version(registry, args.model or None, args.data_dir, workers=args.workers,
                                  percentile=args.percentile, activate=args.activate)
    except (ModelFileError, ValueError) as exc:
        raise SystemExit(f"error: {exc}")
    card = registry.card(version)["ood"]
    print(f"new version {version}: same weights plus OOD statistics (limit {card['threshold']:.2f}, "
          f"{card['val_flagged']:.1%} of validation X-rays flagged)"
          + (" - activated" if args.activate else f"; activate with: python -m xray activate {version}"),
          file=sys.stderr)
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
    if not labels:
        raise ValueError(f"no image under {scan.root} could be read ({len(errors)} unreadable)")
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
    rank = int(os.environ.get("RANK", 0))  # under torchrun, rank 0 alone reports and writes events
    callbacks = [ConsolePrinter(), EventLog(events)] if rank == 0 else []
    # other ranks never raise from the signal handler: they stop with rank 0 at an agreed step
    stop = {"asked": False, "training": rank != 0}

    def on_sigterm(signum, frame):  # `python -m xray jobs --cancel` and the Retrain page send SIGTERM
        stop["asked"] = True
        if not stop["training"]:
            raise Cancelled()  # still scanning or decoding: nothing to finish, stop at once

    def note_training(event: dict) -> None:
        stop["training"] = stop["training"] or event["event"] == "data"

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        main(cfg, callbacks + [note_training], should_stop=lambda: stop["asked"])
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
    except Exception as exc:  # record why in the event file too; the traceback still goes to stderr
        for cb in callbacks[1:]:
            cb({"event": "error", "message": f"{type(exc).__name__}: {exc}", "time": time.time()})
        raise
    return 0


def cmd_jobs(args) -> int:
    from .jobs import cancel_job, current_job, describe, list_jobs

    root = Registry(args.registry or None).root
    if args.cancel:
        if not cancel_job(root):
            print("no training job is running", file=sys.stderr)
            return 1
        print("asked the running training job to stop", file=sys.stderr)
        return 0
    jobs = list_jobs(root) if args.all else [j for j in [current_job(root)] if j]
    if not jobs:
        print(f"no training jobs recorded in {root}", file=sys.stderr)
    for job in jobs:
        print(describe(job))
    return 0


def cmd_bench(args) -> int:
    from .bench import main as bench_main

    return bench_main(args)


def cmd_versions(args) -> int:
    registry = Registry(args.registry or None)
    active = registry.active_version()
    for version in registry.versions():
        try:
            card = registry.card(version)
        except ModelFileError as exc:  # list it, say why, and go on with the others
            print(f"{'*' if version == active else ' '} {version}  unusable: {exc}")
            continue
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
    from .bench import add_arguments as bench_arguments
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
    p.add_argument("--shard", type=parse_shard, default=(0, 1), metavar="I/N",
                   help="score only part I of N (0-based) of the files, split by a hash of each file's path "
                        "relative to its folder argument: N machines with I = 0..N-1 cover every file once")
    p.add_argument("--resume", action="store_true",
                   help="with --csv: skip files already in that CSV and append the rest (same path arguments)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--workers", type=int, default=0, help="decoding processes (default: one per CPU core)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", help="metrics on a labelled folder")
    p.add_argument("data_dir")
    model_options(p)
    p.add_argument("--json", default="", help="also write the metrics as JSON here")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("train", help="train a new (inactive) model version")
    add_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("jobs", help="the current (or last) background training job, as the Retrain page sees it")
    p.add_argument("--registry", default="")
    p.add_argument("--all", action="store_true", help="every recorded job, newest first")
    p.add_argument("--cancel", action="store_true", help="stop the running job")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("fit-ood", help="add OOD statistics to a version (saved as a new version)")
    p.add_argument("data_dir", help="the folder the model was trained on (its validation split is reproduced)")
    p.add_argument("--model", default="", help="model version id (default: the active one)")
    p.add_argument("--registry", default="", help="registry folder (default weights/ or $XRAY_WEIGHTS)")
    p.add_argument("--percentile", type=float, default=99.5,
                   help="flag images beyond this percentile of validation distances (default 99.5)")
    p.add_argument("--workers", type=int, default=1, help="image decoding processes (default 1)")
    p.add_argument("--activate", action="store_true", help="activate the new version")
    p.set_defaults(func=cmd_fit_ood)

    p = sub.add_parser("bench", help="training and inference speed, against a reference network and the machine")
    bench_arguments(p)
    p.set_defaults(func=cmd_bench)

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
