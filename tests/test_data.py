"""Labelled-folder scanning, patient ids and the patient-level split."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import DATASET, GENERATED
from xray.io.folders import Sample, acquisition_batch, id_range_split, patient_id, patient_split, scan_dataset

NORMALS = sorted((DATASET / "NORMAL").iterdir())
PNEUMONIAS = sorted((DATASET / "PNEUMONIA").iterdir())


# -- patient ids ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, patient", [
    ("person1000_bacteria_2931.jpeg", "person1000"),
    ("person1000_virus_1681.jpeg", "person1000"),
    ("PERSON1000_Virus_1681.JPEG", "person1000"),
    ("IM-0115-0001.jpeg", "im-0115"),
    ("IM-0115-0002.jpeg", "im-0115"),
    ("NORMAL2-IM-0383-0001.jpeg", "normal2-im-0383"),
    ("scan.png", "scan"),
])
def test_patient_id_on_the_dataset_naming(name, patient):
    assert patient_id(name) == patient
    assert patient_id(Path("some/folder") / name) == patient  # only the file name counts


def test_patient_ids_keep_series_apart():
    # IM-0383 and NORMAL2-IM-0383 are different series in the dataset, so different patients
    assert patient_id("IM-0383-0001.jpeg") != patient_id("NORMAL2-IM-0383-0001.jpeg")
    assert patient_id("person1_bacteria_1.jpeg") != patient_id("person10_bacteria_1.jpeg")


# -- patient split ----------------------------------------------------------------------------------
def _synthetic_samples(n_patients: int = 120, seed: int = 1) -> list[Sample]:
    """Patients with 1-4 images each, both classes, as the split sees them (no files needed)."""
    rng = np.random.default_rng(seed)
    samples = []
    for p in range(n_patients):
        label = int(p % 3 != 0)  # about two pneumonia patients for each normal one
        for k in range(int(rng.integers(1, 5))):
            name = f"person{p}_bacteria_{k}.jpeg" if label else f"IM-{p:04d}-{k:04d}.jpeg"
            samples.append(Sample(Path(name), label, "", patient_id(name), f"{p}-{k}"))
    return samples


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_patient_split_never_puts_a_patient_on_both_sides(seed):
    samples = _synthetic_samples()
    train, val = patient_split(samples, 0.2, seed)
    assert sorted(train + val) == list(range(len(samples)))  # every image exactly once
    train_patients = {samples[i].patient for i in train}
    val_patients = {samples[i].patient for i in val}
    assert not train_patients & val_patients
    # each class is held out at about the requested fraction (whole patients make it approximate)
    labels = np.array([s.label for s in samples])
    for label in (0, 1):
        share = np.isin(np.nonzero(labels == label)[0], val).mean()
        assert 0.15 <= share <= 0.3, share


def test_patient_split_is_deterministic_per_seed():
    samples = _synthetic_samples()
    assert patient_split(samples, 0.2, 3) == patient_split(samples, 0.2, 3)
    assert patient_split(samples, 0.2, 3) != patient_split(samples, 0.2, 4)


# -- id-range split (validation that imitates acquisition drift) ----------------------------------------
@pytest.mark.parametrize("patient, batch", [
    ("im-0115", ("im-", 115)), ("normal2-im-0383", ("normal2-im-", 383)), ("person12", ("person", 12)),
    ("scan", ("scan", None)),
])
def test_acquisition_batch_and_number(patient, batch):
    assert acquisition_batch(patient) == batch


def _two_batch_samples() -> list[Sample]:
    """Normals in two acquisition batches (IM-, NORMAL2-IM-) and pneumonia patients, 1-3 images each."""
    rng = np.random.default_rng(3)
    names = []
    for p in range(100, 160):
        names += [(f"IM-{p:04d}-{k:04d}.jpeg", 0) for k in range(int(rng.integers(1, 3)))]
    for p in range(400, 480):
        names.append((f"NORMAL2-IM-{p:04d}-0001.jpeg", 0))
    for p in range(1, 200):
        names += [(f"person{p}_bacteria_{k}.jpeg", 1) for k in range(int(rng.integers(1, 4)))]
    return [Sample(Path(n), label, "", patient_id(n), n) for n, label in names]


def test_id_range_split_holds_out_both_ends_of_each_batch():
    samples = _two_batch_samples()
    train, val = id_range_split(samples, 0.2, 0)
    assert sorted(train + val) == list(range(len(samples)))
    assert not {samples[i].patient for i in train} & {samples[i].patient for i in val}
    def numbers(side, prefix):
        return sorted({acquisition_batch(samples[i].patient)[1] for i in side
                       if acquisition_batch(samples[i].patient)[0] == prefix})

    for prefix in ("im-", "normal2-im-", "person"):
        held, kept = numbers(val, prefix), numbers(train, prefix)
        assert held and kept
        # every held-out patient lies before or after every training patient of its batch, and both ends are used
        assert all(n < min(kept) or n > max(kept) for n in held)
        assert min(held) < min(kept) and max(held) > max(kept)
        # about the requested share of the batch's images (whole patients make it approximate)
        in_batch = [i for i, s in enumerate(samples) if acquisition_batch(s.patient)[0] == prefix]
        share = np.isin(in_batch, val).mean()
        assert 0.15 <= share <= 0.3, (prefix, share)


def test_id_range_split_splits_unnumbered_files_by_patient_at_random():
    samples = _two_batch_samples() + [Sample(Path(f"scan{c}.png"), i % 2, "", patient_id(f"scan{c}.png"), str(i))
                                      for i, c in enumerate("abcdefghijklmnopqrst")]
    train, val = id_range_split(samples, 0.2, 0)
    unnumbered = {i for i, s in enumerate(samples) if s.path.name.startswith("scan")}
    assert unnumbered & set(val) and unnumbered & set(train)
    assert id_range_split(samples, 0.2, 0) == (train, val)


def test_patient_split_on_the_fixture_dataset():
    samples = scan_dataset(DATASET).samples
    train, val = patient_split(samples, 0.3, 0)
    assert {samples[i].label for i in val} == {0, 1}
    assert not {samples[i].patient for i in train} & {samples[i].patient for i in val}
    # person1000 and person1003 have two images each: both go to the same side
    for patient in ("person1000", "person1003"):
        sides = {i in val for i, s in enumerate(samples) if s.patient == patient}
        assert len(sides) == 1


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_patient_split_rejects_impossible_fractions(fraction):
    with pytest.raises(ValueError, match="val_fraction"):
        patient_split(_synthetic_samples(10), fraction, 0)


# -- scanning ---------------------------------------------------------------------------------------
def _copy(files: list[Path], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy(f, folder / f.name)


def test_scan_plain_folder():
    scan = scan_dataset(DATASET)
    assert len(scan.samples) == 16
    assert scan.counts() == {"all": {"NORMAL": 8, "PNEUMONIA": 8}}
    assert scan.parts == [""]
    assert scan.duplicates == [] and scan.skipped == []
    by_name = {s.path.name: s for s in scan.samples}
    assert by_name["person1000_bacteria_2931.jpeg"].label == 1
    assert by_name["IM-0115-0001.jpeg"].label == 0
    assert by_name["person1000_bacteria_2931.jpeg"].patient == "person1000"
    summary = scan.summary()
    assert summary["n"] == 16 and summary["patients"] == 14  # person1000 and person1003 have two images


def test_scan_finds_case_insensitive_class_folders_at_any_depth_with_parts(tmp_path):
    root = tmp_path / "download"
    _copy(NORMALS[:4], root / "chest_xray" / "Train" / "normal")
    _copy(PNEUMONIAS[:4], root / "chest_xray" / "Train" / "Pneumonia")
    _copy(NORMALS[4:5], root / "chest_xray" / "VAL" / "NORMAL")
    _copy(PNEUMONIAS[4:5], root / "chest_xray" / "VAL" / "pneumonia")
    _copy(NORMALS[5:7], root / "extra" / "deeper" / "test" / "Normal")
    _copy(PNEUMONIAS[5:8], root / "extra" / "deeper" / "test" / "PNEUMONIA")
    scan = scan_dataset(root)
    assert scan.parts == ["test", "train", "val"]
    assert scan.counts() == {"train": {"NORMAL": 4, "PNEUMONIA": 4}, "val": {"NORMAL": 1, "PNEUMONIA": 1},
                             "test": {"NORMAL": 2, "PNEUMONIA": 3}}
    for s in scan.samples:
        assert s.label == int("pneumonia" in str(s.path.parent).lower())


def test_scan_lists_duplicates_and_skipped_files(tmp_path):
    root = tmp_path / "data"
    _copy(NORMALS, root / "NORMAL")
    _copy(PNEUMONIAS, root / "PNEUMONIA")
    shutil.copy(NORMALS[0], root / "PNEUMONIA" / "copy_of_normal.jpeg")  # same bytes, other class
    (root / "NORMAL" / "notes.txt").write_text("ward round notes")
    (root / "PNEUMONIA" / "report.pdf").write_bytes(b"%PDF-1.4")
    scan = scan_dataset(root)
    assert scan.duplicates == [["NORMAL/IM-0115-0001.jpeg", "PNEUMONIA/copy_of_normal.jpeg"]]
    skipped = dict(scan.skipped)
    assert set(skipped) == {"NORMAL/notes.txt", "PNEUMONIA/report.pdf"}
    assert all(reason for reason in skipped.values())
    assert len(scan.samples) == 17  # non-image files are listed, not counted as samples
    assert scan.summary()["skipped"] == [list(x) for x in scan.skipped]


def test_scan_keeps_unreadable_images_for_the_decoder_to_report(tmp_path):
    root = tmp_path / "data"
    _copy(NORMALS[:2], root / "NORMAL")
    _copy(PNEUMONIAS[:2], root / "PNEUMONIA")
    shutil.copy(GENERATED / "truncated.jpeg", root / "NORMAL" / "truncated.jpeg")
    scan = scan_dataset(root)
    # an image-named file is a sample; decoding (which names the problem) decides whether it is usable
    assert "NORMAL/truncated.jpeg" in {scan.relative(s.path) for s in scan.samples}


def test_fingerprint_changes_with_the_data(tmp_path):
    root = tmp_path / "data"
    _copy(NORMALS[:3], root / "NORMAL")
    _copy(PNEUMONIAS[:3], root / "PNEUMONIA")
    first = scan_dataset(root).fingerprint()
    assert scan_dataset(root).fingerprint() == first
    shutil.copy(PNEUMONIAS[3], root / "PNEUMONIA" / PNEUMONIAS[3].name)
    assert scan_dataset(root).fingerprint() != first


def test_scan_errors_are_precise(tmp_path):
    with pytest.raises(ValueError, match="no such folder"):
        scan_dataset(tmp_path / "absent")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        scan_dataset(tmp_path / "file.txt")
    unlabelled = tmp_path / "unlabelled"
    _copy(NORMALS[:2], unlabelled / "images")
    with pytest.raises(ValueError, match="no NORMAL/ or PNEUMONIA/ folder"):
        scan_dataset(unlabelled)


def test_scan_refuses_one_empty_class(tmp_path):
    root = tmp_path / "data"
    _copy(NORMALS[:3], root / "NORMAL")
    (root / "PNEUMONIA").mkdir()
    (root / "PNEUMONIA" / "readme.txt").write_text("to be filled")
    with pytest.raises(ValueError, match="class PNEUMONIA has no images"):
        scan_dataset(root)
    only_normal = tmp_path / "only_normal"
    _copy(NORMALS[:3], only_normal / "NORMAL")
    with pytest.raises(ValueError, match="PNEUMONIA"):
        scan_dataset(only_normal)
    empty = tmp_path / "empty"
    (empty / "NORMAL").mkdir(parents=True)
    (empty / "PNEUMONIA").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        scan_dataset(empty)
