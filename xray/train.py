"""Training from scratch (or fine-tuning), shaped like torchvision's classification reference:
``load_data``, ``train_one_epoch``, ``evaluate``, ``main(config)``. Progress goes to callbacks; the
CLI attaches a console printer and a JSON-lines event file that the Retrain page reads."""
from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import metrics as M
from .atomic import atomic_write
from .augment import PRESETS, augment
from .data import CLASSES, SMALL_VAL, DatasetScan, decoded_dataset, patient_split, scan_dataset
from .inference import autocast_for
from .model import (STEMS, ModelConfig, PneumoniaNet, count_macs, count_parameters, cpu_memory_format, stage_strides,
                    to_input)
from .preprocess import NORMALISATIONS, TTA_SHIFTS
from .registry import Registry, pick_device

INTENDED_USE = ("Decision support for pediatric (ages 1-5) anterior-posterior chest radiographs: "
                "estimates the probability of pneumonia and shows where the model looked. It assists "
                "a clinician and does not diagnose.")
LIMITS = [
    "Trained on one hospital's pediatric AP radiographs (Guangzhou, Kermany et al. 2018); adults, "
    "lateral views, other hospitals' equipment and other diseases are outside its training data.",
    "Validation figures come from a patient-level split of the training images and flatter: expect "
    "lower specificity on new data.",
    "Does not distinguish bacterial from viral pneumonia, nor detect other findings.",
]


