"""Batch mixing of the negative-control wells: the one population every batch shares.

Controls are the same perturbation on every plate, so whatever tells one batch's controls from
another's is batch effect, whatever the design does with the treatments. On the evaluated rows'
control wells, across the evaluated batches:

- kBET acceptance (:func:`cdcl.metrics.mixing.kbet`, its own kNN graph of the control rows);
- iLISI (:func:`cdcl.metrics.mixing.ilisi`, scaled as there);
- a batch classifier cross-validated with folds grouped by plate (no plate on both sides of a
  split, so a plate's own signature cannot pass for its batch's), with its chance level on the
  same folds (:func:`grouped_batch_classifier`).

After per-plate standardisation against the controls (the ``plate_normalized`` variant) every
plate's controls have mean 0 and SD 1 in every feature, so a classifier that is linear in the
features sees exactly nothing there: its training classes all have the same mean, the
likelihood's gradient vanishes at zero weights and it predicts the majority batch, i.e. it
scores its chance level by construction. The classifier therefore also reads second-order
terms (squares and products of the leading principal components), which carry the
batch-specific covariance (feature mixing, rotation) that standardisation leaves; the linear
classifier's accuracy is reported next to it (``linear_accuracy``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold
from sklearn.preprocessing import StandardScaler

from cdcl.metrics import mixing, neighbours
from cdcl.profiles.arrays import _codes, _features

QUADRATIC_COMPONENTS = 8  # principal components whose squares and products the classifier reads
MAX_FOLDS = 5
MAX_SAMPLES = 20_000  # control rows the classifier fits on (a seeded sample of whole plates above)
CLASSIFIER = (
    "logistic regression (L2, C=1, after standardisation) on the profile and the squares and "
    f"pairwise products of its first {QUADRATIC_COMPONENTS} principal components (fitted on "
    "the training folds), cross-validated with folds grouped by plate"
)
CHANCE_RULE = (
    "accuracy of predicting each test fold's rows as the training folds' largest batch, on the "
    "same folds"
)


def _quadratic(train: np.ndarray, test: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Both blocks standardised (on ``train``) plus products of their first ``k`` PCs."""
    scaler = StandardScaler().fit(train)
    a, b = scaler.transform(train), scaler.transform(test)
    k = min(k, a.shape[1], a.shape[0] - 1)
    if k < 1:
        return a, b
    # Principal axes of the training rows (SVD of the standardised block).
    vt = np.linalg.svd(a - a.mean(axis=0), full_matrices=False)[2][:k]
    iu = np.triu_indices(k)

    def expand(z: np.ndarray) -> np.ndarray:
        pc = z @ vt.T
        return np.concatenate([z, (pc[:, :, None] * pc[:, None, :])[:, iu[0], iu[1]]], axis=1)

    return expand(a), expand(b)


def _fit_predict(
    train: np.ndarray, y: np.ndarray, test: np.ndarray, seed: int, max_iter: int
) -> np.ndarray:
    """Logistic-regression predictions for ``test`` (the only class when training has one)."""
    classes = np.unique(y)
    if classes.size == 1:
        return np.full(test.shape[0], classes[0])
    scaler = StandardScaler().fit(train)
    clf = LogisticRegression(max_iter=max_iter, random_state=seed)
    clf.fit(scaler.transform(train), y)
    return clf.predict(scaler.transform(test))


