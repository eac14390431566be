"""`cdcl demo --quick` end to end: the report's content, reuse of what is built, determinism."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _demo(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "cdcl",
            "demo",
            "--quick",
            "--no-progress",
            "--out",
            str(out),
            *extra,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


@pytest.fixture(scope="module")
def quick_demo(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, subprocess.CompletedProcess]:
    """One quick demo shared by the tests of this module."""
    out = tmp_path_factory.mktemp("demo") / "out"
    proc = _demo(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_demo_writes_the_comparison(quick_demo: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, proc = quick_demo
    for name in ("report.html", "results.md", "results.json", "figure1_umap.png"):
        assert (out / name).is_file(), name
    # The table is printed with every method and baseline, then the report's path.
    for row in ("supervised", "DINO", "DINO-CB", "CDCL", "DINO+tvn", "intensity stats"):
        assert f"\n{row} " in proc.stdout, row
    assert f"report: {out / 'report.html'}" in proc.stdout
    html = (out / "report.html").read_text()
    assert "Figure 1" in html and "data:image/png;base64," in html
    assert 'src="http' not in html and 'href="http' not in html
    md = (out / "results.md").read_text()
    assert "| CDCL |" in md and "NSCB" in md and "kBET" in md
    # Post-hoc corrections next to DINO, CDCL and the intensity baseline, said to be transductive.
    for base in ("DINO", "CDCL", "intensity stats"):
        for corr in ("sphering", "harmony", "combat"):
            assert f"| {base}+{corr} |" in md, (base, corr)
    assert "| random network+harmony |" not in md
    assert "transductively" in md and "transductively" in html
    # A demo is one replicate and says so, with the command that gives intervals.
    assert "One replicate (seed 0" in md and "`cdcl study --dataset synthetic --quick" in md
    assert "One replicate" in html
    res = json.loads((out / "results.json").read_text())
    assert set(res["training"]) == {"supervised", "DINO", "DINO-CB", "CDCL"}
    for stage in ("data", "train CDCL", "evaluate", "report"):
        assert res["timings_s"][stage] >= 0
    for method, stats in res["training"].items():
        assert stats["images_per_s"] > 0, method
    rows = {r["features"]: r for r in res["tables"]["plate_normalized"]}
    assert 0.0 <= rows["CDCL"]["kBET"] <= 1.0
    assert 0.0 <= rows["DINO"]["NSC"] <= 1.0


def test_demo_rerun_reuses_data_and_checkpoints(
    quick_demo: tuple[Path, subprocess.CompletedProcess],
) -> None:
    out, _ = quick_demo
    ckpts = sorted((out / "runs").glob("*/checkpoints/last.pt"))
    assert len(ckpts) == 4
    before = {p: p.stat().st_mtime_ns for p in ckpts}
    data_before = (out / "data" / "dataset.json").stat().st_mtime_ns
    first = json.loads((out / "results.json").read_text())["tables"]
    proc = _demo(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in ckpts} == before
    assert (out / "data" / "dataset.json").stat().st_mtime_ns == data_before
    again = json.loads((out / "results.json").read_text())["tables"]
    assert again == first


def test_demo_is_deterministic_from_scratch(
    quick_demo: tuple[Path, subprocess.CompletedProcess], tmp_path: Path
) -> None:
    out, _ = quick_demo
    proc = _demo(tmp_path / "again", "--fresh")
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = json.loads((out / "results.json").read_text())["tables"]["plate_normalized"]
    second = json.loads((tmp_path / "again" / "results.json").read_text())["tables"][
        "plate_normalized"
    ]
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a["features"] == b["features"]
        for key, va in a.items():
            vb = b[key]
            if isinstance(va, float):
                assert vb == pytest.approx(va, abs=1e-4), (a["features"], key)
            else:
                assert va == vb


def test_demo_bad_dataset_dir_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cdcl",
            "demo",
            "--dataset",
            "bbbc021",
            "--bbbc021-dir",
            str(tmp_path / "nowhere"),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cells_subset.npz: not found" in lines[0]


def test_demo_calibrate_adds_null_and_injected_effects(
    quick_demo: tuple[Path, subprocess.CompletedProcess], tmp_path: Path
) -> None:
    import shutil

    src, _ = quick_demo
    out = tmp_path / "out"
    shutil.copytree(src, out)  # reuses the built screen and checkpoints
    proc = _demo(out, "--calibrate")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    cal = [r["calibration"] for r in res["feature_sets"].values() if r.get("calibration")]
    assert len(cal) == 1
    rec = cal[0]["metrics"]["kBET acceptance"]
    assert set(rec["strength"]) == {"0.25", "0.5", "1", "2", "4"} and "null" in rec
    assert "Calibration of" in (out / "report.html").read_text()


@pytest.mark.skipif(
    not Path("/usr/bin/chromium").is_file(), reason="needs Debian's chromium at /usr/bin/chromium"
)
def test_demo_report_fits_a_1400px_window(
    quick_demo: tuple[Path, subprocess.CompletedProcess], tmp_path: Path
) -> None:
    from test_report_layout import PAGE_WIDTH, _scroll_width

    out, _ = quick_demo
    doc = (out / "report.html").read_text()
    assert "batch removal" in doc and "What the metrics mean" in doc
    assert _scroll_width(out / "report.html", tmp_path) <= PAGE_WIDTH


def test_bbbc021_needs_its_folder_named(tmp_path: Path) -> None:
    """The library never searches outside the package for data: BBBC021 takes --bbbc021-dir."""
    from cdcl.errors import CdclError
    from cdcl.experiments.demo import DemoSpec, check_demo_spec

    with pytest.raises(CdclError, match="--bbbc021-dir"):
        check_demo_spec(DemoSpec(out=tmp_path / "d", dataset="bbbc021"))
