"""`cdcl build table` with pycytominer / CellProfiler metadata: no flags, one complete error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fixtures_layouts import run_cdcl

import cdcl
from cdcl.data.table import TableOptions, resolve_options
from cdcl.errors import CdclError


def _metadata(n_plates: int = 2) -> pd.DataFrame:
    rows = [
        {"Metadata_Plate": f"P{p}", "Metadata_Well": w, "Metadata_Site": s,
         "Metadata_Compound": c, "Metadata_MoA": "x" if c != "DMSO" else "control"}
        for p in range(n_plates) for w, c in (("A01", "DMSO"), ("A02", "cmpA"), ("A03", "cmpB"))
        for s in (1, 2)
    ]  # fmt: skip
    return pd.DataFrame(rows)


def test_pycytominer_columns_are_found_without_flags() -> None:
    opt, notes = resolve_options(_metadata(), TableOptions(), "m.csv")
    assert (opt.plate_col, opt.well_col, opt.site_col) == (
        "Metadata_Plate",
        "Metadata_Well",
        "Metadata_Site",
    )
    assert opt.treatment_col == "Metadata_Compound" and opt.moa_col == "Metadata_MoA"
    assert opt.batch_col == "Metadata_Plate" and "its own batch" in notes[0]
    assert opt.control_query == "`Metadata_Compound` in ['DMSO']"
    # A batch column and pycytominer's control type are used when present.
    df = _metadata().assign(
        Metadata_Batch="B1",
        Metadata_control_type=lambda d: np.where(d.Metadata_Compound == "DMSO", "negcon", "trt"),
    )
    opt, notes = resolve_options(df, TableOptions(), "m.csv")
    assert opt.batch_col == "Metadata_Batch" and not notes
    assert opt.control_query == "`Metadata_control_type` in ['negcon']"
    # Lower-case names work too, and an explicit flag wins.
    low = _metadata().rename(columns=lambda c: c.replace("Metadata_", "").lower())
    opt, _ = resolve_options(low, TableOptions(treatment_col="moa"), "m.csv")
    assert (opt.plate_col, opt.treatment_col) == ("plate", "moa")


def test_every_missing_column_is_listed_in_one_message_with_its_flag() -> None:
    df = _metadata().drop(columns=["Metadata_Plate", "Metadata_Site", "Metadata_Compound"])
    with pytest.raises(CdclError) as e:
        resolve_options(df, TableOptions(moa_col="target"), "m.csv")
    msg = str(e.value)
    assert "\n" not in msg
    for needle in (
        "no plate column",
        "--plate-col",
        "no treatment column",
        "--treatment-col",
        "column `target` missing (given as --moa-col target)",
    ):
        assert needle in msg, msg
    # Wells with several images need a site column; a table without one is fine otherwise.
    one_site = _metadata().query("Metadata_Site == 1").drop(columns="Metadata_Site")
    assert resolve_options(one_site, TableOptions(), "m.csv")[0].site_col is None
    with pytest.raises(CdclError, match="no site column although wells hold several images"):
        resolve_options(_metadata().drop(columns="Metadata_Site"), TableOptions(), "m.csv")
    with pytest.raises(CdclError, match="no negative controls found.*--control-query"):
        resolve_options(_metadata().query("Metadata_Compound != 'DMSO'"), TableOptions(), "m")


def test_cli_lists_all_missing_columns_at_once(tmp_path: Path) -> None:
    df = _metadata().drop(columns=["Metadata_Plate", "Metadata_Compound"])
    df.to_csv(tmp_path / "m.csv", index=False)
    proc = run_cdcl(
        "build", "table", "--samples", tmp_path / "m.csv", "--channels", "DNA",
        "--path-template", "{Metadata_Well}.tif", "--out", tmp_path / "ds",
    )  # fmt: skip
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "--plate-col" in lines[0] and "--treatment-col" in lines[0]
    assert not (tmp_path / "ds").exists()


def test_api_builds_from_a_dataframe(tmp_path: Path) -> None:
    df = _metadata()
    images = np.random.default_rng(0).integers(0, 255, (len(df), 8, 8, 2), dtype=np.uint8)
    np.savez(tmp_path / "x.npz", images=images)
    data = cdcl.build_table(df, tmp_path / "ds", ["DNA", "ER"], npz=tmp_path / "x.npz")
    s = cdcl.open_dataset(data).samples
    assert list(s["plate"]) == list(df["Metadata_Plate"])
    assert list(s["site"]) == list(df["Metadata_Site"])
    assert s["is_control"].sum() == 4 and set(s["moa"]) == {"x", "control"}
    assert sorted(s["batch"].unique()) == ["P0", "P1"]
