"""Seed split schemes (RxRx1 experiment rotation, cpg0004 replicate folds) and subset strategies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fixtures_layouts import BBBC021, run_cdcl, write_rxrx1

from cdcl.data.dataset_dir import open_dataset
from cdcl.data.rxrx1 import samples_from_metadata
from cdcl.data.splits import (
    SUBSET_STRATEGIES,
    apply_subset,
    assign_split,
    cpg0004_split,
    rotating_batch_split,
    rotation_holds_out_controls_only,
    treated_and_control_only_batches,
    treatment_paired_split,
)
from cdcl.data.table import TableOptions, samples_from_table
from cdcl.errors import CdclError


def _huvec24() -> pd.DataFrame:
    """Metadata of 24 HUVEC experiments x 1 plate: 3 siRNAs + 1 positive + 1 negative, 2 sites."""
    rows = []
    layout = [("s1", 0, "treatment"), ("s2", 1, "treatment"), ("s3", 2, "treatment")]
    layout += [("p1", 1108, "positive_control"), ("EMPTY", 1138, "negative_control")]
    for e in range(1, 25):
        for w, (sirna, sid, wt) in enumerate(layout):
            for site in (1, 2):
                rows.append(
                    {
                        "site_id": "",
                        "well_id": "",
                        "cell_type": "HUVEC",
                        "dataset": "train",
                        "experiment": f"HUVEC-{e:02d}",
                        "plate": 1,
                        "well": f"B{w + 2:02d}",
                        "site": site,
                        "well_type": wt,
                        "sirna": sirna,
                        "sirna_id": sid,
                    }
                )
    s = samples_from_metadata(pd.DataFrame(rows))
    s.insert(0, "image", np.arange(len(s)))
    return s


def _exps(a: int, b: int) -> set[str]:
    return {f"HUVEC-{i:02d}" for i in range(a, b + 1)}


def test_rxrx1_seed_folds_exact() -> None:
    s = _huvec24()
    # The seed's table (MIDL 2023 code): fold -> (train, val, test) experiment numbers.
    seed = {
        1: (_exps(1, 16), _exps(17, 20), _exps(21, 24)),
        2: (_exps(5, 20), _exps(21, 24), _exps(1, 4)),
        3: (_exps(9, 24), _exps(1, 4), _exps(5, 8)),
        4: (_exps(13, 24) | _exps(1, 4), _exps(5, 8), _exps(9, 12)),
        5: (_exps(17, 24) | _exps(1, 8), _exps(9, 12), _exps(13, 16)),
        6: (_exps(21, 24) | _exps(1, 12), _exps(13, 16), _exps(17, 20)),
    }
    for k, (train, val, test) in seed.items():
        split = assign_split(s, "rxrx1", k)
        assert set(s.batch[split == "train"]) == train
        assert set(s.batch[split == "val"]) == val
        assert set(s.batch[split == "test"]) == test
    with pytest.raises(CdclError, match="folds 1..6"):
        assign_split(s, "rxrx1", 7)


def test_rxrx1_folds_on_built_fixture(tmp_path: Path) -> None:
    root = tmp_path / "rxrx1"
    write_rxrx1(root)
    out = tmp_path / "ds"
    assert (
        run_cdcl("build", "rxrx1", "--root", root, "--out", out, "--image-size", 16).returncode == 0
    )
    s = open_dataset(out).samples
    for k in range(1, 7):
        split = assign_split(s, "rxrx1", k)
        # 6 experiments -> blocks of one: test block (k-2) mod 6, val block (k-3) mod 6.
        assert set(s.batch[split == "test"]) == {f"HUVEC-{(k - 2) % 6 + 1:02d}"}
        assert set(s.batch[split == "val"]) == {f"HUVEC-{(k - 3) % 6 + 1:02d}"}
        assert not set(s.batch[split == "test"]) & set(s.batch[split == "train"])
        assert not set(s.batch[split == "val"]) & set(s.batch[split == "train"])


def test_rxrx1_too_few_experiments() -> None:
    s = _huvec24()
    s = s[s.batch.isin(_exps(1, 4))].reset_index(drop=True)
    with pytest.raises(CdclError, match="has 4 experiments"):
        assign_split(s, "rxrx1", 1)


def test_subset_strategies_exact_membership() -> None:
    s = _huvec24()
    split = assign_split(s, "rxrx1", 1)
    train = split == "train"
    tr = s[train]

    def kept(strategy: str) -> pd.DataFrame:
        out = apply_subset(s, split, strategy, seed=0)
        # Only training rows may be dropped; val/test untouched.
        assert (out[~train] == split[~train]).all()
        assert set(out[train]) <= {"train", "unused"}
        return s[out == "train"]

    ctrl = tr.well_type != "treatment"
    assert kept("only_controls").index.equals(tr[ctrl].index)
    assert kept("only_treatments").index.equals(tr[~ctrl].index)
    half = kept("only_treatments_half_as_many")
    assert half.index.equals(tr[~ctrl & (tr.site == 1)].index)  # first site of each (siRNA, plate)
    with_ctrl = kept("only_treatments_half_as_many_with_controls")
    assert with_ctrl.index.equals(tr[ctrl | (tr.site == 2)].index)  # seed drops the first one
    odd = kept("only_half_as_many_treatments_with_controls")
    assert odd.index.equals(tr[ctrl | (tr.sirna_id % 2 == 1)].index)  # s2 (id 1) survives
    assert set(odd.treatment) == {"s2", "p1", "EMPTY"}
    for strategy in SUBSET_STRATEGIES:
        assert (apply_subset(s, split, strategy, seed=3) == "train").any()
    with pytest.raises(CdclError, match="unknown strategy"):
        apply_subset(s, split, "everything", seed=0)


def test_subsets_without_well_type_use_is_control() -> None:
    s = _huvec24().drop(columns=["well_type", "sirna_id"])
    split = assign_split(s, "", 1)
    out = apply_subset(s, split, "only_controls", seed=0)
    assert set(s.treatment[out == "train"]) == {"EMPTY"}


def test_cpg0004_split_rejects_batches_straddling_folds() -> None:
    # Batch = Batch_Number but one plate map's replicates are in another batch order.
    s = pd.DataFrame(
        {
            "batch": ["1", "2", "3", "4", "5", "1", "2", "3", "4", "5"],
            "replicate": [1, 2, 3, 4, 5, 2, 3, 4, 5, 1],
        }
    )
    with pytest.raises(CdclError, match="falls in several parts"):
        cpg0004_split(s, 1)


def test_generic_rotation_never_leaks() -> None:
    s = pd.DataFrame({"batch": [f"b{i % 7}" for i in range(70)]})
    for k in (1, 2, 3):
        split = rotating_batch_split(s, k)
        parts = s.groupby(split.to_numpy())["batch"].agg(set)
        assert not parts["test"] & parts["train"]


# --------------------------------------------------------------- BBBC021 treatment-paired folds


def _bbbc021_samples() -> pd.DataFrame:
    """The real week-4 metadata mapped as the README's `cdcl build table` recipe maps it."""
    opts = TableOptions(
        batch_col="plate",
        plate_col="plate",
        well_col="well",
        site_col="site",
        treatment_col="compound",
        dose_col="concentration_uM",
        compound_col="compound",
        moa_col="moa",
        control_query='compound == "DMSO"',
    )
    meta = pd.read_csv(BBBC021 / "metadata_subset.csv")
    return samples_from_table(meta, opts, "metadata_subset.csv")


