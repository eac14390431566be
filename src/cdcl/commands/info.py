"""`cdcl info DIR`: a readable summary of a dataset directory and its validation result."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cdcl.data.summary import default_split, summarize
from cdcl.errors import CdclError

HELP = "Summarise a dataset directory (design, channels, store size) and validate it."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `cdcl info`."""
    parser.add_argument("data", type=Path, help="dataset directory")
    parser.add_argument("--deep", action="store_true", help="also decode every image chunk")


def split_warnings(path: Path) -> list[str]:
    """Why the default split's held-out batches cannot be (fully) evaluated, with the fixes."""
    from cdcl.data.dataset_dir import open_dataset
    from cdcl.data.split_check import few_heldout_batches, heldout_problem

    ds = open_dataset(path, validate_on_open=False)
    try:
        split = default_split(ds)
    except CdclError:  # already said in the summary's `held out` line
        return []
    what = "the default split"
    # One warning: a fold with nothing to score first, else one with a single held-out batch.
    problem = heldout_problem(ds.samples, split, ds.info.source, what) or few_heldout_batches(
        ds.samples, split, ds.info.source, what
    )
    return [problem] if problem else []


def run(args: argparse.Namespace) -> int:
    """Print the summary, then warn when the default split cannot be (fully) evaluated."""
    print(summarize(args.data, deep=args.deep))
    for problem in split_warnings(args.data):
        print(f"cdcl info: warning: {problem}", file=sys.stderr)
    return 0
