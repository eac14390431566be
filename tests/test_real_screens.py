"""docs/datasets.md's commands for two real screens, run as written through the command line.

LINCS Cell Painting fields are built from Opera Phenix file names and a table without file
names, then cut into single-cell crops that must equal the shared ``cells.npz`` bit for bit;
BBBC021 MoA fields are built from RGB files with no negative controls. `cdcl info` must accept
every directory built.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cli_process import cdcl
from conftest import SHARED_DATA
from PIL import Image

from cdcl.data.crops import NUCLEUS_INDEX, sample_per_well
from cdcl.data.dataset_dir import open_dataset
from cdcl.data.phenix import parse_phenix_name
from cdcl.data.splits import assign_split
from cdcl.errors import CdclError

DOC = Path(__file__).resolve().parents[1] / "docs" / "datasets.md"
LINCS = SHARED_DATA / "lincs_a549_cellpainting"
BBBC021 = SHARED_DATA / "bbbc021_moa_fovs"
LINCS_CHANNELS = ["DNA", "RNA", "ER", "AGP", "Mito"]
needs_lincs = pytest.mark.skipif(
    not LINCS.exists(), reason="shared/data/lincs_a549_cellpainting missing"
)
needs_bbbc021 = pytest.mark.skipif(
    not BBBC021.exists(), reason="shared/data/bbbc021_moa_fovs missing"
)


def expand(arg: str, env: dict[str, str]) -> str:
    """``$VAR`` in an argument replaced by its value."""
    return re.sub(r"\$(\w+)", lambda m: env[m.group(1)], arg)


def doc_blocks(folder: str) -> list[list[list[str]]]:
    """The bash blocks of docs/datasets.md that use ``folder``: their cdcl argument lists.

    Continuations are joined, ``VAR=value`` lines expanded, and ``../shared/data`` (the path
    from the project root) becomes the shared data folder the tests read.
    """
    blocks = []
    for text in re.findall(r"```bash\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S):
        if folder not in text:
            continue
        env: dict[str, str] = {}
        commands = []
        for line in re.sub(r"\\\n", " ", text).splitlines():
            m = re.fullmatch(r"([A-Za-z_]\w*)=(\S+)", line.strip())
            if m:
                env[m.group(1)] = m.group(2).replace("../shared/data", str(SHARED_DATA))
            elif line.startswith("cdcl "):
                argv = shlex.split(line)[1:]
                commands.append([expand(a, env) for a in argv])
        blocks.append(commands)
    return blocks


def run_block(commands: list[list[str]], cwd: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Run a block's commands in ``cwd``; the stderr of each, keyed by its subcommand."""
    monkeypatch.chdir(cwd)
    stderr = {}
    for args in commands:
        proc = cdcl(*args)
        assert proc.returncode == 0, f"cdcl {shlex.join(args)}\n{proc.stderr}"
        stderr[args[0]] = proc.stderr
    assert [a[0] for a in commands] == ["build", "info"]  # every build is checked by `cdcl info`
    return stderr


@needs_lincs
def test_lincs_fields_build_from_phenix_names(tmp_path: Path, monkeypatch) -> None:
    """24 fields x 5 channels from fields_metadata.csv and the folder, every Phenix file used."""
    fields, _ = doc_blocks("lincs_a549_cellpainting")[:2]
    run_block(fields, tmp_path, monkeypatch)
    ds = open_dataset(tmp_path / "lincs_fields")
    s = ds.samples
    assert len(s) == 24 and ds.channels == LINCS_CHANNELS
    assert ds.image_size == (1080, 1080) and ds.info.dtype == "uint8"
    assert set(s.batch) == {"batch1", "batch3"}
    assert set(s.loc[s.is_control, "well"]) == {"A01", "J18"}
    assert set(s.loc[~s.is_control, "treatment"]) == {"orantinib@10.0", "lonafarnib@10.0"}
    # Every Metadata_* column of the table travels with its image.
    table = pd.read_csv(LINCS / "fields_metadata.csv")

    def plain(frame: pd.DataFrame) -> pd.DataFrame:
        return frame.astype(object).where(frame.notna(), None).reset_index(drop=True)

    pd.testing.assert_frame_equal(plain(s[table.columns]), plain(table))
    # The template names exactly the Phenix files of the folder: parse them back.
    files = {}
    for path in sorted((LINCS / "fields").glob("*/*.png")):
        f = parse_phenix_name(path.name)
        files[(path.parent.name, f["well"], f["site"], f["channel_index"])] = path
    built = {
        (r.plate, r.well, r.site, k + 1) for r in s.itertuples() for k in range(len(LINCS_CHANNELS))
    }
    assert built == set(files) and len(built) == 120
    for i in (0, 13, 23):
        r = s.iloc[i]
        for k in range(5):
            png = np.asarray(Image.open(files[(r.plate, r.well, r.site, k + 1)]))
            np.testing.assert_array_equal(ds.read(i)[k], png)


