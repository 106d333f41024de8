"""The command line: predict's CSV contract, evaluate, train, and the registry commands."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DATASET, FULLRES, GENERATED
from xray.cli import main
from xray.model.registry import Registry

REPO = Path(__file__).resolve().parents[1]
HEADER = ["path", "p_pneumonia", "label", "threshold", "error", "prevalence", "p_pneumonia_at_prevalence"]
TINY_TRAIN_OPTIONS = ["--epochs", "2", "--image-size", "64", "--widths", "8,16,32,64", "--batch-size", "8",
                      "--val-fraction", "0.3", "--ema", "0", "--threads", "1", "--workers", "1"]


def _rows(text: str) -> list[dict[str, str]]:
    """Parse CSV strictly: the header first, five fields on every line."""
    table = list(csv.reader(io.StringIO(text)))
    assert table[0] == HEADER
    assert all(len(row) == len(HEADER) for row in table[1:]), table
    return [dict(zip(HEADER, row)) for row in table[1:]]


def _check_scored(row: dict[str, str], threshold: float) -> None:
    """A scored row: a probability, the threshold used, and a label decided at it, or no label
    and the reason when the image does not look like a chest X-ray (the out-of-distribution check)."""
    p = float(row["p_pneumonia"])
    assert 0.0 <= p <= 1.0
    assert float(row["threshold"]) == pytest.approx(threshold, abs=1e-6)
    if row["error"]:
        assert row["label"] == "" and row["error"].startswith(("not a chest radiograph: ", "outside intended use: ")), row
    else:
        assert row["label"] == ("PNEUMONIA" if p >= threshold else "NORMAL"), row


def _run(args: list[str], cwd: Path, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m xray`` as a user runs it: another working directory, the package on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({"PYTHONPATH": str(REPO), **(env_extra or {})})
    return subprocess.run([sys.executable, "-m", "xray", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture
def upload_folder(tmp_path) -> Path:
    """Nested folders of good and bad files, as a clinic's export might look."""
    root = tmp_path / "uploads"
    (root / "ward_a").mkdir(parents=True)
    (root / "ward_b" / "night").mkdir(parents=True)
    shutil.copy(DATASET / "NORMAL" / "IM-0115-0001.jpeg", root / "ward_a")
    shutil.copy(DATASET / "PNEUMONIA" / "person1000_bacteria_2931.jpeg", root / "ward_a")
    shutil.copy(GENERATED / "chest.dcm", root / "ward_b")
    shutil.copy(FULLRES / "person1951_bacteria_4882.jpeg", root / "ward_b" / "night")
    shutil.copy(GENERATED / "text_renamed.png", root / "ward_b" / "letter.png")
    shutil.copy(GENERATED / "truncated.jpeg", root / "ward_b" / "night" / "cut.jpeg")
    (root / "ward_a" / "notes.txt").write_text("not an image; folders are searched for image files only")
    return root


# -- predict ----------------------------------------------------------------------------------------
def test_predict_csv_contract(tiny_registry, upload_folder, capsys):
    missing = upload_folder / "absent.jpeg"
    assert main(["predict", str(upload_folder), str(missing)]) == 0
    captured = capsys.readouterr()
    rows = _rows(captured.out)
    threshold = Registry(tiny_registry).load().threshold
    by_name = {Path(r["path"]).name: r for r in rows}
    assert set(by_name) == {"IM-0115-0001.jpeg", "person1000_bacteria_2931.jpeg", "chest.dcm",
                            "person1951_bacteria_4882.jpeg", "letter.png", "cut.jpeg", "absent.jpeg"}
    assert len(rows) == 7
    scored = ("IM-0115-0001.jpeg", "person1000_bacteria_2931.jpeg", "chest.dcm", "person1951_bacteria_4882.jpeg")
    for name in scored:
        _check_scored(by_name[name], threshold)
    assert sum(by_name[name]["label"] != "" for name in scored) >= 2  # most X-rays get a verdict
    for name, word in (("letter.png", "text"), ("cut.jpeg", "truncated"), ("absent.jpeg", "no such file")):
        row = by_name[name]
        assert row["p_pneumonia"] == "" and row["label"] == ""
        assert word in row["error"].lower()
    assert "3 file(s) could not be scored" in captured.err
    # rows follow the files: folders walked in sorted order, then the paths as given
    assert [Path(r["path"]).name for r in rows] == [
        "IM-0115-0001.jpeg", "person1000_bacteria_2931.jpeg", "chest.dcm", "letter.png", "cut.jpeg",
        "person1951_bacteria_4882.jpeg", "absent.jpeg"]


