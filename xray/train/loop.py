"""Training from scratch (or fine-tuning), shaped like torchvision's classification reference:
``train_one_epoch``, ``evaluate``, ``main(config)`` (the data: ``xray.io.folders.load_training_data``). Progress goes to callbacks; the
CLI attaches a console printer and a JSON-lines event file that the Retrain page reads."""
from __future__ import annotations

import copy
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import PIL
import torch

from xray.clock import utc_stamp
from xray.decide import borderline

from xray.govern import promotion
from xray.govern.identity import operator
from xray.decide import calibration as C
from xray.model import card as model_card
from xray.train import events as E
from xray.decide import metrics as M
from xray.model import ood as O
from xray.model.outside_net import OUTSIDE_NET_FILE, OutsideNetConfig
from xray.atomic import atomic_write
from xray.io.augment import PERTURBATIONS, PRESETS, augment
from xray.io.preprocess import try_read_model_input
from xray.io.folders import CLASSES, TrainingData, load_training_data
from xray.train.distributed import (  # noqa: F401
    Cancelled,
    any_rank,
    average_buffers,
    from_rank0,
    gather_logits,
    raise_together,
)
from xray.model.net import (
    EnsembleNet,
    ModelConfig,
    PneumoniaNet,
    autocast_for,
    build_net,
    count_macs,
    count_parameters,
    place,
    to_input,
    tta_logits,
)
from xray.train.optim import EMA, loss_fn, make_optimizer
from xray.model.registry import Registry, pick_device
from xray.train.config import TrainConfig, command_line, model_config  # noqa: F401 (re-exported for callers)

Callback = Callable[[dict], None]


# -- steps --------------------------------------------------------------------------------------------
def _config_of(model: torch.nn.Module) -> ModelConfig:
    return (model.module if hasattr(model, "module") else model).config  # DDP wraps the net


@dataclass(frozen=True)
class EpochContext:
    """What every epoch of one member reads: the data, the settings, the seeded RNG and this process's place."""

    images: torch.Tensor  # (N, S, S) uint8, every readable image
    labels: torch.Tensor  # (N,) int64
    cfg: TrainConfig
    pos_weight: float  # ``TrainingData.pos_weight``
    generator: torch.Generator  # augmentation, batch order, mixup
    device: torch.device
    emit: Callback = lambda event: None
    should_stop: Callable[[], bool] = lambda: False
    ema: EMA | None = None
    scaler: "torch.amp.GradScaler | None" = None  # fp16 loss scaling (CUDA without bf16)
    rank: int = 0
    world: int = 1


