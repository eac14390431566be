"""`cdcl compare RUN_A RUN_B ... --out DIR`: several evaluations side by side."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "Put the results of several runs (or evaluated tables) side by side: table + UMAP grid."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `cdcl compare`."""
    parser.add_argument("runs", nargs="+", type=Path, help="directories holding results.json")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--names", help="comma-separated display names, one per run")


def run(args: argparse.Namespace) -> int:
    """Write comparison.csv, umap_grid.png and compare.html through `cdcl.compare`."""
    from cdcl.api import compare

    path = compare(args.runs, args.out, names=args.names or None)
    print(f"comparison: {path}")
    return 0
