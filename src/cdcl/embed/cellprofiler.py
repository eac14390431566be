"""The CellProfiler baseline row: segment, measure every cell, median per well, normalise, select.

The pipeline of a profiling lab (Arevalo et al. 2024, Nat Commun 15:6516; Caicedo et al. 2017,
Nat Methods 14:849), on a dataset directory:

1. objects: the label masks stored with the images (the simulated screen exports its own cells
   and nuclei), else a classical Otsu + watershed segmentation of the DNA channel
   (:mod:`cdcl.data.segmentation`);
2. ``cp-measure`` on every object, with the chosen feature families (:mod:`.cellprofiler`);
3. the median of every feature over the objects of a well (or of an image), per object type;
4. per plate, each feature normalised against the plate's negative controls with pycytominer
   (``mad_robustize`` by default: ``(x - median) / (1.4826 MAD + ε)``);
5. pycytominer feature selection: features with more than 5% missing values, near-constant
   features (frequency and unique-value cuts), one of every pair correlated above 0.9, and
   features with an absolute value above 500 (outliers from a near-zero control MAD) are
   dropped. Values still missing after that (a well without a measurable object) are set to 0,
   the control median.

Step 2 runs in fixed chunks of images, each written atomically as a Parquet part in a work
directory (like ``cdcl embed``), so a killed run measures only the images it has not yet
measured when rerun. Feature selection uses no labels, but sees every evaluated profile (like
Harmony and ComBat, and unlike a model trained on the training batches).
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from cdcl.atomic import atomic_path
from cdcl.data.segmentation import segment_field
from cdcl.embed.cellprofiler_features import (
    CHUNK_SIZE,
    CellProfilerOptions,
    measure_field,
    object_prefix,
    resolve_objects,
)
from cdcl.embed.job import EmbedJob, job_key
from cdcl.errors import CdclError
from cdcl.profiles.table import WellAccumulator, to_metadata_frame

SELECTION = ("drop_na_columns", "variance_threshold", "correlation_threshold", "drop_outliers")
PROGRESS_EVERY_S = 10.0  # without a progress bar, one line at least this often
ESTIMATE_FIELDS = 3  # fields measured before the time estimate is printed ...
ESTIMATE_SECONDS = 20.0  # ... or this many seconds of them, whichever comes first
# CellProfiler's texture (Haralick co-occurrence at a 3-px offset), granularity, Zernike and
# shape features describe a nucleus through its pixels: below about 12 px across (about 110 px
# of area, a few 3-px texture steps) they no longer measure what they measure on native images,
# where nuclei are 20-40 px across.
MIN_NUCLEUS_DIAMETER_PX = 12.0
SIZE_CHECK_FIELDS = 3  # the first fields whose nuclei are sized before measuring


def _progress_line(desc: str, done: int, total: int, cells: int, t0: float) -> None:
    dt = time.perf_counter() - t0
    print(
        f"{desc}: {done} of {total} fields measured ({cells} objects, {dt:.0f} s)",
        file=sys.stderr,
        flush=True,
    )


def estimate_line(desc: str, done: int, total: int, elapsed: float) -> str:
    """Seconds a field, fields left, the whole run's time and its end, as ``cdcl train`` says."""
    from datetime import datetime, timedelta

    from cdcl.train.metrics_log import format_clock, format_duration

    per_field = elapsed / max(done, 1)
    left_s = (total - done) * per_field
    now = datetime.now()
    return (
        f"{desc}: {format_duration(per_field)} a field, {total - done} of {total} fields left; "
        f"about {format_duration(elapsed + left_s)} in all, "
        f"ends about {format_clock(now + timedelta(seconds=left_s), now)}"
    )


def _say(line: str) -> None:
    """A line on stderr that does not break a progress bar."""
    tqdm.write(line, file=sys.stderr)
    sys.stderr.flush()


def nucleus_diameters(nuclei: np.ndarray) -> np.ndarray:
    """Equivalent diameters (px) of the labelled nuclei of one field (0 is background)."""
    areas = np.bincount(np.asarray(nuclei, dtype=np.int64).ravel())[1:]
    return 2.0 * np.sqrt(areas[areas > 0] / np.pi)


