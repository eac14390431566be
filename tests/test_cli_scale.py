"""`cdcl evaluate` at screen scale: plots on a stated sample, streamed Parquet, progress lines."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cli_process import cdcl as _cdcl

from cdcl import progress
from cdcl.errors import CdclError
from cdcl.evaluation.table_file import memory_plan, time_plan
from cdcl.profiles.table import read_parquet_profiles, read_profile_table, split_table
from cdcl.report.plot_sample import stratified_plot_rows


def _meta(seed: int = 0) -> pd.DataFrame:
    """Uneven strata: 3 batches of different sizes x 5 treatments of different frequencies."""
    rng = np.random.default_rng(seed)
    batch = rng.choice(["b0", "b1", "b2"], size=3000, p=[0.6, 0.3, 0.1])
    treat = rng.choice(list("ABCDE"), size=3000, p=[0.4, 0.3, 0.15, 0.1, 0.05])
    return pd.DataFrame({"batch": batch, "treatment": treat})


def test_plot_sample_is_stratified_exact_and_seeded() -> None:
    meta = _meta()
    rows = stratified_plot_rows(meta, 500, seed=3)
    assert rows.size == 500 and np.unique(rows).size == 500
    full = meta.groupby(["batch", "treatment"]).size()
    got = meta.iloc[rows].groupby(["batch", "treatment"]).size().reindex(full.index, fill_value=0)
    share = full * 500 / len(meta)
    # Largest-remainder allocation: every stratum gets floor or ceil of its share.
    assert ((got >= np.floor(share)) & (got <= np.ceil(share))).all()
    assert np.array_equal(rows, stratified_plot_rows(meta, 500, seed=3))
    assert not np.array_equal(rows, stratified_plot_rows(meta, 500, seed=4))
    assert np.array_equal(stratified_plot_rows(meta, 5000, seed=3), np.arange(len(meta)))
    assert np.array_equal(stratified_plot_rows(meta, 0, seed=3), np.arange(len(meta)))


def _table(n: int = 480, d: int = 12, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    plate = np.arange(n) * 8 // n
    treat = np.where(np.arange(n) % 6 == 0, "DMSO", [f"T{i % 10}" for i in range(n)])
    moa = np.where(
        treat == "DMSO", None, [f"M{int(t[1:]) % 3}" if t != "DMSO" else "" for t in treat]
    )
    df = pd.DataFrame(
        {
            "Metadata_Batch": [f"B{p // 2}" for p in plate],
            "Metadata_Plate": [f"P{p}" for p in plate],
            "Metadata_Well": [f"W{i % 96}" for i in range(n)],
            "Metadata_Treatment": treat,
            "Metadata_MoA": moa,
        }
    )
    x = rng.normal(size=(n, d)).astype(np.float32)
    for j in range(d):
        df[f"f{j}"] = x[:, j]
    df["count"] = rng.integers(0, 9, n)  # an integer feature column
    return df


@pytest.mark.parametrize("row_group_size", [None, 7])
def test_parquet_loader_equals_pandas_loader(tmp_path: Path, row_group_size: int | None) -> None:
    # 7 rows per group: the loader's row-group loop (and its uneven last group) is exercised.
    path = tmp_path / "t.parquet"
    table = _table()
    table.to_parquet(path, row_group_size=row_group_size)
    if row_group_size:
        import pyarrow.parquet as pq

        assert pq.ParquetFile(path).num_row_groups > 2
    x, meta, names = read_parquet_profiles(path)
    x0, meta0, names0 = split_table(read_profile_table(path))
    assert names == names0 and x.dtype == np.float32
    assert np.array_equal(x, x0)
    pd.testing.assert_frame_equal(meta, meta0)


def test_parquet_loader_names_a_text_feature_column(tmp_path: Path) -> None:
    df = _table()
    df["oops"] = "text"
    df.to_parquet(tmp_path / "t.parquet")
    with pytest.raises(CdclError, match="feature column `oops` is not numeric"):
        read_parquet_profiles(tmp_path / "t.parquet")


def test_memory_plan_says_which_option_fits() -> None:
    small = memory_plan(10_000, 64)
    assert len(small) == 1 and "estimated peak memory" in small[0]
    huge = memory_plan(10**9, 768)  # ~8.6 TiB: no machine running this test has that free
    assert len(huge) == 2 and "--variants raw" in huge[1] and "would not fit" in huge[1]
    assert "--variants raw" not in memory_plan(10**9, 768, n_variants=1)[1]


def test_time_plan_scales_with_the_table_and_names_the_faster_option() -> None:
    small = time_plan(10_000, 64, cores=2)
    assert len(small) == 1 and "estimated time" in small[0] and "--variants raw" not in small[0]
    big = time_plan(10**6, 768, cores=2)[0]
    assert "--variants raw" in big  # over the 10-minute aim with both variants
    minutes = int(big.split("~")[1].split()[0])
    assert minutes > 10 and int(big.split("~")[2].split()[0]) < minutes  # raw is faster
    assert "--variants raw" not in time_plan(10**6, 768, n_variants=1, cores=2)[0]
    assert int(time_plan(10**6, 768, cores=4)[0].split("~")[1].split()[0]) < minutes


def test_keep_alive_prints_while_a_step_is_silent(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(progress, "GAP_S", 0.2)
    with progress.keep_alive(True):
        progress.working_on("a silent step")
        time.sleep(2.5)  # the keep-alive thread wakes once a second
    err = capsys.readouterr().err
    assert "still working on a silent step" in err
    with progress.keep_alive(False):
        time.sleep(1.2)
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_cli_plots_a_stated_sample_and_scores_every_row(tmp_path: Path) -> None:
    _table().to_parquet(tmp_path / "t.parquet")
    common = [
        "evaluate",
        "--features",
        tmp_path / "t.parquet",
        "--batch-col",
        "Metadata_Batch",
        "--treatment-col",
        "Metadata_Treatment",
        "--moa-col",
        "Metadata_MoA",
        "--plate-col",
        "Metadata_Plate",
        "--well-col",
        "Metadata_Well",
        "--control-query",
        "Metadata_Treatment == 'DMSO'",
    ]
    r = _cdcl(*common, "--out", tmp_path / "o", "--plot-sample", 120, "--variants", "raw")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["plots"]["rows_plotted"] == 120 and res["plots"]["rows_total"] == 480
    assert res["plots"]["stratified_by"] == ["batch", "treatment"]
    feats = res["feature_sets"]["features"]
    assert feats["n"]["profiles"] == 480 and feats["n"]["eval"] == 480
    assert "raw" in feats and "plate_normalized" not in feats
    umap_csv = pd.read_csv(tmp_path / "o" / "plots" / "umap_features.csv")
    assert len(umap_csv) == 120
    assert "a seeded sample of 120 of 480 rows" in (tmp_path / "o" / "report.html").read_text()

    bad = _cdcl(*common, "--out", tmp_path / "o2", "--variants", "raw,nope")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "--variants raw,nope" in bad.stderr and not (tmp_path / "o2").exists()


def test_stage_times_are_printed_only_when_echoing(capsys: pytest.CaptureFixture) -> None:
    from cdcl.metrics.score import Timer

    quiet, loud = Timer(), Timer(echo=True)
    with quiet("load"):
        pass
    assert capsys.readouterr().err == "" and "load" in quiet.times
    with loud("plots"):
        pass
    with pytest.raises(ValueError), loud("broken"):
        raise ValueError("a failed stage prints its error, not a time")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("cdcl evaluate: plots: ") and err[0].endswith(" s")


def test_nested_keep_alive_runs_one_thread() -> None:
    import threading

    def beats() -> int:
        return sum(t.name == "cdcl-keep-alive" for t in threading.enumerate())

    with progress.keep_alive(True):
        with progress.keep_alive(True):
            assert beats() == 1
        assert beats() == 1
    time.sleep(1.5)  # the thread notices the stop within a second
    assert beats() == 0