def train_one_epoch(model, optimizer, scheduler, indices: np.ndarray, epoch: int, ctx: EpochContext) -> float:
    """One pass over ``indices`` in a seeded random order; returns the mean training loss."""
    model.train()
    cfg, generator, device, rank, world = ctx.cfg, ctx.generator, ctx.device, ctx.rank, ctx.world
    aug = PRESETS[cfg.augment]
    order = indices[torch.randperm(len(indices), generator=generator).numpy()]
    order = order[rank::world]  # same permutation on every rank; each takes its own stride
    steps = max(1, len(indices) // world // cfg.batch_size)  # identical on every rank (DDP needs it)
    total, count, started = 0.0, 0, time.time()
    for step in range(steps):
        if any_rank(ctx.should_stop(), world, device):  # every rank stops at the same step
            raise Cancelled()
        idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        x = ctx.images[idx].unsqueeze(1).float()  # (B, 1, S, S) in [0, 255]
        y = ctx.labels[idx].float()
        if aug is not None:
            x = augment(x, aug, generator, labels=y)
        if cfg.mixup > 0:
            lam = float(np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=generator))).beta(cfg.mixup, cfg.mixup))
            perm = torch.randperm(len(idx), generator=generator)
            x, y = lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm]
        with autocast_for(device):  # bf16/fp16 on a GPU, float32 on the CPU
            logits = model(to_input(x, device, _config_of(model)))
            loss = loss_fn(logits, y.to(device), ctx.pos_weight, cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler = ctx.scaler
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:  # fp16 only: scale the loss so small gradients do not underflow
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        scheduler.step()
        if ctx.ema is not None:
            ctx.ema.update(model.module if hasattr(model, "module") else model)
        total += loss.item() * len(idx)
        count += len(idx)
        if step % 10 == 0 or step == steps - 1:
            elapsed = time.time() - started
            ctx.emit({"event": E.STEP, "epoch": epoch, "step": step + 1, "steps": steps, "loss": loss.item(),
                  "lr": scheduler.get_last_lr()[0], "epoch_eta_s": elapsed / (step + 1) * (steps - step - 1)})
    return total / max(count, 1)


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, images: torch.Tensor, indices: np.ndarray, device: torch.device,
                   batch_size: int = 128, tta: str = "none") -> np.ndarray:
    """(N, S, S) uint8 images[indices] -> (n,) float32 logits, with the card's TTA (``model.tta_logits``)."""
    model.eval()
    out = []
    for start in range(0, len(indices), batch_size):
        idx = indices[start:start + batch_size]
        with autocast_for(device):
            x = to_input(images[idx].unsqueeze(1), device, _config_of(model))
            out.append(tta_logits(model, x, tta).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def evaluate(logits: np.ndarray, labels: np.ndarray, pos_weight: float) -> dict:
    """Validation loss (class-balanced, no smoothing), AUC and accuracy at 0.5."""
    t_logits, t_labels = torch.from_numpy(logits), torch.from_numpy(labels).float()
    p = torch.sigmoid(t_logits).numpy()
    return {"val_loss": float(loss_fn(t_logits, t_labels, pos_weight, 0.0)),
            "val_auc": M.roc_auc(labels, p), "val_accuracy": float(np.mean((p >= 0.5) == labels))}


# -- checkpoints --------------------------------------------------------------------------------------
def save_checkpoint(path: Path, state: dict) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


def environment() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "pillow": PIL.__version__, "platform": platform.platform(), "cpu_threads": torch.get_num_threads()}


# -- main ---------------------------------------------------------------------------------------------
def main(cfg: TrainConfig, callbacks: list[Callback] | None = None,
         should_stop: Callable[[], bool] = lambda: False) -> str:
    """Train and register a new inactive version; returns its id."""
    callbacks = callbacks or []
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    distributed = world > 1

    def emit(event: dict) -> None:
        if rank != 0:
            return
        event = {"time": time.time(), **event}
        for cb in callbacks:
            cb(event)

    if cfg.members < 1:
        raise ValueError("members must be at least 1")
    if cfg.augment not in PRESETS:
        raise ValueError(f"augment must be one of {sorted(PRESETS)}")
    if not M.is_threshold_rule(cfg.threshold_rule):
        raise ValueError(f"threshold_rule must be one of {M.THRESHOLD_RULES} (any floor after >=)")
    device = pick_device()
    if distributed:
        import torch.distributed as dist
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
    try:
        return _train(cfg, emit, should_stop, device, rank, world)
    finally:
        if distributed:
            import torch.distributed as dist
            dist.destroy_process_group()


