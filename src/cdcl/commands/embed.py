"""`cdcl embed`: backbone embeddings of centre views as Parquet / AnnData profiles."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = (
    "Embed a dataset with a run's backbone (or a baseline, or CellProfiler features with "
    "--features cellprofiler) and export image or well profiles with Metadata_* columns "
    "(Parquet, AnnData .h5ad or CSV)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `cdcl embed`."""
    parser.add_argument(
        "source",
        nargs="?",
        help="run directory, checkpoint file, random:<timm arch> or intensity "
        "(omit with --features cellprofiler)",
    )
    parser.add_argument("--data", type=Path, help="dataset directory (default: the run's)")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best")
    parser.add_argument(
        "--split",
        default="all",
        help="all | test | train | val: which images to embed (held-out-batch split of the run)",
    )
    parser.add_argument("--split-number", type=int, help="fold number (default: the run's)")
    parser.add_argument("--out", type=Path, required=True, help="output file")
    parser.add_argument("--level", choices=("image", "well"), default="well")
    parser.add_argument(
        "--format",
        choices=("parquet", "h5ad", "csv"),
        help="file format (default: from the --out extension, else parquet)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="data-loader processes reading and standardising images (0: in the main process; "
        "default 4 with CUDA, 0 on the CPU, where inference needs the cores); with --features "
        "cellprofiler, processes measuring cells (default 1)",
    )
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="images per resumable part (a killed run redoes at most one part per process; "
        "default 4096, 64 for --features cellprofiler)",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: CUDA when available (bf16 autocast), else CPU (float32)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of a random backbone")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_cellprofiler_arguments(parser)


def _add_cellprofiler_arguments(parser: argparse.ArgumentParser) -> None:
    """The `--features cellprofiler` options of `cdcl embed`."""
    from cdcl.embed.cellprofiler_features import (
        DEFAULT_FAMILIES,
        FAMILIES,
        NORMALIZATIONS,
        SEGMENTATIONS,
    )

    g = parser.add_argument_group("CellProfiler features (--features cellprofiler)")
    g.add_argument(
        "--features",
        choices=("cellprofiler",),
        help="hand-crafted features instead of a network: segment, measure every cell with "
        "cp-measure, median per well, normalise per plate against controls, select features",
    )
    g.add_argument(
        "--families",
        help=f"comma-separated cp-measure families out of {', '.join(FAMILIES)}, or all "
        f"(default {','.join(DEFAULT_FAMILIES)}: the cheapest, see docs/cellprofiler.md)",
    )
    g.add_argument(
        "--segmentation",
        choices=SEGMENTATIONS,
        default="auto",
        help="masks: the cell masks stored with the dataset (the simulated screen's); otsu: "
        "Otsu + watershed on the DNA channel; auto (default): masks when stored, else otsu",
    )
    g.add_argument(
        "--nucleus-diameter",
        type=float,
        help="typical nuclear diameter in px for otsu (default: estimated per image)",
    )
    g.add_argument(
        "--normalize",
        choices=NORMALIZATIONS,
        default="mad_robustize",
        help="per-plate normalisation against the controls, pycytominer's (default mad_robustize)",
    )
    g.add_argument(
        "--no-select",
        action="store_true",
        help="keep every feature (no pycytominer feature selection, missing values kept)",
    )


def run(args: argparse.Namespace) -> int:
    """Embed into the output file through `cdcl.embed` (which holds the file's lock)."""
    from cdcl.api import embed

    embed(
        args.source,
        args.data,
        out=args.out,
        fmt=args.format,
        checkpoint=args.checkpoint,
        split=args.split,
        fold=args.split_number,
        level=args.level,
        batch_size=args.batch_size,
        workers=args.workers,
        chunk_size=args.chunk_size,
        device=args.device,
        seed=args.seed,
        features=args.features,
        families=args.families,
        segmentation=args.segmentation,
        nucleus_diameter=args.nucleus_diameter,
        normalize=args.normalize,
        select=not args.no_select,
        progress=not args.no_progress,
        read_back=False,  # the file may be larger than memory
    )
    return 0
