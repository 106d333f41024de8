"""Retrain: check a local labelled folder, train a new model version on it in the background, and
watch it learn. The new version is inactive until someone activates it on the Models page."""
from __future__ import annotations

import time

import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from pages.common import current_actor, ensure_app_navigation, is_administrator
from xray.govern import promotion
from xray.train import jobs
from xray.model.net import STEMS
from xray.model.registry import Registry
from xray.train.config import TrainConfig

DEFAULTS = TrainConfig()  # the same defaults as `python -m xray train`
FOLDER_KEY = "retrain_folder"
RECENT_KEY = "retrain_recent"
SEEN_KEY = "retrain_seen_job"  # (job id, state) last drawn, to redraw the whole page when it changes
STEM_LABELS = {"patch4": "patch4: one 4x4 patch convolution (fast)",
               "conv": "conv: two 3x3 convolutions (about 4x the compute)"}
FROM_ACTIVE, FROM_SCRATCH = "The active model (fine-tune)", "Scratch (a new model)"


def minutes(seconds: float | None) -> str:
    if seconds is None:
        return "estimating..."
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def learning_curves(history: list[dict]) -> go.Figure:
    """Training and validation loss on the left, validation AUC and accuracy on the right, per epoch;
    one set of lines per ensemble member."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Loss", "Validation AUC and accuracy"))
    by_member: dict[int, list[dict]] = {}
    for row in history:
        by_member.setdefault(row.get("member", 0), []).append(row)
    for member, rows in sorted(by_member.items()):
        epochs = [r["epoch"] for r in rows]
        suffix = f" (member {member + 1})" if len(by_member) > 1 else ""
        for key, name, col in (("train_loss", "training loss", 1), ("val_loss", "validation loss", 1),
                               ("val_auc", "validation AUC", 2), ("val_accuracy", "validation accuracy (at 0.5)", 2)):
            fig.add_scatter(x=epochs, y=[r[key] for r in rows], name=name + suffix, mode="lines+markers", row=1, col=col)
    longest = max((len(rows) for rows in by_member.values()), default=0)
    fig.update_xaxes(title_text="epoch", dtick=1 if longest <= 20 else None)
    fig.update_yaxes(range=[0, 1.02], row=1, col=2)
    fig.update_layout(height=320, margin=dict(l=10, r=10, t=40, b=10), legend=dict(orientation="h", y=-0.25))
    return fig


def show_outcome(job: jobs.Job) -> None:
    """How the last run ended, and what it means for the model the Diagnose page uses."""
    if job.state == jobs.SUCCEEDED:
        card = Registry(job.record["registry"]).card(job.version)
        registry = Registry(job.record["registry"])
        gate = promotion.gate(registry, job.version)
        figures = "; ".join(f"{name.replace('_', ' ')} {figure}" for name, figure in gate.figures.items())
        text = (f"Training finished: new version **{job.version}** (threshold {card.threshold:.6f}; {figures or 'no validation figures'}). ")
        if gate.passed:
            st.success(text + "It passes the promotion gate but is not active yet: compare it with the active model "
                       "and activate it on the Models page.", icon=":material/check_circle:")
        else:
            st.warning(text + "**It does not pass the promotion gate** (" + "; ".join(gate.reasons) + "): do not use "
                       "it for patients. The active model is unchanged.", icon=":material/gpp_bad:")
    elif job.state == jobs.CANCELLED:
        st.warning(f"The last training run was cancelled ({job.reason}). The active model is unchanged.",
                   icon=":material/cancel:")
    else:
        st.error(f"The last training run failed: {job.reason}. The active model is unchanged.", icon=":material/error:")


@st.fragment(run_every=2)
def job_panel(registry_root: str) -> None:
    """The running (or last) job, redrawn every two seconds from the files it writes."""
    job = jobs.current_job(registry_root)
    seen = (job.id, job.state) if job else None
    if st.session_state.get(SEEN_KEY, seen) != seen:
        st.session_state[SEEN_KEY] = seen
        st.rerun()  # a job started or ended (here or in another tab): the form's state changes too
    st.session_state[SEEN_KEY] = seen
    if job is None:
        st.info("No training has been run on this model registry yet.", icon=":material/info:")
        return
    progress = job.progress()
    if job.running:
        st.subheader("Training in progress")
        st.caption(f"Job {job.id} on {job.record['config']['data_dir']}. It keeps running if you leave this page "
                   "or close the browser; every tab shows the same job.")
        if progress.phase == "reading images":
            done, total = progress.decoded
            st.progress(done / total if total else 0.0, text=f"Reading images: {done} of {total}")
        elif progress.phase == "starting" or not progress.steps:
            st.progress(0.0, text="Starting..." if progress.phase == "starting" else "Preparing the first epoch...")
        else:
            member = (f"Member {progress.member + 1} of {progress.members}: " if progress.members > 1 else "")
            st.progress(progress.fraction, text=f"{member}Epoch {progress.epoch} of {progress.epochs}, "
                                                f"step {progress.step} of {progress.steps} ({progress.phase})")
        elapsed, left, phase = st.columns(3)
        elapsed.metric("Elapsed", minutes(progress.elapsed_s))
        left.metric("Time left (at most)", minutes(progress.eta_s) if progress.phase == "training" else "-",
                    help="Early stopping may end training sooner.")
        phase.metric("Stage", progress.phase)
        if st.button("Cancel training", key="retrain_cancel", icon=":material/stop_circle:"):
            jobs.cancel_job(registry_root, job.id, actor=current_actor())
            st.info("Stopping: the run ends after the current step and writes no version.")
    else:
        show_outcome(job)
    if progress.history:
        with st.expander("Learning curves", expanded=job.running):
            st.plotly_chart(learning_curves(progress.history), key="retrain_curves", config={"displayModeBar": False})
    log = job.log_tail(12)
    if log:
        with st.expander("Last log lines", expanded=job.running):
            st.code("\n".join(log), language=None)


@st.cache_data(ttl=300, max_entries=16, show_spinner=False)
def check_folder(folder: str, val_fraction: float, seed: int, image_size: int) -> tuple[jobs.FolderReport | None, str]:
    """(report, "") for a usable folder, (None, why) otherwise; decoding is cached on disk too."""
    cfg = TrainConfig(val_fraction=val_fraction, seed=seed, image_size=image_size)
    try:
        return jobs.inspect_folder(folder, cfg), ""
    except ValueError as exc:
        return None, str(exc)


def show_report(report: jobs.FolderReport) -> None:
    """What training will see in the folder: counts, the split, duplicates and files it will skip."""
    readable = sum(sum(row.values()) for row in report.counts.values())
    st.success(f"Ready to train: {readable} readable images from {report.patients} patients in {report.root}.",
               icon=":material/folder_check:")
    counts, split = st.columns(2)
    counts.markdown("**Images per class**")
    counts.dataframe([{"part": part, **row} for part, row in report.counts.items()], hide_index=True)
    split.markdown("**How training will use them**")
    split.dataframe([{"used for": "training", **report.train}, {"used for": "validation", **report.val}],
                    hide_index=True)
    st.caption(f"Validation: {report.validation}. Whole patients go to one side, so no patient is in both."
               + (f" {report.test} test images are reported only." if report.test else ""))
    if report.duplicates:
        st.warning(f"{len(report.duplicates)} group(s) of identical files. They are kept; the same image on both "
                   "sides of the split would flatter the validation figures.", icon=":material/content_copy:")
        with st.expander("Identical files"):
            st.dataframe([{"files": " = ".join(group)} for group in report.duplicates], hide_index=True)
    if report.unreadable:
        st.warning(f"{len(report.unreadable)} file(s) cannot be read and will be skipped.", icon=":material/warning:")
        with st.expander("Unreadable files"):
            st.dataframe([{"file": name, "reason": why} for name, why in report.unreadable], hide_index=True)
    if report.skipped:
        with st.expander(f"{len(report.skipped)} other file(s) ignored"):
            st.dataframe([{"file": name, "reason": why} for name, why in report.skipped], hide_index=True)


def use_recent() -> None:
    if st.session_state.get(RECENT_KEY):
        st.session_state[FOLDER_KEY] = st.session_state[RECENT_KEY]


def parse_widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise ValueError(f"model widths must be whole numbers separated by commas, not {text!r}") from None
    if not widths:
        raise ValueError("enter the model widths, e.g. 32,48,64")
    return widths


# -- the page -------------------------------------------------------------------------------------
registry = Registry()
registry_root = str(registry.root)

ensure_app_navigation()
if not is_administrator(current_actor(), "Retraining"):
    st.stop()  # app.py offers this page to administrators only; start_job refuses anyone else anyway
st.title("Retrain the model")
st.caption("Train a new model version on your own labelled chest X-rays. Training runs in the background "
           "on this machine. The model the Diagnose page uses changes only when you activate a new version "
           "on the Models page.")

running = jobs.current_job(registry_root)
running = running if running and running.running else None

st.header("1. Dataset folder")
recent = jobs.recent_folders(registry_root)
if recent:
    st.selectbox("Recent folders", recent, index=None, key=RECENT_KEY, on_change=use_recent,
                 placeholder="Pick a folder used before")
folder = st.text_input("Dataset folder", key=FOLDER_KEY, placeholder="/path/to/chest_xray/train",
                       help="A folder with NORMAL/ and PNEUMONIA/ subfolders at any depth. Allowed locations: "
                            + ", ".join(map(str, jobs.data_roots())))
report = None
if folder.strip():
    val_fraction = float(st.session_state.get("retrain_val_fraction", DEFAULTS.val_fraction))
    seed = int(st.session_state.get("retrain_seed", DEFAULTS.seed))
    image_size = int(st.session_state.get("retrain_image_size", DEFAULTS.image_size))
    with st.spinner("Checking the folder (every image is read once)..."):
        report, problem = check_folder(folder.strip(), val_fraction, seed, image_size)
    if report is None:
        st.error(f"This folder cannot be used: {problem}.", icon=":material/folder_off:")
    else:
        show_report(report)
    if st.button("Check again", key="retrain_recheck", help="Read the folder afresh after changing files in it."):
        check_folder.clear()
        st.rerun()

st.header("2. Settings")
with st.form("retrain_settings"):
    left, middle, right = st.columns(3)
    epochs = left.number_input("Epochs", 1, 500, DEFAULTS.epochs, key="retrain_epochs",
                               help="At most this many passes over the data; stops early when validation stops improving.")
    image_size = middle.number_input("Image size (pixels)", 32, 1024, DEFAULTS.image_size, step=16, key="retrain_image_size",
                                     help="Images are resized to this square; larger is slower. Fine-tuning keeps the model's size.")
    batch_size = right.number_input("Batch size", 1, 1024, DEFAULTS.batch_size, key="retrain_batch_size",
                                    help="Images per training step.")
    lr = left.number_input("Learning rate", 1e-6, 1.0, DEFAULTS.lr, step=1e-4, format="%.5f", key="retrain_lr",
                           help="Peak learning rate of the one-cycle schedule.")
    val_fraction = middle.number_input("Validation fraction", 0.05, 0.5, DEFAULTS.val_fraction, step=0.05,
                                       key="retrain_val_fraction",
                                       help="Share of patients held out to measure the model and choose its threshold.")
    seed = right.number_input("Seed", 0, 2**31 - 1, DEFAULTS.seed, key="retrain_seed",
                              help="Same data, settings and seed give the same split and the same model.")
    start_from = st.radio("Start from", [FROM_SCRATCH, FROM_ACTIVE], index=1 if DEFAULTS.init_from else 0,
                          key="retrain_start_from", horizontal=True,
                          help="Fine-tuning starts from the active model's weights and keeps its size and widths.")
    with st.expander("Advanced"):
        widths = st.text_input("Model widths", ",".join(map(str, DEFAULTS.widths)), key="retrain_widths",
                               help="Channels per stage, comma-separated; ignored when fine-tuning.")
        stem = st.selectbox("Stem", sorted(STEMS), index=sorted(STEMS).index(DEFAULTS.stem), key="retrain_stem",
                            format_func=STEM_LABELS.get,
                            help="The network's first layer; ignored when fine-tuning (docs/scaling.md compares them).")
        members = st.number_input("Ensemble members", 1, 8, DEFAULTS.members, key="retrain_members",
                                  help="Nets trained from different seeds and averaged: steadier probabilities on new "
                                       "images, at that many times the training and prediction time "
                                       "(docs/experiments.md). Fine-tuning keeps the active model's members.")
    start = st.form_submit_button("Start training", type="primary", icon=":material/play_arrow:",
                                  disabled=running is not None or report is None)
if running is not None:
    st.caption("A training job is running; a new one can start when it ends or is cancelled.")
elif report is None:
    st.caption("Choose a usable dataset folder above to start training.")

if start:
    try:
        if report is None:
            raise ValueError("choose a usable dataset folder first")
        cfg = TrainConfig(data_dir=report.root, epochs=int(epochs), image_size=int(image_size),
                          batch_size=int(batch_size), lr=float(lr), val_fraction=float(val_fraction), seed=int(seed),
                          init_from="active" if start_from == FROM_ACTIVE else "", widths=parse_widths(widths),
                          stem=stem, members=int(members))
        job = jobs.start_job(registry_root, cfg, actor=current_actor())
    except (ValueError, PermissionError) as exc:  # JobRefused included: another job runs, or a setting is unusable
        st.error(f"Training did not start: {exc}.", icon=":material/block:")
    else:
        st.session_state[SEEN_KEY] = (job.id, job.state)
        time.sleep(0.3)  # let the process write its first event before the page redraws
        st.rerun()

# progress and outcome right under the Start button, where the clinician is looking after a click
job_panel(registry_root)

past = jobs.list_jobs(registry_root)
if past:
    with st.expander(f"Past training runs ({len(past)})"):
        st.dataframe([{"job": j.id, "outcome": j.state, "details": j.reason, "version": j.version or "",
                       "data": j.record["config"]["data_dir"],
                       "started": time.strftime("%Y-%m-%d %H:%M", time.localtime(j.record["started"]))}
                      for j in past], hide_index=True)