def _train(cfg: TrainConfig, emit: Callback, should_stop: Callable[[], bool], device: torch.device,
           rank: int, world: int) -> str:
    """``main`` once this process knows its place: rank 0 of 1 when alone, else one of a torchrun job."""
    distributed = world > 1
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))  # processes sharing this machine's cores
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // local_world)
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.run_seed)
    registry = Registry(cfg.registry or None)
    started = time.time()
    emit({"event": E.START, "config": cfg.to_dict(), "pid": os.getpid(), "world_size": world})

    failure, source = None, None
    try:  # the errors a user can cause (bad folder, bad source model) happen here, on every rank alike
        data = load_training_data(cfg.data_dir, **cfg.folder_options(), emit=emit)
        if cfg.init_from:
            source = registry.load(None if cfg.init_from == "active" else cfg.init_from, torch.device("cpu"))
            if source.image_size != cfg.image_size:
                raise ValueError(f"fine-tuning needs the source model's image size {source.image_size}")
            # fine-tuning keeps the source's architecture, its number of ensemble members included
            cfg = replace(cfg, members=source.net.config.members)
    except (ValueError, Cancelled) as exc:
        failure = exc
    raise_together(failure, world)
    emit({"event": E.DATA, "train": len(data.train), "val": len(data.val), "test": len(data.test),
          "validation": data.description, "pos_weight": data.pos_weight})

    run_dir = Path(cfg.run_dir) if cfg.run_dir else registry.root / "runs" / utc_stamp()
    run_dir = Path(from_rank0(str(run_dir), world))  # a default name from the clock could differ per rank
    nets, best_epochs, histories = [], [], []
    for member in range(cfg.members):
        # an ensemble's members share the split and differ in their weights' seed (and so in their
        # augmentation and batch order); one net keeps the layout and seed of earlier versions
        member_dir = run_dir if cfg.members == 1 else run_dir / f"member-{member + 1}"
        net, best_epoch, history = _fit_member(cfg, member, cfg.run_seed + 1000 * member, data, source, member_dir,
                                               emit, should_stop, device, rank, world, started)
        nets.append(net)
        best_epochs.append(best_epoch)
        histories.extend(history)
    if distributed:
        import torch.distributed as dist
        dist.barrier()
        if rank != 0:
            return ""  # rank 0 alone calibrates and writes the version
    final = nets[0] if cfg.members == 1 else assemble_ensemble(nets)
    parent = source.version if source is not None else None
    return register(final, cfg, data, best_epochs[0] if cfg.members == 1 else best_epochs, histories,
                    time.time() - started, registry, parent, device, emit)


def assemble_ensemble(nets: list[PneumoniaNet]) -> EnsembleNet:
    """One ``EnsembleNet`` holding the trained members' weights."""
    ensemble = EnsembleNet(replace(nets[0].config, members=len(nets)))
    for slot, net in zip(ensemble.members, nets):
        slot.load_state_dict(net.state_dict())
    return ensemble.to(next(nets[0].parameters()).device).eval()


@dataclass
class Member:
    """One net under training and the optimisation state it carries from epoch to epoch."""

    model: torch.nn.Module  # the net itself: what checkpoints and evaluation read
    train_model: torch.nn.Module  # the same net, wrapped in DistributedDataParallel under torchrun
    config: ModelConfig
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: EMA | None
    generator: torch.Generator
    scaler: "torch.amp.GradScaler | None"


@dataclass
class Progress:
    """Where a member's training stands: the next epoch, the rows so far and the best epoch's weights."""

    next_epoch: int = 1
    history: list = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"score": -math.inf, "epoch": 0, "state": None})


def _build_member(cfg: TrainConfig, member: int, seed: int, source, n_train: int, device: torch.device,
                  world: int) -> Member:
    """The net (from ``seed``, or the fine-tuning source's member), its optimiser, schedule, EMA and RNG."""
    torch.manual_seed(seed)
    model_cfg = model_config(cfg).member
    model = PneumoniaNet(model_cfg)
    if source is not None:  # fine-tuning: this member starts from the source's net (or its member of the same number)
        start = source.net.members[member] if isinstance(source.net, EnsembleNet) else source.net
        model = copy.deepcopy(start).float()
        model_cfg = start.config
    model = place(model, device)
    train_model = model
    if world > 1:
        # Parameters stay identical on every rank (gradients are averaged). BatchNorm running
        # statistics are averaged once per epoch (_average_buffers) instead of being broadcast from
        # rank 0 before every step: one collective per epoch rather than one per step. Batch
        # statistics stay per process (no SyncBatchNorm, see docs/scaling.md).
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False)
    steps_per_epoch = max(1, n_train // world // cfg.batch_size)
    optimizer, scheduler = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.epochs, steps_per_epoch)
    ema = EMA(model, cfg.ema) if cfg.ema > 0 else None
    generator = torch.Generator().manual_seed(seed)
    scaler = None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():  # fp16 autocast needs loss scaling
        scaler = torch.amp.GradScaler("cuda")
    return Member(model, train_model, model_cfg, optimizer, scheduler, ema, generator, scaler)


