"""Retrieval mAP with copairs conventions (Kalinin et al., Nat Commun 2025; copairs).

Each query ranks all candidate profiles by cosine similarity; positives and negatives are set by
``sameby``/``diffby`` rules (replicates vs controls, MoA matches vs other MoAs, batch-aware
variants that take positives only from other batches). AP per query, mAP per group, a
permutation null for p-values and Benjamini-Hochberg correction, as copairs computes them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy import sparse
from scipy.special import gammaln

from cdcl.metrics.neighbours import BLOCK_ELEMS, iter_blocks
from cdcl.profiles.arrays import (
    _as_list,
    _bool_column,
    _codes,
    _features,
    _has_label,
    _unit_rows,
)

# Query rows per block times all rows (pair masks and similarities of one block): 32 M
# numbers, ~230 MiB of masks and similarities at any n; fewer passes over the table.
_MAP_BLOCK = 1 << 25
_GATHER_ROWS = 16_384  # candidate rows normalised at a time (float64: 48 MiB at 384 features)


def _pair_mask(
    q_codes: list[np.ndarray], all_codes: list[np.ndarray], same: list[int], diff: list[int]
) -> np.ndarray:
    """Rows x all mask: equal on every ``same`` column and different on every ``diff`` one."""
    shape = (q_codes[0].size, all_codes[0].size) if q_codes else (0, 0)
    mask = np.ones(shape, dtype=bool)
    for c in same:
        mask &= q_codes[c][:, None] == all_codes[c][None, :]
    for c in diff:
        mask &= q_codes[c][:, None] != all_codes[c][None, :]
    return mask


def average_precision(
    features: ArrayLike,
    meta: pd.DataFrame,
    *,
    pos_sameby: Sequence[str],
    pos_diffby: Sequence[str] = (),
    neg_sameby: Sequence[str] = (),
    neg_diffby: Sequence[str],
    batch_aware: bool = False,
    batch_col: str = "batch",
    query_indices: np.ndarray | None = None,
    unit_rows: bool = False,
    row_index: np.ndarray | None = None,
) -> pd.DataFrame:
    """Average precision of every row as a query, with the pair rules of ``copairs``.

    Kalinin et al., "A versatile information retrieval framework for evaluating profile
    strength and similarity", Nat Commun 2025 (``copairs.map.average_precision``). Row j is a
    positive for query i (j != i) when it equals i on every ``pos_sameby`` column and differs
    on every ``pos_diffby`` column; a negative when it equals i on every ``neg_sameby`` and
    differs on every ``neg_diffby`` column (a pair meeting both rules is listed twice, as in
    copairs). Positives and negatives are ranked by cosine similarity (float32, key
    ``1 - sim``) and ``AP = mean over positives of precision at the positive's rank``. Tied
    similarities count as chance: the AP is its expectation over random orders of the tied
    items (:func:`_expected_ap`). copairs 0.5.5 instead ranks a positive tied with a negative
    first (its stable sort lists positive pairs before negative ones), which scores a table
    without variance as AP 1; without ties the two agree. ``batch_aware=True``
    adds ``batch_col`` to ``pos_diffby``: positives must come from another batch.

    Per query the negatives are sorted once (shared by every ``batch_aware`` setting) and
    each distinct positive key is looked up in them by binary search, which counts the
    negatives ranked before it and tied with it. ``query_indices``: score
    only these rows as queries (each still ranked against all rows); the output then holds
    those rows only. ``unit_rows=True``: ``features`` already have unit L2 rows (float32);
    otherwise rows are normalised as they are read (no normalised copy of the table is made).
    ``row_index`` maps meta row i to features row ``row_index[i]`` (one table serves several
    row subsets).

    Returns:
        ``meta`` (index reset) plus ``n_pos_pairs``, ``n_total_pairs`` and
        ``average_precision`` (NaN for rows without positives), copairs' column names.
    """
    return average_precisions(
        features,
        meta,
        pos_sameby=pos_sameby,
        pos_diffby=pos_diffby,
        neg_sameby=neg_sameby,
        neg_diffby=neg_diffby,
        batch_aware=(batch_aware,),
        batch_col=batch_col,
        query_indices=query_indices,
        unit_rows=unit_rows,
        row_index=row_index,
    )[0]


def average_precisions(
    features: ArrayLike,
    meta: pd.DataFrame,
    *,
    pos_sameby: Sequence[str],
    pos_diffby: Sequence[str] = (),
    neg_sameby: Sequence[str] = (),
    neg_diffby: Sequence[str],
    batch_aware: Sequence[bool | str] = (False, True),
    batch_col: str = "batch",
    query_indices: np.ndarray | None = None,
    unit_rows: bool = False,
    row_index: np.ndarray | None = None,
    same_diffby: Sequence[str] = (),
    match: tuple[int, int] | None = None,
    seed: int = 0,
) -> list[pd.DataFrame]:
    """:func:`average_precision` for several ``batch_aware`` settings from one ranking.

    The settings share the queries, the negatives and the similarities (computed once per
    query block); only the positives differ: ``False`` as the rules say, ``True`` (batch-aware)
    only from another ``batch_col``, ``SAME_BATCH`` only from the query's own ``batch_col``
    and differing on every ``same_diffby`` column (e.g. another plate). One frame per entry
    of ``batch_aware``, each equal to what :func:`average_precision` returns for that setting.

    ``match=(a, b)``: settings ``a`` and ``b`` are also compared at equal numbers of
    positives. Per query, with ``m`` the smaller of its two positive counts, each setting's
    AP is its expectation over the random ``m``-subsets of that setting's positives
    (:func:`matched_ap`); frames ``a`` and ``b`` get ``matched_average_precision`` (NaN where
    either setting has no positive) and ``n_matched`` (``m``). The AP of a query grows with
    its share of positives, so without the matching a setting with fewer positives would
    score lower with no batch effect at all.
    """
    x = _features(features)
    frame = meta.reset_index(drop=True)
    n = len(frame)
    rix = None if row_index is None else np.asarray(row_index, dtype=np.int64)
    if (rix.size if rix is not None else x.shape[0]) != n:
        raise ValueError(f"meta has {n} rows, features {x.shape[0]}")
    neg_rule = (_as_list(neg_sameby), _as_list(neg_diffby))
    rules = [
        _setting_rules(aware, _as_list(pos_sameby), _as_list(pos_diffby), batch_col, same_diffby)
        for aware in batch_aware
    ]
    _check_rules(rules, neg_rule, match)
    codes, pos_ix, neg_ix = _rule_codes(frame, rules, neg_rule)
    ranking = _Ranking(x, rix, unit_rows, n, codes, pos_ix, neg_ix)
    queries = np.arange(n) if query_indices is None else np.sort(np.asarray(query_indices))
    scores = _APScores.empty(queries.size, len(rules))
    qb = max(1, min(256, _MAP_BLOCK // max(n, 1)))
    for qa, qz in iter_blocks(queries.size, qb):
        q_rows = queries[qa:qz]
        key, neg_all, pos_masks = _block_pairs(ranking, q_rows)
        _score_block(key, neg_all, pos_masks, q_rows, qa, scores, match, seed)
    return _ap_frames(frame, queries, scores, match)


def _check_rules(
    rules: list[tuple[list[str], list[str]]],
    neg_rule: tuple[list[str], list[str]],
    match: tuple[int, int] | None,
) -> None:
    """Raise the errors of :func:`average_precisions` for unusable pair rules or ``match``."""
    neg_same, neg_diff = neg_rule
    for pos_same, pos_diff in rules:
        if set(pos_same) & set(pos_diff) or set(neg_same) & set(neg_diff):
            raise ValueError("sameby and diffby must be disjoint lists")
        if not (pos_same or pos_diff) or not (neg_same or neg_diff):
            raise ValueError("positive and negative rules each need at least one column")
    if match is not None and (len(set(match)) != 2 or not set(match) <= set(range(len(rules)))):
        raise ValueError(f"match must name two different settings of {len(rules)}, got {match}")


_RuleIx = tuple[list[int], list[int]]


def _rule_codes(
    frame: pd.DataFrame,
    rules: list[tuple[list[str], list[str]]],
    neg_rule: tuple[list[str], list[str]],
) -> tuple[list[np.ndarray], list[_RuleIx], _RuleIx]:
    """Integer codes of every rule column, and each rule as (sameby, diffby) code positions."""
    neg_same, neg_diff = neg_rule
    pos_cols = [c for same, diff in rules for c in same + diff]
    cols = list(dict.fromkeys(pos_cols + neg_same + neg_diff))
    missing = [c for c in cols if c not in frame.columns]
    if missing:
        raise KeyError(f"columns not in meta: {missing}")
    if frame[cols].isna().any(axis=None):
        raise ValueError("metadata columns should not have null values")
    col_ix = {c: i for i, c in enumerate(cols)}
    codes = [_codes(frame[c], c)[0] for c in cols]
    pos_ix = [([col_ix[c] for c in same], [col_ix[c] for c in diff]) for same, diff in rules]
    return codes, pos_ix, ([col_ix[c] for c in neg_same], [col_ix[c] for c in neg_diff])


@dataclass(frozen=True)
class _Ranking:
    """What every query block of :func:`average_precisions` reads: the table and the rules."""

    x: np.ndarray
    rix: np.ndarray | None  # meta row i is features row rix[i] (None: the same row)
    unit_rows: bool
    n: int
    codes: list[np.ndarray]
    pos_ix: list[_RuleIx]
    neg_ix: _RuleIx

    def unit(self, rows: np.ndarray) -> np.ndarray:
        """Unit rows, read from the table as needed: a screen-sized table is never copied."""
        return self.x[rows] if self.unit_rows else _unit_rows(self.x[rows])


@dataclass(frozen=True)
class _APScores:
    """Per query and setting: AP and pair counts; matched AP of the two ``match`` settings."""

    aps: list[np.ndarray]
    n_poss: list[np.ndarray]
    n_tots: list[np.ndarray]
    matched: list[np.ndarray]
    n_matched: np.ndarray

    @classmethod
    def empty(cls, nq: int, n_settings: int) -> _APScores:
        """NaN APs and zero counts for ``nq`` queries."""
        return cls(
            [np.full(nq, np.nan) for _ in range(n_settings)],
            [np.zeros(nq, dtype=np.int64) for _ in range(n_settings)],
            [np.zeros(nq, dtype=np.int64) for _ in range(n_settings)],
            [np.full(nq, np.nan) for _ in range(2)],
            np.zeros(nq, dtype=np.int64),
        )


def _block_pairs(
    ranking: _Ranking, q_rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Keys ``1 - sim`` of a query block to its candidate rows, with the pair masks on them.

    Candidates are the rows that are a positive or negative of some query of the block.
    """
    m = q_rows.size
    codes, n, rix, x = ranking.codes, ranking.n, ranking.rix, ranking.x
    q_codes = [c[q_rows] for c in codes]
    local = np.arange(m)
    neg_all = _pair_mask(q_codes, codes, *ranking.neg_ix)
    neg_all[local, q_rows] = False
    pos_masks = []
    for ps, pd_ in ranking.pos_ix:
        pos = _pair_mask(q_codes, codes, ps, pd_)
        pos[local, q_rows] = False
        pos_masks.append(pos)
    cand = np.flatnonzero(np.logical_or.reduce([neg_all, *pos_masks]).any(axis=0))
    # Similarities, once for every setting, only to the rows that are a positive or
    # negative of some query.
    q_unit = ranking.unit(q_rows if rix is None else rix[q_rows])
    if cand.size == n and rix is None and ranking.unit_rows:
        sims = q_unit @ x.T
    else:
        # Candidate rows are gathered in chunks: never a second copy of the whole table.
        cols = cand if rix is None else rix[cand]
        sims = np.empty((m, cand.size), dtype=np.float32)
        for a, b in iter_blocks(cand.size, _GATHER_ROWS):
            sims[:, a:b] = q_unit @ ranking.unit(cols[a:b]).T
        if cand.size < n:
            neg_all = neg_all[:, cand]
            pos_masks = [p[:, cand] for p in pos_masks]
    key = np.subtract(np.float32(1.0), sims, out=sims)  # in place: one m x n array
    return key, neg_all, pos_masks


