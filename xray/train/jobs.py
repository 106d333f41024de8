"""Background training jobs: one ``python -m xray train`` process per registry, its state on disk.

Layout under ``<registry>/jobs/``:
    train.lock              flock held by the running training process (inherited descriptor)
    recent_folders.json     the last dataset folders used, newest first
    <job id>/status.json    {state, pid, start ticks, argv, config, ...}; final once the process ends
    <job id>/events.jsonl   the engine's JSON-lines events (written by the training process)
    <job id>/output.log     the process's console output
    <job id>/cancel         present when a user asked the job to stop
    <job id>/returncode     exit status, when the process that started the job saw it end
The page and ``python -m xray jobs`` read the same files, so no browser session owns a job.
"""
from __future__ import annotations

import fcntl
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from xray.clock import utc_stamp
from xray.train import events as E
from xray import settings
from xray.atomic import atomic_write_json, atomic_write_text
from xray.govern import audit
from xray.govern.identity import ADMINISTRATOR, Actor, require
from xray.io.folders import CLASSES, scan_dataset
from xray.train.events import read_events  # noqa: F401 (part of this module's interface)
from xray.model.registry import Registry
from xray.settings import PACKAGE_ROOT
from xray.io.folders import load_training_data
from xray.train.config import TrainConfig, command_line

RUNNING, SUCCEEDED, FAILED, CANCELLED = "running", "succeeded", "failed", "cancelled"
LOCK_NAME = "train.lock"
RECENT_NAME = "recent_folders.json"
RECENT_MAX = 8
STALE_REASON = "process ended without finishing (killed?)"


class JobRefused(ValueError):
    """A job cannot start (another is running, or the folder or settings are unusable)."""


# -- data roots -----------------------------------------------------------------------------------
def data_roots() -> list[Path]:
    """Folders the Retrain page may read (``settings.data_roots``: $XRAY_DATA_ROOTS or the home folder)."""
    return settings.data_roots()


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def check_data_root(path: str | os.PathLike) -> Path:
    """The folder, resolved, if it lies under a configured data root; else ValueError saying why."""
    text = str(path).strip()
    if not text:
        raise ValueError("enter a dataset folder")
    resolved = Path(text).expanduser().resolve()  # symlinks followed: a link cannot smuggle us out
    roots = data_roots()
    if not _inside(resolved, roots):
        raise ValueError(f"{text} is outside the allowed data folders ({', '.join(map(str, roots))}); "
                         f"to allow it, {settings.data_roots_help()}")
    return resolved


def _check_links(scan) -> None:
    """Refuse a folder whose image files link outside the data roots."""
    roots = data_roots()
    for sample in scan.samples:
        if not _inside(sample.path.resolve(), roots):
            raise ValueError(f"{scan.relative(sample.path)} links outside the allowed data folders")


# -- folder check ---------------------------------------------------------------------------------
@dataclass
class FolderReport:
    """What training would see in a folder: counts, the validation split, duplicates, bad files."""

    root: str
    counts: dict[str, dict[str, int]]  # part ("all", "train", ...) -> class -> readable images
    patients: int
    fingerprint: str
    train: dict[str, int]  # class -> images used for training
    val: dict[str, int]  # class -> images used for validation
    test: int
    validation: str  # how validation is formed, as the model card will say
    duplicates: list[list[str]] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (relative path, why): skipped
    skipped: list[tuple[str, str]] = field(default_factory=list)  # not image files: skipped