def _resume(path: Path, m: Member, cfg: TrainConfig, device: torch.device, rank: int, world: int,
            emit: Callback) -> Progress:
    """The progress saved in ``path`` (weights, optimiser, schedule, every RNG, EMA) with ``--resume``; else a fresh start."""
    ckpt = None
    if cfg.resume and rank == 0 and path.is_file():
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    ckpt = from_rank0(ckpt, world)  # only rank 0 writes checkpoints: other machines need not share its disk
    if ckpt is None:
        return Progress()
    m.model.load_state_dict(ckpt["model"])
    m.optimizer.load_state_dict(ckpt["optimizer"])
    m.scheduler.load_state_dict(ckpt["scheduler"])
    m.generator.set_state(ckpt["generator"])
    if ckpt.get("torch_rng") is not None:  # dropout draws from the global RNG: resume it too
        torch.set_rng_state(ckpt["torch_rng"])
    if ckpt.get("cuda_rng") and device.type == "cuda":
        torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
    if m.ema is not None and ckpt.get("ema"):
        m.ema.shadow = ckpt["ema"]
    emit({"event": E.RESUMED, "epoch": ckpt["epoch"]})
    return Progress(ckpt["epoch"] + 1, ckpt["history"], ckpt["best"])


def _save_checkpoint(path: Path, m: Member, progress: Progress, epoch: int, cfg: TrainConfig,
                     device: torch.device) -> None:
    """Everything ``_resume`` needs to continue after ``epoch``, written atomically."""
    save_checkpoint(path, {
        "model": m.model.state_dict(), "optimizer": m.optimizer.state_dict(),
        "scheduler": m.scheduler.state_dict(), "generator": m.generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
        "ema": m.ema.shadow if m.ema else None, "epoch": epoch, "history": progress.history, "best": progress.best,
        "config": cfg.to_dict()})


def _run_epoch(m: Member, ctx: EpochContext, data: TrainingData, epoch: int) -> tuple[dict, torch.nn.Module]:
    """Train one epoch and score validation; returns (the history row, the net that was scored: the EMA's or the net)."""
    epoch_start = time.time()
    rank, world, device = ctx.rank, ctx.world, ctx.device
    train_loss = train_one_epoch(m.train_model, m.optimizer, m.scheduler, data.train, epoch, ctx)
    buffer_names = [name for name, _ in m.model.named_buffers()]
    average_buffers([b for _, b in m.model.named_buffers()]
                    + ([m.ema.shadow[name] for name in buffer_names] if m.ema is not None else []), world)
    eval_model = m.model  # identical on every rank from here on
    if m.ema is not None:
        eval_model = place(build_net(m.config), device)
        eval_model.load_state_dict(m.ema.shadow)
    # each rank scores its share of the validation images; all ranks then hold all logits, so
    # metrics, the best epoch and early stopping agree everywhere
    val_logits = gather_logits(predict_logits(eval_model, ctx.images, data.val[rank::world], device),
                               len(data.val), world)
    row = {"epoch": epoch, "train_loss": train_loss,
           **evaluate(val_logits, data.labels[data.val], ctx.pos_weight),
           "seconds": time.time() - epoch_start}
    if world > 1:  # each rank's loss is over its own equal share of the batches: average them
        import torch.distributed as dist
        t = torch.tensor([train_loss], dtype=torch.float64)
        dist.all_reduce(t)
        row["train_loss"] = float(t) / world
    return row, eval_model


