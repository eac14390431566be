"""`cdcl build cpg0004` on real LINCS plate maps + MoA table and real Phenix-named 16-bit crops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fixtures_layouts import (
    BATCH1,
    MOA_TABLE,
    PHENIX_CHANNEL,
    error_lines,
    real_fov_planes,
    run_cdcl,
    write_cpg0004,
)

from cdcl.data.dataset_dir import open_dataset, validate
from cdcl.data.splits import assign_split

pytestmark = pytest.mark.skipif(
    not BATCH1.exists(), reason="shared/data/cpg0004_lincs_metadata missing"
)


def _build(root: Path, out: Path, *extra: object, size: int = 48) -> None:
    proc = run_cdcl(
        "build", "cpg0004", "--root", root, "--out", out, "--platemaps", BATCH1, "--moa", MOA_TABLE,
        "--image-size", size, *extra,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def cpg_tiff(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame, Path]:
    """FileName/PathName style, 16-bit TIFF, built once for the module."""
    tmp = tmp_path_factory.mktemp("cpg")
    root = tmp / "cpg0004"
    expected = write_cpg0004(root, style="filename", fmt="tiff")
    out = tmp / "ds"
    _build(root, out)
    return root, expected, out


def test_cpg0004_design_matches_real_platemaps(cpg_tiff: tuple[Path, pd.DataFrame, Path]) -> None:
    _, expected, out = cpg_tiff
    validate(out, deep=True)
    ds = open_dataset(out)
    s = ds.samples
    assert ds.channels == ["DNA", "ER", "RNA", "AGP", "Mito"]
    assert ds.info.dtype == "uint16" and ds.info.source == "cpg0004"
    assert len(s) == len(expected) == 50  # 2 plate maps x 5 replicate plates x 5 wells
    assert set(s.batch) == set(expected.plate) and (s.batch == s.plate).all()
    m = s.merge(expected, on=["plate", "well", "site"], suffixes=("", "_exp"))
    assert len(m) == len(s)
    ctrl = m["broad_sample_exp"].isna()
    assert (m.is_control == ctrl).all() and set(m.loc[ctrl, "treatment"]) == {"DMSO"}
    t = m[~ctrl]
    assert (t.compound == t.broad_sample_exp.str[:13]).all()
    assert (t.treatment == t.compound + "@" + t.dose_exp.round(6).astype(float).astype(str)).all()
    np.testing.assert_allclose(t.dose, t.dose_exp)
    assert (m.replicate == m.replicate_exp).all()
    # MoA exactly as the Drug Repurposing Hub table gives it (joined on broad_sample).
    moa = pd.read_csv(MOA_TABLE, sep="\t").set_index("broad_sample")["moa"]
    assert (t.moa == t.broad_sample_exp.map(moa)).all()
    assert t.moa.notna().all() and set(m.loc[ctrl, "moa"]) == {"DMSO"}


def test_cpg0004_channel_order_from_column_names(cpg_tiff: tuple[Path, pd.DataFrame, Path]) -> None:
    _, expected, out = cpg_tiff
    ds = open_dataset(out)
    planes = real_fov_planes()
    s = ds.samples.merge(expected, on=["plate", "well", "site"])
    for _, r in s.iloc[[0, 17, 41]].iterrows():
        img = ds.read(int(r.image))
        for c, ch in enumerate(ds.channels):
            crop = planes[ch][r.y : r.y + 48, r.x : r.x + 48]
            np.testing.assert_array_equal(
                img[c], crop, err_msg=f"channel {ch} (Phenix ch{PHENIX_CHANNEL[ch]})"
            )


def test_cpg0004_url_style_png_8bit_and_batch_number(tmp_path: Path) -> None:
    root = tmp_path / "cpg0004"
    expected = write_cpg0004(root, n_maps=1, style="url", fmt="png")
    out = tmp_path / "ds"
    _build(root, out, "--batch-column", "Batch_Number", size=24)
    ds = open_dataset(out)
    assert ds.info.dtype == "uint8" and ds.image_size == (24, 24)
    assert sorted(ds.samples.batch.unique()) == sorted(map(str, expected.batch_number.unique()))
    # Downscaling 48 -> 24 is a 2x2 box average of the 8-bit crop.
    planes = real_fov_planes()
    r = ds.samples.merge(expected, on=["plate", "well", "site"]).iloc[3]
    crop = (planes["AGP"][r.y : r.y + 48, r.x : r.x + 48] >> 8).astype(float)
    box = crop.reshape(24, 2, 24, 2).mean(axis=(1, 3))
    assert np.abs(ds.read(int(r.image))[3].astype(float) - box).max() <= 0.5 + 1e-6


def test_cpg0004_replicate_folds(cpg_tiff: tuple[Path, pd.DataFrame, Path]) -> None:
    _, _, out = cpg_tiff
    s = open_dataset(out).samples
    seed = {1: (5, 4), 2: (1, 5), 3: (2, 1), 4: (3, 2), 5: (4, 3)}  # fold -> (test, val) replicate
    for k, (test, val) in seed.items():
        split = assign_split(s, "cpg0004", k)
        assert set(s.replicate[split == "test"]) == {test}
        assert set(s.replicate[split == "val"]) == {val}
        assert set(s.replicate[split == "train"]) == {1, 2, 3, 4, 5} - {test, val}
        assert not set(s.batch[split == "test"]) & set(s.batch[split == "train"])


def test_cpg0004_missing_channel_column(tmp_path: Path) -> None:
    root = tmp_path / "cpg0004"
    write_cpg0004(root, n_maps=1, replicates=1)
    for f in root.rglob("load_data.csv"):
        pd.read_csv(f).drop(columns=["FileName_OrigMito"]).to_csv(f, index=False)
    proc = run_cdcl(
        "build", "cpg0004", "--root", root, "--out", tmp_path / "ds", "--platemaps", BATCH1
    )
    lines = error_lines(proc)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "load_data.csv" in lines[0] and "`FileName_OrigMito` or `URL_OrigMito`" in lines[0]


def test_cpg0004_plate_not_in_barcode_map(tmp_path: Path) -> None:
    root = tmp_path / "cpg0004"
    write_cpg0004(root, n_maps=1, replicates=1)
    f = next(root.rglob("load_data.csv"))
    pd.read_csv(f).assign(Metadata_Plate="SQ99999999").to_csv(f, index=False)
    proc = run_cdcl(
        "build", "cpg0004", "--root", root, "--out", tmp_path / "ds", "--platemaps", BATCH1
    )
    lines = error_lines(proc)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "plate SQ99999999 is not in any barcode_platemap.csv" in lines[0]
