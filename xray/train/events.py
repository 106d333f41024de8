"""Training events: their names, the JSON-lines writer, and the reader. The training loop writes them;
the CLI's console printer, the job manager (``xray.jobs``) and the Retrain page read them.

Each event is one JSON object with ``event`` (a name below) and ``time`` (Unix seconds), written as
one line; a reader ignores a half-written last line.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from xray.io.folders import DECODE, SCAN, UNREADABLE  # noqa: F401 (reading the folder: xray.io.folders.load_training_data)

START = "start"  # config, pid, world_size
DATA = "data"  # train, val, test sizes; validation (how it was formed); pos_weight
RESUMED = "resumed"  # epoch
STEP = "step"  # epoch, step, steps, loss, lr, epoch_eta_s
EPOCH = "epoch"  # epoch, epochs, train_loss, val_loss, val_auc, val_accuracy, seconds, best_epoch, eta_s
EARLY_STOP = "early_stop"  # epoch, best_epoch
TIME_LIMIT = "time_limit"  # epoch
DONE = "done"  # version, threshold, activated, val_metrics
ERROR = "error"  # message
CANCELLED = "cancelled"
TERMINAL = (DONE, ERROR, CANCELLED)  # a run's last event is one of these
STOPPING = (EARLY_STOP, TIME_LIMIT)


def read_events(path: str | os.PathLike) -> list[dict]:
    """Every complete JSON line of an event file; a half-written last line is ignored."""
    events = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    events.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # the writer may be mid-line, or was killed there
    except FileNotFoundError:
        pass
    return events


def progress_bar(total: int | None, desc: str):
    """A tqdm bar on stderr, shown only on a terminal."""
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, file=sys.stderr, disable=not sys.stderr.isatty(), unit="img")


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
        if kind == SCAN:
            print(f"data: {e['root']}  ({e['n']} images, {e['patients']} patients)", file=sys.stderr)
            for part, row in e["counts"].items():
                print(f"  {part:>6}: " + ", ".join(f"{k} {v}" for k, v in row.items()), file=sys.stderr)
            print(f"  duplicates (identical files): {len(e['duplicates'])} group(s)", file=sys.stderr)
            for group in e["duplicates"][:10]:
                print("    " + " = ".join(group), file=sys.stderr)
            for rel, why in e["skipped"]:
                print(f"  skipped {rel}: {why}", file=sys.stderr)
        elif kind == UNREADABLE:
            print(f"  unreadable, skipped: {len(e['files'])}", file=sys.stderr)
            for rel, why in e["files"]:
                print(f"    {rel}: {why}", file=sys.stderr)
        elif kind == DATA:
            print(f"train {e['train']} / validation {e['val']} ({e['validation']}) / test {e['test']}", file=sys.stderr)
        elif kind == STEP:
            if self.bar is None:
                self.bar = progress_bar(e["steps"], f"epoch {e['epoch']}")
            self.bar.n = e["step"]
            self.bar.set_postfix(loss=f"{e['loss']:.3f}")
            self.bar.refresh()
            if e["step"] == e["steps"]:
                self.bar.close()
                self.bar = None
        elif kind == EPOCH:
            print(f"epoch {e['epoch']:3d}/{e['epochs']}  train loss {e['train_loss']:.4f}  val loss {e['val_loss']:.4f}  "
                  f"val AUC {e['val_auc']:.4f}  val acc {e['val_accuracy']:.4f}  {e['seconds']:.1f}s  "
                  f"ETA {e['eta_s'] / 60:.1f} min", file=sys.stderr)
        elif kind in STOPPING:
            print(f"stopping: {kind.replace('_', ' ')} at epoch {e['epoch']}", file=sys.stderr)
        elif kind == DONE:
            m = e["val_metrics"]
            print(f"new version {e['version']} (threshold {e['threshold']:.6f}; on {m.get('n', '?')} validation "
                  f"images: AUC {m['roc_auc']:.4f}, sensitivity {m['sensitivity']:.3f}, specificity "
                  f"{m['specificity']:.3f})" + (" - activated" if e["activated"] else
                                                " - not active; activate with: python -m xray activate " + e["version"]),
                  file=sys.stderr)
            if e.get("gate"):
                print(f"not activated: {e['gate']}", file=sys.stderr)
