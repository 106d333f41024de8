"""Speed of the Diagnose page, measured through the app's own functions (not a test; nothing asserted).

    .venv/bin/python benchmarks/bench_app.py [--registry weights] [--image samples/NORMAL/x.jpeg] [--threads 2]

1. Result with heatmap: uploaded bytes -> ``xray.serve.analysis.analyse`` (decode, predict) -> Grad-CAM at
   display size -> overlay (JPEG for the screen): everything the page computes before it can show
   one new image. Median of ``--runs`` after a warm-up.
2. Cold start: a fresh interpreter until AppTest has finished the first run of app.py (imports,
   model load, first page), and separately import + model load alone.
Target (issue 3): result with heatmap under 0.3 s on 2 CPU cores. With no active model in the registry,
a tiny model is trained on the test fixtures first (in about a second) and the output says so.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

COLD_START = """
import time, sys
t0 = time.perf_counter()
from streamlit.testing.v1 import AppTest
at = AppTest.from_file({app!r}, default_timeout=600)
at.run()
assert not at.exception, at.exception
print(time.perf_counter() - t0)
"""

IMPORT_AND_LOAD = """
import time
t0 = time.perf_counter()
import streamlit, torch, xray.serve.analysis, xray.serve.hirescam
from xray.model.registry import Registry
Registry().load_with_fallback()
print(time.perf_counter() - t0)
"""


def tiny_registry(root: Path) -> None:
    """The fixture-trained tiny model the tests use (same settings as tests/conftest.py TINY_SETTINGS)."""
    from xray.model.registry import Registry
    from xray.train.loop import TrainConfig, main

    cfg = TrainConfig(data_dir=str(ROOT / "tests" / "fixtures" / "dataset"), registry=str(root),
                      run_dir=str(root / "runs" / "tiny"), epochs=3, image_size=64, batch_size=8,
                      widths=(8, 16, 32, 64), patience=10, val_fraction=0.3, threads=1, workers=1, ema=0.0)
    Registry(root).activate(main(cfg))


def fresh_interpreter(code: str, env: dict, threads: int) -> float:
    env = {**env, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", default="", help="model registry (default: weights/ or $XRAY_WEIGHTS)")
    parser.add_argument("--image", default="", help="image to score (default: the first samples/NORMAL/*.jpeg)")
    parser.add_argument("--runs", type=int, default=7, help="timed runs after one warm-up")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the target is 2 cores)")
    parser.add_argument("--cold-runs", type=int, default=3, help="fresh-interpreter cold starts to time")
    args = parser.parse_args()

    import torch

    from xray.serve import analysis
    from xray.model.registry import Registry

    torch.set_num_threads(args.threads)
    registry = Registry(args.registry or None)
    note = f"registry {registry.root}"
    if registry.active_version() is None:
        registry = Registry(Path(tempfile.mkdtemp(prefix="bench-registry-")))
        tiny_registry(registry.root)
        note = "no active model in the registry: a TINY model trained on tests/fixtures was used"
    os.environ["XRAY_WEIGHTS"] = str(registry.root)
    model, problems = registry.load_with_fallback(torch.device("cpu"))

    image = Path(args.image) if args.image else sorted((ROOT / "samples" / "NORMAL").glob("*.jpeg"))[0]
    data = image.read_bytes()

    def result_with_heatmap() -> tuple[float, float]:
        start = time.perf_counter()
        result = analysis.analyse(model, data, image.name)
        scored = time.perf_counter()
        pixels, cam = analysis.display_pixels(result.image), analysis.display_colour_levels(model, result.image)
        analysis.overlay_jpeg(pixels, cam, 0.4)  # what the page draws; the PNG is made on download
        return scored - start, time.perf_counter() - start

    result_with_heatmap()  # warm-up: first-call allocations, lazy imports
    timings = [result_with_heatmap() for _ in range(args.runs)]
    width, height = analysis.analyse(model, data, image.name).image.size

    cold = [fresh_interpreter(COLD_START.format(app=str(ROOT / "app.py")), dict(os.environ), args.threads)
            for _ in range(args.cold_runs)]
    load = [fresh_interpreter(IMPORT_AND_LOAD, dict(os.environ), args.threads) for _ in range(args.cold_runs)]

    report = {
        "note": note, "model_version": model.version, "model_input": model.image_size,
        "parameters": model.card.get("architecture", {}).get("parameters"), "load_warnings": problems,
        "image": f"{image.relative_to(ROOT) if image.is_relative_to(ROOT) else image} ({width}x{height})",
        "torch_threads": args.threads, "cpu_count": os.cpu_count(), "device": str(model.device),
        "analyse_median_s": round(statistics.median(t[0] for t in timings), 4),
        "result_with_heatmap_median_s": round(statistics.median(t[1] for t in timings), 4),
        "result_with_heatmap_runs_s": [round(t[1], 4) for t in timings],
        "target_s": 0.3,
        "cold_start_apptest_first_run_median_s": round(statistics.median(cold), 2),
        "cold_import_and_model_load_median_s": round(statistics.median(load), 2),
        "load_average": os.getloadavg(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
