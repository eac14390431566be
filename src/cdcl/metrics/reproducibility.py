"""GRIT: replicate reproducibility against controls (Way et al., Cell Systems 2022; cytominer-eval).

For each profile, the mean Pearson correlation with its replicates, z-scored against its
correlations with the negative-control profiles; summarised per treatment.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from cdcl.metrics.neighbours import BLOCK_ELEMS, iter_blocks
from cdcl.profiles.arrays import (
    _bool_column,
    _centred_unit_rows,
    _codes,
    _features,
)


def grit(
    features: ArrayLike,
    meta: pd.DataFrame,
    *,
    replicate_col: str = "treatment",
    control_col: str = "is_control",
    group_col: str | None = None,
    chunk_size: int = 2048,
    max_controls: int | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """GRIT per perturbation: replicate similarity z-scored against control similarity.

    Way et al., "Morphology and gene expression profiling provide complementary information
    for mapping cell state", Cell Systems 2022 (cytominer-eval ``grit``). Similarity is the
    Pearson correlation of profiles, as in cytominer-eval. For each non-control row r of a
    perturbation (``replicate_col``): ``z_r = (mean_j corr(r, j) - mu_r) / sd_r`` where j runs
    over r's replicates (other rows of the same perturbation) and ``mu_r``, ``sd_r`` (ddof=0,
    as sklearn's StandardScaler in cytominer-eval) are the mean and std of r's correlations
    to all control rows. GRIT = mean of ``z_r`` over the perturbation's rows. With
    ``group_col`` the "replicates" are the rows of the same group but another perturbation
    (cytominer-eval's gene-level GRIT, e.g. guides of one gene). cytominer-eval pools the
    control correlations of all rows of a perturbation before z-scoring; here each replicate
    is z-scored against its own controls (then averaged), which is the per-replicate form.
    Singletons (no replicate) get NaN and are excluded from :func:`grit_summary`'s mean.
    Controls are not scored.

    ``max_controls``: with more control rows than that, each row's control mean and std are
    estimated from one seeded sample of ``max_controls`` controls (cost O(n x max_controls)
    instead of O(n x controls)); the mean's sampling error is then sd_r / sqrt(max_controls),
    i.e. z-scores move by about 1 / sqrt(max_controls) (0.022 for 2,000).

    Returns:
        DataFrame sorted by perturbation with ``replicate_col`` (+ ``group_col``), ``grit``,
        ``n_replicates`` (rows of the perturbation) and ``n_scored`` (rows with a z-score).
    """
    x = _features(features)
    frame = meta.reset_index(drop=True)
    if len(frame) != x.shape[0]:
        raise ValueError(f"meta has {len(frame)} rows, features {x.shape[0]}")
    if replicate_col not in frame.columns:
        raise KeyError(f"column {replicate_col!r} not in meta")
    ctrl = _bool_column(frame, control_col)
    ctrl_rows = np.flatnonzero(ctrl)
    if ctrl_rows.size < 2:
        raise ValueError(f"GRIT needs at least 2 control rows, found {ctrl_rows.size}")
    if max_controls is not None and ctrl_rows.size > max_controls:
        rng = np.random.default_rng(seed)
        ctrl_rows = np.sort(rng.choice(ctrl_rows, int(max_controls), replace=False))
    has_rep = frame[replicate_col].notna().to_numpy()
    if group_col is not None:
        if group_col not in frame.columns:
            raise KeyError(f"column {group_col!r} not in meta")
        has_rep &= frame[group_col].notna().to_numpy()
    q_rows = np.flatnonzero(~ctrl & has_rep)
    mu, sd = _control_moments(x, q_rows, ctrl_rows, chunk_size)

    sub = frame.iloc[q_rows].reset_index(drop=True)
    rep_codes, reps = _codes(sub[replicate_col], replicate_col)
    comp_codes = rep_codes if group_col is None else _codes(sub[group_col], group_col)[0]
    pos_mean = _replicate_means(x, q_rows, rep_codes, comp_codes, group_col is not None)
    with np.errstate(invalid="ignore", divide="ignore"):
        z_rep = (pos_mean - mu) / np.where(sd > 0, sd, np.nan)
    return _grit_table(sub, rep_codes, reps, z_rep, replicate_col, group_col)


def _control_moments(
    x: np.ndarray, q_rows: np.ndarray, ctrl_rows: np.ndarray, chunk_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std (ddof=0) of each query row's correlations to the control rows.

    Accumulated over blocks of queries and controls: no queries x controls matrix is built.
    """
    c_sum = np.zeros(q_rows.size)
    c_sq = np.zeros(q_rows.size)
    half = BLOCK_ELEMS // 2
    qb = max(1, min(int(chunk_size), half // ctrl_rows.size))
    cb = max(1, half // qb)
    for qa, qz in iter_blocks(q_rows.size, qb):
        qv = _centred_unit_rows(x[q_rows[qa:qz]])
        for ca, cz in iter_blocks(ctrl_rows.size, cb):
            corr = qv @ _centred_unit_rows(x[ctrl_rows[ca:cz]]).T
            c_sum[qa:qz] += corr.sum(axis=1)
            c_sq[qa:qz] += (corr**2).sum(axis=1)
    mu = c_sum / ctrl_rows.size
    sd = np.sqrt(np.maximum(c_sq / ctrl_rows.size - mu**2, 0.0))
    return mu, sd


def _replicate_means(
    x: np.ndarray,
    q_rows: np.ndarray,
    rep_codes: np.ndarray,
    comp_codes: np.ndarray,
    by_group: bool,
) -> np.ndarray:
    """Mean correlation of each query row with its replicates (NaN without any).

    Replicates share ``comp_codes``: the other rows of the perturbation, or with ``by_group``
    the group's rows of another perturbation (``rep_codes``).
    """
    pos_mean = np.full(q_rows.size, np.nan)
    order = np.argsort(comp_codes, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(comp_codes))])
    for g in range(bounds.size - 1):
        members = order[bounds[g] : bounds[g + 1]]
        if members.size < 2:
            continue
        z = _centred_unit_rows(x[q_rows[members]])
        corr = z @ z.T
        if not by_group:
            valid = ~np.eye(members.size, dtype=bool)
        else:
            mc = rep_codes[members]
            valid = mc[:, None] != mc[None, :]
        n_valid = valid.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            pos_mean[members] = np.where(valid, corr, 0.0).sum(axis=1) / n_valid
    return pos_mean


def _grit_table(
    sub: pd.DataFrame,
    rep_codes: np.ndarray,
    reps: np.ndarray,
    z_rep: np.ndarray,
    replicate_col: str,
    group_col: str | None,
) -> pd.DataFrame:
    """Per perturbation: mean z-score (``grit``), its rows and its rows with a z-score."""
    table = pd.DataFrame({"_code": rep_codes, "_z": z_rep})
    agg = table.groupby("_code").agg(
        grit=("_z", "mean"), n_replicates=("_z", "size"), n_scored=("_z", "count")
    )
    out = pd.DataFrame({replicate_col: reps[agg.index.to_numpy()]})
    if group_col is not None:
        first = np.unique(rep_codes, return_index=True)[1]
        out[group_col] = sub[group_col].to_numpy()[first]
    out["grit"] = agg["grit"].to_numpy()
    out["n_replicates"] = agg["n_replicates"].to_numpy()
    out["n_scored"] = agg["n_scored"].to_numpy()
    return out


def grit_summary(grit_df: pd.DataFrame) -> dict[str, float]:
    """Summary of a :func:`grit` table: mean and median GRIT over scored perturbations.

    Perturbations with NaN GRIT (singletons, or constant profiles) are excluded and counted.

    Returns:
        ``{"mean_grit", "median_grit", "n_perturbations", "n_scored"}``.
    """
    vals = grit_df["grit"].to_numpy(dtype=np.float64)
    ok = np.isfinite(vals)
    return {
        "mean_grit": float(vals[ok].mean()) if ok.any() else float("nan"),
        "median_grit": float(np.median(vals[ok])) if ok.any() else float("nan"),
        "n_perturbations": int(vals.size),
        "n_scored": int(ok.sum()),
    }
