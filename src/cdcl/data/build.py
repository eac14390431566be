"""Shared build engine for the real-data adapters: validate inputs, read, resize, write.

An adapter turns its layout into two things: a metadata table (one row per field of view, with
the dataset schema's columns) and a :class:`FieldSource` that reads the raw channels of row i.
:func:`build_dataset` then

1. probes every input (file exists, header readable, one grayscale plane per file, bit depth,
   size) in a worker pool and reports missing / unreadable / malformed inputs with a count and
   the first offenders, or, with ``skip_bad``, drops those rows and records them in
   ``skipped.csv`` inside the dataset;
2. writes the images through :class:`~cdcl.data.dataset_dir.DatasetWriter` in blocks: workers
   read and resize (anti-aliased, bit depth kept), the main process writes. The writer marks
   an image done only after its pixels are on disk, and a re-run with the same build key
   (adapter + arguments + the exact rows) resumes where a killed build stopped;
3. commits: plate statistics from the controls, validation, atomic rename.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import tifffile
from PIL import Image
from tqdm import tqdm

from cdcl._version import __version__
from cdcl.data.dataset_dir import DatasetInfo, DatasetWriter
from cdcl.errors import CdclError

TIFF_SUFFIXES = (".tif", ".tiff")
BLOCK = 16  # images per worker task: large enough to amortise IPC, small enough to resume finely
MAX_LISTED = 3  # offenders named in one error line


@dataclass
class Problem:
    """One bad input of one field: which file, what kind, why."""

    row: int
    file: str
    kind: str  # missing | unreadable | channels | shape | depth
    reason: str


@dataclass
class Probe:
    """What the header of one field says: per-plane (H, W) and the pixel dtype."""

    shapes: list[tuple[int, int]]
    dtype: str


class FieldSource(Protocol):
    """Reads the raw channel planes of one field (row) of an adapter's table."""

    def __len__(self) -> int: ...

    def probe(self, i: int) -> Probe | Problem:
        """Check row i cheaply (headers only) without decoding all pixels."""
        ...

    def load(self, i: int) -> list[np.ndarray]:
        """The channel planes (H, W) of row i, in the dataset's channel order."""
        ...

    def subset(self, rows: np.ndarray) -> FieldSource:
        """The same source restricted to the given rows (in that order)."""
        ...


# --------------------------------------------------------------------------- image files


def _png_dtype(mode: str) -> str | None:
    if mode in ("L", "1", "P"):
        return "uint8"
    if mode.startswith("I;16") or mode == "I":
        return "uint16"
    return None


def probe_image_file(path: str) -> tuple[tuple[int, int], str]:
    """(H, W) and dtype of a single-plane image file from its header; raises on a bad file."""
    if path.lower().endswith(TIFF_SUFFIXES):
        size = os.path.getsize(path)
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            # A multi-page TIFF (one page per channel) reads as C x H x W: its series says so.
            shape = tuple(tif.series[0].shape) if tif.series else tuple(page.shape)
            dtype = str(page.dtype)
            ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts)]
        if ends and max(ends) > size:
            raise ValueError(f"truncated: pixel data ends at byte {max(ends)}, file has {size}")
        if len(shape) != 2:
            raise _ChannelsError(shape)
        if dtype not in ("uint8", "uint16"):
            raise _DepthError(dtype)
        return (int(shape[0]), int(shape[1])), dtype
    with Image.open(path) as im:
        mode, (w, h) = im.mode, im.size
        # verify() walks every chunk and checks CRCs, so a truncated PNG is caught here.
        im.verify()
    dtype = _png_dtype(mode)
    if dtype is None:
        if mode in ("RGB", "RGBA", "LA", "CMYK", "YCbCr"):
            raise _ChannelsError((h, w, len(mode.replace("YCbCr", "YCC"))))
        raise _DepthError(mode)
    return (h, w), dtype