def _score_block(
    key: np.ndarray,
    neg_all: np.ndarray,
    pos_masks: list[np.ndarray],
    q_rows: np.ndarray,
    qa: int,
    scores: _APScores,
    match: tuple[int, int] | None,
    seed: int,
) -> None:
    """AP (and matched AP) of the block's queries, written to ``scores`` from position ``qa``."""
    settings = list(zip(pos_masks, scores.aps, scores.n_poss, scores.n_tots))
    for i in range(q_rows.size):
        # A query's negatives are the same in every setting: sorted once, shared.
        kn = np.sort(key[i, neg_all[i]])
        for pos, ap, n_pos, n_tot in settings:
            kp = key[i, pos[i]]
            n_pos[qa + i] = kp.size
            n_tot[qa + i] = kp.size + kn.size
            if kp.size:
                ap[qa + i] = _expected_ap(kp, kn, neg_sorted=True)
        if match is not None:
            kps = [key[i, pos_masks[j][i]] for j in match]
            m = min(k.size for k in kps)
            scores.n_matched[qa + i] = m
            for j, kp in enumerate(kps):
                if m:
                    seed_i = (seed, int(q_rows[i]))
                    scores.matched[j][qa + i] = matched_ap(kp, kn, m, seed=seed_i)


def _ap_frames(
    frame: pd.DataFrame, queries: np.ndarray, scores: _APScores, match: tuple[int, int] | None
) -> list[pd.DataFrame]:
    """One frame per setting: the queries' metadata plus their pair counts and APs."""
    outs = []
    settings = zip(scores.aps, scores.n_poss, scores.n_tots)
    for j, (ap, n_pos, n_tot) in enumerate(settings):
        out = (
            frame.iloc[queries].reset_index(drop=True)
            if queries.size < len(frame)
            else frame.copy()
        )
        out["n_pos_pairs"] = n_pos
        out["n_total_pairs"] = n_tot
        out["average_precision"] = ap
        if match is not None and j in match:
            out["matched_average_precision"] = scores.matched[match.index(j)]
            out["n_matched"] = scores.n_matched
        outs.append(out)
    return outs


