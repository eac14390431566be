"""``cdcl embed`` / ``cdcl.embed``: a dataset embedded by a run or a baseline into one file.

Every profile carries ``Metadata_Split``: the part (train / val / test) of the held-out-batch
split of the run that made the features, so that ``cdcl evaluate --features`` holds out what
the run held out. Parquet files keep the provenance in their key-value metadata, ``.h5ad``
files in ``uns["cdcl"]`` (checkpoint hash, the run's config, package versions).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from cdcl.errors import CdclError

FORMATS = {"parquet": ".parquet", "h5ad": ".h5ad", "csv": ".csv"}
VERSIONED = ("cdcl", "torch", "timm", "numpy", "pandas", "anndata", "scikit-learn")


def output_path(out: Path, fmt: str | None) -> Path:
    """The file to write: ``out`` with the format's extension added when it lacks one."""
    name = str(out).lower()
    if fmt:
        if fmt not in FORMATS:
            raise CdclError(f"--format {fmt}: use parquet, h5ad or csv")
        if name.endswith(FORMATS[fmt]) or (fmt == "csv" and name.endswith(".csv.gz")):
            return out
        return out.with_name(out.name + FORMATS[fmt])
    if name.endswith((".parquet", ".h5ad", ".csv", ".csv.gz")):
        return out
    return out.with_name(out.name + ".parquet")


def dataset_fingerprint(ds: Any) -> dict[str, object]:
    """What identifies a dataset's images and standardisation (path + small metadata files)."""
    from cdcl.data.dataset_dir import INFO_FILE, PLATE_STATS_FILE, SAMPLES_FILE

    h = hashlib.sha256()
    for name in (INFO_FILE, SAMPLES_FILE, PLATE_STATS_FILE):
        h.update((ds.path / name).read_bytes())
    return {"path": str(Path(ds.path).resolve()), "sha256": h.hexdigest()[:16]}


def select_images(ds: Any, split: str, number: int | None) -> tuple[np.ndarray, Any]:
    """The rows of ``split`` (all, train, val, test) of fold ``number``, and every row's part.

    The parts are None when the dataset has no held-out-batch split (e.g. a single batch); then
    only ``split="all"`` is possible.
    """
    from cdcl.data.splits import assign_split

    if split not in ("all", "train", "val", "test"):
        raise CdclError(f"--split {split}: use all, train, val or test")
    try:  # the run's held-out-batch split, written with every profile
        parts = assign_split(ds.samples, ds.info.source, number).astype(str).to_numpy()
    except CdclError:
        if split != "all":
            raise
        parts = None  # e.g. a single batch: nothing is held out
    if split == "all":
        return np.arange(len(ds.samples)), parts
    idx = np.flatnonzero(parts == split)
    if len(idx) == 0:
        raise CdclError(f"--split {split}: no images in that part of the split")
    return idx, parts


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that determine the features."""
    out = {}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _config_of(src: Any) -> dict[str, Any] | None:
    """The run's resolved config as a plain dict (None for baselines)."""
    cfg = getattr(getattr(src, "model", None), "config", None)
    return cfg.to_dict() if hasattr(cfg, "to_dict") else None


def embed_to_file(
    source: str | Path,
    out: Path,
    *,
    data: Path | None = None,
    checkpoint: str = "best",
    split: str = "all",
    split_number: int | None = None,
    level: str = "well",
    fmt: str | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    chunk_size: int = 4096,
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
    quiet: bool = False,
) -> Path | None:
    """Embed (sharded over torchrun processes, resumable), merge on rank 0 and write ``out``.

    Returns the written file on rank 0 and None on the other ranks.
    """
    from cdcl.profiles.table import image_meta
    from cdcl.train import distributed as D

    source = str(source)
    out = output_path(Path(out), fmt)
    _check_embed_options(source, data, level, batch_size, workers, device)
    src, ds = _open_source(source, data, checkpoint, seed)
    number = split_number
    if number is None and src.model is not None:
        number = getattr(src.model.config.data, "split", None)
    idx, parts = select_images(ds, split, number)
    meta = image_meta(ds.samples, idx)
    if parts is not None:
        meta["split"] = parts[idx]

    dev = D.init(device)
    try:
        rank, world = D.rank(), D.world_size()
        # On the CPU, loader workers compete with inference for the same cores (bench_embed.py).
        n_workers = workers if workers is not None else (4 if dev.type == "cuda" else 0)
        fields = _job_fields(src, checkpoint, ds, split, number, level, dev.type, chunk_size)
        job, pending = _open_job(out, fields, len(idx), chunk_size, rank)
        t0 = time.perf_counter()
        if rank == 0 and len(pending) < job.n_chunks and not quiet:
            done = job.n_chunks - len(pending)
            print(f"resuming: {done} of {job.n_chunks} parts already embedded in {job.work_dir}")
        shard = _Shard(rank, world, str(dev), n_workers, batch_size)
        _embed_shard(job, pending, shard, src, ds, idx, progress)
    except BaseException:
        D.cleanup(barrier=False)  # exit now: torchrun then stops the other ranks
        raise
    D.cleanup()  # barrier: every shard is written before rank 0 merges
    if rank != 0:
        return None
    if not quiet:
        _say_speed(job, pending, time.perf_counter() - t0, world, n_workers)
    prov = _provenance(src, fields, world)
    return _write_merged(job, meta, out, prov, level, quiet)


