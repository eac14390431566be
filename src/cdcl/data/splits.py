"""Held-out-batch splits and training-subset strategies, defined on metadata alone.

A split assigns every image one of ``train``, ``val``, ``test`` (or ``unused`` once a subset
strategy drops it). Batches never straddle two parts, so evaluation always runs on batches the
model has not seen. Adapters may register a scheme for their source (e.g. the seed's RxRx1
experiment rotation); otherwise batches rotate through the parts generically.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from cdcl.errors import CdclError

PARTS = ("train", "val", "test")
UNUSED = "unused"

# source name (dataset.json "source") -> function(samples, split_number) -> Series of parts
SPLIT_SCHEMES: dict[str, Callable[[pd.DataFrame, int], pd.Series]] = {}


def rotating_batch_split(
    samples: pd.DataFrame,
    split_number: int = 1,
    *,
    test_fraction: float = 1 / 3,
    val_fraction: float = 0.0,
    batch_col: str = "batch",
) -> pd.Series:
    """Generic fold ``split_number`` (1-based): a window of sorted batches is test, the next val."""
    if batch_col not in samples.columns:
        raise CdclError(f"samples: column `{batch_col}` missing; a held-out-batch split needs it")
    batches = sorted(samples[batch_col].astype(str).unique())
    n = len(batches)
    if n < 2:
        raise CdclError(
            f"samples: only {n} batch in `{batch_col}`; held-out-batch evaluation needs at least 2"
        )
    n_test = max(1, int(round(n * test_fraction)))
    n_val = int(round(n * val_fraction))
    if n_test + n_val >= n:
        n_val = max(0, n - n_test - 1)
    n_folds = max(1, n // n_test)
    if not 1 <= split_number <= n_folds:
        raise CdclError(f"--split {split_number}: this dataset has folds 1..{n_folds}")
    start = (split_number - 1) * n_test
    order = batches[start:] + batches[:start]
    part = {b: "test" for b in order[:n_test]}
    part.update({b: "val" for b in order[n_test : n_test + n_val]})
    part.update({b: "train" for b in order[n_test + n_val :]})
    return samples[batch_col].astype(str).map(part).rename("split")


def assign_split(
    samples: pd.DataFrame, source: str = "", split_number: int | None = None
) -> pd.Series:
    """The split of every row: the stored ``split`` column unless a fold number is asked for."""
    if split_number is None and "split" in samples.columns and samples["split"].notna().all():
        split = samples["split"].astype(str)
        bad = sorted(set(split) - set(PARTS) - {UNUSED})
        if bad:
            raise CdclError(
                f"samples.parquet: column `split` has values {bad}; use train, val or test"
            )
        return split.rename("split")
    number = 1 if split_number is None else int(split_number)
    if source in SPLIT_SCHEMES:
        return SPLIT_SCHEMES[source](samples, number).rename("split")
    return rotating_batch_split(samples, number)


def _half_of_treatments(samples: pd.DataFrame, seed: int) -> set[str]:
    treatments = sorted(samples.loc[~samples["is_control"], "treatment"].astype(str).unique())
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(len(treatments))[: len(treatments) // 2]
    return {treatments[i] for i in chosen}


def _subset_mask(samples: pd.DataFrame, strategy: str, seed: int) -> np.ndarray:
    ctrl = samples["is_control"].to_numpy(bool)
    if strategy == "only_controls":
        return ctrl
    if strategy == "only_treatments":
        return ~ctrl
    if strategy == "half_treatments":
        keep = _half_of_treatments(samples, seed)
        return samples["treatment"].astype(str).isin(keep).to_numpy()
    if strategy == "half_treatments_with_controls":
        keep = _half_of_treatments(samples, seed)
        return samples["treatment"].astype(str).isin(keep).to_numpy() | ctrl
    if strategy == "only_treatments_half_as_many_with_controls":
        # Treatments only, plus controls amounting to half as many images as the treatments.
        rng = np.random.default_rng(seed)
        ctrl_idx = np.flatnonzero(ctrl)
        n_keep = min(len(ctrl_idx), int((~ctrl).sum()) // 2)
        mask = ~ctrl
        mask[rng.choice(ctrl_idx, size=n_keep, replace=False)] = True
        return mask
    raise CdclError(
        f"--subset {strategy}: unknown strategy; choose one of {', '.join(SUBSET_STRATEGIES)}"
    )


SUBSET_STRATEGIES = (
    "only_controls",
    "only_treatments",
    "only_treatments_half_as_many_with_controls",
    "half_treatments",
    "half_treatments_with_controls",
)


def apply_subset(
    samples: pd.DataFrame, split: pd.Series, strategy: str | None, seed: int = 0
) -> pd.Series:
    """Restrict the training part to a subset strategy; dropped training rows become ``unused``."""
    if not strategy:
        return split
    train = (split == "train").to_numpy()
    keep = _subset_mask(samples.loc[train].reset_index(drop=True), strategy, seed)
    out = split.copy()
    train_rows = np.flatnonzero(train)
    out.iloc[train_rows[~keep]] = UNUSED
    if not keep.any():
        raise CdclError(f"--subset {strategy}: leaves no training images in this split")
    return out
