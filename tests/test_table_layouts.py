"""`cdcl build table` layouts: Opera Phenix names, RGB files, nucleus crops, no controls.

Small screens written here; the real screens are built in test_real_screens.py. Also runs the
Opera Phenix example of docs/own-screen.md as written.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from cli_process import cdcl
from conftest import SHARED_DATA
from PIL import Image

from cdcl.data.dataset_dir import open_dataset
from cdcl.data.phenix import parse_phenix_name, well_name, well_row_column

OWN_SCREEN = Path(__file__).resolve().parents[1] / "docs" / "own-screen.md"
PHENIX_FOV = SHARED_DATA / "cellpainting_fovs" / "pediatric_cancer_atlas_profiling" / "images"
WELLS = {"A01": "DMSO", "C12": "cmpA", "P24": "cmpB"}


def one_error_line(proc) -> str:
    """The single stderr line of a command that failed as a user error (exit 2)."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_well_names_and_phenix_names() -> None:
    assert well_row_column("A01") == (1, 1) and well_row_column("c12") == (3, 12)
    assert well_row_column("J18") == (10, 18) and well_row_column("AF48") == (32, 48)
    for row in range(1, 33):
        for col in (1, 9, 48):
            assert well_row_column(well_name(row, col)) == (row, col)
    assert parse_phenix_name("images/r16c13f05p01-ch3sk1fk1fl1.png") == {
        "well": "P13",
        "well_row": 16,
        "well_column": 13,
        "site": 5,
        "plane": 1,
        "channel_index": 3,
    }
    for bad in ("A", "13", "A00", "ABC1"):
        with pytest.raises(ValueError):
            well_row_column(bad)
    with pytest.raises(ValueError):
        parse_phenix_name("A01_s1_w1.tif")


def write_phenix_screen(root: Path, suffix: str = "tiff") -> pd.DataFrame:
    """2 plates x 3 wells, 16 x 16 uint16 planes under Phenix names; metadata.csv without names."""
    rng = np.random.default_rng(0)
    rows = []
    for plate in ("P1", "P2"):
        folder = root / "images" / plate
        folder.mkdir(parents=True)
        for well, compound in WELLS.items():
            rows.append(
                {"Metadata_Plate": plate, "Metadata_Well": well, "Metadata_Site": 1,
                 "Metadata_Compound": compound, "Metadata_Note": f"{plate}-{well}"}
            )  # fmt: skip
            r, c = well_row_column(well)
            for ch in (1, 2, 3):
                plane = rng.integers(0, 4000, (16, 16), dtype=np.uint16)
                name = folder / f"r{r:02d}c{c:02d}f01p01-ch{ch}sk1fk1fl1.{suffix}"
                if suffix == "png":
                    Image.fromarray(plane).save(name)
                else:
                    tifffile.imwrite(name, plane)
    table = pd.DataFrame(rows)
    table.to_csv(root / "metadata.csv", index=False)
    return table


def test_own_screen_phenix_example_runs_as_written(tmp_path: Path, monkeypatch) -> None:
    """The Opera Phenix command of docs/own-screen.md builds a TIFF screen from well names."""
    (block,) = re.findall(r"```shell\n(.*?)```", OWN_SCREEN.read_text(encoding="utf-8"), re.S)
    (line,) = [ln for ln in block.splitlines() if ln.startswith("cdcl ")]
    table = write_phenix_screen(tmp_path)
    monkeypatch.chdir(tmp_path)
    proc = cdcl(*shlex.split(line)[1:])
    assert proc.returncode == 0, proc.stderr
    ds = open_dataset(tmp_path / "screen_phenix")
    assert len(ds) == 6 and ds.image_size == (16, 16) and ds.info.dtype == "uint16"
    assert list(ds.samples.Metadata_Note) == list(table.Metadata_Note)
    want = tifffile.imread(tmp_path / "images/P2/r03c12f01p01-ch2sk1fk1fl1.tiff")
    np.testing.assert_array_equal(ds.read(4)[1], want)
    assert cdcl("info", "screen_phenix").returncode == 0


