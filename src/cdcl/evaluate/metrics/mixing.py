"""Batch-mixing metrics: are neighbourhoods and clusters independent of the batch?

- kBET (Buttner et al., Nat Methods 2019): for each query, a chi-squared test of the batch
  composition of its k nearest neighbours against the global composition; reported as the
  acceptance rate at alpha = 0.05 (higher = better mixed); ``kbet_per_group`` averages it within
  groups (e.g. treatments) so that design imbalance is not read as batch effect.
- Silhouette (Rousseeuw, J Comput Appl Math 1987) of batch, treatment or MoA labels, exact or on
  sampled query rows; ``batch_silhouette_score`` reports 1 - |s| of the batch labels (scib's
  convention, Luecken et al., Nat Methods 2022).
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy.stats import chi2

from cdcl.evaluate.metrics._inputs import (
    _codes,
    _features,
    _labels,
)
from cdcl.evaluate.metrics.neighbours import BLOCK_ELEMS, iter_blocks, knn_indices, row_norms


def _default_kbet_k(batch_sizes: np.ndarray, n: int) -> int:
    # kBET's initial k0 is a quarter of the mean batch size; floored at 10 (the lower bound
    # of kBET's own k search) and capped at 100 for cost, and at n - 1.
    k = int(math.floor(batch_sizes.mean() / 4.0))
    return int(min(max(k, 10), 100, n - 1))


def kbet(
    features: ArrayLike,
    batch: ArrayLike,
    *,
    k: int | None = None,
    alpha: float = 0.05,
    n_queries: int | None = None,
    seed: int = 0,
    chunk_size: int = 2048,
    metric: str = "euclidean",
) -> dict[str, Any]:
    """kBET acceptance rate: do local batch proportions match the global ones?

    Buttner et al., Nat Methods 2019 (R package ``kBET``). For each query its neighbourhood
    is the query plus its ``k - 1`` nearest neighbours (kBET's convention) over all rows,
    Euclidean by default (kBET runs on PCA coordinates; ``metric="cosine"`` is offered). The
    neighbourhood's batch counts are compared with the expected counts ``k * f_b`` (``f_b``
    the global batch frequencies) by Pearson's chi-squared statistic with ``n_batches - 1``
    degrees of freedom; the acceptance rate is the fraction of queries with ``p >= alpha``
    (1 = well mixed, 0 = every neighbourhood is batch-specific). kBET's rejection rate is
    ``1 - acceptance``.

    Defaults: ``k`` = a quarter of the mean batch size (kBET's initial ``k0``), at least 10,
    at most 100, capped at ``n - 1``. ``n_queries`` = all rows up to 10,000 rows, otherwise a
    seeded sample of 10% (kBET's test size) but at least 10,000. One batch only: acceptance
    1.0 with a ``note``.

    Returns:
        ``{"acceptance_rate", "rejection_rate", "k", "n_queries", "n_batches",
        "mean_p_value"}`` (+ ``note``).
    """
    x = _features(features)
    n = x.shape[0]
    codes, uniq = _codes(_labels(batch, n, "batch"), "batch")
    nb = uniq.size
    if nb < 2:
        return {
            "acceptance_rate": 1.0,
            "rejection_rate": 0.0,
            "k": 0,
            "n_queries": 0,
            "n_batches": int(nb),
            "mean_p_value": 1.0,
            "note": "single batch: nothing to mix, acceptance is 1 by definition",
        }
    if n < 3:
        raise ValueError("kBET needs at least 3 rows")
    sizes = np.bincount(codes, minlength=nb)
    k = _default_kbet_k(sizes, n) if k is None else int(k)
    if not 2 <= k <= n:
        raise ValueError(f"k must be in [2, {n}], got {k}")
    if n_queries is None:
        n_queries = n if n <= 10000 else max(10000, math.ceil(0.1 * n))
    n_queries = min(int(n_queries), n)
    rng = np.random.default_rng(seed)
    queries = np.arange(n) if n_queries == n else np.sort(rng.choice(n, n_queries, replace=False))
    nbr, _ = knn_indices(
        x, k - 1, query_indices=queries, exclude_self=True, chunk_size=chunk_size, metric=metric
    )
    env = np.concatenate([codes[queries][:, None], codes[nbr]], axis=1)
    expected = k * sizes / n
    pvals = np.empty(queries.size)
    step = max(1, BLOCK_ELEMS // max(nb, k))
    for a, b in iter_blocks(queries.size, step):
        flat = env[a:b] + nb * np.arange(b - a)[:, None]
        observed = np.bincount(flat.ravel(), minlength=(b - a) * nb).reshape(b - a, nb)
        stat = ((observed - expected) ** 2 / expected).sum(axis=1)
        pvals[a:b] = chi2.sf(stat, df=nb - 1)
    acc = float(np.mean(pvals >= alpha))
    return {
        "acceptance_rate": acc,
        "rejection_rate": 1.0 - acc,
        "k": int(k),
        "n_queries": int(queries.size),
        "n_batches": int(nb),
        "mean_p_value": float(pvals.mean()),
    }


def kbet_per_group(
    features: ArrayLike,
    batch: ArrayLike,
    groups: ArrayLike,
    *,
    min_group_size: int = 10,
    **kw: Any,
) -> dict[str, Any]:
    """kBET within each group (e.g. per treatment), as kBET's "complex study design" mode.

    Each group with at least 2 batches and ``min_group_size`` rows is tested on its own rows
    against its own batch frequencies (:func:`kbet`, same keyword arguments; the default ``k``
    is recomputed from the group's batch sizes). Other groups are skipped and counted.

    Returns:
        ``{"mean_acceptance", "n_groups", "n_skipped", "per_group": {group: acceptance}}``
        where the mean is over tested groups (NaN if none).
    """
    x = _features(features)
    n = x.shape[0]
    b = _labels(batch, n, "batch")
    gcodes, guniq = _codes(_labels(groups, n, "groups"), "groups")
    per_group: dict[Hashable, float] = {}
    skipped = 0
    order = np.argsort(gcodes, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(gcodes, minlength=guniq.size))])
    for g in range(guniq.size):
        rows = order[bounds[g] : bounds[g + 1]]
        if rows.size < max(3, min_group_size) or np.unique(b[rows]).size < 2:
            skipped += 1
            continue
        kw_g = dict(kw)
        if kw_g.get("k") is not None:
            kw_g["k"] = min(int(kw_g["k"]), rows.size - 1)
        per_group[guniq[g]] = kbet(x[rows], b[rows], **kw_g)["acceptance_rate"]
    vals = list(per_group.values())
    return {
        "mean_acceptance": float(np.mean(vals)) if vals else float("nan"),
        "n_groups": len(vals),
        "n_skipped": skipped,
        "per_group": per_group,
    }


def silhouette(
    features: ArrayLike,
    labels: ArrayLike,
    *,
    metric: str = "cosine",
    sample_size: int | None = None,
    seed: int = 0,
    chunk_size: int = 2048,
) -> float:
    """Mean silhouette width (Rousseeuw, J Comput Appl Math 1987), computed in blocks.

    For point i with label c: ``a`` = mean distance to the other members of c, ``b`` = the
    smallest mean distance to the members of another label, ``s = (b - a) / max(a, b)``;
    ``s = 0`` for a label with a single member (sklearn convention). Distances are cosine
    (``1 - cos``, clipped to [0, 2]) or Euclidean, in float64. Per block of query rows the
    distances to all points are reduced to per-label sums on the fly, so no n x n matrix
    exists; the result equals ``sklearn.metrics.silhouette_score``. With ``sample_size`` only
    a seeded sample of query rows is scored, but always against *all* points (an unbiased
    estimate of the full mean; sklearn instead subsamples both sides).

    Raises:
        ValueError: unless 2 <= number of labels <= n - 1 (as sklearn).
    """
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
    x = _features(features)
    n = x.shape[0]
    codes, uniq = _codes(_labels(labels, n, "labels"), "labels")
    n_lab = uniq.size
    if not 2 <= n_lab <= n - 1:
        raise ValueError(
            f"Number of labels is {n_lab}. Valid values are 2 to n_samples - 1 (inclusive)"
        )
    counts = np.bincount(codes, minlength=n_lab).astype(np.float64)
    if sample_size is None or sample_size >= n:
        queries = np.arange(n)
    else:
        rng = np.random.default_rng(seed)
        queries = np.sort(rng.choice(n, int(sample_size), replace=False))
    # Reference rows sorted by label: each block reduces to per-label sums with reduceat.
    order = np.argsort(codes, kind="stable")
    pos_in_order = np.empty(n, dtype=np.int64)
    pos_in_order[order] = np.arange(n)
    sorted_codes = codes[order]
    norms = row_norms(x)
    half = BLOCK_ELEMS // 2  # float64 blocks
    qb = max(1, min(int(chunk_size), half // max(n_lab, 1)))
    rb = max(1, half // qb)

    def prep(rows: np.ndarray) -> np.ndarray:
        blk = np.asarray(x[rows], dtype=np.float64)
        if metric == "cosine":
            blk = blk / np.maximum(norms[rows], 1e-12)[:, None]
        return blk

    total = 0.0
    for qa, qz in iter_blocks(queries.size, qb):
        q_rows = queries[qa:qz]
        qv = prep(q_rows)
        sums = np.zeros((q_rows.size, n_lab))
        q_pos = pos_in_order[q_rows]
        for ra, rz in iter_blocks(n, rb):
            r_rows = order[ra:rz]
            dots = qv @ prep(r_rows).T
            if metric == "cosine":
                dist = np.clip(1.0 - dots, 0.0, 2.0)
            else:
                d2 = norms[q_rows, None] ** 2 + norms[None, r_rows] ** 2 - 2.0 * dots
                dist = np.sqrt(np.maximum(d2, 0.0))
            inside = np.flatnonzero((q_pos >= ra) & (q_pos < rz))
            dist[inside, q_pos[inside] - ra] = 0.0  # exact zero self-distance
            seg_codes = sorted_codes[ra:rz]
            starts = np.flatnonzero(np.r_[True, seg_codes[1:] != seg_codes[:-1]])
            sums[:, seg_codes[starts]] += np.add.reduceat(dist, starts, axis=1)
        own = codes[q_rows]
        local = np.arange(q_rows.size)
        own_n = counts[own]
        with np.errstate(invalid="ignore", divide="ignore"):
            a = sums[local, own] / (own_n - 1.0)
            means = sums / counts[None, :]
            means[local, own] = np.inf
            b = means.min(axis=1)
            s = (b - a) / np.maximum(a, b)
        s = np.where(own_n > 1, np.nan_to_num(s), 0.0)
        total += float(s.sum())
    return total / queries.size


def batch_silhouette_score(
    features: ArrayLike,
    batch: ArrayLike,
    *,
    metric: str = "cosine",
    sample_size: int | None = None,
    seed: int = 0,
    chunk_size: int = 2048,
) -> dict[str, Any]:
    """Batch mixing as ``1 - |s|``, s the silhouette of the batch labels (DESIGN section 7).

    ``s`` near 0 means batches overlap (score near 1: well mixed); ``|s|`` near 1 means batch
    clusters (score near 0). Same arguments as :func:`silhouette`. A single batch returns
    NaN with a ``note``.

    Returns:
        ``{"score": 1 - |s|, "silhouette": s}`` (+ ``note``).
    """
    x = _features(features)
    b = _labels(batch, x.shape[0], "batch")
    if pd.Series(np.asarray(b, dtype=object)).nunique() < 2:
        return {"score": float("nan"), "silhouette": float("nan"), "note": "single batch"}
    s = silhouette(x, b, metric=metric, sample_size=sample_size, seed=seed, chunk_size=chunk_size)
    return {"score": 1.0 - abs(s), "silhouette": s}