SAME_BATCH = "same"  # a setting of average_precisions: positives from the query's own batch
MATCH_DRAWS = 32  # random subsets per query when tied keys rule out the exact expectation


def _setting_rules(
    setting: bool | str,
    pos_same: list[str],
    pos_diff: list[str],
    batch_col: str,
    same_diffby: Sequence[str],
) -> tuple[list[str], list[str]]:
    """The positive rule (sameby, diffby) of one ``batch_aware`` setting."""
    if isinstance(setting, str):
        if setting != SAME_BATCH:
            raise ValueError(f"unknown positive setting {setting!r}: False, True or {SAME_BATCH!r}")
        extra = [c for c in same_diffby if c not in pos_diff]
        return pos_same + ([batch_col] if batch_col not in pos_same else []), pos_diff + extra
    if setting and batch_col not in pos_diff:
        return list(pos_same), pos_diff + [batch_col]
    return list(pos_same), list(pos_diff)


def _log_comb(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """log C(a, b) for arrays with 0 <= b <= a (elementwise)."""
    return gammaln(a + 1.0) - gammaln(b + 1.0) - gammaln(a - b + 1.0)


def matched_ap(
    pos_keys: np.ndarray, neg_sorted: np.ndarray, m: int, seed: tuple[int, int] | int = 0
) -> float:
    """Expected AP of one query over the random ``m``-subsets of its positives.

    Keys rank ascending (``1 - similarity``); ``neg_sorted`` are the negatives' keys, sorted.
    With ``m`` = all positives this is the AP itself. Without tied keys the expectation is
    exact: positive j (``r_j`` positives and ``n_j`` negatives before it) is drawn with
    probability m/p, and the number K of the other drawn positives before it is
    hypergeometric (p - 1 items, r_j marked, m - 1 draws), so
    ``E[AP] = (1/p) sum_j E[(1 + K) / (1 + K + n_j)]``. With ties (e.g. constant features)
    it is the mean of :func:`_expected_ap` over ``MATCH_DRAWS`` subsets drawn with ``seed``.
    """
    kp = np.sort(np.asarray(pos_keys))
    p = kp.size
    if m >= p:
        return _expected_ap(kp, neg_sorted, neg_sorted=True)
    before = np.searchsorted(neg_sorted, kp, side="left")
    tied = np.searchsorted(neg_sorted, kp, side="right") > before
    if tied.any() or (p > 1 and (np.diff(kp) == 0).any()):
        rng = np.random.default_rng(seed)
        draws = [rng.choice(kp, m, replace=False) for _ in range(MATCH_DRAWS)]
        return float(np.mean([_expected_ap(d, neg_sorted, neg_sorted=True) for d in draws]))
    r = np.arange(p, dtype=np.float64)[:, None]  # positives before j
    k = np.arange(m, dtype=np.float64)[None, :]  # drawn ones among them
    ok = (k <= r) & (m - 1 - k <= p - 1 - r)
    rr, kk = np.broadcast_arrays(r, k)
    logp = (
        _log_comb(rr, np.where(ok, kk, 0.0))
        + _log_comb(p - 1 - rr, np.where(ok, m - 1 - kk, 0.0))
        - _log_comb(np.float64(p - 1), np.float64(m - 1))
    )
    pmf = np.where(ok, np.exp(logp), 0.0)
    prec = (1.0 + k) / (1.0 + k + before[:, None].astype(np.float64))
    return float((pmf * prec).sum() / p)


def _expected_ap(pos_keys: np.ndarray, neg_keys: np.ndarray, neg_sorted: bool = False) -> float:
    """AP of one query, ties between keys broken uniformly at random (expected value).

    Keys rank ascending. Where no key ties this is the plain AP. A run of ``g`` tied keys
    holding ``p`` positives after ``c`` ranked items of which ``b`` are positives contributes
    ``sum_{i=1..g} [p/g (b + 1) + (i - 1) p (p - 1) / (g (g - 1))] / (c + i)`` to the sum of
    precisions (McSherry & Najork, ECIR 2008), so a table without variance scores the
    chance-level AP instead of 1. ``neg_sorted``: ``neg_keys`` are already sorted ascending.
    """
    uk, p_count = np.unique(pos_keys, return_counts=True)
    # Negatives strictly before each distinct positive key, and negatives tied with it: the
    # few positive keys are looked up in the sorted negatives (one vectorised sort of the
    # negatives is ~30x cheaper than looking every negative up among the positives).
    negs = neg_keys if neg_sorted else np.sort(neg_keys)
    before = np.searchsorted(negs, uk, side="left")
    tied = np.searchsorted(negs, uk, side="right") - before
    pos_before = np.concatenate([[0], np.cumsum(p_count)[:-1]])
    c = pos_before + before
    g = p_count + tied
    plain = g == 1  # a single positive, tied with nothing: precision (b + 1) / (c + 1)
    total = float(((pos_before[plain] + 1) / (c[plain] + 1)).sum())
    runs = np.flatnonzero(~plain)
    if runs.size:
        # Every tied run at once: its g terms laid end to end, i = 1..g within each run.
        gr = g[runs]
        i = np.arange(1, gr.sum() + 1, dtype=np.float64) - np.repeat(np.cumsum(gr) - gr, gr)
        gj = np.repeat(gr, gr).astype(np.float64)
        pj = np.repeat(p_count[runs], gr).astype(np.float64)
        bj = np.repeat(pos_before[runs], gr).astype(np.float64)
        cj = np.repeat(c[runs], gr).astype(np.float64)
        pair = pj * (pj - 1) / (gj * (gj - 1))  # g > 1 in every tied run
        total += float(((pj / gj * (bj + 1) + (i - 1) * pair) / (cj + i)).sum())
    return total / pos_keys.size


@functools.lru_cache(maxsize=4096)
def _null_ap(num_pos: int, total: int, null_size: int, seed: int) -> np.ndarray:
    """AP of ``null_size`` random rankings with ``num_pos`` positives among ``total``.

    Same construction and seeding as ``copairs.compute.random_ap`` (a random permutation per
    row, the first ``num_pos`` positions are the positives), computed in row blocks.

    Cached (read-only result): the configurations depend on the metadata only, so the raw and
    plate-normalised variants, the corrected rows and the calibration conditions of one design
    draw the same nulls; each is drawn once per process (4,096 nulls of 2,000 take 32 MiB).
    """
    rng = np.random.default_rng(seed)
    dtype = np.uint16 if total < 2**16 else np.uint32
    out = np.empty(null_size, dtype=np.float32)
    numer = np.arange(1, num_pos + 1, dtype=np.float32)
    for a, b in iter_blocks(null_size, max(1, BLOCK_ELEMS // max(total, 1))):
        perm = np.tile(np.arange(total, dtype=dtype), (b - a, 1))
        rng.permuted(perm, axis=1, out=perm)
        ranks = np.sort(perm[:, :num_pos], axis=1)
        out[a:b] = ((numer / (ranks + 1)).sum(axis=1) / num_pos).astype(np.float32)
    out.flags.writeable = False
    return out


def _bh_correct(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (step-up, monotone, capped at 1)."""
    p = np.asarray(p, dtype=np.float64)
    m = p.size
    if m == 0:
        return p.copy()
    order = np.argsort(p, kind="stable")
    scaled = p[order] * m / np.arange(1, m + 1)
    adj = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    out = np.empty(m)
    out[order] = adj
    return out


def map_pvalues(
    ap_scores: pd.DataFrame,
    sameby: str | Sequence[str],
    *,
    null_size: int = 10000,
    seed: int = 0,
    threshold: float = 0.05,
    max_null_elems: int | None = None,
) -> pd.DataFrame:
    """Per-group mAP with permutation-free p-values and BH correction (copairs conventions).

    As ``copairs.map.mean_average_precision``: queries with NaN AP or no positive are dropped;
    mAP = mean AP of the group's queries. For every distinct (n_pos, n_total) configuration a
    null distribution of ``null_size`` APs of random rankings is drawn (seeds derived from
    ``seed`` exactly as copairs does); the group's null is the mean of its queries' nulls and
    ``p = (#{null > mAP} + 1) / (null_size + 1)``. ``corrected_p_value`` is the
    Benjamini-Hochberg adjustment over groups; ``below_p``/``below_corrected_p`` compare with
    ``threshold``.

    Drawing the nulls costs ``null_size x n_total`` random numbers per configuration; when
    their sum exceeds ``max_null_elems`` (large screens: ~n configurations x n ranks) the
    p-value columns are NaN instead and ``table.attrs["note"]`` says why.

    Returns:
        one row per group: ``sameby`` columns, ``mean_average_precision``, ``n_queries``,
        ``p_value``, ``corrected_p_value``, ``below_p``, ``below_corrected_p``.
    """
    keys = _as_list(sameby)
    ok = ap_scores["average_precision"].notna() & (ap_scores["n_pos_pairs"] > 0)
    scores = ap_scores.loc[ok].reset_index(drop=True)
    cols = keys + list(_PVALUE_COLUMNS)
    if scores.empty:
        return pd.DataFrame(columns=cols)
    confs = scores[["n_pos_pairs", "n_total_pairs"]].to_numpy(dtype=np.int64)
    uconfs, conf_ix = np.unique(confs, axis=0, return_inverse=True)
    conf_ix = conf_ix.ravel()
    null_cost = int(null_size) * int(uconfs[:, 1].sum())
    if max_null_elems is not None and null_cost > max_null_elems:
        note = (
            f"p-values skipped: the null of {len(uconfs)} (n_pos, n_total) configurations "
            f"needs {null_cost:.2e} random ranks (> {max_null_elems:.2e})"
        )
        return _map_without_pvalues(scores, keys, cols, note)
    seeds = np.random.default_rng(seed).integers(8096, size=len(uconfs))
    nulls = np.stack(
        [_null_ap(int(p), int(t), null_size, int(s)) for (p, t), s in zip(uconfs, seeds)]
    )
    gcodes = scores.groupby(keys, sort=True, observed=True).ngroup().to_numpy()
    n_groups = int(gcodes.max()) + 1
    first = np.unique(gcodes, return_index=True)[1]
    table = scores.loc[first, keys].reset_index(drop=True)
    ap_vals = scores["average_precision"].to_numpy(dtype=np.float64)
    sizes = np.bincount(gcodes, minlength=n_groups)
    map_vals = np.bincount(gcodes, weights=ap_vals, minlength=n_groups) / sizes
    # The group's null = mean over its queries = count-weighted mean of configuration nulls.
    weights = sparse.csr_matrix(
        (np.ones(gcodes.size), (gcodes, conf_ix)), shape=(n_groups, len(uconfs))
    )
    pvals = _group_pvalues(weights, nulls, map_vals, sizes, null_size)
    table["mean_average_precision"] = map_vals
    table["n_queries"] = sizes
    table["p_value"] = pvals
    table["corrected_p_value"] = _bh_correct(pvals)
    table["below_p"] = table["p_value"] < threshold
    table["below_corrected_p"] = table["corrected_p_value"] < threshold
    return table[cols]


_PVALUE_COLUMNS = (
    "mean_average_precision",
    "n_queries",
    "p_value",
    "corrected_p_value",
    "below_p",
    "below_corrected_p",
)


def _map_without_pvalues(
    scores: pd.DataFrame, keys: list[str], cols: list[str], note: str
) -> pd.DataFrame:
    """The :func:`map_pvalues` table with NaN p-values (null too costly), ``note`` saying why."""
    table = scores.groupby(keys, sort=True, observed=True).agg(
        mean_average_precision=("average_precision", "mean"),
        n_queries=("average_precision", "size"),
    )
    table = table.reset_index()
    for col in ("p_value", "corrected_p_value"):
        table[col] = np.nan
    table["below_p"] = False
    table["below_corrected_p"] = False
    table = table[cols]
    table.attrs["note"] = note
    return table


def _group_pvalues(
    weights: sparse.csr_matrix,
    nulls: np.ndarray,
    map_vals: np.ndarray,
    sizes: np.ndarray,
    null_size: int,
) -> np.ndarray:
    """``(#{group null > mAP} + 1) / (null_size + 1)`` per group, in blocks of groups.

    ``weights`` (groups x configurations) counts each group's queries per configuration;
    ``nulls`` holds one null distribution per configuration.
    """
    n_groups = map_vals.size
    pvals = np.empty(n_groups)
    step = max(1, BLOCK_ELEMS // (2 * null_size))
    for a, b in iter_blocks(n_groups, step):
        null_mean = (weights[a:b] @ nulls.astype(np.float64)) / sizes[a:b, None]
        above = (null_mean > map_vals[a:b, None]).sum(axis=1)
        pvals[a:b] = (above + 1) / (null_size + 1)
    return pvals


def _map_stderr(ap: pd.DataFrame, keys: list[str]) -> float:
    """Standard error of the mean of group mAPs when each group's queries are a sample."""
    ok = ap["average_precision"].notna() & (ap["n_pos_pairs"] > 0)
    grouped = ap.loc[ok].groupby(keys, sort=True, observed=True)["average_precision"]
    var = grouped.var(ddof=1).fillna(0.0) / grouped.size()
    return float(np.sqrt(var.sum()) / len(var)) if len(var) else float("nan")


def stratified_queries(group_codes: np.ndarray, total: int | None, seed: int) -> np.ndarray | None:
    """About ``total`` query rows spread evenly over groups (None: every row).

    Each group contributes ``ceil(total / n_groups)`` seeded random rows, or all its rows
    if it has fewer, so that every group's mAP rests on some queries.
    """
    n = group_codes.size
    if total is None or total >= n:
        return None
    rng = np.random.default_rng(seed)
    n_groups = int(group_codes.max()) + 1
    per = max(1, -(-int(total) // n_groups))
    order = np.argsort(group_codes, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(group_codes, minlength=n_groups))])
    picks = []
    for g in range(n_groups):
        rows = order[bounds[g] : bounds[g + 1]]
        picks.append(rows if rows.size <= per else rng.choice(rows, per, replace=False))
    return np.sort(np.concatenate(picks))


def _map_summary(ap: pd.DataFrame, table: pd.DataFrame) -> dict[str, Any]:
    scored = ap["average_precision"].notna() & (ap["n_pos_pairs"] > 0)
    skipped = "note" in table.attrs
    out = {
        "map": float(table["mean_average_precision"].mean()) if len(table) else float("nan"),
        "fraction_significant": (
            float(table["below_corrected_p"].mean()) if len(table) and not skipped else float("nan")
        ),
        "n_groups": int(len(table)),
        "n_queries": int(scored.sum()),
        "n_queries_without_positive": int((~scored).sum()),
    }
    if skipped:
        out["note"] = table.attrs["note"]
    return out


def mean_average_precision(
    features: ArrayLike,
    meta: pd.DataFrame,
    *,
    pos_sameby: Sequence[str],
    pos_diffby: Sequence[str] = (),
    neg_sameby: Sequence[str] = (),
    neg_diffby: Sequence[str],
    null_size: int = 10000,
    seed: int = 0,
    batch_aware: bool = False,
    batch_col: str = "batch",
    group_by: Sequence[str] | None = None,
    threshold: float = 0.05,
    max_queries: int | None = None,
    unit_rows: bool = False,
    max_null_elems: int | None = None,
    row_index: np.ndarray | None = None,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """mAP of retrieval with copairs conventions: :func:`average_precision` + :func:`map_pvalues`.

    Kalinin et al., Nat Commun 2025 (copairs). Per-query AP with the given pair rules (see
    :func:`average_precision`), then per group (``group_by``, default ``pos_sameby``) the mean
    AP, its p-value against random rankings and the Benjamini-Hochberg correction.
    ``batch_aware=True``: positives must come from another ``batch_col``.

    ``max_queries``: with more rows than that, about ``max_queries`` query rows spread evenly
    over the groups (:func:`stratified_queries`) are scored, each ranked against all rows; a
    group's mAP is then the mean AP of its sampled queries (unbiased) and its p-value tests
    that mean against the matching null. ``stderr`` is the standard error of ``map`` from
    that sampling, sqrt(sum_g var_g / q_g) / G (0 when every row is a query).

    Returns:
        ``(summary, table)``: ``summary = {"map", "fraction_significant", "n_groups",
        "n_queries", "n_queries_without_positive", "stderr"}`` where ``map`` is the mean of
        the group mAPs and ``fraction_significant`` the fraction of groups with corrected
        p < threshold; ``table`` as :func:`map_pvalues`.
    """
    return mean_average_precisions(
        features,
        meta,
        pos_sameby=pos_sameby,
        pos_diffby=pos_diffby,
        neg_sameby=neg_sameby,
        neg_diffby=neg_diffby,
        null_size=null_size,
        seed=seed,
        batch_aware=(batch_aware,),
        batch_col=batch_col,
        group_by=group_by,
        threshold=threshold,
        max_queries=max_queries,
        unit_rows=unit_rows,
        max_null_elems=max_null_elems,
        row_index=row_index,
    )[0]


def mean_average_precisions(
    features: ArrayLike,
    meta: pd.DataFrame,
    *,
    pos_sameby: Sequence[str],
    pos_diffby: Sequence[str] = (),
    neg_sameby: Sequence[str] = (),
    neg_diffby: Sequence[str],
    null_size: int = 10000,
    seed: int = 0,
    batch_aware: Sequence[bool | str] = (False, True),
    batch_col: str = "batch",
    group_by: Sequence[str] | None = None,
    threshold: float = 0.05,
    max_queries: int | None = None,
    unit_rows: bool = False,
    max_null_elems: int | None = None,
    row_index: np.ndarray | None = None,
    same_diffby: Sequence[str] = (),
    match: tuple[int, int] | None = None,
) -> list[tuple[dict[str, Any], pd.DataFrame]]:
    """:func:`mean_average_precision` for several ``batch_aware`` settings, ranked once.

    The settings share the query sample and the similarities (:func:`average_precisions`,
    which also explains ``same_diffby`` and ``match``); each gets its own p-values. One
    ``(summary, table)`` per entry of ``batch_aware``; with ``match=(a, b)`` one more at the
    end, the matched difference of settings ``a`` and ``b`` (:func:`matched_difference`).
    """
    keys = _as_list(group_by) if group_by is not None else _as_list(pos_sameby)
    missing = [c for c in keys if c not in meta.columns]
    if missing:
        raise KeyError(f"columns not in meta: {missing}")
    gcodes = meta.groupby(keys, sort=True, dropna=False).ngroup().to_numpy().astype(np.int64)
    queries = stratified_queries(gcodes, max_queries, seed) if len(meta) else None
    aps = average_precisions(
        features,
        meta,
        pos_sameby=pos_sameby,
        pos_diffby=pos_diffby,
        neg_sameby=neg_sameby,
        neg_diffby=neg_diffby,
        batch_aware=batch_aware,
        batch_col=batch_col,
        query_indices=queries,
        unit_rows=unit_rows,
        row_index=row_index,
        same_diffby=same_diffby,
        match=match,
        seed=seed,
    )
    out = []
    for ap in aps:
        table = map_pvalues(
            ap,
            keys,
            null_size=null_size,
            seed=seed,
            threshold=threshold,
            max_null_elems=max_null_elems,
        )
        summary = _map_summary(ap, table)
        summary["stderr"] = 0.0 if queries is None else _map_stderr(ap, keys)
        out.append((summary, table))
    if match is not None:
        out.append(matched_difference(aps[match[0]], aps[match[1]], keys))
    return out


def matched_difference(
    ap_a: pd.DataFrame, ap_b: pd.DataFrame, keys: Sequence[str]
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Per group, mean over queries of matched AP in setting a minus that in setting b.

    ``ap_a``/``ap_b``: the two matched frames of :func:`average_precisions` (same queries).
    A query counts where both settings have a positive (``n_matched > 0``); its difference is
    taken first, then averaged per group, then over groups (each group weighs the same).

    Returns:
        ``(summary, table)``: ``summary = {"mean", "n_groups", "n_queries", "mean_a",
        "mean_b", "stderr", "per_group"}`` (``stderr``: SD of the group differences over
        sqrt(groups)); ``table`` one row per group with ``keys``, ``a``, ``b``,
        ``difference``, ``n_queries``.
    """
    cols = _as_list(keys)
    ok = (ap_a["n_matched"].to_numpy() > 0) & ap_a["matched_average_precision"].notna().to_numpy()
    ok &= ap_b["matched_average_precision"].notna().to_numpy()
    frame = ap_a.loc[ok, cols].reset_index(drop=True)
    frame["a"] = ap_a.loc[ok, "matched_average_precision"].to_numpy()
    frame["b"] = ap_b.loc[ok, "matched_average_precision"].to_numpy()
    frame["difference"] = frame["a"] - frame["b"]
    grouped = frame.groupby(cols, sort=True, observed=True)
    table = grouped[["a", "b", "difference"]].mean()
    table["n_queries"] = grouped.size()
    table = table.reset_index()
    diff = table["difference"].to_numpy(dtype=np.float64)
    g = diff.size
    label = table[cols].astype(str).agg(" | ".join, axis=1) if g else pd.Series(dtype=str)
    summary = {
        "mean": float(diff.mean()) if g else float("nan"),
        "n_groups": int(g),
        "n_queries": int(ok.sum()),
        "mean_a": float(table["a"].mean()) if g else float("nan"),
        "mean_b": float(table["b"].mean()) if g else float("nan"),
        "stderr": float(diff.std(ddof=1) / np.sqrt(g)) if g > 1 else float("nan"),
        "per_group": {str(k): float(v) for k, v in zip(label, diff)},
    }
    return summary, table


_REF_COL = "_cdcl_reference_index"


def _unit_copy(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Unit-norm float32 copy of the selected rows, built in chunks (one copy, no float64)."""
    out = np.empty((rows.size, x.shape[1]), dtype=np.float32)
    for a, b in iter_blocks(rows.size, 65536):
        out[a:b] = _unit_rows(x[rows[a:b]])
    return out


def unit_rows_copy(features: ArrayLike) -> np.ndarray:
    """Unit-norm float32 copy of every row: pass it with ``unit_rows=True`` to share it."""
    x = _features(features)
    return _unit_copy(x, np.arange(x.shape[0]))


def _map_of_rows(
    x: np.ndarray,
    keep: np.ndarray,
    frame: pd.DataFrame,
    *,
    pos_sameby: list[str],
    pos_diffby: list[str],
    neg_diffby: list[str],
    group_by: list[str],
    unit_rows: bool = False,
    **options: Any,
) -> list[tuple[dict[str, Any], pd.DataFrame]]:
    """mAP of the kept rows with the given pair rules, one result per ``batch_aware`` setting.

    ``unit_rows``: ``x`` already has unit rows; otherwise rows are normalised as they are read.
    The kept rows are indexed in place (no copy of the table).
    """
    rows = np.flatnonzero(keep)
    return mean_average_precisions(
        x,
        frame,
        pos_sameby=pos_sameby,
        pos_diffby=pos_diffby,
        neg_sameby=[],
        neg_diffby=neg_diffby,
        group_by=group_by,
        unit_rows=unit_rows,
        row_index=rows,
        **options,
    )


def _maps_per_setting(
    x: np.ndarray,
    frame: pd.DataFrame,
    keep: np.ndarray,
    batch_aware: Sequence[bool | str],
    *,
    batch_col: str,
    add_columns: Callable[[pd.DataFrame], None] | None = None,
    **rules: Any,
) -> list[tuple[dict[str, Any], pd.DataFrame]]:
    """mAP of the kept rows for each ``batch_aware`` setting, ranked once where the rows allow.

    A batch-aware or same-batch setting also drops rows without a batch. ``add_columns`` adds
    pair-rule columns to the kept rows in place; ``rules`` (pair rules and options) go to
    :func:`_map_of_rows`; with ``match`` the matched difference comes last, as there.
    """
    if any(batch_aware):
        has_batch = frame[batch_col].notna().to_numpy()
        if not all(batch_aware) and not has_batch[keep].all():
            # Rows without a batch count for the plain setting only: it is scored on its own,
            # the settings that need a batch together (and matched, if asked).
            match = rules.pop("match", None)
            kw = {"batch_col": batch_col, "add_columns": add_columns}
            on_batch = [i for i, a in enumerate(batch_aware) if a]
            if match is not None:
                kw["match"] = (on_batch.index(match[0]), on_batch.index(match[1]))
            together = _maps_per_setting(
                x, frame, keep, [batch_aware[i] for i in on_batch], **kw, **rules
            )
            kw.pop("match", None)
            out = [
                together[on_batch.index(i)]
                if a
                else _maps_per_setting(x, frame, keep, (a,), **kw, **rules)[0]
                for i, a in enumerate(batch_aware)
            ]
            return out + together[len(on_batch) :]
        keep = keep & has_batch  # to_numpy() may be a read-only view (copy-on-write)
    kept = frame.loc[keep].reset_index(drop=True)
    if add_columns is not None:
        add_columns(kept)
    return _map_of_rows(x, keep, kept, batch_aware=tuple(batch_aware), batch_col=batch_col, **rules)


def replicate_map(
    features: ArrayLike,
    meta: pd.DataFrame,
    batch_aware: bool = False,
    *,
    treatment_col: str = "treatment",
    control_col: str = "is_control",
    batch_col: str = "batch",
    null_size: int = 10000,
    seed: int = 0,
    threshold: float = 0.05,
    max_queries: int | None = None,
    max_null_elems: int | None = None,
    unit_rows: bool = False,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Replicate retrieval mAP ("phenotypic activity"), the copairs/JUMP convention.

    Chandrasekaran et al., Nat Methods 2024 (JUMP) / Kalinin et al. 2025 (copairs). Queries
    are the non-control rows; positives are the other rows of the same treatment; negatives
    are the negative-control rows only (retrieval of replicates against controls, copairs'
    ``assign_reference_index`` recipe: every control gets its own reference index so controls
    are never positives of each other, and two treatments are never negatives). Grouped per
    treatment. ``batch_aware=True``: positives must come from another batch.
    ``unit_rows=True``: ``features`` already have unit rows (:func:`unit_rows_copy`).

    Returns:
        ``(summary, table)`` as :func:`mean_average_precision`.
    """
    return replicate_maps(
        features,
        meta,
        (batch_aware,),
        treatment_col=treatment_col,
        control_col=control_col,
        batch_col=batch_col,
        null_size=null_size,
        seed=seed,
        threshold=threshold,
        max_queries=max_queries,
        max_null_elems=max_null_elems,
        unit_rows=unit_rows,
    )[0]


def replicate_maps(
    features: ArrayLike,
    meta: pd.DataFrame,
    batch_aware: Sequence[bool | str] = (False, True),
    *,
    treatment_col: str = "treatment",
    control_col: str = "is_control",
    batch_col: str = "batch",
    unit_rows: bool = False,
    **options: Any,
) -> list[tuple[dict[str, Any], pd.DataFrame]]:
    """:func:`replicate_map` for several ``batch_aware`` settings, ranked once (same figures).

    A setting may also be ``SAME_BATCH`` (positives from the query's own batch); ``options``
    may hold ``same_diffby`` and ``match`` (:func:`mean_average_precisions`).
    """
    frame = meta.reset_index(drop=True)
    if control_col not in frame.columns:
        raise KeyError(f"replicate mAP needs control rows: column {control_col!r} not in meta")

    def reference_index(kept: pd.DataFrame) -> None:
        ctrl = _bool_column(kept, control_col)
        kept[_REF_COL] = np.where(ctrl, np.arange(len(kept)), -1)

    return _maps_per_setting(
        _features(features),
        frame,
        frame[treatment_col].notna().to_numpy(),
        batch_aware,
        add_columns=reference_index,
        pos_sameby=[treatment_col, _REF_COL],
        pos_diffby=[],
        neg_diffby=[treatment_col, _REF_COL],
        group_by=[treatment_col],
        batch_col=batch_col,
        unit_rows=unit_rows,
        **options,
    )


def moa_map(
    features: ArrayLike,
    meta: pd.DataFrame,
    batch_aware: bool = False,
    *,
    moa_col: str = "moa",
    compound_col: str = "compound",
    control_col: str = "is_control",
    batch_col: str = "batch",
    null_size: int = 10000,
    seed: int = 0,
    threshold: float = 0.05,
    max_queries: int | None = None,
    max_null_elems: int | None = None,
    unit_rows: bool = False,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """MoA retrieval mAP: positives share the MoA but not the compound (copairs conventions).

    Controls and rows without a MoA are dropped. Positives = same ``moa_col``, different
    ``compound_col`` (the not-same-compound rule of Ljosa et al. 2013 in retrieval form);
    negatives = different MoA. Grouped per MoA. ``batch_aware=True``: positives must also
    come from another batch. Without ``compound_col`` the ``treatment`` column is used.
    ``unit_rows=True``: ``features`` already have unit rows (:func:`unit_rows_copy`).

    Returns:
        ``(summary, table)`` as :func:`mean_average_precision`.
    """
    return moa_maps(
        features,
        meta,
        (batch_aware,),
        moa_col=moa_col,
        compound_col=compound_col,
        control_col=control_col,
        batch_col=batch_col,
        null_size=null_size,
        seed=seed,
        threshold=threshold,
        max_queries=max_queries,
        max_null_elems=max_null_elems,
        unit_rows=unit_rows,
    )[0]


def moa_maps(
    features: ArrayLike,
    meta: pd.DataFrame,
    batch_aware: Sequence[bool] = (False, True),
    *,
    moa_col: str = "moa",
    compound_col: str = "compound",
    control_col: str = "is_control",
    batch_col: str = "batch",
    unit_rows: bool = False,
    **options: Any,
) -> list[tuple[dict[str, Any], pd.DataFrame]]:
    """:func:`moa_map` for several ``batch_aware`` settings, ranked once (same figures)."""
    frame = meta.reset_index(drop=True)
    x = _features(features)
    if compound_col not in frame.columns:
        if "treatment" not in frame.columns:
            raise KeyError(f"neither {compound_col!r} nor 'treatment' in meta")
        compound_col = "treatment"
    keep = ~_bool_column(frame, control_col) & _has_label(frame[moa_col])
    keep &= frame[compound_col].notna().to_numpy()
    return _maps_per_setting(
        x,
        frame,
        keep,
        batch_aware,
        pos_sameby=[moa_col],
        pos_diffby=[compound_col],
        neg_diffby=[moa_col],
        group_by=[moa_col],
        batch_col=batch_col,
        unit_rows=unit_rows,
        **options,
    )


PENALTY_AVERAGING = (
    "per query, matched AP with same-batch positives minus matched AP with other-batch "
    "positives; then the mean per treatment; then the mean over treatments"
)


def same_batch_rule(
    meta: pd.DataFrame,
    *,
    treatment_col: str = "treatment",
    control_col: str = "is_control",
    batch_col: str = "batch",
    plate_col: str = "plate",
) -> tuple[tuple[str, ...], str] | str:
    """Which same-batch replicates the retrieval penalty uses: ``(same_diffby, words)``.

    Same batch and another plate where some treatment has replicates on two plates of one
    batch and in another batch: a plate's wells share its normalisation's error and its
    within-plate effects, which are not batch effects, and every other-batch replicate is on
    another plate too. Else the same batch, any plate. A string: why neither is possible.
    """
    frame = meta.reset_index(drop=True)
    rows = frame.loc[~_bool_column(frame, control_col) & frame[treatment_col].notna().to_numpy()]
    rows = rows.loc[rows[batch_col].notna()]
    n_batches = rows.groupby(treatment_col, observed=True)[batch_col].nunique()
    rows = rows.loc[rows[treatment_col].isin(n_batches.index[n_batches >= 2])]
    by = rows.groupby([treatment_col, batch_col], observed=True)
    if plate_col in rows.columns and rows[plate_col].notna().all() and len(rows):
        if (by[plate_col].nunique() >= 2).any():
            return (plate_col,), "same batch, another plate"
    if len(rows) and (by.size() >= 2).any():
        return (), "same batch, any plate (no treatment has replicates on two plates of a batch)"
    return (
        "not computable on this design: no treatment has two replicates in one batch and "
        "one in another batch"
    )


def replicate_maps_with_penalty(
    features: ArrayLike,
    meta: pd.DataFrame,
    *,
    treatment_col: str = "treatment",
    control_col: str = "is_control",
    batch_col: str = "batch",
    plate_col: str = "plate",
    unit_rows: bool = False,
    **options: Any,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Replicate mAP, its batch-aware form and the cross-batch retrieval penalty, ranked once.

    The penalty (a batch endpoint: 0 with no batch effect, positive when a well finds its
    same-batch replicates more easily than its other-batch ones): replicate retrieval as
    :func:`replicate_map` (queries the treated wells, negatives the controls), with positives
    the same treatment's wells of the query's own batch (on another plate where the design
    has them, :func:`same_batch_rule`) against those of other batches (the batch-aware
    setting), compared at equal numbers of positives (:func:`matched_ap`); averaged as
    ``PENALTY_AVERAGING``. Queries without a replicate in their own batch, or in another,
    are left out of it.

    Returns:
        ``(plain summary, batch-aware summary, penalty)`` with ``penalty = {"mean",
        "n_treatments", "per_treatment", "same_batch_map", "other_batch_map", "n_queries",
        "stderr", "positives", "averaging"}`` or ``{"not_computable": reason}``.
    """
    kw = {
        "treatment_col": treatment_col,
        "control_col": control_col,
        "batch_col": batch_col,
        "unit_rows": unit_rows,
    }
    rule = same_batch_rule(
        meta,
        treatment_col=treatment_col,
        control_col=control_col,
        batch_col=batch_col,
        plate_col=plate_col,
    )
    if isinstance(rule, str):
        plain, aware = replicate_maps(features, meta, (False, True), **kw, **options)
        return plain[0], aware[0], {"not_computable": rule}
    same_diffby, words = rule
    plain, aware, _, (diff, _) = replicate_maps(
        features,
        meta,
        (False, True, SAME_BATCH),
        same_diffby=same_diffby,
        match=(2, 1),
        **kw,
        **options,
    )
    if not diff["n_groups"]:
        why = "not computable on this design: no query has a replicate in its own batch"
        return plain[0], aware[0], {"not_computable": f"{why} ({words}) and one in another"}
    penalty = {
        "mean": diff["mean"],
        "n_treatments": diff["n_groups"],
        "per_treatment": diff["per_group"],
        "same_batch_map": diff["mean_a"],
        "other_batch_map": diff["mean_b"],
        "n_queries": diff["n_queries"],
        "stderr": diff["stderr"],
        "positives": f"{words} vs another batch, matched in number per query",
        "averaging": PENALTY_AVERAGING,
    }
    return plain[0], aware[0], penalty