def _fit_member(cfg: TrainConfig, member: int, seed: int, data: TrainingData, source, run_dir: Path, emit: Callback,
                should_stop: Callable[[], bool], device: torch.device, rank: int, world: int,
                started: float) -> tuple[PneumoniaNet, int, list]:
    """Train one net (one member of an ensemble) from ``seed``; returns (best net, best epoch, history).
    Checkpoints go to ``run_dir`` after every epoch (``--resume`` continues from there)."""
    parent_emit = emit

    def emit(event: dict) -> None:  # every event of this member says which member it is (the progress view)
        parent_emit({**event, "member": member, "members": cfg.members})

    m = _build_member(cfg, member, seed, source, len(data.train), device, world)
    ctx = EpochContext(torch.from_numpy(data.images), torch.from_numpy(data.labels), cfg, data.pos_weight,
                       m.generator, device, emit, should_stop, m.ema, m.scaler, rank, world)
    checkpoint_path = run_dir / "checkpoint.pt"
    progress = _resume(checkpoint_path, m, cfg, device, rank, world, emit)
    first_epoch, train_seconds = progress.next_epoch, 0.0
    for epoch in range(first_epoch, cfg.epochs + 1):
        row, eval_model = _run_epoch(m, ctx, data, epoch)
        progress.history.append(row)
        train_seconds += row["seconds"]
        score = round(row["val_auc"], 4) - 1e-3 * row["val_loss"]  # AUC first, loss breaks ties
        if score > progress.best["score"]:
            progress.best = {"score": score, "epoch": epoch,
                             "state": {k: v.detach().cpu().clone() for k, v in eval_model.state_dict().items()}}
        remaining = (cfg.epochs - epoch) * (train_seconds / (epoch - first_epoch + 1))
        emit({"event": E.EPOCH, **row, "best_epoch": progress.best["epoch"], "eta_s": remaining, "epochs": cfg.epochs})
        if rank == 0:
            _save_checkpoint(checkpoint_path, m, progress, epoch, cfg, device)
        if epoch - progress.best["epoch"] >= cfg.patience:
            emit({"event": E.EARLY_STOP, "epoch": epoch, "best_epoch": progress.best["epoch"]})
            break
        # clocks differ between ranks: decide together, or one rank would wait for the others forever
        if any_rank(bool(cfg.max_minutes) and (time.time() - started) / 60 > cfg.max_minutes, world, device):
            emit({"event": E.TIME_LIMIT, "epoch": epoch})
            break
        if any_rank(should_stop(), world, device):
            raise Cancelled()

    final = build_net(m.config)
    final.load_state_dict(progress.best["state"])
    return final.to(device).eval(), progress.best["epoch"], progress.history


