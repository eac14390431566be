"""The canonical dataset directory: schema, atomic resumable writing, validation and fast reading.

Layout (docs/design.md §2)::

    DIR/dataset.json          name, source, channels in order, dtype, image size, build info
    DIR/samples.parquet       one row per image (field of view / site)
    DIR/images.zarr           N x C x H x W, one chunk per image
    DIR/plate_stats.parquet   per plate and channel: mean and std of negative-control pixels
    DIR/masks.zarr            optional: N x M x H x W object label masks (attribute `objects`
                              names the M object types, e.g. cells and nuclei; 0 = background)

A dataset is built in a hidden sibling ``.DIR.partial`` and renamed into place only once it is
complete and valid, so a killed build never leaves a valid-looking half dataset behind; a
re-run with the same build arguments resumes from the images already marked done.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from cdcl import schema
from cdcl.atomic import (  # noqa: F401  (atomic_write_* are also imported from here)
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    disk_full_cause,
    disk_full_error,
    naming_failures,
)
from cdcl.data.query import check_stored_query
from cdcl.errors import CdclError, DatasetError
from cdcl.parquet import read_parquet, write_parquet

FORMAT_VERSION = 1
INFO_FILE = "dataset.json"
SAMPLES_FILE = "samples.parquet"
IMAGES_DIR = "images.zarr"
PLATE_STATS_FILE = "plate_stats.parquet"
MASKS_DIR = "masks.zarr"
MASK_DTYPES = ("uint16", "int32")
PROGRESS_FILE = "done.npy"
BUILD_KEY_FILE = "build_key.json"

# column -> kind ("int", "str", "bool", "float"); required ones must be present and complete.
REQUIRED_COLUMNS: dict[str, str] = {
    "image": "int",
    "batch": "str",
    "plate": "str",
    "well": "str",
    "site": "int",
    "treatment": "str",
    "is_control": "bool",
}
OPTIONAL_COLUMNS: dict[str, str] = {
    "moa": "str",
    "compound": "str",
    "dose": "float",
    "cell_type": "str",
    "split": "str",
}
PIXEL_DTYPES = ("uint8", "uint16")
LARGE_IMAGE_BYTES = 256 * 1024  # above this, read_many reads chunk by chunk
# zarr skips a chunk equal to the fill value (an all-zero image) by default; every image gets
# its chunk file, so that a missing one always means a damaged store (see missing_chunks).
WRITE_EVERY_CHUNK: dict[str, Any] = {"write_empty_chunks": True}
# Extra columns a user may rely on for batch definitions etc. are kept as they are.


@dataclass
class DatasetInfo:
    """The contents of dataset.json."""

    name: str
    source: str
    channels: list[str]
    dtype: str
    image_size: list[int]  # [H, W]
    n_images: int
    build: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        """Serialise deterministically."""
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = INFO_FILE) -> DatasetInfo:
        """Parse and check dataset.json's fields (types, ranges, format version)."""
        try:
            schema.check(d, DATASET_SCHEMA, where, "rebuild it with `cdcl synth` or `cdcl build`")
        except schema.SchemaError as e:
            raise DatasetError(str(e)) from None
        args = (d.get("build") or {}).get("args") if isinstance(d.get("build"), dict) else None
        if isinstance(args, dict):
            try:
                check_stored_query(args.get("control_query"), where, "build.args.control_query")
            except CdclError as e:
                raise DatasetError(str(e)) from None
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


# What dataset.json must hold (cdcl.schema); other keys are kept but not read.
DATASET_SCHEMA = schema.Obj(
    required={
        "name": schema.Str(),
        "source": schema.Str(),
        "channels": schema.ListOf(schema.Str(nonempty=True), min_len=1, unique=True),
        "dtype": schema.Str(choices=PIXEL_DTYPES),
        "image_size": schema.ListOf(schema.Int(min=1), min_len=2, max_len=2),
        "n_images": schema.Int(min=1),
    },
    optional={
        "format_version": schema.Version(known=(FORMAT_VERSION,)),
        "build": schema.Obj(optional={"args": schema.MapOf(schema.Any())}),
    },
)