@pytest.mark.slow
@needs_lincs
def test_lincs_crops_equal_cells_npz(tmp_path: Path, monkeypatch) -> None:
    """Crops cut around the Nuclei.csv centres equal the 151 crops of cells.npz from fields/."""
    _, crops = doc_blocks("lincs_a549_cellpainting")[:2]
    stderr = run_block(crops, tmp_path, monkeypatch)
    assert "549 of 4319 nuclei left out" in stderr["build"]
    ds = open_dataset(tmp_path / "lincs_cells")
    s = ds.samples
    assert len(s) == 3770 and ds.image_size == (96, 96) and ds.channels == LINCS_CHANNELS
    # The index of all nuclei says which are eligible in the 24 fields: the same ones.
    index = pd.read_csv(LINCS / "all_nuclei_index.csv.gz")
    keys = ["Metadata_Plate", "Metadata_Well", "Metadata_Site"]
    here = index.merge(pd.read_csv(LINCS / "fields_metadata.csv")[keys])
    eligible = here[here.eligible]
    assert len(here) == 4319 and len(eligible) == 3770
    got = s[[*keys, NUCLEUS_INDEX, "Metadata_Crop_X0", "Metadata_Crop_Y0"]].to_numpy().tolist()
    want = eligible[[*keys, "nucleus_index_in_file", "crop_x0", "crop_y0"]].to_numpy().tolist()
    assert sorted(map(tuple, got)) == sorted(map(tuple, want))
    # Bit for bit against cells.npz where both have the nucleus.
    cells = pd.read_csv(LINCS / "cells_metadata.csv")
    images = np.load(LINCS / "cells.npz")["images"]
    both = cells.merge(
        s[[*keys, NUCLEUS_INDEX, "image", "Metadata_Nucleus_Center_X"]],
        left_on=[*keys, "nucleus_index_in_file"],
        right_on=[*keys, NUCLEUS_INDEX],
    )
    assert len(both) == 151
    assert np.allclose(both.center_x, both.Metadata_Nucleus_Center_X)
    for r in both.itertuples():
        np.testing.assert_array_equal(ds.read(int(r.image)), np.moveaxis(images[int(r.row)], -1, 0))


@needs_lincs
def test_per_well_cap_draws_like_cells_npz() -> None:
    """--crops-per-well 64 --crop-seed 20161207 on all 180 source fields picks cells.npz's nuclei."""
    index = pd.read_csv(LINCS / "all_nuclei_index.csv.gz")
    eligible = index[index.eligible].rename(
        columns={
            "Metadata_Plate": "plate",
            "Metadata_Well": "well",
            "Metadata_Site": "site",
            "nucleus_index_in_file": NUCLEUS_INDEX,
        }
    )
    eligible = eligible.sample(frac=1.0, random_state=0).reset_index(
        drop=True
    )  # order is irrelevant
    eligible["_field"] = eligible.groupby(["plate", "well", "site"]).ngroup()
    keep = sample_per_well(eligible, 64, 20161207)
    assert keep.sum() == 1280
    assert (keep == (eligible.sample_rank.to_numpy() < 64)).all()


@needs_bbbc021
def test_bbbc021_fields_build_from_rgb_files(tmp_path: Path, monkeypatch) -> None:
    """660 RGB fields, channels reordered, week as batch, no controls: warnings, not failure."""
    block = doc_blocks("bbbc021_moa_fovs")[0]
    stderr = run_block(block, tmp_path, monkeypatch)
    assert "30 plate(s) without negative controls" in stderr["build"]
    ds = open_dataset(tmp_path / "bbbc021_moa")
    s = ds.samples
    meta = pd.read_csv(BBBC021 / "metadata.csv")
    assert len(s) == len(meta) == 660 and ds.channels == ["DNA", "Actin", "Tubulin"]
    assert ds.image_size == (256, 256) and ds.info.dtype == "uint8"
    assert s.batch.nunique() == 7 and (s.batch == meta.Metadata_Week).all()
    assert not s.is_control.any() and s.treatment.nunique() == 55 and s.moa.nunique() == 6
    assert (s.Metadata_FileName == meta.Metadata_FileName).all()
    for i in (0, 331, 659):
        rgb = np.asarray(Image.open(BBBC021 / meta.Metadata_FileName[i]))
        np.testing.assert_array_equal(ds.read(i), rgb[..., [2, 0, 1]].transpose(2, 0, 1))


def _fold_block(folder: str) -> list[list[str]]:
    """The docs' build block for ``folder`` that defines folds by a column."""
    (block,) = [b for b in doc_blocks(folder) if "--fold-col" in b[0]]
    return block


def _held_out_per_fold(ds: object, column: str) -> list[set[str]]:
    out = []
    for k in range(1, 10):
        try:
            split = assign_split(ds.samples, ds.info.source, k)
        except CdclError:
            break
        out.append(set(ds.samples.loc[(split == "test").to_numpy(), column].astype(str)))
    return out


@needs_lincs
def test_lincs_leave_one_plate_out(tmp_path: Path, monkeypatch) -> None:
    """All five plates from cells.npz: five folds, each plate held out once, batch1's first."""
    run_block(_fold_block("lincs_a549_cellpainting"), tmp_path, monkeypatch)
    ds = open_dataset(tmp_path / "lincs_plates")
    assert len(ds) == 1280
    held = _held_out_per_fold(ds, "plate")
    assert held == [{p} for p in sorted(ds.samples.plate.astype(str).unique())]
    assert held[0] == {"SQ00015198"}
    assert set(ds.samples.Metadata_Batch) == {"batch1", "batch3"}


@needs_bbbc021
def test_bbbc021_leave_one_replicate_out(tmp_path: Path, monkeypatch) -> None:
    """Fold k holds out replicate plate k of every week; every compound is also trained on."""
    run_block(_fold_block("bbbc021_moa_fovs"), tmp_path, monkeypatch)
    ds = open_dataset(tmp_path / "bbbc021_replicates")
    s = ds.samples
    assert s.batch.nunique() == 30  # the plate is the batch
    for k, reps in enumerate(_held_out_per_fold(ds, "Metadata_Replicate"), 1):
        assert reps == {str(k)}
        split = assign_split(s, ds.info.source, k)
        test = (split == "test").to_numpy()
        assert s.loc[test, "plate"].nunique() == 10
        assert set(s.loc[test, "treatment"]) <= set(s.loc[~test, "treatment"])
    assert k == 3
