"""Training from scratch (or fine-tuning), shaped like torchvision's classification reference:
``load_data``, ``train_one_epoch``, ``evaluate``, ``main(config)``. Progress goes to callbacks; the
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
from xray.decide import calibration as C
from xray.model import card as model_card
from xray.train import events as E
from xray.decide import metrics as M
from xray.model import ood as O
from xray.atomic import atomic_write
from xray.io.augment import PERTURBATIONS, PRESETS, augment
from xray.io.preprocess import try_read_model_input
from xray.io.folders import (
    CLASSES,
    SMALL_VAL,
    DatasetScan,
    SPLITS,
    decoded_dataset,
    scan_dataset,
)
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
    emit({"event": E.SCAN, **scan.summary()})
    images, errors = decoded_dataset(scan, cfg.image_size, cfg.workers,
                                     progress=lambda i, n: emit({"event": E.DECODE, "done": i, "total": n}))
    ok = np.array([not e for e in errors])
    unreadable = [(scan.relative(s.path), e) for s, e in zip(scan.samples, errors) if e]
    emit({"event": E.UNREADABLE, "files": unreadable})
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
        if cfg.split not in SPLITS:
            raise ValueError(f"unknown split {cfg.split!r}; one of {sorted(SPLITS)}")
        tr, va = SPLITS[cfg.split]([samples[i] for i in train_pool], cfg.val_fraction, cfg.seed)
        train, val = train_pool[tr], np.concatenate([train_pool[va], given_val]).astype(int)
        if cfg.split == "id-range":
            description = (f"patient-level split of the training images by patient number: the lowest and highest "
                           f"numbers of each acquisition batch ({cfg.val_fraction:.0%} of images, {len(va)} images)")
        else:
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
        if any_rank(should_stop(), world, device):  # every rank stops at the same step
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
            emit({"event": E.STEP, "epoch": epoch, "step": step + 1, "steps": steps, "loss": loss.item(),
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
        splits = load_data(cfg, emit)
        if cfg.init_from:
            source = registry.load(None if cfg.init_from == "active" else cfg.init_from, torch.device("cpu"))
            if source.image_size != cfg.image_size:
                raise ValueError(f"fine-tuning needs the source model's image size {source.image_size}")
            # fine-tuning keeps the source's architecture, its number of ensemble members included
            cfg = replace(cfg, members=source.net.config.members)
    except (ValueError, Cancelled) as exc:
        failure = exc
    raise_together(failure, world)
    n_pos = int(splits.labels[splits.train].sum())
    n_neg = len(splits.train) - n_pos
    pos_weight = n_neg / max(n_pos, 1)  # balances the classes' total weight in the loss
    emit({"event": E.DATA, "train": len(splits.train), "val": len(splits.val), "test": len(splits.test),
          "validation": splits.description, "pos_weight": pos_weight})

    run_dir = Path(cfg.run_dir) if cfg.run_dir else registry.root / "runs" / utc_stamp()
    run_dir = Path(from_rank0(str(run_dir), world))  # a default name from the clock could differ per rank
    nets, best_epochs, histories = [], [], []
    for member in range(cfg.members):
        # an ensemble's members share the split and differ in their weights' seed (and so in their
        # augmentation and batch order); one net keeps the layout and seed of earlier versions
        member_dir = run_dir if cfg.members == 1 else run_dir / f"member-{member + 1}"
        net, best_epoch, history = _fit_member(cfg, member, cfg.run_seed + 1000 * member, splits, source, member_dir,
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
    return register(final, cfg, splits, best_epochs[0] if cfg.members == 1 else best_epochs, histories,
                    time.time() - started, registry, parent, device, emit)


def assemble_ensemble(nets: list[PneumoniaNet]) -> EnsembleNet:
    """One ``EnsembleNet`` holding the trained members' weights."""
    ensemble = EnsembleNet(replace(nets[0].config, members=len(nets)))
    for slot, net in zip(ensemble.members, nets):
        slot.load_state_dict(net.state_dict())
    return ensemble.to(next(nets[0].parameters()).device).eval()


