"""The batch report pipeline (xray.report.batch) on its own: names, files in the way (issue 21)."""
from __future__ import annotations

from pathlib import Path

import pytest

from xray.report import batch


def test_two_files_of_one_name_are_both_reported_and_dicom_adds_two_targets(tmp_path):
    paths = [Path("a/film.png"), Path("b/film.dcm"), Path("c/other.jpeg"), Path("d/film")]
    planned = batch.plan(paths, tmp_path, dicom=True)
    assert [p.stem for p in planned] == ["film", "film-2", "other", "film-3"]
    assert planned[1].targets == (tmp_path / "film-2.pdf", tmp_path / "film-2.sc.dcm", tmp_path / "film-2.sr.dcm")
    assert batch.plan(paths[:1], tmp_path)[0].targets == (tmp_path / "film.pdf",)


def test_files_in_the_way_stop_the_batch_before_anything_is_written(tmp_path):
    planned = batch.plan([Path("x.png"), Path("y.png")], tmp_path)
    assert batch.existing(planned, tmp_path) == []
    (tmp_path / batch.WORKLIST).write_bytes(b"old")
    (tmp_path / "y.pdf").write_bytes(b"old")
    assert batch.existing(planned, tmp_path) == [tmp_path / "y.pdf", tmp_path / batch.WORKLIST]
    assert batch.existing(planned[:1], tmp_path) == []  # one file: no worklist
    with pytest.raises(batch.ReportsExist, match="2 report file.*first: .*y.pdf.*nothing was written.*--force"):
        batch.write_reports(None, [Path("x.png"), Path("y.png")], tmp_path, 0.5, 0.3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["worklist.pdf", "y.pdf"]
