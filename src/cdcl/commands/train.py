"""`cdcl train`: train a method on a dataset directory into a run directory.

Works on one process or under ``torchrun --nproc-per-node N -m cdcl train ...`` (gloo on CPU,
NCCL on GPU); only rank 0 writes files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "Train a representation (supervised, DINO, BYOL, -CB variants, CDCL) into a run directory."

EPILOG = """examples:
  cdcl train --preset generic-cdcl --data screen --out runs/cdcl   (sized from the dataset)
  cdcl train --preset synthetic-cdcl --data screen --out runs/cdcl
  cdcl train --preset rxrx1-dino --data rxrx1 --out runs/dino --split 1 train.epochs=100
  cdcl train --preset synthetic-cdcl --data screen --out runs/cdcl --resume
  torchrun --nproc-per-node 4 -m cdcl train --preset rxrx1-cdcl --data rxrx1 --out runs/cdcl
overrides are section.key=value with sections data, views, model, method, train;
values are YAML (train.epochs=1, views.global_scale=[0.75,0.9], model.weights=null)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `cdcl train`."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument(
        "--preset",
        help="preset name (generic-cdcl / generic-dino for your own screen, sized from the "
        "dataset; synthetic-cdcl, rxrx1-cdcl, ...; see `cdcl train --list-presets`) or a YAML file",
    )
    parser.add_argument("--data", type=Path, help="dataset directory (cdcl synth / cdcl build)")
    parser.add_argument("--out", type=Path, help="run directory to write")
    parser.add_argument(
        "--split", type=int, default=None, help="held-out-batch fold (default: the stored split)"
    )
    parser.add_argument(
        "--subset",
        default=None,
        help="training subset strategy, e.g. only_controls, only_treatments, "
        "only_treatments_half_as_many_with_controls",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from OUT/checkpoints/last.pt"
    )
    parser.add_argument("--list-presets", action="store_true", help="print the preset names")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.epochs=1"
    )


def run(args: argparse.Namespace) -> int:
    """Resolve the config, check that the split and the batch fit the data, and train."""
    from cdcl.api import presets, train
    from cdcl.errors import CdclError

    if args.list_presets:
        print("\n".join(presets()))
        return 0
    if args.preset is None:
        raise CdclError("--preset NAME is required (see `cdcl train --list-presets`)")
    if args.data is None or args.out is None:
        raise CdclError("--data DIR and --out RUN are required")
    train(
        args.data,
        args.out,
        args.preset,
        split=args.split,
        subset=args.subset,
        overrides=list(args.overrides),
        resume=args.resume,
    )
    return 0
