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
from dataclasses import dataclass
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
# Above EXACT_MAX rows, per-label kBET (its fragmentation rule) and graph connectivity read
# the kNN graph over ALL rows from the rows of a seeded sample of whole labels: their exact
# neighbours among all rows, so a sampled label's subgraph is the full graph's. GRAPH_PAIRS
# bounds searched rows x all rows (~4e9 pairs: about half a minute at 384 features, 2 cores).
GRAPH_PAIRS = 4_000_000_000


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
    pair_budget: int = GRAPH_PAIRS,
    seed: int = 0,
) -> dict[str, Any]:
    """kBET within each group (e.g. per treatment), with scib-metrics' ``kbet_per_label`` rules.

    scib-metrics ``metrics/_kbet.py``: a group with fewer than ``min_group_size`` (10) rows or
    one batch is skipped; ``k0 = min(70, max(10, floor(mean batch size / 4)))`` (capped at
    the group size - 1); the group's subgraph of one kNN graph over all rows
    (``CONNECTIVITY_K``) is split into connected components: one component -> kBET on the
    group; several -> kBET on the components of at least ``3 k0`` rows if they hold >= 75%
    of the group, else 0. Convention difference: the neighbours are Euclidean kNN among the
    group's rows, where scib-metrics uses diffusion distances on the group's subgraph.

    Above ``max_graph_rows`` rows a seeded sample of whole groups is scored
    (:func:`label_graph`, ``pair_budget``); ``stderr`` is the sampling standard error of the
    mean (0 when every group is scored) and ``graph`` says how the graph was searched.

    Returns:
        ``{"mean_acceptance", "stderr", "n_groups", "n_skipped", "n_fragmented",
        "per_group", "graph"}``; the mean is over scored groups (NaN if none).
    """
    x = _features(features)
    n = x.shape[0]
    bcodes, _ = _codes(_labels(batch, n, "batch"), "batch")
    gcodes, guniq = _codes(_labels(groups, n, "groups"), "groups")
    rows_of = _group_rows(gcodes, guniq.size)
    big = max(3, min_group_size)
    multi = distinct_per_group(bcodes, gcodes).to_numpy() >= 2
    ok = np.array([r.size >= big for r in rows_of], dtype=bool) & multi
    lg = label_graph(
        x, gcodes, ok, exact_max=max_graph_rows, pair_budget=pair_budget, metric=metric, seed=seed
    )
    per_group: dict[Hashable, float] = {}
    fragmented = 0
    for g in lg.scored:
        rows = rows_of[g]
        comps = _fragments(lg.adj, rows)
        acc, info = _kbet_group(x, bcodes, rows, comps, alpha=alpha, metric=metric)
        fragmented += int(bool(info.get("fragmented")))
        per_group[guniq[g]] = acc
    vals = np.array(list(per_group.values()), dtype=np.float64)
    return {
        "mean_acceptance": float(vals.mean()) if vals.size else float("nan"),
        "stderr": srs_stderr(vals, lg.frame.size),
        "n_groups": int(vals.size),
        "n_skipped": int((~ok).sum()),
        "n_fragmented": fragmented,
        "per_group": per_group,
        "graph": lg.info(n),
    }


def distinct_per_group(values: ArrayLike, groups: ArrayLike) -> pd.Series:
    """How many distinct ``values`` the rows of each group hold, indexed by sorted group.

    E.g. the batches of each treatment (per-treatment mixing needs two) or the plates of each
    batch (the plate-grouped batch classifier needs two).
    """
    return pd.Series(values).groupby(groups).nunique()


def _group_rows(codes: np.ndarray, n_groups: int) -> list[np.ndarray]:
    """The sorted rows of each group code."""
    order = np.argsort(codes, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(codes, minlength=n_groups))])
    return [np.sort(order[bounds[g] : bounds[g + 1]]) for g in range(n_groups)]