def grouped_batch_classifier(
    features: ArrayLike,
    batch: ArrayLike,
    groups: ArrayLike,
    *,
    cv: int = MAX_FOLDS,
    seed: int = 0,
    quadratic_components: int = QUADRATIC_COMPONENTS,
    max_iter: int = 1000,
) -> dict[str, Any]:
    """Batch prediction accuracy with folds grouped by ``groups`` (plates), and its chance.

    ``GroupKFold`` with ``min(cv, number of groups)`` folds: every group's rows are tested by
    a model that never saw that group. ``accuracy``: the classifier of ``CLASSIFIER`` over all
    rows (each predicted once); ``linear_accuracy``: the same without the second-order terms;
    ``chance`` per ``CHANCE_RULE``. Rows of a batch found in one group only are left out
    (when their group is tested, their batch is absent from training: always wrong).

    Returns:
        ``{"accuracy", "linear_accuracy", "chance", "n_folds", "n_samples", "n_batches",
        "model", "chance_rule"}`` or ``{"not_computable": reason}``.
    """
    x = _features(features)
    b = np.asarray(batch).astype(str)
    g = np.asarray(groups).astype(str)
    per_batch = mixing.distinct_per_group(g, b)  # plates per batch
    ok_batches = per_batch.index[per_batch >= 2]
    keep = np.isin(b, ok_batches)
    left_out = int(per_batch.size - ok_batches.size)
    if ok_batches.size < 2:
        return {
            "not_computable": (
                f"only {ok_batches.size} batch(es) have control wells on >= 2 plates; a "
                "plate-grouped batch classifier needs two (each batch tested on a plate it "
                "was not trained on)"
            )
        }
    rows = np.flatnonzero(keep)
    if rows.size > MAX_SAMPLES:
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(rows, MAX_SAMPLES, replace=False))
    xs, bs, gs = np.asarray(x[rows], dtype=np.float64), b[rows], g[rows]
    codes, _ = _codes(bs, "batch")
    n_folds = int(min(cv, np.unique(gs).size))
    hits = {"quadratic": 0, "linear": 0, "chance": 0}
    for tr, te in GroupKFold(n_splits=n_folds).split(xs, codes, gs):
        y = codes[tr]
        qa, qb = _quadratic(xs[tr], xs[te], quadratic_components)
        hits["quadratic"] += int((_fit_predict(qa, y, qb, seed, max_iter) == codes[te]).sum())
        hits["linear"] += int((_fit_predict(xs[tr], y, xs[te], seed, max_iter) == codes[te]).sum())
        hits["chance"] += int((codes[te] == np.bincount(y).argmax()).sum())
    n = rows.size
    out: dict[str, Any] = {
        "accuracy": hits["quadratic"] / n,
        "linear_accuracy": hits["linear"] / n,
        "chance": hits["chance"] / n,
        "n_folds": n_folds,
        "n_samples": int(n),
        "n_batches": int(ok_batches.size),
        "model": CLASSIFIER,
        "chance_rule": CHANCE_RULE,
    }
    if left_out:
        out["note"] = f"{left_out} batch(es) with control wells on one plate only left out"
    return out


def control_mixing(
    features: ArrayLike,
    meta: pd.DataFrame,
    *,
    seed: int = 0,
    max_queries: int | None = None,
) -> dict[str, Any]:
    """kBET, iLISI and the plate-grouped batch classifier on the control wells of these rows.

    ``meta`` holds ``batch``, ``plate`` and ``is_control`` (one row per profile). kBET and
    iLISI read one kNN graph of the control rows (every control a query up to
    ``mixing.EXACT_MAX`` of them, else ``max_queries`` or ``mixing.QUERY_SAMPLE`` seeded
    ones); kBET's k is its default for the controls' batch sizes, iLISI's min(90, n - 1).

    Returns:
        ``{"kbet", "ilisi", "batch_classifier": {"accuracy", "chance", "n_folds", ...},
        "n_controls", "n_batches", "kbet_k", "ilisi_k"}``, or ``{"not_computable": reason}``
        with fewer than two batches holding controls (the classifier alone may be
        ``{"not_computable": reason}``, see :func:`grouped_batch_classifier`).
    """
    frame = meta.reset_index(drop=True)
    ctrl = frame["is_control"].to_numpy(bool)
    n_ctrl = int(ctrl.sum())
    batch = frame.loc[ctrl, "batch"].astype(str).to_numpy()
    n_batches = int(pd.Series(batch).nunique())
    if n_batches < 2 or n_ctrl < 3:
        return {
            "not_computable": (
                f"{n_ctrl} control well(s) in {n_batches} batch(es) among the evaluated rows; "
                "control mixing needs control wells in at least 2 batches"
            )
        }
    rows = np.flatnonzero(ctrl)
    xc = np.asarray(_features(features)[rows], dtype=np.float32)
    k_kbet = min(mixing.default_kbet_k(batch), n_ctrl - 1)
    k_lisi = min(mixing.LISI_K, n_ctrl - 1)
    nq = None if n_ctrl <= mixing.EXACT_MAX else (max_queries or mixing.QUERY_SAMPLE)
    queries = neighbours.sample_rows(n_ctrl, nq, seed)
    graph = neighbours.neighbor_graph(xc, max(k_kbet - 1, k_lisi), query_indices=queries)
    kb = mixing.kbet(xc, batch, k=k_kbet, graph=graph)
    li = mixing.ilisi(xc, batch, k=k_lisi, graph=graph)
    if "plate" in frame.columns and frame.loc[ctrl, "plate"].notna().all():
        plates = frame.loc[ctrl, "plate"].astype(str).to_numpy()
        clf = grouped_batch_classifier(xc, batch, plates, seed=seed)
    else:
        clf = {"not_computable": "the control wells' plates are not all known: no plate folds"}
    return {
        "kbet": kb["acceptance_rate"],
        "ilisi": li["ilisi"],
        "batch_classifier": clf,
        "n_controls": n_ctrl,
        "n_batches": n_batches,
        "kbet_k": kb["k"],
        "ilisi_k": li["k"],
        "n_queries": int(graph.queries.size),
    }
