"""`cdcl embed`: backbone embeddings of centre views as Parquet / AnnData profiles."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = (
    "Embed a dataset with a run's backbone (or a baseline) and export image or well profiles "
    "with Metadata_* columns (Parquet, AnnData .h5ad or CSV)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `cdcl embed`."""
    parser.add_argument(
        "source",
        help="run directory, checkpoint file, random:<timm arch> or intensity",
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
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="seed of a random backbone")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Embed, aggregate and write the profiles."""
    import numpy as np

    from cdcl.data.dataset_dir import open_dataset
    from cdcl.data.splits import assign_split
    from cdcl.errors import CdclError
    from cdcl.evaluate.embed import embed_images, image_meta, well_profiles, write_profiles
    from cdcl.evaluate.evaluate import resolve_source

    out = Path(args.out)
    ext = {"parquet": ".parquet", "h5ad": ".h5ad", "csv": ".csv"}
    if (
        args.format
        and not str(out).lower().endswith(ext[args.format])
        and not (args.format == "csv" and str(out).lower().endswith(".csv.gz"))
    ):
        out = out.with_name(out.name + ext[args.format])
    elif not args.format and not str(out).lower().endswith(
        (".parquet", ".h5ad", ".csv", ".csv.gz")
    ):
        out = out.with_name(out.name + ".parquet")
    run_like = not (args.source == "intensity" or args.source.startswith("random:"))
    if not run_like and args.data is None:
        raise CdclError(f"{args.source}: a baseline needs --data DIR")
    ds = open_dataset(args.data) if args.data is not None else None
    src = resolve_source(args.source, which=args.checkpoint, dataset=ds, seed=args.seed)
    if ds is None:
        path = src.model.dataset.get("path")
        if not path or not Path(path).exists():
            raise CdclError(
                f"{args.source}: the checkpoint's dataset {path} is not found; pass --data"
            )
        ds = open_dataset(path)
    samples = ds.samples
    if args.split == "all":
        idx = np.arange(len(samples))
    else:
        if args.split not in ("train", "val", "test"):
            raise CdclError(f"--split {args.split}: use all, train, val or test")
        number = args.split_number
        if number is None and src.model is not None:
            number = getattr(src.model.config.data, "split", None)
        split = assign_split(samples, ds.info.source, number)
        idx = np.flatnonzero((split == args.split).to_numpy())
        if len(idx) == 0:
            raise CdclError(f"--split {args.split}: no images in that part of the split")
    feats = embed_images(
        src.backbone,
        ds,
        idx,
        src.view_fn,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        desc=src.name,
    )
    meta = image_meta(samples, idx)
    if args.level == "well":
        feats, meta = well_profiles(feats, meta)
    path = write_profiles(feats, meta, out)
    print(f"{len(feats)} {args.level} profiles x {feats.shape[1]} features -> {path}")
    return 0
