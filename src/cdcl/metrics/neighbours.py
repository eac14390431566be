"""Neighbours: exact, memory-bounded k-nearest-neighbour search, and weighted kNN accuracy.

The search runs in blocks (no n x n matrix is ever built).

Queries are processed in chunks of ``chunk_size`` rows and the reference set in column blocks
sized so that one similarity block holds about ``BLOCK_ELEMS`` numbers; a running top-k is
merged block by block. Peak extra memory is therefore O(chunk_size x (block + k)), whatever
the number of reference points (1e5-1e6 profiles fit in a few hundred MiB).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from cdcl.metrics.classification import classification_scores
from cdcl.profiles.arrays import _features, _labels, label_isin

__all__ = [
    "BLOCK_ELEMS",
    "NeighborGraph",
    "group_graphs",
    "iter_blocks",
    "knn_indices",
    "neighbor_graph",
    "row_norms",
    "rows_graph",
    "sample_rows",
    "weighted_knn_accuracy",
]

# About 8 M numbers per similarity block: 32 MiB in float32 (64 MiB for argpartition indices).
BLOCK_ELEMS = 1 << 23

_METRICS = ("cosine", "euclidean")


def iter_blocks(n: int, size: int) -> Iterator[tuple[int, int]]:
    """Yield ``(start, stop)`` pairs covering ``range(n)`` in steps of ``size``."""
    size = max(1, int(size))
    for start in range(0, n, size):
        yield start, min(n, start + size)


def row_norms(x: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Euclidean norm of each row, computed in float64 chunks (no full float64 copy)."""
    out = np.empty(x.shape[0], dtype=np.float64)
    for a, b in iter_blocks(x.shape[0], chunk):
        blk = np.asarray(x[a:b], dtype=np.float64)
        out[a:b] = np.sqrt(np.einsum("ij,ij->i", blk, blk))
    return out


def _as_2d_float(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, d), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
    return arr


def _check_finite(x: np.ndarray, name: str, chunk: int = 65536) -> None:
    for a, b in iter_blocks(x.shape[0], chunk):
        if not np.isfinite(x[a:b]).all():
            raise ValueError(f"{name} contains NaN or infinite values")


def _prepare(x: np.ndarray, norms: np.ndarray, metric: str) -> np.ndarray:
    """Block of rows ready for a dot product: unit rows for cosine, raw rows otherwise."""
    blk = np.asarray(x, dtype=np.float32)
    if metric == "cosine":
        # Zero rows stay zero (similarity 0 to everything) instead of dividing by 0.
        blk = blk / np.maximum(norms, 1e-12).astype(np.float32)[:, None]
    return blk


