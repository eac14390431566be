"""Evaluation metrics for batch-robust profiles of high-content screens (DESIGN section 7).

Pure functions on ``features`` (float32, shape (n, d)) and aligned metadata (arrays, pandas
Series or a DataFrame with one row per feature row). No file I/O. Everything that compares
all points with all points runs in blocks (see :mod:`cdcl.evaluate.knn`): no n x n matrix is
ever built, so the metrics stay memory-bounded at 1e5-1e6 profiles.

Families and references:

- treatment accuracy: weighted kNN (Wu et al., CVPR 2018; DINO's ``eval_knn``, Caron et al.,
  ICCV 2021) and a logistic-regression probe;
- MoA matching: NSC / NSCB (Ljosa et al., J Biomol Screen 2013);
- batch mixing: kBET (Buttner et al., Nat Methods 2019), silhouette (Rousseeuw 1987), batch
  classifier accuracy;
- replicate strength: GRIT (Way et al., Cell Systems 2022; cytominer-eval) and mAP with the
  copairs conventions (Kalinin et al., Nat Commun 2025; copairs).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy import sparse
from scipy.stats import chi2
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import KFold, StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cdcl.evaluate.knn import BLOCK_ELEMS, iter_blocks, knn_indices, row_norms

__all__ = [
    "average_precision",
    "batch_classifier_accuracy",
    "batch_silhouette_score",
    "classification_scores",
    "grit",
    "grit_summary",
    "kbet",
    "kbet_per_group",
    "knn_indices",
    "logistic_probe_accuracy",
    "map_pvalues",
    "mean_average_precision",
    "moa_map",
    "nsc_nscb",
    "replicate_map",
    "silhouette",
    "standardize_per_plate",
    "treatment_profiles",
    "weighted_knn_accuracy",
]


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def _features(x: ArrayLike, name: str = "features") -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, d), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
    return arr


def _labels(y: ArrayLike, n: int, name: str) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must be 1-D with {n} entries, got shape {arr.shape}")
    return arr


def _codes(values: ArrayLike, name: str, allow_na: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes 0..K-1 (sorted order of the unique values) and the unique values."""
    series = pd.Series(np.asarray(values, dtype=object))
    try:
        codes, uniques = pd.factorize(series, sort=True)
    except TypeError:
        # Mixed, unorderable label types (e.g. 3 and "a"): order by their text instead.
        codes, uniques = pd.factorize(series, sort=False)
        order = np.argsort(np.asarray([str(u) for u in uniques]), kind="stable")
        rank = np.empty(order.size, dtype=np.int64)
        rank[order] = np.arange(order.size)
        codes = np.where(codes >= 0, rank[np.maximum(codes, 0)], -1)
        uniques = np.asarray(uniques, dtype=object)[order]
    if not allow_na and (codes < 0).any():
        raise ValueError(f"{name} contains missing values")
    return codes.astype(np.int64), np.asarray(uniques, dtype=object)


def _as_list(cols: str | Iterable[str] | None) -> list[str]:
    if cols is None:
        return []
    if isinstance(cols, str):
        return [cols]
    return list(cols)


def _bool_column(meta: pd.DataFrame, col: str | None) -> np.ndarray:
    if col is None or col not in meta.columns:
        return np.zeros(len(meta), dtype=bool)
    return meta[col].fillna(False).astype(bool).to_numpy()


def _has_label(values: pd.Series) -> np.ndarray:
    """True where a label is present (not NaN/None and not an empty string)."""
    s = values.astype(object)
    return (s.notna() & (s.astype(str).str.strip() != "")).to_numpy()


def _group_mean(features: np.ndarray, codes: np.ndarray, n_groups: int) -> np.ndarray:
    """Mean of the rows of each group (codes 0..n_groups-1, every group non-empty)."""
    order = np.argsort(codes, kind="stable")
    counts = np.bincount(codes, minlength=n_groups)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    sums = np.add.reduceat(np.asarray(features[order], dtype=np.float64), starts, axis=0)
    return (sums / counts[:, None]).astype(np.float32)


