"""Negative and positive controls of the metrics (cdcl.evaluation.calibration, --calibrate)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cli_process import cdcl
from conftest import profile_design

from cdcl.evaluation.calibration import (
    NO_POWER,
    calibrate,
    inject_monotone,
    median_treatment_effect,
    permute_within_treatment,
)

MOVING = (
    "kBET acceptance",
    "iLISI",
    "iLISI per treatment",
    "graph connectivity",
    "batch silhouette per treatment (scib)",
    "batch silhouette, all rows (scib)",
)


def simulated_design(
    wells: int = 3, n_batches: int = 4, n_treat: int = 6, seed: int = 0
) -> tuple[np.ndarray, pd.DataFrame]:
    """A screen's profiles without batch effect: batches x 2 plates x (treatments + DMSO)."""
    rng = np.random.default_rng(seed)
    d = 16
    centres = {f"c{t}": 3.0 * rng.normal(size=d) / np.sqrt(d) * 2 for t in range(n_treat)}
    centres["DMSO"] = np.zeros(d)
    moa = {f"c{t}": f"m{t % 3}" for t in range(n_treat)}
    meta = profile_design(
        n_batches, {name: moa.get(name) for name in centres}, wells=wells, control_wells=2 * wells
    )
    xs = [centres[name] + rng.normal(size=d) for name in meta["treatment"]]
    return np.asarray(xs, dtype=np.float32), meta


@pytest.fixture(scope="module")
def calibrated() -> dict:
    x, meta = simulated_design()
    return calibrate(x, meta, seed=0, null_draws=2, null_size=200)


def test_null_keeps_design_and_removes_batch_signal() -> None:
    x, meta = simulated_design()
    x = x + 5.0 * (meta["batch"] == "B1").to_numpy()[:, None]  # a batch effect
    null = permute_within_treatment(x, meta["treatment"].to_numpy(), seed=1)
    # Same rows per treatment (as sets), shuffled over batches.
    for rows in meta.groupby("treatment").groups.values():
        a = np.sort(x[rows], axis=0)
        np.testing.assert_array_equal(a, np.sort(null[rows], axis=0))
    b1 = (meta["batch"] == "B1").to_numpy()
    assert abs(null[b1].mean() - null[~b1].mean()) < 1.5 < abs(x[b1].mean() - x[~b1].mean())
    assert median_treatment_effect(x, meta["treatment"], meta["is_control"]) > 0
    mono, powers = inject_monotone(x, meta["batch"].to_numpy(), seed=0)
    assert len(powers) == 4 and all(0.5 <= p <= 2.0 for p in powers)
    # Monotone within a batch: the order of every feature's values is kept.
    rows = (meta["batch"] == "B0").to_numpy()
    np.testing.assert_array_equal(
        np.argsort(x[rows, 0], kind="stable"), np.argsort(mono[rows, 0], kind="stable")
    )


def test_batch_metrics_move_monotonically_with_injected_strength(calibrated) -> None:
    m = calibrated["metrics"]
    for label in MOVING:
        rec = m[label]
        vals = [rec["null"]] + [rec["strength"][s] for s in ("0.25", "0.5", "1", "2", "4")]
        assert all(np.isfinite(vals)), label
        # Non-increasing from the null through the strengths (0.02: sampling wiggle).
        assert all(b <= a + 0.02 for a, b in zip(vals, vals[1:])), (label, vals)
        assert vals[-1] < vals[0] - 0.2, (label, vals)
        assert rec["power"], label
    # The batch classifier moves the other way: from chance towards 1.
    clf = m["batch classifier accuracy"]
    assert clf["strength"]["4"] > clf["null"] + 0.3
    # 24 profiles per compound, under the 3 k0 = 30 a split compound needs: per-treatment kBET
    # would read compactness (0 when split), so it is not computable here, not 0.
    rec = m["kBET per treatment"]
    assert not rec["power"] and "not computable on this design" in rec["reason"]


def test_a_metric_without_power_is_flagged() -> None:
    # 2 wells x 2 plates x 2 batches = 8 rows per treatment: scib's per-label kBET rule skips
    # every treatment under 10 rows, so only DMSO is left: not averaged, no power.
    x, meta = simulated_design(wells=2, n_batches=2)
    cal = calibrate(x, meta, seed=0, null_draws=2, strengths=(4.0,), null_size=200)
    rec = cal["metrics"]["kBET per treatment"]
    assert rec["power"] is False and rec["reason"].startswith(NO_POWER)
    assert "fewer than 3" in rec["reason"]
    assert "kBET per treatment" in cal["no_power"]
    # while the global kBET on the same design has power
    assert cal["metrics"]["kBET acceptance"]["power"]


@pytest.mark.slow
def test_cli_calibrate_writes_results_and_report(tmp_path: Path) -> None:
    x, meta = simulated_design(wells=2, n_batches=3, n_treat=4)
    table = pd.DataFrame(x, columns=[f"f{i}" for i in range(x.shape[1])])
    for c in meta.columns:
        table.insert(0, f"Metadata_{c}", meta[c].to_numpy())
    src = tmp_path / "profiles.parquet"
    table.to_parquet(src)
    out = tmp_path / "out"
    proc = cdcl(
        "evaluate",
        "--features",
        src,
        "--out",
        out,
        "--no-umap",
        "--calibrate",
        "--null-size",
        "200",
    )
    assert proc.returncode == 0, proc.stderr
    assert "calibration of features" in proc.stdout
    res = json.loads((out / "results.json").read_text())
    cal = res["feature_sets"]["features"]["calibration"]
    assert set(cal["metrics"]["kBET acceptance"]["strength"]) == {"0.25", "0.5", "1", "2", "4"}
    assert isinstance(cal["no_power"], list)
    html = (out / "report.html").read_text()
    assert "Calibration of features" in html
    for label in cal["no_power"]:
        assert NO_POWER in cal["metrics"][label]["reason"]
