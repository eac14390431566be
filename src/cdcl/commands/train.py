"""`cdcl train`: train a method on a dataset directory into a run directory.

Works on one process or under ``torchrun --nproc-per-node N -m cdcl train ...`` (gloo on CPU,
NCCL on GPU); only rank 0 writes files.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

HELP = "Train a representation (supervised, DINO, BYOL, -CB variants, CDCL) into a run directory."

EPILOG = """examples:
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
        help="preset name (e.g. synthetic-cdcl, rxrx1-cdcl; see `cdcl train --list-presets`) "
        "or a YAML file",
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


def fitting_batch(n_images: int, world: int) -> int:
    """A per-process batch for ``n_images`` training images on ``world`` processes (0: none fits).

    The largest power of two that leaves at least two steps per epoch, else one full batch.
    """
    per_process = n_images // max(world, 1)
    batch = 1
    while batch * 2 * 2 <= per_process:
        batch *= 2
    if batch >= 2:
        return batch
    return per_process if per_process >= 2 else 0


def _check_batch(cfg: Any, args: argparse.Namespace, n_train: int) -> Any:
    """The config with a batch that fits the training images (a notice), or a CdclError."""
    import os
    import sys

    from cdcl.config import load_config
    from cdcl.errors import CdclError

    world = int(os.environ.get("WORLD_SIZE", "1"))
    batch = int(cfg.train.batch_size)
    if batch * world <= n_train:
        return cfg
    fit = fitting_batch(n_train, world)
    procs = f" on {world} processes" if world > 1 else ""
    if fit == 0:
        raise CdclError(
            f"{args.data}: {n_train} training images{procs} are too few for a batch of 2 per "
            "process; use a larger dataset or fewer processes"
        )
    if any(o.split("=", 1)[0] == "train.batch_size" for o in args.overrides):
        raise CdclError(
            f"train.batch_size={batch}: more than the {n_train} training images of {args.data}"
            f"{procs} allow; pass train.batch_size={fit} (or less)"
        )
    if int(os.environ.get("RANK", "0")) == 0:
        steps = n_train // world // fit
        print(
            f"cdcl train: notice: batch {batch} of preset {args.preset} exceeds the {n_train} "
            f"training images{procs}; using train.batch_size={fit} ({steps} steps per epoch; "
            "pass train.batch_size=N to choose)",
            file=sys.stderr,
        )
    return load_config(args.preset, [*_overrides(args), f"train.batch_size={fit}"])


def _overrides(args: argparse.Namespace) -> list[str]:
    """KEY=VALUE overrides plus the flags (which win over the preset and the pairs)."""
    overrides = list(args.overrides)
    overrides.append(f"data.path={Path(args.data).resolve()}")
    if args.split is not None:
        overrides.append(f"data.split={args.split}")
    if args.subset is not None:
        overrides.append(f"data.subset={args.subset}")
    return overrides


def run(args: argparse.Namespace) -> int:
    """Resolve the config, check that the split and the batch fit the data, and train."""
    import os
    import sys

    from cdcl.config import load_config, preset_names
    from cdcl.errors import CdclError
    from cdcl.locking import command_lock

    if args.list_presets:
        print("\n".join(preset_names()))
        return 0
    if args.preset is None:
        raise CdclError("--preset NAME is required (see `cdcl train --list-presets`)")
    if args.data is None or args.out is None:
        raise CdclError("--data DIR and --out RUN are required")
    cfg = load_config(args.preset, _overrides(args))
    with command_lock(args.out, "cdcl train"):
        from cdcl.train.loop import prepare_data, train

        data = prepare_data(cfg)
        if int(os.environ.get("RANK", "0")) == 0:
            problem = _split_problem(data.ds, cfg)
            if problem:
                print(f"cdcl train: warning: {problem}", file=sys.stderr)
        cfg = _check_batch(cfg, args, len(data.train_rows))
        train(cfg, args.out, resume=args.resume)
    return 0


def _split_problem(ds: Any, cfg: Any) -> str | None:
    """Why the run's held-out batches cannot be evaluated (with the fix), or None."""
    from cdcl.data.split_check import heldout_problem
    from cdcl.data.splits import apply_subset, assign_split

    s = ds.samples
    split = assign_split(s, ds.info.source, cfg.data.split)
    split = apply_subset(s, split, cfg.data.subset, seed=cfg.train.seed)
    what = f"split {cfg.data.split}" if cfg.data.split is not None else "the default split"
    return heldout_problem(s, split, ds.info.source, what)
