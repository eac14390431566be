"""Batch-mixing metrics: are neighbourhoods and clusters independent of the batch?

- kBET (Buttner et al., Nat Methods 2019): for each query, a chi-squared test of the batch
  composition of its k nearest neighbours against the global composition; reported as the
  acceptance rate at alpha = 0.05 (higher = better mixed); ``kbet_per_group`` averages it within
  groups (e.g. treatments) so that design imbalance is not read as batch effect.
- Silhouette (Rousseeuw, J Comput Appl Math 1987) of batch, treatment or MoA labels, exact or on
  sampled query rows; ``batch_silhouette_score`` is scib's ``silhouette_batch`` (Luecken et
  al., Nat Methods 2022): the mean over labels of the mean ``1 - |s_i|`` of the batch labels
  within each label; ``batch_silhouette_global`` (1 - |mean s|) is not scib's and is kept
  under its own name.
- iLISI (Korsunsky et al., Nat Methods 2019; scaled as scib's ``ilisi_knn``): the effective
  number of batches in each neighbourhood.
- Graph connectivity (scib): is each label one strongly connected piece of its subgraph of ONE
  kNN graph over all rows?
- ``mixing_per_treatment``: kBET (scib-metrics' ``kbet_per_label`` rules), iLISI, batch
  silhouette and graph connectivity within each treatment present in at least two batches, so
  that a design where treatments differ between batches is not read as a batch effect;
  ``scib_aggregate`` combines batch and biology scores.

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

from cdcl.metrics.neighbours import (
    BLOCK_ELEMS,
    NeighborGraph,
    iter_blocks,
    neighbor_graph,
    row_norms,
    rows_graph,
    sample_rows,
)
from cdcl.profiles.arrays import (
    _codes,
    _features,
    _labels,
)

# Exact (every row a query) up to EXACT_MAX rows; beyond, a seeded sample of QUERY_SAMPLE
# query rows scored against all rows (binomial standard error of an acceptance rate
# <= 0.5 / sqrt(2000) = 0.011).
EXACT_MAX = 10_000
QUERY_SAMPLE = 2_000
LISI_K = 90  # scib's ilisi_graph k0 (perplexity k / 3 = 30, Harmony's default)
CONNECTIVITY_K = 15  # scanpy's default n_neighbors (the row itself included), as scib's graph
# scib-metrics kbet_per_label (metrics/_kbet.py): labels under 10 rows are skipped, k0 is a
# quarter of the mean batch size clipped to [10, 70], and a label whose subgraph of the global
# kNN graph falls apart is scored on its components of >= 3 k0 rows if they hold >= 75% of it,
# else 0.
MIN_GROUP_ROWS = 10
KBET_K0_MAX = 70
FRAGMENT_MIN_COVER = 0.75
# Below this many scored treatments a per-treatment kBET / iLISI mean is not reported.
MIN_SCORED_GROUPS = 3


def _default_kbet_k(batch_sizes: np.ndarray, n: int) -> int:
    # kBET's initial k0 is a quarter of the mean batch size; floored at 10 (the lower bound
    # of kBET's own k search) and capped at 100 for cost, and at n - 1.
    k = int(math.floor(batch_sizes.mean() / 4.0))
    return int(min(max(k, 10), 100, n - 1))


def _scib_kbet_k0(batch_sizes: np.ndarray, n: int) -> int:
    # scib-metrics kbet_per_label: k0 = min(70, max(10, floor(mean batch size / 4))); here also
    # capped at n - 1 (the neighbourhood is the query plus k - 1 others).
    k = int(math.floor(batch_sizes.mean() / 4.0))
    return int(min(max(k, 10), KBET_K0_MAX, n - 1))


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


def _fragments(adj: csr_matrix | None, rows: np.ndarray) -> np.ndarray | None:
    """Weakly connected component of each of ``rows`` in the global graph's subgraph on them.

    ``adj`` is the global kNN graph (directed, over all rows); None when no global graph over
    these rows exists (then fragmentation is not judged).
    """
    if adj is None:
        return None
    sub = adj[rows][:, rows]
    return connected_components(sub, directed=True, connection="weak")[1]


def _kbet_group(
    x: np.ndarray,
    bcodes: np.ndarray,
    rows: np.ndarray,
    comps: np.ndarray | None,
    *,
    alpha: float,
    metric: str,
    graph: NeighborGraph | None = None,
) -> tuple[float, dict[str, Any]]:
    """scib-metrics' ``kbet_per_label`` rules for one group of rows (see MIN_GROUP_ROWS).

    ``comps``: component of each row in the group's subgraph of the global kNN graph (None:
    not judged). One component: kBET on all rows with k0 from the group's batch sizes.
    Several: kBET on the rows of components with at least ``3 k0`` rows if they hold at least
    75% of the group, else 0 (100% rejection). ``graph``: a kNN graph of ``rows`` among
    themselves (reused when the whole group is scored). Returns ``(acceptance, info)``.
    """
    sizes = np.unique(bcodes[rows], return_counts=True)[1]
    k0 = _scib_kbet_k0(sizes, rows.size)
    info: dict[str, Any] = {"k": int(k0), "n_components": 1}
    keep = rows
    if comps is not None and np.unique(comps).size > 1:
        comp_ids, comp_sizes = np.unique(comps, return_counts=True)
        info["n_components"] = int(comp_ids.size)
        big = np.isin(comps, comp_ids[comp_sizes >= 3 * k0])
        if big.sum() / rows.size < FRAGMENT_MIN_COVER:
            info["fragmented"] = True
            return 0.0, info
        keep = rows[big]
        graph = None
    local, lsizes = np.unique(bcodes[keep], return_inverse=True, return_counts=True)[1:]
    if lsizes.size < 2:
        return 1.0, info  # the scored part holds one batch: kBET's single-batch convention
    k = min(k0, keep.size - 1)
    info["k"] = int(k)
    if graph is None or graph.k < k - 1:
        graph = rows_graph(x, keep, k - 1, metric=metric)
    pos = np.searchsorted(keep, graph.indices[:, : k - 1])
    env = np.concatenate([local[:, None], local[pos]], axis=1)
    pvals = _kbet_pvalues(env, lsizes, k)
    return float(np.mean(pvals >= alpha)), info


def kbet_per_group(
    features: ArrayLike,
    batch: ArrayLike,
    groups: ArrayLike,
    *,
    min_group_size: int = MIN_GROUP_ROWS,
    alpha: float = 0.05,
    metric: str = "euclidean",
    max_graph_rows: int | None = EXACT_MAX,
    seed: int = 0,
) -> dict[str, Any]:
    """kBET within each group (e.g. per treatment), with scib-metrics' ``kbet_per_label`` rules.

    scib-metrics ``metrics/_kbet.py``: a group with fewer than ``min_group_size`` (10) rows or
    one batch is skipped; ``k0 = min(70, max(10, floor(mean batch size / 4)))`` (capped at
    the group size - 1); the group's subgraph of one global kNN graph (``CONNECTIVITY_K``,
    over all rows, or a seeded sample of ``max_graph_rows`` above that, where fragmentation
    is judged only for groups whose rows are all in the sample) is split into
    connected components: one component -> kBET on the group; several -> kBET on the
    components of at least ``3 k0`` rows if they hold >= 75% of the group, else 0. Convention
    difference: the neighbours are Euclidean kNN among the group's rows, where scib-metrics
    uses diffusion distances on the group's subgraph.

    Returns:
        ``{"mean_acceptance", "n_groups", "n_skipped", "n_fragmented", "per_group"}``; the
        mean is over scored groups (NaN if none).
    """
    x = _features(features)
    n = x.shape[0]
    bcodes, _ = _codes(_labels(batch, n, "batch"), "batch")
    gcodes, guniq = _codes(_labels(groups, n, "groups"), "groups")
    adj, in_graph = _global_adjacency(x, max_graph_rows, metric, seed)
    per_group: dict[Hashable, float] = {}
    skipped = fragmented = 0
    order = np.argsort(gcodes, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(gcodes, minlength=guniq.size))])
    for g in range(guniq.size):
        rows = np.sort(order[bounds[g] : bounds[g + 1]])
        if rows.size < max(3, min_group_size) or np.unique(bcodes[rows]).size < 2:
            skipped += 1
            continue
        comps = _group_components(adj, in_graph, rows)
        acc, info = _kbet_group(x, bcodes, rows, comps, alpha=alpha, metric=metric)
        fragmented += int(bool(info.get("fragmented")))
        per_group[guniq[g]] = acc
    vals = list(per_group.values())
    return {
        "mean_acceptance": float(np.mean(vals)) if vals else float("nan"),
        "n_groups": len(vals),
        "n_skipped": skipped,
        "n_fragmented": fragmented,
        "per_group": per_group,
    }


def _global_adjacency(
    x: np.ndarray, max_rows: int | None, metric: str, seed: int
) -> tuple[csr_matrix, np.ndarray]:
    """Directed kNN adjacency (``CONNECTIVITY_K - 1`` others per row) over all rows or a sample.

    Returns ``(adj, rows)``: ``adj`` is over ``rows`` (positions 0..len(rows)-1), the sorted
    rows of ``x`` the graph was built on (all rows up to ``max_rows``).
    """
    n = x.shape[0]
    rows = sample_rows(n, max_rows, seed)
    sub = x if rows.size == n else x[rows]
    graph = neighbor_graph(sub, CONNECTIVITY_K - 1, metric=metric)
    kk = graph.k
    src = np.repeat(np.arange(rows.size), kk)
    adj = csr_matrix(
        (np.ones(src.size, dtype=np.int8), (src, graph.indices.ravel())),
        shape=(rows.size, rows.size),
    )
    return adj, rows


def _group_components(adj: csr_matrix, in_graph: np.ndarray, rows: np.ndarray) -> np.ndarray | None:
    """Weak components of ``rows`` in the global graph; None if the graph misses some of them."""
    pos = np.searchsorted(in_graph, rows)
    pos = np.minimum(pos, in_graph.size - 1)
    if not np.array_equal(in_graph[pos], rows):
        return None  # the global graph is a sample that does not hold every row of the group
    return _fragments(adj, pos)


def silhouette(
    features: ArrayLike,
    labels: ArrayLike,
    *,
    metric: str = "cosine",
    sample_size: int | None = None,
    seed: int = 0,
    chunk_size: int = 2048,
    rows: np.ndarray | None = None,
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

    ``rows``: score only these rows of ``features`` (``labels`` one per row of them), as if
    ``features[rows]`` were passed, without copying them.

    Raises:
        ValueError: unless 2 <= number of labels <= n - 1 (as sklearn).
    """
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
    x = _features(features)
    n = x.shape[0] if rows is None else len(rows)
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
    s = silhouette_values(x, codes, queries, metric=metric, chunk_size=chunk_size, rows=rows)
    return float(s.sum()) / queries.size


