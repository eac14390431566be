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
    from cdcl.commands.embed_cellprofiler import add_cellprofiler_arguments

    add_cellprofiler_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Embed under the output file's lock (a second embed into the same file stops at once)."""
    from cdcl.embed.to_file import embed_to_file, output_path
    from cdcl.errors import CdclError
    from cdcl.locking import command_lock

    cellprofiler = args.features is not None or args.source == "cellprofiler"
    if args.source is None and not cellprofiler:
        raise CdclError("give a SOURCE (run, checkpoint, random:<arch>, intensity) or --features")
    if cellprofiler:  # takes the same output lock itself
        from cdcl.commands.embed_cellprofiler import run_cellprofiler

        return run_cellprofiler(args)
    out = output_path(Path(args.out), args.format)
    if args.chunk_size is None:
        args.chunk_size = 4096
    with command_lock(out, "cdcl embed"):
        embed_to_file(
            args.source,
            out,
            data=args.data,
            checkpoint=args.checkpoint,
            split=args.split,
            split_number=args.split_number,
            level=args.level,
            fmt=args.format,
            batch_size=args.batch_size,
            workers=args.workers,
            chunk_size=args.chunk_size,
            device=args.device,
            seed=args.seed,
            progress=not args.no_progress,
        )
    return 0