def small_nuclei_warning(median: float, shape: tuple[int, ...]) -> str | None:
    """The warning for nuclei too small for a faithful CellProfiler baseline, else None."""
    if not median < MIN_NUCLEUS_DIAMETER_PX:  # NaN (no nucleus found) says nothing
        return None
    size = "x".join(str(n) for n in shape[-2:])
    return (
        f"nuclei measure {median:.1f} px across (median equivalent diameter) on {size}-px "
        f"images, below the {MIN_NUCLEUS_DIAMETER_PX:.0f} px CellProfiler's texture and shape "
        "features need: the images look downsampled; build them at native resolution "
        "(cdcl build table without --image-size) for a faithful CellProfiler baseline"
    )


def check_nucleus_size(
    dataset: Any, indices: np.ndarray, options: CellProfilerOptions
) -> tuple[float, str | None]:
    """Median nucleus diameter (px) of the first fields and the small-nuclei warning, if any."""
    mode, objects = resolve_objects(dataset, options.segmentation)
    if mode == "masks" and "nuclei" not in objects:
        return float("nan"), None
    diameters = []
    shape: tuple[int, ...] = ()
    for i in np.asarray(indices[:SIZE_CHECK_FIELDS], dtype=np.int64):
        if mode == "masks":
            nuclei = dataset.read_masks([int(i)])[0][objects.index("nuclei")]
        else:
            image = dataset.read(int(i))
            nuclei = segment_field(image, dataset.channels, options.nucleus_diameter)[1]
        shape = nuclei.shape
        diameters.append(nucleus_diameters(nuclei))
    d = np.concatenate(diameters) if diameters else np.zeros(0)
    median = float(np.median(d)) if len(d) else float("nan")
    return median, small_nuclei_warning(median, shape)


