"""Whether a held-out-batch split can be evaluated at all, said before anyone trains on it.

Held-out evaluation scores treatments: the classification probes need held-out treatments that
the training batches also carry, and the retrieval metrics need treated held-out profiles. A
fold whose held-out batches hold only controls (BBBC021's DMSO-only plates, for instance) trains
fine and then evaluates to nothing; :func:`heldout_problem` names that case and a fold that works.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cdcl.data.splits import assign_split
from cdcl.errors import CdclError

MAX_FOLDS_TRIED = 50


def heldout_treatments(samples: pd.DataFrame, split: pd.Series) -> tuple[set[str], set[str]]:
    """(treatments of the held-out batches, those of them also in the training batches); no controls."""
    part = split.astype(str).to_numpy()
    treated = ~samples["is_control"].to_numpy(bool)
    treat = samples["treatment"].astype(str).to_numpy()
    test = set(treat[(part == "test") & treated])
    train = set(treat[(part == "train") & treated])
    return test, test & train


# What needs two or more held-out batches: every figure that compares batches with each other.
BATCH_FIGURES = (
    "kBET, iLISI, the batch silhouette, the batch classifier, batch-aware mAP, NSCB and the "
    "per-treatment mixing"
)


def _usable_fold(
    samples: pd.DataFrame, source: str, min_batches: int = 1
) -> tuple[int, list[str]] | None:
    """The first numbered fold whose held-out batches (at least ``min_batches`` of them) carry
    a treatment known to training."""
    for number in range(1, MAX_FOLDS_TRIED + 1):
        try:
            split = assign_split(samples, source, number)
        except CdclError:  # past the last fold
            return None
        batches = set(samples.loc[split.astype(str).to_numpy() == "test", "batch"].astype(str))
        if len(batches) >= min_batches and heldout_treatments(samples, split)[1]:
            return number, sorted(batches)
    return None


def few_heldout_batches(
    samples: pd.DataFrame, split: pd.Series, source: str = "", what: str = "this split"
) -> str | None:
    """One line when ``split`` holds out a single batch (the batch figures stay empty), with a
    fold that holds out two or more; None otherwise."""
    part = split.astype(str).to_numpy()
    held_out = sorted(set(samples["batch"].astype(str).to_numpy()[part == "test"]))
    if len(held_out) != 1:
        return None  # none: said by heldout_problem; two or more: fine
    fold = _usable_fold(samples, source, min_batches=2)
    if fold is not None:
        fix = f"pass --split {fold[0]} (holds out {', '.join(fold[1])})"
    else:
        fix = (
            "no numbered fold of this screen holds out two batches; build the dataset with its "
            "own assignment putting two or more batches in `test` "
            "(`cdcl build table ... --split-col COLUMN`)"
        )
    return (
        f"{what} holds out one batch ({held_out[0]}), so {BATCH_FIGURES} cannot be computed "
        f"(they compare held-out batches with each other); {fix}"
    )


def heldout_problem(
    samples: pd.DataFrame, split: pd.Series, source: str = "", what: str = "this split"
) -> str | None:
    """One line saying why ``split`` cannot be evaluated and how to fix it; None when it can."""
    part = split.astype(str).to_numpy()
    held_out = sorted(set(samples["batch"].astype(str).to_numpy()[part == "test"]))
    if not held_out:
        problem = f"{what} holds out no batch, so there is nothing to evaluate on"
    else:
        test, known = heldout_treatments(samples, split)
        names = ", ".join(held_out[:4]) + (" ..." if len(held_out) > 4 else "")
        if not test:
            problem = (
                f"the held-out batches of {what} ({names}) carry no treatment, only controls, "
                "so the held-out treatment metrics (probes, NSC, mAP) will be empty"
            )
        elif not known:
            problem = (
                f"none of the {len(test)} treatments of the held-out batches of {what} "
                f"({names}) occurs in the training batches, so the probes have nothing to score"
            )
        else:
            return None
    fold = _usable_fold(samples, source)
    fix = (
        f"pass --split {fold[0]} (holds out {', '.join(fold[1])})"
        if fold is not None
        else "pass another --split N"
    )
    return (
        f"{problem}; {fix}, or build the dataset with its own assignment "
        "(`cdcl build table ... --split-col COLUMN`)"
    )


def split_summary(samples: pd.DataFrame, split: pd.Series) -> str:
    """Held-out batches and their treatments: ``A, B (3 treatments, 3 of them also in ...)``."""
    part = split.astype(str).to_numpy()
    held_out = sorted(set(samples["batch"].astype(str).to_numpy()[part == "test"]))
    test, known = heldout_treatments(samples, split)
    n_train = int(np.unique(samples["batch"].astype(str).to_numpy()[part == "train"]).size)
    return (
        f"{', '.join(held_out) or 'none'} ({len(test)} treatments, {len(known)} of them also in "
        f"the {n_train} training batches)"
    )