def read_image_file(path: str) -> np.ndarray:
    """Decode a single-plane 8- or 16-bit image file (TIFF via tifffile, others via PIL)."""
    if path.lower().endswith(TIFF_SUFFIXES):
        try:
            arr = tifffile.imread(path)
        except ValueError:
            # tifffile needs the optional imagecodecs for LZW (Phenix exports); PIL decodes it.
            with Image.open(path) as im:
                arr = np.asarray(im)
    else:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im)
            if im.mode == "I":  # PIL decodes some 16-bit PNGs as 32-bit ints
                arr = np.clip(arr, 0, 65535).astype(np.uint16)
    if arr.ndim != 2:
        raise _ChannelsError(arr.shape)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    return arr


class _ChannelsError(ValueError):
    def __init__(self, shape: tuple[int, ...]) -> None:
        shape = tuple(int(x) for x in shape)
        if len(shape) == 3:
            # The channel axis is the short one: first for planes (C x H x W, multi-page TIFF),
            # last for interleaved samples (H x W x C, RGB).
            first = shape[0] <= shape[-1]
            n = shape[0] if first else shape[-1]
            layout = "C x H x W" if first else "H x W x C"
            what = f"holds {n} channels (shape {shape}, read as {layout})"
        else:
            what = f"holds {len(shape)}-dimensional pixel data (shape {shape})"
        super().__init__(f"{what}; each file must be one grayscale plane")


class _DepthError(ValueError):
    def __init__(self, what: str) -> None:
        super().__init__(f"pixel type {what} unsupported; use 8- or 16-bit grayscale images")


