"""Classification metrics: how well labels can be predicted from the profiles.

- ``classification_scores``: accuracy and macro-F1 of predicted labels.
- ``logistic_probe_accuracy``: a logistic-regression probe fitted on training batches and scored
  on held-out batches (the linear-evaluation protocol of self-supervised learning).
- ``batch_classifier_accuracy``: cross-validated accuracy of predicting the *batch* from the
  profiles, with its chance level; lower means better mixed (a common batch-effect readout, e.g.
  in Arevalo et al., Nat Commun 2024).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import KFold, StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cdcl.profiles.arrays import (
    _codes,
    _features,
    _labels,
    label_isin,
)


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


def logistic_probe_accuracy(
    train_x: ArrayLike,
    train_y: ArrayLike,
    test_x: ArrayLike,
    test_y: ArrayLike,
    *,
    max_iter: int = 1000,
    C: float = 1.0,
    seed: int = 0,
    max_train: int | None = None,
    train_rows: np.ndarray | None = None,
    test_rows: np.ndarray | None = None,
) -> dict[str, float]:
    """Linear-probe accuracy: sklearn ``LogisticRegression`` on train-standardised features.

    Features are standardised with the *training* mean and std (``StandardScaler``), the
    multinomial logistic regression (L2, ``C``, lbfgs) is fitted on the training rows and
    scored on the test rows. Test labels not seen in training are errors by construction;
    their count is reported as ``n_test_unseen_label`` (and the number of such classes as
    ``n_unseen_classes``).

    ``max_train``: with more training rows than that, the probe is fitted on a seeded sample
    of ``max_train`` rows stratified by label (every label keeps at least one row), which
    bounds the lbfgs cost on large screens; ``n_train`` reports the rows used.

    ``per_label`` counts the test rows and correct predictions of every test label (column
    lists ``label``, ``n``, ``correct``), so that an interval can resample labels (compounds)
    rather than replicates.

    ``train_rows`` / ``test_rows``: use only these rows of ``train_x`` / ``test_x`` (labels
    one per selected row), as if ``train_x[train_rows]`` were passed, without copying a large
    table (only the sampled training rows and one block of test rows are copied at a time).

    Returns:
        ``{"accuracy", "macro_f1", "n_test_unseen_label", "n_unseen_classes", "n_train",
        "per_label"}``.
    """
    x_tr = _features(train_x, "train_x")
    x_te = _features(test_x, "test_x")
    tr_ix = np.arange(x_tr.shape[0]) if train_rows is None else np.asarray(train_rows)
    te_ix = np.arange(x_te.shape[0]) if test_rows is None else np.asarray(test_rows)
    ytr = _labels(train_y, tr_ix.size, "train_y")
    yte = _labels(test_y, te_ix.size, "test_y")
    if max_train is not None and tr_ix.size > max_train:
        keep = _stratified_sample(ytr, int(max_train), seed)
        tr_ix, ytr = tr_ix[keep], ytr[keep]
    tr = x_tr[tr_ix]
    classes = np.unique(ytr)
    scaler = StandardScaler().fit(tr)
    if classes.size == 1:
        # LogisticRegression refuses a single class; the only sensible probe predicts it.
        pred = np.full(te_ix.size, classes[0], dtype=ytr.dtype)
    else:
        clf = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
        clf.fit(scaler.transform(tr), ytr)
        # Predicted in blocks: neither the test rows nor their float64 standardised copy are
        # ever held whole.
        step = 65536
        pred = np.concatenate(
            [
                clf.predict(scaler.transform(x_te[te_ix[a : a + step]]))
                for a in range(0, max(te_ix.size, 1), step)
            ]
        )
    out: dict[str, float] = dict(classification_scores(yte, pred))
    unseen = ~label_isin(yte, classes)
    out["n_test_unseen_label"] = int(unseen.sum())
    out["n_unseen_classes"] = int(np.unique(yte[unseen]).size)
    out["n_train"] = int(tr.shape[0])
    out["per_label"] = per_label_outcomes(yte, pred)  # type: ignore[assignment]
    return out


def per_label_outcomes(y_true: ArrayLike, y_pred: ArrayLike) -> dict[str, list[Any]]:
    """Test rows and correct predictions per true label (labels as text, sorted)."""
    yt = np.asarray(y_true).astype(str)
    ok = yt == np.asarray(y_pred).astype(str)
    labels, codes = np.unique(yt, return_inverse=True)
    return {
        "label": [str(v) for v in labels],
        "n": [int(v) for v in np.bincount(codes, minlength=labels.size)],
        "correct": [int(v) for v in np.bincount(codes, weights=ok, minlength=labels.size)],
    }


def _stratified_sample(y: np.ndarray, size: int, seed: int) -> np.ndarray:
    """About ``size`` row indices, each label in proportion to its count (at least one)."""
    codes, _ = _codes(y, "labels")
    counts = np.bincount(codes)
    take = np.maximum(1, np.floor(counts * size / codes.size).astype(np.int64))
    rng = np.random.default_rng(seed)
    order = np.argsort(codes, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(counts)])
    picks = [
        rng.choice(order[bounds[g] : bounds[g + 1]], take[g], replace=False)
        for g in range(counts.size)
    ]
    return np.sort(np.concatenate(picks))


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
