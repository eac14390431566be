"""`cdcl build table`: the real BBBC021 crops (one npz) and per-channel files via a path template."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fixtures_layouts import BBBC021, error_lines, run_cdcl
from PIL import Image

from cdcl.data.dataset_dir import open_dataset, validate
from cdcl.data.design import design_summary

BBBC_ARGS = [
    "--npz", BBBC021 / "cells_subset.npz", "--npz-key", "images", "--channel-axis", "-1",
    "--samples", BBBC021 / "metadata_subset.csv", "--channels", "DNA,Actin,Tubulin",
    "--batch-col", "plate", "--treatment-col", "compound", "--dose-col", "concentration_uM",
    "--moa-col", "moa", "--control-query", 'compound == "DMSO"',
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(not BBBC021.exists(), reason="shared/data/bbbc021_week4_singlecell missing")
def test_bbbc021_crops_build(tmp_path: Path) -> None:
    out = tmp_path / "bbbc021"
    proc = run_cdcl("build", "table", *BBBC_ARGS, "--out", out, "--workers", 2, "--name", "bbbc021")
    assert proc.returncode == 0, proc.stderr
    validate(out, deep=True)
    ds = open_dataset(out)
    s = ds.samples
    meta = pd.read_csv(BBBC021 / "metadata_subset.csv")
    assert len(s) == len(meta) == 2654
    assert ds.info.dtype == "uint16" and ds.image_size == (68, 68)
    assert ds.channels == ["DNA", "Actin", "Tubulin"]
    assert s.batch.nunique() == 6 and (s.batch == s.plate).all()
    assert set(s.loc[s.is_control, "treatment"]) == {"DMSO"}
    assert (s.is_control == (meta.compound == "DMSO")).all()
    # BBBC021 spells it "cyclohexamide".
    assert set(s.loc[~s.is_control, "treatment"]) == {
        "cyclohexamide@5.0",
        "cyclohexamide@15.0",
        "cyclohexamide@50.0",
    }
    assert set(s.loc[~s.is_control, "moa"]) == {"Protein synthesis"}
    # Pixels are the array's rows in table order, channels moved first.
    arr = np.load(BBBC021 / "cells_subset.npz")["images"]
    for i in (0, 1234, 2653):
        np.testing.assert_array_equal(ds.read(i), np.moveaxis(arr[i], -1, 0))
    text = design_summary(ds)
    assert "3 of 3 treatments appear in 2+ batches" in text
    assert "controls appear in 6 of 6 batches" in text


def _write_png_table(root: Path, n_plates: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for p in range(n_plates):
        for w, treat in enumerate(["DMSO", "DMSO", "taxol", "nocodazole"]):
            well = f"B{w + 2:02d}"
            d = root / f"plate{p}"
            d.mkdir(parents=True, exist_ok=True)
            for c, ch in enumerate(["DNA", "Actin"]):
                img = (rng.integers(0, 4096, size=(40, 40)) + 1000 * c).astype(np.uint16)
                Image.fromarray(img).save(d / f"{well}_{ch}.png")
            rows.append(
                {
                    "run": f"batch{p // 2}",
                    "plate_id": f"plate{p}",
                    "well": well,
                    "drug": treat,
                    "moa": treat,
                }
            )
    df = pd.DataFrame(rows)
    df.to_csv(root / "samples.csv", index=False)
    return df


def test_path_template_build_16bit_png(tmp_path: Path) -> None:
    root = tmp_path / "screen"
    df = _write_png_table(root)
    out = tmp_path / "ds"
    proc = run_cdcl(
        "build", "table", "--samples", root / "samples.csv", "--channels", "DNA,Actin",
        "--path-template", "{plate_id}/{well}_{channel}.png", "--batch-col", "run",
        "--plate-col", "plate_id", "--site-col", "", "--treatment-col", "drug",
        "--control-query", "drug == 'DMSO'", "--out", out, "--image-size", 20,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    ds = open_dataset(out)
    assert ds.info.dtype == "uint16" and ds.image_size == (20, 20)
    assert list(ds.samples.treatment) == list(df.drug)
    assert sorted(ds.samples.batch.unique()) == ["batch0", "batch1"]
    # The Actin files were written 1000 levels brighter: channel order follows --channels.
    means = ds.read_many(np.arange(len(df))).astype(float).mean(axis=(0, 2, 3))
    assert 900 < means[1] - means[0] < 1100


def test_table_errors_are_one_line(tmp_path: Path) -> None:
    root = tmp_path / "screen"
    _write_png_table(root)
    base = [
        "build", "table", "--samples", root / "samples.csv", "--path-template",
        "{plate_id}/{well}_{channel}.png", "--batch-col", "run", "--plate-col", "plate_id",
        "--site-col", "", "--treatment-col", "drug", "--out", tmp_path / "ds",
    ]  # fmt: skip
    cases = [
        (["--channels", "DNA,Actin", "--control-query", "dose > 1"], "--control-query"),
        (["--channels", "DNA,Actin", "--control-query", "drug == 'DMSO'", "--moa-col", "target"], "column `target` missing"),
        (["--channels", "DNA,Tubulin", "--control-query", "drug == 'DMSO'"], "images have missing files"),
    ]  # fmt: skip
    for extra, needle in cases:
        proc = run_cdcl(*base, *extra)
        lines = error_lines(proc)
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert needle in lines[0], lines[0]


def test_npz_wrong_channel_count(tmp_path: Path) -> None:
    arr = np.zeros((4, 16, 16, 4), np.uint8)
    np.savez(tmp_path / "x.npz", images=arr)
    pd.DataFrame(
        {
            "plate": ["p1", "p1", "p2", "p2"],
            "well": "A01",
            "site": 1,
            "treatment": ["DMSO", "a", "DMSO", "a"],
        }
    ).assign(batch=lambda d: d.plate).to_csv(tmp_path / "m.csv", index=False)
    proc = run_cdcl(
        "build", "table", "--samples", tmp_path / "m.csv", "--npz", tmp_path / "x.npz",
        "--channels", "DNA,Actin,Tubulin", "--control-query", "treatment == 'DMSO'", "--out", tmp_path / "ds",
    )  # fmt: skip
    lines = error_lines(proc)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "4 channels along axis -1" in lines[0] and "--channels names 3" in lines[0]


def test_design_summary_flags_single_batch_treatments_and_plates_without_controls() -> None:
    s = pd.DataFrame(
        {
            "image": range(6),
            "batch": ["b1", "b1", "b2", "b2", "b3", "b3"],
            "plate": ["p1", "p1", "p2", "p2", "p3", "p3"],
            "well": ["A1", "A2", "A1", "A2", "A1", "A2"],
            "treatment": ["DMSO", "x", "DMSO", "x", "y", "x"],
            "is_control": [True, False, True, False, False, False],
        }
    )
    text = design_summary(s)
    assert "1 of 2 treatments appear in 2+ batches" in text
    assert "1 appear in one batch only (pair within their batch): y" in text
    assert "p3: 0 wells, 0 images  <- no controls" in text
    assert "b3: 2 treatments, 0 control images" in text