def test_predict_threshold_option_decides_the_label(tiny_registry, capsys):
    files = [str(p) for p in sorted(DATASET.rglob("*.jpeg"))]
    main(["predict", *files])
    default = _rows(capsys.readouterr().out)
    scores = sorted(float(r["p_pneumonia"]) for r in default if r["label"])
    gap = max(range(len(scores) - 1), key=lambda i: scores[i + 1] - scores[i])
    cut = (scores[gap] + scores[gap + 1]) / 2  # clear of every score, with labelled rows on both sides
    main(["predict", *files, "--threshold", f"{cut:.9f}"])
    rows = _rows(capsys.readouterr().out)
    assert [r["p_pneumonia"] for r in rows] == [r["p_pneumonia"] for r in default]  # same scores
    assert [r["error"] for r in rows] == [r["error"] for r in default]
    for row in rows:
        _check_scored(row, cut)
    labels = {r["label"] for r in rows}
    assert {"NORMAL", "PNEUMONIA"} <= labels
    main(["predict", *files, "--threshold", "0"])
    assert {r["label"] for r in _rows(capsys.readouterr().out)} <= {"PNEUMONIA", ""}


def test_predict_csv_option_writes_the_file_and_nothing_to_stdout(tiny_registry, upload_folder, tmp_path, capsys):
    main(["predict", str(upload_folder)])
    to_stdout = capsys.readouterr().out
    out = tmp_path / "results" / "scores.csv"
    out.parent.mkdir()
    assert main(["predict", str(upload_folder), "--csv", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert _rows(out.read_text()) == _rows(to_stdout)


def test_predict_with_a_named_model_version(tiny_registry, capsys):
    registry = Registry(tiny_registry)
    version = registry.active_version()
    main(["predict", str(DATASET / "NORMAL" / "IM-0115-0001.jpeg"), "--model", version,
          "--registry", str(tiny_registry)])
    [row] = _rows(capsys.readouterr().out)
    assert row["error"] == ""
    with pytest.raises(SystemExit, match="invalid version id|no card"):
        main(["predict", str(DATASET), "--model", "no-such-version"])


# -- evaluate ---------------------------------------------------------------------------------------
EVALUATE_KEYS = {"n", "accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc", "pr_auc",
                 "confusion_matrix", "threshold"}


def test_evaluate_prints_metrics_and_writes_json(tiny_registry, tmp_path, capsys):
    data = tmp_path / "labelled"
    shutil.copytree(DATASET, data)
    shutil.copy(GENERATED / "truncated.jpeg", data / "PNEUMONIA" / "person9999_virus_1.jpeg")
    out = tmp_path / "metrics.json"
    assert main(["evaluate", str(data), "--json", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert EVALUATE_KEYS <= set(printed)
    assert printed["n"] == 16
    assert sum(printed["confusion_matrix"].values()) == 16
    assert printed["threshold"] == pytest.approx(Registry(tiny_registry).load().threshold)
    matrix = printed["confusion_matrix"]
    assert printed["accuracy"] == pytest.approx((matrix["tp"] + matrix["tn"]) / 16)
    assert matrix["tp"] + matrix["fn"] == 8  # eight PNEUMONIA images in the fixture folder
    [(path, reason)] = printed["unreadable"]  # the damaged file is listed, not counted
    assert path == "PNEUMONIA/person9999_virus_1.jpeg" and "truncated" in reason
    assert json.loads(out.read_text()) == printed


def test_evaluate_threshold_option(tiny_registry, capsys):
    main(["evaluate", str(DATASET), "--threshold", "0"])
    result = json.loads(capsys.readouterr().out)
    assert result["threshold"] == 0.0
    assert result["sensitivity"] == 1.0 and result["specificity"] == 0.0  # everything called pneumonia


def test_evaluate_refuses_an_unlabelled_folder(tiny_registry, tmp_path):
    (tmp_path / "images").mkdir()
    shutil.copy(DATASET / "NORMAL" / "IM-0115-0001.jpeg", tmp_path / "images")
    with pytest.raises(SystemExit, match="no NORMAL/ or PNEUMONIA/ folder"):
        main(["evaluate", str(tmp_path / "images")])


# -- registry commands ------------------------------------------------------------------------------
def test_versions_activate_rollback(tiny_registry, capsys):
    registry = Registry(tiny_registry)
    first = registry.active_version()
    model = registry.load()
    second = registry.save_version(model.net, model.card)  # a second version, inactive
    assert main(["versions"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].startswith(f"* {first}") and listing[1].startswith(f"  {second}")
    # a tiny model validated on a handful of images does not pass the promotion gate
    with pytest.raises(SystemExit, match="does not pass the promotion gate.*evaluated on only"):
        main(["activate", second])
    assert registry.active_version() == first
    with pytest.raises(SystemExit, match="needs a reason"):
        main(["activate", second, "--force"])
    assert main(["activate", second, "--force", "--reason", "test of the override"]) == 0
    assert registry.active_version() == second
    assert registry.card(second)["activation_overrides"][-1]["reason"] == "test of the override"
    import json, os
    events = [json.loads(line) for line in open(os.environ["XRAY_AUDIT_LOG"]) if '"event"' in line]
    assert events[-1]["event"] == "activation-override" and events[-1]["version"] == second
    assert main(["versions"]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith(f"* {second}")
    assert main(["rollback"]) == 0
    assert registry.active_version() == first
    with pytest.raises(SystemExit, match="no earlier model version"):
        main(["rollback"])
    with pytest.raises(SystemExit, match="error"):
        main(["activate", "20000101-000000"])
    assert registry.active_version() == first
    capsys.readouterr()
    (tiny_registry / "versions" / second / "card.json").write_text("{ damaged")
    assert main(["versions"]) == 0  # a damaged card is listed as such, the others still are
    listing = {line[2:].split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert set(listing) == {first, second}
    assert listing[first].startswith(f"* {first}") and "AUC" in listing[first]
    assert listing[second].startswith(f"  {second}") and "damaged" in listing[second]
    with pytest.raises(SystemExit, match="damaged"):
        main(["activate", second])


# -- true command-line runs -------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_train_writes_an_inactive_version_and_reports_the_data(tiny_registry, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(DATASET, data)
    shutil.copy(DATASET / "NORMAL" / "IM-0115-0001.jpeg", data / "NORMAL" / "IM-0115-0001-copy.jpeg")
    shutil.copy(GENERATED / "truncated.jpeg", data / "PNEUMONIA" / "person9999_virus_1.jpeg")
    (data / "NORMAL" / "README.txt").write_text("exported from PACS")
    registry = Registry(tiny_registry)
    active = registry.active_version()
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    result = _run(["train", str(data), *TINY_TRAIN_OPTIONS, "--run-dir", str(tmp_path / "run")], workdir,
                  {"XRAY_WEIGHTS": str(tiny_registry)})
    assert result.returncode == 0, result.stderr
    err = result.stderr
    assert "NORMAL 9, PNEUMONIA 9" in err  # counts per class (and part) before training
    assert "IM-0115-0001-copy.jpeg" in err and "duplicates" in err
    assert "README.txt" in err  # listed as skipped, not silently dropped
    assert "person9999_virus_1.jpeg" in err and "unreadable" in err
    new = [v for v in registry.versions() if v != active]
    assert len(new) == 1 and registry.active_version() == active
    assert f"activate {new[0]}" in err
    card = registry.card(new[0])
    assert card["data"]["unreadable"] == 1 and card["data"]["duplicates"] == 1
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "start" and events[-1]["event"] == "done"
    assert events[-1]["version"] == new[0]
    assert not any(tmp_path.joinpath("elsewhere").iterdir())  # nothing written into the working directory


@pytest.mark.slow
def test_cli_predict_from_another_working_directory(tiny_registry, tmp_path):
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    image = DATASET / "PNEUMONIA" / "person1000_bacteria_2931.jpeg"
    result = _run(["predict", str(image), str(GENERATED / "empty.png")], workdir, {"XRAY_WEIGHTS": str(tiny_registry)})
    assert result.returncode == 0, result.stderr
    rows = _rows(result.stdout)  # stdout holds only the CSV, whatever went to stderr
    assert [Path(r["path"]).name for r in rows] == [image.name, "empty.png"]
    _check_scored(rows[0], Registry(tiny_registry).load().threshold)
    assert rows[1]["label"] == "" and "empty" in rows[1]["error"]
    assert "could not be scored" in result.stderr


@pytest.mark.slow
def test_default_registry_is_the_site_folder_over_the_read_only_shipped_versions(tmp_path):
    """Without $XRAY_WEIGHTS the shipped versions are read from the repository and everything the app
    writes (versions, the active marker, site settings) goes to the user data folder, from any directory."""
    import xray.model.registry

    assert xray.model.registry.DEFAULT_REGISTRY == REPO / "weights"
    env = {k: v for k, v in os.environ.items() if k not in ("XRAY_WEIGHTS", "PYTHONPATH")}
    env.update(PYTHONPATH=str(REPO), XRAY_DATA=str(tmp_path / "data"))
    code = ("from xray.model.registry import Registry; r = Registry(); print(r.root); print(r.shipped); "
            "print(r.active_version()); print(r.is_shipped(r.active_version()))")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    root, shipped, active, is_shipped = result.stdout.split()
    assert root == str(tmp_path / "data" / "registry") and shipped == str(REPO / "weights")
    assert active == json.loads((REPO / "weights" / "active.json").read_text())["version"] and is_shipped == "True"


def test_shipped_cards_are_read_only_and_site_choices_live_apart(tmp_path, monkeypatch):
    from xray.model.registry import ReadOnlyVersion

    monkeypatch.delenv("XRAY_WEIGHTS", raising=False)
    monkeypatch.setenv("XRAY_DATA", str(tmp_path))
    before = {p: p.read_bytes() for p in (REPO / "weights").rglob("*") if p.is_file()}
    registry = Registry()
    version = registry.active_version()
    with pytest.raises(ReadOnlyVersion):
        registry.update_card(version, {"threshold": 0.3})
    registry.site.save_threshold(version, 0.3, "Dr Test", "local audit")
    model = registry.load()
    assert model.default_threshold == 0.3 and model.threshold == registry.card(version).threshold
    assert registry.site.restore_threshold(version)
    assert registry.load().default_threshold == registry.card(version).threshold  # the exact value is back
    assert registry.history() == []  # the versions live where the model was built were never live here
    older = next(v for v in registry.versions() if v != version)
    registry.activate(older)  # the marker goes to the site folder
    assert Registry().active_version() == older and (tmp_path / "registry" / "active.json").is_file()
    after = {p: p.read_bytes() for p in (REPO / "weights").rglob("*") if p.is_file()}
    assert after == before  # nothing under the repository's weights/ changed


def test_cli_errors_are_one_line_not_tracebacks(tiny_registry, tmp_path, capsys):
    from xray.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["predict", str(FULLRES), "--csv", str(tmp_path / "no" / "such" / "folder.csv")])
    assert str(exc.value).startswith("error: cannot write")
    broken = tmp_path / "broken"
    for cls in ("NORMAL", "PNEUMONIA"):
        (broken / cls).mkdir(parents=True)
        (broken / cls / "x.png").write_bytes(b"not an image")
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", str(broken)])
    assert "could be read" in str(exc.value)


@pytest.mark.slow
def test_a_reader_that_stops_early_gets_no_traceback(tmp_path):
    """``python -m xray versions | head -1``: the closed pipe ends the command quietly."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "XRAY_AUDIT_LOG": "off"}
    reader = subprocess.Popen([sys.executable, "-m", "xray", "versions", "--registry", str(root / "weights")],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reader.stdout.close()  # the reader is gone before the first line arrives
    stderr = reader.stderr.read().decode()
    assert reader.wait(timeout=120) == 1
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