def _unit_rows(x: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    blk = np.asarray(x, dtype=np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", blk, blk))
    return (blk / np.maximum(norms, 1e-12)[:, None]).astype(dtype)


def _centred_unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows centred on their own mean and scaled to unit norm: dot products are Pearson r."""
    blk = np.asarray(x, dtype=np.float64)
    blk = blk - blk.mean(axis=1, keepdims=True)
    norms = np.sqrt(np.einsum("ij,ij->i", blk, blk))
    with np.errstate(invalid="ignore", divide="ignore"):
        # Constant rows have no defined correlation: NaN, not a silent 0.
        return blk / np.where(norms > 0, norms, np.nan)[:, None]


# --------------------------------------------------------------------------------------
# treatment accuracy
# --------------------------------------------------------------------------------------


def classification_scores(y_true: ArrayLike, y_pred: ArrayLike) -> dict[str, float]:
    """Accuracy and macro-averaged F1 (unweighted mean of per-class F1; sklearn.metrics).

    Macro F1 is taken over the union of labels present in ``y_true`` and ``y_pred``, with
    ``zero_division=0`` (a class never predicted scores F1 = 0).
    """
    yt = np.asarray(y_true)
    yp = np.asarray(y_pred)
    if yt.shape != yp.shape:
        raise ValueError(f"y_true and y_pred differ in shape: {yt.shape} vs {yp.shape}")
    if yt.size == 0:
        return {"accuracy": float("nan"), "macro_f1": float("nan")}
    if yt.dtype.kind != yp.dtype.kind:
        # Mixed label types (e.g. int vs str) would make sklearn refuse; compare as text.
        yt, yp = yt.astype(str), yp.astype(str)
    return {
        "accuracy": float(accuracy_score(yt, yp)),
        "macro_f1": float(f1_score(yt, yp, average="macro", zero_division=0)),
    }


def weighted_knn_accuracy(
    train_x: ArrayLike,
    train_y: ArrayLike,
    test_x: ArrayLike,
    test_y: ArrayLike,
    k: int = 10,
    temperature: float = 0.1,
    *,
    chunk_size: int = 2048,
) -> dict[str, float]:
    """Weighted kNN classifier accuracy (Wu et al., CVPR 2018; DINO ``eval_knn``).

    Each test row takes its ``k`` nearest training rows by cosine similarity ``s``; each
    neighbour votes for its label with weight ``exp(s / temperature)``; the prediction is the
    label with the largest summed weight (ties: the first label in sorted order). Test labels
    absent from the training set can never be predicted and count as errors
    (``n_test_unseen_label`` says how many).

    Returns:
        ``{"accuracy", "macro_f1", "k", "n_test_unseen_label"}``.
    """
    tr = _features(train_x, "train_x")
    te = _features(test_x, "test_x")
    ytr = _labels(train_y, tr.shape[0], "train_y")
    yte = _labels(test_y, te.shape[0], "test_y")
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    classes, ycodes = np.unique(ytr, return_inverse=True)
    k_eff = min(int(k), tr.shape[0])
    idx, sim = knn_indices(tr, k_eff, query=te, chunk_size=chunk_size)
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
    out["n_test_unseen_label"] = int((~np.isin(yte, classes)).sum())
    return out


def logistic_probe_accuracy(
    train_x: ArrayLike,
    train_y: ArrayLike,
    test_x: ArrayLike,
    test_y: ArrayLike,
    *,
    max_iter: int = 1000,
    C: float = 1.0,
    seed: int = 0,
) -> dict[str, float]:
    """Linear-probe accuracy: sklearn ``LogisticRegression`` on train-standardised features.

    Features are standardised with the *training* mean and std (``StandardScaler``), the
    multinomial logistic regression (L2, ``C``, lbfgs) is fitted on the training rows and
    scored on the test rows. Test labels not seen in training are errors by construction;
    their count is reported as ``n_test_unseen_label`` (and the number of such classes as
    ``n_unseen_classes``).

    Returns:
        ``{"accuracy", "macro_f1", "n_test_unseen_label", "n_unseen_classes"}``.
    """
    tr = _features(train_x, "train_x")
    te = _features(test_x, "test_x")
    ytr = _labels(train_y, tr.shape[0], "train_y")
    yte = _labels(test_y, te.shape[0], "test_y")
    classes = np.unique(ytr)
    scaler = StandardScaler().fit(tr)
    if classes.size == 1:
        # LogisticRegression refuses a single class; the only sensible probe predicts it.
        pred = np.full(te.shape[0], classes[0], dtype=ytr.dtype)
    else:
        clf = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
        clf.fit(scaler.transform(tr), ytr)
        pred = clf.predict(scaler.transform(te))
    out: dict[str, float] = dict(classification_scores(yte, pred))
    unseen = ~np.isin(yte, classes)
    out["n_test_unseen_label"] = int(unseen.sum())
    out["n_unseen_classes"] = int(np.unique(yte[unseen]).size)
    return out


def batch_classifier_accuracy(
    features: ArrayLike,
    batch: ArrayLike,
    *,
    cv: int = 5,
    seed: int = 0,
    max_samples: int | None = 20000,
    max_iter: int = 1000,
) -> dict[str, Any]:
    """Cross-validated accuracy of predicting the batch from the features (lower = better mixed).

    A standardise + logistic-regression pipeline is scored with stratified ``cv``-fold
    cross-validation (shuffled, seeded). ``chance`` is the majority-batch frequency, the
    accuracy of always guessing the largest batch. At most ``max_samples`` rows (a seeded
    uniform sample) are used, to keep the fit affordable on large screens.

    Returns:
        ``{"accuracy", "chance", "n_splits", "n_samples", "n_batches"}`` (plus ``note`` when
        it cannot be computed).
    """
    x = _features(features)
    b = _labels(batch, x.shape[0], "batch")
    rng = np.random.default_rng(seed)
    if max_samples is not None and x.shape[0] > max_samples:
        keep = np.sort(rng.choice(x.shape[0], size=int(max_samples), replace=False))
        x, b = x[keep], b[keep]
    codes, uniq = _codes(b, "batch")
    counts = np.bincount(codes)
    chance = float(counts.max() / counts.sum())
    out: dict[str, Any] = {
        "chance": chance,
        "n_samples": int(x.shape[0]),
        "n_batches": int(uniq.size),
    }
    if uniq.size < 2:
        out.update(accuracy=float("nan"), n_splits=0, note="single batch: nothing to predict")
        return out
    min_count = int(counts.min())
    if min_count >= 2:
        n_splits = min(int(cv), min_count)
        splitter: KFold | StratifiedKFold = StratifiedKFold(
            n_splits=n_splits, shuffle=True, random_state=seed
        )
    else:
        # A batch with one row cannot be stratified; plain shuffled folds still work.
        n_splits = min(int(cv), x.shape[0])
        splitter = KFold(n_splits=n_splits, shuffle=True, random_state=seed)
    model = make_pipeline(
        StandardScaler(), LogisticRegression(max_iter=max_iter, random_state=seed)
    )
    scores = cross_val_score(model, x, codes, cv=splitter)
    out.update(accuracy=float(np.mean(scores)), n_splits=n_splits)
    return out


# --------------------------------------------------------------------------------------
# normalisation and aggregation
# --------------------------------------------------------------------------------------


def standardize_per_plate(
    features: ArrayLike,
    plates: ArrayLike,
    is_control: ArrayLike,
    *,
    eps: float = 1e-6,
    robust: bool = False,
) -> np.ndarray:
    """Standardise each plate against its own negative controls.

    For every plate: ``(x - mean_c) / (std_c + eps)`` where mean/std (ddof=0) are those of
    the plate's control rows, per feature (pycytominer ``normalize(method="standardize")``
    with controls as the reference). ``robust=True`` uses pycytominer's ``mad_robustize``:
    ``(x - median_c) / (1.4826 * MAD_c + eps)``, MAD the median absolute deviation. A plate
    without control rows falls back to all its rows, with a ``warnings.warn`` naming the
    plate (never an error).

    Returns:
        float32 array of the same shape as ``features``.
    """
    x = _features(features)
    n = x.shape[0]
    plate = _labels(plates, n, "plates")
    ctrl = np.asarray(is_control, dtype=bool)
    if ctrl.shape != (n,):
        raise ValueError(f"is_control must have {n} entries, got shape {ctrl.shape}")
    codes, uniq = _codes(plate, "plates")
    out = np.empty(x.shape, dtype=np.float32)
    for p in range(uniq.size):
        rows = np.flatnonzero(codes == p)
        block = np.asarray(x[rows], dtype=np.float64)
        ref_mask = ctrl[rows]
        if not ref_mask.any():
            warnings.warn(
                f"plate {uniq[p]!r} has no control rows: standardised against all its "
                f"{rows.size} rows instead",
                stacklevel=2,
            )
            ref_mask = np.ones(rows.size, dtype=bool)
        ref = block[ref_mask]
        if robust:
            centre = np.median(ref, axis=0)
            scale = 1.4826 * np.median(np.abs(ref - centre), axis=0)
        else:
            centre = ref.mean(axis=0)
            scale = ref.std(axis=0)
        out[rows] = ((block - centre) / (scale + eps)).astype(np.float32)
    return out


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


# --------------------------------------------------------------------------------------
# MoA matching (NSC / NSCB)
# --------------------------------------------------------------------------------------


def _nearest_moa_hits(
    profiles: np.ndarray,
    moa_codes: np.ndarray,
    comp_codes: np.ndarray,
    batch_codes: np.ndarray | None,
) -> tuple[int, int]:
    """(correct, answered) 1-NN MoA predictions excluding self, same compound and same batch."""
    n = profiles.shape[0]
    hits = counted = 0
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
        counted += int(valid.sum())
        hits += int((moa_codes[best[valid]] == moa_codes[a:b][valid]).sum())
    return hits, counted


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

    Returns:
        ``{"nsc", "nscb", "n_nsc", "n_nscb", "n_skipped_nsc", "n_skipped_nscb",
        "n_treatments", "n_moas"}``.
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
        return out
    profiles = _unit_rows(_group_mean(x[rows], tcodes, n_t))

    # One MoA and one compound per treatment; the most frequent wins if rows disagree.
    def per_treatment(col: str) -> np.ndarray:
        pairs = pd.DataFrame({"t": tcodes, "v": sub[col].to_numpy(dtype=object)})
        size = pairs.groupby(["t", "v"], dropna=False, sort=True).size().reset_index(name="n")
        size = size.sort_values(["t", "n"], ascending=[True, False], kind="stable")
        top = size.drop_duplicates("t")
        if len(size) > len(top):
            warnings.warn(
                f"some treatments have several {col!r} values; using the most frequent",
                stacklevel=3,
            )
        return top["v"].to_numpy(dtype=object)

    moa = per_treatment(moa_col)
    moa_codes, moas = _codes(moa, moa_col)
    comp_src = compound_col if compound_col in sub.columns else treatment_col
    comp_codes = _codes(per_treatment(comp_src), comp_src, allow_na=True)[0]
    # A missing compound only matches itself: give it the treatment's own unique code.
    na = comp_codes < 0
    comp_codes[na] = comp_codes.max() + 1 + np.arange(na.sum())
    out["n_moas"] = int(moas.size)

    hits, counted = _nearest_moa_hits(profiles, moa_codes, comp_codes, None)
    out.update(nsc=hits / counted if counted else float("nan"), n_nsc=counted)
    out["n_skipped_nsc"] = int(n_t - counted)
    if batch_col not in sub.columns:
        out.update(nscb=float("nan"), n_nscb=0, n_skipped_nscb=0)
        return out
    bcodes, _ = _codes(sub[batch_col], batch_col, allow_na=True)
    ok = bcodes >= 0
    pair = tcodes[ok].astype(np.int64) * (int(bcodes.max()) + 1) + bcodes[ok]
    gcodes, groups = pd.factorize(pd.Series(pair), sort=True)
    g_t = groups.to_numpy() // (int(bcodes.max()) + 1)
    g_b = groups.to_numpy() % (int(bcodes.max()) + 1)
    gprof = _unit_rows(_group_mean(x[rows][ok], gcodes.astype(np.int64), len(groups)))
    hits, counted = _nearest_moa_hits(gprof, moa_codes[g_t], comp_codes[g_t], g_b)
    out.update(nscb=hits / counted if counted else float("nan"), n_nscb=counted)
    out["n_skipped_nscb"] = int(len(groups) - counted)
    return out


# --------------------------------------------------------------------------------------
# batch mixing: kBET and silhouette
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# replicate strength: GRIT
# --------------------------------------------------------------------------------------


def grit(
    features: ArrayLike,
    meta: pd.DataFrame,
    *,
    replicate_col: str = "treatment",
    control_col: str = "is_control",
    group_col: str | None = None,
    chunk_size: int = 2048,
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
    has_rep = frame[replicate_col].notna().to_numpy()
    if group_col is not None:
        if group_col not in frame.columns:
            raise KeyError(f"column {group_col!r} not in meta")
        has_rep &= frame[group_col].notna().to_numpy()
    q_rows = np.flatnonzero(~ctrl & has_rep)

    # Control correlation mean and std per query row, accumulated over control blocks.
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

    sub = frame.iloc[q_rows].reset_index(drop=True)
    rep_codes, reps = _codes(sub[replicate_col], replicate_col)
    comp_codes = rep_codes if group_col is None else _codes(sub[group_col], group_col)[0]
    pos_mean = np.full(q_rows.size, np.nan)
    order = np.argsort(comp_codes, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(comp_codes))])
    for g in range(bounds.size - 1):
        members = order[bounds[g] : bounds[g + 1]]
        if members.size < 2:
            continue
        z = _centred_unit_rows(x[q_rows[members]])
        corr = z @ z.T
        if group_col is None:
            valid = ~np.eye(members.size, dtype=bool)
        else:
            mc = rep_codes[members]
            valid = mc[:, None] != mc[None, :]
        n_valid = valid.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            pos_mean[members] = np.where(valid, corr, 0.0).sum(axis=1) / n_valid
    with np.errstate(invalid="ignore", divide="ignore"):
        z_rep = (pos_mean - mu) / np.where(sd > 0, sd, np.nan)

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


# --------------------------------------------------------------------------------------
# replicate / MoA retrieval: mAP with copairs conventions
# --------------------------------------------------------------------------------------

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
