"""The LINCS fields end to end: a report on 4 held-out wells says what it scored and what it can't.

Built as docs/datasets.md builds them, trained for one epoch of a tiny network, evaluated
through the command line: results.json and the report state the rows and the held-out plate,
NSC/NSCB are not computable (one compound per MoA) and stay out of the aggregate, the run is
flagged as equal to the random network, and calibration runs (explicitly, and by default on
so small a design). Then paired by plate and judged by acquisition batch: the exported
profiles keep every ``Metadata_*`` column of fields_metadata.csv and
``evaluate --features --batch-col Metadata_Batch`` scores mixing across batch1 and batch3.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from cli_process import TINY_MODEL, cdcl
from test_real_screens import LINCS, doc_blocks, needs_lincs

from cdcl.parquet import read_parquet

TINY = [*TINY_MODEL, "train.batch_size=8", "train.epochs=1"]


def build(tmp: Path, name: str, *extra: str) -> Path:
    """docs/datasets.md's LINCS fields build (its first command), into ``tmp/name``."""
    fields, _ = doc_blocks("lincs_a549_cellpainting")[:2]
    args = list(fields[0])
    args[args.index("--out") + 1] = str(tmp / name)
    proc = cdcl(*args, *extra)
    assert proc.returncode == 0, proc.stderr
    return tmp / name


def ok(*args: object) -> str:
    """Run cdcl; its stdout + stderr (the test fails with stderr when it fails)."""
    proc = cdcl(*args)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


@pytest.mark.slow
@needs_lincs
def test_lincs_report_states_design_and_its_limits(tmp_path: Path) -> None:
    data = build(tmp_path, "lincs_fields")
    run = tmp_path / "run"
    ok("train", "--preset", "generic-cdcl", "--data", data, "--out", run, *TINY)
    out = ok("evaluate", run, "--calibrate", "--no-umap")
    results = json.loads((run / "results.json").read_text())
    design = results["design"]
    assert design["held_out_plates"] == ["SQ00015198"] and design["evaluated_profiles"] == 4
    knn = design["metrics"]["classification.knn.accuracy"]
    assert knn["queries"] == 2 and knn["step"] == 0.5
    cdcl_set = results["feature_sets"]["cdcl"]
    assert (
        "not computable, because no MoA has a second compound"
        in (cdcl_set["unavailable"]["raw.moa_matching"])
    )
    for variant in ("raw", "plate_normalized"):
        agg = cdcl_set[variant]["aggregate"]
        assert cdcl_set[variant]["moa_matching"] is None
        assert not {"nsc", "nscb"} & set(agg["bio"]) and {"nsc", "nscb"} <= set(agg["dropped"])
    assert cdcl_set["calibration"]["design"]["n_profiles"] == 4
    assert any("the random network" in w for w in results["warnings"])
    assert "calibration of cdcl" in out and "warning: cdcl (raw profiles)" in out
    assert "held out: batches batch1, plates SQ00015198" in out
    report = (run / "report.html").read_text()
    assert "4 well profiles scored" in report and "SQ00015198" in report.split("Provenance")[0]
    assert "NSC/NSCB: not computable, because" in report and "the random network" in report
    assert "Calibration of cdcl" in report
    # Small design: calibrated without asking, unless told not to.
    default = ok("evaluate", run, "--no-umap", "--out", tmp_path / "default")
    assert "calibrating the metrics on it by default" in default
    assert json.loads((tmp_path / "default" / "results.json").read_text())["feature_sets"][
        "cdcl"
    ].get("calibration")
    ok("evaluate", run, "--no-umap", "--no-calibrate", "--out", tmp_path / "off")
    off = json.loads((tmp_path / "off" / "results.json").read_text())
    assert "calibration" not in off["feature_sets"]["cdcl"]


@pytest.mark.slow
@needs_lincs
def test_lincs_pair_by_plate_judge_by_acquisition_batch(tmp_path: Path) -> None:
    data = build(tmp_path, "by_plate", "--batch-col", "Metadata_Plate")
    run = tmp_path / "run"
    ok("train", "--preset", "generic-cdcl", "--data", data, "--out", run, *TINY)
    profiles = tmp_path / "profiles.parquet"
    ok("embed", run, "--out", profiles)
    table = read_parquet(profiles)
    inputs = [c for c in pd.read_csv(LINCS / "fields_metadata.csv").columns if c != "Metadata_Site"]
    assert set(inputs) <= set(table.columns)  # the site varies within a well: image level only
    assert set(table["Metadata_Batch"]) == {"batch1", "batch3"}
    assert table["Metadata_Pairing_Batch"].nunique() == 3  # the plates the run paired across
    judged = tmp_path / "judged"
    ok(
        "evaluate", "--features", profiles, "--batch-col", "Metadata_Batch", "--eval-on", "all",
        "--out", judged, "--no-umap",
    )  # fmt: skip
    results = json.loads((judged / "results.json").read_text())
    assert results["design"]["evaluated_batches"] == ["batch1", "batch3"]
    assert results["feature_sets"]["features"]["raw"]["kbet"]["acceptance_rate"] is not None
