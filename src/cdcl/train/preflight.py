"""Checks before training: does the batch fit the data, can the held-out batches be evaluated."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from cdcl.errors import CdclError


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


def fit_batch(
    cfg: Any,
    preset: str | Path,
    overrides: list[str],
    data: Path,
    n_train: int,
    user_overrides: list[str] | None = None,
) -> Any:
    """The config with a batch that fits the training images (a notice), or a CdclError.

    A batch the user asked for (in ``user_overrides``) is an error when too big; one from the
    preset (or its sizing) is shrunk with a notice.
    """
    from cdcl.config import load_config

    world = int(os.environ.get("WORLD_SIZE", "1"))
    batch = int(cfg.train.batch_size)
    if batch * world <= n_train:
        return cfg
    fit = fitting_batch(n_train, world)
    procs = f" on {world} processes" if world > 1 else ""
    if fit == 0:
        raise CdclError(
            f"{data}: {n_train} training images{procs} are too few for a batch of 2 per "
            "process; use a larger dataset or fewer processes"
        )
    asked = overrides if user_overrides is None else user_overrides
    if any(o.split("=", 1)[0] == "train.batch_size" for o in asked):
        raise CdclError(
            f"train.batch_size={batch}: more than the {n_train} training images of {data}"
            f"{procs} allow; pass train.batch_size={fit} (or less)"
        )
    if int(os.environ.get("RANK", "0")) == 0:
        steps = n_train // world // fit
        print(
            f"cdcl train: notice: batch {batch} of preset {preset} exceeds the {n_train} "
            f"training images{procs}; using train.batch_size={fit} ({steps} steps per epoch; "
            "pass train.batch_size=N to choose)",
            file=sys.stderr,
        )
    return load_config(preset, [*overrides, f"train.batch_size={fit}"])


def split_problems(ds: Any, cfg: Any) -> list[str]:
    """Why the run's held-out batches cannot be (fully) evaluated, each with its fix."""
    from cdcl.data.split_check import few_heldout_batches, heldout_problem
    from cdcl.data.splits import apply_subset, assign_split

    s = ds.samples
    split = assign_split(s, ds.info.source, cfg.data.split)
    split = apply_subset(s, split, cfg.data.subset, seed=cfg.train.seed)
    what = f"split {cfg.data.split}" if cfg.data.split is not None else "the default split"
    # One warning: a fold with nothing to score first, else one with a single held-out batch.
    problem = heldout_problem(s, split, ds.info.source, what) or few_heldout_batches(
        s, split, ds.info.source, what
    )
    return [problem] if problem else []
