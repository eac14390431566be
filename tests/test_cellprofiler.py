"""The CellProfiler baseline: simulator masks, Otsu + watershed, cp-measure rows, the embed command."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cli_process import cdcl, cdcl_argv
from conftest import SHARED_DATA

from cdcl.data import synthetic as S
from cdcl.data.dataset_dir import MASKS_DIR, open_dataset
from cdcl.data.segmentation import segment_field
from cdcl.embed.cellprofiler_features import measure_field, measure_objects

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# A small screen that measures in seconds: 4 batches x 1 plate x 8 wells x 1 site, 32 px.
SCREEN = {"batches": 4, "sites": 1, "cells_per_field": 4.0, "image_size": 32}
FAMILIES = "intensity,sizeshape"


def _cdcl(*args: str, **kw: object) -> subprocess.CompletedProcess:
    return cdcl(*args, env=ENV, **kw)


@pytest.fixture(scope="module")
def screen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small simulated screen, rendered with its masks."""
    return S.generate(tmp_path_factory.mktemp("cp") / "screen", "tiny", seed=3, **SCREEN)


def _cells_of_block(preset: str, seed: int, overrides: dict, n: int) -> tuple:
    """The cells the renderer places in the first ``n`` images (same draws as _render_block)."""
    cfg = S.resolve_config(preset, **overrides)
    d = S._design(cfg, seed)
    idx, key = S.blocks(cfg, seed)[0]
    assert idx[0] == 0 and len(idx) >= n
    margin = int(math.ceil(14 * cfg.image_size / 64.0))
    _, cells = S._block_cells(d, idx, np.random.default_rng(key), margin)
    return cells, margin, cfg.image_size


def test_simulator_masks_match_the_rendered_cells() -> None:
    over = {"image_size": 64}
    images, masks = S.render_masks("tiny", 1, np.arange(8), **over)
    # Masks draw no random numbers: the pixels are those of a plain render.
    np.testing.assert_array_equal(images, S.render("tiny", 1, np.arange(8), **over))
    assert masks.shape == (8, 2, 64, 64) and masks.dtype == np.uint16
    cells, margin, size = _cells_of_block("tiny", 1, over, 8)
    for i in range(8):
        cell_lab, nuc_lab = masks[i].astype(np.int64)
        mine = np.flatnonzero(cells.img == i)
        ny, nx = cells.ny[mine] - margin, cells.nx[mine] - margin
        inside = (ny >= 0) & (ny < size) & (nx >= 0) & (nx < size)
        # every nucleus whose centre lies in the field is labelled there, in a cell
        yy, xx = ny[inside].astype(int), nx[inside].astype(int)
        assert (nuc_lab[yy, xx] > 0).all() and (cell_lab[yy, xx] > 0).all()
        # labels are 1..k, nuclei carry their cell's number and sit inside it
        ids = np.unique(cell_lab[cell_lab > 0])
        np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))
        np.testing.assert_array_equal(cell_lab[nuc_lab > 0], nuc_lab[nuc_lab > 0])
        assert len(ids) >= inside.sum() > 0
    # the masks are where the stains are: DNA in nuclei, AGP (cortex) in cells
    dna, agp = images[:, 0].astype(float), images[:, 3].astype(float)
    assert dna[masks[:, 1] > 0].mean() > 3 * dna[masks[:, 0] == 0].mean()
    assert agp[masks[:, 0] > 0].mean() > 2 * agp[masks[:, 0] == 0].mean()


def test_masks_are_stored_with_the_screen(screen: Path) -> None:
    ds = open_dataset(screen)
    assert (screen / MASKS_DIR).is_dir() and ds.mask_objects == ["cells", "nuclei"]
    _, want = S.render_masks("tiny", 3, np.arange(len(ds)), **SCREEN)
    np.testing.assert_array_equal(ds.read_masks(np.arange(len(ds))), want)


def test_a_mask_store_that_does_not_fit_is_refused(screen: Path, tmp_path: Path) -> None:
    import shutil

    from cdcl.data.dataset_dir import create_mask_array
    from cdcl.errors import DatasetError

    bad = tmp_path / "bad"
    shutil.copytree(screen, bad)
    shutil.rmtree(bad / MASKS_DIR)
    create_mask_array(bad / MASKS_DIR, 5, ["cells"], (32, 32))  # 5 fields for 32 images
    with pytest.raises(DatasetError, match="masks.zarr: shape"):
        open_dataset(bad)


def test_measure_field_equals_cp_measure_per_object(screen: Path) -> None:
    from cp_measure.bulk import get_core_measurements

    ds = open_dataset(screen)
    image, masks = ds.read(5), ds.read_masks([5])[0]
    per_object, names = measure_field(image, masks, ds.channels, ("intensity", "zernike"))
    core = get_core_measurements()
    pixels = image.astype(np.float64) / 65535.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k in range(2):
            labels = masks[k].astype(np.int32)
            zern = core["zernike"](labels, None)
            np.testing.assert_array_equal(
                per_object[k][:, names.index("AreaShape_Zernike_2_0")], zern["Zernike_2_0"]
            )
            dna = core["intensity"](labels, pixels[0])
            col = names.index("Intensity_MeanIntensity_DNA")
            np.testing.assert_array_equal(per_object[k][:, col], dna["Intensity_MeanIntensity"])
    assert not any("Location" in n or "Center_" in n for n in names)


