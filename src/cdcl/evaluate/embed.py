"""Backbone embeddings of centre views, well profiles, and export as Parquet / AnnData / CSV.

Any backbone that maps a float tensor (n, C, H, W) to vectors (n, D) can be embedded: a trained
method's ``embed``, a randomly initialised timm network, or a hand-crafted feature function.
Images are read in batches with their plate's control standardisation (``Dataset.standardized``),
cropped to the evaluation view and embedded under ``torch.inference_mode``; features are float32.

Exported tables follow the profiling conventions of pycytominer and copairs: metadata columns
are ``Metadata_<name>`` and every other column is a feature; AnnData files keep the features in
``obsm["X_cdcl"]`` (and ``X``) with the metadata in ``obs``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cdcl.errors import CdclError

# Metadata carried from samples.parquet into profiles, in export order.
META_COLUMNS = (
    "plate",
    "well",
    "site",
    "batch",
    "treatment",
    "moa",
    "compound",
    "dose",
    "is_control",
    "cell_type",
    "split",
)
METADATA_PREFIX = "Metadata_"
OBSM_KEY = "X_cdcl"

ViewFn = Callable[[Any], Any]  # Tensor (C, H, W) or (n, C, H, W) -> same, cropped/resized


def center_crop_batch(images: Any, size: int | None) -> Any:
    """Centre crop of a batch (n, C, H, W) to ``size`` x ``size`` (no-op when None or too big)."""
    if size is None:
        return images
    h, w = images.shape[-2:]
    if size >= h and size >= w:
        return images
    top = max(0, (h - size) // 2)
    left = max(0, (w - size) // 2)
    return images[..., top : top + size, left : left + size]


def make_view_fn(views_cfg: Any | None = None, size: int | None = None) -> ViewFn:
    """The evaluation view applied to a batch (n, C, H, W).

    With a views config, ``cdcl.data.views.center_view`` (the trainer's evaluation view:
    optional resize, then centre crop) is applied; without one, a plain centre crop to ``size``.
    """
    if views_cfg is not None:
        try:
            from cdcl.data.views import center_view
        except ImportError:  # views module not present: fall back to a centre crop
            center_view = None
        if center_view is not None:
            return lambda batch: center_view(batch, views_cfg)  # handles (n, C, H, W)
        size = size or getattr(views_cfg, "global_size", None)
    return lambda batch: center_crop_batch(batch, size)


def _as_module_callable(backbone: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Put nn.Modules in eval mode (BatchNorm/Dropout) before embedding."""
    if hasattr(backbone, "eval") and callable(backbone.eval):
        backbone.eval()
    return backbone


def embed_images(
    backbone: Callable[[Any], Any],
    dataset: Any,
    indices: np.ndarray | list[int] | None = None,
    view_fn: ViewFn | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    progress: bool = True,
    desc: str = "embed",
) -> np.ndarray:
    """Embed the centre view of each image: float32 array (len(indices), D), in index order."""
    import torch
    from tqdm import tqdm

    idx = np.arange(len(dataset)) if indices is None else np.asarray(indices, dtype=np.int64)
    view_fn = view_fn or (lambda b: b)
    fn = _as_module_callable(backbone)
    if hasattr(fn, "to"):
        fn.to(device)
    out: np.ndarray | None = None
    batch_size = max(1, int(batch_size))
    with torch.inference_mode():
        bar = tqdm(
            total=len(idx),
            desc=desc,
            unit="img",
            disable=not progress,
            leave=False,
            dynamic_ncols=True,
        )
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            x = torch.from_numpy(dataset.standardized(chunk)).to(device)
            x = view_fn(x)
            feats = fn(x)
            if isinstance(feats, tuple | list):  # some modules return (features, extra)
                feats = feats[0]
            feats = feats.reshape(feats.shape[0], -1).float().cpu().numpy()
            if out is None:  # allocate once the feature width is known
                out = np.empty((len(idx), feats.shape[1]), dtype=np.float32)
            out[start : start + len(chunk)] = feats
            bar.update(len(chunk))
        bar.close()
    if out is None:
        return np.zeros((0, 0), dtype=np.float32)
    return out


def image_meta(samples: pd.DataFrame, indices: np.ndarray | None = None) -> pd.DataFrame:
    """Metadata rows (``image`` + known metadata columns) of the given images, in that order."""
    s = samples if indices is None else samples.iloc[np.asarray(indices)]
    cols = ["image"] + [c for c in META_COLUMNS if c in s.columns]
    return s[cols].reset_index(drop=True)


def well_profiles(
    features: np.ndarray, samples: pd.DataFrame, chunk: int = 65536
) -> tuple[np.ndarray, pd.DataFrame]:
    """Mean over sites per (plate, well): float32 profiles and one metadata row per well.

    ``samples`` holds one row per feature row (same order). Metadata that is constant within
    a well is kept; ``site`` becomes ``n_sites``.
    """
    if len(samples) != len(features):
        raise ValueError(f"{len(features)} feature rows but {len(samples)} metadata rows")
    s = samples.reset_index(drop=True)
    keys = s["plate"].astype(str) + "\x00" + s["well"].astype(str)
    codes, uniq = pd.factorize(keys, sort=True)
    n_wells = len(uniq)
    sums = np.zeros((n_wells, features.shape[1]), dtype=np.float64)
    for a in range(0, len(features), chunk):  # chunked so a float64 copy never exceeds a block
        np.add.at(sums, codes[a : a + chunk], np.asarray(features[a : a + chunk], np.float64))
    counts = np.bincount(codes, minlength=n_wells)
    profiles = (sums / counts[:, None]).astype(np.float32)
    first = pd.Series(np.arange(len(s))).groupby(codes).first().to_numpy()
    cols = [c for c in META_COLUMNS if c in s.columns and c != "site"]
    meta = s.iloc[first][cols].reset_index(drop=True)
    meta["n_sites"] = counts.astype(np.int64)
    return profiles, meta


