"""`cdcl build rxrx1` on a fixture in the exact RxRx1 layout: content, bad inputs, kill + resume."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cli_process import cdcl_argv
from fixtures_layouts import (
    error_lines,
    run_cdcl,
    rxrx1_channel_level,
    rxrx1_png,
    write_rxrx1,
)
from PIL import Image

from cdcl.data.dataset_dir import open_dataset, partial_dir, validate


@pytest.fixture
def rx(tmp_path: Path) -> tuple[Path, pd.DataFrame]:
    """A tiny RxRx1 release: 6 HUVEC experiments + 1 RPE, 5 wells x 2 sites each."""
    root = tmp_path / "rxrx1"
    return root, write_rxrx1(root)


def test_build_rxrx1_content(rx: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    root, meta = rx
    out = tmp_path / "ds"
    proc = run_cdcl("build", "rxrx1", "--root", root, "--out", out, "--image-size", 32)
    assert proc.returncode == 0, proc.stderr
    validate(out, deep=True)
    ds = open_dataset(out)
    s = ds.samples
    huvec = meta[meta.cell_type == "HUVEC"]
    assert len(s) == len(huvec) == 60
    assert ds.channels == ["Hoechst", "ConA", "Phalloidin", "Syto14", "MitoTracker", "WGA"]
    assert ds.info.dtype == "uint8" and ds.image_size == (32, 32)
    assert ds.info.source == "rxrx1"
    assert sorted(s.batch.unique()) == [f"HUVEC-{i:02d}" for i in range(1, 7)]
    assert set(s.plate) == {f"HUVEC-{i:02d}_1" for i in range(1, 7)}
    # Controls: the untreated negative-control wells only; positive controls stay treatments.
    assert set(s.loc[s.is_control, "treatment"]) == {"EMPTY"}
    assert set(s.loc[~s.is_control, "treatment"]) == {"s10000", "s10001", "s10002", "s90001"}
    assert (s.groupby("plate")["is_control"].sum() == 2).all()
    assert set(s.well_type) == {"treatment", "positive_control", "negative_control"}
    # Channel w<c> lands in position c-1: each file was written around a distinct level.
    means = ds.read_many(np.arange(len(s))).astype(float).mean(axis=(0, 2, 3))
    expected = [rxrx1_channel_level(c) for c in range(1, 7)]
    np.testing.assert_allclose(means, expected, atol=2.0)


def test_rxrx1_pixels_equal_source_files_at_native_size(
    rx: tuple[Path, pd.DataFrame], tmp_path: Path
) -> None:
    root, meta = rx
    out = tmp_path / "ds"
    assert (
        run_cdcl("build", "rxrx1", "--root", root, "--out", out, "--image-size", 64).returncode == 0
    )
    ds = open_dataset(out)
    row = ds.samples.iloc[7]
    m = meta[
        (meta.experiment == row.batch) & (meta.well == row.well) & (meta.site == row.site)
    ].iloc[0]
    for c in range(1, 7):
        src = np.asarray(Image.open(rxrx1_png(root, m, c)))
        np.testing.assert_array_equal(ds.read(int(row.image))[c - 1], src)


def test_rxrx1_cell_type_all(rx: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    root, meta = rx
    out = tmp_path / "ds"
    proc = run_cdcl(
        "build", "rxrx1", "--root", root, "--out", out, "--cell-type", "all", "--image-size", 16
    )
    assert proc.returncode == 0, proc.stderr
    s = open_dataset(out).samples
    assert len(s) == len(meta) and set(s.cell_type) == {"HUVEC", "RPE"}


def _expect_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    lines = error_lines(proc)
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_missing_column(rx: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    root, meta = rx
    meta.drop(columns=["sirna"]).to_csv(root / "metadata.csv", index=False)
    proc = run_cdcl("build", "rxrx1", "--root", root, "--out", tmp_path / "ds")
    _expect_error(proc, "metadata.csv", "column `sirna` missing")


def test_missing_images_listed_with_count_and_skip_bad(
    rx: tuple[Path, pd.DataFrame], tmp_path: Path
) -> None:
    root, meta = rx
    gone = [rxrx1_png(root, meta.iloc[i], 3) for i in (0, 5)]
    for f in gone:
        f.unlink()
    proc = run_cdcl("build", "rxrx1", "--root", root, "--out", tmp_path / "ds", "--image-size", 16)
    line = _expect_error(proc, "2 of 60 images have missing files", "--skip-bad")
    assert str(gone[0]) in line
    assert not (tmp_path / "ds").exists()

    proc = run_cdcl(
        "build", "rxrx1", "--root", root, "--out", tmp_path / "ds", "--image-size", 16, "--skip-bad"
    )
    assert proc.returncode == 0, proc.stderr
    ds = open_dataset(tmp_path / "ds")
    assert len(ds.samples) == 58
    skipped = pd.read_csv(tmp_path / "ds" / "skipped.csv")
    assert sorted(skipped["file"]) == sorted(map(str, gone))
    assert set(skipped["problem"]) == {"missing"}
    assert "skipped 2 bad image(s)" in proc.stderr


def test_unreadable_image_named(rx: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    root, meta = rx
    bad = rxrx1_png(root, meta.iloc[3], 2)
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # a truncated PNG: the header alone still parses
    proc = run_cdcl("build", "rxrx1", "--root", root, "--out", tmp_path / "ds")
    _expect_error(proc, str(bad), "unreadable image")


def test_wrong_channel_count(rx: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    root, meta = rx
    bad = rxrx1_png(root, meta.iloc[4], 1)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(bad)  # RGB instead of one plane
    proc = run_cdcl("build", "rxrx1", "--root", root, "--out", tmp_path / "ds")
    _expect_error(proc, str(bad), "wrong channel count", "3 channels")


def test_plate_without_controls_falls_back(rx: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    root, meta = rx
    keep = ~((meta.experiment == "HUVEC-02") & (meta.well_type == "negative_control"))
    meta[keep].to_csv(root / "metadata.csv", index=False)
    out = tmp_path / "ds"
    proc = run_cdcl("build", "rxrx1", "--root", root, "--out", out, "--image-size", 16)
    assert proc.returncode == 0, proc.stderr
    lines = error_lines(proc)
    assert len(lines) == 1 and "HUVEC-02_1" in lines[0] and "without negative controls" in lines[0]
    stats = pd.read_parquet(out / "plate_stats.parquet")
    assert set(stats.loc[stats.plate == "HUVEC-02_1", "source"]) == {"all_images"}
    assert set(stats.loc[stats.plate == "HUVEC-01_1", "source"]) == {"controls"}


def test_treatment_in_one_batch_only_warns(rx: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    root, meta = rx
    keep = ~((meta.experiment != "HUVEC-01") & (meta.sirna == "s10001"))
    meta[keep].to_csv(root / "metadata.csv", index=False)
    proc = run_cdcl("build", "rxrx1", "--root", root, "--out", tmp_path / "ds", "--image-size", 16)
    assert proc.returncode == 0, proc.stderr
    lines = error_lines(proc)
    assert len(lines) == 1 and "1 treatment(s) present in one batch only (s10001)" in lines[0]


@pytest.mark.slow
def test_kill_and_resume_equals_clean_build(tmp_path: Path) -> None:
    root = tmp_path / "rxrx1"
    # 8 experiments x 15 wells x 2 sites = 240 fields of 6 PNGs.
    write_rxrx1(
        root, experiments=tuple(f"HUVEC-{i:02d}" for i in range(1, 9)), n_sirnas=13, size=96
    )
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    args = ["build", "rxrx1", "--root", root, "--image-size", 64]
    assert run_cdcl(*args, "--out", clean, "--workers", 1).returncode == 0

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = cdcl_argv(*args, "--out", resumed, "--workers", 1)
    if os.environ.get("CDCL_CLI"):
        cmd = [
            *os.environ["CDCL_CLI"].split(),
            *map(str, args),
            "--out",
            str(resumed),
            "--workers",
            "1",
        ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    progress = partial_dir(resumed) / "done.npy"
    killed_at = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if progress.exists():
            try:
                done = np.load(progress)
            except (ValueError, OSError, EOFError):
                continue  # caught between the writer's temp file and its rename
            if 0 < done.sum() < len(done):
                proc.send_signal(signal.SIGKILL)
                killed_at = int(done.sum())
                break
        time.sleep(0.002)
    proc.wait()
    assert killed_at is not None, "the build finished before it could be killed"
    assert not resumed.exists() and partial_dir(resumed).exists()

    rerun = run_cdcl(*args, "--out", resumed, "--workers", 2)
    assert rerun.returncode == 0, rerun.stderr
    assert "resumed after" in rerun.stdout
    finished_before = int(rerun.stdout.split("resumed after ")[1].split()[0])
    assert finished_before >= killed_at
    files_a = sorted(p.relative_to(clean) for p in clean.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(resumed) for p in resumed.rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        assert (clean / rel).read_bytes() == (resumed / rel).read_bytes(), rel