def partial_dir(out: Path) -> Path:
    """The hidden sibling a dataset is built in before it is renamed into place."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def atomic_write_parquet(df: pd.DataFrame, path: Path) -> None:
    """Write a DataFrame as Parquet atomically (a full disk leaves the previous file intact)."""
    with atomic_path(path) as tmp:
        write_parquet(df, tmp)


class DatasetWriter:
    """Builds a dataset directory into ``.OUT.partial`` and renames it into place on commit.

    ``build_key`` identifies what is being built (adapter, arguments, seed): a partial build
    with the same key is resumed, one with another key is discarded and restarted.
    """

    def __init__(
        self,
        out: Path,
        info: DatasetInfo,
        build_key: dict[str, Any] | None = None,
        mask_objects: list[str] | None = None,
    ) -> None:
        self.out = Path(out)
        self.info = info
        self.tmp = partial_dir(self.out)
        self.mask_objects = list(mask_objects or [])
        self.masks: Any = None
        key = json.dumps(
            build_key if build_key is not None else asdict(info), sort_keys=True, default=str
        )
        key_file = self.tmp / BUILD_KEY_FILE
        resumable = (
            key_file.exists()
            and key_file.read_text() == key
            and (self.tmp / PROGRESS_FILE).exists()
        )
        if resumable:
            try:
                self.done = np.load(self.tmp / PROGRESS_FILE)
                self.array = zarr.open_array(str(self.tmp / IMAGES_DIR), mode="r+").with_config(
                    WRITE_EVERY_CHUNK
                )
                resumable = (
                    self.done.shape == (info.n_images,) and self.array.shape[0] == info.n_images
                )
                if self.mask_objects:
                    self.masks = zarr.open_array(str(self.tmp / MASKS_DIR), mode="r+")
                    resumable = resumable and self.masks.shape[:2] == (
                        info.n_images,
                        len(self.mask_objects),
                    )
            except Exception:  # a partial build we cannot read is simply restarted
                resumable = False
        if not resumable:
            self._start(key_file, key)
        self.resumed = bool(resumable and self.done.any())

    def _start(self, key_file: Path, key: str) -> None:
        """A fresh partial directory: empty image (and mask) stores, progress and build key."""
        info = self.info
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        h, w = info.image_size
        with naming_failures(self.tmp / IMAGES_DIR):  # zarr's own writes do not name a file
            self.array = zarr.create_array(
                store=str(self.tmp / IMAGES_DIR),
                shape=(info.n_images, len(info.channels), h, w),
                chunks=(1, len(info.channels), h, w),
                dtype=info.dtype,
                # crc32c after compression: a changed byte anywhere in a chunk file fails the
                # read instead of decoding to wrong pixels.
                compressors=(
                    BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"),
                    Crc32cCodec(),
                ),
                fill_value=0,
                config=WRITE_EVERY_CHUNK,
            )
        if self.mask_objects:
            with naming_failures(self.tmp / MASKS_DIR):
                self.masks = create_mask_array(
                    self.tmp / MASKS_DIR, info.n_images, self.mask_objects, (h, w)
                )
        self.done = np.zeros(info.n_images, dtype=bool)
        self._save_progress()
        atomic_write_text(key_file, key)

    def _save_progress(self) -> None:
        with atomic_path(self.tmp / PROGRESS_FILE) as tmp, open(tmp, "wb") as f:
            np.save(f, self.done)

    def pending(self) -> np.ndarray:
        """Indices of images not yet written (all of them on a fresh build)."""
        return np.flatnonzero(~self.done)

    def write(
        self,
        indices: np.ndarray | list[int],
        images: np.ndarray,
        masks: np.ndarray | None = None,
    ) -> None:
        """Write images (n, C, H, W) and their masks (n, M, H, W) at the indices, then mark done."""
        indices = np.asarray(indices, dtype=np.int64)
        expected = (len(indices), len(self.info.channels), *self.info.image_size)
        if images.shape != expected:
            raise DatasetError(
                f"images.zarr: got a block of shape {images.shape}, expected {expected}"
            )
        images = images.astype(self.info.dtype, copy=False)
        if (masks is None) != (self.masks is None):
            raise ValueError("masks are written exactly when the writer was given mask_objects")
        if masks is not None:
            want = (len(indices), len(self.mask_objects), *self.info.image_size)
            if masks.shape != want:
                raise DatasetError(
                    f"{MASKS_DIR}: got a block of shape {masks.shape}, expected {want}"
                )
        # One chunk (image) per call: a slice write runs its chunks as concurrent tasks, and
        # when one fails (a full disk) the others are abandoned mid-flight and spill warnings
        # at exit. zarr writes each chunk to a temporary file and renames it, so the chunks
        # written before a failure stay intact; the block is not marked done, a rerun redoes it.
        for j, (i, img) in enumerate(zip(indices, images)):
            try:
                if masks is not None:
                    self.masks[int(i)] = masks[j]
                self.array[int(i)] = img
            except Exception as e:
                cause = disk_full_cause(e)
                if cause is None:
                    raise
                kept = (
                    f"stopped at image {int(i)}; the images written before are intact and a "
                    "rerun resumes from them"
                )
                raise disk_full_error(self.tmp / IMAGES_DIR, cause, kept) from e
        # Only after the pixels are on disk is the image marked done: a kill in between redoes it.
        self.done[indices] = True
        self._save_progress()

    def commit(
        self,
        samples: pd.DataFrame,
        extra_files: dict[str, str | bytes] | None = None,
        overwrite: bool = True,
    ) -> Path:
        """Write the tables, validate everything and rename the dataset into place."""
        if not self.done.all():
            raise DatasetError(
                f"{self.tmp}: {int((~self.done).sum())} images not written yet; cannot commit"
            )
        samples = normalise_samples(samples, where=f"{self.tmp / SAMPLES_FILE}")
        atomic_write_parquet(samples, self.tmp / SAMPLES_FILE)
        stats = compute_plate_stats(samples, self.array, self.info.channels)
        atomic_write_parquet(stats, self.tmp / PLATE_STATS_FILE)
        for name, content in (extra_files or {}).items():
            data = content.encode() if isinstance(content, str) else content
            atomic_write_bytes(self.tmp / name, data)
        atomic_write_text(self.tmp / INFO_FILE, self.info.to_json())
        validate(self.tmp, deep=False)
        (self.tmp / PROGRESS_FILE).unlink()
        (self.tmp / BUILD_KEY_FILE).unlink()
        if self.out.exists():
            if not overwrite:
                raise DatasetError(
                    f"{self.out}: already exists; pass --overwrite or choose another --out"
                )
            old = self.out.parent / f".{self.out.name}.old"
            if old.exists():
                shutil.rmtree(old)
            os.replace(self.out, old)
            os.replace(self.tmp, self.out)
            shutil.rmtree(old)
        else:
            os.replace(self.tmp, self.out)
        return self.out


def create_mask_array(path: Path, n: int, objects: list[str], size: tuple[int, int]) -> Any:
    """An empty N x M x H x W uint16 label store, one chunk per image, naming its objects."""
    arr = zarr.create_array(
        store=str(path),
        shape=(n, len(objects), *size),
        chunks=(1, len(objects), *size),
        dtype="uint16",
        compressors=BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"),
        fill_value=0,
    )
    arr.attrs["objects"] = list(objects)
    return arr


def _kind_ok(series: pd.Series, kind: str) -> bool:
    if kind == "int":
        return pd.api.types.is_integer_dtype(series)
    if kind == "bool":
        return pd.api.types.is_bool_dtype(series)
    if kind == "float":
        return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)
    return pd.api.types.is_string_dtype(series) or pd.api.types.is_object_dtype(series)


def normalise_samples(samples: pd.DataFrame, where: str = SAMPLES_FILE) -> pd.DataFrame:
    """Coerce a samples table to the schema's dtypes (strings as str, site as int) and check it."""
    df = samples.copy()
    for col, kind in {**REQUIRED_COLUMNS, **OPTIONAL_COLUMNS}.items():
        if col not in df.columns:
            continue
        if kind == "str":
            df[col] = df[col].astype(object).where(df[col].notna(), None)
            df[col] = [None if v is None else str(v) for v in df[col]]
            df[col] = df[col].astype(object)
        elif kind == "float":
            df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    df = df.sort_values("image", kind="stable").reset_index(drop=True) if "image" in df else df
    check_samples(df, where)
    return df


