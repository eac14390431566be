"""Retrieval mAP with copairs conventions (Kalinin et al., Nat Commun 2025; copairs).

Each query ranks all candidate profiles by cosine similarity; positives and negatives are set by
``sameby``/``diffby`` rules (replicates vs controls, MoA matches vs other MoAs, batch-aware
variants that take positives only from other batches). AP per query, mAP per group, a
permutation null for p-values and Benjamini-Hochberg correction, as copairs computes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy import sparse

from cdcl.evaluate.metrics._inputs import (
    _as_list,
    _bool_column,
    _codes,
    _features,
    _has_label,
)
from cdcl.evaluate.metrics.neighbours import BLOCK_ELEMS, iter_blocks, row_norms

# Query rows per block times all rows; each pair entry costs ~40 bytes in the AP step.
_MAP_BLOCK = 1 << 21


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
) -> pd.DataFrame:
    """Average precision of every row as a query, with the pair rules of ``copairs``.

    Kalinin et al., "A versatile information retrieval framework for evaluating profile
    strength and similarity", Nat Commun 2025 (``copairs.map.average_precision``). Row j is a
    positive for query i (j != i) when it equals i on every ``pos_sameby`` column and differs
    on every ``pos_diffby`` column; a negative when it equals i on every ``neg_sameby`` and
    differs on every ``neg_diffby`` column (a pair meeting both rules is listed twice, as in
    copairs). Positives and negatives are ranked by cosine similarity (float32, key
    ``1 - sim``; a positive tied with a negative is ranked first, as copairs' stable sort) and
    ``AP = mean over positives of precision at the positive's rank``. ``batch_aware=True``
    adds ``batch_col`` to ``pos_diffby``: positives must come from another batch.

    Returns:
        ``meta`` (index reset) plus ``n_pos_pairs``, ``n_total_pairs`` and
        ``average_precision`` (NaN for rows without positives), copairs' column names.
    """
    x = _features(features)
    frame = meta.reset_index(drop=True)
    n = x.shape[0]
    if len(frame) != n:
        raise ValueError(f"meta has {len(frame)} rows, features {n}")
    pos_same, pos_diff = _as_list(pos_sameby), _as_list(pos_diffby)
    neg_same, neg_diff = _as_list(neg_sameby), _as_list(neg_diffby)
    if batch_aware and batch_col not in pos_diff:
        pos_diff.append(batch_col)
    if set(pos_same) & set(pos_diff) or set(neg_same) & set(neg_diff):
        raise ValueError("sameby and diffby must be disjoint lists")
    if not (pos_same or pos_diff) or not (neg_same or neg_diff):
        raise ValueError("positive and negative rules each need at least one column")
    cols = list(dict.fromkeys(pos_same + pos_diff + neg_same + neg_diff))
    missing = [c for c in cols if c not in frame.columns]
    if missing:
        raise KeyError(f"columns not in meta: {missing}")
    if frame[cols].isna().any(axis=None):
        raise ValueError("metadata columns should not have null values")
    col_ix = {c: i for i, c in enumerate(cols)}
    codes = [_codes(frame[c], c)[0] for c in cols]
    ps, pd_ = [col_ix[c] for c in pos_same], [col_ix[c] for c in pos_diff]
    ns, nd = [col_ix[c] for c in neg_same], [col_ix[c] for c in neg_diff]

    norms = row_norms(x)
    ap = np.full(n, np.nan)
    n_pos = np.zeros(n, dtype=np.int64)
    n_tot = np.zeros(n, dtype=np.int64)
    qb = max(1, _MAP_BLOCK // n)
    rb = max(1, BLOCK_ELEMS // qb)
    for qa, qz in iter_blocks(n, qb):
        m = qz - qa
        qv = (x[qa:qz] / np.maximum(norms[qa:qz], 1e-12)[:, None]).astype(np.float32)
        sims = np.empty((m, n), dtype=np.float32)
        for ra, rz in iter_blocks(n, rb):
            rv = (x[ra:rz] / np.maximum(norms[ra:rz], 1e-12)[:, None]).astype(np.float32)
            sims[:, ra:rz] = qv @ rv.T
        q_codes = [c[qa:qz] for c in codes]
        local = np.arange(m)
        pos = _pair_mask(q_codes, codes, ps, pd_)
        pos[local, local + qa] = False
        neg = _pair_mask(q_codes, codes, ns, nd)
        neg[local, local + qa] = False
        rp, cp = np.nonzero(pos)
        rn, cn = np.nonzero(neg)
        del pos, neg
        qid = np.concatenate([rp, rn])
        key = np.float32(1.0) - np.concatenate([sims[rp, cp], sims[rn, cn]])
        rel = np.concatenate([np.ones(rp.size, np.int64), np.zeros(rn.size, np.int64)])
        del sims
        # Stable: within a query, by key; equal keys keep positives (listed first) ahead.
        order = np.lexsort((key, qid))
        qs, rel = qid[order], rel[order]
        counts = np.bincount(qid, minlength=m)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        rank = np.arange(qs.size) - starts[qs] + 1
        cum = np.cumsum(rel)
        before = np.concatenate([[0], cum])[starts][qs]
        prec = (cum - before) / rank
        ap_sum = np.bincount(qs, weights=prec * rel, minlength=m)
        npos = np.bincount(rp, minlength=m)
        with np.errstate(invalid="ignore", divide="ignore"):
            ap[qa:qz] = np.where(npos > 0, ap_sum / npos, np.nan)
        n_pos[qa:qz] = npos
        n_tot[qa:qz] = counts
    out = frame.copy()
    out["n_pos_pairs"] = n_pos
    out["n_total_pairs"] = n_tot
    out["average_precision"] = ap
    return out


def _null_ap(num_pos: int, total: int, null_size: int, seed: int) -> np.ndarray:
    """AP of ``null_size`` random rankings with ``num_pos`` positives among ``total``.

    Same construction and seeding as ``copairs.compute.random_ap`` (a random permutation per
    row, the first ``num_pos`` positions are the positives), computed in row blocks.
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
) -> pd.DataFrame:
    """Per-group mAP with permutation-free p-values and BH correction (copairs conventions).

    As ``copairs.map.mean_average_precision``: queries with NaN AP or no positive are dropped;
    mAP = mean AP of the group's queries. For every distinct (n_pos, n_total) configuration a
    null distribution of ``null_size`` APs of random rankings is drawn (seeds derived from
    ``seed`` exactly as copairs does); the group's null is the mean of its queries' nulls and
    ``p = (#{null > mAP} + 1) / (null_size + 1)``. ``corrected_p_value`` is the
    Benjamini-Hochberg adjustment over groups; ``below_p``/``below_corrected_p`` compare with
    ``threshold``.

    Returns:
        one row per group: ``sameby`` columns, ``mean_average_precision``, ``n_queries``,
        ``p_value``, ``corrected_p_value``, ``below_p``, ``below_corrected_p``.
    """
    keys = _as_list(sameby)
    ok = ap_scores["average_precision"].notna() & (ap_scores["n_pos_pairs"] > 0)
    scores = ap_scores.loc[ok].reset_index(drop=True)
    cols = keys + [
        "mean_average_precision",
        "n_queries",
        "p_value",
        "corrected_p_value",
        "below_p",
        "below_corrected_p",
    ]
    if scores.empty:
        return pd.DataFrame(columns=cols)
    confs = scores[["n_pos_pairs", "n_total_pairs"]].to_numpy(dtype=np.int64)
    uconfs, conf_ix = np.unique(confs, axis=0, return_inverse=True)
    conf_ix = conf_ix.ravel()
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
    pvals = np.empty(n_groups)
    step = max(1, BLOCK_ELEMS // (2 * null_size))
    for a, b in iter_blocks(n_groups, step):
        null_mean = (weights[a:b] @ nulls.astype(np.float64)) / sizes[a:b, None]
        above = (null_mean > map_vals[a:b, None]).sum(axis=1)
        pvals[a:b] = (above + 1) / (null_size + 1)
    table["mean_average_precision"] = map_vals
    table["n_queries"] = sizes
    table["p_value"] = pvals
    table["corrected_p_value"] = _bh_correct(pvals)
    table["below_p"] = table["p_value"] < threshold
    table["below_corrected_p"] = table["corrected_p_value"] < threshold
    return table[cols]


def _map_summary(ap: pd.DataFrame, table: pd.DataFrame) -> dict[str, Any]:
    scored = ap["average_precision"].notna() & (ap["n_pos_pairs"] > 0)
    return {
        "map": float(table["mean_average_precision"].mean()) if len(table) else float("nan"),
        "fraction_significant": (
            float(table["below_corrected_p"].mean()) if len(table) else float("nan")
        ),
        "n_groups": int(len(table)),
        "n_queries": int(scored.sum()),
        "n_queries_without_positive": int((~scored).sum()),
    }


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
) -> tuple[dict[str, Any], pd.DataFrame]:
    """mAP of retrieval with copairs conventions: :func:`average_precision` + :func:`map_pvalues`.

    Kalinin et al., Nat Commun 2025 (copairs). Per-query AP with the given pair rules (see
    :func:`average_precision`), then per group (``group_by``, default ``pos_sameby``) the mean
    AP, its p-value against random rankings and the Benjamini-Hochberg correction.
    ``batch_aware=True``: positives must come from another ``batch_col``.

    Returns:
        ``(summary, table)``: ``summary = {"map", "fraction_significant", "n_groups",
        "n_queries", "n_queries_without_positive"}`` where ``map`` is the mean of the group
        mAPs and ``fraction_significant`` the fraction of groups with corrected p < threshold;
        ``table`` as :func:`map_pvalues`.
    """
    ap = average_precision(
        features,
        meta,
        pos_sameby=pos_sameby,
        pos_diffby=pos_diffby,
        neg_sameby=neg_sameby,
        neg_diffby=neg_diffby,
        batch_aware=batch_aware,
        batch_col=batch_col,
    )
    keys = _as_list(group_by) if group_by is not None else _as_list(pos_sameby)
    table = map_pvalues(ap, keys, null_size=null_size, seed=seed, threshold=threshold)
    return _map_summary(ap, table), table


