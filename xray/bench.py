"""Benchmarks, all in one run so that ratios hold on a noisy machine: training seconds per epoch,
end-to-end ``predict`` throughput (decode + preprocess + forward, with and without Grad-CAM), a
reference network's forward-only throughput, and the machine's matmul GFLOP/s.

``python -m xray bench [--train-data DIR] [--images DIR] [--json OUT]``; figures for the README.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import math
import os
import resource
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from xray.atomic import atomic_write_json
from xray.model.card import ModelCard
from xray.io.folders import IMAGE_EXTENSIONS
from xray.serve.hirescam import GradCam
from xray.io.loader import load_image
from xray.serve.inference import predict
from xray.model.net import PneumoniaNet, build_net, count_macs, count_parameters, fold_batchnorm, place
from xray.train.optim import EMA, make_optimizer
from xray.serve.pipeline import _prepare_chunk, cpu_allocation, score_paths
from xray.model.registry import LoadedModel, ModelFileError, Registry, pick_device
from xray.io.folders import load_training_data
from xray.train.loop import EpochContext, predict_logits, train_one_epoch
from xray.train.config import TrainConfig, model_config

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TRAIN = REPO.parent / "shared" / "data" / "chest_xray" / "train"
REFERENCE_SIZE = 224  # issues 15 and 25: predict >= 1.0x mobilenet_v3_small's forward at 224 px, 3-channel, batch 32 (was 1.5x)
MIN_RUN_S = 0.3  # each timed forward-only run lasts at least this long
# JPEGs as the training set stores them (224 px) and as a clinician uploads them (full resolution)
DEFAULT_IMAGES = (DEFAULT_TRAIN, REPO / "tests" / "fixtures" / "dataset", REPO / "samples")


# -- measuring ----------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_rss_mib() -> float:
    """This process's peak resident memory since the last ``_reset_peak`` (Linux VmHWM)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # since start, where /proc is absent


def _reset_peak(device: torch.device) -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


