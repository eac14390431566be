"""The canonical dataset directory: round trip, validation errors, atomic and resumable writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import write_random_dataset

from cdcl.data.dataset_dir import (
    DatasetInfo,
    DatasetWriter,
    open_dataset,
    partial_dir,
    validate,
)
from cdcl.errors import DatasetError


def test_round_trip_reads_every_image(tmp_path: Path) -> None:
    out = write_random_dataset(tmp_path / "ds", seed=3)
    info = validate(out, deep=True)
    ds = open_dataset(out)
    rng = np.random.default_rng(3)
    expected = rng.integers(0, 255, size=(len(ds), 5, 16, 16), dtype=np.uint8)
    for i in range(len(ds)):
        assert np.array_equal(ds.read(i), expected[i])
    idx = np.array([7, 2, 2, 11, 0])
    assert np.array_equal(ds.read_many(idx), expected[idx])
    assert info.channels == ["DNA", "ER", "RNA", "AGP", "Mito"]
    assert not partial_dir(out).exists()


def test_plate_stats_come_from_controls(random_dataset: Path) -> None:
    ds = open_dataset(random_dataset)
    s = ds.samples
    plate = s["plate"].iloc[0]
    ctrl = s[(s["plate"] == plate) & s["is_control"]]["image"].to_numpy()
    pix = ds.read_many(ctrl).astype(np.float64)
    mean, std = ds.plate_mean_std([int(ctrl[0])])
    assert np.allclose(mean[0], pix.mean(axis=(0, 2, 3)), rtol=1e-5)
    assert np.allclose(std[0], pix.std(axis=(0, 2, 3)), rtol=1e-4)
    z = ds.standardized(ctrl)
    assert np.allclose(z.mean(axis=(0, 2, 3)), 0, atol=1e-4)


def test_plate_without_controls_warns_and_falls_back(tmp_path: Path) -> None:
    samples = pd.DataFrame(
        {
            "image": [0, 1],
            "batch": ["b0", "b0"],
            "plate": ["p0", "p0"],
            "well": ["A01", "A02"],
            "site": [0, 0],
            "treatment": ["t0", "t1"],
            "is_control": [False, False],
        }
    )
    info = DatasetInfo("x", "test", ["DNA"], "uint8", [4, 4], 2)
    w = DatasetWriter(tmp_path / "d", info)
    w.write([0, 1], np.ones((2, 1, 4, 4), np.uint8))
    with pytest.warns(UserWarning, match="plate p0: no negative controls"):
        out = w.commit(samples)
    stats = pd.read_parquet(out / "plate_stats.parquet")
    assert stats["source"].tolist() == ["all_images"]


def _rewrite_samples(path: Path, fn) -> None:
    df = pd.read_parquet(path / "samples.parquet")
    fn(df).to_parquet(path / "samples.parquet", index=False)


def test_missing_column_is_named(random_dataset: Path) -> None:
    _rewrite_samples(random_dataset, lambda d: d.drop(columns=["batch"]))
    with pytest.raises(
        DatasetError, match=r"samples.parquet: column `batch` missing; the cross-batch"
    ):
        validate(random_dataset)


def test_wrong_dtype_is_named(random_dataset: Path) -> None:
    _rewrite_samples(random_dataset, lambda d: d.assign(site=d["site"].astype(str)))
    with pytest.raises(DatasetError, match=r"column `site` has dtype .* expected int"):
        validate(random_dataset)


def test_empty_value_names_the_row(random_dataset: Path) -> None:
    def blank(d: pd.DataFrame) -> pd.DataFrame:
        d["treatment"] = d["treatment"].astype(object)
        d.loc[4, "treatment"] = None
        return d

    _rewrite_samples(random_dataset, blank)
    with pytest.raises(DatasetError, match=r"column `treatment` is empty in row 4"):
        validate(random_dataset)


def test_unknown_channel_count(random_dataset: Path) -> None:
    info = json.loads((random_dataset / "dataset.json").read_text())
    info["channels"] = ["DNA", "ER", "RNA"]
    (random_dataset / "dataset.json").write_text(json.dumps(info))
    with pytest.raises(DatasetError, match=r"5 channels but dataset.json names 3"):
        validate(random_dataset)


def test_wrong_pixel_dtype(random_dataset: Path) -> None:
    info = json.loads((random_dataset / "dataset.json").read_text())
    info["dtype"] = "uint16"
    (random_dataset / "dataset.json").write_text(json.dumps(info))
    with pytest.raises(DatasetError, match=r"pixel dtype uint8, dataset.json says uint16"):
        validate(random_dataset)


def _chunk_files(path: Path) -> list[Path]:
    return sorted(
        p for p in (path / "images.zarr").rglob("*") if p.is_file() and "zarr.json" not in p.name
    )


def test_truncated_store_is_detected(random_dataset: Path) -> None:
    chunks = _chunk_files(random_dataset)
    chunks[-1].unlink()
    # zarr would read the missing chunk as zeros: even the cheap check (no decoding) refuses.
    for deep in (False, True):
        with pytest.raises(DatasetError, match=rf"image \d+ has no chunk file {chunks[-1]}"):
            validate(random_dataset, deep=deep)


def test_corrupted_chunk_is_detected(random_dataset: Path) -> None:
    chunk = _chunk_files(random_dataset)[3]
    chunk.write_bytes(chunk.read_bytes()[:10])
    with pytest.raises(DatasetError, match=r"image \d+ cannot be decoded \(checksum mismatch"):
        validate(random_dataset, deep=True)


def test_missing_store_and_info(random_dataset: Path) -> None:
    shutil.rmtree(random_dataset / "images.zarr")
    with pytest.raises(DatasetError, match=r"images.zarr: image store missing"):
        validate(random_dataset)
    (random_dataset / "dataset.json").unlink()
    with pytest.raises(DatasetError, match=r"dataset.json: not found"):
        validate(random_dataset)


def test_partial_build_is_not_a_dataset_and_resumes(tmp_path: Path) -> None:
    info = DatasetInfo("x", "test", ["DNA", "ER"], "uint16", [8, 8], 6)
    out = tmp_path / "d"
    w = DatasetWriter(out, info, build_key={"seed": 1})
    imgs = np.arange(6 * 2 * 64, dtype=np.uint16).reshape(6, 2, 8, 8)
    w.write([0, 1, 2], imgs[:3])
    assert not out.exists()
    with pytest.raises(DatasetError, match="unfinished build"):
        validate(out)
    # Same key: resumes with the first three images done.
    w2 = DatasetWriter(out, info, build_key={"seed": 1})
    assert w2.resumed and w2.pending().tolist() == [3, 4, 5]
    w2.write([3, 4, 5], imgs[3:])
    samples = pd.DataFrame(
        {
            "image": range(6),
            "batch": ["b0"] * 3 + ["b1"] * 3,
            "plate": ["p0"] * 3 + ["p1"] * 3,
            "well": ["A01", "A02", "A03"] * 2,
            "site": [0] * 6,
            "treatment": ["DMSO", "t", "t"] * 2,
            "is_control": [True, False, False] * 2,
        }
    )
    w2.commit(samples)
    assert np.array_equal(open_dataset(out).read_many(range(6)), imgs)
    # Another key restarts from scratch.
    w3 = DatasetWriter(tmp_path / "e", info, build_key={"seed": 1})
    w3.write([0], imgs[:1])
    w4 = DatasetWriter(tmp_path / "e", info, build_key={"seed": 2})
    assert not w4.resumed and len(w4.pending()) == 6


def test_commit_refuses_incomplete(tmp_path: Path) -> None:
    info = DatasetInfo("x", "test", ["DNA"], "uint8", [4, 4], 3)
    w = DatasetWriter(tmp_path / "d", info)
    w.write([0], np.zeros((1, 1, 4, 4), np.uint8))
    with pytest.raises(DatasetError, match="2 images not written yet"):
        w.commit(pd.DataFrame())


def test_read_many_large_images_chunk_by_chunk(tmp_path: Path) -> None:
    # 2 x 400 x 400 uint16 = 640 KiB per image: above LARGE_IMAGE_BYTES, read per chunk.
    info = DatasetInfo("big", "test", ["DNA", "ER"], "uint16", [400, 400], 3)
    w = DatasetWriter(tmp_path / "d", info)
    imgs = np.random.default_rng(0).integers(0, 60000, (3, 2, 400, 400), dtype=np.uint16)
    w.write([0, 1, 2], imgs)
    samples = pd.DataFrame(
        {
            "image": [0, 1, 2],
            "batch": ["b0"] * 3,
            "plate": ["p0"] * 3,
            "well": ["A01", "A02", "A03"],
            "site": [0, 0, 0],
            "treatment": ["DMSO", "t", "t"],
            "is_control": [True, False, False],
        }
    )
    ds = open_dataset(w.commit(samples))
    idx = np.array([2, 0, 2])
    assert np.array_equal(ds.read_many(idx), imgs[idx])