class CellJob(EmbedJob):
    """The per-object measurements of a list of images, in resumable Parquet parts.

    A part holds, for every object of its images: the image's position in the list (``pos``),
    the object type (``obj``, index into the object names) and the features (``x``); the
    feature names are in the part's key-value metadata.
    """

    def run_measure(
        self,
        chunks: list[int],
        dataset: Any,
        indices: np.ndarray,
        options: CellProfilerOptions,
        *,
        progress: bool = True,
        desc: str = "cellprofiler",
        lines: bool = True,
    ) -> dict[str, float]:
        """Measure the given chunks, writing each part when complete; returns counts and time.

        ``progress`` shows a bar; without it, ``lines`` prints a line every 10 s instead.
        """
        mode, objects = resolve_objects(dataset, options.segmentation)
        channels = dataset.channels
        n_fields = sum(self.span(c)[1] - self.span(c)[0] for c in chunks)
        bar = tqdm(
            total=n_fields, desc=desc, unit="field", disable=not progress, dynamic_ncols=True
        )
        t0 = last = time.perf_counter()
        done = n_objects = 0
        estimated = not lines
        for c in chunks:
            a, b = self.span(c)
            pos: list[np.ndarray] = []
            obj: list[np.ndarray] = []
            feats: list[np.ndarray] = []
            names: list[str] = []
            for p in range(a, b):
                i = int(indices[p])
                image = dataset.read(i)
                if mode == "masks":
                    masks = dataset.read_masks([i])[0]
                else:
                    masks = segment_field(image, channels, options.nucleus_diameter)
                per_object, got = measure_field(image, masks, channels, options.families)
                names = got or names
                for k, x in enumerate(per_object):
                    if len(x):
                        pos.append(np.full(len(x), p, dtype=np.int64))
                        obj.append(np.full(len(x), k, dtype=np.int8))
                        feats.append(x)
                        n_objects += len(x)
                done += 1
                bar.update(1)
                elapsed = time.perf_counter() - t0
                if not estimated and (done >= ESTIMATE_FIELDS or elapsed >= ESTIMATE_SECONDS):
                    estimated = True
                    if done < n_fields:
                        _say(estimate_line(desc, done, n_fields, elapsed))
                if lines and not progress and time.perf_counter() - last > PROGRESS_EVERY_S:
                    _progress_line(desc, done, n_fields, n_objects, t0)
                    last = time.perf_counter()
            self._write_cells(c, pos, obj, feats, names, objects)
        bar.close()
        seconds = time.perf_counter() - t0
        return {"fields": done, "objects": n_objects, "seconds": round(seconds, 3)}

    def run_parallel(
        self,
        chunks: list[int],
        dataset: Any,
        indices: np.ndarray,
        options: CellProfilerOptions,
        *,
        workers: int = 1,
        progress: bool = True,
        desc: str = "cellprofiler",
    ) -> dict[str, float]:
        """:meth:`run_measure` with chunks spread over ``workers`` processes (same parts)."""
        if workers <= 1 or len(chunks) <= 1:
            return self.run_measure(chunks, dataset, indices, options, progress=progress, desc=desc)
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        n_fields = sum(self.span(c)[1] - self.span(c)[0] for c in chunks)
        bar = tqdm(
            total=n_fields, desc=desc, unit="field", disable=not progress, dynamic_ncols=True
        )
        t0 = time.perf_counter()
        done = n_objects = 0
        estimated = False
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            running = {
                pool.submit(
                    self.run_measure, [c], dataset, indices, options, progress=False, lines=False
                )
                for c in chunks
            }
            while running:
                finished, running = wait(
                    running, timeout=PROGRESS_EVERY_S, return_when=FIRST_COMPLETED
                )
                for f in finished:
                    cost = f.result()
                    done += int(cost["fields"])
                    n_objects += int(cost["objects"])
                    bar.update(int(cost["fields"]))
                if not estimated and done and running:  # wall time a field, all workers busy
                    estimated = True
                    _say(estimate_line(desc, done, n_fields, time.perf_counter() - t0))
                if not progress:  # parts finish in whole chunks: say something every 10 s
                    _progress_line(desc, done, n_fields, n_objects, t0)
        bar.close()
        seconds = time.perf_counter() - t0
        return {"fields": done, "objects": n_objects, "seconds": round(seconds, 3)}

    def _write_cells(
        self,
        c: int,
        pos: list[np.ndarray],
        obj: list[np.ndarray],
        feats: list[np.ndarray],
        names: list[str],
        objects: list[str],
    ) -> None:
        """One chunk's objects as a Parquet part, written atomically."""
        width = len(names)
        x = np.concatenate(feats).astype(np.float32) if feats else np.zeros((0, width), np.float32)
        # width 0 (no object in the whole chunk): an empty part with a list size of 1
        col = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), max(width, 1))
        table = pa.table(
            {
                "pos": pa.array(np.concatenate(pos) if pos else np.zeros(0, np.int64)),
                "obj": pa.array(np.concatenate(obj) if obj else np.zeros(0, np.int8)),
                "x": col,
            }
        )
        meta = {b"names": json.dumps(names).encode(), b"objects": json.dumps(objects).encode()}
        table = table.replace_schema_metadata(meta)
        with atomic_path(self.part_path(c)) as tmp:
            pq.write_table(table, tmp)

    def iter_cells(
        self,
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray, list[str], list[str]]]:
        """(chunk, positions, object types, features, names, objects) of every part, in order."""
        for c in range(self.n_chunks):
            path = self.part_path(c)
            if not path.exists():
                raise CdclError(f"{path}: part missing; rerun the same command to measure it")
            table = pq.read_table(path)
            meta = table.schema.metadata or {}
            names = json.loads(meta.get(b"names", b"[]"))
            objects = json.loads(meta.get(b"objects", b"[]"))
            pos = table.column("pos").to_numpy()
            obj = table.column("obj").to_numpy()
            col = table.column("x").combine_chunks()
            flat = col.flatten().to_numpy(zero_copy_only=False)
            x = flat.reshape(len(pos), -1) if len(pos) else np.zeros((0, len(names)), np.float32)
            yield c, pos, obj, x, names, objects


