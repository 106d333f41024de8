"""Labelled folders: find NORMAL/PNEUMONIA at any depth, train/val/test parts, patient ids,
duplicates, a patient-level split, decoding every image once into a uint8 cache, and ``load_training_data``:
the folder as training, site checks, bench and robustness all read it."""
from __future__ import annotations

import hashlib
import io
import os
import re
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from xray import settings
from xray.atomic import atomic_write
from xray.io.loader import IMAGE_EXTENSIONS, sniff_bytes  # noqa: F401 (IMAGE_EXTENSIONS: part of this module's interface)
from xray.io.preprocess import try_read_model_input

CLASSES = ("NORMAL", "PNEUMONIA")  # label 0, label 1
PARTS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
SMALL_VAL = 100  # a val/ part smaller than this is supplemented by a patient split of train/

# What ``load_training_data`` reports while it works (``xray.train.events`` lists them with the training events)
SCAN = "scan"  # the folder scan: root, n, patients, counts, duplicates, skipped
DECODE = "decode"  # done, total
UNREADABLE = "unreadable"  # files: [[relative path, reason], ...]


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # 1 = PNEUMONIA
    part: str  # "train", "val", "test", or "" when the folder has no parts
    patient: str
    sha256: str


@dataclass
class DatasetScan:
    root: Path
    samples: list[Sample]
    duplicates: list[list[str]] = field(default_factory=list)  # groups of relative paths, same bytes
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)

    @property
    def parts(self) -> list[str]:
        return sorted({s.part for s in self.samples})

    def counts(self) -> dict[str, dict[str, int]]:
        table: dict[str, dict[str, int]] = {}
        for s in self.samples:
            row = table.setdefault(s.part or "all", {c: 0 for c in CLASSES})
            row[CLASSES[s.label]] += 1
        return table

    def fingerprint(self) -> str:
        """Hash of the labelled file list and contents: changes whenever the data changes."""
        h = hashlib.sha256()
        for s in sorted(self.samples, key=lambda s: str(s.path)):
            h.update(f"{self.relative(s.path)}|{s.label}|{s.part}|{s.sha256}\n".encode())
        return h.hexdigest()

    def relative(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)

    def summary(self) -> dict:
        return {"root": str(self.root), "counts": self.counts(), "n": len(self.samples),
                "patients": len({s.patient for s in self.samples}), "fingerprint": self.fingerprint(),
                "duplicates": self.duplicates, "skipped": [list(x) for x in self.skipped]}


_PATIENT_PATTERNS = (re.compile(r"^(person\d+)_", re.I), re.compile(r"^(NORMAL2-IM-\d+)", re.I),
                     re.compile(r"^(IM-\d+)", re.I))


def patient_id(path: str | os.PathLike) -> str:
    """Patient id from the dataset's file naming; the file stem when the name has none."""
    name = Path(path).name
    for pattern in _PATIENT_PATTERNS:
        m = pattern.match(name)
        if m:
            return m.group(1).lower()
    return Path(path).stem.lower()


LINK_LOOP = "a link to a folder searched already (a loop, or a second link to it): its files are counted once"


