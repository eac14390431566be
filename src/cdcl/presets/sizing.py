"""Sizing the ``generic-*`` presets from a dataset: crops and patches from the image size,
network size from the number of images, and the length of the run from the images it sees.

The rules are starting points for a screen nobody has tuned a preset for, chosen so that a
ViT sees 7-14 patches across a global crop and a run's cost follows the images it sees
(the time of a step grows with its batch, so images seen, not epochs, is what a run costs):

- images wider than 320 px are resized to 256 first (global crops 224, local 112); smaller ones
  keep their size, with crops of 224/256 and 112/256 of it;
- patches of 8 px up to 128-px crops, 16 px above;
- fewer than 5,000 images: a ViT of width 128 and depth 4 (the simulated screen's); fewer than
  50,000: ViT-Tiny (192 wide, 12 deep); more: ViT-Small (384, 12);
- a batch of 64, or for fewer than 128 training images the largest power of two that still
  makes two steps per epoch;
- 192,000 images seen (3,000 steps of 64), but at least 10 and at most 100 passes over the
  training images, and never fewer than 200 steps; the epochs follow from the images each
  epoch sees (whole batches only), and the warm-up is a tenth of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

GENERIC_PREFIX = "generic-"
RESIZE_ABOVE = 320  # px: larger fields are resized to RESIZE_TO before cropping
RESIZE_TO = 256
SMALL_PATCH_UP_TO = 128  # px of the resized field: 8-px patches up to here, 16 above
BATCH = 64
TARGET_IMAGES = 3000 * BATCH  # images seen by a run on a mid-sized screen
PASSES = (10, 100)  # at least / at most this many passes over the training images
MIN_STEPS = 200  # the schedules (warm-up, teacher momentum) need a few hundred steps
# (images below which it applies, width, depth, heads)
NETWORKS = ((5_000, 128, 4, 4), (50_000, 192, 12, 3), (math.inf, 384, 12, 6))
SCHEDULE_KEYS = ("train.batch_size", "train.epochs", "train.warmup_epochs")


def is_generic(preset: str | Path) -> bool:
    """Whether a preset is one of the dataset-sized ``generic-*`` family."""
    return str(preset).startswith(GENERIC_PREFIX) and not Path(str(preset)).suffix


def sized_batch(n_train: int, world: int = 1) -> int:
    """The per-process batch: 64, or the largest power of two leaving two steps per epoch."""
    per_process = max(int(n_train) // max(int(world), 1), 1)
    batch = BATCH
    while batch > 2 and batch * 2 > per_process:
        batch //= 2
    return batch


def sized_epochs(n_train: int, batch: int, world: int = 1) -> int:
    """Epochs that make the run see about :data:`TARGET_IMAGES` images (see the module's rule)."""
    world = max(int(world), 1)
    steps_per_epoch = max(int(n_train) // world // max(int(batch), 1), 1)
    per_epoch = steps_per_epoch * batch * world  # images an epoch sees (whole batches)
    target = min(max(TARGET_IMAGES, PASSES[0] * n_train), PASSES[1] * n_train)
    epochs = max(round(target / per_epoch), 1)
    return max(epochs, math.ceil(MIN_STEPS / steps_per_epoch))


def sized_schedule(n_train: int, world: int = 1, batch: int | None = None) -> dict[str, Any]:
    """Batch, epochs and warm-up for ``n_train`` training images (``batch``: the user's)."""
    b = sized_batch(n_train, world) if batch is None else int(batch)
    epochs = sized_epochs(n_train, b, world)
    return {
        "train.batch_size": b,
        "train.epochs": epochs,
        "train.warmup_epochs": warmup_epochs(epochs),
    }


def warmup_epochs(epochs: int) -> int:
    """A tenth of the epochs, at least one."""
    return max(1, round(int(epochs) / 10))


def sized_values(image_size: tuple[int, int], n_images: int) -> dict[str, Any]:
    """The config values (``section.key`` -> value) for images of this size and number.

    The schedule assumes every image trains; :func:`sized_schedule` redoes it from the
    training images of the split once they are known.
    """
    side = min(int(image_size[0]), int(image_size[1]))
    resize = RESIZE_TO if side > RESIZE_ABOVE else None
    base = resize or side
    patch = 8 if base <= SMALL_PATCH_UP_TO else 16
    _, width, depth, heads = next(n for n in NETWORKS if n_images < n[0])
    return {
        "views.resize": resize,
        "model.patch_size": patch,
        "model.embed_dim": width,
        "model.depth": depth,
        "model.num_heads": heads,
        **sized_schedule(max(int(n_images), 1)),
    }


def as_overrides(values: dict[str, Any]) -> list[str]:
    """``section.key`` -> value as ``KEY=VALUE`` strings."""
    return [f"{k}={'null' if v is None else v}" for k, v in values.items()]


def sized_overrides(ds: Any, preset: str | Path) -> list[str]:
    """``KEY=VALUE`` overrides sizing ``preset`` for dataset ``ds`` (schedule: all images)."""
    h, w = ds.info.image_size
    return as_overrides(sized_values((h, w), int(ds.info.n_images)))


def sizing_note(
    ds: Any, preset: str | Path, cfg: Any, n_train: int, world: int, user_keys: Sequence[str]
) -> str:
    """The line saying how ``preset`` was sized for ``ds`` and what the run will see."""
    h, w = ds.info.image_size
    n = int(ds.info.n_images)
    t, m = cfg.train, cfg.model
    resized = f", resized to {cfg.views.resize} px" if cfg.views.resize else ""
    steps_per_epoch = max(n_train // max(world, 1) // t.batch_size, 1)
    seen = t.epochs * steps_per_epoch * t.batch_size * max(world, 1)
    sized = {*sized_values((h, w), n), "train.warmup_epochs"}
    mine = sorted(k for k in sized if k in user_keys)
    yours = f"; as you set: {', '.join(mine)}" if mine else " (key=value overrides win)"
    return (
        f"{preset} sized for {n} images of {h}x{w} px{resized}: ViT {m.embed_dim} wide x "
        f"{m.depth} deep with {m.patch_size}-px patches; batch {t.batch_size}, {t.epochs} "
        f"epochs over {n_train} training images = {seen:,} images seen{yours}"
    )