def inspect_folder(path: str | os.PathLike, cfg: TrainConfig | None = None,
                   progress: Callable[[int, int], None] | None = None) -> FolderReport:
    """Check a dataset folder exactly as training will read it (``xray.io.folders.load_training_data``).

    Raises:
        ValueError: the folder is outside the data roots or cannot be trained on; the message says why.
    """
    root = check_data_root(path)
    cfg = replace(cfg or TrainConfig(), data_dir=str(root))
    _check_links(scan_dataset(root))
    seen: dict[str, dict] = {}

    def emit(event: dict) -> None:
        seen[event["event"]] = event
        if progress and event["event"] == E.DECODE:
            progress(event["done"], event["total"])

    try:
        data = load_training_data(cfg.data_dir, **cfg.folder_options(), emit=emit)  # decodes once into the on-disk cache the training run reuses
    except ValueError:
        unreadable = seen.get("unreadable", {}).get("files", [])
        if "scan" in seen and len(unreadable) == seen["scan"]["n"]:
            raise ValueError(f"none of the {len(unreadable)} images can be read "
                             f"(first: {unreadable[0][0]}: {unreadable[0][1]})") from None
        raise

    def per_class(indices) -> dict[str, int]:
        return {name: int((data.labels[indices] == label).sum()) for label, name in enumerate(CLASSES)}

    scan = data.scan
    return FolderReport(root=str(root), counts=scan.counts(), patients=len({s.patient for s in scan.samples}),
                        fingerprint=scan.fingerprint(), train=per_class(data.train), val=per_class(data.val),
                        test=int(len(data.test)), validation=data.description,
                        duplicates=scan.duplicates, unreadable=[tuple(u) for u in data.unreadable],
                        skipped=[tuple(s) for s in scan.skipped])


# -- the command ----------------------------------------------------------------------------------
def train_argv(cfg: TrainConfig, events: str | os.PathLike) -> list[str]:
    """The exact ``python -m xray train`` command for ``cfg``: the one its model card will record."""
    words = shlex.split(command_line(cfg))  # ["python", "-m", "xray", "train", DATA, options...]
    return [sys.executable, *words[1:], "--events", str(events)]


# -- jobs -----------------------------------------------------------------------------------------
def jobs_dir(registry_root: str | os.PathLike) -> Path:
    return Path(registry_root) / "jobs"


