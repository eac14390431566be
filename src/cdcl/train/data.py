"""What a run trains on: the split's index spaces, the training set, each epoch's loader.

The epoch's sample order is a pure function of (seed, epoch) and every item draws its partner
and views from its own RNG, so a loader built for a resumed epoch (skipping the batches already
trained) yields exactly the batches the killed run would have.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from cdcl.config import Config
from cdcl.data.dataset_dir import Dataset, open_dataset
from cdcl.data.splits import apply_subset, assign_split
from cdcl.data.training_set import TrainingSet
from cdcl.data.views import ViewsConfig, center_view
from cdcl.errors import CdclError


@dataclass
class RunData:
    """The dataset and the index spaces a run trains in."""

    ds: Dataset
    train_rows: np.ndarray  # image indices of the training split
    val_rows: np.ndarray  # image indices of validation images whose treatment is a known label
    label_of: dict[str, int]  # treatment -> class (controls are a class too)
    batch_of: dict[str, int]  # training batch -> index
    batch_shares: list[float]  # share of each training batch among training images


def prepare_data(cfg: Config) -> RunData:
    """Open the dataset, apply split and subset, and index labels and batches of the training part."""
    if not cfg.data.path:
        raise CdclError("no dataset given: pass --data DIR (or data.path=DIR)")
    ds = open_dataset(cfg.data.path)
    s = ds.samples
    split = assign_split(s, ds.info.source, cfg.data.split)
    split = apply_subset(s, split, cfg.data.subset, seed=cfg.train.seed)
    part = split.to_numpy()
    image = s["image"].to_numpy()
    train_rows = image[part == "train"]
    if len(train_rows) == 0:
        raise CdclError(f"{cfg.data.path}: the split leaves no training images")
    treat = s["treatment"].astype(str).to_numpy()
    batch = s["batch"].astype(str).to_numpy()
    train_mask = part == "train"
    label_of = {t: i for i, t in enumerate(sorted(set(treat[train_mask])))}
    batches = sorted(set(batch[train_mask]))
    batch_of = {b: i for i, b in enumerate(batches)}
    counts = np.array([(batch[train_mask] == b).sum() for b in batches], dtype=np.float64)
    shares = (counts / counts.sum()).tolist()
    val_mask = (part == "val") & np.isin(treat, list(label_of))
    val_rows = image[val_mask]
    if cfg.train.val_max_images is not None and len(val_rows) > cfg.train.val_max_images:
        rng = np.random.default_rng(cfg.train.seed)
        val_rows = np.sort(rng.choice(val_rows, size=cfg.train.val_max_images, replace=False))
    return RunData(ds, train_rows, val_rows, label_of, batch_of, shares)


def training_set(
    cfg: Config, data: RunData, views_cfg: ViewsConfig, method: Any, device: torch.device
) -> TrainingSet:
    """The method's training items; views made in the loader workers unless training on CUDA."""
    return TrainingSet(
        data.ds,
        data.train_rows,
        data.label_of,
        data.batch_of,
        views_cfg,
        method.view_kind,
        bool(method.cross_batch),
        cfg.train.seed,
        # Views in the loader workers on the CPU (they overlap with the step); on the GPU there.
        views_in_loader=device.type != "cuda",
        pairing=method.pairing,
    )


class SkipSampler(Sampler[int]):
    """Yields a DistributedSampler's epoch order without its first ``skip`` indices (resume)."""

    def __init__(self, inner: DistributedSampler, skip: int) -> None:
        self.inner = inner
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        return iter(list(self.inner)[self.skip :])

    def __len__(self) -> int:
        return max(0, len(self.inner) - self.skip)


def epoch_loader(
    cfg: Config,
    train_set: TrainingSet,
    sampler: DistributedSampler,
    epoch: int,
    step_in_epoch: int,
    device: torch.device,
) -> DataLoader:
    """The loader of ``epoch`` without its first ``step_in_epoch`` batches (trained already)."""
    t = cfg.train
    sampler.set_epoch(epoch)
    train_set.set_epoch(epoch)
    return DataLoader(
        train_set,
        batch_size=t.batch_size,
        sampler=SkipSampler(sampler, step_in_epoch * t.batch_size),
        drop_last=True,
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
        collate_fn=train_set.collate,
        # Own generator: iterator creation must not consume the global RNG (exact resume).
        generator=torch.Generator().manual_seed(t.seed * 100_003 + epoch),
    )


def to_device(x: Any, device: torch.device) -> Any:
    """Tensors of a (nested) batch moved to ``device``."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(to_device(v, device) for v in x)
    return x


def eval_images(ds: Dataset, idx: np.ndarray, views_cfg: Any) -> torch.Tensor:
    """Plate-standardised centre views (the evaluation input) of images ``idx``."""
    return center_view(torch.from_numpy(ds.standardized(idx)), views_cfg)