def test_phenix_png_names_and_a_real_phenix_tiff(tmp_path: Path) -> None:
    """PNG exports build the same way; a real LZW-compressed Phenix field is read exactly."""
    write_phenix_screen(tmp_path, "png")
    template = "images/{Metadata_Plate}/r{well_row:02d}c{well_column:02d}f{Metadata_Site:02d}p01-ch{channel_index}sk1fk1fl1.png"
    out = tmp_path / "png"
    proc = cdcl("build", "table", "--samples", tmp_path / "metadata.csv", "--channels", "a,b,c",
                "--path-template", template, "--out", out)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(
        open_dataset(out).read(5)[2],
        np.asarray(Image.open(tmp_path / "images/P2/r16c24f01p01-ch3sk1fk1fl1.png")),
    )
    if not PHENIX_FOV.exists():
        pytest.skip("shared/data/cellpainting_fovs missing")
    pd.DataFrame(
        {"Metadata_Plate": ["BR00143976"], "Metadata_Well": ["C03"], "Metadata_Site": [3],
         "Metadata_Compound": ["DMSO"]}
    ).to_csv(tmp_path / "fov.csv", index=False)  # fmt: skip
    proc = cdcl("build", "table", "--samples", tmp_path / "fov.csv", "--root", PHENIX_FOV,
                "--channels", "Mito,AGP,RNA,ER,DNA,Brightfield", "--path-template",
                template.replace("images/{Metadata_Plate}", "orig").replace(".png", ".tiff"),
                "--out", tmp_path / "fov")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    with Image.open(PHENIX_FOV / "orig" / "r03c03f03p01-ch5sk1fk1fl1.tiff") as im:
        np.testing.assert_array_equal(open_dataset(tmp_path / "fov").read(0)[4], np.asarray(im))


def test_template_and_option_errors_are_one_line(tmp_path: Path) -> None:
    write_phenix_screen(tmp_path)
    base = ["build", "table", "--samples", tmp_path / "metadata.csv", "--channels", "a,b,c"]
    for template, message in [
        ("{Metadata_Plate", "malformed"),
        ("images/{}.tif", "needs a column name"),
        ("images/{Metadata_Plate:02d}.tif", "cannot fill it for row 0"),
        ("images/{nope}_{channel}.tif", "column `nope` missing"),
    ]:
        proc = cdcl(*base, "--path-template", template, "--out", tmp_path / "x")
        assert message in one_error_line(proc), proc.stderr
    pd.DataFrame(
        {"Metadata_Plate": ["P1"], "Metadata_Well": ["well 7"], "Metadata_Compound": ["DMSO"]}
    ).to_csv(tmp_path / "bad_well.csv", index=False)
    proc = cdcl("build", "table", "--samples", tmp_path / "bad_well.csv", "--channels", "a",
                "--path-template", "r{well_row:02d}.tiff", "--out", tmp_path / "x")  # fmt: skip
    assert "'well 7' is not a well name" in one_error_line(proc)
    template = "images/{Metadata_Plate}/r{well_row:02d}c{well_column:02d}f01p01-ch{channel_index}sk1fk1fl1.tiff"
    for extra, message in [
        (["--no-controls", "--control-query", "Metadata_Compound == 'DMSO'"], "not both"),
        (["--crop-size", "8"], "need --crops-from"),
        (["--crops-from", "x.csv"], "needs --crop-size"),
        (["--rgb-channels", "a,b"], "c not among --rgb-channels"),
    ]:
        proc = cdcl(*base, "--path-template", template, *extra, "--out", tmp_path / "x")
        assert message in one_error_line(proc), proc.stderr
    assert not (tmp_path / "x").exists()


def write_rgb_screen(root: Path) -> pd.DataFrame:
    """Two plates, no controls: an 8-bit RGB PNG and a 16-bit RGB TIFF (planes last) per well."""
    rng = np.random.default_rng(1)
    rows = []
    for plate in ("P1", "P2"):
        for well, compound in (("B02", "cmpA"), ("B03", "cmpB")):
            png = rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)
            Image.fromarray(png).save(root / f"{plate}_{well}.png")
            tifffile.imwrite(root / f"{plate}_{well}.tif", png.astype(np.uint16) * 200)
            rows.append({"plate": plate, "well": well, "compound": compound})
    table = pd.DataFrame(rows)
    table.to_csv(root / "meta.csv", index=False)
    return table


