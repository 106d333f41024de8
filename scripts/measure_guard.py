"""Measure the intended-use guard (issue 13) of a version: false withholds on its validation split and on
the full-resolution samples, the withheld rate and the reasons on external chest films (external-dev:
243 adult frontal films of another hospital), and the share of other images (photos, documents, CT/MR,
noise; scripts/measure_ood.py's corpus) caught. Every image goes through load_image and predict.

Usage: python scripts/measure_guard.py DATA_DIR [--registry weights] [--model V] [--external DIR]
       [--samples DIR] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import measure_ood as MO  # noqa: E402
from xray.io.loader import load_image  # noqa: E402
from xray.serve.inference import predict  # noqa: E402
from xray.model.registry import Registry  # noqa: E402


def outcomes(model, sources) -> list[tuple[str, str]]:
    """(outcome, reason) per readable source (path or (name, bytes))."""
    out = []
    for source in sources:
        try:
            image = load_image(source[1], name=source[0]) if isinstance(source, tuple) else load_image(source)
        except ValueError:
            continue
        p = predict(model, [image])[0]
        out.append((p.outcome, p.withheld_reason))
    return out


def summary(rows: list[tuple[str, str]]) -> dict:
    counts = Counter(o for o, _ in rows)
    n = len(rows)
    return {"n": n, "withheld": round(1 - counts.get("verdict", 0) / n, 4) if n else None,
            "outcomes": dict(counts),
            "reasons": dict(Counter(r.split(" (")[0].split(":")[0] for o, r in rows if o != "verdict"))}


def main() -> int:
    root = Path(__file__).resolve().parents[2]
    parser = argparse.ArgumentParser()
    parser.add_argument("data_dir")
    parser.add_argument("--registry", default="weights")
    parser.add_argument("--model", default="")
    parser.add_argument("--external", default=str(root / "shared" / "data" / "external-dev" / "images"))
    parser.add_argument("--samples", default=str(root / "shared" / "data" / "samples"))
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    model = Registry(args.registry).load(args.model or None)
    report = {"model": model.version}
    report["validation"] = summary(outcomes(model, MO.validation_paths(model.card, args.data_dir)))
    report["fullres_samples"] = summary(outcomes(model, sorted(Path(args.samples).rglob("*.jp*g"))))
    report["external_dev"] = summary(outcomes(model, sorted(Path(args.external).glob("*.png"))))
    rng = np.random.default_rng(0)
    other = (MO.skimage_images() + MO.pydicom_images() + MO.documents(rng) + MO.noise_and_gradients(rng)
             + MO.colour_images(rng))
    report["other_images"] = summary(outcomes(model, [(n.split(":", 1)[-1], d) for n, d in other]))
    text = json.dumps(report, indent=1)
    if args.json:
        Path(args.json).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
