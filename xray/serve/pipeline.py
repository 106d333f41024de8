"""The batch pipeline: files and folders in, one (path, Prediction, error) per file out, with decoding
in worker processes; the one CSV row; evaluation of a labelled folder. Used by the CLI, the bench
and reports.
"""
from __future__ import annotations

import csv
import hashlib
import itertools
import multiprocessing
import os
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from xray.decide import metrics as M
from xray.io.folders import scan_dataset, walk_files
from xray.io.loader import dicomdir_files, not_an_image_reason, sniff
from xray.serve.inference import Prediction, predict
from xray.io.preprocess import ModelInput, try_read_model_input
from xray.decide.prevalence import adjust_to_prevalence
from xray.model.registry import LoadedModel

# label: the decision at threshold, made on p_pneumonia (the version's calibrated probability);
# p_pneumonia_at_prevalence: the same evidence at the prevalence column's value (Bayes' rule), for reading
CSV_HEADER = ["path", "p_pneumonia", "label", "threshold", "error", "prevalence", "p_pneumonia_at_prevalence"]


def iter_image_paths(paths: list[str], skipped: list[tuple[str, str]] | None = None) -> Iterator[Path]:
    """Files as given, and every image or DICOM file found recursively under folders, in a stable order.

    Files are recognised by content (``loader.sniff``): extensionless DICOM from CD and PACS exports
    included. Links to folders are followed, each real file is listed once and a loop is reported
    (``folders.walk_files``). A DICOMDIR given as a file yields the images it lists; inside a folder it is an index
    whose images the walk finds anyway. Everything passed over is appended to ``skipped`` as
    (path, reason): nothing is skipped silently.
    """
    def skip(path: Path, reason: str) -> None:
        if skipped is not None:
            skipped.append((str(path), reason))

    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for file in walk_files(path, skip):  # links to folders followed, each real file once, loops reported
                if file.name.startswith("."):
                    skip(file, "hidden file")
                    continue
                try:
                    kind = sniff(file)
                except OSError as exc:
                    skip(file, f"cannot read: {exc.strerror or exc}")
                    continue
                if kind == "DICOMDIR":
                    skip(file, "DICOMDIR index: the images it lists are scored from this folder")
                elif kind is None:
                    skip(file, not_an_image_reason(file))
                else:
                    yield file
        elif path.is_file() and _is_dicomdir(path):
            try:
                listed = dicomdir_files(path)
            except ValueError as exc:
                skip(path, str(exc))
                continue
            for file in listed:
                if file.is_file():
                    yield file
                else:
                    skip(file, f"listed in {path} but missing")
        else:
            yield path


def _is_dicomdir(path: Path) -> bool:
    try:
        return sniff(path) == "DICOMDIR"
    except OSError:
        return False


def shard_of(key: str, count: int) -> int:
    """Which of ``count`` shards a file belongs to, from a hash of its path relative to the folder
    given: every machine agrees whatever the mount point, and new files never move the others."""
    return int.from_bytes(hashlib.sha256(os.fsencode(key)).digest()[:8], "big") % count