def check_samples(df: pd.DataFrame, where: str = SAMPLES_FILE, n_images: int | None = None) -> None:
    """Raise DatasetError naming the column/row when the samples table breaks the schema."""
    for col, kind in REQUIRED_COLUMNS.items():
        if col not in df.columns:
            hint = "; the cross-batch methods need it" if col == "batch" else ""
            raise DatasetError(f"{where}: column `{col}` missing{hint}")
        if not _kind_ok(df[col], kind):
            raise DatasetError(
                f"{where}: column `{col}` has dtype {df[col].dtype}, expected {kind}"
            )
        bad = df[col].isna().to_numpy()
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DatasetError(
                f"{where}: column `{col}` is empty in row {row}; every image needs a {col}"
            )
    for col, kind in OPTIONAL_COLUMNS.items():
        if col in df.columns and not df[col].isna().all() and not _kind_ok(df[col], kind):
            raise DatasetError(
                f"{where}: column `{col}` has dtype {df[col].dtype}, expected {kind}"
            )
    image = df["image"].to_numpy()
    n = len(df) if n_images is None else n_images
    if len(df) != n or not np.array_equal(np.sort(image), np.arange(n)):
        raise DatasetError(
            f"{where}: column `image` must number the {n} images 0..{n - 1} exactly once"
        )