def _fit_member(cfg: TrainConfig, member: int, seed: int, splits: Splits, source, run_dir: Path, emit: Callback,
                should_stop: Callable[[], bool], device: torch.device, rank: int, world: int,
                started: float) -> tuple[PneumoniaNet, int, list]:
    """Train one net (one member of an ensemble) from ``seed``; returns (best net, best epoch, history).
    Checkpoints go to ``run_dir`` after every epoch (``--resume`` continues from there)."""
    parent_emit = emit

    def emit(event: dict) -> None:  # every event of this member says which member it is (the progress view)
        parent_emit({**event, "member": member, "members": cfg.members})

    distributed = world > 1
    images = torch.from_numpy(splits.images)
    labels = torch.from_numpy(splits.labels)
    n_pos = int(splits.labels[splits.train].sum())
    pos_weight = (len(splits.train) - n_pos) / max(n_pos, 1)  # balances the classes' total weight in the loss
    torch.manual_seed(seed)
    model_cfg = model_config(cfg).member
    model = PneumoniaNet(model_cfg)
    if source is not None:  # fine-tuning: this member starts from the source's net (or its member of the same number)
        start = source.net.members[member] if isinstance(source.net, EnsembleNet) else source.net
        model = copy.deepcopy(start).float()
        model_cfg = start.config
    model = place(model, device)
    train_model = model
    if distributed:
        # Parameters stay identical on every rank (gradients are averaged). BatchNorm running
        # statistics are averaged once per epoch (_average_buffers) instead of being broadcast from
        # rank 0 before every step: one collective per epoch rather than one per step. Batch
        # statistics stay per process (no SyncBatchNorm, see docs/scaling.md).
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False)
    steps_per_epoch = max(1, len(splits.train) // world // cfg.batch_size)
    optimizer, scheduler = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.epochs, steps_per_epoch)
    ema = EMA(model, cfg.ema) if cfg.ema > 0 else None
    generator = torch.Generator().manual_seed(seed)
    scaler = None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():  # fp16 autocast needs loss scaling
        scaler = torch.amp.GradScaler("cuda")

    checkpoint_path = run_dir / "checkpoint.pt"
    start_epoch, history, best = 1, [], {"score": -math.inf, "epoch": 0, "state": None}
    ckpt = None
    if cfg.resume and rank == 0 and checkpoint_path.is_file():
        ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    ckpt = from_rank0(ckpt, world)  # only rank 0 writes checkpoints: other machines need not share its disk
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
        emit({"event": E.RESUMED, "epoch": ckpt["epoch"]})

    train_seconds = 0.0
    for epoch in range(start_epoch, cfg.epochs + 1):
        epoch_start = time.time()
        train_loss = train_one_epoch(train_model, optimizer, scheduler, images, labels, splits.train, cfg, epoch,
                                     pos_weight, generator, ema, emit, should_stop, device, (rank, world), scaler)
        buffer_names = [name for name, _ in model.named_buffers()]
        average_buffers([b for _, b in model.named_buffers()]
                         + ([ema.shadow[name] for name in buffer_names] if ema is not None else []), world)
        eval_model = model  # identical on every rank from here on
        if ema is not None:
            eval_model = place(build_net(model_cfg), device)
            eval_model.load_state_dict(ema.shadow)
        # each rank scores its share of the validation images; all ranks then hold all logits, so
        # metrics, the best epoch and early stopping agree everywhere
        val_logits = gather_logits(predict_logits(eval_model, images, splits.val[rank::world], device),
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
        emit({"event": E.EPOCH, **row, "best_epoch": best["epoch"], "eta_s": remaining, "epochs": cfg.epochs})
        if rank == 0:
            save_checkpoint(checkpoint_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
                "ema": ema.shadow if ema else None, "epoch": epoch, "history": history, "best": best,
                "config": cfg.to_dict()})
        if epoch - best["epoch"] >= cfg.patience:
            emit({"event": E.EARLY_STOP, "epoch": epoch, "best_epoch": best["epoch"]})
            break
        # clocks differ between ranks: decide together, or one rank would wait for the others forever
        if any_rank(bool(cfg.max_minutes) and (time.time() - started) / 60 > cfg.max_minutes, world, device):
            emit({"event": E.TIME_LIMIT, "epoch": epoch})
            break
        if any_rank(should_stop(), world, device):
            raise Cancelled()

    final = build_net(model_cfg)
    final.load_state_dict(best["state"])
    return final.to(device).eval(), best["epoch"], history




