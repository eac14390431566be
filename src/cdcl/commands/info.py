"""`cdcl info DIR`: a readable summary of a dataset directory and its validation result."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "Summarise a dataset directory (design, channels, store size) and validate it."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `cdcl info`."""
    parser.add_argument("data", type=Path, help="dataset directory")
    parser.add_argument("--deep", action="store_true", help="also decode every image chunk")


def run(args: argparse.Namespace) -> int:
    """Print the summary through `cdcl.info`, which warns when the default split cannot be
    (fully) evaluated."""
    from cdcl.api import info

    info(args.data, deep=args.deep, verbose=True)
    return 0