def compute_plate_stats(
    samples: pd.DataFrame, array: Any, channels: list[str], block: int = 256
) -> pd.DataFrame:
    """Per plate and channel mean/std of the control images' pixels (all images when no controls)."""
    rows = []
    for plate, grp in samples.groupby("plate", sort=True):
        ctrl = grp[grp["is_control"]]
        source = "controls"
        if len(ctrl) == 0:
            warnings.warn(
                f"plate {plate}: no negative controls; plate statistics use all its images",
                stacklevel=2,
            )
            ctrl, source = grp, "all_images"
        idx = np.sort(ctrl["image"].to_numpy())
        s = np.zeros(len(channels))
        ss = np.zeros(len(channels))
        npix = 0
        for start in range(0, len(idx), block):
            imgs = read_images(array, idx[start : start + block]).astype(np.float64)
            s += imgs.sum(axis=(0, 2, 3))
            ss += np.square(imgs).sum(axis=(0, 2, 3))
            npix += imgs.shape[0] * imgs.shape[2] * imgs.shape[3]
        mean = s / npix
        std = np.sqrt(np.maximum(ss / npix - mean**2, 0.0))
        for c, name in enumerate(channels):
            rows.append(
                {
                    "plate": str(plate),
                    "channel": name,
                    "mean": float(mean[c]),
                    "std": float(std[c]),
                    "n_images": len(idx),
                    "source": source,
                }
            )
    return pd.DataFrame(rows)


def has_checksums(array: Any) -> bool:
    """True when every chunk of the zarr array carries a crc32c checksum verified on read."""
    codecs = getattr(array.metadata, "codecs", ())
    return any(isinstance(c, Crc32cCodec) for c in codecs)


def chunk_file(store: Path, array: Any, index: int) -> Path:
    """The file holding image ``index`` (one chunk per image) in the store directory."""
    return Path(store) / array.metadata.encode_chunk_key((int(index), 0, 0, 0))


def missing_chunks(store: Path, array: Any) -> list[int]:
    """Images of a one-chunk-per-image store whose chunk file is absent.

    zarr reads a missing chunk as the fill value, so an interrupted copy would read as
    all-zero images; one ``stat`` per image (about 10 us) finds them without decoding.
    """
    prefix = str(store) + os.sep
    encode = array.metadata.encode_chunk_key
    exists = os.path.exists
    return [i for i in range(int(array.shape[0])) if not exists(prefix + encode((i, 0, 0, 0)))]


