"""Adapter for cpg0004 (LINCS Cell Painting, Way et al. 2022): `cdcl build cpg0004`.

Inputs (the layout of broadinstitute/lincs-cell-painting and the Cell Painting Gallery):

- one ``load_data.csv`` per plate: ``Metadata_Plate``, ``Metadata_Well``, ``Metadata_Site`` and,
  per channel, either ``FileName_Orig<Ch>`` + ``PathName_Orig<Ch>`` or ``URL_Orig<Ch>``. The
  channels are found by these column names, never by column position, and stored in the order
  DNA, ER, RNA, AGP, Mito (other channels, e.g. brightfield, are ignored);
- ``barcode_platemap.csv`` (``Assay_Plate_Barcode, Plate_Map_Name[, Batch_Number, Batch_Date]``)
  and the plate maps ``platemap/<Plate_Map_Name>.txt`` (``well_position, broad_sample,
  mmoles_per_liter``; DMSO wells have no ``broad_sample``);
- optionally the Drug Repurposing Hub table (``broad_sample, broad_id, pert_iname, moa``; several
  MoAs joined by ``|``), joined on ``broad_sample`` and, failing that, on the Broad ID.

Compound = the Broad ID without batch suffix (first 13 characters of ``broad_sample``, e.g.
``BRD-K25140590``), dose = ``mmoles_per_liter``, treatment = ``compound@dose``, so NSC can exclude
the same compound at any dose. Controls: DMSO. ``replicate`` numbers the plates of one plate map
1..n in (Batch_Number, barcode) order: the reference implementation's five replicate-plate folds rotate over it.
16-bit TIFF and 8-bit PNG images are kept at their bit depth.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from cdcl.data.build import BuildReport, FileFields, build_dataset, jsonable
from cdcl.data.table import format_treatment, read_table, require_columns
from cdcl.errors import CdclError

CHANNELS = ["DNA", "ER", "RNA", "AGP", "Mito"]
CONTROL = "DMSO"
BATCH_COLUMNS = ("plate", "Batch_Number", "Batch_Date")
_COLUMN = re.compile(r"^(FileName|PathName|URL)_Orig(\w+)$")


def channel_columns(df: pd.DataFrame, where: str) -> dict[str, tuple[str, ...]]:
    """For each channel, ("file", FileName col, PathName col) or ("url", URL col), by name."""
    found: dict[str, dict[str, str]] = {}
    for col in df.columns:
        m = _COLUMN.match(str(col))
        if m:
            found.setdefault(m.group(2), {})[m.group(1)] = str(col)
    out: dict[str, tuple[str, ...]] = {}
    for ch in CHANNELS:
        kinds = found.get(ch, {})
        if "FileName" in kinds:
            if "PathName" not in kinds:
                raise CdclError(
                    f"{where}: column `PathName_Orig{ch}` missing (FileName_Orig{ch} needs it)"
                )
            out[ch] = ("file", kinds["FileName"], kinds["PathName"])
        elif "URL" in kinds:
            out[ch] = ("url", kinds["URL"])
        else:
            raise CdclError(
                f"{where}: no column `FileName_Orig{ch}` or `URL_Orig{ch}`; cpg0004 needs the channels "
                f"{', '.join(CHANNELS)} (found: {', '.join(sorted(found)) or 'none'})"
            )
    return out


def _remap(path: str, remaps: list[tuple[str, str]]) -> str:
    for old, new in remaps:
        if path.startswith(old):
            return new + path[len(old) :]
    return path


def _url_to_path(url: str, remaps: list[tuple[str, str]], where: str) -> str:
    url = _remap(url, remaps)
    if url.startswith("file://"):
        return url[len("file://") :]
    if re.match(r"^[a-z][a-z0-9+.-]*://", url):
        scheme = url.split("://")[0]
        raise CdclError(
            f"{where}: URL {url} is remote ({scheme}); download the images and map the prefix, e.g. "
            f"--remap-prefix {scheme}://bucket/=/local/dir/"
        )
    return url


def load_data_paths(
    df: pd.DataFrame, csv_path: Path, remaps: list[tuple[str, str]]
) -> list[list[str]]:
    """Per row, the DNA, ER, RNA, AGP, Mito file paths (relative ones start at the csv's folder)."""
    where = str(csv_path)
    cols = channel_columns(df, where)
    base = csv_path.parent
    per_channel = []
    for ch in CHANNELS:
        spec = cols[ch]
        if spec[0] == "file":
            names, dirs = df[spec[1]].astype(str), df[spec[2]].astype(str)
            paths = [_remap(str(Path(d) / n), remaps) for d, n in zip(dirs, names)]
        else:
            paths = [_url_to_path(u, remaps, where) for u in df[spec[1]].astype(str)]
        per_channel.append([p if Path(p).is_absolute() else str(base / p) for p in paths])
    return [list(row) for row in zip(*per_channel)]


def read_platemaps(platemap_dirs: list[Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """barcode_platemap.csv rows and all plate map wells of the given folders."""
    barcodes, wells = [], []
    for d in platemap_dirs:
        f = Path(d) / "barcode_platemap.csv"
        bc = read_table(f)
        require_columns(bc, ["Assay_Plate_Barcode", "Plate_Map_Name"], str(f))
        barcodes.append(bc.assign(_platemap_dir=str(d)))
        for name in sorted(bc["Plate_Map_Name"].astype(str).unique()):
            txt = Path(d) / "platemap" / f"{name}.txt"
            if not txt.is_file():
                raise CdclError(f"{txt}: plate map not found (named in {f}); add the platemap file")
            pm = read_table(txt, sep="\t")
            require_columns(pm, ["well_position", "broad_sample", "mmoles_per_liter"], str(txt))
            wells.append(
                pm.assign(Plate_Map_Name=name)[
                    ["Plate_Map_Name", "well_position", "broad_sample", "mmoles_per_liter"]
                ]
            )
    bc = pd.concat(barcodes, ignore_index=True)
    bc["Assay_Plate_Barcode"] = bc["Assay_Plate_Barcode"].astype(str)
    dup = bc["Assay_Plate_Barcode"].duplicated()
    if dup.any():
        raise CdclError(
            f"barcode_platemap.csv: plate {bc['Assay_Plate_Barcode'][dup].iloc[0]} listed twice"
        )
    pm = pd.concat(wells, ignore_index=True)
    pm["well_position"] = pm["well_position"].astype(str).str.upper()
    return bc, pm


def read_moa(path: Path) -> pd.DataFrame:
    """The Drug Repurposing Hub annotation: broad_sample / broad_id -> pert_iname, moa."""
    moa = read_table(Path(path), sep="\t")
    require_columns(
        moa,
        ["broad_sample", "moa"],
        str(path),
        "; pass repurposing_info_external_moa_map_resolved.tsv",
    )
    if "broad_id" not in moa.columns:
        moa["broad_id"] = moa["broad_sample"].astype(str).str[:13]
    if "pert_iname" not in moa.columns:
        moa["pert_iname"] = None
    return moa


def _read_load_data(
    csvs: list[Path], remaps: list[tuple[str, str]]
) -> tuple[pd.DataFrame, list[list[str]]]:
    """Plate, well and site of every field in the load_data.csv files, and its channel paths."""
    frames, paths = [], []
    for f in csvs:
        ld = read_table(f)
        require_columns(ld, ["Metadata_Plate", "Metadata_Well", "Metadata_Site"], str(f))
        site = pd.to_numeric(ld["Metadata_Site"], errors="coerce")
        if site.isna().any():
            raise CdclError(
                f"{f}: column `Metadata_Site` is not an integer in row {int(np.flatnonzero(site.isna())[0])}"
            )
        paths += load_data_paths(ld, f, remaps)
        frames.append(
            pd.DataFrame(
                {
                    "plate": ld["Metadata_Plate"].astype(str).to_numpy(),
                    "well": ld["Metadata_Well"].astype(str).str.upper().to_numpy(),
                    "site": site.astype(np.int64).to_numpy(),
                    "_csv": str(f),
                }
            )
        )
    return pd.concat(frames, ignore_index=True), paths


def _join_platemaps(fields: pd.DataFrame, bc: pd.DataFrame, pm: pd.DataFrame) -> pd.DataFrame:
    """Attach each field's plate map (barcode_platemap.csv) and well contents (platemap .txt)."""
    s = fields.merge(
        bc, how="left", left_on="plate", right_on="Assay_Plate_Barcode", validate="many_to_one"
    )
    unknown = s["Plate_Map_Name"].isna()
    if unknown.any():
        row = s[unknown].iloc[0]
        raise CdclError(
            f"{row['_csv']}: plate {row['plate']} is not in any barcode_platemap.csv; add it or pass --platemaps"
        )
    s = s.merge(
        pm,
        how="left",
        left_on=["Plate_Map_Name", "well"],
        right_on=["Plate_Map_Name", "well_position"],
        validate="many_to_one",
    )
    unknown = s["well_position"].isna()
    if unknown.any():
        row = s[unknown].iloc[0]
        raise CdclError(
            f"{row['_csv']}: well {row['well']} of plate {row['plate']} is not in platemap {row['Plate_Map_Name']}.txt"
        )
    return s


def _canonical_samples(s: pd.DataFrame, batch_column: str) -> pd.DataFrame:
    """Canonical columns: DMSO controls, compound = 13-character Broad ID, dose, treatment."""
    bs = s["broad_sample"].where(s["broad_sample"].notna(), "").astype(str).str.strip()
    ctrl = bs.isin(["", CONTROL, "nan", "NA"]).to_numpy()
    compound = np.where(ctrl, CONTROL, bs.str[:13])
    dose = pd.to_numeric(s["mmoles_per_liter"], errors="coerce").to_numpy(np.float64)
    dose[ctrl] = 0.0
    treatment = [CONTROL if c else format_treatment(k, d) for c, k, d in zip(ctrl, compound, dose)]
    out = pd.DataFrame(
        {
            "batch": s[batch_column].astype(str).to_numpy(),
            "plate": s["plate"].to_numpy(),
            "well": s["well"].to_numpy(),
            "site": s["site"].to_numpy(),
            "treatment": treatment,
            "is_control": ctrl,
            "compound": compound,
            "dose": dose,
            "broad_sample": np.where(ctrl, None, bs),
            "plate_map": s["Plate_Map_Name"].astype(str).to_numpy(),
        }
    )
    if "Batch_Number" in s.columns:
        out["batch_number"] = s["Batch_Number"].astype(str).to_numpy()
    return out


def _number_replicates(out: pd.DataFrame) -> pd.DataFrame:
    """Replicate k of a plate map = its k-th plate in (Batch_Number, barcode) order."""
    plates = out[
        ["plate_map", "plate"] + (["batch_number"] if "batch_number" in out else [])
    ].drop_duplicates("plate")
    if "batch_number" in plates:  # numeric order: batch 10 after batch 9
        plates["_bn"] = pd.to_numeric(plates["batch_number"], errors="coerce")
    plates = plates.sort_values(
        [c for c in ("plate_map", "_bn", "batch_number", "plate") if c in plates]
    )
    plates["replicate"] = plates.groupby("plate_map").cumcount() + 1
    return out.merge(plates[["plate", "replicate"]], on="plate", how="left")


def _join_moa(out: pd.DataFrame, moa_file: Path | None) -> None:
    """MoA and compound name from the Repurposing Hub table, in place (None without one)."""
    out["moa"] = None
    out["pert_iname"] = None
    if moa_file is None:
        return
    moa = read_moa(moa_file)
    by_sample = moa.drop_duplicates("broad_sample").set_index("broad_sample")
    by_id = moa.drop_duplicates("broad_id").set_index("broad_id")
    for col in ("moa", "pert_iname"):
        exact = out["broad_sample"].map(by_sample[col])
        # Same compound, other salt/batch suffix: fall back on the 13-character Broad ID.
        out[col] = exact.where(exact.notna(), out["compound"].map(by_id[col]))
    out.loc[out["is_control"], "moa"] = CONTROL
    out.loc[out["is_control"], "pert_iname"] = CONTROL


def build_samples(
    root: Path,
    platemap_dirs: list[Path],
    moa_file: Path | None = None,
    batch_column: str = "plate",
    load_data: str = "**/load_data.csv",
    remaps: list[tuple[str, str]] | None = None,
) -> tuple[pd.DataFrame, list[list[str]]]:
    """The samples table and per-row channel paths of a cpg0004 folder."""
    root = Path(root)
    if not root.is_dir():
        raise CdclError(
            f"{root}: not a directory; --root must hold the per-plate load_data.csv files"
        )
    if batch_column not in BATCH_COLUMNS:
        raise CdclError(f"--batch-column {batch_column}: choose one of {', '.join(BATCH_COLUMNS)}")
    csvs = sorted(root.glob(load_data))
    if not csvs:
        raise CdclError(
            f"{root}: no files match {load_data}; point --root at the load_data.csv folders"
        )
    if not platemap_dirs:
        platemap_dirs = sorted({p.parent for p in root.rglob("barcode_platemap.csv")})
        if not platemap_dirs:
            raise CdclError(f"{root}: no barcode_platemap.csv found; pass --platemaps DIR")
    bc, pm = read_platemaps(platemap_dirs)
    fields, paths = _read_load_data(csvs, remaps or [])
    s = _join_platemaps(fields, bc, pm)
    if batch_column != "plate" and batch_column not in s.columns:
        raise CdclError(
            f"barcode_platemap.csv: column `{batch_column}` missing; use --batch-column plate"
        )
    out = _number_replicates(_canonical_samples(s, batch_column))
    _join_moa(out, moa_file)
    order = np.lexsort(
        (
            out["site"].to_numpy(),
            out["well"].to_numpy(),
            out["plate"].to_numpy(),
            out["batch"].to_numpy(),
        )
    )
    out = out.iloc[order].reset_index(drop=True)
    paths = [paths[i] for i in order]
    return out, paths


def build_cpg0004(
    root: Path,
    out: Path,
    *,
    platemaps: list[Path] | None = None,
    moa: Path | None = None,
    batch_column: str = "plate",
    load_data: str = "**/load_data.csv",
    remaps: list[tuple[str, str]] | None = None,
    image_size: int | None = 256,
    workers: int = 1,
    skip_bad: bool = False,
    name: str | None = None,
) -> BuildReport:
    """Build the canonical dataset from cpg0004 load_data.csv files, plate maps and MoAs."""
    samples, paths = build_samples(
        Path(root), list(platemaps or []), moa, batch_column, load_data, remaps
    )
    args = jsonable(
        {
            "root": Path(root),
            "platemaps": [Path(p) for p in platemaps or []],
            "moa": moa,
            "batch_column": batch_column,
            "load_data": load_data,
            "remaps": [f"{a}={b}" for a, b in remaps or []],
            "image_size": image_size,
        }
    )
    return build_dataset(
        Path(out),
        samples,
        FileFields(paths),
        name=name or "cpg0004",
        source_name="cpg0004",
        channels=list(CHANNELS),
        image_size=image_size,
        build_args=args,
        workers=workers,
        skip_bad=skip_bad,
    )