@dataclass
class TrainConfig:
    """Every training setting; shared by the CLI and the Retrain page form."""

    data_dir: str = ""  # folder with NORMAL/ and PNEUMONIA/ at any depth
    epochs: int = 40  # upper bound; early stopping may end sooner
    image_size: int = 128  # square model input in pixels
    batch_size: int = 64
    lr: float = 3e-3  # peak learning rate of the one-cycle schedule
    weight_decay: float = 5e-4  # AdamW decoupled weight decay
    val_fraction: float = 0.15  # patients held out for validation when the folder has no val/ part
    seed: int = 0
    patience: int = 8  # epochs without validation improvement before stopping
    label_smoothing: float = 0.05
    augment: str = "strong"  # none | standard | strong (docs/experiments.md: strong generalises best)
    mixup: float = 0.0  # Beta(a, a) mixup strength; 0 = off
    ema: float = 0.998  # decay of the weight moving average used for evaluation; 0 = off
    dropout: float = 0.3
    normalisation: str = "standardise"  # per-image intensity normalisation: standardise | equalise
    widths: tuple[int, ...] = (32, 48, 64)
    stem: str = "patch4"  # patch4 | conv (xray.model.STEMS); stage strides follow from it (docs/experiments.md: p4s)
    threshold_rule: str = "sensitivity>=0.97"  # max specificity with validation sensitivity >= 0.97
    tta: str = "none"  # none | shift: test-time augmentation stored in the card
    init_from: str = ""  # "" = from scratch; "active" or a version id = fine-tune from it
    registry: str = ""  # registry folder; "" = weights/ or $XRAY_WEIGHTS
    run_dir: str = ""  # checkpoints + events; "" = <registry>/runs/<run id>
    resume: bool = False  # continue from run_dir/checkpoint.pt
    activate: bool = False  # make the new version active when training succeeds
    threads: int = 0  # torch CPU threads; 0 = all cores
    workers: int = 0  # decoding processes; 0 = automatic
    max_minutes: float = 0.0  # stop after this many minutes of training; 0 = no limit
    tag: str = ""  # appended to the version id

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown training settings: {sorted(unknown)}")
        d = {k: tuple(v) if k == "widths" else v for k, v in d.items()}
        return cls(**d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d


def model_config(cfg: TrainConfig) -> ModelConfig:
    """The architecture a from-scratch run of ``cfg`` builds."""
    return ModelConfig(widths=tuple(cfg.widths), strides=stage_strides(cfg.stem, len(cfg.widths)),
                       dropout=cfg.dropout, normalisation=cfg.normalisation, stem=cfg.stem)


Callback = Callable[[dict], None]


class Cancelled(Exception):
    """Training was asked to stop (a stop file appeared or SIGTERM)."""


# -- data ---------------------------------------------------------------------------------------------
@dataclass
class Splits:
    scan: DatasetScan
    images: np.ndarray  # (N, S, S) uint8, every readable sample
    labels: np.ndarray  # (N,) int64
    train: np.ndarray  # indices into images
    val: np.ndarray
    test: np.ndarray
    description: str  # how validation was formed, for the card
    unreadable: list[tuple[str, str]] = field(default_factory=list)


def load_data(cfg: TrainConfig, emit: Callback) -> Splits:
    """Scan, decode once (cached), and split by patient."""
    scan = scan_dataset(cfg.data_dir)
    emit({"event": "scan", **scan.summary()})
    images, errors = decoded_dataset(scan, cfg.image_size, cfg.workers,
                                     progress=lambda i, n: emit({"event": "decode", "done": i, "total": n}))
    ok = np.array([not e for e in errors])
    unreadable = [(scan.relative(s.path), e) for s, e in zip(scan.samples, errors) if e]
    emit({"event": "unreadable", "files": unreadable})
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
        tr, va = patient_split([samples[i] for i in train_pool], cfg.val_fraction, cfg.seed)
        train, val = train_pool[tr], np.concatenate([train_pool[va], given_val]).astype(int)
        description = (f"patient-level split of the training images ({cfg.val_fraction:.0%} of patients, "
                       f"seed {cfg.seed}, {len(va)} images)")
        if len(given_val):
            description += f" plus the folder's small val/ part ({len(given_val)} images)"
    for name, idx in (("training", train), ("validation", val)):
        if len(set(labels[idx])) < 2:
            raise ValueError(f"the {name} set lacks one class: too few readable images")
    scan.samples = samples
    return Splits(scan, images, labels, train, val, test, description, unreadable)


# -- steps --------------------------------------------------------------------------------------------
class EMA:
    """Exponential moving average of parameters and buffers (BatchNorm statistics included)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))  # warm-up: forget the random init
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
            else:
                self.shadow[k].copy_(v)


def loss_fn(logits: torch.Tensor, targets: torch.Tensor, pos_weight: float, smoothing: float) -> torch.Tensor:
    """Class-balanced binary cross-entropy with label smoothing; targets in [0, 1]."""
    soft = targets * (1 - smoothing) + 0.5 * smoothing
    weights = torch.where(targets > 0.5, torch.full_like(targets, pos_weight), torch.ones_like(targets))
    return (F.binary_cross_entropy_with_logits(logits, soft, reduction="none") * weights).sum() / weights.sum()


def _config_of(model: torch.nn.Module) -> ModelConfig:
    return (model.module if hasattr(model, "module") else model).config  # DDP wraps the net


def train_one_epoch(model, optimizer, scheduler, images: torch.Tensor, labels: torch.Tensor,
                    indices: np.ndarray, cfg: TrainConfig, epoch: int, pos_weight: float,
                    generator: torch.Generator, ema: EMA | None, emit: Callback,
                    should_stop: Callable[[], bool], device: torch.device, sampler_rank: tuple[int, int] = (0, 1),
                    scaler: "torch.amp.GradScaler | None" = None) -> float:
    """One pass over ``indices`` in a seeded random order; returns the mean training loss."""
    model.train()
    aug = PRESETS[cfg.augment]
    order = indices[torch.randperm(len(indices), generator=generator).numpy()]
    rank, world = sampler_rank
    order = order[rank::world]  # same permutation on every rank; each takes its own stride
    steps = max(1, len(indices) // world // cfg.batch_size)  # identical on every rank (DDP needs it)
    total, count, started = 0.0, 0, time.time()
    for step in range(steps):
        if _any_rank(should_stop(), world, device):  # every rank stops at the same step
            raise Cancelled()
        idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        x = images[idx].unsqueeze(1).float()  # (B, 1, S, S) in [0, 255]
        y = labels[idx].float()
        if aug is not None:
            x = augment(x, aug, generator)
        if cfg.mixup > 0:
            lam = float(np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=generator))).beta(cfg.mixup, cfg.mixup))
            perm = torch.randperm(len(idx), generator=generator)
            x, y = lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm]
        with autocast_for(device):  # bf16/fp16 on a GPU, float32 on the CPU
            logits = model(to_input(x, device, _config_of(model)))
            loss = loss_fn(logits, y.to(device), pos_weight, cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:  # fp16 only: scale the loss so small gradients do not underflow
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        scheduler.step()
        if ema is not None:
            ema.update(model.module if hasattr(model, "module") else model)
        total += loss.item() * len(idx)
        count += len(idx)
        if step % 10 == 0 or step == steps - 1:
            elapsed = time.time() - started
            emit({"event": "step", "epoch": epoch, "step": step + 1, "steps": steps, "loss": loss.item(),
                  "lr": scheduler.get_last_lr()[0], "epoch_eta_s": elapsed / (step + 1) * (steps - step - 1)})
    return total / max(count, 1)


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, images: torch.Tensor, indices: np.ndarray, device: torch.device,
                   batch_size: int = 128) -> np.ndarray:
    model.eval()
    out = []
    for start in range(0, len(indices), batch_size):
        idx = indices[start:start + batch_size]
        with autocast_for(device):
            out.append(model(to_input(images[idx].unsqueeze(1), device, _config_of(model))).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def evaluate(logits: np.ndarray, labels: np.ndarray, pos_weight: float) -> dict:
    """Validation loss (class-balanced, no smoothing), AUC and accuracy at 0.5."""
    t_logits, t_labels = torch.from_numpy(logits), torch.from_numpy(labels).float()
    p = torch.sigmoid(t_logits).numpy()
    return {"val_loss": float(loss_fn(t_logits, t_labels, pos_weight, 0.0)),
            "val_auc": M.roc_auc(labels, p), "val_accuracy": float(np.mean((p >= 0.5) == labels))}


def fit_platt(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(scale, bias) minimising validation NLL of sigmoid(scale * logit + bias) (Platt scaling).

    Temperature scaling alone (bias 0) cannot undo the shift that class-balanced training puts into
    the logits; the bias does, so p(pneumonia) matches the observed frequency.
    """
    z, y = torch.from_numpy(logits).double(), torch.from_numpy(labels).double()
    params = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([params], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(params[0] * z + params[1], y)
        loss.backward()
        return loss

    optimizer.step(closure)
    scale, bias = (float(v) for v in params.detach())
    if not (np.isfinite(scale) and np.isfinite(bias)) or scale <= 0:
        return 1.0, 0.0  # degenerate validation set (e.g. perfectly separated): leave logits as they are
    return scale, bias


def calibrated(logits: np.ndarray, scale: float, bias: float) -> np.ndarray:
    z = scale * np.asarray(logits, dtype=np.float64) + bias
    return np.exp(-np.logaddexp(0.0, -z))  # 1 / (1 + exp(-z)) without overflow for very negative z


def crossfit_ece(logits: np.ndarray, labels: np.ndarray, seed: int) -> float:
    """ECE of Platt scaling fitted on one half of validation and measured on the other (both ways)."""
    order = np.random.default_rng(seed).permutation(len(labels))
    halves = (order[: len(order) // 2], order[len(order) // 2:])
    p = np.zeros(len(labels))
    for fit, held in (halves, halves[::-1]):
        p[held] = calibrated(logits[held], *fit_platt(logits[fit], labels[fit]))
    return M.expected_calibration_error(labels, p)


# -- checkpoints --------------------------------------------------------------------------------------
def save_checkpoint(path: Path, state: dict) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


def environment() -> dict:
    import PIL
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "pillow": PIL.__version__, "platform": platform.platform(), "cpu_threads": torch.get_num_threads()}


# -- several processes (torchrun) ---------------------------------------------------------------------
def _any_rank(flag: bool, world: int, device: torch.device) -> bool:
    """True on every rank when ``flag`` is True on any: all ranks stop together or none does."""
    if world == 1:
        return flag
    import torch.distributed as dist
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _raise_together(failure: BaseException | None, world: int) -> None:
    """Raise on every rank when any rank failed: a lone failure would leave the others waiting."""
    if world > 1:
        import torch.distributed as dist
        reports: list = [None] * world
        dist.all_gather_object(reports, None if failure is None else (type(failure).__name__, str(failure)))
        if failure is None:
            kind, message = next(iter(filter(None, reports)), (None, ""))
            if kind == "Cancelled":
                failure = Cancelled()
            elif kind is not None:
                failure = ValueError(f"another training process failed: {message}")
    if failure is not None:
        raise failure


def _average_buffers(tensors: list[torch.Tensor], world: int) -> None:
    """Average BatchNorm running statistics over ranks, in place (each rank saw only its batches)."""
    if world == 1:
        return
    import torch.distributed as dist
    for t in tensors:
        if t.dtype.is_floating_point:
            dist.all_reduce(t)
            t.div_(world)


def _gather_logits(local: np.ndarray, n: int, world: int) -> np.ndarray:
    """Rank r scored positions r::world of n; every rank gets all n logits, in order."""
    if world == 1:
        return local
    import torch.distributed as dist
    parts: list = [None] * world
    dist.all_gather_object(parts, local)
    out = np.zeros(n, np.float32)
    for r, part in enumerate(parts):
        out[r::world] = part
    return out


def _from_rank0(obj, world: int):
    """Rank 0's value of ``obj`` on every rank (the run folder, a checkpoint read from its disk)."""
    if world == 1:
        return obj
    import torch.distributed as dist
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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

    if cfg.augment not in PRESETS:
        raise ValueError(f"augment must be one of {sorted(PRESETS)}")
    if cfg.threshold_rule not in M.THRESHOLD_RULES and not cfg.threshold_rule.startswith("sensitivity>="):
        raise ValueError(f"threshold_rule must be one of {M.THRESHOLD_RULES}")
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
    torch.manual_seed(cfg.seed)
    registry = Registry(cfg.registry or None)
    started = time.time()
    emit({"event": "start", "config": cfg.to_dict(), "pid": os.getpid(), "world_size": world})

    failure, source = None, None
    try:  # the errors a user can cause (bad folder, bad source model) happen here, on every rank alike
        splits = load_data(cfg, emit)
        if cfg.init_from:
            source = registry.load(None if cfg.init_from == "active" else cfg.init_from, torch.device("cpu"))
            if source.image_size != cfg.image_size:
                raise ValueError(f"fine-tuning needs the source model's image size {source.image_size}")
    except (ValueError, Cancelled) as exc:
        failure = exc
    _raise_together(failure, world)
    images = torch.from_numpy(splits.images)
    labels = torch.from_numpy(splits.labels)
    n_pos = int(splits.labels[splits.train].sum())
    n_neg = len(splits.train) - n_pos
    pos_weight = n_neg / max(n_pos, 1)  # balances the classes' total weight in the loss
    emit({"event": "data", "train": len(splits.train), "val": len(splits.val), "test": len(splits.test),
          "validation": splits.description, "pos_weight": pos_weight})

    model_cfg = model_config(cfg)
    model = PneumoniaNet(model_cfg)
    parent = None
    if source is not None:
        model = source.net.float()
        model_cfg = source.net.config
        parent = source.version
    model = model.to(device)
    if device.type == "cpu":
        model = model.to(memory_format=cpu_memory_format(model_cfg))
    train_model = model
    if distributed:
        # Parameters stay identical on every rank (gradients are averaged). BatchNorm running
        # statistics are averaged once per epoch (_average_buffers) instead of being broadcast from
        # rank 0 before every step: one collective per epoch rather than one per step. Batch
        # statistics stay per process (no SyncBatchNorm, see docs/scaling.md).
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, len(splits.train) // world // cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, epochs=cfg.epochs,
                                                    steps_per_epoch=steps_per_epoch, pct_start=0.2)
    ema = EMA(model, cfg.ema) if cfg.ema > 0 else None
    generator = torch.Generator().manual_seed(cfg.seed)
    scaler = None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():  # fp16 autocast needs loss scaling
        scaler = torch.amp.GradScaler("cuda")

    run_dir = Path(cfg.run_dir) if cfg.run_dir else registry.root / "runs" / time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(_from_rank0(str(run_dir), world))  # a default name from the clock could differ per rank
    checkpoint_path = run_dir / "checkpoint.pt"
    start_epoch, history, best = 1, [], {"score": -math.inf, "epoch": 0, "state": None}
    ckpt = None
    if cfg.resume and rank == 0 and checkpoint_path.is_file():
        ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    ckpt = _from_rank0(ckpt, world)  # only rank 0 writes checkpoints: other machines need not share its disk
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        generator.set_state(ckpt["generator"])
        if ckpt.get("torch_rng") is not None:  # dropout draws from the global RNG: resume it too
            torch.set_rng_state(ckpt["torch_rng"])
        if ckpt.get("cuda_rng") and device.type == "cuda":
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
        if ema is not None and ckpt.get("ema"):
            ema.shadow = ckpt["ema"]
        start_epoch, history, best = ckpt["epoch"] + 1, ckpt["history"], ckpt["best"]
        emit({"event": "resumed", "epoch": ckpt["epoch"]})

    train_seconds = 0.0
    for epoch in range(start_epoch, cfg.epochs + 1):
        epoch_start = time.time()
        train_loss = train_one_epoch(train_model, optimizer, scheduler, images, labels, splits.train, cfg, epoch,
                                     pos_weight, generator, ema, emit, should_stop, device, (rank, world), scaler)
        buffer_names = [name for name, _ in model.named_buffers()]
        _average_buffers([b for _, b in model.named_buffers()]
                         + ([ema.shadow[name] for name in buffer_names] if ema is not None else []), world)
        eval_model = model  # identical on every rank from here on
        if ema is not None:
            eval_model = PneumoniaNet(model_cfg).to(device)
            if device.type == "cpu":
                eval_model = eval_model.to(memory_format=cpu_memory_format(model_cfg))
            eval_model.load_state_dict(ema.shadow)
        # each rank scores its share of the validation images; all ranks then hold all logits, so
        # metrics, the best epoch and early stopping agree everywhere
        val_logits = _gather_logits(predict_logits(eval_model, images, splits.val[rank::world], device),
                                    len(splits.val), world)
        row = {"epoch": epoch, "train_loss": train_loss,
               **evaluate(val_logits, splits.labels[splits.val], pos_weight),
               "seconds": time.time() - epoch_start}
        if distributed:  # each rank's loss is over its own equal share of the batches: average them
            import torch.distributed as dist
            t = torch.tensor([train_loss], dtype=torch.float64)
            dist.all_reduce(t)
            row["train_loss"] = float(t) / world
        history.append(row)
        train_seconds += row["seconds"]
        score = round(row["val_auc"], 4) - 1e-3 * row["val_loss"]  # AUC first, loss breaks ties
        improved = score > best["score"]
        if improved:
            best = {"score": score, "epoch": epoch,
                    "state": {k: v.detach().cpu().clone() for k, v in eval_model.state_dict().items()}}
        remaining = (cfg.epochs - epoch) * (train_seconds / (epoch - start_epoch + 1))
        emit({"event": "epoch", **row, "best_epoch": best["epoch"], "eta_s": remaining, "epochs": cfg.epochs})
        if rank == 0:
            save_checkpoint(checkpoint_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
                "ema": ema.shadow if ema else None, "epoch": epoch, "history": history, "best": best,
                "config": cfg.to_dict()})
        if epoch - best["epoch"] >= cfg.patience:
            emit({"event": "early_stop", "epoch": epoch, "best_epoch": best["epoch"]})
            break
        # clocks differ between ranks: decide together, or one rank would wait for the others forever
        if _any_rank(bool(cfg.max_minutes) and (time.time() - started) / 60 > cfg.max_minutes, world, device):
            emit({"event": "time_limit", "epoch": epoch})
            break
        if _any_rank(should_stop(), world, device):
            raise Cancelled()

    if distributed:
        import torch.distributed as dist
        dist.barrier()
        if rank != 0:
            return ""  # rank 0 alone calibrates and writes the version
    final = PneumoniaNet(model_cfg)
    final.load_state_dict(best["state"])
    final = final.to(device).eval()
    return register(final, cfg, splits, best["epoch"], history, time.time() - started, registry, parent, device, emit)


def _eval_block(y: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    return {**M.metrics_at(y, p, threshold), "ece": M.expected_calibration_error(y, p)}


def register(net: PneumoniaNet, cfg: TrainConfig, splits: Splits, best_epoch: int, history: list,
             seconds: float, registry: Registry, parent: str | None, device: torch.device, emit: Callback) -> str:
    """Calibrate, choose the threshold, write the card, and save the version (inactive)."""
    images = torch.from_numpy(splits.images)
    y_val = splits.labels[splits.val]
    val_logits = tta_logits(net, images, splits.val, device, cfg.tta)
    scale, bias = fit_platt(val_logits, y_val)
    p_val = calibrated(val_logits, scale, bias)
    threshold = M.choose_threshold(y_val, p_val, cfg.threshold_rule)
    extras, ood_summary = {}, {}
    try:  # OOD statistics of the training features, thresholded on validation (xray/ood.py)
        from .ood import OOD_FILE, fit_for_images
        ood_stats, ood_summary = fit_for_images(net, images, splits.train, splits.val, device)
        extras[OOD_FILE] = ood_stats.to_bytes()
    except (ValueError, np.linalg.LinAlgError) as exc:
        ood_summary = {"skipped": str(exc)}
    card = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "architecture": {"name": "PneumoniaNet", "config": net.config.to_dict(),
                         "parameters": count_parameters(net), "macs": count_macs(copy.deepcopy(net).cpu(), cfg.image_size),
                         "gradcam_layer": "stages[-1]"},
        "preprocessing": {"image_size": cfg.image_size, "tta": cfg.tta,
                          "steps": ["decode to one channel in [0, 1] (xray.imageio.load_image)",
                                    f"squash-resize to {cfg.image_size}x{cfg.image_size}, bilinear, antialiased; uint8",
                                    f"per-image {cfg.normalisation} (inside the network: xray.preprocess.normalise)"],
                          "normalisation": net.config.normalisation},
        "threshold": threshold,
        "threshold_rule": cfg.threshold_rule,
        "calibration": {"method": "Platt scaling fitted on validation", "scale": scale, "bias": bias,
                        "ece_crossfit": crossfit_ece(val_logits, y_val, cfg.seed)},
        "validation": {"split": splits.description, **_eval_block(y_val, p_val, threshold),
                       "predictions": {"p_pneumonia": [round(float(v), 6) for v in p_val],
                                       "label": [int(v) for v in y_val]}},
        "training": {"config": cfg.to_dict(), "command": command_line(cfg),
                     "argv": sys.argv, "best_epoch": best_epoch, "epochs_run": len(history),
                     "seconds": round(seconds, 1), "history": history, "parent": parent},
        "data": {"root": str(splits.scan.root), "fingerprint": splits.scan.fingerprint(),
                 "counts": splits.scan.counts(), "train_images": int(len(splits.train)),
                 "val_images": int(len(splits.val)), "duplicates": len(splits.scan.duplicates),
                 "unreadable": len(splits.unreadable), "classes": list(CLASSES)},
        "environment": environment(),
        "ood": ood_summary,
        "intended_use": INTENDED_USE,
        "limits": LIMITS,
    }
    if len(splits.test):
        y_test = splits.labels[splits.test]
        p_test = calibrated(tta_logits(net, images, splits.test, device, cfg.tta), scale, bias)
        card["test"] = {"note": "the folder's test/ part; reported only, nothing was chosen on it",
                        **_eval_block(y_test, p_test, threshold)}
    version = registry.save_version(net, card, registry.new_version_id(cfg.tag), extras=extras)
    if cfg.activate:
        registry.activate(version)
    emit({"event": "done", "version": version, "threshold": threshold, "activated": cfg.activate,
          "val_metrics": {k: v for k, v in card["validation"].items() if k != "predictions"}})
    return version


def tta_logits(net, images, indices, device, tta: str) -> np.ndarray:
    logits = predict_logits(net, images, indices, device)
    if tta == "shift":
        for dx, dy in TTA_SHIFTS:
            shifted = torch.roll(images, shifts=(dy, dx), dims=(1, 2))
            logits = logits + predict_logits(net, shifted, indices, device)
        logits = logits / (len(TTA_SHIFTS) + 1)
    return logits


# -- command line -------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    parser.add_argument("data_dir", help="folder with NORMAL/ and PNEUMONIA/ subfolders at any depth")
    parser.add_argument("--epochs", type=int, default=d.epochs, help=f"maximum epochs (default {d.epochs})")
    parser.add_argument("--image-size", type=int, default=d.image_size, help=f"square input size (default {d.image_size})")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help=f"(default {d.batch_size})")
    parser.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"(default {d.weight_decay})")
    parser.add_argument("--val-fraction", type=float, default=d.val_fraction,
                        help=f"fraction of patients held out for validation (default {d.val_fraction})")
    parser.add_argument("--seed", type=int, default=d.seed, help=f"(default {d.seed})")
    parser.add_argument("--patience", type=int, default=d.patience, help=f"early-stopping patience in epochs (default {d.patience})")
    parser.add_argument("--label-smoothing", type=float, default=d.label_smoothing, help=f"(default {d.label_smoothing})")
    parser.add_argument("--augment", choices=sorted(PRESETS), default=d.augment, help=f"(default {d.augment})")
    parser.add_argument("--mixup", type=float, default=d.mixup, help=f"mixup Beta parameter, 0 = off (default {d.mixup})")
    parser.add_argument("--ema", type=float, default=d.ema, help=f"weight EMA decay, 0 = off (default {d.ema})")
    parser.add_argument("--normalisation", choices=NORMALISATIONS, default=d.normalisation,
                        help=f"per-image intensity normalisation (default {d.normalisation})")
    parser.add_argument("--dropout", type=float, default=d.dropout, help=f"(default {d.dropout})")
    parser.add_argument("--widths", type=lambda s: tuple(int(x) for x in s.split(",")), default=d.widths,
                        help=f"channels per stage, comma-separated (default {','.join(map(str, d.widths))})")
    parser.add_argument("--stem", choices=sorted(STEMS), default=d.stem,
                        help=f"conv: two 3x3 convolutions; patch4: one 4x4 stride-4 patch convolution, about 4x "
                             f"cheaper (default {d.stem})")
    parser.add_argument("--threshold-rule", default=d.threshold_rule,
                        help=f"youden | sensitivity>=X (default {d.threshold_rule})")
    parser.add_argument("--tta", choices=["none", "shift"], default=d.tta, help=f"test-time augmentation (default {d.tta})")
    parser.add_argument("--fine-tune", dest="init_from", nargs="?", const="active", default="",
                        help="start from the active model (or the version given) instead of from scratch")
    parser.add_argument("--registry", default="", help="registry folder (default weights/ or $XRAY_WEIGHTS)")
    parser.add_argument("--run-dir", default="", help="checkpoint/event folder (default <registry>/runs/<time>)")
    parser.add_argument("--resume", action="store_true", help="continue from <run-dir>/checkpoint.pt")
    parser.add_argument("--activate", action="store_true", help="activate the new version when done")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: all cores)")
    parser.add_argument("--workers", type=int, default=0, help="image decoding processes (default: automatic)")
    parser.add_argument("--max-minutes", type=float, default=0.0, help="training time limit (default: none)")
    parser.add_argument("--tag", default="", help="suffix for the version id")
    parser.add_argument("--events", default="", help="JSON-lines event file (default <run-dir>/events.jsonl)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig.from_dict({k: v for k, v in vars(args).items() if k in names})


def command_line(cfg: TrainConfig) -> str:
    """The ``python -m xray train`` command that reproduces ``cfg`` (settings at their default left out)."""
    default = TrainConfig()
    words = ["python", "-m", "xray", "train", cfg.data_dir]
    for f in fields(TrainConfig):
        value = getattr(cfg, f.name)
        if f.name == "data_dir" or value == getattr(default, f.name) or (
                isinstance(value, list) and tuple(value) == getattr(default, f.name)):
            continue
        flag = "--fine-tune" if f.name == "init_from" else "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag)  # store_true switches; only True differs from the default
        elif isinstance(value, (tuple, list)):
            words += [flag, ",".join(str(v) for v in value)]
        else:
            words += [flag, str(value)]
    return shlex.join(words)
