"""Batch-mixing metrics: are neighbourhoods and clusters independent of the batch?

- kBET (Buttner et al., Nat Methods 2019): for each query, a chi-squared test of the batch
  composition of its k nearest neighbours against the global composition; reported as the
  acceptance rate at alpha = 0.05 (higher = better mixed); ``kbet_per_group`` averages it within
  groups (e.g. treatments) so that design imbalance is not read as batch effect.
- Silhouette (Rousseeuw, J Comput Appl Math 1987) of batch, treatment or MoA labels, exact or on
  sampled query rows; ``batch_silhouette_score`` reports 1 - |s| of the batch labels (scib's
  convention, Luecken et al., Nat Methods 2022).
- iLISI (Korsunsky et al., Nat Methods 2019; scaled as scib's ``ilisi_graph``): the effective
  number of batches in each neighbourhood.
- Graph connectivity (scib): is each label one connected piece of the kNN graph?
- ``mixing_per_treatment``: kBET, iLISI, batch silhouette and graph connectivity within each
  treatment present in at least two batches, so that a design where treatments differ between
  batches is not read as a batch effect; ``scib_aggregate`` combines batch and biology scores.

Every neighbourhood metric reads a :class:`~.neighbours.NeighborGraph`: one search per feature
set (or per treatment) serves kBET, iLISI and graph connectivity.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components
from scipy.stats import chi2

from cdcl.evaluate.metrics._inputs import (
    _codes,
    _features,
    _labels,
)
from cdcl.evaluate.metrics.neighbours import (
    BLOCK_ELEMS,
    NeighborGraph,
    group_graphs,
    iter_blocks,
    neighbor_graph,
    row_norms,
    rows_graph,
    sample_rows,
)

# Exact (every row a query) up to EXACT_MAX rows; beyond, a seeded sample of QUERY_SAMPLE
# query rows scored against all rows (binomial standard error of an acceptance rate
# <= 0.5 / sqrt(2000) = 0.011).
EXACT_MAX = 10_000
QUERY_SAMPLE = 2_000
LISI_K = 90  # scib's ilisi_graph k0 (perplexity k / 3 = 30, Harmony's default)
CONNECTIVITY_K = 15  # scanpy's default n_neighbors, on which scib builds its graph


def _default_kbet_k(batch_sizes: np.ndarray, n: int) -> int:
    # kBET's initial k0 is a quarter of the mean batch size; floored at 10 (the lower bound
    # of kBET's own k search) and capped at 100 for cost, and at n - 1.
    k = int(math.floor(batch_sizes.mean() / 4.0))
    return int(min(max(k, 10), 100, n - 1))


def default_kbet_k(batch: ArrayLike) -> int:
    """kBET's default neighbourhood size for these batch labels (see :func:`kbet`)."""
    codes, uniq = _codes(np.asarray(batch), "batch")
    return _default_kbet_k(np.bincount(codes, minlength=uniq.size), codes.size)


