"""`cdcl build rxrx1|cpg0004|table`: turn a published layout or any table into a dataset dir."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "Build a dataset directory from RxRx1, cpg0004 (LINCS Cell Painting) or any metadata table."


def _common(p: argparse.ArgumentParser, image_size: int | None) -> None:
    p.add_argument("--out", type=Path, required=True, help="dataset directory to write")
    size_help = "resize images to N x N (anti-aliased)" + (
        f"; default {image_size}" if image_size else "; default: keep the native size"
    )
    p.add_argument("--image-size", type=int, default=image_size, metavar="N", help=size_help)
    p.add_argument(
        "--workers", type=int, default=1, metavar="N", help="reader processes (default 1)"
    )
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="drop images with missing/unreadable files and list them in skipped.csv instead of failing",
    )
    p.add_argument("--name", default=None, help="dataset name recorded in dataset.json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Subcommands rxrx1, cpg0004 and table."""
    sub = parser.add_subparsers(dest="adapter", required=True, metavar="SOURCE")

    p = sub.add_parser("rxrx1", help="RxRx1: metadata.csv + images/<experiment>/Plate<n>/*.png")
    p.add_argument(
        "--root", type=Path, required=True, help="RxRx1 folder holding metadata.csv and images/"
    )
    p.add_argument(
        "--cell-type",
        default="HUVEC",
        choices=["HUVEC", "RPE", "HEPG2", "U2OS", "all"],
        help="cell type to keep (default HUVEC, as in the paper)",
    )
    _common(p, 256)

    p = sub.add_parser("cpg0004", help="cpg0004 / LINCS Cell Painting: load_data.csv + plate maps")
    p.add_argument(
        "--root", type=Path, required=True, help="folder with the per-plate load_data.csv files"
    )
    p.add_argument(
        "--load-data",
        default="**/load_data.csv",
        metavar="GLOB",
        help="load_data files under --root (default **/load_data.csv)",
    )
    p.add_argument(
        "--platemaps",
        type=Path,
        action="append",
        default=None,
        metavar="DIR",
        help="folder with barcode_platemap.csv and platemap/*.txt (repeatable; default: found under --root)",
    )
    p.add_argument(
        "--moa",
        type=Path,
        default=None,
        help="repurposing_info_external_moa_map_resolved.tsv (MoA per broad_sample)",
    )
    p.add_argument(
        "--batch-column",
        default="plate",
        choices=["plate", "Batch_Number", "Batch_Date"],
        help="what a batch is (default plate, as in the paper)",
    )
    p.add_argument(
        "--remap-prefix",
        action="append",
        default=[],
        metavar="OLD=NEW",
        help="rewrite image paths/URLs starting with OLD to start with NEW (repeatable)",
    )
    _common(p, 256)

    p = sub.add_parser("table", help="any screen: a CSV/Parquet table with one row per image")
    p.add_argument(
        "--samples", type=Path, required=True, help="CSV, TSV or Parquet table, one row per image"
    )
    p.add_argument(
        "--channels",
        required=True,
        help="channel names in order, comma-separated (e.g. DNA,ER,RNA)",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--path-template",
        help="one file per channel, e.g. 'images/{plate}/{well}_s{site}_w{channel_index}.png' "
        "({column}, {channel}, {channel_index} = 1-based; {well_row} and {well_column} = the "
        "well's 1-based row and column, for Opera Phenix names such as "
        "'r{well_row:02d}c{well_column:02d}f{Metadata_Site:02d}p01-ch{channel_index}sk1fk1fl1.tiff')",
    )
    src.add_argument(
        "--npz", type=Path, help="one array file (.npz/.npy) holding all images in table order"
    )
    p.add_argument(
        "--npz-key", default=None, help="array name inside the .npz (default: its only array)"
    )
    p.add_argument(
        "--channel-axis",
        type=int,
        default=-1,
        help="axis of the channels in the array (default -1)",
    )
    p.add_argument(
        "--rgb-channels",
        default=None,
        metavar="NAMES",
        help="each --path-template file is one RGB image holding these channels as its red, "
        "green, blue planes (e.g. Actin,Tubulin,DNA); --channels picks and orders them",
    )
    p.add_argument(
        "--crops-from",
        default=None,
        metavar="TEMPLATE",
        help="nuclei CSV of each field, e.g. 'fields/{Metadata_Plate}/{Metadata_Well}-"
        "{Metadata_Site}-Nuclei.csv': store one crop per nucleus centre instead of the field",
    )
    p.add_argument(
        "--crop-size", type=int, default=None, metavar="N", help="side of the crops in pixels"
    )
    p.add_argument(
        "--crops-per-well",
        type=int,
        default=None,
        metavar="N",
        help="keep at most N crops per well, drawn with --crop-seed (default: all)",
    )
    p.add_argument(
        "--crop-seed", type=int, default=0, metavar="S", help="seed of --crops-per-well (default 0)"
    )
    p.add_argument(
        "--crop-columns",
        default=None,
        metavar="X,Y",
        help="centre columns of the nuclei files (default "
        "Nuclei_Location_Center_X,Nuclei_Location_Center_Y; X = column, Y = row)",
    )
    p.add_argument(
        "--root",
        type=Path,
        default=None,
        help="base of relative paths (default: the table's folder)",
    )
    p.add_argument(
        "--batch-col",
        default=None,
        help="column naming the batch (default Metadata_Batch or batch; none: each plate is a batch)",
    )
    p.add_argument(
        "--plate-col",
        default=None,
        help="column naming the plate (default Metadata_Plate or plate)",
    )
    p.add_argument(
        "--well-col", default=None, help="column naming the well (default Metadata_Well or well)"
    )
    p.add_argument(
        "--site-col",
        default=None,
        help="column with the site number (default Metadata_Site or site; '' for none)",
    )
    p.add_argument(
        "--treatment-col",
        default=None,
        help="column naming the treatment (default Metadata_Treatment, treatment, "
        "Metadata_Compound or compound)",
    )
    p.add_argument(
        "--dose-col",
        default=None,
        help="dose column; treatment becomes <compound>@<dose> (default Metadata_Dose or dose, "
        "unless a treatment column exists)",
    )
    p.add_argument(
        "--compound-col",
        default=None,
        help="compound column for NSC (default Metadata_Compound or compound, else the treatment)",
    )
    p.add_argument(
        "--moa-col", default=None, help="mechanism-of-action column (default Metadata_MoA)"
    )
    p.add_argument(
        "--cell-type-col", default=None, help="cell type column (default Metadata_Cell_Type)"
    )
    p.add_argument(
        "--control-query",
        default=None,
        help="condition selecting negative controls, e.g. 'compound == \"DMSO\"' (column "
        "comparisons ==, !=, <, >, <=, >=, in [...], joined with &, |, ~; nothing else; default: "
        "Metadata_control_type == negcon, else treatments named DMSO)",
    )
    p.add_argument(
        "--no-controls",
        action="store_true",
        help="the screen has no negative controls: plate statistics use all images of a plate "
        "(a warning, not an error)",
    )
    p.add_argument(
        "--control-treatment",
        default=None,
        help="treatment label of controls (default: their compound)",
    )
    p.add_argument(
        "--split-col",
        default=None,
        help="column with the screen's own train/val/test assignment (kept as `split`)",
    )
    p.add_argument(
        "--fold-col",
        default=None,
        help="column whose values are the held-out folds: fold k (--split k, --folds) holds "
        "out the k-th sorted value, e.g. Metadata_Plate for leave-one-plate-out",
    )
    _common(p, None)