def _select_topk(scores: np.ndarray, col_offset: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of each row of a block: by score desc, then by lowest column index."""
    q, r = scores.shape
    if r <= k:
        idx = np.broadcast_to(np.arange(r, dtype=np.int64), (q, r)).copy()
        return idx + col_offset, scores.copy()
    part = np.argpartition(scores, r - k, axis=1)[:, r - k :]
    top = np.take_along_axis(scores, part, axis=1)
    kth = top.min(axis=1)
    # argpartition picks an arbitrary member among values tied with the k-th largest; rows
    # with such boundary ties are redone exactly so that the lowest indices win.
    n_ge = np.count_nonzero(scores >= kth[:, None], axis=1)
    for row in np.flatnonzero(n_ge > k):
        cand = np.flatnonzero(scores[row] >= kth[row])
        order = np.lexsort((cand, -scores[row, cand]))[:k]
        part[row] = cand[order]
        top[row] = scores[row, part[row]]
    return part.astype(np.int64) + col_offset, top


def _merge(
    best_idx: np.ndarray, best_val: np.ndarray, idx: np.ndarray, val: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Merge two candidate lists per row keeping the k best (score desc, index asc)."""
    all_idx = np.concatenate([best_idx, idx], axis=1)
    all_val = np.concatenate([best_val, val], axis=1)
    order = np.lexsort((all_idx, -all_val), axis=1)[:, :k]
    return np.take_along_axis(all_idx, order, axis=1), np.take_along_axis(all_val, order, axis=1)


_SCAN = 1024  # column groups whose maxima are tested first when looking for new top-k entries


def _above(scores: np.ndarray, thr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.nonzero(scores > thr[:, None])``, testing the maxima of strided column groups first.

    Column j's group is j, j + 1024, j + 2048, ...: its maximum is an elementwise (vectorised)
    reduction, and only the few groups above the threshold are looked at column by column.
    """
    q, r = scores.shape
    main = r - r % _SCAN
    span = main // _SCAN
    if span == 0:
        return np.nonzero(scores > thr[:, None])
    gmax = scores[:, :main].reshape(q, span, _SCAN).max(axis=1)
    gr, gj = np.nonzero(gmax > thr[:, None])
    cols = gj[:, None] + _SCAN * np.arange(span)
    if scores.flags.c_contiguous:  # a flat take is several times faster than 2-D indexing
        vals = np.take(scores.reshape(-1), gr[:, None] * r + cols)
    else:
        vals = scores[gr[:, None], cols]
    hit, at = np.nonzero(vals > thr[gr][:, None])
    tail_r, tail_c = np.nonzero(scores[:, main:] > thr[:, None])
    return np.concatenate([gr[hit], tail_r]), np.concatenate([cols[hit, at], tail_c + main])


def _merge_above(
    best_idx: np.ndarray, best_val: np.ndarray, scores: np.ndarray, col_offset: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """Merge the entries of a later block that beat each row's current k-th best.

    Same result as :func:`_select_topk` + :func:`_merge` (score desc, lowest index): a later
    block's columns have higher indices, so only entries strictly above the k-th best can
    enter. After the first blocks few entries do, which spares a full ``argpartition``.
    Returns None when too many entries pass (then the full selection is cheaper).
    """
    q, k = best_val.shape
    rows, cols = _above(scores, best_val[:, -1])
    if rows.size > 2 * q * k:
        return None
    r_all = np.concatenate([np.repeat(np.arange(q), k), rows])
    i_all = np.concatenate([best_idx.ravel(), cols + col_offset])
    v_all = np.concatenate([best_val.ravel(), scores[rows, cols]])
    order = np.lexsort((i_all, -v_all, r_all))
    # Every row holds at least its k current entries: keep the first k of each row.
    starts = np.searchsorted(r_all[order], np.arange(q))
    rank = np.arange(order.size) - np.repeat(starts, np.bincount(r_all, minlength=q))
    keep = order[rank < k]
    return i_all[keep].reshape(q, k), v_all[keep].reshape(q, k)


@dataclass(frozen=True)
class _RefPart:
    """The reference rows of a search and what is precomputed on them."""

    x: np.ndarray
    rows: np.ndarray | None  # a subset of x's rows (``ref_rows``), or None for all
    norms: np.ndarray
    sq: np.ndarray  # squared norms, float32
    metric: str

    @property
    def n(self) -> int:
        return self.x.shape[0] if self.rows is None else self.rows.size


def _chunk_topk(
    qv: np.ndarray, self_rows: np.ndarray | None, ref: _RefPart, k: int, r_block: int
) -> tuple[np.ndarray, np.ndarray]:
    """Running top-k of one chunk of prepared queries over the reference set, block by block.

    ``self_rows``: the queries' own reference rows, excluded as neighbours (None: keep all).
    """
    q = qv.shape[0]
    best_idx = np.zeros((q, 0), dtype=np.int64)
    best_val = np.zeros((q, 0), dtype=np.float32)
    buf = np.empty((q, min(r_block, ref.n)), dtype=np.float32)
    for ra, rb in iter_blocks(ref.n, r_block):
        block = ref.x[ra:rb] if ref.rows is None else ref.x[ref.rows[ra:rb]]
        scores = np.matmul(
            qv, _prepare(block, ref.norms[ra:rb], ref.metric).T, out=buf[:, : rb - ra]
        )
        if ref.metric == "euclidean":
            scores -= ref.sq[ra:rb][None, :]
        if self_rows is not None:
            inside = np.flatnonzero((self_rows >= ra) & (self_rows < rb))
            scores[inside, self_rows[inside] - ra] = -np.inf
        merged = _merge_above(best_idx, best_val, scores, ra) if best_idx.shape[1] else None
        if merged is None:
            idx, val = _select_topk(scores, ra, k)
            merged = _merge(best_idx, best_val, idx, val, k)
        best_idx, best_val = merged
    return best_idx, best_val


def knn_indices(
    features: np.ndarray,
    k: int,
    *,
    query: np.ndarray | None = None,
    exclude_self: bool = True,
    chunk_size: int = 2048,
    query_indices: np.ndarray | None = None,
    metric: str = "cosine",
    ref_rows: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours of query rows among ``features``, computed in blocks.

    Definition: for ``metric="cosine"`` neighbours maximise the cosine similarity
    ``<x/|x|, y/|y|>`` (normalised dot products, float32); for ``metric="euclidean"`` they
    minimise the Euclidean distance. Results are sorted by decreasing similarity, ties broken
    deterministically by the lowest reference index. No n x n matrix is built: queries go in
    chunks of ``chunk_size`` rows, the reference set in column blocks, and a running top-k is
    merged with ``np.argpartition`` (exact search, as in DINO's ``eval_knn``).

    Args:
        features: reference set, shape (n, d).
        k: number of neighbours (``k <= n - 1`` when self-matches are excluded).
        query: separate query rows (nq, d); when given, ``exclude_self`` has no effect.
        exclude_self: with queries taken from ``features``, never return a row as its own
            neighbour.
        chunk_size: query rows per chunk.
        query_indices: rows of ``features`` to use as queries (default: all rows); their own
            index is excluded when ``exclude_self``.
        metric: ``"cosine"`` or ``"euclidean"``.
        ref_rows: with separate ``query`` rows, search only these rows of ``features`` (as if
            ``features[ref_rows]`` were passed, without that copy); indices refer to them.

    Returns:
        ``(indices, similarities)``: int64 (nq, k) reference indices and float32 (nq, k)
        scores; cosine similarities, or *negative* Euclidean distances for
        ``metric="euclidean"`` (so that they decrease along each row either way).
    """
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
    ref = _as_2d_float(features, "features")
    k = int(k)
    qsrc, qidx, rrows = _knn_queries(ref, query, query_indices, ref_rows)
    self_mode = query is None
    n = ref.shape[0] if rrows is None else rrows.size
    excl = self_mode and exclude_self
    max_k = n - 1 if excl else n
    if k < 1 or k > max_k:
        raise ValueError(f"k must be in [1, {max_k}] for {n} reference rows, got {k}")
    _check_finite(ref, "features")
    if not self_mode:
        _check_finite(qsrc, "query")
    return _knn_search(ref, rrows, qsrc, qidx, k, excl=excl, metric=metric, chunk_size=chunk_size)


def _knn_queries(
    ref: np.ndarray,
    query: np.ndarray | None,
    query_indices: np.ndarray | None,
    ref_rows: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Where :func:`knn_indices` reads its queries: ``(source rows, query rows, ref_rows)``.

    Without ``query`` the queries are rows of ``ref`` (``query_indices``, default all).
    """
    if query is not None and query_indices is not None:
        raise ValueError("pass either query or query_indices, not both")
    if ref_rows is not None and query is None:
        raise ValueError("ref_rows needs separate query rows")
    rrows = None if ref_rows is None else np.asarray(ref_rows, dtype=np.int64)
    if query is not None:
        qsrc = _as_2d_float(query, "query")
        if qsrc.shape[1] != ref.shape[1]:
            raise ValueError(f"query has {qsrc.shape[1]} columns, features {ref.shape[1]}")
        return qsrc, np.arange(qsrc.shape[0], dtype=np.int64), rrows
    n = ref.shape[0]
    qidx = (
        np.arange(n, dtype=np.int64)
        if query_indices is None
        else np.asarray(query_indices, dtype=np.int64).ravel()
    )
    if qidx.size and (qidx.min() < 0 or qidx.max() >= n):
        raise ValueError("query_indices out of range")
    return ref, qidx, rrows


def _knn_search(
    ref: np.ndarray,
    rrows: np.ndarray | None,
    qsrc: np.ndarray,
    qidx: np.ndarray,
    k: int,
    *,
    excl: bool,
    metric: str,
    chunk_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of the query rows ``qsrc[qidx]`` in chunks (``excl``: never a row itself)."""
    nq = qidx.size
    out_idx = np.empty((nq, k), dtype=np.int64)
    out_val = np.empty((nq, k), dtype=np.float32)
    if nq == 0:
        return out_idx, out_val
    ref_norm = row_norms(ref) if rrows is None else row_norms(ref)[rrows]
    ref_part = _RefPart(ref, rrows, ref_norm, (ref_norm**2).astype(np.float32), metric)
    q_chunk = max(1, int(chunk_size))
    r_block = max(k, BLOCK_ELEMS // min(q_chunk, nq))
    for qa, qb in iter_blocks(nq, q_chunk):
        rows = qidx[qa:qb]
        qx = qsrc[rows]
        q_norm = row_norms(qx)
        qv = _prepare(qx, q_norm, metric)
        if metric == "euclidean":
            # Rank by 2 q.x - |x|^2 (= |q|^2 - |q - x|^2): same order as -distance. Doubling
            # the queries is exact, so the scores equal 2 (q @ x.T) bit for bit.
            qv = qv * np.float32(2.0)
        best_idx, best_val = _chunk_topk(qv, rows if excl else None, ref_part, k, r_block)
        if metric == "euclidean":
            d2 = (q_norm**2).astype(np.float32)[:, None] - best_val
            best_val = -np.sqrt(np.maximum(d2, 0.0)).astype(np.float32)
        out_idx[qa:qb] = best_idx
        out_val[qa:qb] = best_val
    return out_idx, out_val


@dataclass(frozen=True)
class NeighborGraph:
    """The k nearest neighbours of some query rows: one search shared by several metrics.

    The shape of scib-metrics' ``NeighborsResults``: ``indices[i]`` are the rows nearest to
    row ``queries[i]`` (itself excluded), sorted by decreasing ``similarities`` (cosine
    similarity, or *negative* Euclidean distance), ties by the lowest row number. Row numbers
    refer to the ``n`` rows of the feature set the graph was built on.
    """

    queries: np.ndarray
    indices: np.ndarray
    similarities: np.ndarray
    metric: str
    n: int

    @property
    def k(self) -> int:
        """Number of neighbours per query."""
        return int(self.indices.shape[1])

    def distances(self) -> np.ndarray:
        """Distances of the neighbours: Euclidean, or ``1 - cos`` for cosine graphs."""
        if self.metric == "euclidean":
            return -self.similarities.astype(np.float64)
        return 1.0 - self.similarities.astype(np.float64)


def sample_rows(n: int, size: int | None, seed: int) -> np.ndarray:
    """All rows (``size`` None or >= n), else a seeded uniform sample, sorted."""
    if size is None or size >= n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, int(size), replace=False)).astype(np.int64)


def neighbor_graph(
    features: np.ndarray,
    k: int,
    *,
    query_indices: np.ndarray | None = None,
    metric: str = "euclidean",
    chunk_size: int = 2048,
) -> NeighborGraph:
    """Exact k-nearest-neighbour graph of ``query_indices`` (default all rows), self excluded.

    One :func:`knn_indices` search whose result every neighbourhood metric (kBET, iLISI) reads;
    ``k`` is capped at ``n - 1``.
    """
    x = _as_2d_float(features, "features")
    n = x.shape[0]
    q = np.arange(n, dtype=np.int64) if query_indices is None else np.asarray(query_indices)
    k = int(min(k, n - 1))
    idx, sim = knn_indices(
        x, k, query_indices=q, exclude_self=True, chunk_size=chunk_size, metric=metric
    )
    return NeighborGraph(q.astype(np.int64), idx, sim, metric, n)


def group_graphs(
    features: np.ndarray,
    group_codes: np.ndarray,
    k: int,
    *,
    groups: np.ndarray | None = None,
    max_rows: int | None = None,
    metric: str = "euclidean",
    seed: int = 0,
    chunk_size: int = 2048,
) -> dict[int, NeighborGraph]:
    """One kNN graph per group, neighbours searched among the group's own rows only.

    For each group code in ``groups`` (default every code) the group's rows (sorted, so ties
    resolve as a search on ``features[rows]`` alone would) are the queries and the reference
    set; ``k`` is capped at the group size - 1. A group larger than ``max_rows`` is replaced
    by a seeded sample of ``max_rows`` of its rows (queries and references). Indices are row
    numbers of ``features``. Cost: sum of squared group sizes, not n squared.
    """
    x = _as_2d_float(features, "features")
    codes = np.asarray(group_codes, dtype=np.int64)
    order = np.argsort(codes, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(codes))])
    wanted = np.unique(codes) if groups is None else np.asarray(groups, dtype=np.int64)
    out: dict[int, NeighborGraph] = {}
    for g in wanted:
        rows = order[bounds[g] : bounds[g + 1]]
        if max_rows is not None and rows.size > max_rows:
            rows = rows[sample_rows(rows.size, max_rows, seed + int(g))]
        if rows.size < 2:
            continue
        out[int(g)] = rows_graph(x, rows, k, metric=metric, chunk_size=chunk_size)
    return out