def check_chunks_present(store: Path, array: Any) -> None:
    """DatasetError naming the first image whose chunk file is missing (and how many are)."""
    missing = missing_chunks(store, array)
    if missing:
        i = missing[0]
        more = (
            f" ({len(missing)} of {array.shape[0]} images lack theirs)" if len(missing) > 1 else ""
        )
        raise DatasetError(
            f"{store}: image {i} has no chunk file {chunk_file(store, array, i)}{more}; zarr "
            "would read it as an all-zero image (an interrupted copy?): copy the dataset again "
            "or rebuild it"
        )


def image_read_error(store: Path, array: Any, index: int, exc: BaseException) -> DatasetError:
    """The one-line error for an image whose chunk cannot be read or fails its checksum."""
    text = str(exc)
    if "checksum do not match" in text:
        why = "checksum mismatch: the file changed after it was written"
    elif isinstance(exc, FileNotFoundError):
        why = "file missing"
    else:
        why = f"corrupted chunk, {type(exc).__name__}: {text.splitlines()[0] if text else ''}"
    return DatasetError(
        f"{store}: image {int(index)} cannot be decoded ({why}); file {chunk_file(store, array, index)}; "
        "rebuild the dataset (or restore that file)"
    )


def read_checked(store: Path, array: Any, indices: np.ndarray) -> np.ndarray:
    """:func:`read_images`, with a failing chunk reported as a DatasetError naming image and file."""
    try:
        return read_images(array, indices)
    except Exception as e:
        if disk_full_cause(e) is not None:
            raise
        # Find the first image that fails on its own, to name it.
        for i in np.unique(np.asarray(indices, dtype=np.int64)):
            try:
                array[int(i)]
            except Exception as inner:
                raise image_read_error(store, array, int(i), inner) from None
        raise


def read_images(array: Any, indices: np.ndarray) -> np.ndarray:
    """Read images at arbitrary indices with one vectorised zarr call (order preserved)."""
    indices = np.asarray(indices, dtype=np.int64)
    if len(indices) == 0:
        return np.zeros((0, *array.shape[1:]), dtype=array.dtype)
    order = np.argsort(indices, kind="stable")
    sorted_idx = indices[order]
    uniq, inverse = np.unique(sorted_idx, return_inverse=True)
    per_image = int(np.prod(array.shape[1:])) * np.dtype(array.dtype).itemsize
    if per_image <= LARGE_IMAGE_BYTES:
        # Small images: one selection lets zarr fetch and decode the chunks concurrently.
        block = array.get_orthogonal_selection((uniq, slice(None), slice(None), slice(None)))
    else:
        # Large images: the selection's extra copy costs more than it saves (measured 2x).
        block = np.stack([np.asarray(array[int(i)]) for i in uniq])
    out = np.empty((len(indices), *block.shape[1:]), dtype=block.dtype)
    out[order] = block[inverse]
    return out


def _read_info(path: Path) -> DatasetInfo:
    f = path / INFO_FILE
    if not f.exists():
        partial = partial_dir(path)
        hint = (
            f" (an unfinished build is in {partial.name}; re-run the build to resume)"
            if partial.exists()
            else ""
        )
        raise DatasetError(f"{f}: not found; {path} is not a dataset directory{hint}")
    try:
        d = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(
            f"{f}: not valid JSON ({e.msg}, line {e.lineno}); rebuild the dataset"
        ) from None
    return DatasetInfo.from_dict(d, where=str(f))


def _open_array(path: Path) -> Any:
    store = path / IMAGES_DIR
    if not store.exists():
        raise DatasetError(f"{store}: image store missing; rebuild the dataset")
    try:
        return zarr.open_array(str(store), mode="r")
    except Exception as e:
        raise DatasetError(
            f"{store}: unreadable image store ({type(e).__name__}); rebuild the dataset"
        ) from None


def _read_samples(path: Path, info: DatasetInfo) -> pd.DataFrame:
    """samples.parquet, checked against the schema and dataset.json."""
    samples_file = path / SAMPLES_FILE
    if not samples_file.exists():
        raise DatasetError(f"{samples_file}: not found; rebuild the dataset")
    try:
        samples = read_parquet(samples_file)
    except Exception as e:
        raise DatasetError(
            f"{samples_file}: unreadable Parquet ({type(e).__name__}); rebuild the dataset"
        ) from None
    check_samples(samples, str(samples_file), n_images=info.n_images)
    return samples