@pytest.mark.parametrize("suffix", ["png", "tif"])
def test_rgb_files_without_controls(tmp_path: Path, suffix: str) -> None:
    write_rgb_screen(tmp_path)
    out = tmp_path / suffix
    args = ["build", "table", "--samples", tmp_path / "meta.csv", "--path-template",
            f"{{plate}}_{{well}}.{suffix}", "--rgb-channels", "Actin,Tubulin,DNA", "--channels",
            "DNA,Actin", "--out", out]  # fmt: skip
    assert "pass --no-controls" in one_error_line(cdcl(*args))
    proc = cdcl(*args, "--no-controls")
    assert proc.returncode == 0, proc.stderr
    assert "2 plate(s) without negative controls" in proc.stderr
    ds = open_dataset(out)
    assert (
        ds.channels == ["DNA", "Actin"]
        and ds.image_size == (12, 10)
        and not ds.samples.is_control.any()
    )
    assert ds.info.dtype == ("uint8" if suffix == "png" else "uint16")
    if suffix == "png":
        rgb = np.asarray(Image.open(tmp_path / "P2_B03.png"))
    else:
        rgb = tifffile.imread(tmp_path / "P2_B03.tif")
    np.testing.assert_array_equal(ds.read(3), rgb[..., [2, 0]].transpose(2, 0, 1))
    assert cdcl("info", out).returncode == 0
    # A grayscale file does not hold the named planes: one line naming it.
    Image.fromarray(np.zeros((12, 10), np.uint8)).save(tmp_path / "P1_B02.png")
    if suffix == "png":
        proc = cdcl(*args[:-1], tmp_path / "again", "--no-controls")
        assert "P1_B02.png: wrong channel count" in one_error_line(proc)


def write_crop_screen(root: Path) -> np.ndarray:
    """One 40 x 30 (H x W) two-channel field per well, and a nuclei CSV per field."""
    rng = np.random.default_rng(2)
    rows = []
    for well, compound in (("A01", "DMSO"), ("A02", "cmpA")):
        planes = rng.integers(0, 255, (2, 40, 30), dtype=np.uint8)
        for ch in (1, 2):
            Image.fromarray(planes[ch - 1]).save(root / f"{well}_w{ch}.png")
        # x = column, y = row; the 2nd nucleus is too close to the right edge, the 4th has no centre.
        pd.DataFrame(
            {"Nuclei_Location_Center_X": [10.4, 27.0, 5.5, None],
             "Nuclei_Location_Center_Y": [20.6, 20.0, 4.0, 3.0]}
        ).to_csv(root / f"{well}-Nuclei.csv", index=False)  # fmt: skip
        rows.append({"plate": "P1", "well": well, "site": 1, "compound": compound})
    pd.DataFrame(rows).to_csv(root / "meta.csv", index=False)
    return planes  # the last field's


def test_nucleus_crops_of_a_small_screen(tmp_path: Path) -> None:
    planes = write_crop_screen(tmp_path)
    args = ["build", "table", "--samples", tmp_path / "meta.csv", "--channels", "DNA,RNA",
            "--path-template", "{well}_w{channel_index}.png", "--crops-from", "{well}-Nuclei.csv",
            "--crop-size", "8"]  # fmt: skip
    proc = cdcl(*args, "--out", tmp_path / "crops")
    assert proc.returncode == 0, proc.stderr
    assert "4 of 8 nuclei left out" in proc.stderr
    ds = open_dataset(tmp_path / "crops")
    s = ds.samples
    assert len(s) == 4 and ds.image_size == (8, 8)
    assert list(s.Metadata_Nucleus_Index) == [0, 2, 0, 2]
    # x0 = floor(10.4 + 0.5) - 4 = 6, y0 = floor(20.6 + 0.5) - 4 = 17; x0 = 2 for 5.5 (rounds up).
    assert list(s.Metadata_Crop_X0) == [6, 2, 6, 2] and list(s.Metadata_Crop_Y0) == [17, 0, 17, 0]
    np.testing.assert_array_equal(ds.read(2), planes[:, 17:25, 6:14])
    np.testing.assert_array_equal(ds.read(3), planes[:, 0:8, 2:10])
    # A per-well cap keeps one crop per well; a missing nuclei file stops the build, or is skipped.
    proc = cdcl(*args, "--crops-per-well", "1", "--crop-seed", "3", "--out", tmp_path / "one")
    assert proc.returncode == 0, proc.stderr
    assert list(open_dataset(tmp_path / "one").samples.well) == ["A01", "A02"]
    (tmp_path / "A02-Nuclei.csv").unlink()
    proc = cdcl(*args, "--out", tmp_path / "bad")
    assert "A02-Nuclei.csv: nuclei file not found" in one_error_line(proc)
    proc = cdcl(*args, "--skip-bad", "--out", tmp_path / "skip")
    assert proc.returncode == 0 and "1 field(s) without a readable nuclei file" in proc.stderr
    assert len(open_dataset(tmp_path / "skip")) == 2
