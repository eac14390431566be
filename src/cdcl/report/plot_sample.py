"""The rows a per-point plot draws: a seeded sample stratified by batch and treatment.

A UMAP of every row of a screen-sized table costs minutes and gigabytes and draws more points
than a figure can show, so plots use at most ``size`` rows. Each (batch, treatment) stratum
keeps its share of the sample (largest-remainder rounding, so the sample has exactly ``size``
rows), which keeps small batches and rare treatments in the picture in proportion.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

DEFAULT_PLOT_SAMPLE = 20_000
STRATA = ("batch", "treatment")


def stratified_plot_rows(meta: pd.DataFrame, size: int | None, seed: int = 0) -> np.ndarray:
    """Sorted row indices of a seeded sample of ``size`` rows, proportional per stratum.

    ``size`` None or 0, or not smaller than the table: every row. Strata are the
    (batch, treatment) pairs present in ``meta`` (missing columns are left out).
    """
    n = len(meta)
    if not size or size >= n:
        return np.arange(n)
    if size < 0:
        raise ValueError(f"plot sample size must be >= 0, got {size}")
    cols = [c for c in STRATA if c in meta.columns]
    if cols:
        strata = meta.groupby(cols, sort=True, dropna=False, observed=True).ngroup().to_numpy()
    else:
        strata = np.zeros(n, dtype=np.int64)
    counts = np.bincount(strata)
    exact = counts * (size / n)
    quota = np.floor(exact).astype(np.int64)
    rng = np.random.default_rng(seed)
    short = size - int(quota.sum())
    if short > 0:
        # Largest fractional parts first; a random key breaks ties so no stratum is favoured.
        order = np.lexsort((rng.random(counts.size), -(exact - quota)))
        quota[order[:short]] += 1
    # Shuffle, then keep the first quota[s] rows of every stratum in the shuffled order.
    perm = rng.permutation(n)
    s = strata[perm]
    sort = np.argsort(s, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(n, dtype=np.int64)
    rank[sort] = np.arange(n) - starts[s[sort]]
    return np.sort(perm[rank < quota[s]])


def plot_sample_info(n_rows: int, rows: np.ndarray, size: int | None, seed: int) -> dict[str, Any]:
    """What results.json says about the rows the plots drew."""
    return {
        "rows_plotted": int(rows.size),
        "rows_total": int(n_rows),
        "sample_size_requested": int(size) if size else None,
        "stratified_by": list(STRATA) if rows.size < n_rows else None,
        "seed": int(seed),
    }