def _eval_block(y: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    return {**M.metrics_at(y, p, threshold), "ece": M.expected_calibration_error(y, p)}


def register(net: PneumoniaNet, cfg: TrainConfig, data: TrainingData, best_epoch: int, history: list,
             seconds: float, registry: Registry, parent: str | None, device: torch.device, emit: Callback) -> str:
    """Calibrate, choose the threshold, build the card (``xray.model.card.build``), save the version (inactive)."""
    images = torch.from_numpy(data.images)
    y_val = data.labels[data.val]
    # (1 + P, N) logits: the validation images as they are, then under each acquisition perturbation; the
    # calibration set (all rows, or row 0 alone) and the borderline band both read them
    all_logits = perturbed_logits(net, images[data.val], device, cfg.tta)
    val_logits = all_logits[0]
    if cfg.calibrate_on not in ("perturbed", "clean"):
        raise ValueError(f"unknown calibrate_on {cfg.calibrate_on!r}; perturbed or clean")
    fitted = all_logits if cfg.calibrate_on == "perturbed" else all_logits[:1]  # the operating point has to hold
    fit_logits, fit_labels = fitted.ravel(), np.tile(y_val, len(fitted))         # when the exposure changes
    scale, bias = C.fit_platt(fit_logits, fit_labels)
    p_val = C.apply(val_logits, scale, bias)
    conditions = np.repeat(np.arange(len(fitted)), len(y_val))  # 0 = as they are, then each perturbation
    threshold = M.choose_threshold(fit_labels, C.apply(fit_logits, scale, bias), cfg.threshold_rule, conditions)
    band = borderline.band_from_logits(scale * all_logits.astype(np.float64) + bias)
    extras, ood_summary = {}, {}
    try:  # OOD statistics of the training features, thresholded on validation (xray/ood.py)
        ood_stats, ood_summary = O.fit_for_images(net, images, data.train, data.val, device)
        extras[O.OOD_FILE] = ood_stats.to_bytes()
    except (ValueError, np.linalg.LinAlgError) as exc:
        ood_summary = {"skipped": str(exc)}
    test = None
    if len(data.test):
        y_test = data.labels[data.test]
        p_test = C.apply(predict_logits(net, images, data.test, device, tta=cfg.tta), scale, bias)
        test = {"note": "the folder's test/ part; reported only, nothing was chosen on it",
                **_eval_block(y_test, p_test, threshold)}
    card = model_card.build(
        config=net.config, parameters=count_parameters(net), macs=count_macs(copy.deepcopy(net).cpu(), cfg.image_size),
        image_size=cfg.image_size, tta=cfg.tta, threshold=threshold, threshold_rule=cfg.threshold_rule,
        calibration={"method": C.PLATT if cfg.calibrate_on == "clean" else C.PLATT_PERTURBED, "scale": scale,
                     "bias": bias, "ece_crossfit": C.crossfit_ece(val_logits, y_val, cfg.seed)},
        validation={"split": data.description, **_eval_block(y_val, p_val, threshold),
                    "predictions": {"p_pneumonia": [round(float(v), 6) for v in p_val],
                                    "label": [int(v) for v in y_val]},
                    **({} if cfg.calibrate_on == "clean" else {"calibration_set": {
                        "images": "validation, then under each of " + ", ".join(PERTURBATIONS),
                        "p_pneumonia": [round(float(v), 6) for v in C.apply(fit_logits, scale, bias)],
                        "label": [int(v) for v in fit_labels]}})},
        training={"config": cfg.to_dict(), "command": command_line(cfg), "argv": sys.argv,
                  "best_epoch": best_epoch, "epochs_run": len(history), "seconds": round(seconds, 1),
                  "history": history, "parent": parent},
        data={"root": str(data.scan.root), "fingerprint": data.scan.fingerprint(),
              "counts": data.scan.counts(), "train_images": int(len(data.train)),
              "val_images": int(len(data.val)), "duplicates": len(data.scan.duplicates),
              "unreadable": len(data.unreadable), "classes": list(CLASSES)},
        environment=environment(), ood=ood_summary, test=test, borderline=band)
    version = registry.save_version(net, card, registry.new_version_id(cfg.tag), extras=extras)
    activated, gate_message = False, ""
    if cfg.activate:  # through the promotion gate, never around it; only the command line sets it (the operator)
        try:
            promotion.promote(registry, version, actor=operator())
            activated = True
        except promotion.PromotionRefused as exc:
            gate_message = str(exc)
    emit({"event": E.DONE, "version": version, "threshold": threshold, "activated": activated,
          "gate": gate_message, "val_metrics": {k: v for k, v in card["validation"].items() if k != "predictions"}})
    return version


def perturbed_logits(net: torch.nn.Module, val_images: torch.Tensor, device: torch.device,
                     tta: str = "none") -> np.ndarray:
    """(N, S, S) uint8 validation images -> (1 + P, N) raw logits: the images as they are (row 0), then
    under each of the P acquisition perturbations of ``xray.io.augment.PERTURBATIONS`` (the robustness
    checks' set, rounded back to grey levels)."""
    x = val_images.unsqueeze(1).float()
    out = [predict_logits(net, val_images, np.arange(len(val_images)), device, tta=tta)]
    for fn in PERTURBATIONS.values():
        y = fn(x).clamp(0, 255).round().to(torch.uint8)[:, 0]
        out.append(predict_logits(net, y, np.arange(len(y)), device, tta=tta))
    return np.stack(out)


def fit_borderline(net: PneumoniaNet, val_images: torch.Tensor, scale: float, bias: float, device: torch.device,
                   tta: str = "none") -> dict:
    """The card's borderline band (``xray.borderline``) from (N, S, S) uint8 validation images."""
    return borderline.band_from_logits(scale * perturbed_logits(net, val_images, device, tta).astype(np.float64) + bias)


# -- OOD statistics for an existing version ----------------------------------------------------------
OUTSIDE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")


def outside_films(folders: Sequence[str], image_size: int) -> np.ndarray:
    """(M, S, S) uint8 model inputs of every readable image under ``folders`` (recursively, sorted);
    ValueError when there is none."""
    paths = sorted(p for folder in folders for p in Path(folder).rglob("*") if p.suffix.lower() in OUTSIDE_SUFFIXES)
    pixels = [m.pixels for m in (try_read_model_input(p, image_size)[0] for p in paths) if m is not None]
    if not pixels:
        raise ValueError(f"no readable images under {', '.join(map(str, folders))}")
    return np.stack(pixels)


def fit_ood_for_version(registry: Registry, version: str | None, data_dir: str, workers: int = 1,
                        percentile: float = O.DEFAULT_PERCENTILE,
                        emit: Callable[[dict], None] = lambda e: None, outside: Sequence[str] = (),
                        net_config: "OutsideNetConfig | None" = None) -> str:
    """Fit OOD statistics for an existing version and save them as a NEW, inactive version; returns its id.

    The new version has the same weights, threshold and calibration, plus ``ood.npz``; the old
    one is left untouched, so past audit-log lines keep meaning what they said. Making it live is the
    promotion gate's business (``xray.govern.promotion.promote``), never this function's. ``outside``:
    folders of other hospitals' chest films (every image in them, recursively) for the guard's home-vs-outside
    networks (``ood.fit_net_for_images``, ``net_config``; docs/ood.md round 4), saved as ``outside_net.pt``
    in the new version; none = the distance check alone.
    """
    model = registry.load(version, torch.device("cpu"))
    card = model.card
    films = outside_films(outside, model.image_size) if outside else None  # refuses an empty folder first
    cfg = TrainConfig.from_dict({**card.training.config, "data_dir": str(data_dir), "workers": workers})
    data = load_training_data(cfg.data_dir, **cfg.folder_options(), emit=emit)
    if data.scan.fingerprint() != card.data.fingerprint:
        raise ValueError("this folder differs from the data the model was trained on: the validation split "
                         "could not be reproduced")
    stats, summary = O.fit_for_images(model.net, torch.from_numpy(data.images), data.train, data.val,
                                    model.device, percentile)
    change, extras = "added OOD statistics (same weights)", {}
    if films is not None:
        emit({"event": "outside_net", "message": f"training the guard's home-vs-outside networks on {len(films)} "
                                                 "outside films"})
        stats, ensemble, summary = O.fit_net_for_images(
            model.net, stats, torch.from_numpy(data.images), data.train, data.val, torch.from_numpy(films),
            model.device, net_config, percentile,
            lambda k, epoch, loss: emit({"event": "outside_net_epoch", "member": k, "epoch": epoch, "loss": loss}))
        extras[OUTSIDE_NET_FILE] = ensemble.to_bytes()
        change = (f"added OOD statistics with home-vs-outside networks trained on {len(films)} outside films "
                  "(same weights)")
    new_card = card.derived(change, {"ood": summary})
    return registry.save_derived_version(model.version, new_card, "ood", extras={O.OOD_FILE: stats.to_bytes(), **extras},
                                         without=() if extras else (OUTSIDE_NET_FILE,))