def _job_fields(
    src: Any,
    checkpoint: str,
    ds: Any,
    split: str,
    number: int | None,
    level: str,
    device_type: str,
    chunk_size: int,
) -> dict[str, Any]:
    """What the embeddings depend on: the embedding job (its work directory) is keyed by it."""
    return {
        "source": src.provenance,
        "checkpoint": checkpoint,
        "data": dataset_fingerprint(ds),
        "split": split,
        "split_number": number,
        "level": level,
        "precision": "bf16" if device_type == "cuda" else "float32",
        "chunk_size": chunk_size,  # part boundaries: parts of another size do not fit
    }


def _provenance(src: Any, fields: dict[str, Any], world: int) -> dict[str, Any]:
    """What the written file keeps about how its features were made."""
    return {
        "world_size": world,
        "source": src.provenance,
        "checkpoint_sha256": src.provenance.get("checkpoint_sha256", ""),
        "method": src.name,
        "config": _config_of(src),
        "data": fields["data"],
        "split_number": fields["split_number"],
        "level": fields["level"],
        "versions": package_versions(),
    }


def _check_embed_options(
    source: str,
    data: Path | None,
    level: str,
    batch_size: int,
    workers: int | None,
    device: str,
) -> None:
    """Refuse a bad level, batch size, worker count or device, and a baseline without data."""
    import torch

    if level not in ("image", "well"):
        raise CdclError(f"--level {level}: use image or well")
    if batch_size < 1 or (workers is not None and workers < 0):
        raise CdclError("--batch-size must be >= 1 and --workers >= 0")
    if device == "cuda" and not torch.cuda.is_available():
        raise CdclError("--device cuda: no CUDA device is available; use --device auto or cpu")
    run_like = not (source == "intensity" or source.startswith("random:"))
    if not run_like and data is None:
        raise CdclError(f"{source}: a baseline needs --data DIR")


def _open_source(source: str, data: Path | None, checkpoint: str, seed: int) -> tuple[Any, Any]:
    """The feature source and the dataset it embeds (``data``, else the checkpoint's)."""
    from cdcl.data.dataset_dir import open_dataset
    from cdcl.embed.sources import check_channels, resolve_source

    ds = open_dataset(data) if data is not None else None
    src = resolve_source(source, which=checkpoint, dataset=ds, seed=seed)
    if ds is None:
        path = src.model.dataset.get("path")
        if not path or not Path(path).exists():
            raise CdclError(f"{source}: the checkpoint's dataset {path} is not found; pass --data")
        ds = open_dataset(path)
    check_channels(src, ds, source)
    return src, ds


def _open_job(
    out: Path, fields: dict[str, Any], n_images: int, chunk_size: int, rank: int
) -> tuple[Any, list[int]]:
    """The embedding job of ``fields`` (prepared by rank 0) and its parts still to embed."""
    from cdcl.embed.job import EmbedJob, job_key, remove_stale_work_dirs, work_dir_for
    from cdcl.train import distributed as D

    job = EmbedJob(work_dir_for(out, job_key(fields)), n_images, chunk_size)
    if rank == 0:
        remove_stale_work_dirs(out, keep=job.work_dir)
        job.prepare(fields)
    D.barrier()  # the work directory exists and holds no temp files
    pending = job.pending()
    D.barrier()  # every rank listed the same finished parts before any rank writes one
    return job, pending


@dataclass(frozen=True)
class _Shard:
    """This process's place among the torchrun processes and how it embeds."""

    rank: int
    world: int
    device: str
    workers: int
    batch_size: int


def _embed_shard(
    job: Any,
    pending: list[int],
    shard: _Shard,
    src: Any,
    ds: Any,
    idx: np.ndarray,
    progress: bool,
) -> None:
    """Embed this process's share of the pending parts (a progress bar on rank 0 only)."""
    job.run(
        job.shard(pending, shard.rank, shard.world),
        src.backbone,
        ds,
        idx,
        src.view_fn,
        batch_size=shard.batch_size,
        workers=shard.workers,
        device=shard.device,
        rank=shard.rank,
        progress=progress and shard.rank == 0,
        desc=f"{src.name} (rank 0 of {shard.world})" if shard.world > 1 else src.name,
    )


