"""`python -m xray predict` over large folders: parallel decoding in file order, flat memory,
deterministic shards and resuming an interrupted CSV."""
from __future__ import annotations

import csv
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import DATASET, GENERATED
from xray.cli import main
from xray.serve.pipeline import CSV_HEADER, iter_shard, score_paths
from xray.io.loader import load_image
from xray.serve.inference import predict


def _rows(path: Path) -> list[list[str]]:
    table = list(csv.reader(open(path, newline="")))
    assert table[0] == CSV_HEADER
    return table[1:]


def _assert_same_scores(got: dict, expected: dict) -> None:
    """Same files, labels, thresholds and errors; p_pneumonia equal to 1e-5 (a file scored in another
    batch goes through other float summation orders, which moves the 6th decimal now and then)."""
    assert got.keys() == expected.keys()
    for key, (p, *rest) in got.items():
        assert rest[:4] == expected[key][1:5], key  # label, threshold, error, prevalence
        assert p == expected[key][0] or abs(float(p) - float(expected[key][0])) < 1e-5, key
        adjusted, other = rest[4], expected[key][5]  # p at the prevalence: the same float noise
        assert adjusted == other or abs(float(adjusted) - float(other)) < 1e-5, key


@pytest.fixture
def archive(tmp_path) -> Path:
    """Fixture radiographs in nested folders, with two unreadable files among them."""
    root = tmp_path / "archive"
    for i, source in enumerate(sorted(DATASET.rglob("*.jpeg"))):
        target = root / f"ward{i % 3}" / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    shutil.copy(GENERATED / "truncated.jpeg", root / "ward1" / "broken.jpeg")
    shutil.copy(GENERATED / "text_renamed.png", root / "ward2" / "notes.png")
    return root


def test_parallel_scores_equal_one_at_a_time_in_file_order(archive, tiny_model):
    paths = list(iter_shard([str(archive)]))
    assert paths == sorted(paths)  # a stable order: sorted within each folder, folders in order
    results = list(score_paths(tiny_model, iter(paths), batch_size=4, workers=3))
    assert [path for path, _, _ in results] == paths
    for path, prediction, error in results:
        if path.name in ("broken.jpeg", "notes.png"):
            assert prediction is None and error
        else:
            (expected,) = predict(tiny_model, [load_image(path)])
            assert error == "" and prediction.p_pneumonia == pytest.approx(expected.p_pneumonia, abs=1e-4)  # batched float sums differ in the last bits


@pytest.mark.slow
def test_shards_partition_the_files_whatever_the_mount_point(archive, tiny_registry, tmp_path):
    everything = tmp_path / "all.csv"
    assert main(["predict", str(archive), "--csv", str(everything)]) == 0
    full = {Path(row[0]).relative_to(archive): row[1:] for row in _rows(everything)}
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(archive, moved)
    parts = []
    for i in range(3):
        out = tmp_path / f"shard{i}.csv"
        root = archive if i != 1 else moved  # one machine mounts the archive at another path
        assert main(["predict", str(root), "--csv", str(out), "--shard", f"{i}/3"]) == 0
        parts.append({Path(row[0]).relative_to(root): row[1:] for row in _rows(out)})
    assert all(parts), "every shard gets some of the 18 files"
    assert sum(len(p) for p in parts) == len(full)  # disjoint
    _assert_same_scores({k: v for p in parts for k, v in p.items()}, full)  # and together, the same scores


@pytest.mark.slow
def test_resume_appends_only_what_is_missing(archive, tiny_registry, tmp_path):
    reference = tmp_path / "reference.csv"
    assert main(["predict", str(archive), "--csv", str(reference)]) == 0
    lines = reference.read_text().splitlines(keepends=True)
    interrupted = tmp_path / "interrupted.csv"
    # a run killed mid-write: the header, 7 complete rows, and half of the 8th
    interrupted.write_text("".join(lines[:8]) + lines[8][: len(lines[8]) // 2])
    assert main(["predict", str(archive), "--csv", str(interrupted), "--resume"]) == 0
    _assert_same_scores({row[0]: row[1:] for row in _rows(interrupted)}, {row[0]: row[1:] for row in _rows(reference)})
    assert len(_rows(interrupted)) == len(_rows(reference))  # no file twice
    before = interrupted.read_text()
    assert main(["predict", str(archive), "--csv", str(interrupted), "--resume"]) == 0
    assert interrupted.read_text() == before  # nothing left to do


def test_bad_resume_and_shard_arguments_are_refused(archive, tiny_registry, tmp_path):
    with pytest.raises(SystemExit, match="--resume needs --csv"):
        main(["predict", str(archive), "--resume"])
    other = tmp_path / "other.csv"
    other.write_text("name,score\na,1\n")
    with pytest.raises(SystemExit, match="not a predict CSV"):
        main(["predict", str(archive), "--csv", str(other), "--resume"])
    assert other.read_text() == "name,score\na,1\n"  # untouched
    for bad in ("3/3", "1", "a/b", "-1/2"):
        with pytest.raises(SystemExit):
            main(["predict", str(archive), "--shard", bad])


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.slow
def test_memory_stays_flat_over_two_thousand_files(tmp_path, tiny_model):
    root = tmp_path / "many"
    rng = np.random.default_rng(0)
    base = (np.linspace(40, 200, 64)[None, :] + np.zeros((64, 1))).astype(np.uint8)  # 64x64 grey ramp
    for i in range(2000):
        folder = root / f"d{i // 100:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        noisy = np.clip(base + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"img{i:04d}.png")
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        count, traced, rss = 0, [], []
        for path, prediction, error in score_paths(tiny_model, iter_shard([str(root)]), batch_size=32, workers=2):
            assert prediction is not None, error
            count += 1
            if count in (400, 1200, 2000):
                traced.append(tracemalloc.get_traced_memory()[0] - baseline)
                rss.append(_rss_bytes())
    finally:
        tracemalloc.stop()
    assert count == 2000
    # Holding every decoded image (or every path's work) ahead would cost 2000 x 16 KB = 32 MB of
    # numpy memory at file 400; a bounded pipeline holds a few dozen images, and nothing accumulates.
    # (Current, not peak, traced memory.)
    assert max(traced) < 8_000_000, traced
    assert traced[-1] - traced[0] < 1_000_000, traced
    assert rss[-1] - rss[0] < 40_000_000, rss  # the process as a whole (torch included) stays flat too


def test_a_decoder_crash_costs_only_the_file_that_caused_it(archive, tiny_model, monkeypatch):
    import os

    import xray.io.preprocess

    real = xray.io.preprocess.read_model_input
    crash = archive / "ward0" / "crash.jpeg"
    shutil.copy(next(DATASET.rglob("*.jpeg")), crash)

    def dies_on_one_file(source, image_size):
        if Path(source).name == "crash.jpeg":
            os._exit(139)  # what a segfault in a C decoder does to its worker process
        return real(source, image_size)

    monkeypatch.setattr(xray.io.preprocess, "read_model_input", dies_on_one_file)  # workers are forked: they see it
    paths = list(iter_shard([str(archive)]))
    results = list(score_paths(tiny_model, iter(paths), batch_size=4, workers=2, chunk=3))
    assert [path for path, _, _ in results] == paths
    failed = {path.name: error for path, prediction, error in results if prediction is None}
    assert set(failed) == {"crash.jpeg", "broken.jpeg", "notes.png"}
    assert "decoder crashed" in failed["crash.jpeg"]
    assert sum(prediction is not None for _, prediction, _ in results) == len(paths) - 3