@pytest.mark.skipif(not BBBC021.exists(), reason="shared/data/bbbc021_week4_singlecell missing")
def test_bbbc021_folds_pair_each_treated_plate_with_a_dmso_only_plate() -> None:
    s = _bbbc021_samples()
    treated, dmso_only = treated_and_control_only_batches(s)
    assert treated == ["Week4_27801", "Week4_27821", "Week4_27861"]
    assert dmso_only == ["Week4_27481", "Week4_27521", "Week4_27542"]
    # The generic rotation would test fold 1 on two DMSO-only plates: the paired scheme applies.
    assert rotation_holds_out_controls_only(s)
    held_out_treated: list[str] = []
    for k in (1, 2, 3):
        split = assign_split(s, "table", k)  # what `--split k` does on a `cdcl build table` set
        assert set(split) == {"train", "test"}
        test_plates = set(s.loc[split == "test", "batch"])
        train_plates = set(s.loc[split == "train", "batch"])
        assert not test_plates & train_plates
        assert test_plates | train_plates == set(treated) | set(dmso_only)
        assert len(test_plates & set(treated)) == 1 and len(test_plates & set(dmso_only)) == 1
        held_out_treated += sorted(test_plates & set(treated))
        # Every treatment held out was seen on a training plate.
        test_treat = set(s.loc[(split == "test") & ~s.is_control, "treatment"])
        train_treat = set(s.loc[(split == "train") & ~s.is_control, "treatment"])
        assert test_treat and test_treat <= train_treat
    assert sorted(held_out_treated) == treated  # each treated plate held out exactly once
    with pytest.raises(CdclError, match="folds 1..3"):
        assign_split(s, "table", 4)


def test_paired_scheme_only_where_the_rotation_fails() -> None:
    # Every batch carries a treatment: the generic rotation stays.
    s = pd.DataFrame(
        {"batch": [f"b{i % 6}" for i in range(24)], "is_control": [i % 4 == 0 for i in range(24)]}
    )
    assert not rotation_holds_out_controls_only(s)
    assert assign_split(s, "table", 2).equals(rotating_batch_split(s, 2))
    # Control-only batches that never form a whole rotation test set: rotation stays too.
    s2 = s.assign(is_control=s["is_control"] | (s["batch"] == "b0"))
    assert not rotation_holds_out_controls_only(s2)
    with pytest.raises(CdclError, match="only 1 batch carries treatments"):
        treatment_paired_split(s.assign(is_control=s["batch"] != "b0"), 1)
    with pytest.raises(CdclError, match="no batch holds controls only"):
        treatment_paired_split(s, 1)


@pytest.mark.skipif(not BBBC021.exists(), reason="shared/data/bbbc021_week4_singlecell missing")
def test_demo_bbbc021_plates_default_and_folds() -> None:
    from cdcl.experiments.demo import BBBC021_TEST_PLATES, bbbc021_test_plates

    meta = pd.read_csv(BBBC021 / "metadata_subset.csv")
    assert bbbc021_test_plates(meta, None) == set(BBBC021_TEST_PLATES)
    s = _bbbc021_samples()
    for k in (1, 2, 3):
        expect = set(s.loc[assign_split(s, "table", k) == "test", "batch"])
        assert bbbc021_test_plates(meta, k) == expect
