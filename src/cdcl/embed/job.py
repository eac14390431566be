"""Screen-scale embedding: fixed chunks written as Parquet parts, sharded over ranks, resumable.

The images to embed are cut into fixed chunks (``chunk_size`` images, independent of the number
of processes). Each chunk's float32 features are written atomically (temp file + rename) as one
Parquet part in a hidden work directory next to the output, named by a hash of everything that
determines the features (checkpoint, data, split, level, options). A rerun of the same command
finds the finished parts and embeds only the rest; a different command gets another directory.

Under torchrun the pending chunks are split into one contiguous shard per rank; every rank
writes its own parts, and rank 0 alone merges them once all ranks are done (Parquet appended
part by part, well means accumulated as group sums), then removes the work directory.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from cdcl.atomic import atomic_path, atomic_write_text, naming_failures
from cdcl.embed.inference import ViewFn, cut_batches, embed_images, iter_embeddings
from cdcl.errors import CdclError
from cdcl.profiles.table import (
    WellAccumulator,
    feature_names,
    profile_table,
    to_anndata,
    to_metadata_frame,
    write_profiles,
)

CHUNK_SIZE = 4096  # images per part: small enough to lose little on a kill, large to stay cheap
JOB_FILE = "job.json"
META_KEY = b"cdcl.embed"


def job_key(fields: dict[str, Any]) -> str:
    """A short hash of the fields that determine the features (JSON, sorted keys)."""
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def work_dir_for(out: Path, key: str) -> Path:
    """The hidden work directory of an output file and job key (next to the output)."""
    return out.parent / f".{out.name}.embed-{key}"


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


class EmbedJob:
    """The chunks of one embedding job and their Parquet parts in ``work_dir``."""

    def __init__(self, work_dir: Path, n_images: int, chunk_size: int = CHUNK_SIZE) -> None:
        if chunk_size < 1:
            raise CdclError(f"--chunk-size {chunk_size}: use a positive number of images")
        self.work_dir = Path(work_dir)
        self.n_images = int(n_images)
        self.chunk_size = int(chunk_size)

    @property
    def n_chunks(self) -> int:
        """Number of chunks (the last one may be short)."""
        return -(-self.n_images // self.chunk_size)

    def span(self, c: int) -> tuple[int, int]:
        """Positions [start, stop) of chunk ``c`` in the list of images to embed."""
        a = c * self.chunk_size
        return a, min(a + self.chunk_size, self.n_images)

    def part_path(self, c: int) -> Path:
        """The Parquet part of chunk ``c``."""
        return self.work_dir / f"part-{c:07d}.parquet"

    def pending(self) -> list[int]:
        """Chunks without a finished part, in order."""
        return [c for c in range(self.n_chunks) if not self.part_path(c).exists()]

    def prepare(self, fields: dict[str, Any]) -> None:
        """Create the work directory, record the job, drop temp files of a killed run.

        Call on one process (rank 0) before any rank lists or writes parts.
        """
        self.work_dir.mkdir(parents=True, exist_ok=True)
        for tmp in self.work_dir.glob(".*.tmp*"):
            tmp.unlink(missing_ok=True)
        job = self.work_dir / JOB_FILE
        if not job.exists():
            text = json.dumps({**fields, "chunk_size": self.chunk_size}, indent=1, default=str)
            atomic_write_text(job, text)

    def shard(self, pending: list[int], rank: int, world: int) -> list[int]:
        """This rank's contiguous share of the pending chunks."""
        n = len(pending)
        return pending[rank * n // world : (rank + 1) * n // world]

    def run(
        self,
        chunks: list[int],
        backbone: Callable[[Any], Any],
        dataset: Any,
        indices: np.ndarray,
        view_fn: ViewFn | None = None,
        *,
        batch_size: int = 64,
        workers: int = 0,
        device: str = "cpu",
        rank: int = 0,
        progress: bool = True,
        desc: str = "embed",
    ) -> None:
        """Embed the given chunks and write each one's part as soon as it is complete."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) != self.n_images:
            raise ValueError(f"{len(indices)} indices for a job of {self.n_images} images")
        # Batches never cross a chunk boundary, so every part closes on a batch.
        plan: list[tuple[int, int]] = []  # (chunk, number of batches)
        batches: list[np.ndarray] = []
        for c in chunks:
            a, b = self.span(c)
            cut = cut_batches(indices[a:b], batch_size)
            plan.append((c, len(cut)))
            batches += cut
        n_images = sum(len(x) for x in batches)
        bar = tqdm(
            total=n_images,
            desc=desc,
            unit="img",
            disable=not progress,
            dynamic_ncols=True,
            smoothing=0.1,
        )
        stream = iter_embeddings(
            backbone, dataset, batches, view_fn, workers=workers, device=device, bar=bar
        )
        for c, n_batches in plan:
            feats = [next(stream) for _ in range(n_batches)]
            self._write_part(c, np.concatenate(feats) if len(feats) > 1 else feats[0], rank)
        for _ in stream:  # nothing left; lets the loader shut its workers down
            pass
        bar.close()

    def _write_part(self, c: int, feats: np.ndarray, rank: int) -> None:
        """One chunk's features as a fixed-size-list column, written atomically."""
        a, b = self.span(c)
        if len(feats) != b - a:
            raise RuntimeError(f"chunk {c}: {len(feats)} feature rows for {b - a} images")
        col = pa.FixedSizeListArray.from_arrays(
            pa.array(np.ascontiguousarray(feats, np.float32).reshape(-1)), feats.shape[1]
        )
        table = pa.table({"x": col}).replace_schema_metadata({b"rank": str(rank).encode()})
        with atomic_path(self.part_path(c)) as tmp:
            pq.write_table(table, tmp)

    def read_part(self, c: int) -> tuple[np.ndarray, int]:
        """Features (rows, D) of chunk ``c`` and the rank that wrote them."""
        path = self.part_path(c)
        if not path.exists():
            raise CdclError(f"{path}: part missing; rerun the same command to embed it")
        table = pq.read_table(path)
        col = table.column("x").combine_chunks()
        d = col.type.list_size
        x = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, d).astype(np.float32)
        a, b = self.span(c)
        if len(x) != b - a:
            raise CdclError(f"{path}: {len(x)} rows for {b - a} images; delete it and rerun")
        meta = table.schema.metadata or {}
        return x, int(meta.get(b"rank", b"0"))

    def iter_features(self) -> Iterator[tuple[int, np.ndarray, int]]:
        """(start position, features, writer rank) of every chunk, in order."""
        for c in range(self.n_chunks):
            x, r = self.read_part(c)
            yield self.span(c)[0], x, r

    def gather(self) -> np.ndarray:
        """All features (n_images, D) in memory (for ``cdcl evaluate``)."""
        out: np.ndarray | None = None
        for a, x, _ in self.iter_features():
            if out is None:
                out = np.empty((self.n_images, x.shape[1]), dtype=np.float32)
            out[a : a + len(x)] = x
        return out if out is not None else np.zeros((0, 0), dtype=np.float32)

    def remove(self) -> None:
        """Delete the work directory (after the output is safely written)."""
        shutil.rmtree(self.work_dir, ignore_errors=True)


