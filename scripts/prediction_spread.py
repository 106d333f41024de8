"""How far the shipped models' p moves from the pinned records (tests/fixtures/shipped_predictions*.json) under
one environment: this interpreter's Pillow/numpy/torch, the thread count and CPU kernels set by the caller.

    python scripts/prediction_spread.py [--threads N] [--no-mkldnn]    # one JSON line on stdout

Run it under several environments (MKL_ENABLE_INSTRUCTIONS=AVX2|SSE4_2, ONEDNN_MAX_CPU_ISA=AVX2|SSE41, ATEN_CPU_CAPABILITY,
OMP_NUM_THREADS/MKL_NUM_THREADS, other venvs) to set tests/test_shipped_model.py's tolerance. It also says
where a difference starts: the decoded pixels, the 128x128 model input, or the logits (digests of each)."""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import PIL  # noqa: E402
import torch  # noqa: E402

from xray.io.loader import load_image  # noqa: E402
from xray.io.preprocess import model_input as to_model_input  # noqa: E402
from xray.model.registry import Registry  # noqa: E402
from xray.serve.inference import predict  # noqa: E402

RECORDS = ["shipped_predictions.json", "shipped_predictions_20261129-225647.json"]


def digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:12]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: leave torch's)")
    parser.add_argument("--no-mkldnn", action="store_true", help="torch.backends.mkldnn.enabled = False")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.no_mkldnn:
        torch.backends.mkldnn.enabled = False
    out = {"pillow": PIL.__version__, "numpy": np.__version__, "torch": torch.__version__,
           "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "mkldnn": torch.backends.mkldnn.enabled, "records": {}}
    for name in RECORDS:
        record = json.loads((ROOT / "tests" / "fixtures" / name).read_text())
        model = Registry(ROOT / "weights").load(record["version"])
        rows = {}
        for path, (pinned, _withheld, _reason) in sorted(record["predictions"].items()):
            image = load_image(ROOT / path)
            model_input = to_model_input(image, model.image_size)
            p = predict(model, [image])[0].p_pneumonia  # one at a time, as recorded
            rows[path] = {"diff": p - pinned, "pixels": digest(image.pixels), "input": digest(model_input.pixels)}
        diffs = [abs(r["diff"]) for r in rows.values()]
        out["records"][name] = {"max_abs_diff": max(diffs), "n": len(rows), "rows": rows}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