@dataclass(frozen=True)
class LabelGraph:
    """One kNN graph over all rows, searched from every row or from a sample of whole labels.

    ``adj`` (n x n, directed) holds each searched row's ``CONNECTIVITY_K - 1`` exact nearest
    rows, so the subgraph on any label in ``scored`` equals the full graph's. ``frame``: the
    labels eligible for the sample; ``too_large``: eligible labels left out, larger than a
    sample may hold (their rows are not searched).
    """

    adj: csr_matrix
    scored: np.ndarray
    frame: np.ndarray
    too_large: np.ndarray
    n_query_rows: int

    def has(self, code: int) -> bool:
        """Whether the label's subgraph is complete (the label was searched)."""
        i = np.searchsorted(self.scored, code)
        return bool(i < self.scored.size and self.scored[i] == code)

    def info(self, n: int) -> dict[str, Any]:
        """How the graph was built, for results.json."""
        return {
            "n_rows": int(n),
            "n_query_rows": int(self.n_query_rows),
            "labels_scored": int(self.scored.size),
            "labels_in_frame": int(self.frame.size),
            "sampled": bool(self.scored.size < self.frame.size),
            "n_too_large": int(self.too_large.size),
        }


def _knn_adjacency(x: np.ndarray, query: np.ndarray | None, metric: str) -> csr_matrix:
    """Directed n x n adjacency: each query row (default all) to its nearest other rows."""
    n = x.shape[0]
    graph = neighbor_graph(x, CONNECTIVITY_K - 1, query_indices=query, metric=metric)
    src = np.repeat(graph.queries, graph.k)
    data = np.ones(src.size, dtype=np.int8)
    return csr_matrix((data, (src, graph.indices.ravel())), shape=(n, n))


def _sample_labels(sizes: np.ndarray, frame: np.ndarray, budget_rows: int, seed: int) -> np.ndarray:
    """Seeded simple random sample of the ``frame`` labels whose rows fit ``budget_rows``.

    The sample size is the budget over the mean label size (at least ``MIN_SCORED_GROUPS``),
    so its rows fit the budget on average; whole labels, so each subgraph is complete.
    """
    if sizes[frame].sum() <= budget_rows:
        return frame  # every label fits: nothing to sample
    m = int(budget_rows // float(sizes[frame].mean()))
    m = min(frame.size, max(m, MIN_SCORED_GROUPS))
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(frame, m, replace=False))


