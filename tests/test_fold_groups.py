"""Leave-one-group-out folds from a `fold_group` column (plates, replicates, ...)."""

from __future__ import annotations

import pandas as pd
import pytest

from cdcl.data.splits import FOLD_GROUP, assign_split, leave_one_group_out
from cdcl.errors import CdclError


def _samples(groups: list[str], batches: list[str] | None = None) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "batch": batches or [f"P{g}" for g in groups],
            "treatment": ["t"] * len(groups),
            "is_control": [False] * len(groups),
            FOLD_GROUP: groups,
        }
    )


def test_each_fold_holds_out_one_group_and_every_group_once() -> None:
    s = _samples(["r2", "r1", "r3", "r1", "r2", "r3"])
    held = []
    for k in (1, 2, 3):
        split = assign_split(s, "table", k)
        test = set(s.loc[split == "test", FOLD_GROUP])
        assert len(test) == 1 and set(split) == {"train", "test"}
        held.append(test.pop())
    assert held == ["r1", "r2", "r3"]  # sorted values, one per fold
    # without a fold number: fold 1, unless a stored split column says otherwise
    assert (assign_split(s, "table", None) == assign_split(s, "table", 1)).all()
    stored = s.assign(split=["train", "test"] * 3)
    assert (assign_split(stored, "table", None) == stored["split"]).all()


def test_out_of_range_fold_and_straddling_batch_are_refused() -> None:
    s = _samples(["a", "b", "a", "b"])
    with pytest.raises(CdclError, match=r"folds 1\.\.2 \(one per value"):
        leave_one_group_out(s, 3)
    straddle = _samples(["a", "b", "a", "b"], batches=["B1", "B1", "B2", "B2"])
    with pytest.raises(CdclError, match="batch B1 falls in several parts"):
        leave_one_group_out(straddle, 1)
    with pytest.raises(CdclError, match="has one value"):
        leave_one_group_out(_samples(["a", "a"]), 1)