def _eval_block(y: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    return {**M.metrics_at(y, p, threshold), "ece": M.expected_calibration_error(y, p)}


def register(net: PneumoniaNet, cfg: TrainConfig, splits: Splits, best_epoch: int, history: list,
             seconds: float, registry: Registry, parent: str | None, device: torch.device, emit: Callback) -> str:
    """Calibrate, choose the threshold, build the card (``xray.model.card.build``), save the version (inactive)."""
    images = torch.from_numpy(splits.images)
    y_val = splits.labels[splits.val]
    # (1 + P, N) logits: the validation images as they are, then under each acquisition perturbation; the
    # calibration set (all rows, or row 0 alone) and the borderline band both read them
    all_logits = perturbed_logits(net, images[splits.val], device, cfg.tta)
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
        ood_stats, ood_summary = O.fit_for_images(net, images, splits.train, splits.val, device)
        extras[O.OOD_FILE] = ood_stats.to_bytes()
    except (ValueError, np.linalg.LinAlgError) as exc:
        ood_summary = {"skipped": str(exc)}
    test = None
    if len(splits.test):
        y_test = splits.labels[splits.test]
        p_test = C.apply(predict_logits(net, images, splits.test, device, tta=cfg.tta), scale, bias)
        test = {"note": "the folder's test/ part; reported only, nothing was chosen on it",
                **_eval_block(y_test, p_test, threshold)}
    card = model_card.build(
        config=net.config, parameters=count_parameters(net), macs=count_macs(copy.deepcopy(net).cpu(), cfg.image_size),
        image_size=cfg.image_size, tta=cfg.tta, threshold=threshold, threshold_rule=cfg.threshold_rule,
        calibration={"method": C.PLATT if cfg.calibrate_on == "clean" else C.PLATT_PERTURBED, "scale": scale,
                     "bias": bias, "ece_crossfit": C.crossfit_ece(val_logits, y_val, cfg.seed)},
        validation={"split": splits.description, **_eval_block(y_val, p_val, threshold),
                    "predictions": {"p_pneumonia": [round(float(v), 6) for v in p_val],
                                    "label": [int(v) for v in y_val]},
                    **({} if cfg.calibrate_on == "clean" else {"calibration_set": {
                        "images": "validation, then under each of " + ", ".join(PERTURBATIONS),
                        "p_pneumonia": [round(float(v), 6) for v in C.apply(fit_logits, scale, bias)],
                        "label": [int(v) for v in fit_labels]}})},
        training={"config": cfg.to_dict(), "command": command_line(cfg), "argv": sys.argv,
                  "best_epoch": best_epoch, "epochs_run": len(history), "seconds": round(seconds, 1),
                  "history": history, "parent": parent},
        data={"root": str(splits.scan.root), "fingerprint": splits.scan.fingerprint(),
              "counts": splits.scan.counts(), "train_images": int(len(splits.train)),
              "val_images": int(len(splits.val)), "duplicates": len(splits.scan.duplicates),
              "unreadable": len(splits.unreadable), "classes": list(CLASSES)},
        environment=environment(), ood=ood_summary, test=test, borderline=band)
    version = registry.save_version(net, card, registry.new_version_id(cfg.tag), extras=extras)
    activated, gate_message = False, ""
    if cfg.activate:  # through the promotion gate, never around it
        try:
            promotion.promote(registry, version)
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
                        emit: Callable[[dict], None] = lambda e: None, outside: Sequence[str] = ()) -> str:
    """Fit OOD statistics for an existing version and save them as a NEW, inactive version; returns its id.

    The new version has the same weights, threshold and calibration, plus ``ood.npz``; the old
    one is left untouched, so past audit-log lines keep meaning what they said. Making it live is the
    promotion gate's business (``xray.govern.promotion.promote``), never this function's. ``outside``:
    folders of other hospitals' chest films (every image in them, recursively) for the home-vs-outside
    score (``ood.fit_outside``; docs/ood.md round 4); none = the distance check alone.
    """
    model = registry.load(version, torch.device("cpu"))
    card = model.card
    films = outside_films(outside, model.image_size) if outside else None  # refuses an empty folder first
    cfg = TrainConfig.from_dict({**card.training.config, "data_dir": str(data_dir), "workers": workers})
    splits = load_data(cfg, emit)
    if splits.scan.fingerprint() != card.data.fingerprint:
        raise ValueError("this folder differs from the data the model was trained on: the validation split "
                         "could not be reproduced")
    stats, summary = O.fit_for_images(model.net, torch.from_numpy(splits.images), splits.train, splits.val,
                                    model.device, percentile)
    change = "added OOD statistics (same weights)"
    if films is not None:
        stats, summary = O.fit_outside_for_images(model.net, stats, torch.from_numpy(splits.images), splits.train,
                                                  splits.val, torch.from_numpy(films), model.device)
        change = (f"added OOD statistics with a home-vs-outside score fitted on {len(films)} outside films "
                  "(same weights)")
    new_card = card.derived(change, {"ood": summary})
    weights = (registry.version_dir(model.version) / "model.pt").read_bytes()  # byte for byte
    new_version = registry.save_version_bytes(weights, new_card, registry.new_version_id("ood"),
                                              extras={O.OOD_FILE: stats.to_bytes()})
    return new_version