def label_graph(
    x: np.ndarray,
    codes: np.ndarray,
    eligible: np.ndarray,
    *,
    exact_max: int | None = EXACT_MAX,
    pair_budget: int = GRAPH_PAIRS,
    max_label_rows: int = EXACT_MAX,
    metric: str = "euclidean",
    seed: int = 0,
) -> LabelGraph:
    """The kNN graph over all rows that per-label kBET and graph connectivity read.

    Up to ``exact_max`` rows (None: always) every row is searched and every ``eligible``
    label (bool per label code) scored. Above, a seeded simple random sample of whole
    eligible labels is searched against all rows, about ``pair_budget / n`` rows in all;
    labels with more than ``max_label_rows`` rows (or a third of that budget) are left out.
    """
    n = x.shape[0]
    sizes = np.bincount(codes, minlength=eligible.size)
    cand = np.flatnonzero(eligible)
    if exact_max is None or n <= exact_max:
        empty = np.zeros(0, dtype=np.int64)
        return LabelGraph(_knn_adjacency(x, None, metric), cand, cand, empty, n)
    budget = max(pair_budget // n, 1)
    cap = min(max_label_rows, budget // MIN_SCORED_GROUPS)
    frame, too_large = cand[sizes[cand] <= cap], cand[sizes[cand] > cap]
    scored = _sample_labels(sizes, frame, budget, seed)
    query = np.flatnonzero(np.isin(codes, scored))
    adj = _knn_adjacency(x, query, metric) if query.size else csr_matrix((n, n), dtype=np.int8)
    return LabelGraph(adj, scored, frame, too_large, int(query.size))


def srs_stderr(values: np.ndarray, population: int) -> float:
    """Standard error of a mean of [0, 1] scores over a simple random sample of labels.

    ``values``: the sampled labels' scores; sd / sqrt(m) x sqrt(1 - m / N) (finite
    population correction); 0 when every label is scored, NaN with fewer than 2.
    """
    m = values.size
    if m >= population:
        return 0.0
    if m < 2:
        return float("nan")
    sd = float(values.std(ddof=1))
    if sd == 0.0:
        # Every sampled label scores the same, so the sample cannot estimate the spread: take
        # that of one label in m lying at the far end of [0, 1] (rare labels unlike the sample).
        far = max(float(values[0]), 1.0 - float(values[0]))
        sd = far * math.sqrt((1.0 / m) * (1.0 - 1.0 / m))
    return sd / math.sqrt(m) * math.sqrt(1.0 - m / population)


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


def _label_connectivity(adj: csr_matrix, rows: np.ndarray) -> float:
    """Largest strongly connected share of ``rows`` in the subgraph of ``adj`` on them."""
    if rows.size < 2:
        return 1.0
    comps = connected_components(adj[rows][:, rows], directed=True, connection="strong")[1]
    return float(np.bincount(comps).max() / rows.size)


def graph_connectivity(
    features: ArrayLike,
    labels: ArrayLike,
    *,
    metric: str = "euclidean",
    max_rows: int | None = EXACT_MAX,
    pair_budget: int = GRAPH_PAIRS,
    seed: int = 0,
    graph: LabelGraph | None = None,
) -> dict[str, Any]:
    """Graph connectivity (scib): mean over labels of the label's largest connected share.

    scib-metrics ``metrics/_graph_connectivity.py`` (Luecken et al., Nat Methods 2022): ONE
    kNN graph over all rows (``CONNECTIVITY_K`` = 15 neighbours counting the row itself,
    scanpy's default, Euclidean; directed, each row to its neighbours); for each label the
    subgraph on that label's rows is split into strongly connected components (scipy
    ``connected_components(connection="strong")``, as scib-metrics) and the label scores the
    share of its rows in the largest one. 1 = every label is one piece; a label whose rows
    sit in batch-specific pieces, or among other labels' rows, scores low. With more than
    ``max_rows`` rows a seeded sample of whole labels is scored on the graph over all rows
    (:func:`label_graph`); ``stderr`` is its sampling standard error (0 when every label is
    scored). ``graph``: a precomputed :class:`LabelGraph` of these rows and label codes.

    Returns:
        ``{"score", "stderr", "n_labels", "n_rows", "per_label": {label: fraction}, "graph"}``.
    """
    x = _features(features)
    n = x.shape[0]
    codes, uniq = _codes(_labels(labels, n, "labels"), "labels")
    if n < 2:
        return {"score": float("nan"), "n_labels": 0, "n_rows": n, "per_label": {}}
    if graph is None:
        every = np.ones(uniq.size, dtype=bool)
        kw = {"exact_max": max_rows, "pair_budget": pair_budget, "metric": metric}
        graph = label_graph(x, codes, every, seed=seed, **kw)
    rows_of = _group_rows(codes, uniq.size)
    per = {uniq[g]: _label_connectivity(graph.adj, rows_of[g]) for g in graph.scored}
    vals = np.array(list(per.values()), dtype=np.float64)
    return {
        "score": float(vals.mean()) if vals.size else float("nan"),
        "stderr": srs_stderr(vals, graph.frame.size),
        "n_labels": int(vals.size),
        "n_rows": n,
        "per_label": per,
        "graph": graph.info(n),
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
    pair_budget: int = GRAPH_PAIRS,
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
      fragmented treatments (in one kNN graph over all rows) scored on their large
      components or 0. Unlike scib, a treatment with fewer than 3 k0 rows
      (:func:`kbet_min_rows`) is left out (NaN, counted in ``n_kbet_not_computable``): split
      in the graph it would score 0 however well its batches mix.
    - iLISI: same skip rule; k = min(90, n - 1), perplexity k / 3, scaled by the treatment's
      batch count (scib's ``ilisi_knn`` within the treatment).
    - batch silhouette: scib's ``silhouette_batch`` with treatments as labels
      (:func:`batch_silhouette_score`, Euclidean; at most ``silhouette_queries`` query rows
      per treatment).
    - graph connectivity: scib's definition (:func:`graph_connectivity`) on the same kNN
      graph over all rows, treatments as labels, over the treatments present in >= 2 batches.

    Up to ``max_group_rows`` rows every treatment is scored. Above, kBET and graph
    connectivity score a seeded sample of whole treatments on the graph over all rows
    (:func:`label_graph`, ``pair_budget``) and report its standard error (``kbet_stderr``,
    ``graph_connectivity_stderr``; 0 when every treatment is scored) and how the graph was
    searched (``graph``); iLISI and the silhouette still score every treatment, a treatment
    with more than ``max_group_rows`` rows on a seeded sample of that many rows.
    kBET and iLISI report how many treatments they scored (``kbet_n``, ``ilisi_n``); with
    fewer than ``MIN_SCORED_GROUPS`` (3) the mean is NaN and ``kbet_note`` / ``ilisi_note``
    say why instead of averaging one or two treatments.

    Returns:
        ``{"kbet", "ilisi", "batch_silhouette", "graph_connectivity", "kbet_n", "ilisi_n",
        "graph_connectivity_n", "kbet_stderr", "graph_connectivity_stderr", "graph",
        "n_treatments", "n_single_batch", "single_batch_treatments", "n_too_small",
        "n_kbet_not_computable", "per_treatment"}`` (+ notes; ``kbet_note`` starts "not
        computable on this design" when no kBET mean is reported).
    """
    x = _features(features)
    n = x.shape[0]
    bcodes, _ = _codes(_labels(batch, n, "batch"), "batch")
    tcodes, tuniq = _codes(_labels(treatment, n, "treatment"), "treatment")
    rows_of = _group_rows(tcodes, tuniq.size)
    multi = distinct_per_group(bcodes, tcodes).to_numpy() >= 2
    lg = label_graph(
        x,
        tcodes,
        multi,
        exact_max=max_group_rows,
        pair_budget=pair_budget,
        max_label_rows=max_group_rows,
        metric=metric,
        seed=seed,
    )
    opts = {"min_group_size": min_group_size, "max_group_rows": max_group_rows}
    opts.update(silhouette_queries=silhouette_queries, alpha=alpha, metric=metric, seed=seed)
    per: dict[Any, dict[str, float]] = {}
    for g in np.flatnonzero(multi):
        per[tuniq[g]] = _treatment_mixing(x, bcodes, rows_of[g], int(g), lg, **opts)
    min_size = max(3, min_group_size)
    pop = {"graph_connectivity": int(lg.frame.size)}

    def kbet_ok(g: int) -> bool:
        return rows_of[g].size >= kbet_min_rows(
            np.unique(bcodes[rows_of[g]], return_counts=True)[1], min_group_size
        )

    pop["kbet"] = int(sum(kbet_ok(g) for g in lg.frame))  # kBET leaves out smaller ones
    out = _treatment_means(per, pop, min_group_size)
    out["graph"] = lg.info(n)
    if lg.too_large.size:
        out["too_large_treatments"] = [str(tuniq[g]) for g in lg.too_large]
    single = [tuniq[g] for g in np.flatnonzero(~multi)]
    out["n_treatments"] = len(per)
    out["n_single_batch"] = len(single)
    out["single_batch_treatments"] = [str(t) for t in single]
    out["n_too_small"] = sum(1 for v in per.values() if v["n_rows"] < min_size)
    # Treatments with enough rows for iLISI but fewer than kBET's rule needs: left out of kBET.
    out["n_kbet_not_computable"] = sum(
        1 for v in per.values() if min_size <= v["n_rows"] < v.get("kbet_min_rows", 0)
    )
    out["per_treatment"] = {str(t): v for t, v in per.items()}
    return out


def kbet_min_rows(batch_sizes: np.ndarray, min_group_size: int = MIN_GROUP_ROWS) -> int:
    """Rows a treatment needs for per-treatment kBET to measure mixing: max(min size, 3 k0).

    scib's ``kbet_per_label`` scores a label that falls apart in the kNN graph on its
    components of at least 3 k0 rows, else 0. A treatment with fewer rows than 3 k0 scores 0
    whenever it is split in the graph, however well its batches mix: the figure would then
    read compactness, not mixing, so such treatments are left out (reported as not
    computable) instead of scored 0 or scored only when they happen to be connected.
    """
    n = int(np.sum(batch_sizes))
    return max(3, int(min_group_size), 3 * _scib_kbet_k0(np.asarray(batch_sizes), n))


def _treatment_mixing(
    x: np.ndarray,
    bcodes: np.ndarray,
    rows: np.ndarray,
    g: int,
    lg: LabelGraph,
    *,
    min_group_size: int,
    max_group_rows: int,
    silhouette_queries: int,
    alpha: float,
    metric: str,
    seed: int,
) -> dict[str, float]:
    """kBET, iLISI, batch silhouette and graph connectivity of one treatment (code ``g``)."""
    scored = lg.has(g)  # its subgraph of the graph over all rows is complete
    nan = float("nan")
    rec: dict[str, float] = {
        "graph_connectivity": _label_connectivity(lg.adj, rows) if scored else nan,
        "n_rows": int(rows.size),
    }
    if rows.size > max_group_rows:  # never a scored one: the graph sample leaves these out
        rows = np.sort(rows[sample_rows(rows.size, max_group_rows, seed + g)])
    local, sizes = np.unique(bcodes[rows], return_inverse=True, return_counts=True)[1:]
    nb_g = sizes.size
    rec["n_batches"] = int(nb_g)
    if nb_g <= rows.size - 1:
        sil_q = sample_rows(rows.size, silhouette_queries, seed + g)
        s = silhouette_values(x[rows], local, sil_q, metric="euclidean")
        rec["batch_silhouette"] = float(np.mean(1.0 - np.abs(s)))
    else:
        rec["batch_silhouette"] = nan  # every row its own batch: undefined
    rec["kbet"] = rec["ilisi"] = nan
    if rows.size < max(3, min_group_size):
        return rec
    k_lisi = min(LISI_K, rows.size - 1)
    k_kbet = _scib_kbet_k0(sizes, rows.size)
    graph = rows_graph(x, rows, max(k_kbet - 1, k_lisi), metric=metric)
    rec["kbet_min_rows"] = float(kbet_min_rows(sizes, min_group_size))
    if scored and rows.size >= rec["kbet_min_rows"]:
        comps = _fragments(lg.adj, rows)
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
    return rec


def _treatment_means(
    per: dict[Any, dict[str, float]], population: dict[str, int], min_group_size: int
) -> dict[str, Any]:
    """Means over the scored treatments, their counts, and the sampling errors of kBET and GC.

    ``population``: for kBET and graph connectivity, how many treatments the sample was drawn
    from (equal to the number scored when nothing was sampled: standard error 0).
    """
    out: dict[str, Any] = {}
    for key in ("kbet", "ilisi", "batch_silhouette", "graph_connectivity"):
        vals = np.array([v[key] for v in per.values()], dtype=np.float64)
        vals = vals[np.isfinite(vals)]
        out[key] = float(vals.mean()) if vals.size else float("nan")
        if key != "batch_silhouette":
            out[f"{key}_n"] = int(vals.size)
        if key in population:
            out[f"{key}_stderr"] = srs_stderr(vals, population[key])
        if key == "kbet" and vals.size < MIN_SCORED_GROUPS:
            out[key] = float("nan")
            out[f"{key}_note"] = (
                f"not computable on this design: only {vals.size} treatment(s) have >= "
                f"{min_group_size} profiles in >= 2 batches and at least 3 k0 profiles (scib's "
                "rule needs 3 k0 rows in a component of a split treatment, else it scores 0 "
                f"for compactness, not mixing); fewer than {MIN_SCORED_GROUPS}: not averaged"
            )
        elif key == "ilisi" and vals.size < MIN_SCORED_GROUPS:
            out[key] = float("nan")
            out[f"{key}_note"] = (
                f"only {vals.size} treatment(s) have >= {min_group_size} profiles in >= 2 "
                f"batches (scib's rule); fewer than {MIN_SCORED_GROUPS}: not averaged"
            )
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
