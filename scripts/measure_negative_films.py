"""How often the guard's negative-film check (``xray.serve.guard.looks_inverted``) fires: on films as they
are (false positives), on the same films inverted (the MONOCHROME1-exported-as-PNG mistake it is for)
and on them turned by 90 degrees (films stored on their side must not be called negatives).

Usage: python scripts/measure_negative_films.py FOLDER [FOLDER ...] [--size 128]
Prints one line per folder: n, flagged as they are, flagged inverted, flagged turned.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from xray.io.loader import sniff  # noqa: E402
from xray.io.preprocess import try_read_model_input  # noqa: E402
from xray.serve.guard import looks_inverted  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--size", type=int, default=128, help="model input side (the shipped version's: 128)")
    args = parser.parse_args()
    for folder in args.folders:
        files = [p for p in sorted(Path(folder).rglob("*")) if p.is_file() and sniff(p) in ("image", "DICOM")]
        counts, flagged_names = np.zeros(3, dtype=int), []
        n = 0
        for path in files:
            prepared, _ = try_read_model_input(path, args.size)
            if prepared is None:
                continue
            n += 1
            pixels = prepared.pixels
            hits = (looks_inverted(pixels), looks_inverted(255 - pixels), looks_inverted(np.rot90(pixels)))
            counts += np.array(hits, dtype=int)
            if hits[0]:
                flagged_names.append(str(path.relative_to(folder)))
        print(f"{folder}: n={n}; flagged as they are {counts[0]} ({counts[0] / max(n, 1):.2%}); inverted copies "
              f"flagged {counts[1]} ({counts[1] / max(n, 1):.2%}); turned 90 degrees flagged {counts[2]} "
              f"({counts[2] / max(n, 1):.2%})" + (f"; flagged: {', '.join(flagged_names[:10])}" if flagged_names else ""),
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
