"""Writers of tiny screens in the exact published layouts (RxRx1, cpg0004) for tests and benchmarks.

Column names, file names and bit depths are the real ones; images are small (RxRx1's are
512 x 512 in the release, ours default to 64 x 64) to keep the tests fast. The cpg0004 writer
reuses the real LINCS plate maps and MoA table and crops the real Phenix-named 16-bit TIFFs of
``shared/data/cellpainting_fovs`` without copying any of them into the package.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CPG = SHARED_DATA / "cpg0004_lincs_metadata"
BATCH1 = CPG / "platemaps" / "2016_04_01_a549_48hr_batch1"
MOA_TABLE = CPG / "repurposing_info_external_moa_map_resolved.tsv"
PHENIX_FOV = (
    SHARED_DATA / "cellpainting_fovs" / "pediatric_cancer_atlas_profiling" / "images" / "orig"
)
BBBC021 = SHARED_DATA / "bbbc021_week4_singlecell"

RXRX1_COLUMNS = [
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
# Phenix channel number of each Cell Painting stain (JUMP/LINCS convention: ch2 AGP, ch3 RNA, ch5 DNA).
PHENIX_CHANNEL = {"DNA": 5, "ER": 4, "RNA": 3, "AGP": 2, "Mito": 1}


def rxrx1_channel_level(c: int) -> int:
    """Mean 8-bit level written into RxRx1 channel w<c> (1-based), so channel order is testable."""
    return 20 + 30 * c


def write_rxrx1(
    root: Path,
    experiments: tuple[str, ...] = tuple(f"HUVEC-{i:02d}" for i in range(1, 7)) + ("RPE-01",),
    plates: tuple[int, ...] = (1,),
    n_sirnas: int = 3,
    sites: int = 2,
    size: int = 64,
    seed: int = 0,
) -> pd.DataFrame:
    """RxRx1 layout: metadata.csv + images/<experiment>/Plate<p>/<well>_s<site>_w<1..6>.png (8-bit).

    Every plate holds ``n_sirnas`` treatment siRNAs, one positive control and one untreated
    negative control (sirna ``EMPTY``, sirna_id 1138, as in the release).
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    rows = []
    wells = [f"{r}{c:02d}" for r in "BCDEFGHIJKLMNO" for c in range(2, 24)]
    layout = [(f"s{10000 + k}", k, "treatment") for k in range(n_sirnas)]
    layout += [("s90001", 1108, "positive_control"), ("EMPTY", 1138, "negative_control")]
    for e_i, exp in enumerate(experiments):
        for plate in plates:
            for w_i, (sirna, sid, wtype) in enumerate(layout):
                well = wells[
                    (w_i + e_i) % len(wells)
                ]  # wells shift per experiment, as in the release
                for site in range(1, sites + 1):
                    rows.append(
                        {
                            "site_id": f"{exp}_{plate}_{well}_{site}",
                            "well_id": f"{exp}_{plate}_{well}",
                            "cell_type": exp.split("-")[0],
                            "dataset": "train",
                            "experiment": exp,
                            "plate": plate,
                            "well": well,
                            "site": site,
                            "well_type": wtype,
                            "sirna": sirna,
                            "sirna_id": sid,
                        }
                    )
                    d = root / "images" / exp / f"Plate{plate}"
                    d.mkdir(parents=True, exist_ok=True)
                    for c in range(1, 7):
                        img = rng.normal(rxrx1_channel_level(c), 8, size=(size, size))
                        img = np.clip(img, 0, 255).astype(np.uint8)
                        Image.fromarray(img).save(d / f"{well}_s{site}_w{c}.png")
    meta = pd.DataFrame(rows, columns=RXRX1_COLUMNS)
    meta.to_csv(root / "metadata.csv", index=False)
    return meta


def rxrx1_png(root: Path, meta_row: pd.Series, channel: int) -> Path:
    """The file of one channel (1-based) of one metadata row."""
    r = meta_row
    return (
        Path(root)
        / "images"
        / r.experiment
        / f"Plate{r.plate}"
        / f"{r.well}_s{r.site}_w{channel}.png"
    )


def _phenix_name(well: str, site: int, ch: int) -> str:
    row = ord(well[0].upper()) - ord("A") + 1
    return f"r{row:02d}c{int(well[1:]):02d}f{site:02d}p01-ch{ch}sk1fk1fl1.tiff"


def real_fov_planes() -> dict[str, np.ndarray]:
    """The real 1080 x 1080 uint16 planes of one Phenix field, keyed by Cell Painting stain."""
    # The files are LZW-compressed; PIL decodes that without tifffile's optional imagecodecs.
    out = {}
    for ch, k in PHENIX_CHANNEL.items():
        with Image.open(PHENIX_FOV / f"r03c03f03p01-ch{k}sk1fk1fl1.tiff") as im:
            out[ch] = np.asarray(im).astype(np.uint16)
    return out