def remove_stale_work_dirs(out: Path, keep: Path) -> list[Path]:
    """Work directories of other jobs for the same output (a different command starts clean)."""
    gone = []
    for d in out.parent.glob(f".{out.name}.embed-*"):
        if d.is_dir() and d != keep:
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d)
    return gone


def _parquet_schema(meta: pd.DataFrame, dim: int) -> pa.Schema:
    """Schema of the profile table: ``Metadata_*`` columns (typed from all rows) then f0..f{D-1}."""
    meta_schema = pa.Schema.from_pandas(to_metadata_frame(meta), preserve_index=False)
    fields = [meta_schema.field(i) for i in range(len(meta_schema))]
    fields += [pa.field(name, pa.float32()) for name in feature_names(dim)]
    return pa.schema(fields)


def write_image_profiles(
    job: EmbedJob, meta: pd.DataFrame, path: Path, provenance: dict[str, Any] | None = None
) -> tuple[Path, int, int]:
    """Merge the parts into one image-level file, atomically; returns (path, rows, features).

    Parquet is appended part by part and CSV written block by block, so the table is never
    whole in memory; AnnData (.h5ad) has no append, so its table is gathered in memory.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name.lower()
    # Export names are decided on the whole table, so that every block has the same columns.
    meta = to_metadata_frame(meta)
    if name.endswith(".h5ad"):
        x = job.gather()
        to_anndata(x, meta, path, provenance)
        return path, len(x), x.shape[1]
    if not name.endswith((".parquet", ".csv", ".csv.gz")):
        raise CdclError(f"{path}: unknown profile format; use .parquet, .h5ad, .csv")
    tmp = _tmp(path)
    writer: Any = None
    handle: Any = None
    dim = 0
    ranks: set[int] = set()
    try:
        for a, x, r in job.iter_features():
            ranks.add(r)
            dim = x.shape[1]
            block = profile_table(x, meta.iloc[a : a + len(x)].reset_index(drop=True))
            with naming_failures(path):  # a full disk names the output, not its temporary file
                if name.endswith(".parquet"):
                    if writer is None:
                        schema = _parquet_schema(meta, dim)
                        writer = pq.ParquetWriter(tmp, schema)
                    table = pa.Table.from_pandas(block, schema=schema, preserve_index=False)
                    writer.write_table(table)
                else:
                    if handle is None:
                        opener = gzip.open if name.endswith(".gz") else open
                        handle = opener(tmp, "wt", newline="")
                    block.to_csv(handle, index=False, header=a == 0)
        with naming_failures(path):
            if writer is not None:
                info = {**(provenance or {}), "part_ranks": sorted(ranks), "merged_by_rank": 0}
                writer.add_key_value_metadata({META_KEY.decode(): json.dumps(info, default=str)})
                writer, w = None, writer
                w.close()
            if handle is not None:
                handle, h = None, handle
                h.close()
            if not tmp.exists():  # nothing to embed: an empty table in the same format
                write_profiles(np.zeros((0, 0), np.float32), meta.iloc[:0], path)
            else:
                os.replace(tmp, path)
    finally:
        _close_quietly(writer, handle)
        tmp.unlink(missing_ok=True)
    return path, len(meta), dim


def _close_quietly(*files: Any) -> None:
    """Close what a failed merge left open; a second failure must not hide the first."""
    for f in files:
        if f is not None:
            with contextlib.suppress(Exception):  # the original error is already on its way
                f.close()


def write_well_profiles(
    job: EmbedJob, meta: pd.DataFrame, path: Path, provenance: dict[str, Any] | None = None
) -> tuple[Path, int, int]:
    """Stream the parts into well means (group sums + counts) and write them atomically."""
    acc = WellAccumulator(meta)
    ranks: set[int] = set()
    for a, x, r in job.iter_features():
        acc.add(a, x)
        ranks.add(r)
    prof, wmeta = acc.result()
    path = Path(path)
    if not str(path).lower().endswith(".parquet"):
        return write_profiles(prof, wmeta, path, provenance), len(prof), prof.shape[1]
    # Parquet: the same table as ``to_parquet`` plus provenance in its key-value metadata.
    table = pa.Table.from_pandas(profile_table(prof, wmeta), preserve_index=False)
    info = {**(provenance or {}), "part_ranks": sorted(ranks), "merged_by_rank": 0}
    old = table.schema.metadata or {}
    table = table.replace_schema_metadata({**old, META_KEY: json.dumps(info, default=str)})
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path, len(prof), prof.shape[1]


def read_provenance(path: Path) -> dict[str, Any]:
    """The ``cdcl.embed`` key-value metadata of a merged Parquet file ({} when absent)."""
    meta = pq.read_metadata(path).metadata or {}  # file key-value metadata (holds the schema's)
    return json.loads(meta[META_KEY]) if META_KEY in meta else {}


def embed_resumable(
    backbone: Callable[[Any], Any],
    dataset: Any,
    indices: np.ndarray,
    view_fn: ViewFn | None,
    work_dir: Path | None,
    key: str,
    *,
    batch_size: int = 64,
    workers: int = 0,
    chunk_size: int = CHUNK_SIZE,
    progress: bool = True,
    desc: str = "embed",
) -> tuple[np.ndarray, EmbedJob | None]:
    """Features of ``indices`` in memory, via resumable parts under ``work_dir`` when given.

    One process (``cdcl evaluate``). ``key`` names what determines the features besides the
    images (checkpoint, backbone, seed); the caller removes the returned job's directory once
    its results are written. Without ``work_dir`` nothing touches the disk.
    """
    indices = np.asarray(indices, dtype=np.int64)
    if work_dir is None:
        feats = embed_images(
            backbone,
            dataset,
            indices,
            view_fn,
            batch_size,
            progress=progress,
            desc=desc,
            workers=workers,
        )
        return feats, None
    fields = {
        "key": key,
        "images": hashlib.sha256(indices.tobytes()).hexdigest()[:16],
        "chunk_size": chunk_size,
    }
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in desc)
    job = EmbedJob(Path(work_dir) / f".embed-{safe}-{job_key(fields)}", len(indices), chunk_size)
    job.prepare(fields)
    pending = job.pending()
    if len(pending) < job.n_chunks:  # say so: the user sees that a killed run was picked up
        done = job.n_chunks - len(pending)
        print(f"{desc}: resuming, {done} of {job.n_chunks} parts already embedded", file=sys.stderr)
    job.run(
        pending,
        backbone,
        dataset,
        indices,
        view_fn,
        batch_size=batch_size,
        workers=workers,
        progress=progress,
        desc=desc,
    )
    return job.gather(), job
