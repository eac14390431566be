"""Adapter for RxRx1 (Recursion; Sypetkowski et al. 2023): `cdcl build rxrx1`.

Layout of the official release::

    ROOT/metadata.csv   site_id, well_id, cell_type, dataset, experiment, plate, well, site,
                        well_type, sirna, sirna_id
    ROOT/images/<experiment>/Plate<plate>/<well>_s<site>_w<1..6>.png   (512 x 512, 8-bit)

Paths are built from the metadata fields, never searched for. Channels w1..w6 are Hoechst,
ConA, Phalloidin, Syto14, MitoTracker, WGA. Batch = experiment (the reference implementation's domain); plate =
``<experiment>_<plate>`` because plate numbers 1-4 repeat in every experiment; treatment =
``sirna``; negative controls are ``well_type == negative_control`` (untreated wells); positive
controls stay treatments (their own siRNAs) and are flagged in the extra ``well_type`` column,
which the reference implementation's subset strategies use.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cdcl.data.build import BuildReport, FileFields, build_dataset, jsonable
from cdcl.data.table import read_table, require_columns
from cdcl.errors import CdclError

CHANNELS = ["Hoechst", "ConA", "Phalloidin", "Syto14", "MitoTracker", "WGA"]
METADATA_COLUMNS = [
    "site_id",
    "well_id",
    "cell_type",
    "dataset",
    "experiment",
    "plate",
    "well",
    "site",
    "well_type",
    "sirna",
    "sirna_id",
]
CELL_TYPES = ("HUVEC", "RPE", "HEPG2", "U2OS")
WELL_TYPES = ("treatment", "positive_control", "negative_control")


def image_paths(root: Path, meta: pd.DataFrame) -> list[list[str]]:
    """The six channel files of every site, built from experiment, plate, well and site."""
    root = Path(root)
    out = []
    for exp, plate, well, site in zip(
        meta["experiment"], meta["plate"], meta["well"], meta["site"]
    ):
        stem = root / "images" / str(exp) / f"Plate{int(plate)}" / f"{well}_s{int(site)}"
        out.append([f"{stem}_w{c}.png" for c in range(1, len(CHANNELS) + 1)])
    return out


def read_metadata(root: Path, cell_type: str = "HUVEC") -> pd.DataFrame:
    """metadata.csv checked and filtered to one cell type (or ``all``)."""
    path = Path(root) / "metadata.csv"
    if not Path(root).is_dir():
        raise CdclError(
            f"{root}: not a directory; --root must be the RxRx1 folder with metadata.csv"
        )
    meta = read_table(path)
    require_columns(
        meta, METADATA_COLUMNS, str(path), "; this is not the RxRx1 metadata.csv layout"
    )
    for col in ("plate", "site", "sirna_id"):
        bad = pd.to_numeric(meta[col], errors="coerce").isna().to_numpy()
        if bad.any():
            raise CdclError(
                f"{path}: column `{col}` is not an integer in row {int(np.flatnonzero(bad)[0])}"
            )
    unknown = sorted(set(meta["well_type"].astype(str)) - set(WELL_TYPES))
    if unknown:
        raise CdclError(
            f"{path}: column `well_type` has values {unknown}; expected {', '.join(WELL_TYPES)}"
        )
    if cell_type.lower() != "all":
        if cell_type.upper() not in CELL_TYPES:
            raise CdclError(
                f"--cell-type {cell_type}: choose one of {', '.join(CELL_TYPES)} or all"
            )
        meta = meta[meta["cell_type"].astype(str).str.upper() == cell_type.upper()]
        if meta.empty:
            raise CdclError(f"{path}: no rows with cell_type {cell_type}; check --cell-type")
    # Deterministic order: experiment, plate, well, site (the release is not guaranteed sorted).
    meta = meta.sort_values(["experiment", "plate", "well", "site"], kind="stable")
    return meta.reset_index(drop=True)


def samples_from_metadata(meta: pd.DataFrame) -> pd.DataFrame:
    """The dataset schema's columns from RxRx1 metadata rows."""
    plate = meta["experiment"].astype(str) + "_" + meta["plate"].astype(int).astype(str)
    return pd.DataFrame(
        {
            "batch": meta["experiment"].astype(str).to_numpy(),
            "plate": plate.to_numpy(),
            "well": meta["well"].astype(str).to_numpy(),
            "site": meta["site"].astype(np.int64).to_numpy(),
            "treatment": meta["sirna"].astype(str).to_numpy(),
            "is_control": (meta["well_type"].astype(str) == "negative_control").to_numpy(),
            "compound": meta["sirna"].astype(str).to_numpy(),
            "cell_type": meta["cell_type"].astype(str).to_numpy(),
            "well_type": meta["well_type"].astype(str).to_numpy(),
            "sirna_id": meta["sirna_id"].astype(np.int64).to_numpy(),
            "dataset": meta["dataset"].astype(str).to_numpy(),
            "site_id": meta["site_id"].astype(str).to_numpy(),
        }
    )


def build_rxrx1(
    root: Path,
    out: Path,
    *,
    cell_type: str = "HUVEC",
    image_size: int | None = 256,
    workers: int = 1,
    skip_bad: bool = False,
    name: str | None = None,
) -> BuildReport:
    """Build the canonical dataset from an RxRx1 release folder."""
    meta = read_metadata(Path(root), cell_type)
    samples = samples_from_metadata(meta)
    fields = FileFields(image_paths(Path(root), meta))
    args = jsonable({"root": Path(root), "cell_type": cell_type, "image_size": image_size})
    return build_dataset(
        Path(out),
        samples,
        fields,
        name=name or f"rxrx1-{cell_type.lower()}",
        source_name="rxrx1",
        channels=list(CHANNELS),
        image_size=image_size,
        build_args=args,
        workers=workers,
        skip_bad=skip_bad,
    )
