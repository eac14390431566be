"""Sizing the ``generic-*`` presets from a dataset: crops and patches from the image size,
network size and epochs from the number of images.

The rules are starting points for a screen nobody has tuned a preset for, chosen so that a
run lasts a few thousand optimiser steps and a ViT sees 7-14 patches across a global crop:

- images wider than 320 px are resized to 256 first (global crops 224, local 112); smaller ones
  keep their size, with crops of 224/256 and 112/256 of it;
- patches of 8 px up to 128-px crops, 16 px above;
- fewer than 5,000 images: a ViT of width 128 and depth 4 (the simulated screen's); fewer than
  50,000: ViT-Tiny (192 wide, 12 deep); more: ViT-Small (384, 12);
- epochs such that a batch of 64 takes about 3,000 steps, between 10 and 200; warm-up a tenth.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

GENERIC_PREFIX = "generic-"
RESIZE_ABOVE = 320  # px: larger fields are resized to RESIZE_TO before cropping
RESIZE_TO = 256
SMALL_PATCH_UP_TO = 128  # px of the resized field: 8-px patches up to here, 16 above
TARGET_STEPS = 3000
BATCH = 64
EPOCHS_RANGE = (10, 200)
# (images below which it applies, width, depth, heads)
NETWORKS = ((5_000, 128, 4, 4), (50_000, 192, 12, 3), (math.inf, 384, 12, 6))


def is_generic(preset: str | Path) -> bool:
    """Whether a preset is one of the dataset-sized ``generic-*`` family."""
    return str(preset).startswith(GENERIC_PREFIX) and not Path(str(preset)).suffix


def sized_values(image_size: tuple[int, int], n_images: int) -> dict[str, Any]:
    """The config values (``section.key`` -> value) for images of this size and number."""
    side = min(int(image_size[0]), int(image_size[1]))
    resize = RESIZE_TO if side > RESIZE_ABOVE else None
    base = resize or side
    patch = 8 if base <= SMALL_PATCH_UP_TO else 16
    _, width, depth, heads = next(n for n in NETWORKS if n_images < n[0])
    epochs = math.ceil(TARGET_STEPS * BATCH / max(int(n_images), 1))
    epochs = min(max(epochs, EPOCHS_RANGE[0]), EPOCHS_RANGE[1])
    return {
        "views.resize": resize,
        "model.patch_size": patch,
        "model.embed_dim": width,
        "model.depth": depth,
        "model.num_heads": heads,
        "train.batch_size": BATCH,
        "train.epochs": epochs,
        "train.warmup_epochs": max(1, round(epochs / 10)),
    }


def sized_overrides(ds: Any, preset: str | Path) -> tuple[list[str], str]:
    """``KEY=VALUE`` overrides sizing ``preset`` for dataset ``ds``, and a line saying so."""
    h, w = ds.info.image_size
    n = int(ds.info.n_images)
    values = sized_values((h, w), n)
    overrides = [f"{k}={'null' if v is None else v}" for k, v in values.items()]
    resized = f", resized to {values['views.resize']} px" if values["views.resize"] else ""
    note = (
        f"{preset} sized for {n} images of {h}x{w} px{resized}: ViT {values['model.embed_dim']} "
        f"wide x {values['model.depth']} deep with {values['model.patch_size']}-px patches, "
        f"{values['train.epochs']} epochs of batch {values['train.batch_size']} "
        "(key=value overrides win)"
    )
    return overrides, note
