"""``python -m mlip_fast.data.synth``: generate the synthetic benchmark from the command line."""
from __future__ import annotations

import argparse
import json
import os

from mlip_fast._records import SUMMARY_FILE
from mlip_fast.data.synth.dataset import generate

__all__ = ["main"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mlip_fast.data.synth",
        description="Generate the synthetic chest X-ray + report benchmark (prepared-MIMIC-CXR layout).",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--n", type=int, default=5000, help="number of images (default 5000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=224, help="image side in pixels (default 224)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--splits", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VALID", "TEST"))
    args = parser.parse_args(argv)
    master = generate(args.out, args.n, args.seed, args.size, args.workers, tuple(args.splits))
    summary = json.loads((master.parent / SUMMARY_FILE).read_text())
    print(f"wrote {args.n} images at {args.size} px in {summary['wall_time_s']:.1f} s "
          f"({summary['images_per_s']:.0f} images/s); master.csv: {master}; summary: {master.parent / SUMMARY_FILE}")
    return 0