@dataclass
class Job:
    """One training run started from the page (or ``python -m xray jobs``) and its outcome."""

    id: str
    dir: Path
    record: dict

    @property
    def state(self) -> str:
        return self.record.get("state", FAILED)

    @property
    def reason(self) -> str:
        return self.record.get("reason", "")

    @property
    def version(self) -> str | None:
        return self.record.get("version")

    @property
    def running(self) -> bool:
        return self.state == RUNNING

    @property
    def events_path(self) -> Path:
        return self.dir / "events.jsonl"

    @property
    def log_path(self) -> Path:
        return self.dir / "output.log"

    @property
    def config(self) -> TrainConfig:
        return TrainConfig.from_dict(self.record["config"])

    def events(self) -> list[dict]:
        return read_events(self.events_path)

    def log_tail(self, lines: int = 15) -> list[str]:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 16384))
                text = f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return []
        return [line for line in text.replace("\r", "\n").splitlines() if line.strip()][-lines:]

    def progress(self) -> "Progress":
        return summarize(self.events(), self.record, now=None if self.running else self.record.get("ended"))


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) from /proc, or None where there is no /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return ("X", -1) if Path("/proc/self/stat").exists() else None
    except OSError:
        return None
    rest = text[text.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return rest[0], int(rest[19])


def process_alive(pid: int, start_ticks: int | None) -> bool:
    """True if ``pid`` is running and is the same process that was started (not a reused pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    stat = _proc_stat(pid)
    if stat is None:
        return True
    state, ticks = stat
    if state in ("Z", "X"):  # a zombie has finished; only its parent has not collected it yet
        return False
    return start_ticks is None or ticks == start_ticks


def _outcome(job_dir: Path, record: dict) -> dict:
    """Final state of a job whose process is gone, from its events (and the cancel marker)."""
    events = read_events(job_dir / "events.jsonl")
    terminal = next((e for e in reversed(events) if e.get("event") in E.TERMINAL), None)
    cancel_asked = (job_dir / "cancel").exists()
    ended = terminal["time"] if terminal and "time" in terminal else time.time()
    if terminal and terminal["event"] == E.DONE:
        return {"state": SUCCEEDED, "reason": f"new version {terminal['version']}", "version": terminal["version"],
                "ended": ended}
    if terminal and terminal["event"] == E.ERROR:
        return {"state": FAILED, "reason": terminal.get("message", "error"), "ended": ended}
    if (terminal and terminal["event"] == E.CANCELLED) or cancel_asked:
        return {"state": CANCELLED, "reason": "cancelled by the user; no version written", "ended": ended}
    reason = STALE_REASON
    returncode = _read_returncode(job_dir)
    if returncode is not None:
        reason += f" (exit status {returncode})"
    last = Job("", job_dir, record).log_tail(1)
    if last:
        reason += f"; last output: {last[0][:300]}"
    return {"state": FAILED, "reason": reason, "ended": ended}


def _read_returncode(job_dir: Path) -> int | None:
    try:
        return int((job_dir / "returncode").read_text())
    except (FileNotFoundError, ValueError):
        return None


def load_job(registry_root: str | os.PathLike, job_id: str) -> Job:
    """A job with its state brought up to date (a dead "running" job is finalised on disk)."""
    job_dir = jobs_dir(registry_root) / job_id
    record = json.loads((job_dir / "status.json").read_text())
    if record.get("state") == RUNNING and not process_alive(record["pid"], record.get("start_ticks")):
        record = {**record, **_outcome(job_dir, record)}
        atomic_write_json(job_dir / "status.json", record)  # the outcome becomes the record
    return Job(job_id, job_dir, record)


def list_jobs(registry_root: str | os.PathLike) -> list[Job]:
    """Every recorded job, newest first."""
    root = jobs_dir(registry_root)
    if not root.is_dir():
        return []
    jobs = []
    for d in sorted((p for p in root.iterdir() if (p / "status.json").is_file()), reverse=True):
        try:
            jobs.append(load_job(registry_root, d.name))
        except (json.JSONDecodeError, KeyError):
            continue  # a foreign or damaged folder is not a job
    return jobs


def current_job(registry_root: str | os.PathLike) -> Job | None:
    """The running job, or else the most recent one; None if none was ever started."""
    jobs = list_jobs(registry_root)
    return next((j for j in jobs if j.running), jobs[0] if jobs else None)


def _new_job_id(root: Path) -> str:
    base = utc_stamp()
    job_id, n = base, 1
    while (root / job_id).exists():
        n += 1
        job_id = f"{base}-{n}"
    return job_id


def validate_config(registry_root: str | os.PathLike, cfg: TrainConfig) -> None:
    """Refuse settings the run would only reject after loading the data."""
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0 or cfg.image_size < 32:
        raise JobRefused("epochs and batch size must be at least 1, the learning rate positive, "
                         "the image size at least 32")
    if not 0 < cfg.val_fraction < 1:
        raise JobRefused("the validation fraction must be between 0 and 1")
    if not cfg.widths or any(int(w) < 1 for w in cfg.widths):
        raise JobRefused("model widths must be positive integers, e.g. 32,48,64")
    if cfg.init_from:
        registry = Registry(registry_root)
        source = registry.active_version() if cfg.init_from == "active" else cfg.init_from
        if source is None:
            raise JobRefused("there is no active model to start from; choose from scratch")
        size = registry.card(source).image_size
        if size != cfg.image_size:
            raise JobRefused(f"fine-tuning keeps the model's image size: set it to {size} (the image size of {source})")


def start_job(registry_root: str | os.PathLike, cfg: TrainConfig, *, actor: Actor) -> Job:
    """Start ``python -m xray train`` for ``cfg`` in its own process group and return the job; the job
    record and one ``training-started`` audit line name ``actor``.

    Raises:
        identity.NotPermitted: ``actor`` is not an administrator (nothing is started).
        JobRefused: a job is already running on this registry, or the folder or settings are unusable.
    """
    require(actor, ADMINISTRATOR, "starting a training job")
    registry_root = Path(registry_root).resolve()
    try:
        data_dir = check_data_root(cfg.data_dir)
        _check_links(scan_dataset(data_dir))
    except ValueError as exc:
        raise JobRefused(str(exc)) from None
    validate_config(registry_root, cfg)
    root = jobs_dir(registry_root)
    root.mkdir(parents=True, exist_ok=True)
    lock_fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            running = current_job(registry_root)
            detail = f": job {running.id} (pid {running.record['pid']})" if running and running.running else ""
            raise JobRefused(f"a training job is already running for {registry_root}{detail}; "
                             "wait for it or cancel it") from None
        job_id = _new_job_id(root)
        job_dir = root / job_id
        job_dir.mkdir()
        cfg = replace(cfg, data_dir=str(data_dir), registry=str(registry_root),
                      run_dir=str(registry_root / "runs" / job_id), activate=False, resume=False)
        argv = train_argv(cfg, job_dir / "events.jsonl")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")])),
               "PYTHONUNBUFFERED": "1"}
        with open(job_dir / "output.log", "ab") as log:
            # The child inherits the locked descriptor: the lock lives exactly as long as the
            # training process, however it ends (even kill -9), with nothing to clean up.
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       cwd=PACKAGE_ROOT, env=env, start_new_session=True, pass_fds=(lock_fd,))
        stat = _proc_stat(process.pid)
        record = {"id": job_id, "state": RUNNING, "reason": "", "pid": process.pid,
                  "start_ticks": stat[1] if stat else None, "started": time.time(), "argv": argv,
                  "config": cfg.to_dict(), "registry": str(registry_root), "by": actor.label,
                  "subject": actor.subject}
        atomic_write_json(job_dir / "status.json", record)
    finally:
        os.close(lock_fd)
    threading.Thread(target=_reap, args=(process, job_dir), daemon=True).start()
    remember_folder(registry_root, str(data_dir))
    try:
        audit.record_event("training-started", actor=actor, job=job_id, data_dir=str(data_dir))
    except OSError:
        pass  # the job record names who started it; an unwritable audit log does not orphan a running job
    return Job(job_id, job_dir, record)


def _reap(process: subprocess.Popen, job_dir: Path) -> None:
    """Collect the child when it ends (no zombie) and note its exit status."""
    returncode = process.wait()
    try:
        atomic_write_text(job_dir / "returncode", f"{returncode}\n")
    except OSError:
        pass


def cancel_job(registry_root: str | os.PathLike, job_id: str | None = None, *, actor: Actor) -> bool:
    """Ask the running job to stop (SIGTERM to its process group); False if none was running.

    Raises:
        identity.NotPermitted: ``actor`` is not an administrator (nothing is cancelled).
    """
    require(actor, ADMINISTRATOR, "cancelling a training job")
    job = load_job(registry_root, job_id) if job_id else current_job(registry_root)
    if job is None or not job.running:
        return False
    (job.dir / "cancel").touch()
    try:
        os.killpg(job.record["pid"], signal.SIGTERM)  # start_new_session made pid the group id
    except ProcessLookupError:
        pass
    return True


def wait_for_job(registry_root: str | os.PathLike, job_id: str, timeout_s: float, poll_s: float = 0.2) -> Job:
    """Poll until the job is no longer running; TimeoutError after ``timeout_s``."""
    deadline = time.time() + timeout_s
    while True:
        job = load_job(registry_root, job_id)
        if not job.running:
            return job
        if time.time() > deadline:
            raise TimeoutError(f"job {job_id} still running after {timeout_s:.0f} s")
        time.sleep(poll_s)


# -- progress -------------------------------------------------------------------------------------
@dataclass
class Progress:
    """A running or finished job in the words the page shows."""

    phase: str  # starting | reading images | training | saving | finished
    member: int = 0  # the ensemble member being trained, from 0
    members: int = 1
    epoch: int = 0
    epochs: int = 0
    step: int = 0
    steps: int = 0
    fraction: float = 0.0  # of the planned epochs of all members (early stopping may end sooner)
    elapsed_s: float = 0.0
    eta_s: float | None = None
    decoded: tuple[int, int] = (0, 0)
    history: list[dict] = field(default_factory=list)  # one row per epoch: member, epoch, train_loss, val_loss, val_auc, ...
    data: dict = field(default_factory=dict)  # the "data" event: train/val sizes and the split used
    unreadable: list = field(default_factory=list)
    stopped_early: bool = False


def summarize(events: list[dict], record: dict, now: float | None = None) -> Progress:
    """Fold the event stream into the progress the page and the CLI show."""
    started = record.get("started") or (events[0]["time"] if events else time.time())
    config = record.get("config", {})
    p = Progress(phase="starting", epochs=int(config.get("epochs", 0)), members=int(config.get("members", 1) or 1))
    epoch_first_step_time: dict[tuple[int, int], float] = {}
    last_step: dict | None = None
    for e in events:
        kind = e.get("event")
        if kind in (E.SCAN, E.DECODE):
            p.phase = "reading images"
            if kind == E.DECODE:
                p.decoded = (e["done"], e["total"])
        elif kind == E.UNREADABLE:
            p.unreadable = e["files"]
        elif kind == E.DATA:
            p.data = e
            p.phase = "training"
        elif kind == E.STEP:
            p.phase, last_step = "training", e
            p.member, p.members = e.get("member", 0), e.get("members", p.members)
            p.epoch, p.step, p.steps = e["epoch"], e["step"], e["steps"]
            epoch_first_step_time.setdefault((p.member, e["epoch"]), e["time"])
        elif kind == E.EPOCH:
            p.history.append({"member": e.get("member", 0),
                              **{k: e[k] for k in ("epoch", "train_loss", "val_loss", "val_auc", "val_accuracy", "seconds")}})
            p.epochs = e.get("epochs", p.epochs)
        elif kind in E.STOPPING:
            p.stopped_early = True
            if e.get("member", 0) + 1 >= e.get("members", p.members):  # the last member: what follows is saving
                p.phase = "saving"
        elif kind in E.TERMINAL:
            p.phase = "finished"
    mine = [r for r in p.history if r["member"] == p.member]  # the current member's finished epochs
    completed = len(mine)
    in_epoch = last_step is not None and last_step["epoch"] > (mine[-1]["epoch"] if mine else 0)
    if p.epochs:
        within = p.step / p.steps if in_epoch and p.steps else 0.0
        p.fraction = min(1.0, (p.member + min(1.0, (completed + within) / p.epochs)) / p.members)
    if (p.phase == "training" and completed and not in_epoch and completed >= p.epochs
            and p.member + 1 >= p.members):
        p.phase = "saving"
    if events and events[-1].get("event") == E.DONE:
        p.fraction = 1.0
    end = now if now is not None else time.time()
    p.elapsed_s = max(0.0, end - started)
    if p.phase == "training" and last_step is not None:
        if p.history:
            per_epoch = sum(r["seconds"] for r in p.history) / len(p.history)
        else:
            per_epoch = (last_step["time"] - epoch_first_step_time[(p.member, p.epoch)]) + last_step["epoch_eta_s"]
        remaining_in_epoch = last_step["epoch_eta_s"] if in_epoch else 0.0
        later_members = (p.members - p.member - 1) * p.epochs  # each may stop early: an upper bound
        p.eta_s = remaining_in_epoch + (p.epochs - max(completed, p.epoch) + later_members) * per_epoch
    return p


def status_lines(job: Job) -> str:
    """A few plain lines about a job, for ``python -m xray jobs``."""
    p = job.progress()
    lines = [f"job {job.id}: {job.state}" + (f" - {job.reason}" if job.reason else ""),
             f"  data: {job.record['config']['data_dir']}",
             f"  started: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(job.record['started']))}"
             f"  elapsed: {p.elapsed_s / 60:.1f} min"]
    if job.running:
        lines.append(f"  {p.phase}: " + (f"member {p.member + 1}/{p.members}, " if p.members > 1 else "")
                     + f"epoch {p.epoch}/{p.epochs}, step {p.step}/{p.steps}"
                     + (f", about {p.eta_s / 60:.1f} min left" if p.eta_s is not None else ""))
    for row in p.history[-3:]:
        lines.append(f"  {'member ' + str(row['member'] + 1) + ' ' if p.members > 1 else ''}epoch {row['epoch']}: train loss {row['train_loss']:.4f}, val loss {row['val_loss']:.4f}, "
                     f"val AUC {row['val_auc']:.4f}, val acc {row['val_accuracy']:.4f}")
    lines.append(f"  events: {job.events_path}\n  output: {job.log_path}")
    return "\n".join(lines)


# -- recent folders -------------------------------------------------------------------------------
def recent_folders(registry_root: str | os.PathLike) -> list[str]:
    try:
        folders = json.loads((jobs_dir(registry_root) / RECENT_NAME).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    return [f for f in folders if isinstance(f, str)][:RECENT_MAX] if isinstance(folders, list) else []


def remember_folder(registry_root: str | os.PathLike, folder: str) -> None:
    folders = [folder] + [f for f in recent_folders(registry_root) if f != folder]
    atomic_write_json(jobs_dir(registry_root) / RECENT_NAME, folders[:RECENT_MAX])
