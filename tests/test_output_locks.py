"""embed, evaluate, compare, study and demo hold the output lock; study/demo validate first."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from cli_process import cdcl, cdcl_argv, cdcl_env, wait_for
from conftest import write_random_dataset
from lock_holder import start_holder

from cdcl.cli import main
from cdcl.locking import lock_file


def _error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    return lines[0]


def test_second_embed_into_the_same_file_stops_and_the_first_finishes(tmp_path: Path) -> None:
    ds = write_random_dataset(tmp_path / "ds", n_batches=2, sites=1, size=16)
    out = tmp_path / "profiles.parquet"
    first = subprocess.Popen(
        cdcl_argv("embed", "intensity", "--data", ds, "--out", out, "--no-progress"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cdcl_env(),
    )  # fmt: skip
    lock = lock_file(out)
    try:
        wait_for(lambda: lock.exists() and lock.read_text().strip(), "the first embed's lock")
        first.send_signal(signal.SIGSTOP)  # hold it inside its work, whatever the machine's speed
        line = _error_line(cdcl("embed", "intensity", "--data", ds, "--out", out, "--no-progress"))
        assert f"in use by cdcl embed (pid {first.pid}" in line and str(lock) in line
    finally:
        first.send_signal(signal.SIGCONT)
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert len(pd.read_csv(out) if out.suffix == ".csv" else pd.read_parquet(out)) == 10
    assert not lock.exists()


@pytest.fixture
def holder(tmp_path: Path):
    """Start a process holding the lock of a path; yields (path, pid)."""
    procs: list[subprocess.Popen] = []

    def hold(target: Path) -> int:
        procs.append(start_holder(target, tmp_path))
        return procs[-1].pid

    yield hold
    for p in procs:
        p.kill()
        p.wait()


@pytest.mark.slow
def test_evaluate_compare_study_and_demo_stop_on_a_held_output(holder, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"earlier": true}\n')
    table = tmp_path / "t.csv"
    pd.DataFrame(
        {"Metadata_batch": ["a", "a", "b", "b"], "Metadata_treatment": ["DMSO", "x"] * 2,
         "f0": [0.0, 1.0, 2.0, 3.0]}
    ).to_csv(table, index=False)  # fmt: skip
    pid = holder(out)
    for args in (
        ["evaluate", "--features", table, "--out", out, "--no-umap"],
        ["compare", tmp_path / "nowhere", "--out", out],
        ["study", "--quick", "--out", out],
        ["demo", "--quick", "--out", out],
    ):
        line = _error_line(cdcl(*args))
        assert f"in use by test holder (pid {pid}" in line, line
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]
    assert json.loads((out / "results.json").read_text()) == {"earlier": True}


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["study", "--quick", "--epochs", "-1"], "--epochs -1: train at least 1 epoch"),
        (["study", "--quick", "--epochs", "0"], "--epochs 0: train at least 1 epoch"),
        (["demo", "--quick", "--epochs", "0"], "--epochs 0: train at least 1 epoch"),
        (["study", "--quick", "--seeds", "0,-2"], "--seeds 0,-2"),
        (["study", "--quick", "--methods", "DINO,Nope"], "--methods DINO,Nope: unknown"),
        (["study", "--quick", "--folds", "0"], "--folds 0"),
        (["demo", "--quick", "--seed", "-1"], "seed -1"),
        (["demo", "--dataset", "bbbc021", "--bbbc021-dir", "{tmp}/none"], "cells_subset.npz"),
        (["study", "--dataset", "bbbc021", "--bbbc021-dir", "{tmp}/none"], "cells_subset.npz"),
    ],
)
def test_bad_study_and_demo_arguments_create_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], needle: str
) -> None:
    out = tmp_path / "out"
    rc = main([a.replace("{tmp}", str(tmp_path)) for a in args] + ["--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and needle in err, err
    assert not out.exists() and not lock_file(out).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