@contextmanager
def _section(result: dict, device: torch.device):
    """Record peak memory of the block into ``result``."""
    _reset_peak(device)
    yield
    result["peak_rss_mib"] = round(_peak_rss_mib(), 1)
    if device.type == "cuda":
        result["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def _rate(fn: Callable[[], int], device: torch.device, repeats: int) -> float:
    """Items per second of ``fn`` (which returns how many items it handled): best of ``repeats``
    after one warm-up, because on a shared machine the fastest run is the least disturbed one."""
    fn()
    best = 0.0
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        n = fn()
        _sync(device)
        best = max(best, n / (time.perf_counter() - start))
    return best


def matmul_gflops(size: int, repeats: int, device: torch.device) -> float:
    """Measured float32 matrix-multiply rate: the practical peak the forward pass is compared with."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    return _rate(lambda: (torch.mm(a, b), 1)[1], device, repeats) * 2 * size**3 / 1e9


# -- the model -----------------------------------------------------------------------------------------
def bench_model(registry: str, version: str, device: torch.device) -> tuple[LoadedModel, str]:
    """The active (or named) model; else the shipped architecture, untrained: same speed, no meaning."""
    try:
        reg = Registry(registry or None)
        if version or reg.active_version():
            model = reg.load(version or None, device)
            return model, f"{model.version} (from {reg.root})"
    except (ModelFileError, ValueError):
        pass
    d = TrainConfig()
    net = place(build_net(model_config(d)), device).eval()
    card = ModelCard.from_dict({"version": "untrained", "threshold": 0.5, "preprocessing": {"image_size": d.image_size},
                                "architecture": {"config": net.config.to_dict()}})
    return LoadedModel(net, card, device), "untrained net at TrainConfig defaults (no active model)"


def forward_rates(model: LoadedModel, batch: int, repeats: int, compile_: bool) -> dict:
    """Forward-only images/s of our network in several forms, and the reference network's."""
    import torchvision

    device, size = model.device, model.image_size
    out: dict = {}
    x1 = torch.randn(batch, 1, size, size, device=device)
    cl = (lambda t: t.contiguous(memory_format=torch.channels_last)) if device.type == "cpu" else (lambda t: t)

    def rate(net, x, autocast=None):
        def forward(times: int) -> int:
            with torch.inference_mode(), (torch.autocast(device.type, dtype=autocast) if autocast is not None
                                          else contextlib.nullcontext()):
                for _ in range(times):
                    net(x)
            return times * x.shape[0]

        forward(1)  # warm-up, then enough batches per timed run to last about MIN_RUN_S: one batch is
        start = time.perf_counter()  # a few milliseconds, too short to time on a shared machine
        forward(1)
        _sync(device)
        times = max(1, math.ceil(MIN_RUN_S / max(time.perf_counter() - start, 1e-6)))
        return round(_rate(lambda: forward(times), device, repeats), 1)

    plain = copy.deepcopy(model.net).to(memory_format=torch.contiguous_format)
    out["ours_contiguous"] = rate(plain, x1)
    out["ours_channels_last"] = rate(model.net, cl(x1))
    out["ours_channels_last_bn_folded"] = rate(fold_batchnorm(model.net), cl(x1))  # what inference.predict uses
    if device.type == "cpu":
        out["ours_channels_last_bf16_autocast"] = rate(model.net, cl(x1), torch.bfloat16)
    else:
        out["ours_autocast"] = rate(model.net, x1, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    if compile_:
        start = time.perf_counter()
        compiled = torch.compile(model.net)
        with torch.inference_mode():
            compiled(cl(x1))
        out["ours_torch_compile"] = rate(compiled, cl(x1))
        out["torch_compile_seconds_to_build"] = round(time.perf_counter() - start, 1)
    threads = torch.get_num_threads()
    if device.type == "cpu" and threads > 1:
        torch.set_num_threads(1)
        out["ours_channels_last_1_thread"] = rate(model.net, cl(x1))
        torch.set_num_threads(threads)
    ref = torchvision.models.mobilenet_v3_small(weights=None, num_classes=1).to(device).eval()
    x3 = torch.randn(batch, 3, REFERENCE_SIZE, REFERENCE_SIZE, device=device)
    out["reference_contiguous"] = rate(ref, x3)
    out["reference_channels_last"] = rate(ref.to(memory_format=torch.channels_last), cl(x3))
    out["reference"] = ("torchvision mobilenet_v3_small(weights=None, num_classes=1), 3-channel "
                        f"{REFERENCE_SIZE}x{REFERENCE_SIZE} input, eval, inference_mode, batch {batch}, {threads} "
                        "threads; the faster of its two memory formats counts")
    return out


# -- end to end ---------------------------------------------------------------------------------------
def end_to_end(model: LoadedModel, paths: list[Path], repeats: int, workers: int) -> dict:
    """Images/s from file to Prediction: in one process (load_image + predict) at batch 1 and 32 and
    with Grad-CAM; through the CLI's pipeline (decoding processes + batches of 32); and decoding alone,
    in one process and in the pipeline's processes (the ceiling for any network); peak memory of each."""
    device = model.device
    out: dict = {}

    def batched(size: int) -> Callable[[], int]:
        def run():
            for start in range(0, len(paths), size):
                predict(model, [load_image(p) for p in paths[start:start + size]], batch_size=size)
            return len(paths)
        return run

    def with_cam() -> int:
        with GradCam(model) as cam:
            for path in paths:
                image = load_image(path)
                predict(model, [image])
                cam(image)
        return len(paths)

    def streaming() -> int:
        return sum(1 for _ in score_paths(model, iter(paths), batch_size=32, workers=workers))

    def decode_only() -> int:
        for p in paths:
            load_image(p)
        return len(paths)

    processes = workers or (os.cpu_count() or 1)
    pool = ProcessPoolExecutor(processes)  # started once: this row is the decoders' ceiling, not start-up

    def decode_all_cores() -> int:
        chunks = [paths[i:i + 16] for i in range(0, len(paths), 16)]
        return sum(len(done) for done in pool.map(_prepare_chunk, chunks, [model.image_size] * len(chunks)))

    for name, fn in (("decode_only", decode_only), ("decode_and_resize_all_cores", decode_all_cores),
                     ("batch_1", batched(1)), ("batch_32", batched(32)),
                     ("batch_1_gradcam", with_cam), ("cli_streaming_batch_32", streaming)):
        row: dict = {}
        with _section(row, device):
            row["images_per_s"] = round(_rate(fn, device, repeats), 2)
        out[name] = row
    pool.shutdown()
    out["cli_streaming_batch_32"]["network_threads"], out["cli_streaming_batch_32"]["decode_processes"] = \
        cpu_allocation(workers)
    out["decode_and_resize_all_cores"]["decode_processes"] = processes
    return out


def end_to_end_folder(model: LoadedModel, folder: Path, args: argparse.Namespace, reference: float) -> dict:
    """``end_to_end`` on ``args.n_images`` reads cycling over the image files in ``folder``."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        return {"folder": str(folder), "skipped": f"no image files in {folder}"}
    sizes = []
    for f in files:
        with Image.open(f) as im:
            sizes.append(im.size[0] * im.size[1])
    step = max(1, len(files) // args.n_images)  # spread over the folder (both classes), not its first files
    paths = list(itertools.islice(itertools.cycle(files[::step]), args.n_images))
    e2e = {"folder": str(folder), "images": f"{len(paths)} reads cycling over {len(files)} files, "
                                           f"median {statistics.median(sizes) / 1e6:.2f} megapixels"}
    e2e.update(end_to_end(model, paths, args.repeats, args.workers))
    for row in ("batch_32", "cli_streaming_batch_32", "decode_and_resize_all_cores"):
        e2e[f"{row}_vs_reference_forward"] = round(e2e[row]["images_per_s"] / reference, 3)
    e2e["target"] = ">= 1.0x the reference's forward-only images/s"
    return e2e


# -- training -----------------------------------------------------------------------------------------
def training(data_dir: Path, steps: int, epochs: int, device: torch.device) -> dict:
    """Seconds per epoch at the shipped settings, measured on ``steps`` steps of each of ``epochs``
    epochs and scaled to a whole epoch; decoding measured cold (private cache) and cached."""
    cfg = TrainConfig(data_dir=str(data_dir))
    out: dict = {"settings": "xray.train.TrainConfig defaults", "batch_size": cfg.batch_size,
                 "image_size": cfg.image_size, "widths": list(cfg.widths), "stem": cfg.stem, "augment": cfg.augment,
                 "ema": cfg.ema, "steps_measured_per_epoch": steps, "epochs_measured": epochs}
    old_cache = os.environ.get("XRAY_CACHE")
    with tempfile.TemporaryDirectory(prefix="xray-bench-cache-") as cache:
        os.environ["XRAY_CACHE"] = cache  # cold: the first epoch of a new data set decodes every file
        try:
            row: dict = {}
            with _section(row, device):
                start = time.perf_counter()
                data = load_training_data(cfg.data_dir, **cfg.folder_options())
                row["seconds"] = round(time.perf_counter() - start, 2)
            row["images"] = int(len(data.images))
            row["images_per_s"] = round(len(data.images) / row["seconds"], 1)
            out["decode_cold"] = row
            start = time.perf_counter()
            load_training_data(cfg.data_dir, **cfg.folder_options())
            out["decode_cached_seconds"] = round(time.perf_counter() - start, 2)
        finally:
            if old_cache is None:
                os.environ.pop("XRAY_CACHE", None)
            else:
                os.environ["XRAY_CACHE"] = old_cache
    torch.manual_seed(cfg.seed)
    model = place(PneumoniaNet(model_config(cfg).member), device)  # one member: an ensemble trains its members one after the other
    steps_per_epoch = max(1, len(data.train) // cfg.batch_size)
    optimizer, scheduler = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.epochs, steps_per_epoch)
    ema = EMA(model, cfg.ema) if cfg.ema > 0 else None
    generator = torch.Generator().manual_seed(cfg.seed)
    images, labels = torch.from_numpy(data.images), torch.from_numpy(data.labels)
    ctx = EpochContext(images, labels, cfg, data.pos_weight, generator, device, ema=ema)
    subset = data.train[: steps * cfg.batch_size]
    val_subset = data.val[: steps * cfg.batch_size]
    out.update(train_images=int(len(data.train)), val_images=int(len(data.val)), steps_per_epoch=steps_per_epoch)
    out["epochs"] = []
    for epoch in range(1, epochs + 1):
        row = {"epoch": epoch}
        with _section(row, device):
            _sync(device)
            start = time.perf_counter()
            train_one_epoch(model, optimizer, scheduler, subset, epoch, ctx)
            _sync(device)
            train_s = time.perf_counter() - start
            start = time.perf_counter()
            predict_logits(model, images, val_subset, device)
            val_s = time.perf_counter() - start
        per_image, per_val = train_s / len(subset), val_s / max(len(val_subset), 1)
        row.update(train_images_per_s=round(1 / per_image, 1), val_images_per_s=round(1 / per_val, 1),
                   seconds_per_epoch_estimate=round(per_image * steps_per_epoch * cfg.batch_size
                                                    + per_val * len(data.val), 1))
        out["epochs"].append(row)
    return out


# -- report -------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict:
    """Every measurement, in one process; returns the JSON-able result."""
    device = torch.device(args.device) if args.device else pick_device()
    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict = {"device": str(device), "torch": torch.__version__, "cpu_cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "load_average_1min": round(os.getloadavg()[0], 2)}
    result["matmul_gflops"] = round(matmul_gflops(args.matmul_size, args.repeats, device), 1)
    model, described = bench_model(args.registry, args.model, device)
    macs = count_macs(copy.deepcopy(model.net).cpu().float(), model.image_size)
    result["model"] = {"which": described, "image_size": model.image_size, "parameters": count_parameters(model.net),
                       "macs_per_image": macs, "flops_per_image": 2 * macs,
                       "gflops_per_image": round(2 * macs / 1e9, 6)}
    fwd = forward_rates(model, args.batch, args.repeats, args.compile)
    fwd["ours_gflops_achieved"] = round(fwd["ours_channels_last_bn_folded"] * 2 * macs / 1e9, 1)
    fwd["fraction_of_matmul_peak"] = round(fwd["ours_gflops_achieved"] / result["matmul_gflops"], 3)
    result["forward"] = fwd

    reference = max(fwd["reference_contiguous"], fwd["reference_channels_last"])
    result["end_to_end"] = [end_to_end_folder(model, Path(folder), args, reference) for folder in args.images]

    data_dir = Path(args.train_data)
    if args.train_steps > 0 and data_dir.is_dir():
        result["training"] = training(data_dir, args.train_steps, args.train_epochs, device)
    else:
        result["training"] = {"skipped": f"no folder {data_dir}" if not data_dir.is_dir() else "--train-steps 0"}
    result["load_average_1min_end"] = round(os.getloadavg()[0], 2)
    return result


def table(result: dict) -> str:
    """The result as a readable text table."""
    lines = [f"device {result['device']}, torch {result['torch']}, {result['cpu_cores']} cores, "
             f"{result['torch_threads']} torch threads, load average {result['load_average_1min']} -> "
             f"{result['load_average_1min_end']}",
             f"machine: float32 matmul {result['matmul_gflops']} GFLOP/s (measured, torch.mm)"]
    m = result["model"]
    lines.append(f"model: {m['which']}; {m['image_size']}px, {m['parameters']:,} parameters, "
                 f"{m['gflops_per_image']} GFLOP/image")
    lines.append("")
    lines.append(f"{'forward only (batch)':44s} {'images/s':>10s}")
    for k, v in result["forward"].items():
        if isinstance(v, float) and k not in ("fraction_of_matmul_peak", "ours_gflops_achieved"):
            lines.append(f"  {k:42s} {v:10.1f}")
    f = result["forward"]
    lines.append(f"  ours (channels_last, BatchNorm folded: what predict runs) reaches {f['ours_gflops_achieved']} GFLOP/s = "
                 f"{f['fraction_of_matmul_peak']:.1%} of the measured matmul rate")
    lines.append(f"  reference: {f['reference']}")
    for e in result["end_to_end"]:
        lines.append("")
        if "skipped" in e:
            lines.append(f"end to end: skipped ({e['skipped']})")
            continue
        lines.append(f"end to end, {e['folder']}: {e['images']}")
        lines.append(f"{'  (file -> Prediction)':44s} {'images/s':>10s} {'peak RSS MiB':>13s}")
        for k, v in e.items():
            if isinstance(v, dict):
                lines.append(f"  {k:42s} {v['images_per_s']:10.2f} {v['peak_rss_mib']:13.1f}")
        lines.append(f"  vs the reference's forward-only rate: CLI pipeline {e['cli_streaming_batch_32_vs_reference_forward']}x, "
                     f"one-process batch 32 {e['batch_32_vs_reference_forward']}x, decoding alone on all cores "
                     f"{e['decode_and_resize_all_cores_vs_reference_forward']}x (target {e['target']})")
    t = result["training"]
    lines.append("")
    if "skipped" in t:
        lines.append(f"training: skipped ({t['skipped']})")
    else:
        lines.append(f"training ({t['settings']}: batch {t['batch_size']}, {t['image_size']}px, stem {t['stem']}, widths {t['widths']}, "
                     f"augment {t['augment']}, ema {t['ema']}); {t['train_images']} train / {t['val_images']} val images")
        d = t["decode_cold"]
        lines.append(f"  decode, cold cache: {d['seconds']} s for {d['images']} images ({d['images_per_s']}/s, "
                     f"peak RSS {d['peak_rss_mib']} MiB); from the cache: {t['decode_cached_seconds']} s")
        for row in t["epochs"]:
            lines.append(f"  epoch {row['epoch']}: {row['train_images_per_s']} train images/s, "
                         f"{row['val_images_per_s']} val images/s -> about {row['seconds_per_epoch_estimate']} s/epoch "
                         f"(peak RSS {row['peak_rss_mib']} MiB)")
        lines.append(f"  measured on {t['steps_measured_per_epoch']} steps of each epoch, scaled to "
                     f"{t['steps_per_epoch']} steps; the first epoch of a new data set adds the cold decode")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train-data", default=str(DEFAULT_TRAIN),
                   help="labelled folder for the training figures (default ../shared/data/chest_xray/train; skipped when absent)")
    p.add_argument("--train-steps", type=int, default=10, help="steps measured per epoch; 0 = skip training (default 10)")
    p.add_argument("--train-epochs", type=int, default=2, help="epochs measured (default 2)")
    p.add_argument("--images", nargs="+", default=[str(p) for p in DEFAULT_IMAGES],
                   help="folders of images for the end-to-end figures, each measured on its own "
                        "(default: the training JPEGs (224 px) when present, tests/fixtures/dataset (16 of them), "
                        "samples/ (full resolution); a missing folder is reported as skipped)")
    p.add_argument("--n-images", type=int, default=512,
                   help="images read per end-to-end measurement, enough to amortise starting the decoding processes (default 512)")
    p.add_argument("--batch", type=int, default=32, help="batch of the forward-only figures (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of each figure; the best counts (default 3)")
    p.add_argument("--matmul-size", type=int, default=2048, help="side of the square matrices (default 2048)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    p.add_argument("--workers", type=int, default=0, help="decoding processes of the CLI pipeline (default: one per core)")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile (slow to build)")
    p.add_argument("--device", default="", help="cpu or cuda (default: cuda when present)")
    p.add_argument("--model", default="", help="model version (default: the active one)")
    p.add_argument("--registry", default="", help="registry folder (default weights/ or $XRAY_WEIGHTS)")
    p.add_argument("--json", default="", help="also write the figures as JSON here")


def main(args: argparse.Namespace) -> int:

    result = run(args)
    print(table(result))
    if args.json:
        atomic_write_json(args.json, result)
    return 0
