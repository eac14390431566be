"""Pair by one column, judge by another: every input ``Metadata_*`` column reaches the profiles.

A screen paired by plate keeps its acquisition batch (``Metadata_Batch``), its dose and any
other column of the input table in the exported profiles (per well only where the well's
images agree), and ``cdcl evaluate --batch-col`` judges mixing by any of them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cdcl.data.dataset_dir import DatasetInfo, DatasetWriter
from cdcl.embed.to_file import embed_to_file
from cdcl.errors import CdclError
from cdcl.evaluation.table_file import evaluate_table
from cdcl.parquet import read_parquet
from cdcl.profiles.columns import ColumnSpec, judged_by
from cdcl.profiles.table import (
    PAIRING_BATCH,
    WellAccumulator,
    image_meta,
    to_metadata_frame,
)

PLATES = {"P1": "batch1", "P2": "batch1", "P3": "batch2", "P4": "batch2"}  # plate -> acquisition


def paired_by_plate(out: Path) -> Path:
    """4 plates (the batch CDCL pairs across) in 2 acquisition batches; 2 sites per well."""
    rows = []
    for plate, acq in PLATES.items():
        for w, t in enumerate(["DMSO", "DMSO", "t0", "t1", "t2", "t3"]):
            for site in (1, 2):
                rows.append(
                    {
                        "batch": plate,
                        "plate": plate,
                        "well": f"A{w:02d}",
                        "site": site,
                        "treatment": t,
                        "compound": t,
                        "moa": {"t0": "m0", "t1": "m0"}.get(t, "m1"),
                        "is_control": t == "DMSO",
                        "Metadata_Plate": plate,
                        "Metadata_Batch": acq,
                        "Metadata_BatchDate": f"2016-0{1 + list(PLATES).index(plate) // 2}-01",
                        "Metadata_Concentration_uM": 0.0 if t == "DMSO" else 10.0,
                        "Metadata_control_type": "negcon" if t == "DMSO" else None,
                        "Metadata_Site": site,
                    }
                )
    samples = pd.DataFrame(rows)
    samples.insert(0, "image", np.arange(len(samples)))
    info = DatasetInfo("paired", "test", ["DNA", "ER", "RNA"], "uint8", [16, 16], len(samples))
    w = DatasetWriter(out, info)
    rng = np.random.default_rng(0)
    shift = samples["treatment"].map({"DMSO": 0, "t0": 40, "t1": 60, "t2": 120, "t3": 140})
    acq = samples["Metadata_Batch"].map({"batch1": 0, "batch2": 30}).to_numpy()
    images = (
        rng.integers(0, 60, size=(len(samples), 3, 16, 16))
        + (shift.to_numpy() + acq)[:, None, None, None]
    )
    w.write(np.arange(len(samples)), images.astype(np.uint8))
    return w.commit(samples)


def test_image_and_well_metadata_carry_the_inputs_columns(tmp_path: Path) -> None:
    from cdcl.data.dataset_dir import open_dataset

    samples = open_dataset(paired_by_plate(tmp_path / "ds")).samples
    meta = image_meta(samples)
    own = [c for c in samples.columns if c.startswith("Metadata_")]
    assert set(own) <= set(meta.columns)
    acc = WellAccumulator(meta)
    acc.add(0, np.zeros((len(meta), 2), np.float32))
    _, wmeta = acc.result()
    # Per well: constant columns kept, the site (two per well) dropped.
    assert "Metadata_Site" not in wmeta and "Metadata_Batch" in wmeta
    assert "Metadata_Concentration_uM" in wmeta and "Metadata_control_type" in wmeta
    exported = to_metadata_frame(wmeta)
    # The input's Metadata_Batch keeps its name and values; the pairing batch gets its own.
    assert set(exported["Metadata_Batch"]) == {"batch1", "batch2"}
    assert set(exported[PAIRING_BATCH]) == set(PLATES)
    # Plate is the same column twice (known and own): kept once.
    assert list(exported.columns).count("Metadata_Plate") == 1


def test_default_batch_is_the_pairing_batch_and_batch_col_judges_by_another() -> None:
    table = pd.DataFrame(
        {
            "Metadata_Plate": ["P1", "P3"],
            PAIRING_BATCH: ["P1", "P3"],
            "Metadata_Batch": ["batch1", "batch2"],
            "Metadata_Compound": ["DMSO", "t0"],
        }
    )
    assert list(ColumnSpec().resolve(table)["batch"]) == ["P1", "P3"]
    judged = ColumnSpec(batch_col="Metadata_Batch").resolve(table)
    assert list(judged["batch"]) == ["batch1", "batch2"]
    meta = pd.DataFrame({"batch": ["P1"], "Metadata_Batch": ["batch1"]})
    out = judged_by(meta, "batch")  # matched with or without Metadata_, ignoring case
    assert out["batch"].tolist() == ["batch1"] and out["pairing_batch"].tolist() == ["P1"]
    with pytest.raises(CdclError, match="no such column among the profiles' metadata"):
        judged_by(meta, "Metadata_BatchDate")


def test_exported_profiles_keep_every_column_and_mixing_is_judged_by_acquisition(
    tmp_path: Path,
) -> None:
    data = paired_by_plate(tmp_path / "ds")
    wells = embed_to_file("intensity", tmp_path / "wells.parquet", data=data, quiet=True)
    images = embed_to_file(
        "intensity", tmp_path / "images.parquet", data=data, level="image", quiet=True
    )
    w, i = read_parquet(wells), read_parquet(images)
    inputs = {
        "Metadata_Plate",
        "Metadata_Batch",
        "Metadata_BatchDate",
        "Metadata_Concentration_uM",
        "Metadata_control_type",
    }
    assert inputs <= set(w.columns) and (inputs | {"Metadata_Site"}) <= set(i.columns)
    assert set(w["Metadata_Batch"]) == {"batch1", "batch2"} and set(w[PAIRING_BATCH]) == set(PLATES)
    out = evaluate_table(
        wells,
        tmp_path / "judged",
        columns=ColumnSpec(batch_col="Metadata_Batch"),
        eval_on="all",
        umap=False,
        calibrate=False,
    )
    import json

    results = json.loads(out.read_text())
    assert results["design"]["evaluated_batches"] == ["batch1", "batch2"]
    assert results["design"]["judged_by"] == "Metadata_Batch"
    kbet = results["feature_sets"]["features"]["raw"]["kbet"]
    assert kbet is not None and kbet["acceptance_rate"] is not None
    by_plate = json.loads(
        evaluate_table(wells, tmp_path / "plates", eval_on="all", umap=False).read_text()
    )
    assert by_plate["design"]["evaluated_batches"] == sorted(PLATES)