def _say_speed(job: Any, pending: list[int], seconds: float, world: int, n_workers: int) -> None:
    """How many images were embedded now, and how fast."""
    n_new = sum(job.span(c)[1] - job.span(c)[0] for c in pending)
    print(
        f"embedded {n_new} images in {seconds:.1f} s: {n_new / max(seconds, 1e-9):.1f} "
        f"images/s ({world} process{'es' if world > 1 else ''}, {n_workers} loader workers "
        "each)"
    )


def _write_merged(
    job: Any, meta: Any, out: Path, prov: dict[str, Any], level: str, quiet: bool
) -> Path:
    """Merge the job's parts into ``out`` (well or image profiles), then remove the parts."""
    from cdcl.embed.job import write_image_profiles, write_well_profiles

    write = write_well_profiles if level == "well" else write_image_profiles
    path, rows, dim = write(job, meta, out, prov)
    job.remove()
    if not quiet:
        print(f"{rows} {level} profiles x {dim} features -> {path}")
    return path


def cellprofiler_to_file(
    data: Path,
    out: Path,
    options: Any,
    *,
    split: str = "all",
    split_number: int | None = None,
    level: str = "well",
    fmt: str | None = None,
    chunk_size: int | None = None,
    workers: int | None = None,
    progress: bool = True,
    quiet: bool = False,
) -> Path:
    """CellProfiler profiles of a dataset (measured resumably, aggregated, normalised, selected).

    ``options`` is a :class:`cdcl.embed.cellprofiler_features.CellProfilerOptions`. Every
    option is checked, and the masks asked for looked up, before the output lock is taken.
    """
    from cdcl.data.dataset_dir import open_dataset
    from cdcl.embed.cellprofiler_features import CHUNK_SIZE, resolve_objects
    from cdcl.locking import command_lock

    chunk = CHUNK_SIZE if chunk_size is None else chunk_size
    if chunk < 1:
        raise CdclError(f"--chunk-size {chunk}: use a positive number of images")
    workers = 1 if workers is None else workers
    if workers < 1:
        raise CdclError(f"--workers {workers}: CellProfiler needs at least 1 measuring process")
    if level not in ("image", "well"):
        raise CdclError(f"--level {level}: use image or well")
    out = output_path(Path(out), fmt)
    ds = open_dataset(data)
    idx, _ = select_images(ds, split, split_number)
    resolve_objects(ds, options.segmentation)  # no masks where asked for: say so before any work
    key = f"{Path(ds.path).resolve()}|{dataset_fingerprint(ds)['sha256']}|{split}|{split_number}"
    with command_lock(out, "cdcl embed --features cellprofiler"):
        return _measure_to_file(
            ds, idx, out, options, key=key, split=split, level=level, chunk=chunk,
            workers=workers, progress=progress, quiet=quiet,
        )  # fmt: skip


def _measure_to_file(
    ds: Any,
    idx: np.ndarray,
    out: Path,
    options: Any,
    *,
    key: str,
    split: str,
    level: str,
    chunk: int,
    workers: int,
    progress: bool,
    quiet: bool,
) -> Path:
    """Measure, aggregate and write the CellProfiler profiles of rows ``idx`` into ``out``."""
    import shutil

    # Heavy imports (torch through the profile writers, pycytominer) only once the input is good.
    from cdcl.embed.cellprofiler import cellprofiler_profiles, write_named_profiles
    from cdcl.profiles.table import image_meta

    work = out.parent / f".{out.name}.cellprofiler"
    t0 = time.perf_counter()
    res, _job = cellprofiler_profiles(
        ds,
        idx,
        image_meta(ds.samples, idx),
        level=level,
        options=options,
        work_dir=work,
        key=key,
        chunk_size=chunk,
        workers=workers,
        progress=progress,
    )
    cost = res.info["measured_now"]
    if cost["fields"] and not quiet:
        per_field = 1000 * cost["seconds"] / cost["fields"]
        per_obj = 1000 * cost["seconds"] / max(cost["objects"], 1)
        print(
            f"measured {cost['fields']} fields ({cost['objects']} objects) in "
            f"{cost['seconds']:.1f} s: {per_field:.0f} ms per field, {per_obj:.1f} ms per "
            f"object ({', '.join(options.families)}; segmentation {res.info['segmentation']})"
        )
    wall = round(time.perf_counter() - t0, 2)
    prov = {"source": res.info, "data": key, "split": split, "wall_s": wall}
    path = write_named_profiles(res.features, res.meta, res.names, out, prov)
    shutil.rmtree(work, ignore_errors=True)
    if not quiet:
        print(
            f"{len(res.features)} {level} profiles x {len(res.names)} CellProfiler features "
            f"(kept of {res.info['features_measured']} measured) -> {path}"
        )
    return path
