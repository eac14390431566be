"""Held-out-batch splits and training-subset strategies, defined on metadata alone.

A split assigns every image one of ``train``, ``val``, ``test`` (or ``unused`` once a subset
strategy drops it). Batches never straddle two parts, so evaluation always runs on batches the
model has not seen. Adapters may register a scheme for their source (e.g. the reference implementation's RxRx1
experiment rotation); otherwise batches rotate through the parts generically, unless some
batches hold controls only and the rotation would hold out nothing but such batches (BBBC021's
week 4: three DMSO-only plates): then each fold pairs one treatment-carrying batch with one
control-only batch (``treatment_paired_split``).
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
    n_test = held_out_count(n, test_fraction)
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


# A column of samples.parquet written by `cdcl build table --fold-col COL`: fold k holds out
# the k-th of its sorted values (leave-one-plate-out, leave-one-replicate-out, ...).
FOLD_GROUP = "fold_group"


def leave_one_group_out(samples: pd.DataFrame, split_number: int = 1) -> pd.Series:
    """Fold k (1-based) tests on the rows of the k-th sorted ``fold_group`` value, trains on the rest."""
    group = samples[FOLD_GROUP].astype(str)
    groups = sorted(group.unique())
    if len(groups) < 2:
        raise CdclError(
            f"samples: column `{FOLD_GROUP}` has one value ({groups[0]}); leave-one-out folds "
            "need at least 2 (rebuild with another --fold-col)"
        )
    k = int(split_number)
    if not 1 <= k <= len(groups):
        raise CdclError(
            f"--split {split_number}: this dataset has folds 1..{len(groups)} (one per value of "
            "its fold column)"
        )
    split = pd.Series(
        np.where(group == groups[k - 1], "test", "train"), index=samples.index, name="split"
    )
    if "batch" in samples.columns:
        _check_no_straddle(samples, split, f"leave-one-{FOLD_GROUP}-out")
    return split


def held_out_count(n_batches: int, test_fraction: float = 1 / 3) -> int:
    """Batches each fold of the rotation holds out: a third, and at least two from four batches.

    Two held-out batches are the least that the batch figures (kBET, iLISI, batch silhouette,
    batch classifier, batch-aware mAP) need; with four batches a third would be one.
    """
    n_test = max(1, int(round(n_batches * test_fraction)))
    if n_batches >= 4:
        n_test = max(n_test, 2)
    return n_test


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
    if FOLD_GROUP in samples.columns and samples[FOLD_GROUP].notna().all():
        return leave_one_group_out(samples, number)
    if source in SPLIT_SCHEMES:
        return SPLIT_SCHEMES[source](samples, number).rename("split")
    if rotation_holds_out_controls_only(samples):
        return treatment_paired_split(samples, number)
    return rotating_batch_split(samples, number)


def treated_and_control_only_batches(
    samples: pd.DataFrame, batch_col: str = "batch"
) -> tuple[list[str], list[str]]:
    """(batches with at least one non-control image, batches of controls only), each sorted."""
    for col in (batch_col, "is_control"):
        if col not in samples.columns:
            raise CdclError(f"samples: column `{col}` missing; a treatment-paired split needs it")
    treated = ~samples["is_control"].to_numpy(bool)
    per_batch = pd.Series(treated).groupby(samples[batch_col].astype(str).to_numpy()).any()
    return sorted(per_batch.index[per_batch]), sorted(per_batch.index[~per_batch])


def rotation_holds_out_controls_only(samples: pd.DataFrame) -> bool:
    """Whether some fold of the generic rotation would test on control-only batches alone.

    Only then is the treatment-paired scheme used, and only when it can pair (at least one
    control-only batch and two treatment-carrying ones, so training keeps a treated batch).
    """
    if "batch" not in samples.columns or "is_control" not in samples.columns:
        return False
    treated, ctrl_only = treated_and_control_only_batches(samples)
    if not ctrl_only or len(treated) < 2:
        return False
    batches = sorted(samples["batch"].astype(str).unique())
    n_test = held_out_count(len(batches))
    n_folds = max(1, len(batches) // n_test)
    ctrl = set(ctrl_only)
    for k in range(n_folds):
        start = k * n_test
        test = (batches[start:] + batches[:start])[:n_test]
        if set(test) <= ctrl:
            return True
    return False


def treatment_paired_split(
    samples: pd.DataFrame, split_number: int = 1, batch_col: str = "batch"
) -> pd.Series:
    """Fold k (1-based) tests on the k-th treatment-carrying batch plus a control-only batch.

    Treatment-carrying batches T and control-only batches D are each sorted by name; fold k holds
    out T[k−1] and D[(k−1) mod |D|] and trains on the rest, so every treatment-carrying batch is
    held out exactly once (|T| folds) and every held-out set has controls on two batches. On
    BBBC021 week 4: fold 1 = 27801 + 27481, fold 2 = 27821 + 27521, fold 3 = 27861 + 27542.
    """
    treated, ctrl_only = treated_and_control_only_batches(samples, batch_col)
    if not ctrl_only:
        raise CdclError(
            "treatment-paired split: no batch holds controls only; use the generic rotation"
        )
    if len(treated) < 2:
        raise CdclError(
            f"treatment-paired split: only {len(treated)} batch carries treatments; holding it "
            "out leaves none to train on"
        )
    k = int(split_number)
    if not 1 <= k <= len(treated):
        raise CdclError(f"--split {split_number}: this dataset has folds 1..{len(treated)}")
    test = {treated[k - 1], ctrl_only[(k - 1) % len(ctrl_only)]}
    batch = samples[batch_col].astype(str)
    return pd.Series(np.where(batch.isin(test), "test", "train"), index=samples.index, name="split")


def half_of_treatments(samples: pd.DataFrame, seed: int) -> set[str]:
    """The treatments ``half_treatments[_with_controls]`` keeps: a seeded half of the sorted names."""
    treatments = sorted(samples.loc[~samples["is_control"], "treatment"].astype(str).unique())
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(len(treatments))[: len(treatments) // 2]
    return {treatments[i] for i in chosen}


def _control_like(samples: pd.DataFrame) -> np.ndarray:
    """Control wells as the reference implementation counts them: negative and positive controls (RxRx1 ids >= 1108).

    Datasets with a ``well_type`` column (RxRx1) use it; others use ``is_control``.
    """
    if "well_type" in samples.columns:
        return (samples["well_type"].astype(str) != "treatment").to_numpy()
    return samples["is_control"].to_numpy(bool)


def _first_per_treatment_plate(samples: pd.DataFrame, treated: np.ndarray) -> np.ndarray:
    """True on the first image (by well, site) of every (treatment, plate) among treated rows.

    The reference implementation's ``drop_duplicates(["label", "plate"])``: with one well per siRNA and plate and
    two sites per well (RxRx1) this is one of the two sites, i.e. half of the images.
    """
    order_cols = [
        c for c in ("plate", "treatment", "well", "site", "image") if c in samples.columns
    ]
    sub = samples.loc[treated, order_cols].sort_values(order_cols, kind="stable")
    first = ~sub.duplicated(["treatment", "plate"], keep="first")
    out = np.zeros(len(samples), dtype=bool)
    out[samples.index.get_indexer(sub.index[first.to_numpy()])] = True
    return out


def _treatment_ids(samples: pd.DataFrame) -> np.ndarray:
    """Integer id per row: RxRx1's ``sirna_id`` when present, else the rank of the sorted name."""
    if "sirna_id" in samples.columns and samples["sirna_id"].notna().all():
        return samples["sirna_id"].to_numpy(np.int64)
    names = sorted(samples["treatment"].astype(str).unique())
    rank = {t: i for i, t in enumerate(names)}
    return samples["treatment"].astype(str).map(rank).to_numpy(np.int64)