def choose_cpg0004_wells(n_maps: int = 2, n_dmso: int = 2, n_compounds: int = 3) -> pd.DataFrame:
    """Wells from the real plate maps: DMSO wells and compound wells that have an MoA."""
    bc = pd.read_csv(BATCH1 / "barcode_platemap.csv")
    moa = pd.read_csv(MOA_TABLE, sep="\t")
    maps = sorted(bc["Plate_Map_Name"].unique())[:n_maps]
    chosen = []
    for m in maps:
        pm = pd.read_csv(BATCH1 / "platemap" / f"{m}.txt", sep="\t")
        dmso = pm[pm["broad_sample"].isna()].head(n_dmso)
        comp = (
            pm[pm["broad_sample"].isin(moa["broad_sample"])]
            .drop_duplicates("broad_sample")
            .head(n_compounds)
        )
        chosen.append(pd.concat([dmso, comp]))
    return pd.concat(chosen, ignore_index=True)


def write_cpg0004(
    root: Path,
    n_maps: int = 2,
    sites: int = 1,
    size: int = 48,
    style: str = "filename",
    fmt: str = "tiff",
    replicates: int = 5,
) -> pd.DataFrame:
    """cpg0004 layout: load_data_csv/<batch>/<plate>/load_data.csv + Phenix-named images.

    Plates are the real replicate plates (one per Batch_Number) of the first ``n_maps`` plate
    maps of batch 2016_04_01_a549_48hr_batch1; each plate gets 2 DMSO wells and 3 compound wells
    of its real plate map. Pixels are crops of the real 16-bit Phenix field (``fmt="png"``: the
    same crops shifted to 8 bits). ``style`` is ``filename`` (FileName_/PathName_Orig<Ch>) or
    ``url`` (URL_Orig<Ch>, file:// URLs). Columns are written in a shuffled channel order so
    that an adapter reading channels by position fails. Returns one row per field with the
    expected metadata and the crop offsets.
    """
    root = Path(root)
    planes = real_fov_planes()
    bc = pd.read_csv(BATCH1 / "barcode_platemap.csv")
    wells = choose_cpg0004_wells(n_maps)
    order = ["Mito", "AGP", "DNA", "RNA", "ER"]  # deliberately not DNA, ER, RNA, AGP, Mito
    expected = []
    for m, m_wells in wells.groupby("plate_map_name", sort=True):
        plates = (
            bc[bc["Plate_Map_Name"] == m]
            .sort_values(["Batch_Number", "Assay_Plate_Barcode"])
            .head(replicates)
        )
        for rep, (_, plate_row) in enumerate(plates.iterrows(), start=1):
            plate = plate_row["Assay_Plate_Barcode"]
            img_dir = root / "images" / f"{plate}__2016-01-01T00_00_00-Measurement1" / "Images"
            img_dir.mkdir(parents=True, exist_ok=True)
            rows = []
            for w_i, (_, w) in enumerate(m_wells.iterrows()):
                for site in range(1, sites + 1):
                    y = (37 * (w_i + 3 * rep) + 11 * site) % (1080 - size)
                    x = (53 * (w_i + 5 * rep) + 17 * site) % (1080 - size)
                    rec: dict[str, object] = {
                        "Metadata_Plate": plate,
                        "Metadata_Well": w["well_position"],
                        "Metadata_Site": site,
                    }
                    for ch in order:
                        crop = planes[ch][y : y + size, x : x + size]
                        name = _phenix_name(w["well_position"], site, PHENIX_CHANNEL[ch])
                        if fmt == "png":
                            name = name.replace(".tiff", ".png")
                            Image.fromarray((crop >> 8).astype(np.uint8)).save(img_dir / name)
                        else:
                            import tifffile

                            tifffile.imwrite(img_dir / name, crop, compression="zlib")
                        if style == "url":
                            rec[f"URL_Orig{ch}"] = (img_dir / name).as_uri()
                        else:
                            rec[f"FileName_Orig{ch}"] = name
                            rec[f"PathName_Orig{ch}"] = str(img_dir)
                    rows.append(rec)
                    bs = w["broad_sample"]
                    expected.append(
                        {
                            "plate": plate,
                            "well": w["well_position"],
                            "site": site,
                            "plate_map": m,
                            "replicate": rep,
                            "batch_number": int(plate_row["Batch_Number"]),
                            "broad_sample": None if pd.isna(bs) else bs,
                            "dose": w["mmoles_per_liter"],
                            "y": y,
                            "x": x,
                        }
                    )
            ld_dir = root / "load_data_csv" / "2016_04_01_a549_48hr_batch1" / plate
            ld_dir.mkdir(parents=True, exist_ok=True)
            pd.DataFrame(rows).to_csv(ld_dir / "load_data.csv", index=False)
    return pd.DataFrame(expected)


def run_cdcl(*args: object, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real `cdcl` command line in a subprocess (CDCL_CLI overrides the launcher)."""
    launcher = os.environ.get("CDCL_CLI")
    cmd = launcher.split() if launcher else [sys.executable, "-m", "cdcl"]
    return subprocess.run(
        [*cmd, *map(str, args)], capture_output=True, text=True, timeout=timeout, check=False
    )


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """Non-empty stderr lines of a finished command."""
    return [ln for ln in proc.stderr.splitlines() if ln.strip()]