def to_metadata_frame(meta: pd.DataFrame) -> pd.DataFrame:
    """Prefix metadata column names with ``Metadata_`` (already prefixed ones are kept)."""
    return meta.rename(
        columns={
            c: c if str(c).startswith(METADATA_PREFIX) else f"{METADATA_PREFIX}{c}"
            for c in meta.columns
        }
    ).reset_index(drop=True)


def profile_table(features: np.ndarray, meta: pd.DataFrame, prefix: str = "f") -> pd.DataFrame:
    """One table: ``Metadata_*`` columns then feature columns ``f0, f1, ...``."""
    if len(meta) != len(features):
        raise ValueError(f"{len(features)} feature rows but {len(meta)} metadata rows")
    feats = pd.DataFrame(
        np.asarray(features, dtype=np.float32),
        columns=[f"{prefix}{i}" for i in range(features.shape[1])],
    )
    return pd.concat([to_metadata_frame(meta), feats], axis=1)


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def to_parquet(features: np.ndarray, meta: pd.DataFrame, path: str | Path) -> Path:
    """Write profiles as Parquet with ``Metadata_*`` columns (atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    profile_table(features, meta).to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return path


def to_csv(features: np.ndarray, meta: pd.DataFrame, path: str | Path) -> Path:
    """Write profiles as CSV (gzip when the name ends in .gz) with ``Metadata_*`` columns."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    comp = "gzip" if path.suffix == ".gz" else None
    profile_table(features, meta).to_csv(tmp, index=False, compression=comp)
    os.replace(tmp, path)
    return path


def to_anndata(features: np.ndarray, meta: pd.DataFrame, path: str | Path) -> Path:
    """Write profiles as .h5ad: ``X`` and ``obsm["X_cdcl"]`` = features, ``obs`` = metadata."""
    import anndata as ad

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    obs = meta.reset_index(drop=True).copy()
    for c in obs.columns:  # h5ad wants plain strings/numbers; mixed object columns become str
        if obs[c].dtype == object:
            obs[c] = obs[c].map(lambda v: "" if v is None or v != v else str(v)).astype(str)
    obs.index = [str(i) for i in range(len(obs))]
    x = np.asarray(features, dtype=np.float32)
    adata = ad.AnnData(X=x, obs=obs)
    adata.obsm[OBSM_KEY] = x
    tmp = _tmp_path(path).with_suffix(".h5ad")
    adata.write_h5ad(tmp)
    os.replace(tmp, path)
    return path


def write_profiles(features: np.ndarray, meta: pd.DataFrame, path: str | Path) -> Path:
    """Write by file extension: .parquet, .h5ad, .csv or .csv.gz."""
    name = str(path).lower()
    if name.endswith(".parquet"):
        return to_parquet(features, meta, path)
    if name.endswith(".h5ad"):
        return to_anndata(features, meta, path)
    if name.endswith(".csv") or name.endswith(".csv.gz"):
        return to_csv(features, meta, path)
    raise CdclError(f"{path}: unknown profile format; use a .parquet, .h5ad, .csv or .csv.gz name")


def read_profile_table(path: str | Path) -> pd.DataFrame:
    """Read a profile table (.parquet, .csv, .csv.gz, .tsv or .h5ad) into one DataFrame."""
    path = Path(path)
    if not path.exists():
        raise CdclError(f"{path}: file not found")
    name = path.name.lower()
    try:
        if name.endswith(".parquet"):
            return pd.read_parquet(path)
        if name.endswith((".csv", ".csv.gz")):
            return pd.read_csv(path)
        if name.endswith((".tsv", ".tsv.gz", ".txt")):
            return pd.read_csv(path, sep="\t")
        if name.endswith(".h5ad"):
            import anndata as ad

            a = ad.read_h5ad(path)
            x = np.asarray(a.obsm[OBSM_KEY] if OBSM_KEY in a.obsm else a.X, dtype=np.float32)
            return profile_table(x, a.obs.reset_index(drop=True))
    except CdclError:
        raise
    except Exception as e:
        raise CdclError(f"{path}: unreadable profile table ({type(e).__name__}: {e})") from None
    raise CdclError(f"{path}: unknown format; use .parquet, .csv, .csv.gz, .tsv or .h5ad")


def split_table(table: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame, list[str]]:
    """Split a profile table into (features float32, Metadata_* frame, feature names)."""
    meta_cols = [c for c in table.columns if str(c).startswith(METADATA_PREFIX)]
    feat_cols = [c for c in table.columns if not str(c).startswith(METADATA_PREFIX)]
    if not feat_cols:
        raise CdclError(
            "profile table has no feature columns (every column starts with `Metadata_`)"
        )
    non_numeric = [c for c in feat_cols if not pd.api.types.is_numeric_dtype(table[c])]
    if non_numeric:
        raise CdclError(
            f"profile table: feature column `{non_numeric[0]}` is not numeric; "
            "prefix metadata columns with `Metadata_`"
        )
    x = table[feat_cols].to_numpy(dtype=np.float32)
    return x, table[meta_cols].reset_index(drop=True), [str(c) for c in feat_cols]
