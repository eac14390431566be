"""Input checks and small array helpers shared by the metric families and the profile
transformations (not public)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike


def _features(x: ArrayLike, name: str = "features") -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, d), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
    return arr


def label_isin(values: ArrayLike, allowed: ArrayLike) -> np.ndarray:
    """Boolean mask of ``values`` found in ``allowed``, by hashing.

    ``np.isin`` on object (string) label arrays is far slower: it cost 887 s of a 5e5-profile
    evaluation, where this takes well under a second.
    """
    lookup = pd.unique(pd.Series(np.asarray(allowed, dtype=object).ravel()))
    return pd.Series(np.asarray(values, dtype=object).ravel()).isin(lookup).to_numpy()


def _labels(y: ArrayLike, n: int, name: str) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must be 1-D with {n} entries, got shape {arr.shape}")
    return arr


def _codes(values: ArrayLike, name: str, allow_na: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes 0..K-1 (sorted order of the unique values) and the unique values."""
    series = pd.Series(np.asarray(values, dtype=object))
    try:
        codes, uniques = pd.factorize(series, sort=True)
    except TypeError:
        # Mixed, unorderable label types (e.g. 3 and "a"): order by their text instead.
        codes, uniques = pd.factorize(series, sort=False)
        order = np.argsort(np.asarray([str(u) for u in uniques]), kind="stable")
        rank = np.empty(order.size, dtype=np.int64)
        rank[order] = np.arange(order.size)
        codes = np.where(codes >= 0, rank[np.maximum(codes, 0)], -1)
        uniques = np.asarray(uniques, dtype=object)[order]
    if not allow_na and (codes < 0).any():
        raise ValueError(f"{name} contains missing values")
    return codes.astype(np.int64), np.asarray(uniques, dtype=object)


def _as_list(cols: str | Iterable[str] | None) -> list[str]:
    if cols is None:
        return []
    if isinstance(cols, str):
        return [cols]
    return list(cols)


def _bool_column(meta: pd.DataFrame, col: str | None) -> np.ndarray:
    if col is None or col not in meta.columns:
        return np.zeros(len(meta), dtype=bool)
    return meta[col].fillna(False).astype(bool).to_numpy()


def _has_label(values: pd.Series) -> np.ndarray:
    """True where a label is present (not NaN/None and not an empty string)."""
    s = values.astype(object)
    return (s.notna() & (s.astype(str).str.strip() != "")).to_numpy()


def _group_mean(
    features: np.ndarray,
    codes: np.ndarray,
    n_groups: int,
    rows: np.ndarray | None = None,
    chunk: int = 16384,
) -> np.ndarray:
    """Mean of the rows of each group (codes 0..n_groups-1, every group non-empty).

    ``rows``: the rows of ``features`` that ``codes`` label (default all). Sums are float64,
    accumulated over chunks of ``chunk`` sorted rows: no float64 copy of the whole table.
    """
    order = np.argsort(codes, kind="stable")
    src = order if rows is None else np.asarray(rows)[order]
    sorted_codes = codes[order]
    counts = np.bincount(codes, minlength=n_groups)
    sums = np.zeros((n_groups, features.shape[1]))
    for a in range(0, order.size, chunk):
        b = min(order.size, a + chunk)
        seg = sorted_codes[a:b]
        starts = np.flatnonzero(np.r_[True, seg[1:] != seg[:-1]])
        blk = np.asarray(features[src[a:b]], dtype=np.float64)
        sums[seg[starts]] += np.add.reduceat(blk, starts, axis=0)
    return (sums / counts[:, None]).astype(np.float32)


def _unit_rows(x: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    blk = np.asarray(x, dtype=np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", blk, blk))
    return (blk / np.maximum(norms, 1e-12)[:, None]).astype(dtype)


def _centred_unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows centred on their own mean and scaled to unit norm: dot products are Pearson r."""
    blk = np.asarray(x, dtype=np.float64)
    blk = blk - blk.mean(axis=1, keepdims=True)
    norms = np.sqrt(np.einsum("ij,ij->i", blk, blk))
    with np.errstate(invalid="ignore", divide="ignore"):
        # Constant rows have no defined correlation: NaN, not a silent 0.
        return blk / np.where(norms > 0, norms, np.nan)[:, None]