def _check_image_array(store: Path, arr: Any, info: DatasetInfo) -> None:
    """The image array's shape, dtype and chunks match dataset.json."""
    n_ch = len(info.channels)
    if arr.ndim != 4:
        raise DatasetError(f"{store}: expected 4 dimensions (N, C, H, W), found shape {arr.shape}")
    if arr.shape[1] != n_ch:
        raise DatasetError(
            f"{store}: {arr.shape[1]} channels but dataset.json names {n_ch} ({', '.join(info.channels)}); "
            "fix `channels` in dataset.json or rebuild"
        )
    if arr.shape[0] != info.n_images or list(arr.shape[2:]) != list(info.image_size):
        raise DatasetError(
            f"{store}: shape {arr.shape} does not match dataset.json (n_images={info.n_images}, "
            f"image_size={info.image_size}); rebuild the dataset"
        )
    if str(arr.dtype) != info.dtype:
        raise DatasetError(
            f"{store}: pixel dtype {arr.dtype}, dataset.json says {info.dtype}; rebuild the dataset"
        )
    if tuple(arr.chunks[:2]) != (1, n_ch):
        raise DatasetError(
            f"{store}: chunks {arr.chunks}; expected one chunk per image (1, {n_ch}, H, W)"
        )


def _check_plate_stats(path: Path, info: DatasetInfo, samples: pd.DataFrame) -> None:
    """plate_stats.parquet holds every plate's statistics for every channel."""
    stats_file = path / PLATE_STATS_FILE
    if not stats_file.exists():
        raise DatasetError(f"{stats_file}: not found; rebuild the dataset")
    stats = read_parquet(stats_file)
    for col in ("plate", "channel", "mean", "std"):
        if col not in stats.columns:
            raise DatasetError(f"{stats_file}: column `{col}` missing; rebuild the dataset")
    plates = set(samples["plate"].astype(str))
    have = set(zip(stats["plate"].astype(str), stats["channel"].astype(str)))
    for p in sorted(plates):
        for ch in info.channels:
            if (p, ch) not in have:
                raise DatasetError(
                    f"{stats_file}: no statistics for plate {p}, channel {ch}; rebuild the dataset"
                )


def validate(path: Path, deep: bool = False) -> DatasetInfo:
    """Check a dataset directory against the schema; ``deep`` also decodes every image chunk."""
    path = Path(path)
    info = _read_info(path)
    samples = _read_samples(path, info)
    arr = _open_array(path)
    store = path / IMAGES_DIR
    _check_image_array(store, arr, info)
    check_chunks_present(store, arr)
    if (path / MASKS_DIR).exists():
        _check_masks(path, info)
    _check_plate_stats(path, info, samples)
    if deep:
        for i in range(info.n_images):
            try:
                arr[i]
            except Exception as e:
                raise image_read_error(store, arr, i, e) from None
    return info


def _check_masks(path: Path, info: DatasetInfo) -> Any:
    """Open masks.zarr and check it against dataset.json (N, M, H, W; objects named)."""
    store = path / MASKS_DIR
    try:
        arr = zarr.open_array(str(store), mode="r")
    except Exception as e:
        raise DatasetError(
            f"{store}: unreadable mask store ({type(e).__name__}); delete it or rebuild"
        ) from None
    objects = arr.attrs.get("objects")
    if not isinstance(objects, list) or arr.ndim != 4 or arr.shape[1] != len(objects):
        raise DatasetError(
            f"{store}: expected N x M x H x W labels with attribute `objects` naming the M "
            "object types; delete it or rebuild"
        )
    if arr.shape[0] != info.n_images or list(arr.shape[2:]) != list(info.image_size):
        raise DatasetError(
            f"{store}: shape {arr.shape} does not match the images (n_images={info.n_images}, "
            f"image_size={info.image_size}); delete it or rebuild"
        )
    if str(arr.dtype) not in MASK_DTYPES:
        raise DatasetError(f"{store}: label dtype {arr.dtype}; expected one of {MASK_DTYPES}")
    return arr