def _subset_mask(samples: pd.DataFrame, strategy: str, seed: int) -> np.ndarray:
    ctrl = _control_like(samples)
    if strategy == "only_controls":
        return ctrl
    if strategy == "only_treatments":
        return ~ctrl
    if strategy == "only_treatments_half_as_many":
        # Treatments only, one image per (treatment, plate).
        return _first_per_treatment_plate(samples, ~ctrl)
    if strategy == "only_treatments_half_as_many_with_controls":
        # All controls, plus the treatment images left after dropping the first image of every
        # (treatment, plate): the reference implementation's strategy (half the treatment images, every control).
        return ctrl | (~ctrl & ~_first_per_treatment_plate(samples, ~ctrl))
    if strategy == "only_half_as_many_treatments_with_controls":
        # The reference implementation drops the treatments with an even label id and keeps every control.
        return ctrl | (_treatment_ids(samples) % 2 == 1)
    if strategy == "half_treatments":
        keep = half_of_treatments(samples, seed)
        return samples["treatment"].astype(str).isin(keep).to_numpy()
    if strategy == "half_treatments_with_controls":
        keep = half_of_treatments(samples, seed)
        return samples["treatment"].astype(str).isin(keep).to_numpy() | samples[
            "is_control"
        ].to_numpy(bool)
    raise CdclError(
        f"--subset {strategy}: unknown strategy; choose one of {', '.join(SUBSET_STRATEGIES)}"
    )