def run(args: argparse.Namespace) -> int:
    """Build through the adapter's verb of `cdcl.api` (which holds the output's lock and prints
    the build's warnings and summary)."""
    from cdcl import api

    common = dict(
        image_size=args.image_size, workers=args.workers, skip_bad=args.skip_bad, name=args.name
    )
    if args.adapter == "rxrx1":
        api.build_rxrx1(args.root, args.out, cell_type=args.cell_type, **common)
    elif args.adapter == "cpg0004":
        api.build_cpg0004(
            args.root,
            args.out,
            load_data=args.load_data,
            platemaps=args.platemaps,
            moa=args.moa,
            batch_column=args.batch_column,
            remap_prefix=args.remap_prefix,
            **common,
        )
    else:
        api.build_table(
            args.samples,
            args.out,
            args.channels,
            path_template=args.path_template,
            npz=args.npz,
            npz_key=args.npz_key,
            channel_axis=args.channel_axis,
            root=args.root,
            control_query=args.control_query,
            batch_col=args.batch_col,
            plate_col=args.plate_col,
            well_col=args.well_col,
            site_col=args.site_col,
            treatment_col=args.treatment_col,
            dose_col=args.dose_col,
            compound_col=args.compound_col,
            moa_col=args.moa_col,
            cell_type_col=args.cell_type_col,
            control_treatment=args.control_treatment,
            split_col=args.split_col,
            fold_col=args.fold_col,
            no_controls=args.no_controls,
            rgb_channels=args.rgb_channels,
            crops_from=args.crops_from,
            crop_size=args.crop_size,
            crops_per_well=args.crops_per_well,
            crop_seed=args.crop_seed,
            crop_columns=args.crop_columns,
            **common,
        )
    return 0