def silhouette_values(
    x: np.ndarray,
    codes: np.ndarray,
    queries: np.ndarray,
    *,
    metric: str = "cosine",
    chunk_size: int = 2048,
    rows: np.ndarray | None = None,
) -> np.ndarray:
    """Silhouette width of each query row against all rows (labels: integer ``codes``).

    The per-row form of :func:`silhouette` (same definition and conventions), in blocks.
    ``rows``: the rows of ``x`` that form the data set (default all), ``codes`` one per row of
    it and ``queries`` numbered within it; equal to passing ``x[rows]``, without that copy.
    """
    rows = np.arange(x.shape[0]) if rows is None else np.asarray(rows, dtype=np.int64)
    n = rows.size
    n_lab = int(codes.max()) + 1 if codes.size else 0
    counts = np.bincount(codes, minlength=n_lab).astype(np.float64)
    # Reference rows sorted by label: each block reduces to per-label sums with reduceat.
    order = np.argsort(codes, kind="stable")
    pos_in_order = np.empty(n, dtype=np.int64)
    pos_in_order[order] = np.arange(n)
    sorted_codes = codes[order]
    order_rows = rows[order]  # rows of x, in label order
    norms = row_norms(x)  # of every row of x: one pass, no copy
    half = BLOCK_ELEMS // 2  # float64 blocks
    qb = max(1, min(int(chunk_size), half // max(n_lab, 1)))
    rb = max(1, half // qb)

    def prep(ix: np.ndarray) -> np.ndarray:
        blk = np.asarray(x[ix], dtype=np.float64)
        if metric == "cosine":
            blk = blk / np.maximum(norms[ix], 1e-12)[:, None]
        return blk

    out = np.empty(queries.size)
    for qa, qz in iter_blocks(queries.size, qb):
        q_rows = queries[qa:qz]
        q_x = rows[q_rows]  # the queries' rows of x
        qv = prep(q_x)
        sums = np.zeros((q_rows.size, n_lab))
        q_pos = pos_in_order[q_rows]
        for ra, rz in iter_blocks(n, rb):
            r_rows = order_rows[ra:rz]
            dots = qv @ prep(r_rows).T
            if metric == "cosine":
                dist = np.clip(1.0 - dots, 0.0, 2.0)
            else:
                d2 = norms[q_x, None] ** 2 + norms[None, r_rows] ** 2 - 2.0 * dots
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
    labels: ArrayLike | None = None,
    *,
    metric: str = "euclidean",
    sample_size: int | None = None,
    seed: int = 0,
    chunk_size: int = 2048,
) -> dict[str, Any]:
    """Batch mixing as scib's ``silhouette_batch``: mean over labels of mean ``1 - |s_i|``.

    scib-metrics ``metrics/_silhouette.py``: within each label (e.g. treatment; ``labels``
    None = one label holding every row) the silhouette width ``s_i`` of every row is computed
    with the *batch* as cluster label, among that label's rows only; each row scores
    ``1 - |s_i|`` (1 = its batch overlaps the others, 0 = batch-specific), the scores are
    averaged per label and the label means averaged. Labels with one batch, or with as many
    batches as rows, are skipped (as scib). Euclidean by default, as scib. ``sample_size``:
    at most that many seeded query rows per label, scored against all its rows.

    Returns:
        ``{"score", "n_labels", "per_label"}`` (score NaN with a ``note`` if no label has two
        batches).
    """
    x = _features(features)
    n = x.shape[0]
    bcodes, _ = _codes(_labels(batch, n, "batch"), "batch")
    lab = np.zeros(n, dtype=np.int64) if labels is None else _labels(labels, n, "labels")
    lcodes, luniq = _codes(lab, "labels")
    per: dict[Any, float] = {}
    for g in range(luniq.size):
        rows = np.flatnonzero(lcodes == g)
        local = np.unique(bcodes[rows], return_inverse=True)[1]
        nb = int(local.max()) + 1
        if nb < 2 or nb == rows.size:
            continue
        q = sample_rows(rows.size, sample_size, seed + g)
        s = silhouette_values(x[rows], local, q, metric=metric, chunk_size=chunk_size)
        per[luniq[g] if labels is not None else "all"] = float(np.mean(1.0 - np.abs(s)))
    if not per:
        return {"score": float("nan"), "n_labels": 0, "per_label": {}, "note": "single batch"}
    return {"score": float(np.mean(list(per.values()))), "n_labels": len(per), "per_label": per}


def batch_silhouette_global(
    features: ArrayLike,
    batch: ArrayLike,
    *,
    metric: str = "cosine",
    sample_size: int | None = None,
    seed: int = 0,
    chunk_size: int = 2048,
) -> dict[str, Any]:
    """``1 - |s|`` with ``s`` the mean silhouette of the batch labels over all rows.

    Not scib's convention (positive and negative ``s_i`` cancel in the mean, so this reads
    higher than :func:`batch_silhouette_score`); kept under its own name for comparison with
    earlier results. Same arguments as :func:`silhouette`; one batch gives NaN with a note.

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


def _label_connectivity(adj: csr_matrix, pos: np.ndarray) -> float:
    """Largest strongly connected share of the rows ``pos`` in the subgraph of ``adj`` on them."""
    if pos.size < 2:
        return 1.0
    comps = connected_components(adj[pos][:, pos], directed=True, connection="strong")[1]
    return float(np.bincount(comps).max() / pos.size)


def graph_connectivity(
    features: ArrayLike,
    labels: ArrayLike,
    *,
    metric: str = "euclidean",
    max_rows: int | None = EXACT_MAX,
    seed: int = 0,
    adjacency: tuple[csr_matrix, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Graph connectivity (scib): mean over labels of the label's largest connected share.

    scib-metrics ``metrics/_graph_connectivity.py`` (Luecken et al., Nat Methods 2022): ONE
    kNN graph over all rows (``CONNECTIVITY_K`` = 15 neighbours counting the row itself,
    scanpy's default, Euclidean; directed, each row to its neighbours); for each label the
    subgraph on that label's rows is split into strongly connected components (scipy
    ``connected_components(connection="strong")``, as scib-metrics) and the label scores the
    share of its rows in the largest one. 1 = every label is one piece; a label whose rows
    sit in batch-specific pieces, or among other labels' rows, scores low. With more than
    ``max_rows`` rows the graph is built on a seeded sample of that many rows (``n_rows``
    says how many). ``adjacency``: a precomputed ``(adj, rows)`` from the same construction.

    Returns:
        ``{"score", "n_labels", "n_rows", "per_label": {label: fraction}}``.
    """
    x = _features(features)
    n = x.shape[0]
    codes, uniq = _codes(_labels(labels, n, "labels"), "labels")
    if n < 2:
        return {"score": float("nan"), "n_labels": 0, "n_rows": n, "per_label": {}}
    adj, rows = adjacency if adjacency is not None else _global_adjacency(x, max_rows, metric, seed)
    sub_codes = codes[rows]
    per: dict[Any, float] = {}
    for g in np.unique(sub_codes):
        per[uniq[g]] = _label_connectivity(adj, np.flatnonzero(sub_codes == g))
    vals = list(per.values())
    return {
        "score": float(np.mean(vals)) if vals else float("nan"),
        "n_labels": len(vals),
        "n_rows": int(rows.size),
        "per_label": per,
    }


def mixing_per_treatment(
    features: ArrayLike,
    batch: ArrayLike,
    treatment: ArrayLike,
    *,
    min_group_size: int = MIN_GROUP_ROWS,
    max_group_rows: int = EXACT_MAX,
    silhouette_queries: int = 500,
    alpha: float = 0.05,
    metric: str = "euclidean",
    seed: int = 0,
) -> dict[str, Any]:
    """Batch mixing within each treatment: kBET, iLISI, batch silhouette, graph connectivity.

    A design where treatments are spread unevenly over batches makes global mixing metrics
    measure composition (a batch holding only controls looks "unmixed" however well the batch
    effect is removed). Here every metric compares rows *of one treatment* with each other,
    and the score is the unweighted mean over the treatments it can score; treatments found
    in one batch only say nothing about mixing and are listed (``single_batch_treatments``).

    - kBET: scib-metrics' ``kbet_per_label`` rules (:func:`kbet_per_group`): treatments with
      fewer than ``min_group_size`` (10) rows skipped, k0 from the treatment's batch sizes,
      fragmented treatments (in one global kNN graph) scored on their large components or 0.
    - iLISI: same skip rule; k = min(90, n - 1), perplexity k / 3, scaled by the treatment's
      batch count (scib's ``ilisi_knn`` within the treatment).
    - batch silhouette: scib's ``silhouette_batch`` with treatments as labels
      (:func:`batch_silhouette_score`, Euclidean; at most ``silhouette_queries`` query rows
      per treatment).
    - graph connectivity: scib's definition (:func:`graph_connectivity`) on one global kNN
      graph of all rows (a seeded sample of ``max_group_rows`` above that), treatments as
      labels, over the treatments present in >= 2 batches.

    kBET and iLISI report how many treatments they scored (``kbet_n``, ``ilisi_n``); with
    fewer than ``MIN_SCORED_GROUPS`` (3) the mean is NaN and ``kbet_note`` / ``ilisi_note``
    say why instead of averaging one or two treatments. A treatment with more than
    ``max_group_rows`` rows is represented by a seeded sample of that many rows.

    Returns:
        ``{"kbet", "ilisi", "batch_silhouette", "graph_connectivity", "kbet_n", "ilisi_n",
        "n_treatments", "n_single_batch", "single_batch_treatments", "n_too_small",
        "per_treatment"}`` (+ notes).
    """
    x = _features(features)
    n = x.shape[0]
    bcodes, _ = _codes(_labels(batch, n, "batch"), "batch")
    tcodes, tuniq = _codes(_labels(treatment, n, "treatment"), "treatment")
    adj, in_graph = _global_adjacency(x, max_group_rows, metric, seed)
    graph_pos = np.full(n, -1, dtype=np.int64)
    graph_pos[in_graph] = np.arange(in_graph.size)
    order = np.argsort(tcodes, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(tcodes, minlength=tuniq.size))])
    single: list[Any] = []
    too_small = 0
    per: dict[Any, dict[str, float]] = {}
    for g in range(tuniq.size):
        rows = np.sort(order[bounds[g] : bounds[g + 1]])
        if np.unique(bcodes[rows]).size < 2:
            single.append(tuniq[g])
            continue
        pos = graph_pos[rows]
        pos = np.sort(pos[pos >= 0])
        rec: dict[str, float] = {
            "graph_connectivity": _label_connectivity(adj, pos) if pos.size else float("nan"),
            "n_rows": int(rows.size),
        }
        if rows.size > max_group_rows:
            rows = np.sort(rows[sample_rows(rows.size, max_group_rows, seed + g)])
        local, sizes = np.unique(bcodes[rows], return_inverse=True, return_counts=True)[1:]
        nb_g = sizes.size
        rec["n_batches"] = int(nb_g)
        sil_q = sample_rows(rows.size, silhouette_queries, seed + g)
        if nb_g <= rows.size - 1:
            s = silhouette_values(x[rows], local, sil_q, metric="euclidean")
            rec["batch_silhouette"] = float(np.mean(1.0 - np.abs(s)))
        else:
            rec["batch_silhouette"] = float("nan")  # every row its own batch: undefined
        if rows.size < max(3, min_group_size):
            too_small += 1
            rec["kbet"] = rec["ilisi"] = float("nan")
            per[tuniq[g]] = rec
            continue
        k_lisi = min(LISI_K, rows.size - 1)
        k_kbet = _scib_kbet_k0(sizes, rows.size)
        graph = rows_graph(x, rows, max(k_kbet - 1, k_lisi), metric=metric)
        comps = _group_components(adj, in_graph, rows)
        acc, info = _kbet_group(x, bcodes, rows, comps, alpha=alpha, metric=metric, graph=graph)
        rec["kbet"] = acc
        rec["kbet_k"] = info["k"]
        rec["fragmented"] = float(bool(info.get("fragmented")))
        lpos = np.searchsorted(rows, graph.indices[:, :k_lisi])
        lisi_graph = NeighborGraph(
            np.arange(rows.size), lpos, graph.similarities[:, :k_lisi], graph.metric, rows.size
        )
        lisi = lisi_values(lisi_graph, local, k_lisi / 3.0)
        rec["ilisi"] = float((np.median(lisi) - 1.0) / (nb_g - 1.0))
        per[tuniq[g]] = rec
    out: dict[str, Any] = {}
    for key in ("kbet", "ilisi", "batch_silhouette", "graph_connectivity"):
        vals = np.array([v[key] for v in per.values()], dtype=np.float64)
        vals = vals[np.isfinite(vals)]
        out[key] = float(vals.mean()) if vals.size else float("nan")
        if key in ("kbet", "ilisi"):
            out[f"{key}_n"] = int(vals.size)
            if vals.size < MIN_SCORED_GROUPS:
                out[key] = float("nan")
                out[f"{key}_note"] = (
                    f"only {vals.size} treatment(s) have >= {min_group_size} profiles in >= 2 "
                    f"batches (scib's rule); fewer than {MIN_SCORED_GROUPS}: not averaged"
                )
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
