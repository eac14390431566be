"""A full disk while writing a checkpoint, a store chunk or results.json: one line, nothing lost.

The write failure is real: the command runs in a subprocess under a file-size limit
(RLIMIT_FSIZE, with SIGXFSZ ignored, so a write past the limit fails with EFBIG), and where the
test runs as root, on a tiny tmpfs filled up to the last kilobyte (ENOSPC).
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cli_process import TINY_MODEL, cdcl_env
from cli_process import cdcl as run_cdcl

TINY_TRAIN = [*TINY_MODEL, "train.batch_size=8", "train.epochs=2"]


def _size_limit(nbytes: int) -> Callable[[], None]:
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write, do not kill the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))

    return apply


def cdcl(*args: object, limit: int | None = None) -> subprocess.CompletedProcess:
    """The real command line in a subprocess, optionally under a file-size limit."""
    return run_cdcl(
        *args,
        env=cdcl_env(PYTHONDONTWRITEBYTECODE="1"),
        preexec_fn=_size_limit(limit) if limit else None,
    )


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ": error: " in ln]
    assert len(errors) == 1 and errors[0] == lines[-1], proc.stderr
    return errors[0]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp" in p.name or p.name.endswith(".partial")]


@pytest.mark.slow
def test_checkpoint_write_on_a_full_disk_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    data, run = tmp_path / "screen", tmp_path / "run"
    assert cdcl("synth", "--preset", "tiny", "--out", data, "--no-progress").returncode == 0
    train = ["train", "--preset", "synthetic-cdcl", "--data", data, "--out", run, *TINY_TRAIN]
    first = cdcl(*train, "train.max_steps=3")
    assert first.returncode == 0, first.stderr
    last = run / "checkpoints" / "last.pt"
    before = last.read_bytes()
    assert len(before) > 100_000
    # Logs and config stay far below the limit; the next checkpoint does not fit.
    proc = cdcl(*train, "--resume", limit=len(before) // 2)
    line = _one_error_line(proc)
    assert str(last) in line and "write failed" in line and "no space left" in line
    assert last.read_bytes() == before
    assert _temp_files(run) == []
    # With space again the same command resumes from the intact checkpoint and finishes.
    again = cdcl(*train, "--resume")
    assert again.returncode == 0, again.stderr
    assert last.read_bytes() != before


def _table_screen(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    """48 images (3 plates x 16): the first 32 blank (tiny chunks), the last 16 noise (8 KiB)."""
    rng = np.random.default_rng(0)
    images = np.zeros((48, 64, 64, 2), dtype=np.uint8)
    images[32:] = rng.integers(0, 255, size=(16, 64, 64, 2), dtype=np.uint8)
    rows = [
        {
            "plate": f"P{i // 16}",
            "well": f"A{(i % 16) // 4:02d}",
            "site": i % 4,
            "compound": "DMSO" if (i % 16) < 4 else f"c{(i % 16) // 4}",
        }
        for i in range(48)
    ]
    npz, csv = tmp_path / "cells.npz", tmp_path / "cells.csv"
    np.savez(npz, images=images)
    pd.DataFrame(rows).to_csv(csv, index=False)
    return npz, csv, images


def test_store_chunk_write_on_a_full_disk_keeps_written_images_and_resumes(
    tmp_path: Path,
) -> None:
    npz, csv, images = _table_screen(tmp_path)
    out = tmp_path / "ds"
    build = [
        "build", "table", "--samples", csv, "--npz", npz, "--npz-key", "images",
        "--channels", "DNA,Actin", "--batch-col", "plate", "--treatment-col", "compound",
        "--control-query", 'compound == "DMSO"', "--out", out,
    ]  # fmt: skip
    partial = tmp_path / ".ds.partial"
    line = _one_error_line(cdcl(*build, limit=4096))
    assert "images.zarr" in line and "write failed" in line and "no space left" in line
    done = np.load(partial / "done.npy")
    assert done[:32].all() and not done[32:].any()
    written = _snapshot(partial)
    assert _temp_files(partial) == []
    # A second failure leaves every file of the first attempt byte for byte as it was.
    _one_error_line(cdcl(*build, limit=4096))
    assert _snapshot(partial) == written
    assert _temp_files(partial) == []
    assert not out.exists()
    ok = cdcl(*build)
    assert ok.returncode == 0, ok.stderr
    assert "resumed after 32" in ok.stdout
    from cdcl.data.dataset_dir import open_dataset

    ds = open_dataset(out)
    np.testing.assert_array_equal(ds.read_many(np.arange(48)), images.transpose(0, 3, 1, 2))


def _profile_table(path: Path) -> Path:
    rng = np.random.default_rng(1)
    rows = []
    for plate in ("P1", "P2", "P3"):
        for t in ("DMSO", "a", "b", "c"):
            for rep in range(3):
                rows.append({"Metadata_Plate": plate, "Metadata_Compound": t, "rep": rep})
    table = pd.DataFrame(rows).drop(columns="rep")
    table["Metadata_Well"] = [f"W{i:03d}" for i in range(len(table))]
    codes = table["Metadata_Compound"].astype("category").cat.codes.to_numpy()
    feats = rng.normal(size=(len(table), 8)) + codes[:, None]
    for j in range(8):
        table[f"f{j}"] = feats[:, j]
    table.to_csv(path, index=False)
    return path


def _evaluate_table(
    table: Path, out: Path, limit: int | None = None
) -> subprocess.CompletedProcess:
    return cdcl(
        "evaluate", "--features", table, "--out", out, "--no-umap",
        "--batch-col", "Metadata_Plate", "--treatment-col", "Metadata_Compound",
        "--control-query", "Metadata_Compound == 'DMSO'", "--null-size", "100",
        limit=limit,
    )  # fmt: skip


@pytest.mark.slow
def test_results_json_on_a_full_disk_keeps_the_previous_results(tmp_path: Path) -> None:
    table, out = _profile_table(tmp_path / "profiles.csv"), tmp_path / "eval"
    first = _evaluate_table(table, out)
    assert first.returncode == 0, first.stderr
    results = out / "results.json"
    before = results.read_bytes()
    line = _one_error_line(_evaluate_table(table, out, limit=len(before) // 2))
    assert str(results) in line and "write failed" in line and "no space left" in line
    assert results.read_bytes() == before
    assert _temp_files(out) == []


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Path:
    """A 1 MiB tmpfs (root only; skipped where mounting is not allowed)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", f"cdcl-test-{uuid.uuid4().hex[:8]}", str(mnt)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.slow
def test_results_json_on_a_really_full_tmpfs(tmp_path: Path, tiny_tmpfs: Path) -> None:
    table, out = _profile_table(tmp_path / "profiles.csv"), tiny_tmpfs / "eval"
    first = _evaluate_table(table, out)
    assert first.returncode == 0, first.stderr
    results = out / "results.json"
    before = results.read_bytes()
    # Fill the file system until only a few KiB are left: less than results.json needs.
    st = os.statvfs(tiny_tmpfs)
    free = st.f_bavail * st.f_frsize
    with open(tiny_tmpfs / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - 4096))
    (tiny_tmpfs / "report.html").write_bytes(b"")  # the report would need space too
    line = _one_error_line(_evaluate_table(table, out))
    assert str(results) in line and "no space left on device" in line
    assert results.read_bytes() == before
    assert _temp_files(out) == []