def rows_graph(
    features: np.ndarray,
    rows: np.ndarray,
    k: int,
    *,
    metric: str = "euclidean",
    chunk_size: int = 2048,
) -> NeighborGraph:
    """kNN graph of the given rows among themselves only (``k`` capped at len(rows) - 1)."""
    x = _as_2d_float(features, "features")
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    kg = int(min(k, rows.size - 1))
    idx, sim = knn_indices(x[rows], kg, exclude_self=True, chunk_size=chunk_size, metric=metric)
    return NeighborGraph(rows, rows[idx], sim, metric, x.shape[0])


def weighted_knn_accuracy(
    train_x: ArrayLike,
    train_y: ArrayLike,
    test_x: ArrayLike,
    test_y: ArrayLike,
    k: int = 10,
    temperature: float = 0.1,
    *,
    chunk_size: int = 2048,
    max_queries: int | None = None,
    seed: int = 0,
    train_rows: np.ndarray | None = None,
    test_rows: np.ndarray | None = None,
) -> dict[str, float]:
    """Weighted kNN classifier accuracy (Wu et al., CVPR 2018; DINO ``eval_knn``).

    Each test row takes its ``k`` nearest training rows by cosine similarity ``s``; each
    neighbour votes for its label with weight ``exp(s / temperature)``; the prediction is the
    label with the largest summed weight (ties: the first label in sorted order). Test labels
    absent from the training set can never be predicted and count as errors
    (``n_test_unseen_label`` says how many).

    With ``max_queries`` and more test rows than that, a seeded uniform sample of
    ``max_queries`` test rows is scored (accuracy is a mean over test rows, so the sample
    estimates it without bias; its binomial standard error sqrt(p(1-p)/m) is ``stderr``).

    ``train_rows`` / ``test_rows``: use only these rows of ``train_x`` / ``test_x`` (labels one
    per selected row), as if ``train_x[train_rows]`` were passed, without copying a large table.

    Returns:
        ``{"accuracy", "macro_f1", "k", "n_test_unseen_label", "n_queries", "stderr"}``.
    """
    tr = _features(train_x, "train_x")
    x_te = _features(test_x, "test_x")
    n_tr = tr.shape[0] if train_rows is None else len(train_rows)
    te_ix = np.arange(x_te.shape[0]) if test_rows is None else np.asarray(test_rows)
    ytr = _labels(train_y, n_tr, "train_y")
    yte = _labels(test_y, te_ix.size, "test_y")
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    keep = sample_rows(te_ix.size, max_queries, seed)
    if keep.size < te_ix.size:
        te_ix, yte = te_ix[keep], yte[keep]
    te = x_te[te_ix] if test_rows is not None or keep.size < x_te.shape[0] else x_te
    classes, ycodes = np.unique(ytr, return_inverse=True)
    k_eff = min(int(k), n_tr)
    idx, sim = knn_indices(tr, k_eff, query=te, chunk_size=chunk_size, ref_rows=train_rows)
    # exp((s - 1)/T) = exp(s/T) * const: same argmax, no overflow for small T.
    weights = np.exp((sim.astype(np.float64) - 1.0) / temperature)
    n_cls = classes.size
    pred_codes = np.empty(te.shape[0], dtype=np.int64)
    step = max(1, BLOCK_ELEMS // max(n_cls, 1))
    for a, b in iter_blocks(te.shape[0], step):
        votes = np.zeros((b - a, n_cls))
        rows = np.arange(b - a)
        nbr = ycodes[idx[a:b]]
        for j in range(k_eff):
            votes[rows, nbr[:, j]] += weights[a:b, j]
        pred_codes[a:b] = votes.argmax(axis=1)
    pred = classes[pred_codes]
    out: dict[str, float] = dict(classification_scores(yte, pred))
    out["k"] = k_eff
    out["n_test_unseen_label"] = int((~label_isin(yte, classes)).sum())
    out["n_queries"] = int(te.shape[0])
    acc = out["accuracy"]
    sampled = keep.size < int(np.asarray(test_y).shape[0])
    out["stderr"] = float(np.sqrt(acc * (1 - acc) / te.shape[0])) if sampled else 0.0
    return out
