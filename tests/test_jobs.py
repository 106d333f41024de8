"""Background training jobs (xray.jobs): data roots, folder checks, the exact CLI command, and real
tiny training processes that succeed, are cancelled, refused, killed with -9, or left stale."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import DATASET, FIXTURES, GENERATED, TINY_SETTINGS
from xray.govern.identity import operator
from xray.train import jobs
from xray.cli import build_parser
from xray.cli import main as cli_main
from xray.model.registry import Registry
from xray.io.folders import load_training_data
from xray.train.config import TrainConfig, config_from_args

TIMEOUT_S = 120  # generous: two shared cores; a tiny run takes a few seconds


@pytest.fixture
def roots(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XRAY_DATA_ROOTS", os.pathsep.join([str(tmp_path), str(FIXTURES)]))
    return tmp_path


def tiny_config(data_dir=DATASET, **overrides) -> TrainConfig:
    return TrainConfig(data_dir=str(data_dir), **{**TINY_SETTINGS, **overrides})


def wait_for_event(job: jobs.Job, kind: str, timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.time() + timeout_s
    while not any(e["event"] == kind for e in job.events()):
        assert jobs.load_job(job.dir.parent.parent, job.id).running, f"job ended before {kind}: {job.log_tail()}"
        assert time.time() < deadline, f"no {kind} event after {timeout_s} s"
        time.sleep(0.1)


def make_folder(root: Path, files: dict[str, Path | bytes]) -> Path:
    for rel, source in files.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, Path):
            shutil.copy(source, target)
        else:
            target.write_bytes(source)
    return root


# -- data roots -----------------------------------------------------------------------------------
def test_data_root_accepts_inside_and_refuses_outside(roots, tmp_path):
    assert jobs.check_data_root(DATASET) == DATASET.resolve()
    assert jobs.check_data_root(str(tmp_path)) == tmp_path.resolve()
    with pytest.raises(ValueError, match="outside the allowed data folders"):
        jobs.check_data_root(FIXTURES.parent)  # tests/ itself is not a root
    with pytest.raises(ValueError, match="enter a dataset folder"):
        jobs.check_data_root("  ")


def test_symlink_escaping_the_roots_is_refused(roots, tmp_path):
    (tmp_path / "escape").symlink_to(FIXTURES.parent.parent / "xray")  # inside by name, outside once resolved
    with pytest.raises(ValueError, match="outside the allowed data folders"):
        jobs.check_data_root(tmp_path / "escape")
    folder = make_folder(tmp_path / "linked", {f"NORMAL/{p.name}": p for p in sorted((DATASET / "NORMAL").iterdir())})
    (folder / "PNEUMONIA").mkdir()
    (folder / "PNEUMONIA" / "x.jpeg").symlink_to(FIXTURES.parent / "conftest.py")
    with pytest.raises(ValueError, match="links outside the allowed data folders"):
        jobs.inspect_folder(folder)


def test_default_data_root_is_home(monkeypatch):
    monkeypatch.delenv("XRAY_DATA_ROOTS", raising=False)
    assert jobs.data_roots() == [Path.home().resolve()]


# -- folder checks --------------------------------------------------------------------------------
def test_inspect_good_folder_matches_what_training_uses(roots):
    cfg = tiny_config()
    report = jobs.inspect_folder(DATASET, cfg)
    data = load_training_data(cfg.data_dir, **cfg.folder_options())
    assert report.counts == {"all": {"NORMAL": 8, "PNEUMONIA": 8}}
    assert sum(report.train.values()) == len(data.train) and sum(report.val.values()) == len(data.val)
    assert sum(report.train.values()) + sum(report.val.values()) == 16
    assert min(report.val.values()) >= 1 and report.validation == data.description
    assert report.unreadable == [] and report.duplicates == []


def test_inspect_lists_broken_files_and_duplicates(roots, tmp_path):
    files = {f"{c}/{p.name}": p for c in ("NORMAL", "PNEUMONIA") for p in sorted((DATASET / c).iterdir())}
    files["NORMAL/truncated.jpeg"] = GENERATED / "truncated.jpeg"
    files["PNEUMONIA/text_renamed.png"] = GENERATED / "text_renamed.png"
    files["PNEUMONIA/copy.jpeg"] = DATASET / "PNEUMONIA" / "person1000_bacteria_2931.jpeg"
    files["NORMAL/notes.txt"] = b"not an image"
    report = jobs.inspect_folder(make_folder(tmp_path / "data", files), tiny_config())
    assert sorted(name for name, _ in report.unreadable) == ["NORMAL/truncated.jpeg", "PNEUMONIA/text_renamed.png"]
    assert all(why for _, why in report.unreadable)
    assert report.duplicates == [["PNEUMONIA/copy.jpeg", "PNEUMONIA/person1000_bacteria_2931.jpeg"]]
    assert report.skipped == [("NORMAL/notes.txt", "not an image or DICOM file")]
    assert report.counts["all"] == {"NORMAL": 8, "PNEUMONIA": 9}  # readable images only


@pytest.mark.parametrize("layout, message", [
    (None, "no such folder"),
    ({"images/a.jpeg": DATASET / "NORMAL" / "IM-0115-0001.jpeg"}, "no NORMAL/ or PNEUMONIA/ folder"),
    ({"NORMAL/a.jpeg": DATASET / "NORMAL" / "IM-0115-0001.jpeg", "PNEUMONIA/readme.txt": b"x"}, "class PNEUMONIA has no images"),
    ({"NORMAL/a.png": GENERATED / "empty.png", "PNEUMONIA/b.jpeg": GENERATED / "truncated.jpeg"}, "none of the 2 images can be read"),
])
def test_inspect_says_why_a_folder_is_unusable(roots, tmp_path, layout, message):
    folder = tmp_path / "data"
    if layout is not None:
        make_folder(folder, layout)
    with pytest.raises(ValueError, match=message):
        jobs.inspect_folder(folder, tiny_config())


# -- the command line the page launches ----------------------------------------------------------
def test_train_argv_is_the_cli_command_for_the_same_config():
    cfg = TrainConfig(data_dir="/data/x", epochs=7, image_size=96, batch_size=12, lr=0.01, val_fraction=0.2, seed=5,
                      widths=(8, 16, 32, 64), init_from="active", augment="strong", mixup=0.2, ema=0.0,
                      threshold_rule="sensitivity>=0.95", tta="shift", registry="/r", run_dir="/r/runs/1",
                      resume=True, activate=True, threads=2, workers=3, max_minutes=1.5, tag="ward")
    argv = jobs.train_argv(cfg, "/r/jobs/1/events.jsonl")
    assert argv[:4] == [sys.executable, "-m", "xray", "train"]
    args = build_parser().parse_args(argv[3:])
    assert config_from_args(args) == cfg
    assert args.events == "/r/jobs/1/events.jsonl"
    defaults = build_parser().parse_args(jobs.train_argv(TrainConfig(data_dir="/d"), "e")[3:])
    assert config_from_args(defaults) == TrainConfig(data_dir="/d")


# -- real jobs ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_job_trains_a_new_inactive_version(roots, tiny_registry, capsys):
    registry = Registry(tiny_registry)
    active, before = registry.active_version(), registry.versions()
    job = jobs.start_job(tiny_registry, tiny_config(epochs=2), actor=operator())
    assert job.running and jobs.current_job(tiny_registry).id == job.id
    job = jobs.wait_for_job(tiny_registry, job.id, TIMEOUT_S)
    assert job.state == jobs.SUCCEEDED, job.reason
    assert job.version in registry.versions() and job.version not in before
    assert registry.active_version() == active  # a new version waits for someone to activate it
    card = registry.card(job.version)
    assert card["training"]["config"]["data_dir"] == str(DATASET.resolve())
    launched = job.record["argv"][1:-2]  # without the interpreter path and the page's --events file
    assert card["training"]["command"] == shlex.join(["python", *launched])  # what a CLI user would type
    assert [row["epoch"] for row in job.progress().history] == [1, 2]
    assert job.progress().fraction == 1.0
    assert json.loads((job.dir / "status.json").read_text())["state"] == jobs.SUCCEEDED
    assert jobs.recent_folders(tiny_registry) == [str(DATASET.resolve())]
    assert cli_main(["jobs", "--registry", str(tiny_registry)]) == 0
    assert f"job {job.id}: succeeded - new version {job.version}" in capsys.readouterr().out


@pytest.mark.slow
def test_second_start_is_refused_and_cancel_stops_cleanly(roots, tiny_registry):
    registry = Registry(tiny_registry)
    before = registry.versions()
    job = jobs.start_job(tiny_registry, tiny_config(epochs=500, patience=1000), actor=operator())
    with pytest.raises(jobs.JobRefused, match=f"already running.*{job.id}"):
        jobs.start_job(tiny_registry, tiny_config(), actor=operator())
    wait_for_event(job, "step")
    assert jobs.cancel_job(tiny_registry, actor=operator()) is True
    job = jobs.wait_for_job(tiny_registry, job.id, TIMEOUT_S)
    assert job.state == jobs.CANCELLED
    assert job.events()[-1]["event"] == "cancelled"  # the process stopped itself and said so
    assert (job.dir / "returncode").read_text().strip() == "3"
    assert registry.versions() == before
    assert jobs.cancel_job(tiny_registry, actor=operator()) is False  # nothing left to cancel
    later = jobs.start_job(tiny_registry, tiny_config(epochs=500), actor=operator())  # the lock went with the process
    assert cli_main(["jobs", "--cancel", "--registry", str(tiny_registry)]) == 0  # the CLI sees the same job
    assert jobs.wait_for_job(tiny_registry, later.id, TIMEOUT_S).state == jobs.CANCELLED


@pytest.mark.slow
def test_kill_9_mid_run_leaves_the_active_model_and_reports_failure(roots, tiny_registry):
    registry = Registry(tiny_registry)
    active, before = registry.active_version(), registry.versions()
    job = jobs.start_job(tiny_registry, tiny_config(epochs=500, patience=1000), actor=operator())
    wait_for_event(job, "epoch")
    os.killpg(job.record["pid"], signal.SIGKILL)
    job = jobs.wait_for_job(tiny_registry, job.id, 30)
    assert job.state == jobs.FAILED
    assert job.reason.startswith(jobs.STALE_REASON)
    assert registry.versions() == before and registry.active_version() == active
    assert registry.load().version == active  # still loads, checksum intact
    assert json.loads((job.dir / "status.json").read_text())["state"] == jobs.FAILED


def test_stale_running_record_is_reported_failed(tiny_registry):
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    me = jobs._proc_stat(os.getpid())
    for job_id, pid, ticks in (("20000101-000000", finished.pid, None),
                               ("20000101-000001", os.getpid(), me[1] + 1)):  # alive, but a reused pid
        job_dir = jobs.jobs_dir(tiny_registry) / job_id
        job_dir.mkdir(parents=True)
        (job_dir / "status.json").write_text(json.dumps({
            "id": job_id, "state": "running", "pid": pid, "start_ticks": ticks, "started": time.time() - 60,
            "config": tiny_config().to_dict(), "registry": str(tiny_registry)}))
        job = jobs.load_job(tiny_registry, job_id)
        assert (job.state, job.reason) == (jobs.FAILED, jobs.STALE_REASON)
        assert json.loads((job_dir / "status.json").read_text())["state"] == jobs.FAILED
    assert jobs.process_alive(os.getpid(), me[1]) is True


# -- small pieces ---------------------------------------------------------------------------------
def test_read_events_skips_a_half_written_line(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text('{"event": "scan"}\n{"event": "step", "ep')
    assert jobs.read_events(path) == [{"event": "scan"}]
    assert jobs.read_events(tmp_path / "missing.jsonl") == []


def test_summarize_progress_and_eta_by_hand():
    def step(epoch, step, t, eta):
        return {"event": "step", "epoch": epoch, "step": step, "steps": 4, "loss": 0.5, "time": t, "epoch_eta_s": eta}

    def epoch(n, seconds):
        return {"event": "epoch", "epoch": n, "epochs": 5, "train_loss": 0.6, "val_loss": 0.5, "val_auc": 0.8,
                "val_accuracy": 0.7, "seconds": seconds, "time": 0}

    record = {"started": 100.0, "config": {"epochs": 5}}
    events = [{"event": "data", "time": 101}, step(1, 1, 102, 30), epoch(1, 40), epoch(2, 20), step(3, 2, 170, 10)]
    p = jobs.summarize(events, record, now=180.0)
    assert p.phase == "training" and (p.epoch, p.step, p.steps) == (3, 2, 4)
    assert p.fraction == pytest.approx((2 + 2 / 4) / 5)
    assert p.eta_s == pytest.approx(10 + (5 - 3) * 30)  # rest of epoch 3, then two epochs at the mean 30 s
    assert p.elapsed_s == pytest.approx(80.0)
    done = jobs.summarize(events + [epoch(3, 30), {"event": "done", "version": "v", "time": 200}], record, now=200.0)
    assert done.phase == "finished" and done.fraction == 1.0 and done.eta_s is None


def test_summarize_an_ensemble_member_by_member():
    def step(member, epoch, step, t, eta):
        return {"event": "step", "epoch": epoch, "step": step, "steps": 4, "loss": 0.5, "time": t, "epoch_eta_s": eta,
                "member": member, "members": 3}

    def epoch(member, n, seconds):
        return {"event": "epoch", "epoch": n, "epochs": 4, "train_loss": 0.6, "val_loss": 0.5, "val_auc": 0.8,
                "val_accuracy": 0.7, "seconds": seconds, "time": 0, "member": member, "members": 3}

    record = {"started": 100.0, "config": {"epochs": 4, "members": 3}}
    # member 1 stops early after 2 of 4 epochs; member 2 has done 1 of the 4 steps of its first epoch
    events = [{"event": "data", "time": 101}, step(0, 1, 1, 102, 10), epoch(0, 1, 20), epoch(0, 2, 20),
              {"event": "early_stop", "epoch": 2, "best_epoch": 1, "member": 0, "members": 3, "time": 150},
              step(1, 1, 1, 160, 10)]
    p = jobs.summarize(events, record, now=170.0)
    assert p.phase == "training" and (p.member, p.members, p.epoch, p.step) == (1, 3, 1, 1)
    assert p.fraction == pytest.approx((1 + (0 + 1 / 4) / 4) / 3)  # member 2's first epoch, a quarter done
    # rest of this epoch, 3 more epochs of this member, then at most 4 epochs of member 3, at 20 s each
    assert p.eta_s == pytest.approx(10 + (4 - 1 + 4) * 20)
    assert [r["member"] for r in p.history] == [0, 0]
    # the last member's early stop means saving comes next
    last = events + [step(2, 1, 1, 200, 5), {"event": "early_stop", "epoch": 1, "member": 2, "members": 3, "time": 210}]
    assert jobs.summarize(last, record, now=211.0).phase == "saving"


def test_recent_folders_newest_first_without_repeats(tmp_path):
    for folder in ["/a", "/b", "/a"] + [f"/f{i}" for i in range(10)]:
        jobs.remember_folder(tmp_path, folder)
    recent = jobs.recent_folders(tmp_path)
    assert recent[0] == "/f9" and len(recent) == jobs.RECENT_MAX and len(set(recent)) == len(recent)
    (jobs.jobs_dir(tmp_path) / jobs.RECENT_NAME).write_text("{broken")
    assert jobs.recent_folders(tmp_path) == []