def walk_folders(root: Path, skip: Callable[[Path, str], None] | None = None
                 ) -> Iterator[tuple[Path, list[str], list[str]]]:
    """``os.walk`` in a stable order that follows links to folders (research shares and PACS mounts are laid
    out with them) and enters each real folder once: a link back to a folder already entered (a loop) is
    passed to ``skip`` with the reason. Hidden folders are left out; ``dirnames`` may be pruned as in os.walk."""
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        try:
            status = here.stat()
        except OSError as exc:
            if skip is not None:
                skip(here, f"cannot read: {exc.strerror or exc}")
            dirnames[:] = []
            continue
        if (status.st_dev, status.st_ino) in seen:
            if skip is not None:
                skip(here, LINK_LOOP)
            dirnames[:] = []
            continue
        seen.add((status.st_dev, status.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        yield here, dirnames, sorted(filenames)


def walk_files(root: Path, skip: Callable[[Path, str], None] | None = None) -> Iterator[Path]:
    """Every file under ``root`` once (``walk_folders``): a second path to a file already listed (through a
    link) and a link whose target is missing go to ``skip`` with the reason. Hidden files are listed."""
    first: dict[tuple[int, int], Path] = {}
    for here, _, filenames in walk_folders(root, skip):
        for name in filenames:
            path = here / name
            try:
                status = path.stat()
            except OSError as exc:
                if skip is not None:
                    skip(path, "a broken link (its target does not exist)" if path.is_symlink()
                         else f"cannot read: {exc.strerror or exc}")
                continue
            key = (status.st_dev, status.st_ino)
            if key in first:
                if skip is not None:
                    skip(path, f"the same file as {first[key]} (reached through a link): counted once")
                continue
            first[key] = path
            yield path


def _class_dirs(root: Path) -> list[tuple[Path, int, str]]:
    found = []
    for here, dirnames, _ in walk_folders(root):
        for d in list(dirnames):
            if d.upper() in CLASSES:
                rel_parts = (here / d).relative_to(root).parts[:-1]
                part = ""
                for name in rel_parts:
                    part = PARTS.get(name.lower(), part)
                found.append((here / d, CLASSES.index(d.upper()), part))
                dirnames.remove(d)  # files below a class folder belong to it
    return found


def scan_dataset(root: str | os.PathLike) -> DatasetScan:
    """List a labelled folder, or raise ValueError saying precisely why it cannot be used."""
    root = Path(root).expanduser()
    if not root.exists():
        raise ValueError(f"no such folder: {root}")
    if not root.is_dir():
        raise ValueError(f"not a folder: {root}")
    class_dirs = _class_dirs(root)
    if not class_dirs:
        raise ValueError(f"no NORMAL/ or PNEUMONIA/ folder anywhere under {root}")
    samples, skipped, by_hash = [], [], defaultdict(list)

    def skip(path: Path, reason: str) -> None:
        skipped.append((str(path.relative_to(root)) if path.is_relative_to(root) else str(path), reason))

    for class_dir, label, part in class_dirs:
        for path in walk_files(class_dir, skip):
            name = path.name
            rel = str(path.relative_to(root))
            if name.startswith("."):
                continue
            try:
                data = path.read_bytes()
            except OSError as exc:
                skipped.append((rel, f"cannot read: {exc.strerror or exc}"))
                continue
            kind = sniff_bytes(data[:512], name)  # by content: extensionless DICOM counts, renamed text not
            if kind not in ("image", "DICOM"):
                skipped.append((rel, "a DICOMDIR index, not an image" if kind else "not an image or DICOM file"))
                continue
            digest = hashlib.sha256(data).hexdigest()
            by_hash[digest].append(rel)
            samples.append(Sample(path, label, part, patient_id(path), digest))
    present = Counter(s.label for s in samples)
    if not samples:
        raise ValueError(f"no image files in the NORMAL/ and PNEUMONIA/ folders under {root}")
    for label, name in enumerate(CLASSES):
        if present[label] == 0:
            raise ValueError(f"class {name} has no images under {root}: both classes are needed")
    duplicates = [sorted(v) for v in by_hash.values() if len(v) > 1]
    return DatasetScan(root, samples, duplicates, skipped)


def patient_split(samples: list[Sample], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, val): whole patients go to one side, each class split at ``val_fraction``."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError("val_fraction must be between 0 and 1")
    patients: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        patients[s.patient].append(i)
    rng = np.random.default_rng(seed)
    val: list[int] = []
    for label in (0, 1):
        group = sorted(p for p, idx in patients.items()
                       if round(np.mean([samples[i].label for i in idx])) == label)
        rng.shuffle(group)
        target = val_fraction * sum(len(patients[p]) for p in group)
        taken = 0
        for p in group:
            if taken >= target:
                break
            val.extend(patients[p])
            taken += len(patients[p])
    val_set = set(val)
    train = [i for i in range(len(samples)) if i not in val_set]
    return train, sorted(val_set)


_NUMBERED_PATIENT = re.compile(r"^(.*?)(\d+)$")


def acquisition_batch(patient: str) -> tuple[str, int | None]:
    """A patient id -> (acquisition batch, patient number): ``im-0115`` -> (``im-``, 115),
    ``normal2-im-0383`` -> (``normal2-im-``, 383), ``person12`` -> (``person``, 12); an id without a
    trailing number -> (id, None)."""
    m = _NUMBERED_PATIENT.match(patient)
    return (m.group(1), int(m.group(2))) if m else (patient, None)


def id_range_split(samples: list[Sample], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, val) for a validation that imitates acquisition drift: within each acquisition
    batch of each class (``IM-``, ``NORMAL2-IM-``, ``person``), the patients with the lowest and the
    highest numbers (half of ``val_fraction`` of the batch's images at each end) are held out, so the
    validation patients were imaged before or after every training patient of their batch (patient
    numbers are a proxy for acquisition time; the official test and validation splits of the Kermany
    set lie outside the training ids at both ends). Patients without a number are split at random
    (``patient_split``). Whole patients go to one side."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError("val_fraction must be between 0 and 1")
    patients: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        patients[s.patient].append(i)
    val: list[int] = []
    unnumbered: list[int] = []
    for label in (0, 1):
        batches: dict[str, list[tuple[int, str]]] = defaultdict(list)
        for p, idx in patients.items():
            if round(np.mean([samples[i].label for i in idx])) != label:
                continue
            batch, number = acquisition_batch(p)
            if number is None:
                unnumbered.extend(idx)
            else:
                batches[batch].append((number, p))
        for batch in sorted(batches):
            ordered = [p for _, p in sorted(batches[batch])]
            target = val_fraction * sum(len(patients[p]) for p in ordered)
            low, high, taken_low, taken_high = 0, len(ordered) - 1, 0, 0
            while low <= high and (taken_low < target / 2 or taken_high < target / 2):
                if taken_low <= taken_high:  # alternate ends, the one with fewer images first
                    val.extend(patients[ordered[low]])
                    taken_low += len(patients[ordered[low]])
                    low += 1
                else:
                    val.extend(patients[ordered[high]])
                    taken_high += len(patients[ordered[high]])
                    high -= 1
    if unnumbered:
        _, va = patient_split([samples[i] for i in unnumbered], val_fraction, seed)
        val.extend(unnumbered[i] for i in va)
    val_set = set(val)
    train = [i for i in range(len(samples)) if i not in val_set]
    return train, sorted(val_set)


SPLITS = {"patients": patient_split, "id-range": id_range_split}  # TrainConfig.split -> function


# -- decoding once ----------------------------------------------------------------------------------
def _decode_one(args: tuple[str, int]) -> tuple[np.ndarray | None, str]:
    """(path, size) -> ((S, S) uint8 model input or None, error): the same path as ``predict``'s."""
    prepared, error = try_read_model_input(*args)
    return (prepared.pixels if prepared is not None else None), error


def cache_dir() -> Path:
    return settings.cache_dir()


def decode_images(paths: list[Path], image_size: int, workers: int = 0,
                  progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, list[str]]:
    """Decode and resize every file: ((N, S, S) uint8, per-file error or '')."""
    workers = workers or min(8, os.cpu_count() or 1)
    images = np.zeros((len(paths), image_size, image_size), np.uint8)
    errors = [""] * len(paths)
    jobs = [(str(p), image_size) for p in paths]
    if workers > 1 and len(paths) > 64:
        with ProcessPoolExecutor(workers) as pool:
            results: Iterable = pool.map(_decode_one, jobs, chunksize=32)
            for i, (array, error) in enumerate(results):
                if array is not None:
                    images[i] = array
                errors[i] = error
                if progress and (i % 64 == 0 or i == len(paths) - 1):
                    progress(i + 1, len(paths))
    else:
        for i, job in enumerate(jobs):
            array, errors[i] = _decode_one(job)
            if array is not None:
                images[i] = array
            if progress:
                progress(i + 1, len(paths))
    return images, errors


def decoded_dataset(scan: DatasetScan, image_size: int, workers: int = 0, use_cache: bool = True,
                    progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, list[str]]:
    """``decode_images`` over a scan, cached on disk by data fingerprint and image size."""
    key = hashlib.sha256(f"{scan.fingerprint()}|{image_size}|v1".encode()).hexdigest()[:24]
    path = cache_dir() / f"{key}.npz"
    if use_cache and path.is_file():
        try:
            with np.load(path) as cached:
                return cached["images"], [str(e) for e in cached["errors"]]
        except Exception:
            pass  # a damaged cache is rebuilt
    images, errors = decode_images([s.path for s in scan.samples], image_size, workers, progress)
    if use_cache:
        try:
            buffer = io.BytesIO()
            np.savez(buffer, images=images, errors=np.array(errors, dtype=object).astype(str))
            atomic_write(path, lambda f: f.write(buffer.getvalue()))
        except OSError:
            pass  # a read-only home only costs speed
    return images, errors


# -- the folder as training reads it ----------------------------------------------------------------
@dataclass
class TrainingData:
    """A labelled folder decoded once and divided into training, validation and test images."""

    scan: DatasetScan
    images: np.ndarray  # (N, S, S) uint8, every readable sample
    labels: np.ndarray  # (N,) int64
    train: np.ndarray  # indices into images
    val: np.ndarray
    test: np.ndarray
    description: str  # how validation was formed, for the card
    unreadable: list[tuple[str, str]] = field(default_factory=list)

    @property
    def pos_weight(self) -> float:
        """Normal over pneumonia training images: balances the classes' total weight in the loss."""
        n_pos = int(self.labels[self.train].sum())
        return (len(self.train) - n_pos) / max(n_pos, 1)


def load_training_data(data_dir: str | os.PathLike, image_size: int, split: str = "id-range", val_fraction: float = 0.15,
                seed: int = 0, workers: int = 0,
                emit: Callable[[dict], None] = lambda event: None) -> TrainingData:
    """Scan ``data_dir``, decode every image once (cached) at ``image_size``, and divide it by patient.

    A ``val/`` part of at least ``SMALL_VAL`` images with both classes is the validation set; otherwise
    ``SPLITS[split]`` holds out ``val_fraction`` of the training images (seeded), plus any small ``val/``.
    Progress goes to ``emit`` as ``SCAN``, ``DECODE`` and ``UNREADABLE`` events.

    Raises:
        ValueError: no labelled images, an unknown ``split``, or a training or validation set lacking a class.
    """
    scan = scan_dataset(data_dir)
    emit({"event": SCAN, **scan.summary()})
    images, errors = decoded_dataset(scan, image_size, workers,
                                     progress=lambda i, n: emit({"event": DECODE, "done": i, "total": n}))
    ok = np.array([not e for e in errors])
    unreadable = [(scan.relative(s.path), e) for s, e in zip(scan.samples, errors) if e]
    emit({"event": UNREADABLE, "files": unreadable})
    samples = [s for s, good in zip(scan.samples, ok) if good]
    images = images[ok]
    labels = np.array([s.label for s in samples], dtype=np.int64)
    parts = np.array([s.part for s in samples])
    if "train" in set(parts):
        train_pool = np.nonzero(parts == "train")[0]
        given_val = np.nonzero(parts == "val")[0]
        test = np.nonzero(parts == "test")[0]
    else:
        train_pool, given_val, test = np.arange(len(samples)), np.array([], int), np.array([], int)
    if len(given_val) >= SMALL_VAL and len(set(labels[given_val])) == 2:
        train, val = train_pool, given_val
        description = f"the folder's val/ part ({len(val)} images)"
    else:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; one of {sorted(SPLITS)}")
        tr, va = SPLITS[split]([samples[i] for i in train_pool], val_fraction, seed)
        train, val = train_pool[tr], np.concatenate([train_pool[va], given_val]).astype(int)
        if split == "id-range":
            description = (f"patient-level split of the training images by patient number: the lowest and highest "
                           f"numbers of each acquisition batch ({val_fraction:.0%} of images, {len(va)} images)")
        else:
            description = (f"patient-level split of the training images ({val_fraction:.0%} of patients, "
                           f"seed {seed}, {len(va)} images)")
        if len(given_val):
            description += f" plus the folder's small val/ part ({len(given_val)} images)"
    for name, idx in (("training", train), ("validation", val)):
        if len(set(labels[idx])) < 2:
            raise ValueError(f"the {name} set lacks one class: too few readable images")
    scan.samples = samples
    return TrainingData(scan, images, labels, train, val, test, description, unreadable)
