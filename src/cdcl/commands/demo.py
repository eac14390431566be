"""`cdcl demo`: the paper's central comparison on the simulated screen (or real BBBC021 crops)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

HELP = (
    "Train DINO, DINO-CB, CDCL and a supervised baseline with one budget, evaluate them with the "
    "baselines on held-out batches, and write report.html, results.md and results.json."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `cdcl demo`."""
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output directory")
    parser.add_argument(
        "--dataset",
        choices=("synthetic", "bbbc021"),
        default="synthetic",
        help="synthetic: the built-in `small` screen (default); bbbc021: the real week-4 crops "
        "(DINO and CDCL on 4 plates, evaluated on the 2 held-out plates)",
    )
    parser.add_argument(
        "--bbbc021-dir", type=Path, default=None, help="folder with cells_subset.npz (bbbc021)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the tiny screen and two epochs per method: a check that everything runs (minutes on 2 CPU cores), not a result",
    )
    parser.add_argument("--fresh", action="store_true", help="rebuild data and retrain everything")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--epochs", type=int, default=None, help="training epochs per method (default: the budget)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="also score the first method's held-out design under a null and injected batch "
        "effects (see cdcl evaluate --calibrate); adds minutes",
    )
    parser.add_argument(
        "--cellprofiler",
        action="store_true",
        help="add the CellProfiler row (cp-measure per cell, median per well, normalised and "
        "feature-selected) with its +sphering/+harmony/+combat rows; about 2 CPU minutes on "
        "the small screen",
    )


def run(args: argparse.Namespace) -> int:
    """Run the demo through `cdcl.demo` and print the table and the report's path."""
    from cdcl.api import demo
    from cdcl.experiments.demo import to_text

    t0 = time.perf_counter()
    result = demo(
        args.out,
        dataset=args.dataset,
        bbbc021_dir=args.bbbc021_dir,
        quick=args.quick,
        fresh=args.fresh,
        seed=args.seed,
        epochs=args.epochs,
        calibrate=args.calibrate,
        cellprofiler=args.cellprofiler,
        progress=not args.no_progress,
    )
    print()
    print("Held-out batches, well profiles standardised per plate against controls:")
    print(to_text(result["table"]))
    print()
    for name, secs in result["timings"].items():
        print(f"  {name:<22s} {secs:7.1f} s")
    print(f"  {'total':<22s} {time.perf_counter() - t0:7.1f} s")
    print(f"\nreport: {result['paths']['html']}")
    print(f"table:  {result['paths']['md']}")
    return 0
