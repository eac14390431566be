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


def _dataset_fingerprint(ds: object) -> dict[str, object]:
    """What identifies a dataset's images and standardisation (path + small metadata files)."""
    import hashlib

    from cdcl.data.dataset_dir import INFO_FILE, PLATE_STATS_FILE, SAMPLES_FILE

    h = hashlib.sha256()
    for name in (INFO_FILE, SAMPLES_FILE, PLATE_STATS_FILE):
        h.update((ds.path / name).read_bytes())
    return {"path": str(Path(ds.path).resolve()), "sha256": h.hexdigest()[:16]}


def run(args: argparse.Namespace) -> int:
    """Embed (sharded over torchrun processes, resumable), merge on rank 0 and write."""
    from cdcl.errors import CdclError

    if args.features is not None or args.source == "cellprofiler":
        from cdcl.commands.embed_cellprofiler import run_cellprofiler

        return run_cellprofiler(args)
    if args.source is None:
        raise CdclError("give a SOURCE (run, checkpoint, random:<arch>, intensity) or --features")
    if args.chunk_size is None:
        args.chunk_size = 4096

    import time

    import numpy as np
    import torch

    from cdcl.data.dataset_dir import open_dataset
    from cdcl.data.splits import assign_split
    from cdcl.evaluate.embed import image_meta
    from cdcl.evaluate.embed_job import (
        EmbedJob,
        job_key,
        remove_stale_work_dirs,
        work_dir_for,
        write_image_profiles,
        write_well_profiles,
    )
    from cdcl.evaluate.sources import resolve_source
    from cdcl.train import distributed as D

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
    if args.batch_size < 1 or (args.workers is not None and args.workers < 0):
        raise CdclError("--batch-size must be >= 1 and --workers >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CdclError("--device cuda: no CUDA device is available; use --device auto or cpu")
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
    number = args.split_number
    if args.split == "all":
        idx = np.arange(len(samples))
    else:
        if args.split not in ("train", "val", "test"):
            raise CdclError(f"--split {args.split}: use all, train, val or test")
        if number is None and src.model is not None:
            number = getattr(src.model.config.data, "split", None)
        split = assign_split(samples, ds.info.source, number)
        idx = np.flatnonzero((split == args.split).to_numpy())
        if len(idx) == 0:
            raise CdclError(f"--split {args.split}: no images in that part of the split")
    meta = image_meta(samples, idx)

    device = D.init(args.device)
    try:
        rank, world = D.rank(), D.world_size()
        # On the CPU, loader workers compete with inference for the same cores (bench_embed.py).
        workers = args.workers if args.workers is not None else (4 if device.type == "cuda" else 0)
        fields = {
            "source": src.provenance,
            "checkpoint": args.checkpoint,
            "data": _dataset_fingerprint(ds),
            "split": args.split,
            "split_number": number,
            "level": args.level,
            "precision": "bf16" if device.type == "cuda" else "float32",
            "chunk_size": args.chunk_size,  # part boundaries: parts of another size do not fit
        }
        job = EmbedJob(work_dir_for(out, job_key(fields)), len(idx), args.chunk_size)
        if rank == 0:
            remove_stale_work_dirs(out, keep=job.work_dir)
            job.prepare(fields)
        D.barrier()  # the work directory exists and holds no temp files
        pending = job.pending()
        D.barrier()  # every rank listed the same finished parts before any rank writes one
        t0 = time.perf_counter()
        if rank == 0 and len(pending) < job.n_chunks:
            done = job.n_chunks - len(pending)
            print(f"resuming: {done} of {job.n_chunks} parts already embedded in {job.work_dir}")
        job.run(
            job.shard(pending, rank, world),
            src.backbone,
            ds,
            idx,
            src.view_fn,
            batch_size=args.batch_size,
            workers=workers,
            device=str(device),
            rank=rank,
            progress=not args.no_progress and rank == 0,
            desc=f"{src.name} (rank 0 of {world})" if world > 1 else src.name,
        )
    except BaseException:
        D.cleanup(barrier=False)  # exit now: torchrun then stops the other ranks
        raise
    D.cleanup()  # barrier: every shard is written before rank 0 merges
    if rank != 0:
        return 0
    seconds = time.perf_counter() - t0
    n_new = sum(job.span(c)[1] - job.span(c)[0] for c in pending)
    print(
        f"embedded {n_new} images in {seconds:.1f} s: {n_new / max(seconds, 1e-9):.1f} images/s "
        f"({world} process{'es' if world > 1 else ''}, {workers} loader workers each)"
    )
    prov = {"world_size": world, "source": src.provenance}
    write = write_well_profiles if args.level == "well" else write_image_profiles
    path, rows, dim = write(job, meta, out, prov)
    job.remove()
    print(f"{rows} {args.level} profiles x {dim} features -> {path}")
    return 0
