"""benchmarks/gpu_check.py: the --dry-run on the CPU gives every stage a figure; no CUDA -> exit 2."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
STAGES = [
    "synth",
    "6-channel array",
    "build table",
    "train",
    "embed, 1 process",
    "embed, torchrun 1 process",
    "evaluate --features",
]


def run_check(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The script in a subprocess, as a user runs it."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.slow
def test_dry_run_gives_every_stage_a_positive_figure(tmp_path: Path) -> None:
    """The whole pipeline at tiny sizes on the CPU: one table, every stage positive and finite."""
    p = run_check("--dry-run", "--out", tmp_path, "--budget-s", "800")
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["mode"] == "dry-run" and result["ok"] is True
    rows = {r["stage"]: r for r in result["rows"]}
    for stage in STAGES:
        assert stage in rows, f"stage {stage} missing: {sorted(rows)}"
        fig = rows[stage]["figure"]
        assert fig is not None and math.isfinite(fig) and fig > 0, (stage, rows[stage])
        assert rows[stage]["status"] == "ok"
        assert rows[stage]["seconds"] > 0
    # The printed table is the JSON's: one line per row, the stage names in order.
    lines = p.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("stage"))
    printed = [line.split("  ")[0] for line in lines[header + 2 : header + 2 + len(rows)]]
    assert printed == [r["stage"] for r in result["rows"]]
    # The work directory (datasets, run, profiles) is removed; the logs stay.
    assert not (tmp_path / "work").exists()
    assert (tmp_path / "logs" / "train.log").is_file()


def test_without_cuda_exits_2_with_one_line(tmp_path: Path) -> None:
    """No CUDA device and no --dry-run: exit 2, one line naming --dry-run, nothing written."""
    p = run_check("--out", tmp_path / "out", env={"CUDA_VISIBLE_DEVICES": ""})
    assert p.returncode == 2
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "no CUDA device" in err[0] and "--dry-run" in err[0]
    assert not (tmp_path / "out").exists()


def test_foreign_out_directory_is_not_replaced(tmp_path: Path) -> None:
    """An OUT/work the script did not make is left alone: exit 2 naming it."""
    (tmp_path / "work").mkdir()
    keep = tmp_path / "work" / "precious.txt"
    keep.write_text("x")
    p = run_check("--dry-run", "--out", tmp_path)
    assert p.returncode == 2
    assert "work" in p.stderr and "choose another --out" in p.stderr
    assert keep.read_text() == "x"