def path_text(path: str | os.PathLike) -> str:
    """A path as text that any UTF-8 file or terminal takes: a name's bytes that are not UTF-8 (a Latin-1
    name unzipped from a Windows archive arrives as surrogates) are written as backslash escapes
    (``M\\xfcller``), so the file can be told apart and found again; other names are unchanged."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def iter_shard(paths: list[str], shard: tuple[int, int] = (0, 1),
               skipped: list[tuple[str, str]] | None = None) -> Iterator[Path]:
    """``iter_image_paths``, keeping only shard ``index`` of ``count`` (lazily: nothing is listed ahead)."""
    index, count = shard
    for raw in paths:
        root = Path(raw)
        base = root if root.is_dir() else root.parent
        for path in iter_image_paths([raw], skipped):
            try:
                key = path.relative_to(base).as_posix() if path != root else root.as_posix()
            except ValueError:
                key = path.as_posix()
            if count == 1 or shard_of(key, count) == index:
                yield path


UNREADABLE = "unreadable"  # ResultRow.outcome of a file that could not be read (beside the guard's outcomes)


@dataclass(frozen=True)
class ResultRow:
    """One file's result as every table shows it (the CSV of ``predict``, the worklist and its CSV), with
    separate fields: ``outcome`` is the guard's (``guard.VERDICT`` ...) or ``UNREADABLE``, ``reason`` why
    there is no verdict (one line)."""

    path: str
    p_pneumonia: float | None  # None when the file could not be read; kept (for research) when withheld
    label: str  # PNEUMONIA / NORMAL / BORDERLINE at ``threshold``; "" when withheld or unreadable
    threshold: float
    outcome: str
    reason: str = ""
    prevalence: float | None = None  # the site's, for the last two CSV columns
    p_at_prevalence: float | None = None  # the same evidence at ``prevalence`` (Bayes' rule); never decides
    sha256: str = ""

    @classmethod
    def of(cls, path: str, prediction: Prediction | None, error: str, threshold: float,
           prevalence: tuple[float, float] | None = None, sha256: str = "") -> "ResultRow":
        """The row of a scored, withheld or unreadable file. ``prevalence``: (the version's calibration
        prevalence, the site's), or None to leave the last two columns empty."""
        calibrated_at, site = prevalence if prevalence is not None else (None, None)
        path = path_text(path)  # a name that is not UTF-8 is escaped in every table
        if prediction is None:
            return cls(path, None, "", threshold, UNREADABLE, " ".join(str(error).split()), site, None, sha256)
        adjusted = None
        if site is not None and calibrated_at is not None and not prediction.withheld:
            adjusted = float(adjust_to_prevalence(prediction.p_pneumonia, calibrated_at, site))
        if prediction.withheld:  # no verdict, but the score stays visible (docs/ood.md)
            return cls(path, prediction.p_pneumonia, "", threshold, prediction.outcome,
                       " ".join(prediction.withheld_reason.split()), site, None, sha256)
        return cls(path, prediction.p_pneumonia, prediction.decision(threshold), threshold, prediction.outcome,
                   "", site, adjusted, sha256)

    @property
    def error(self) -> str:
        """The CSV's error column: the read error, or "<outcome>: <reason>" when withheld; "" for a verdict."""
        if self.outcome == UNREADABLE:
            return self.reason
        return f"{self.outcome}: {self.reason}" if self.label == "" else ""

    def csv(self) -> list[str]:
        """The row under ``CSV_HEADER``."""
        return [self.path, "" if self.p_pneumonia is None else f"{self.p_pneumonia:.6f}", self.label,
                f"{self.threshold:.6f}", self.error, "" if self.prevalence is None else f"{self.prevalence:.4f}",
                "" if self.p_at_prevalence is None else f"{self.p_at_prevalence:.6f}"]


def csv_row(path: str, prediction: Prediction | None, error: str, threshold: float,
            prevalence: tuple[float, float] | None = None) -> list[str]:
    """The one CSV row (columns ``CSV_HEADER``) for a scored, withheld or unreadable file (``ResultRow``).

    ``path`` is written as ``path_text`` (names that are not UTF-8 escaped). ``label`` is
    ``Prediction.decision(threshold)`` (PNEUMONIA / NORMAL / BORDERLINE) for a verdict, empty
    when the verdict was withheld (``p_pneumonia`` stays, for research; ``error`` says why) or the file
    could not be read. ``prevalence``: (the version's calibration prevalence, the site's), for the last
    two columns; the decision never depends on it.
    """
    return ResultRow.of(path, prediction, error, threshold, prevalence).csv()


def done_paths(csv_path: Path) -> set[str]:
    """Paths already in a predict CSV, as ``path_text`` writes them (for --resume: compare
    ``path_text(path)``); a last line torn by a crash is cut off first."""
    with open(csv_path, "r+b") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)  # that file is scored again
    with open(csv_path, newline="", encoding="utf-8", errors="backslashreplace") as f:
        rows = list(csv.reader(f))
    if rows and rows[0] != CSV_HEADER:
        raise ValueError(f"{csv_path} is not a predict CSV with columns {','.join(CSV_HEADER)}; cannot resume it")
    return {row[0] for row in rows[1:] if len(row) == len(CSV_HEADER)}