SUBSET_STRATEGIES = (
    "only_controls",
    "only_treatments",
    "only_treatments_half_as_many_with_controls",
    "only_treatments_half_as_many",
    "only_half_as_many_treatments_with_controls",
    "half_treatments",
    "half_treatments_with_controls",
)


# --------------------------------------------------------------------------- seed split schemes

RXRX1_FOLDS = 6
CPG0004_FOLDS = 5


def _check_no_straddle(samples: pd.DataFrame, split: pd.Series, scheme: str) -> None:
    """A batch must sit in one part only, or evaluation would see training batches."""
    parts = pd.DataFrame(
        {"batch": samples["batch"].astype(str).to_numpy(), "split": split.to_numpy()}
    )
    n = parts.groupby("batch")["split"].nunique()
    if (n > 1).any():
        b = n.index[n > 1][0]
        raise CdclError(
            f"{scheme} split: batch {b} falls in several parts ({', '.join(sorted(parts.loc[parts.batch == b, 'split'].unique()))}); "
            "rebuild with a batch definition that nests in the folds (e.g. --batch-column plate)"
        )


def rxrx1_split(samples: pd.DataFrame, split_number: int = 1) -> pd.Series:
    """The reference implementation's 6 rotating experiment folds (MIDL 2023 code, RxRx1_HUVEC.get_dataframe).

    Per cell type, the sorted experiments (HUVEC-01..HUVEC-24) form 6 consecutive blocks of 4;
    fold k tests on block (k - 2) mod 6, validates on block (k - 3) mod 6 and trains on the other
    16 experiments: fold 1 = train 01-16, val 17-20, test 21-24; fold 2 = train 05-20, val 21-24,
    test 01-04; and so on. With other experiment counts the blocks are as equal as possible.
    """
    if not 1 <= int(split_number) <= RXRX1_FOLDS:
        raise CdclError(f"--split {split_number}: RxRx1 has folds 1..{RXRX1_FOLDS}")
    k = int(split_number)
    batch = samples["batch"].astype(str)
    if "cell_type" in samples.columns and samples["cell_type"].notna().all():
        cell = samples["cell_type"].astype(str)
    else:
        cell = batch.str.split("-").str[0]
    part: dict[str, str] = {}
    for ct in sorted(cell.unique()):
        exps = sorted(batch[cell == ct].unique())
        if len(exps) < RXRX1_FOLDS:
            raise CdclError(
                f"RxRx1 split: cell type {ct} has {len(exps)} experiments; the 6 rotating folds need at least 6"
            )
        blocks = np.array_split(np.array(exps, dtype=object), RXRX1_FOLDS)
        test, val = (k - 2) % RXRX1_FOLDS, (k - 3) % RXRX1_FOLDS
        for j, blk in enumerate(blocks):
            for e in blk:
                part[str(e)] = "test" if j == test else "val" if j == val else "train"
    out = batch.map(part).rename("split")
    _check_no_straddle(samples, out, "RxRx1")
    return out


def cpg0004_split(samples: pd.DataFrame, split_number: int = 1) -> pd.Series:
    """The reference implementation's 5 replicate-plate folds (MIDL 2023 code, CPG0004_full_img_large).

    ``replicate`` numbers the plates of each plate map 1..5 (the adapter orders them by
    Batch_Number, then barcode). Fold k tests on replicate (k + 3) mod 5 + 1, validates on the one
    before and trains on the other three: fold 1 = train 1-3, val 4, test 5; fold 2 = train 2-4,
    val 5, test 1; fold 3 = train 3-5, val 1, test 2; fold 4 = train 1,4,5, val 2, test 3;
    fold 5 = train 1,2,5, val 3, test 4. Replicates beyond 5 wrap around.
    """
    if not 1 <= int(split_number) <= CPG0004_FOLDS:
        raise CdclError(f"--split {split_number}: cpg0004 has folds 1..{CPG0004_FOLDS}")
    if "replicate" not in samples.columns:
        raise CdclError(
            "samples.parquet: column `replicate` missing; rebuild with `cdcl build cpg0004`"
        )
    k = int(split_number)
    rep = (pd.to_numeric(samples["replicate"]).astype(np.int64) - 1) % CPG0004_FOLDS + 1
    test = (k + 3) % CPG0004_FOLDS + 1
    val = (k + 2) % CPG0004_FOLDS + 1
    out = pd.Series(
        np.where(rep == test, "test", np.where(rep == val, "val", "train")),
        index=samples.index,
        name="split",
    )
    _check_no_straddle(samples, out, "cpg0004")
    return out


SPLIT_SCHEMES["rxrx1"] = rxrx1_split
SPLIT_SCHEMES["cpg0004"] = cpg0004_split


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
