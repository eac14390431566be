"""Mechanism-of-action matching: NSC and NSCB (Ljosa et al., J Biomol Screen 2013).

A treatment profile is the mean of its wells; each treatment's nearest other treatment (cosine)
should share its MoA. NSC excludes treatments of the same compound; NSCB also those of the same
batch (computed here on (treatment, batch) profiles, so that it is defined when every treatment
recurs in every batch; identical to Ljosa's definition when each treatment lives in one batch).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from cdcl.metrics.neighbours import BLOCK_ELEMS, iter_blocks
from cdcl.profiles.arrays import (
    _as_list,
    _bool_column,
    _codes,
    _features,
    _group_mean,
    _has_label,
    _unit_rows,
)


def treatment_profiles(
    features: ArrayLike,
    df: pd.DataFrame,
    *,
    by: str | Sequence[str] = ("treatment",),
    keep: Sequence[str] = ("compound", "moa", "batch"),
) -> tuple[np.ndarray, pd.DataFrame]:
    """Mean-aggregate rows into one profile per group of ``by`` (e.g. wells -> treatments).

    Profile = arithmetic mean of the group's rows (the consensus profile of pycytominer's
    ``aggregate(operation="mean")``). Groups are sorted by their ``by`` values; missing values
    form their own group. In the returned metadata each ``keep`` column present in ``df``
    holds the group's single value when it is constant, otherwise the sorted tuple of its
    distinct values (e.g. the batches a treatment spans); ``n_rows`` counts the rows.

    Returns:
        ``(profiles float32 (g, d), meta_df with columns by + keep + ["n_rows"])``.
    """
    x = _features(features)
    if len(df) != x.shape[0]:
        raise ValueError(f"df has {len(df)} rows, features {x.shape[0]}")
    by_cols = _as_list(by)
    missing = [c for c in by_cols if c not in df.columns]
    if missing:
        raise KeyError(f"grouping columns not in df: {missing}")
    frame = df.reset_index(drop=True)
    codes = frame.groupby(by_cols, sort=True, dropna=False).ngroup().to_numpy().astype(np.int64)
    n_groups = int(codes.max()) + 1 if codes.size else 0
    profiles = _group_mean(x, codes, n_groups) if n_groups else np.empty((0, x.shape[1]))
    first = np.unique(codes, return_index=True)[1]
    meta = frame.loc[first, by_cols].reset_index(drop=True)
    for col in keep:
        if col not in frame.columns or col in by_cols:
            continue
        grouped = frame[col].groupby(codes)
        values = grouped.first().reindex(range(n_groups)).astype(object).to_numpy()
        multi = np.flatnonzero(grouped.nunique(dropna=False).reindex(range(n_groups)) > 1)
        for g in multi:
            uniq = pd.unique(frame[col].to_numpy()[codes == g])
            values[g] = tuple(sorted(uniq, key=str))
        meta[col] = values
    meta["n_rows"] = np.bincount(codes, minlength=n_groups)
    return profiles.astype(np.float32), meta


def _nearest_moa_hits(
    profiles: np.ndarray,
    moa_codes: np.ndarray,
    comp_codes: np.ndarray,
    batch_codes: np.ndarray | None,
) -> np.ndarray:
    """Per query: 1 if the 1-NN (excluding self, same compound, same batch) shares its MoA,
    0 if not, -1 if no candidate is left."""
    n = profiles.shape[0]
    outcome = np.full(n, -1, dtype=np.int8)
    step = max(1, BLOCK_ELEMS // max(n, 1))
    for a, b in iter_blocks(n, step):
        sims = profiles[a:b] @ profiles.T
        local = np.arange(b - a)
        sims[local, local + a] = -np.inf  # never match itself
        sims[comp_codes[a:b, None] == comp_codes[None, :]] = -np.inf
        if batch_codes is not None:
            sims[batch_codes[a:b, None] == batch_codes[None, :]] = -np.inf
        best = sims.argmax(axis=1)
        valid = np.isfinite(sims[local, best])
        block = outcome[a:b]
        block[valid] = moa_codes[best[valid]] == moa_codes[a:b][valid]
    return outcome


def _query_record(outcome: np.ndarray, **labels: np.ndarray) -> dict[str, list[Any]]:
    """Answered queries as columns (labels and ``hit``), for a bootstrap over compounds."""
    ok = outcome >= 0
    rec: dict[str, list[Any]] = {k: [str(v) for v in col[ok]] for k, col in labels.items()}
    rec["hit"] = [bool(h) for h in outcome[ok]]
    return rec


def nsc_nscb(
    features: ArrayLike,
    meta: pd.DataFrame,
    *,
    treatment_col: str = "treatment",
    compound_col: str = "compound",
    moa_col: str = "moa",
    batch_col: str = "batch",
    control_col: str = "is_control",
) -> dict[str, Any]:
    """Not-same-compound (NSC) and not-same-compound-or-batch (NSCB) MoA matching accuracy.

    Ljosa et al., J Biomol Screen 2013 (BBBC021 benchmark). Rows of ``features`` are well (or
    image) profiles. Control rows and rows without a MoA are dropped. The prediction of a
    query is the MoA of its nearest other profile by cosine similarity (1-NN; ties go to the
    first candidate in sorted order):

    - NSC: queries and candidates are treatment profiles (the mean of all the treatment's
      rows); candidates exclude treatments of the same compound (other concentrations);
    - NSCB: queries and candidates are (treatment, batch) profiles, the mean of the
      treatment's rows within one batch; candidates exclude the same compound and the
      query's own batch. When every treatment lives in one batch (Ljosa's BBBC021 with the
      imaging week as batch) this is exactly their NSCB; when treatments recur in every batch
      (a screen with replicate plates, e.g. RxRx1 or the simulated screen) it still asks the
      question NSCB exists for: does a profile find its MoA among other compounds measured in
      *another* batch? (Treatment profiles spanning all batches would leave no candidate.)

    Accuracy is the fraction of queries whose neighbour has the same MoA. Queries with no
    eligible candidate are skipped and counted (``n_skipped_nsc``, ``n_skipped_nscb``). The
    compound defaults to the treatment when ``compound_col`` is absent; without
    ``batch_col`` NSCB is NaN.

    ``queries`` holds every answered query's outcome (``{"nsc": {"treatment", "compound",
    "hit"}, "nscb": {"treatment", "compound", "batch", "hit"}}``, column lists), so that an
    interval can resample compounds rather than replicates.

    Returns:
        ``{"nsc", "nscb", "n_nsc", "n_nscb", "n_skipped_nsc", "n_skipped_nscb",
        "n_treatments", "n_moas", "queries"}``.
    """
    x = _features(features)
    frame = meta.reset_index(drop=True)
    if len(frame) != x.shape[0]:
        raise ValueError(f"meta has {len(frame)} rows, features {x.shape[0]}")
    for col in (treatment_col, moa_col):
        if col not in frame.columns:
            raise KeyError(f"column {col!r} not in meta")
    keep = ~_bool_column(frame, control_col) & _has_label(frame[moa_col])
    keep &= frame[treatment_col].notna().to_numpy()
    rows = np.flatnonzero(keep)
    sub = frame.iloc[rows].reset_index(drop=True)
    tcodes, treatments = _codes(sub[treatment_col], treatment_col)
    n_t = treatments.size
    out: dict[str, Any] = {"n_treatments": int(n_t)}
    if n_t < 2:
        out.update(nsc=float("nan"), nscb=float("nan"), n_nsc=0, n_nscb=0)
        out.update(n_skipped_nsc=int(n_t), n_skipped_nscb=int(n_t), n_moas=0)
        out["queries"] = {}
        return out
    profiles = _unit_rows(_group_mean(x, tcodes, n_t, rows=rows))
    moa_codes, n_moas, comp_codes, comp_names = _treatment_labels(
        sub, tcodes, treatments, moa_col, compound_col, treatment_col
    )
    out["n_moas"] = n_moas

    res = _nearest_moa_hits(profiles, moa_codes, comp_codes, None)
    hits, counted = int((res == 1).sum()), int((res >= 0).sum())
    out.update(nsc=hits / counted if counted else float("nan"), n_nsc=counted)
    out["n_skipped_nsc"] = int(n_t - counted)
    out["queries"] = {
        "nsc": _query_record(res, treatment=treatments, compound=comp_names),
    }
    if batch_col not in sub.columns:
        out.update(nscb=float("nan"), n_nscb=0, n_skipped_nscb=0)
        return out
    labels = _TreatmentLabels(tcodes, treatments, moa_codes, comp_codes, comp_names)
    out.update(_nscb(x, sub, rows, batch_col, labels, out["queries"]))
    return out


@dataclass(frozen=True)
class _TreatmentLabels:
    """Each row's treatment code, and each treatment's name, MoA and compound."""

    tcodes: np.ndarray
    treatments: np.ndarray
    moa_codes: np.ndarray
    comp_codes: np.ndarray
    comp_names: np.ndarray


def _most_frequent(sub: pd.DataFrame, tcodes: np.ndarray, col: str) -> np.ndarray:
    """One value of ``col`` per treatment; the most frequent wins if rows disagree."""
    pairs = pd.DataFrame({"t": tcodes, "v": sub[col].to_numpy(dtype=object)})
    size = pairs.groupby(["t", "v"], dropna=False, sort=True).size().reset_index(name="n")
    size = size.sort_values(["t", "n"], ascending=[True, False], kind="stable")
    top = size.drop_duplicates("t")
    if len(size) > len(top):
        # Level 4 (here, _treatment_labels, nsc_nscb): the line that called nsc_nscb.
        warnings.warn(
            f"some treatments have several {col!r} values; using the most frequent",
            stacklevel=4,
        )
    return top["v"].to_numpy(dtype=object)


def _treatment_labels(
    sub: pd.DataFrame,
    tcodes: np.ndarray,
    treatments: np.ndarray,
    moa_col: str,
    compound_col: str,
    treatment_col: str,
) -> tuple[np.ndarray, int, np.ndarray, np.ndarray]:
    """Per treatment: MoA code, compound code and compound name; and the number of MoAs.

    A missing compound only matches itself: it gets a code of its own and the treatment's
    name.
    """
    moa = _most_frequent(sub, tcodes, moa_col)
    moa_codes, moas = _codes(moa, moa_col)
    comp_src = compound_col if compound_col in sub.columns else treatment_col
    comp_names = _most_frequent(sub, tcodes, comp_src)
    comp_codes = _codes(comp_names, comp_src, allow_na=True)[0]
    na = comp_codes < 0
    comp_codes[na] = comp_codes.max() + 1 + np.arange(na.sum())
    comp_names = np.where(na, treatments, comp_names)
    return moa_codes, int(moas.size), comp_codes, comp_names


def _nscb(
    x: np.ndarray,
    sub: pd.DataFrame,
    rows: np.ndarray,
    batch_col: str,
    labels: _TreatmentLabels,
    queries: dict[str, Any],
) -> dict[str, Any]:
    """NSCB on (treatment, batch) profiles; adds its answered queries to ``queries``."""
    bcodes, _ = _codes(sub[batch_col], batch_col, allow_na=True)
    ok = bcodes >= 0
    pair = labels.tcodes[ok].astype(np.int64) * (int(bcodes.max()) + 1) + bcodes[ok]
    gcodes, groups = pd.factorize(pd.Series(pair), sort=True)
    g_t = groups.to_numpy() // (int(bcodes.max()) + 1)
    g_b = groups.to_numpy() % (int(bcodes.max()) + 1)
    gprof = _unit_rows(_group_mean(x, gcodes.astype(np.int64), len(groups), rows=rows[ok]))
    res = _nearest_moa_hits(gprof, labels.moa_codes[g_t], labels.comp_codes[g_t], g_b)
    hits, counted = int((res == 1).sum()), int((res >= 0).sum())
    batch_names = np.asarray(_codes(sub[batch_col], batch_col, allow_na=True)[1], dtype=object)
    queries["nscb"] = _query_record(
        res,
        treatment=labels.treatments[g_t],
        compound=labels.comp_names[g_t],
        batch=batch_names[g_b],
    )
    return {
        "nscb": hits / counted if counted else float("nan"),
        "n_nscb": counted,
        "n_skipped_nscb": int(len(groups) - counted),
    }
