"""The configuration a training run resolves to: a preset, sized from the dataset when it is
one of the ``generic-*`` family, plus the user's overrides (one path for the API, the CLI
and the studies, so a study on a user's screen trains exactly what `cdcl train` would)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cdcl.config import Config, load_config

PathLike = str | os.PathLike


def override_list(overrides: Mapping[str, Any] | Sequence[str] | None) -> list[str]:
    """``{"train.epochs": 1}`` or ``["train.epochs=1"]`` as ``KEY=VALUE`` strings."""
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        # JSON is YAML: numbers, lists, null and quoted strings parse back to what was given.
        return [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    return [str(o) for o in overrides]


def train_config(
    data: PathLike,
    preset: str | PathLike = "generic-cdcl",
    *,
    split: int | None = None,
    subset: str | None = None,
    overrides: Mapping[str, Any] | Sequence[str] | None = None,
) -> tuple[Config, list[str], list[str], list[str]]:
    """The resolved config of `train`, all its overrides, the user's, and notices.

    A ``generic-*`` preset is sized from the dataset first (`cdcl.presets.sizing`): the
    network and crops from its images, the batch and epochs from the training images of the
    split. The user's overrides, then ``split`` and ``subset``, win over it.
    """
    from cdcl.presets.sizing import (
        SCHEDULE_KEYS,
        as_overrides,
        is_generic,
        sized_overrides,
        sized_schedule,
        sizing_note,
        warmup_epochs,
    )
    from cdcl.train.data import prepare_data

    notes: list[str] = []
    user = override_list(overrides)
    flags = [f"data.path={Path(data).resolve()}"]
    if split is not None:
        flags.append(f"data.split={int(split)}")
    if subset is not None:
        flags.append(f"data.subset={subset}")
    if not is_generic(preset):
        all_overrides = [*user, *flags]
        return load_config(preset, all_overrides), all_overrides, user, notes
    from cdcl.data.dataset_dir import open_dataset

    ds = open_dataset(data)
    base = [o for o in sized_overrides(ds, preset) if o.split("=", 1)[0] not in SCHEDULE_KEYS]
    cfg = load_config(preset, [*base, *user, *flags])
    # The schedule from the training images of the split, keeping what the user set.
    n_train = len(prepare_data(cfg).train_rows)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    user_keys = {o.split("=", 1)[0] for o in user}
    batch = cfg.train.batch_size if "train.batch_size" in user_keys else None
    schedule = sized_schedule(n_train, world, batch)
    if "train.epochs" in user_keys:
        schedule.pop("train.epochs")
        schedule["train.warmup_epochs"] = warmup_epochs(cfg.train.epochs)
    all_overrides = [*base, *as_overrides(schedule), *user, *flags]
    cfg = load_config(preset, all_overrides)
    notes.append(sizing_note(ds, preset, cfg, n_train, world, sorted(user_keys)))
    return cfg, all_overrides, user, notes