_REF_COL = "_cdcl_reference_index"


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
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Replicate retrieval mAP ("phenotypic activity"), the copairs/JUMP convention.

    Chandrasekaran et al., Nat Methods 2024 (JUMP) / Kalinin et al. 2025 (copairs). Queries
    are the non-control rows; positives are the other rows of the same treatment; negatives
    are the negative-control rows only (retrieval of replicates against controls, copairs'
    ``assign_reference_index`` recipe: every control gets its own reference index so controls
    are never positives of each other, and two treatments are never negatives). Grouped per
    treatment. ``batch_aware=True``: positives must come from another batch.

    Returns:
        ``(summary, table)`` as :func:`mean_average_precision`.
    """
    frame = meta.reset_index(drop=True)
    if control_col not in frame.columns:
        raise KeyError(f"replicate mAP needs control rows: column {control_col!r} not in meta")
    x = _features(features)
    keep = frame[treatment_col].notna().to_numpy()
    if batch_aware:
        keep &= frame[batch_col].notna().to_numpy()
    frame = frame.loc[keep].reset_index(drop=True)
    ctrl = _bool_column(frame, control_col)
    frame[_REF_COL] = np.where(ctrl, np.arange(len(frame)), -1)
    return mean_average_precision(
        x[keep],
        frame,
        pos_sameby=[treatment_col, _REF_COL],
        pos_diffby=[],
        neg_sameby=[],
        neg_diffby=[treatment_col, _REF_COL],
        null_size=null_size,
        seed=seed,
        batch_aware=batch_aware,
        batch_col=batch_col,
        group_by=[treatment_col],
        threshold=threshold,
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
) -> tuple[dict[str, Any], pd.DataFrame]:
    """MoA retrieval mAP: positives share the MoA but not the compound (copairs conventions).

    Controls and rows without a MoA are dropped. Positives = same ``moa_col``, different
    ``compound_col`` (the not-same-compound rule of Ljosa et al. 2013 in retrieval form);
    negatives = different MoA. Grouped per MoA. ``batch_aware=True``: positives must also
    come from another batch. Without ``compound_col`` the ``treatment`` column is used.

    Returns:
        ``(summary, table)`` as :func:`mean_average_precision`.
    """
    frame = meta.reset_index(drop=True)
    x = _features(features)
    if compound_col not in frame.columns:
        if "treatment" not in frame.columns:
            raise KeyError(f"neither {compound_col!r} nor 'treatment' in meta")
        compound_col = "treatment"
    keep = ~_bool_column(frame, control_col) & _has_label(frame[moa_col])
    keep &= frame[compound_col].notna().to_numpy()
    if batch_aware:
        keep &= frame[batch_col].notna().to_numpy()
    return mean_average_precision(
        x[keep],
        frame.loc[keep].reset_index(drop=True),
        pos_sameby=[moa_col],
        pos_diffby=[compound_col],
        neg_sameby=[],
        neg_diffby=[moa_col],
        null_size=null_size,
        seed=seed,
        batch_aware=batch_aware,
        batch_col=batch_col,
        group_by=[moa_col],
        threshold=threshold,
    )