def _kbet_pvalues(env: np.ndarray, sizes: np.ndarray, k: int) -> np.ndarray:
    """Chi-squared p-value of each neighbourhood's batch counts (rows of ``env``: batch codes)."""
    nb = sizes.size
    expected = k * sizes / sizes.sum()
    pvals = np.empty(env.shape[0])
    step = max(1, BLOCK_ELEMS // max(nb, k))
    for a, b in iter_blocks(env.shape[0], step):
        flat = env[a:b] + nb * np.arange(b - a)[:, None]
        observed = np.bincount(flat.ravel(), minlength=(b - a) * nb).reshape(b - a, nb)
        stat = ((observed - expected) ** 2 / expected).sum(axis=1)
        pvals[a:b] = chi2.sf(stat, df=nb - 1)
    return pvals


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
    graph: NeighborGraph | None = None,
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
    at most 100, capped at ``n - 1``. ``n_queries`` = all rows up to ``EXACT_MAX`` (10,000)
    rows, otherwise a seeded sample of ``QUERY_SAMPLE`` (2,000) rows, each tested against
    its neighbours among *all* rows; ``stderr`` is then the binomial standard error of the
    acceptance rate, sqrt(a(1-a)/n_queries) (<= 0.011), else 0. ``graph``: a precomputed
    :class:`NeighborGraph` of these rows with at least ``k - 1`` neighbours (its queries are
    used; ``n_queries``, ``metric`` and ``seed`` are then ignored). One batch only:
    acceptance 1.0 with a ``note``.

    Returns:
        ``{"acceptance_rate", "rejection_rate", "k", "n_queries", "n_batches",
        "mean_p_value", "stderr"}`` (+ ``note``).
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
            "stderr": 0.0,
            "note": "single batch: nothing to mix, acceptance is 1 by definition",
        }
    if n < 3:
        raise ValueError("kBET needs at least 3 rows")
    sizes = np.bincount(codes, minlength=nb)
    k = _default_kbet_k(sizes, n) if k is None else int(k)
    if not 2 <= k <= n:
        raise ValueError(f"k must be in [2, {n}], got {k}")
    if graph is None:
        if n_queries is None:
            n_queries = n if n <= EXACT_MAX else QUERY_SAMPLE
        queries = sample_rows(n, int(n_queries), seed)
        graph = neighbor_graph(
            x, k - 1, query_indices=queries, metric=metric, chunk_size=chunk_size
        )
    if graph.n != n or graph.k < k - 1:
        raise ValueError(f"graph has {graph.k} neighbours of {graph.n} rows; need {k - 1} of {n}")
    queries = graph.queries
    env = np.concatenate([codes[queries][:, None], codes[graph.indices[:, : k - 1]]], axis=1)
    pvals = _kbet_pvalues(env, sizes, k)
    acc = float(np.mean(pvals >= alpha))
    sampled = queries.size < n
    return {
        "acceptance_rate": acc,
        "rejection_rate": 1.0 - acc,
        "k": int(k),
        "n_queries": int(queries.size),
        "n_batches": int(nb),
        "mean_p_value": float(pvals.mean()),
        "stderr": float(math.sqrt(acc * (1 - acc) / queries.size)) if sampled else 0.0,
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
    if sample_size is None or sample_size >= n:
        queries = np.arange(n)
    else:
        rng = np.random.default_rng(seed)
        queries = np.sort(rng.choice(n, int(sample_size), replace=False))
    s = silhouette_values(x, codes, queries, metric=metric, chunk_size=chunk_size)
    return float(s.sum()) / queries.size


def silhouette_values(
    x: np.ndarray,
    codes: np.ndarray,
    queries: np.ndarray,
    *,
    metric: str = "cosine",
    chunk_size: int = 2048,
) -> np.ndarray:
    """Silhouette width of each query row against all rows (labels: integer ``codes``).

    The per-row form of :func:`silhouette` (same definition and conventions), in blocks.
    """
    n = x.shape[0]
    n_lab = int(codes.max()) + 1 if codes.size else 0
    counts = np.bincount(codes, minlength=n_lab).astype(np.float64)
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

    out = np.empty(queries.size)
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
        out[qa:qz] = np.where(own_n > 1, np.nan_to_num(s), 0.0)
    return out


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


def _simpson(
    dist: np.ndarray, labels: np.ndarray, n_labels: int, perplexity: float, tol: float = 1e-5
) -> np.ndarray:
    """Simpson's index of each row's neighbour labels under Gaussian perplexity weights.

    Harmony's LISI (``compute_simpson``): weights ``exp(-beta d)`` over the row's neighbour
    distances, ``beta`` found by bisection (at most 50 steps, tolerance ``tol``) so that the
    weights' entropy is ``log(perplexity)``; Simpson = sum over labels of the squared label
    weight. Distances are shifted by the row's minimum first, which leaves the normalised
    weights and entropy unchanged and keeps ``exp`` from underflowing to zero.
    """
    m = dist.shape[0]
    d = dist - dist.min(axis=1, keepdims=True)
    log_u = math.log(perplexity)

    def hbeta(dd: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = np.exp(-dd * beta[:, None])
        sp = p.sum(axis=1)
        h = np.log(sp) + beta * (dd * p).sum(axis=1) / sp
        return h, p / sp[:, None]

    beta = np.ones(m)
    lo = np.full(m, -np.inf)
    hi = np.full(m, np.inf)
    h, p = hbeta(d, beta)
    active = np.abs(h - log_u) > tol
    for _ in range(50):
        if not active.any():
            break
        ix = np.flatnonzero(active)
        b = beta[ix]
        up = (h[ix] - log_u) > 0  # entropy too high: sharpen (larger beta)
        lo[ix] = np.where(up, b, lo[ix])
        hi[ix] = np.where(up, hi[ix], b)
        grow = np.where(np.isinf(hi[ix]), b * 2.0, (b + hi[ix]) / 2.0)
        shrink = np.where(np.isinf(lo[ix]), b / 2.0, (b + lo[ix]) / 2.0)
        beta[ix] = np.where(up, grow, shrink)
        h[ix], p[ix] = hbeta(d[ix], beta[ix])
        active[ix] = np.abs(h[ix] - log_u) > tol
    flat = labels + n_labels * np.arange(m)[:, None]
    per_label = np.bincount(flat.ravel(), weights=p.ravel(), minlength=m * n_labels)
    return (per_label.reshape(m, n_labels) ** 2).sum(axis=1)


def lisi_values(
    graph: NeighborGraph, label_codes: np.ndarray, perplexity: float | None = None
) -> np.ndarray:
    """LISI (inverse Simpson's index) of each query of ``graph`` for integer ``label_codes``.

    Korsunsky et al., Nat Methods 2019 (Harmony); neighbours and distances from ``graph``
    (the query itself excluded, as Harmony's ``compute_lisi``); ``perplexity`` defaults to
    ``graph.k / 3`` (scib-metrics' convention; 30 for scib's k = 90).
    """
    codes = np.asarray(label_codes, dtype=np.int64)
    n_labels = int(codes.max()) + 1
    perp = graph.k / 3.0 if perplexity is None else float(perplexity)
    out = np.empty(graph.queries.size)
    step = max(1, BLOCK_ELEMS // max(graph.k, n_labels) // 4)
    dist = graph.distances()
    for a, b in iter_blocks(graph.queries.size, step):
        out[a:b] = 1.0 / _simpson(dist[a:b], codes[graph.indices[a:b]], n_labels, perp)
    return out


def _median_stderr(values: np.ndarray) -> float:
    # Large-sample standard error of a sample median: sqrt(pi / 2) * sd / sqrt(m).
    if values.size < 2:
        return float("nan")
    return float(math.sqrt(math.pi / 2.0) * values.std(ddof=1) / math.sqrt(values.size))


def ilisi(
    features: ArrayLike,
    batch: ArrayLike,
    *,
    k: int = LISI_K,
    perplexity: float | None = None,
    n_queries: int | None = None,
    seed: int = 0,
    metric: str = "euclidean",
    graph: NeighborGraph | None = None,
) -> dict[str, Any]:
    """Integration LISI of the batch labels, scaled to [0, 1] as scib's ``ilisi_graph``.

    LISI of a row = the effective number of batches among its ``k`` nearest neighbours
    (:func:`lisi_values`, perplexity ``k / 3``); ``ilisi = (median LISI - 1) /
    (n_batches - 1)``: 0 when every neighbourhood holds one batch, 1 when neighbourhoods hold
    all batches equally (Luecken et al., Nat Methods 2022). Queries: all rows up to
    ``EXACT_MAX``, else a seeded sample of ``QUERY_SAMPLE`` rows; ``stderr`` is then the
    large-sample standard error of the scaled median (sqrt(pi/2) sd / sqrt(m) / (B - 1)),
    else 0. ``graph``: a precomputed :class:`NeighborGraph` of these rows (its queries and
    first ``k`` neighbours are used).

    Returns:
        ``{"ilisi", "median_lisi", "k", "n_queries", "n_batches", "stderr"}`` (+ ``note``).
    """
    x = _features(features)
    n = x.shape[0]
    codes, uniq = _codes(_labels(batch, n, "batch"), "batch")
    nb = uniq.size
    if nb < 2:
        return {
            "ilisi": float("nan"),
            "median_lisi": 1.0,
            "k": 0,
            "n_queries": 0,
            "n_batches": int(nb),
            "stderr": float("nan"),
            "note": "single batch: nothing to mix",
        }
    if graph is None:
        if n_queries is None:
            n_queries = n if n <= EXACT_MAX else QUERY_SAMPLE
        queries = sample_rows(n, int(n_queries), seed)
        graph = neighbor_graph(x, k, query_indices=queries, metric=metric)
    k = min(int(k), graph.k)
    if graph.n != n:
        raise ValueError(f"graph is over {graph.n} rows, features have {n}")
    sub = NeighborGraph(
        graph.queries, graph.indices[:, :k], graph.similarities[:, :k], graph.metric, graph.n
    )
    vals = lisi_values(sub, codes, perplexity if perplexity is not None else k / 3.0)
    med = float(np.median(vals))
    sampled = graph.queries.size < n
    return {
        "ilisi": (med - 1.0) / (nb - 1.0),
        "median_lisi": med,
        "k": int(k),
        "n_queries": int(graph.queries.size),
        "n_batches": int(nb),
        "stderr": _median_stderr(vals) / (nb - 1.0) if sampled else 0.0,
    }


def _largest_component_fraction(graph: NeighborGraph, k: int) -> float:
    rows = graph.queries
    kk = min(k, graph.k)
    pos = np.searchsorted(rows, graph.indices[:, :kk])
    src = np.repeat(np.arange(rows.size), kk)
    adj = csr_matrix((np.ones(src.size), (src, pos.ravel())), shape=(rows.size, rows.size))
    _, comp = connected_components(adj, directed=False)
    return float(np.bincount(comp).max() / rows.size)


def graph_connectivity(
    features: ArrayLike,
    labels: ArrayLike,
    *,
    k: int = CONNECTIVITY_K,
    metric: str = "euclidean",
    max_rows: int | None = EXACT_MAX,
    seed: int = 0,
    graphs: dict[int, NeighborGraph] | None = None,
) -> dict[str, Any]:
    """Graph connectivity (scib): mean over labels of the largest connected share of the label.

    Luecken et al., Nat Methods 2022: for each label, the fraction of its rows in the largest
    connected component of the (undirected) kNN graph of those rows; 1 = every label is one
    piece whatever the batch, ``1 / n_batches`` or less = the label falls apart by batch.
    scib restricts one graph over all rows to the label's rows; here each label's graph is
    built among its own rows (:func:`~.neighbours.group_graphs`, ``k`` = 15 as scanpy's
    default), which costs the sum of squared label sizes instead of n squared and is the same
    graph whenever a row's nearest neighbours share its label. A label with more than
    ``max_rows`` rows is represented by a seeded sample of that many rows. ``graphs``:
    precomputed per-label graphs (label code -> graph over that label's rows).

    Returns:
        ``{"score", "n_labels", "per_label": {label: fraction}}`` (labels with >= 2 rows).
    """
    x = _features(features)
    codes, uniq = _codes(_labels(labels, x.shape[0], "labels"), "labels")
    if graphs is None:
        graphs = group_graphs(x, codes, k, max_rows=max_rows, metric=metric, seed=seed)
    per = {uniq[g]: _largest_component_fraction(gr, k) for g, gr in sorted(graphs.items())}
    vals = list(per.values())
    return {
        "score": float(np.mean(vals)) if vals else float("nan"),
        "n_labels": len(vals),
        "per_label": per,
    }


def mixing_per_treatment(
    features: ArrayLike,
    batch: ArrayLike,
    treatment: ArrayLike,
    *,
    min_group_size: int = 4,
    max_group_rows: int = EXACT_MAX,
    silhouette_queries: int = 500,
    alpha: float = 0.05,
    metric: str = "euclidean",
    seed: int = 0,
) -> dict[str, Any]:
    """Batch mixing within each treatment: kBET, iLISI, batch silhouette, graph connectivity.

    A design where treatments are spread unevenly over batches makes global mixing metrics
    measure composition (e.g. a batch holding only controls looks "unmixed" however well the
    batch effect is removed). Here every metric compares rows *of one treatment* with each
    other, and the score is the unweighted mean over treatments present in at least two
    batches with at least ``min_group_size`` rows. Treatments found in one batch only cannot
    say anything about mixing: they are left out and listed (``single_batch_treatments``).

    Per treatment one kNN graph among its rows (:func:`~.neighbours.group_graphs`,
    ``metric``) serves kBET (its default k from the treatment's batch sizes, kBET's
    complex-design mode, same figures as :func:`kbet_per_group`), iLISI (k = min(90, n - 1),
    perplexity k / 3, scaled by the treatment's batch count) and graph connectivity (first 15
    neighbours). The batch silhouette is scib's ``silhouette_batch``: ``1 - |s_i|`` per row
    (cosine), averaged within the treatment; at most ``silhouette_queries`` seeded query rows
    per treatment, scored against all its rows. A treatment with more than
    ``max_group_rows`` rows (typically the controls of a large screen) is represented by a
    seeded sample of that many rows.

    Returns:
        ``{"kbet", "ilisi", "batch_silhouette", "graph_connectivity", "n_treatments",
        "n_single_batch", "single_batch_treatments", "n_too_small", "per_treatment"}``.
    """
    x = _features(features)
    n = x.shape[0]
    bcodes, _ = _codes(_labels(batch, n, "batch"), "batch")
    tcodes, tuniq = _codes(_labels(treatment, n, "treatment"), "treatment")
    order = np.argsort(tcodes, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(tcodes, minlength=tuniq.size))])
    single: list[Any] = []
    too_small = 0
    per: dict[Any, dict[str, float]] = {}
    for g in range(tuniq.size):
        rows = order[bounds[g] : bounds[g + 1]]
        nb_g = np.unique(bcodes[rows]).size
        if nb_g < 2:
            single.append(tuniq[g])
            continue
        if rows.size < max(3, min_group_size):
            too_small += 1
            continue
        if rows.size > max_group_rows:
            rows = rows[sample_rows(rows.size, max_group_rows, seed + g)]
        local, sizes = np.unique(bcodes[rows], return_inverse=True, return_counts=True)[1:]
        nb_g = sizes.size
        k_kbet = _default_kbet_k(sizes, rows.size)
        k_lisi = min(LISI_K, rows.size - 1)
        k_graph = max(k_kbet - 1, k_lisi, CONNECTIVITY_K)
        rows = np.sort(rows)
        graph = rows_graph(x, rows, k_graph, metric=metric)  # one search, three metrics
        # Neighbour rows -> positions in ``rows`` -> batch codes local to the treatment.
        pos = np.searchsorted(rows, graph.indices)
        lc = local[pos]
        env = np.concatenate([local[:, None], lc[:, : k_kbet - 1]], axis=1)
        pvals = _kbet_pvalues(env, sizes, k_kbet)
        lisi_graph = NeighborGraph(
            np.arange(rows.size),
            pos[:, :k_lisi],
            graph.similarities[:, :k_lisi],
            graph.metric,
            rows.size,
        )
        lisi = lisi_values(lisi_graph, local, k_lisi / 3.0)
        sil_q = sample_rows(rows.size, silhouette_queries, seed + g)
        if nb_g <= rows.size - 1:
            s = silhouette_values(x[rows], local, sil_q, metric="cosine")
            sil = float(np.mean(1.0 - np.abs(s)))
        else:
            sil = float("nan")  # every row its own batch: silhouette undefined
        per[tuniq[g]] = {
            "kbet": float(np.mean(pvals >= alpha)),
            "ilisi": float((np.median(lisi) - 1.0) / (nb_g - 1.0)),
            "batch_silhouette": sil,
            "graph_connectivity": _largest_component_fraction(graph, CONNECTIVITY_K),
            "n_rows": int(rows.size),
            "n_batches": int(nb_g),
        }
    out: dict[str, Any] = {}
    for key in ("kbet", "ilisi", "batch_silhouette", "graph_connectivity"):
        vals = np.array([v[key] for v in per.values()], dtype=np.float64)
        vals = vals[np.isfinite(vals)]
        out[key] = float(vals.mean()) if vals.size else float("nan")
    out["n_treatments"] = len(per)
    out["n_single_batch"] = len(single)
    out["single_batch_treatments"] = [str(t) for t in single]
    out["n_too_small"] = too_small
    out["per_treatment"] = {str(t): v for t, v in per.items()}
    return out


# scib's weights (Luecken et al., Nat Methods 2022): overall = 0.4 batch + 0.6 biology.
BATCH_WEIGHT = 0.4
BIO_WEIGHT = 0.6


def scib_aggregate(batch: dict[str, float], bio: dict[str, float]) -> dict[str, Any]:
    """scib-style overall score: 0.4 x mean of batch-mixing scores + 0.6 x mean of biology.

    Each component must be in [0, 1] with 1 = best; NaN or missing components are dropped
    and named in ``dropped``. Returns ``{"score", "batch_mean", "bio_mean", "batch",
    "bio", "dropped", "weights"}`` (score NaN when either side has no component).
    """

    def clean(d: dict[str, float]) -> tuple[dict[str, float], list[str]]:
        kept = {k: float(v) for k, v in d.items() if v is not None and np.isfinite(v)}
        return kept, [k for k in d if k not in kept]

    b, db = clean(batch)
    o, do = clean(bio)
    bm = float(np.mean(list(b.values()))) if b else float("nan")
    om = float(np.mean(list(o.values()))) if o else float("nan")
    return {
        "score": BATCH_WEIGHT * bm + BIO_WEIGHT * om,
        "batch_mean": bm,
        "bio_mean": om,
        "batch": b,
        "bio": o,
        "dropped": db + do,
        "weights": {"batch": BATCH_WEIGHT, "bio": BIO_WEIGHT},
    }