def _prepare_chunk(paths: list[Path], image_size: int) -> list[tuple[ModelInput | None, str]]:
    """In a worker process: decode and squash each file; (ModelInput or None, error) per path."""
    return [try_read_model_input(path, image_size) for path in paths]


def cpu_allocation(workers: int = 0) -> tuple[int, int]:
    """(network threads, decoding processes) for ``score_paths`` on this machine's cores."""
    cores = os.cpu_count() or 1
    threads = max(1, min(torch.get_num_threads(), cores // 2))
    return threads, workers or max(1, cores - threads + 1)


def score_paths(model: LoadedModel, paths: Iterable[Path], batch_size: int = 32,
                workers: int = 0, chunk: int = 16) -> Iterator[tuple[Path, Prediction | None, str]]:
    """Yield (path, Prediction or None, error) for each file, in the files' order (unreadable ones
    included). Worker processes decode ``chunk`` files at a time and hand back only the small model
    inputs, while this process runs the network; never more than ``(2 * workers + 2) * chunk`` files
    are in flight, so memory stays flat over any number of files.

    The cores are shared: the network gets half of them (its OpenMP threads would otherwise spin on
    cores the decoders need), the decoders the rest plus one. On 2 cores that is 1 thread + 2 workers:
    987 images/s vs 568 with 2 threads + 2 workers (docs/scaling.md)."""
    threads = torch.get_num_threads()
    net_threads, workers = cpu_allocation(workers)
    if model.device.type == "cpu":
        torch.set_num_threads(net_threads)
    source, pending, batch = iter(paths), deque(), []
    pool = _decoding_pool(workers)

    def submit(paths_chunk: list[Path]) -> Future:
        """The pool's future for a chunk; a pool already broken by a crash gives a failed future, which
        the loop below handles like any other crash (a worker may die before the next submit)."""
        try:
            return pool.submit(_prepare_chunk, paths_chunk, model.image_size)
        except BrokenProcessPool as exc:
            failed: Future = Future()
            failed.set_exception(exc)
            return failed

    def flush():
        predictions = predict(model, [prepared for _, prepared in batch], batch_size)
        done = [(path, prediction, "") for (path, _), prediction in zip(batch, predictions)]
        batch.clear()
        return done

    try:
        while True:
            while len(pending) < 2 * workers + 2:
                paths_chunk = list(itertools.islice(source, chunk))
                if not paths_chunk:
                    break
                pending.append((paths_chunk, submit(paths_chunk)))
            if not pending:
                break
            paths_chunk, future = pending.popleft()
            try:
                results = future.result()
            except BrokenProcessPool:  # a worker died (a decoder crashed on some file): lose only that file
                pool.shutdown(wait=True, cancel_futures=True)
                results = _isolated(paths_chunk, model.image_size)
                pool = _decoding_pool(workers)
                pending = deque((c, submit(c)) for c, _ in pending)
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
    # fork: workers start in milliseconds and only run Pillow and NumPy (no torch threads)
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    return ProcessPoolExecutor(workers, mp_context=context)


def _isolated(paths: list[Path], image_size: int) -> list[tuple[ModelInput | None, str]]:
    """Each file in a process of its own, after a worker died: which file kills the decoder?"""
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


def evaluate_folder(model: LoadedModel, data_dir: str, threshold: float | None) -> dict:
    """Metrics of ``model`` on a labelled folder (every part of it) at ``threshold`` (the card's when None).

    Raises:
        ValueError: no image under the folder could be read.
    """
    scan = scan_dataset(data_dir)
    labels, scores, errors = [], [], []
    by_path = {s.path: s.label for s in scan.samples}
    for path, prediction, error in score_paths(model, iter(by_path)):
        if prediction is None:
            errors.append([scan.relative(path), error])
        else:
            labels.append(by_path[path])
            scores.append(prediction.p_pneumonia)
    if not labels:
        raise ValueError(f"no image under {scan.root} could be read ({len(errors)} unreadable)")
    threshold = model.default_threshold if threshold is None else threshold
    result = M.metrics_at(np.array(labels), np.array(scores), threshold)
    result.update({"ece": M.expected_calibration_error(labels, scores), "model_version": model.version,
                   "data_dir": str(scan.root), "unreadable": errors})
    return result