@pytest.mark.slow
def test_cellprofiler_embed_end_to_end_and_row_equals_cp_measure(
    screen: Path, tmp_path: Path
) -> None:
    from cp_measure.bulk import get_core_measurements

    # Raw medians (no normalisation or selection) per image: comparable with cp-measure.
    raw = tmp_path / "raw.parquet"
    r = _cdcl(
        "embed", "--features", "cellprofiler", "--data", str(screen), "--out", str(raw),
        "--level", "image", "--families", FAMILIES, "--normalize", "none", "--no-select",
        "--no-progress",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "ms per field" in r.stdout and "segmentation masks" in r.stdout
    table = pd.read_parquet(raw)
    ds = open_dataset(screen)
    assert len(table) == len(ds)
    i = 7
    row = table[table["Metadata_Well"] == ds.samples["well"][i]]
    row = row[row["Metadata_Plate"] == ds.samples["plate"][i]].iloc[0]
    image, masks = ds.read(i), ds.read_masks([i])[0]
    core = get_core_measurements()
    pixels = image.astype(np.float64) / 65535.0
    checked = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for obj, labels in (("Cells", masks[0]), ("Nuclei", masks[1])):
            labels = labels.astype(np.int32)
            direct = dict(core["sizeshape"](labels, None))
            for c, ch in enumerate(ds.channels):
                for key, v in core["intensity"](labels, pixels[c]).items():
                    direct[f"{key}_{ch}"] = v
            for key, values in direct.items():
                name = f"{obj}_AreaShape_{key}" if "Intensity" not in key else f"{obj}_{key}"
                if name not in table:
                    continue  # location features are left out
                want = np.nanmedian(np.asarray(values, np.float32).astype(np.float64))
                got = row[name]
                assert (np.isnan(want) and np.isnan(got)) or np.float32(want) == got, name
                checked += 1
    assert checked > 100

    # The default pipeline: well medians, normalised per plate, features selected.
    wells = tmp_path / "wells.csv"
    r = _cdcl(
        "embed", "--features", "cellprofiler", "--data", str(screen), "--out", str(wells),
        "--families", FAMILIES, "--no-progress",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    prof = pd.read_csv(wells)
    feats = [c for c in prof.columns if not c.startswith("Metadata_")]
    assert len(prof) == ds.samples.groupby(["plate", "well"]).ngroups
    assert feats and all(c.startswith(("Cells_", "Nuclei_")) for c in feats)
    x = prof[feats].to_numpy()
    assert np.isfinite(x).all() and np.abs(x).max() <= 500
    ctrl = prof["Metadata_Is_Control"].to_numpy(bool)
    # mad_robustize: the controls of every plate have median 0 on every kept feature
    for _, grp in prof[ctrl].groupby("Metadata_Plate"):
        np.testing.assert_allclose(np.median(grp[feats].to_numpy(), axis=0), 0, atol=1e-5)
    assert not list(tmp_path.glob(".*cellprofiler*"))  # work directory removed


@pytest.mark.slow
def test_killed_cellprofiler_embed_resumes_with_same_profiles(screen: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed.parquet"
    cmd = cdcl_argv(
        "embed", "--features", "cellprofiler", "--data", screen, "--families", FAMILIES,
        "--chunk-size", "2", "--no-progress",
    )  # fmt: skip
    proc = subprocess.Popen(
        [*cmd, "--out", str(out)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    pattern = ".killed.parquet.cellprofiler/.cellprofiler-*/part-*.parquet"
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob(pattern)):
        assert proc.poll() is None, proc.communicate()[1].decode()
        assert time.monotonic() < deadline, "no part written in time"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    parts = list(tmp_path.glob(pattern))
    assert 1 <= len(parts) < 16 and not out.exists()
    r = subprocess.run([*cmd, "--out", str(out)], env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    done = int(r.stderr.split("resuming, ")[1].split(" of ")[0])
    assert done >= len(parts) and " of 16 parts" in r.stderr
    # Uninterrupted, with two measuring processes: the same table.
    ref = tmp_path / "ref.parquet"
    r = subprocess.run(
        [*cmd, "--out", str(ref), "--workers", "2"], env=ENV, capture_output=True, text=True
    )
    assert r.returncode == 0 and "resuming" not in r.stderr, r.stderr
    assert "fields measured" in r.stderr  # --no-progress: plain progress lines instead
    pd.testing.assert_frame_equal(pd.read_parquet(out), pd.read_parquet(ref))


def test_stored_masks_required_when_asked(screen: Path, tmp_path: Path) -> None:
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(screen, bare)
    shutil.rmtree(bare / MASKS_DIR)
    r = _cdcl(
        "embed", "--features", "cellprofiler", "--data", str(bare), "--out",
        str(tmp_path / "x.parquet"), "--segmentation", "masks",
    )  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "no stored masks" in r.stderr and "--segmentation otsu" in r.stderr
    r = _cdcl("embed", "--features", "cellprofiler", "--data", str(bare), "--out", "y",
              "--families", "texture,nope")  # fmt: skip
    assert r.returncode == 2 and "--families" in r.stderr and "nope" in r.stderr


def _bbbc021_crops(n: int) -> tuple[np.ndarray, pd.DataFrame]:
    folder = SHARED_DATA / "bbbc021_week4_singlecell"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    with np.load(folder / "cells_subset.npz") as z:
        images = z["images"]
    step = len(images) // n
    return np.moveaxis(images[::step][:n], -1, 1), pd.read_csv(folder / "metadata_subset.csv")


def test_otsu_watershed_segments_bbbc021_crops_into_plausible_cells() -> None:
    crops, _ = _bbbc021_crops(24)
    centred = 0
    for img in crops:
        cells, nuclei = segment_field(img, ["DNA", "Actin", "Tubulin"])
        n = int(nuclei.max())
        assert 1 <= n <= 10  # a 68-px crop around one MCF-7 nucleus holds a few nuclei
        # nuclei are inside cells of the same number; cells are larger than their nuclei
        np.testing.assert_array_equal(cells[nuclei > 0], nuclei[nuclei > 0])
        assert (cells > 0).sum() >= (nuclei > 0).sum()
        c = nuclei[34, 34]
        if c > 0:
            centred += 1
            area = int((nuclei == c).sum())
            assert 150 <= area <= 3000, area  # MCF-7 nuclei at this scale: ~15-45 px across
        # DNA is brighter in the nuclei than around them
        dna = img[0].astype(float)
        assert dna[nuclei > 0].mean() > 1.5 * dna[nuclei == 0].mean()
    assert centred >= 22  # every crop is centred on a nucleus


def test_otsu_watershed_finds_cellprofilers_nuclei_on_a_cell_painting_field() -> None:
    from PIL import Image

    folder = SHARED_DATA / "cellpainting_fovs" / "pediatric_cancer_atlas_profiling"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    # Channel files by their CellProfiler names: DNA ch5, ER ch2, AGP ch3, Mito ch4, RNA ch6.
    files = {"DNA": 5, "ER": 2, "AGP": 3}
    image = np.stack(
        [
            np.asarray(Image.open(folder / "images" / "orig" / f"r03c03f03p01-ch{k}sk1fk1fl1.tiff"))
            for k in files.values()
        ]
    )
    cells, nuclei = segment_field(image, list(files))
    cp = pd.read_parquet(folder / "BR00143976_shrunken.parquet")
    want = int(cp["Image_Count_Cells"].iloc[0])  # CellProfiler's count on this field: 29
    areas = np.bincount(nuclei.ravel())[1:]
    assert 0.6 * want <= len(areas) <= 1.6 * want
    ratio = np.median(areas) / cp["Nuclei_AreaShape_Area"].median()
    assert 0.5 <= ratio <= 2.0
    assert np.median(np.bincount(cells.ravel())[1:]) > 1.5 * np.median(areas)


def test_measure_objects_without_objects_is_empty() -> None:
    x, names = measure_objects(np.zeros((8, 8), np.int32), np.zeros((1, 8, 8)), ["DNA"])
    assert x.shape == (0, 0) and names == []


@pytest.mark.slow
def test_cellprofiler_row_and_its_corrections_in_the_evaluation(screen: Path) -> None:
    from cdcl.data.splits import assign_split
    from cdcl.embed.cellprofiler import CellProfilerSource, cellprofiler_profiles
    from cdcl.embed.cellprofiler_features import CellProfilerOptions
    from cdcl.evaluation.run import evaluate_images
    from cdcl.profiles.table import image_meta

    ds = open_dataset(screen)
    split = assign_split(ds.samples, ds.info.source, None)
    options = CellProfilerOptions(families=("intensity", "sizeshape"))
    results, profiles = evaluate_images(
        ds,
        split,
        {"CellProfiler": CellProfilerSource(options)},
        corrections=("sphering", "harmony", "combat"),
        null_size=50,
        progress=False,
    )
    names = ["CellProfiler", *(f"CellProfiler+{c}" for c in ("sphering", "harmony", "combat"))]
    assert list(results) == names and list(profiles) == names
    assert "plate_normalized" in results["CellProfiler"]
    # the evaluated row is the pipeline's output on the train + test images
    idx = np.flatnonzero(split.isin(["train", "test"]).to_numpy())
    meta = image_meta(ds.samples, idx)
    meta["split"] = split.iloc[idx].to_numpy()
    res, job = cellprofiler_profiles(ds, idx, meta, options=options, work_dir=None, progress=False)
    job.remove()
    np.testing.assert_array_equal(profiles["CellProfiler"][0], res.features)
    assert len(res.features) == len(profiles["CellProfiler"][1])