def _median(x: np.ndarray, width: int) -> np.ndarray:
    """Median of every column over rows, ignoring NaN (NaN where a column has no value)."""
    if len(x) == 0:
        return np.full(width, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns stay NaN
        return np.nanmedian(x.astype(np.float64), axis=0)


def median_profiles(
    job: CellJob, groups: np.ndarray, n_groups: int
) -> tuple[np.ndarray, list[str]]:
    """Per group of images (well or image) and object type, the median of every feature.

    ``groups`` gives the group of every image position. Objects are buffered only until the
    last image of their group has been read, so wells stored together stream through memory.
    Returns (n_groups, n_objects x F) float64 and the names ``<Object>_<feature>``.
    """
    remaining = np.bincount(groups, minlength=n_groups)
    buffers: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    finished: dict[int, list[np.ndarray]] = {}
    names: list[str] = []
    objects: list[str] = []
    for c, pos, obj, x, part_names, part_objects in job.iter_cells():
        if part_names:
            if names and part_names != names:
                raise CdclError(f"{job.part_path(c)}: other features than the first part; rerun")
            names, objects = part_names, part_objects
        objects = objects or part_objects
        a, b = job.span(c)
        if len(pos):
            row_group = groups[pos]
            for g in np.unique(row_group):
                sel = row_group == g
                buffers.setdefault(int(g), []).append((obj[sel], x[sel]))
        for g, k in zip(*np.unique(groups[a:b], return_counts=True)):
            remaining[g] -= k
            if remaining[g] == 0:
                finished[int(g)] = buffers.pop(int(g), [])
    if not names:
        raise CdclError("no object was found in any image; nothing to measure")
    width = len(names)
    out = np.full((n_groups, len(objects) * width), np.nan)
    for g, blocks in finished.items():
        obj = np.concatenate([o for o, _ in blocks]) if blocks else np.zeros(0, np.int8)
        x = np.concatenate([v for _, v in blocks]) if blocks else np.zeros((0, width))
        for k in range(len(objects)):
            out[g, k * width : (k + 1) * width] = _median(x[obj == k], width)
    full = [f"{object_prefix(o)}_{n}" for o in objects for n in names]
    return out, full


def _pycytominer() -> Any:
    """pycytominer, imported without keeping the pandas option it sets on import.

    Importing it turns on pandas' copy-on-write for the whole process, after which arrays from
    ``to_numpy()`` may be read-only views and in-place updates elsewhere in cdcl would fail.
    """
    before = pd.options.mode.copy_on_write
    import pycytominer

    pd.options.mode.copy_on_write = before
    return pycytominer


def normalize_per_plate(table: pd.DataFrame, features: list[str], method: str) -> pd.DataFrame:
    """pycytominer ``normalize`` of each plate against its controls (all its rows if none)."""
    pycytominer = _pycytominer()

    if method == "none":
        return table
    parts = []
    meta_cols = [c for c in table.columns if c not in set(features)]
    for plate, grp in table.groupby("Metadata_Plate", sort=False):
        has_controls = bool(grp["Metadata_Is_Control"].astype(bool).any())
        if not has_controls:
            warnings.warn(
                f"plate {plate}: no control profiles; normalised against all its profiles",
                stacklevel=2,
            )
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            parts.append(
                pycytominer.normalize(
                    profiles=grp,
                    features=features,
                    meta_features=meta_cols,
                    samples="Metadata_Is_Control == True" if has_controls else "all",
                    method=method,
                )
            )
    return pd.concat(parts).loc[table.index]


def select_features(table: pd.DataFrame, features: list[str]) -> list[str]:
    """The features pycytominer's ``feature_select`` keeps (operations in ``SELECTION``)."""
    pycytominer = _pycytominer()

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        kept = pycytominer.feature_select(
            profiles=table, features=features, operation=list(SELECTION)
        )
    return [c for c in features if c in kept.columns]


def finish_profiles(
    x: np.ndarray, meta: pd.DataFrame, names: list[str], options: CellProfilerOptions
) -> tuple[np.ndarray, list[str]]:
    """Normalise per plate, select features and fill what is still missing with 0."""
    table = pd.concat(
        [to_metadata_frame(meta), pd.DataFrame(x, columns=names)], axis=1
    ).reset_index(drop=True)
    table = normalize_per_plate(table, names, options.normalize)
    # A feature constant over a plate's controls divides by pycytominer's 1e-18 floor and can
    # overflow: treat it as missing, so feature selection drops it like any incomplete column.
    table[names] = table[names].replace([np.inf, -np.inf], np.nan)
    kept = select_features(table, names) if options.select else list(names)
    if not kept:
        raise CdclError(
            "feature selection kept no CellProfiler feature (too few profiles?); "
            "rerun with --no-select"
        )
    out = table[kept].to_numpy(dtype=np.float64)
    if options.select:
        out = np.where(np.isfinite(out), out, 0.0)
    return out.astype(np.float32), kept


@dataclass
class CellProfilerResult:
    """Profiles of one run of the pipeline and what it cost."""

    features: np.ndarray
    meta: pd.DataFrame
    names: list[str]
    info: dict[str, Any]


def cellprofiler_profiles(
    dataset: Any,
    indices: np.ndarray,
    image_meta: pd.DataFrame,
    *,
    level: str = "well",
    options: CellProfilerOptions | None = None,
    work_dir: Path | None,
    key: str = "",
    chunk_size: int = CHUNK_SIZE,
    workers: int = 1,
    progress: bool = True,
    desc: str = "cellprofiler",
) -> tuple[CellProfilerResult, CellJob]:
    """The CellProfiler profiles of ``indices`` (one ``image_meta`` row each, same order).

    Measurements go through resumable parts in a job directory under ``work_dir`` named by
    ``key``, the dataset's images and the options (a temporary directory when ``work_dir`` is
    None); the caller removes the returned job once its output is written. ``level`` is ``well`` (median over the cells of all sites of a
    well) or ``image``. ``workers`` processes measure chunks in parallel (the parts and the
    profiles do not depend on their number).
    """
    options = options or CellProfilerOptions()
    indices = np.asarray(indices, dtype=np.int64)
    mode, objects = resolve_objects(dataset, options.segmentation)
    job = _cell_job(indices, options, mode, work_dir, key, chunk_size)
    diameter, warning = check_nucleus_size(dataset, indices, options)
    if warning:
        _say(f"{desc}: warning: {warning}")
    pending = job.pending()
    if len(pending) < job.n_chunks:
        done = job.n_chunks - len(pending)
        print(f"{desc}: resuming, {done} of {job.n_chunks} parts already measured", file=sys.stderr)
    cost = job.run_parallel(
        pending, dataset, indices, options, workers=workers, progress=progress, desc=desc
    )
    groups, n_groups, meta = _profile_groups(image_meta, level, len(indices))
    t0 = time.perf_counter()
    x, names = median_profiles(job, np.asarray(groups), n_groups)
    feats, kept = finish_profiles(x, meta, names, options)
    info = {
        "baseline": "cellprofiler",
        "cp_measure": _version("cp_measure"),
        "pycytominer": _version("pycytominer"),
        **asdict(options),
        "families": list(options.families),
        "segmentation": mode,
        "objects": objects,
        "level": level,
        "features_measured": len(names),
        "features_kept": len(kept),
        "measured_now": cost,
        "aggregate_normalize_select_s": round(time.perf_counter() - t0, 3),
        "median_nucleus_diameter_px": None if np.isnan(diameter) else round(diameter, 2),
        "warnings": [warning] if warning else [],
    }
    return CellProfilerResult(feats, meta, kept, info), job


def _cell_job(
    indices: np.ndarray,
    options: CellProfilerOptions,
    mode: str,
    work_dir: Path | None,
    key: str,
    chunk_size: int,
) -> CellJob:
    """The prepared measuring job of these images and options (its parts may exist already)."""
    fields = {
        "key": key,
        "images": hashlib.sha256(indices.tobytes()).hexdigest()[:16],
        "families": list(options.families),
        "segmentation": mode,
        "nucleus_diameter": options.nucleus_diameter,
        "chunk_size": chunk_size,
    }
    # Without a work directory the parts go to a private temporary one (removed with the job).
    job_dir = (
        Path(tempfile.mkdtemp(prefix="cdcl-cellprofiler-"))
        if work_dir is None
        else Path(work_dir) / f".cellprofiler-{job_key(fields)}"
    )
    job = CellJob(job_dir, len(indices), chunk_size)
    job.prepare(fields)
    return job


def _profile_groups(
    image_meta: pd.DataFrame, level: str, n_images: int
) -> tuple[np.ndarray, int, pd.DataFrame]:
    """Every image's profile (its well's, or its own), the number of profiles, their metadata."""
    if level == "well":
        acc = WellAccumulator(image_meta)
        return acc.codes, acc.n_wells, acc.meta.copy()
    if level == "image":
        return np.arange(n_images), n_images, image_meta.reset_index(drop=True).copy()
    raise CdclError(f"--level {level}: choose well or image")


def write_named_profiles(
    features: np.ndarray,
    meta: pd.DataFrame,
    names: list[str],
    path: str | Path,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write profiles with named features by extension (.parquet, .csv[.gz], .h5ad), atomically.

    Parquet keeps ``provenance`` in its ``cdcl.embed`` key-value metadata, as ``cdcl embed``.
    """
    import anndata as ad

    from cdcl.embed.job import META_KEY

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = np.asarray(features, dtype=np.float32)
    table = pd.concat(
        [to_metadata_frame(meta), pd.DataFrame(x, columns=list(names))], axis=1
    ).reset_index(drop=True)
    name = path.name.lower()
    with atomic_path(path) as tmp:
        if name.endswith(".parquet"):
            t = pa.Table.from_pandas(table, preserve_index=False)
            info = json.dumps(provenance or {}, default=str)
            t = t.replace_schema_metadata({**(t.schema.metadata or {}), META_KEY: info})
            pq.write_table(t, tmp)
        elif name.endswith((".csv", ".csv.gz")):
            table.to_csv(tmp, index=False, compression="gzip" if name.endswith(".gz") else None)
        elif name.endswith(".h5ad"):
            obs = meta.reset_index(drop=True).copy()
            for c in obs.columns:  # h5ad wants plain strings
                if obs[c].dtype == object:
                    obs[c] = obs[c].map(lambda v: "" if v is None or v != v else str(v))
            obs.index = [str(i) for i in range(len(obs))]
            adata = ad.AnnData(X=x, obs=obs)
            adata.var_names = list(names)
            adata.obsm["X_cdcl"] = x
            adata.write_h5ad(tmp)
        else:
            raise CdclError(f"{path}: unknown profile format; use .parquet, .h5ad, .csv or .csv.gz")
    return path


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module.replace("_", "-"))
    except PackageNotFoundError:
        return "unknown"


class CellProfilerSource:
    """CellProfiler features as a feature set of ``cdcl evaluate`` and the demo.

    Unlike a backbone it is not applied to image batches: :meth:`profiles` runs the whole
    pipeline on the images to evaluate and returns well (or image) profiles.
    """

    def __init__(self, options: CellProfilerOptions | None = None) -> None:
        self.options = options or CellProfilerOptions()
        self.warnings: list[str] = []  # those of the last run, for results.json and the report

    def profiles(
        self,
        dataset: Any,
        indices: np.ndarray,
        image_meta: pd.DataFrame,
        level: str,
        work_dir: Path | None,
        key: str,
        progress: bool,
        desc: str = "cellprofiler",
    ) -> tuple[np.ndarray, pd.DataFrame, CellJob]:
        """Profiles (n, F) float32, their metadata and the job holding the parts."""
        res, job = cellprofiler_profiles(
            dataset,
            indices,
            image_meta,
            level=level,
            options=self.options,
            work_dir=work_dir,
            key=key,
            progress=progress,
            desc=desc,
        )
        self.warnings = list(res.info.get("warnings", []))
        return res.features, res.meta, job


__all__ = [
    "SELECTION",
    "CellJob",
    "CellProfilerResult",
    "CellProfilerSource",
    "cellprofiler_profiles",
    "check_nucleus_size",
    "estimate_line",
    "finish_profiles",
    "median_profiles",
    "normalize_per_plate",
    "nucleus_diameters",
    "select_features",
    "small_nuclei_warning",
    "write_named_profiles",
]