class FileFields:
    """A field = one file per channel (RxRx1 PNGs, Cell Painting TIFFs, any path template)."""

    def __init__(self, paths: list[list[str]]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def probe(self, i: int) -> Probe | Problem:
        """Check that every channel file exists and its header is a readable 8/16-bit plane."""
        shapes, dtypes = [], set()
        for p in self.paths[i]:
            if not os.path.isfile(p):
                return Problem(i, p, "missing", "file not found")
            try:
                shape, dtype = probe_image_file(p)
            except _ChannelsError as e:
                return Problem(i, p, "channels", str(e))
            except _DepthError as e:
                return Problem(i, p, "depth", str(e))
            except Exception as e:  # any decoder error means the file cannot be used
                return Problem(i, p, "unreadable", f"{type(e).__name__}: {e}".strip())
            shapes.append(shape)
            dtypes.add(dtype)
        if len(dtypes) > 1:
            return Problem(
                i, self.paths[i][0], "depth", f"channels mix bit depths {sorted(dtypes)}"
            )
        return Probe(shapes, dtypes.pop())

    def load(self, i: int) -> list[np.ndarray]:
        """Decode every channel file of row i."""
        return [read_image_file(p) for p in self.paths[i]]

    def describe(self, i: int) -> str:
        """The first file of row i, for messages."""
        return self.paths[i][0]

    def subset(self, rows: np.ndarray) -> FileFields:
        """Restrict to rows."""
        return FileFields([self.paths[int(r)] for r in rows])


class ArrayFields:
    """A field = one slice of a multi-channel array file (.npz / .npy), e.g. single-cell crops."""

    def __init__(self, path: str, key: str | None, channel_axis: int, n_channels: int) -> None:
        self.path, self.key, self.channel_axis, self.n_channels = (
            path,
            key,
            channel_axis,
            n_channels,
        )
        self.rows: np.ndarray | None = None
        self._array: np.ndarray | None = None

    @property
    def array(self) -> np.ndarray:
        """The whole array as (N, C, H, W), loaded once (forked workers share it)."""
        if self._array is None:
            self._array = load_array_file(self.path, self.key, self.channel_axis, self.n_channels)
        return self._array

    def __len__(self) -> int:
        return len(self.array) if self.rows is None else len(self.rows)

    def _row(self, i: int) -> int:
        return i if self.rows is None else int(self.rows[i])

    def probe(self, i: int) -> Probe | Problem:
        """Arrays were checked as a whole on load: every row has the same shape and dtype."""
        a = self.array
        return Probe([tuple(a.shape[2:])] * a.shape[1], str(a.dtype))

    def load(self, i: int) -> list[np.ndarray]:
        """The planes of row i."""
        return list(self.array[self._row(i)])

    def describe(self, i: int) -> str:
        """Array file and row, for messages."""
        return f"{self.path}[{self._row(i)}]"

    def subset(self, rows: np.ndarray) -> ArrayFields:
        """Restrict to rows (shares the loaded array)."""
        out = ArrayFields(self.path, self.key, self.channel_axis, self.n_channels)
        out._array = self.array
        base = np.arange(len(self.array)) if self.rows is None else self.rows
        out.rows = base[np.asarray(rows, dtype=np.int64)]
        return out


def load_array_file(path: str, key: str | None, channel_axis: int, n_channels: int) -> np.ndarray:
    """Load an (N, ..., C, ...) uint8/uint16 array from .npz/.npy and return it as (N, C, H, W)."""
    if not os.path.isfile(path):
        raise CdclError(f"{path}: array file not found; check --npz")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:
        raise CdclError(
            f"{path}: unreadable array file ({type(e).__name__}); pass a .npz or .npy"
        ) from None
    if isinstance(data, np.lib.npyio.NpzFile):
        keys = list(data.keys())
        if key is None:
            if len(keys) != 1:
                raise CdclError(f"{path}: holds arrays {keys}; choose one with --npz-key")
            key = keys[0]
        if key not in keys:
            raise CdclError(f"{path}: no array `{key}` (it holds {', '.join(keys)}); fix --npz-key")
        arr = data[key]
    else:
        arr = data
    if arr.ndim == 3:  # (N, H, W): one channel
        arr = arr[:, None]
        channel_axis = 1
    if arr.ndim != 4:
        raise CdclError(
            f"{path}: array of shape {arr.shape}; expected (N, H, W, C) or (N, C, H, W)"
        )
    axis = channel_axis % 4
    if axis == 0:
        raise CdclError(
            "--channel-axis 0 is the image axis; use the axis of the channels (e.g. -1)"
        )
    if arr.shape[axis] != n_channels:
        raise CdclError(
            f"{path}: {arr.shape[axis]} channels along axis {channel_axis} of shape {arr.shape}, "
            f"but --channels names {n_channels}; fix --channels or --channel-axis"
        )
    if arr.dtype not in (np.uint8, np.uint16):
        raise CdclError(f"{path}: pixel dtype {arr.dtype}; expected uint8 or uint16")
    return np.ascontiguousarray(np.moveaxis(arr, axis, 1))


# --------------------------------------------------------------------------- resizing


def resize_plane(plane: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize one plane to (H, W), anti-aliased, keeping its integer dtype.

    Downscaling uses PIL's BOX filter (the exact area average over each output pixel: no
    aliasing and no ringing overshoot), upscaling bilinear; both run in float32 ("F" mode), so
    16-bit values are never squeezed through 8 bits, and round back to the input dtype.
    """
    if tuple(plane.shape) == tuple(size):
        return plane
    h, w = size
    down = h <= plane.shape[0] and w <= plane.shape[1]
    resample = Image.Resampling.BOX if down else Image.Resampling.BILINEAR
    im = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32))
    out = np.asarray(im.resize((w, h), resample=resample), dtype=np.float32)
    info = np.iinfo(plane.dtype)
    return np.clip(np.rint(out), info.min, info.max).astype(plane.dtype)


def load_field(source: FieldSource, i: int, size: tuple[int, int], dtype: str) -> np.ndarray:
    """Row i as a (C, H, W) array of the dataset's size and dtype."""
    planes = source.load(i)
    return np.stack([resize_plane(p, size) for p in planes]).astype(dtype, copy=False)


# --------------------------------------------------------------------------- worker pool

_WORKER: dict[str, Any] = {}


def _init_worker(source: FieldSource, size: tuple[int, int] | None, dtype: str | None) -> None:
    _WORKER.update(source=source, size=size, dtype=dtype)


def _probe_task(i: int) -> Probe | Problem:
    return _WORKER["source"].probe(i)


def _load_task(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, str]:
    src, size, dtype = _WORKER["source"], _WORKER["size"], _WORKER["dtype"]
    out = np.empty((len(indices), 0), dtype=dtype)
    blocks = []
    for i in indices:
        try:
            blocks.append(load_field(src, int(i), size, dtype))
        except Exception as e:  # reported by the main process as one line naming the file
            return (
                indices,
                None,
                f"{src.describe(int(i))}: cannot be decoded ({type(e).__name__}: {e})",
            )
    out = np.stack(blocks) if blocks else out
    return indices, out, ""


def _mp_context() -> mp.context.BaseContext:
    # fork shares an array source already in memory; fall back where fork does not exist.
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def _parallel_map(
    func: Any, items: list[Any], workers: int, init: tuple[Any, ...]
) -> Iterator[Any]:
    """Ordered map of func over items, in-process for one worker, else in a process pool."""
    if workers <= 1:
        _init_worker(*init)
        yield from (func(x) for x in items)
        return
    with _mp_context().Pool(workers, initializer=_init_worker, initargs=init) as pool:
        yield from pool.imap(func, items, chunksize=1 if func is _load_task else 64)


# --------------------------------------------------------------------------- the build


@dataclass
class BuildReport:
    """What a build did: where, how many images, what was skipped, resumed or warned about."""

    path: Path
    n_images: int
    n_written: int
    n_skipped: int
    resumed_from: int
    seconds: float
    warnings: list[str] = field(default_factory=list)


def _problem_message(kind: str, probs: list[Problem], n_rows: int) -> str:
    first = ", ".join(p.file for p in probs[:MAX_LISTED])
    more = f" and {len(probs) - MAX_LISTED} more" if len(probs) > MAX_LISTED else ""
    fix = "pass --skip-bad to drop those images (they are listed in skipped.csv)"
    if kind == "missing":
        return f"{len(probs)} of {n_rows} images have missing files: {first}{more}; fix the paths or {fix}"
    p = probs[0]
    what = {
        "unreadable": "unreadable image",
        "channels": "wrong channel count",
        "depth": "bit depth",
    }
    return (
        f"{p.file}: {what.get(kind, kind)}: {p.reason}"
        + (f" ({len(probs)} images affected)" if len(probs) > 1 else "")
        + f"; replace the file or {fix}"
    )


def design_warnings(samples: pd.DataFrame) -> list[str]:
    """Documented fallbacks a design triggers: plates without controls, one-batch treatments."""
    out = []
    ctrl_plates = set(samples.loc[samples["is_control"], "plate"].astype(str))
    no_ctrl = sorted(set(samples["plate"].astype(str)) - ctrl_plates)
    if no_ctrl:
        out.append(
            f"{len(no_ctrl)} plate(s) without negative controls ({', '.join(no_ctrl[:MAX_LISTED])}"
            f"{', ...' if len(no_ctrl) > MAX_LISTED else ''}); their plate statistics fall back to "
            "all their images"
        )
    treat = samples.loc[~samples["is_control"]]
    nb = treat.groupby("treatment")["batch"].nunique()
    single = sorted(nb.index[nb < 2].astype(str))
    if single and samples["batch"].nunique() > 1:
        out.append(
            f"{len(single)} treatment(s) present in one batch only ({', '.join(single[:MAX_LISTED])}"
            f"{', ...' if len(single) > MAX_LISTED else ''}); cross-batch pairing falls back to the "
            "same batch for them"
        )
    return out


def _samples_digest(samples: pd.DataFrame) -> str:
    buf = io.StringIO()
    samples.to_csv(buf, index=False)
    return hashlib.sha256(buf.getvalue().encode()).hexdigest()


def _probe_inputs(
    source: FieldSource, samples: pd.DataFrame, channels: list[str], workers: int, skip_bad: bool
) -> tuple[list[Probe | Problem], list[Problem], np.ndarray, str]:
    """Probe every input before any pixel is written: (probes, problems, rows kept, dtype)."""
    probes = list(
        _parallel_map(_probe_task, list(range(len(source))), workers, (source, None, None))
    )
    problems = [p for p in probes if isinstance(p, Problem)]
    if problems and not skip_bad:
        for kind in ("missing", "unreadable", "channels", "depth"):
            of_kind = [p for p in problems if p.kind == kind]
            if of_kind:
                raise CdclError(_problem_message(kind, of_kind, len(samples)))
    n_channels = {len(p.shapes) for p in probes if isinstance(p, Probe)}
    if len(n_channels) > 1 or (n_channels and n_channels.pop() != len(channels)):
        raise CdclError(
            f"wrong channel count: fields have {sorted(n_channels)} planes, channels are {channels}"
        )
    bad_rows = np.array(sorted({p.row for p in problems}), dtype=np.int64)
    keep = np.setdiff1d(np.arange(len(samples)), bad_rows)
    if len(keep) == 0:
        raise CdclError(
            f"all {len(samples)} images are bad (first: {problems[0].file}: {problems[0].reason})"
        )
    dtypes = sorted({probes[i].dtype for i in keep})
    if len(dtypes) > 1:
        first8 = next(source.describe(int(i)) for i in keep if probes[i].dtype == dtypes[0])
        first16 = next(source.describe(int(i)) for i in keep if probes[i].dtype == dtypes[1])
        raise CdclError(
            f"inputs mix bit depths ({dtypes[0]} e.g. {first8}, {dtypes[1]} e.g. {first16}); "
            "convert them to one depth first"
        )
    return probes, problems, keep, dtypes[0]


def _output_size(good: list[Probe], image_size: int | tuple[int, int] | None) -> tuple[int, int]:
    """(H, W) of the stored images: the inputs' own size, or the requested one."""
    if image_size is None:
        shapes = sorted({s for p in good for s in p.shapes})
        if len(shapes) > 1:
            raise CdclError(
                f"images have different sizes {shapes[:MAX_LISTED]}; pass --image-size N"
            )
        size = shapes[0]
    elif isinstance(image_size, int):
        size = (int(image_size), int(image_size))
    else:
        size = (int(image_size[0]), int(image_size[1]))
    if min(size) < 1:
        raise CdclError(f"--image-size {image_size}: must be a positive number of pixels")
    return size


def _skipped_table(
    samples: pd.DataFrame, bad_rows: np.ndarray, problems: list[Problem], columns: tuple[str, ...]
) -> pd.DataFrame:
    """skipped.csv: the metadata of each bad input with its file, problem and reason."""
    cols = [c for c in columns if c in samples.columns]
    skipped = samples.iloc[bad_rows][cols].reset_index(drop=True)
    by_row: dict[int, Problem] = {}
    for p in problems:
        by_row.setdefault(p.row, p)
    skipped["file"] = [by_row[int(r)].file for r in bad_rows]
    skipped["problem"] = [by_row[int(r)].kind for r in bad_rows]
    skipped["reason"] = [by_row[int(r)].reason for r in bad_rows]
    return skipped


def _write_pending(
    writer: DatasetWriter,
    src: FieldSource,
    size: tuple[int, int],
    dtype: str,
    workers: int,
    block: int,
    show: bool,
) -> tuple[int, int]:
    """Read, resize and store every image the writer still lacks: (written, resumed from)."""
    pending = writer.pending()
    total = writer.info.n_images
    resumed_from = total - len(pending)
    tasks = [pending[s : s + block] for s in range(0, len(pending), block)]
    bar = None
    if show:
        bar = tqdm(total=total, initial=resumed_from, unit="img", desc="build", file=sys.stderr)
    for indices, images, err in _parallel_map(_load_task, tasks, workers, (src, size, dtype)):
        if err:
            raise CdclError(f"{err}; fix or remove it and re-run (finished images are kept)")
        writer.write(indices, images)
        if bar is not None:
            bar.update(len(indices))
    if bar is not None:
        bar.close()
    return len(pending), resumed_from


def build_dataset(
    out: Path,
    samples: pd.DataFrame,
    source: FieldSource,
    *,
    name: str,
    source_name: str,
    channels: list[str],
    image_size: int | tuple[int, int] | None,
    build_args: dict[str, Any],
    workers: int = 1,
    skip_bad: bool = False,
    block: int = BLOCK,
    progress: bool | None = None,
    skipped_columns: tuple[str, ...] = ("batch", "plate", "well", "site", "treatment"),
) -> BuildReport:
    """Validate the inputs of an adapter's table, then write and commit the dataset at ``out``."""
    t0 = time.perf_counter()
    if len(samples) != len(source):
        raise CdclError(f"internal: {len(samples)} metadata rows but {len(source)} fields")
    if len(samples) == 0:
        raise CdclError("no images selected; check the metadata and the filters (e.g. --cell-type)")
    workers = max(1, int(workers))

    # 1. Probe every input before any pixel is written.
    probes, problems, keep, dtype = _probe_inputs(source, samples, channels, workers, skip_bad)
    bad_rows = np.setdiff1d(np.arange(len(samples)), keep)
    size = _output_size([probes[i] for i in keep], image_size)
    table = samples.iloc[keep].reset_index(drop=True)
    table.insert(0, "image", np.arange(len(table), dtype=np.int64))
    src = source.subset(keep) if len(bad_rows) else source
    notes = design_warnings(table)
    extra: dict[str, str | bytes] = {}
    if len(bad_rows):
        skipped = _skipped_table(samples, bad_rows, problems, skipped_columns)
        extra["skipped.csv"] = skipped.to_csv(index=False)
        notes.insert(0, f"skipped {len(bad_rows)} bad image(s); see skipped.csv in the dataset")

    # 2. Write, resuming a killed build with the same key.
    info = DatasetInfo(
        name=name,
        source=source_name,
        channels=list(channels),
        dtype=dtype,
        image_size=[int(size[0]), int(size[1])],
        n_images=len(table),
        build={"adapter": source_name, "args": build_args, "version": __version__},
    )
    key = {"adapter": source_name, "args": build_args, "rows": _samples_digest(table), "size": size}
    writer = DatasetWriter(Path(out), info, key)
    show = sys.stderr.isatty() if progress is None else progress
    n_written, resumed_from = _write_pending(writer, src, size, dtype, workers, block, show)

    # 3. Commit: plate statistics, validation, atomic rename. Fallback warnings are ours to report.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = writer.commit(table, extra_files=extra)
    return BuildReport(
        path=path,
        n_images=len(table),
        n_written=n_written,
        n_skipped=len(bad_rows),
        resumed_from=resumed_from,
        seconds=time.perf_counter() - t0,
        warnings=notes,
    )


def jsonable(args: dict[str, Any]) -> dict[str, Any]:
    """Build arguments as plain JSON values (paths as absolute strings), sorted by key."""
    out = {}
    for k, v in sorted(args.items()):
        if isinstance(v, Path):
            v = str(v.resolve())
        elif isinstance(v, (list, tuple)):
            v = [str(x.resolve()) if isinstance(x, Path) else x for x in v]
        out[k] = v
    json.dumps(out)  # fail early on anything that is not JSON
    return out