class Dataset:
    """An opened dataset directory: metadata tables plus lazy random access to images."""

    def __init__(self, path: Path, validate_on_open: bool = True) -> None:
        self.path = Path(path)
        self.info = validate(self.path) if validate_on_open else _read_info(self.path)
        self.samples = (
            read_parquet(self.path / SAMPLES_FILE).sort_values("image").reset_index(drop=True)
        )
        self.plate_stats = read_parquet(self.path / PLATE_STATS_FILE)
        self._array: Any = None
        self._pid: int | None = None
        self._masks: Any = None
        self._masks_pid: int | None = None
        self._mean, self._std = self._stats_per_image()

    @property
    def channels(self) -> list[str]:
        """Channel names in store order."""
        return list(self.info.channels)

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the stored images."""
        return int(self.info.image_size[0]), int(self.info.image_size[1])

    def __len__(self) -> int:
        return self.info.n_images

    @property
    def array(self) -> Any:
        """The zarr array, opened lazily and re-opened in a forked worker process."""
        if self._array is None or self._pid != os.getpid():
            self._array = _open_array(self.path)
            self._pid = os.getpid()
        return self._array

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_array"] = None  # zarr handles do not cross process boundaries
        state["_masks"] = None
        return state

    def read(self, index: int) -> np.ndarray:
        """One image (C, H, W) in its stored dtype."""
        try:
            return np.asarray(self.array[int(index)])
        except Exception as e:
            if disk_full_cause(e) is not None:
                raise
            raise image_read_error(self.path / IMAGES_DIR, self.array, int(index), e) from None

    def read_many(self, indices: np.ndarray | list[int]) -> np.ndarray:
        """Images (n, C, H, W) at the given indices, in that order."""
        return read_checked(self.path / IMAGES_DIR, self.array, np.asarray(indices))

    @property
    def mask_objects(self) -> list[str]:
        """Names of the object label masks stored with the images ([] when none)."""
        if not (self.path / MASKS_DIR).exists():
            return []
        return list(_check_masks(self.path, self.info).attrs["objects"])

    def read_masks(self, indices: np.ndarray | list[int]) -> np.ndarray:
        """Label masks (n, M, H, W) of the given images, in the order of ``mask_objects``."""
        if self._masks is None or self._masks_pid != os.getpid():
            if not (self.path / MASKS_DIR).exists():
                raise DatasetError(f"{self.path / MASKS_DIR}: this dataset has no stored masks")
            self._masks, self._masks_pid = _check_masks(self.path, self.info), os.getpid()
        return read_images(self._masks, np.asarray(indices))

    def _stats_per_image(self) -> tuple[np.ndarray, np.ndarray]:
        st = self.plate_stats.assign(plate=self.plate_stats["plate"].astype(str))
        mean = st.pivot(index="plate", columns="channel", values="mean")[self.channels]
        std = st.pivot(index="plate", columns="channel", values="std")[self.channels]
        plates = self.samples["plate"].astype(str)
        m = mean.loc[plates].to_numpy(np.float32)
        s = std.loc[plates].to_numpy(np.float32)
        return m, np.maximum(s, 1e-6).astype(np.float32)

    def plate_mean_std(self, indices: np.ndarray | list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Control mean and std (n, C) of each image's plate, in raw pixel units."""
        idx = np.asarray(indices)
        return self._mean[idx], self._std[idx]

    def standardized(self, indices: np.ndarray | list[int]) -> np.ndarray:
        """Images as float32, standardised with their own plate's control statistics."""
        idx = np.asarray(indices)
        imgs = self.read_many(idx).astype(np.float32)
        m, s = self.plate_mean_std(idx)
        return (imgs - m[:, :, None, None]) / s[:, :, None, None]


def open_dataset(path: str | Path, validate_on_open: bool = True) -> Dataset:
    """Open a dataset directory (validated unless told otherwise)."""
    return Dataset(Path(path), validate_on_open=validate_on_open)
