"""Scoring one feature set: every metric of docs/design.md §7, and the shared parts of a results.json.

:func:`evaluate_features` (profiles + canonical metadata + train/test masks -> nested dict of
figures) is the common core of a run's evaluation (:mod:`cdcl.evaluation.run`), of
``cdcl evaluate --features`` (:mod:`cdcl.evaluation.table_file`), of the demo and of the study.

Conventions (stated in results.json under ``protocol``):
- profiles are well-level (mean over sites); the logistic probe and the kNN bank are fitted on
  the wells of the training batches and scored on the wells of the held-out (test) batches,
  controls excluded; the online probe (from the checkpoint) is scored on test *images*;
- the unsupervised metrics (NSC/NSCB, kBET, silhouettes, GRIT, mAP, batch classifier) are
  computed on the evaluation rows (the test batches for a run; all rows for a table unless
  asked otherwise);
- every figure is given twice: on the raw profiles and after per-plate standardisation of
  each plate's profiles against that plate's control profiles (``plate_normalized``).
"""

from __future__ import annotations

import functools
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from cdcl import progress
from cdcl._version import versions
from cdcl.errors import CdclError
from cdcl.metrics import (
    classification,
    matching,
    mixing,
    neighbours,
    reproducibility,
    retrieval,
)
from cdcl.metrics.control_mixing import control_mixing
from cdcl.metrics.feasibility import classification_unavailable, unavailable
from cdcl.profiles.arrays import label_isin
from cdcl.profiles.columns import plate_normalize
from cdcl.profiles.correction import TRANSDUCTIVE_NOTE, apply_corrections
from cdcl.profiles.variants import VARIANTS
from cdcl.schema import get_path

# Every row is a query up to EXACT_MAX rows; above, QUERY_SAMPLE seeded query rows are scored
# against all rows (kNN accuracy, kBET, iLISI, silhouettes, mAP), each reported with its
# standard error.
EXACT_MAX = 10_000
QUERY_SAMPLE = 2_000
SILHOUETTE_EXACT_MAX = EXACT_MAX  # profiles; above, silhouettes score a sample of query rows
SILHOUETTE_SAMPLE = 1_000  # per label set (x3); s.e. ~ sd(s_i) / 32, ~0.005 for sd 0.15
MAP_QUERY_SAMPLE = 1_000  # mAP (x4): queries spread over groups; s.e. reported per summary
PROBE_MAX_TRAIN = 10_000  # logistic probe: stratified sample of training wells above this
GRIT_MAX_CONTROLS = 2_000  # GRIT: control sample for each row's null mean/std
MAP_NULL_BUDGET = 1 << 32  # random ranks drawn for mAP p-values; beyond, p-values are skipped
RESULTS_VERSION = 1
PROTOCOL = {
    "profiles": "well level: mean of the image embeddings over sites",
    "classification": (
        "logistic probe and weighted kNN (k=10, cosine, exp(sim/0.1)) fitted on training-batch "
        "wells, scored on held-out-batch wells; controls excluded"
    ),
    "online_probe": "the checkpoint's linear probe on held-out-batch images, controls excluded",
    "unsupervised": "NSC/NSCB, kBET, silhouettes, GRIT, mAP and batch classifier on eval rows",
    "batch_endpoints": (
        "retrieval penalty: per query, replicate AP with positives from the same batch (another "
        "plate where the design has one) minus AP with positives from other batches, matched "
        "in number of positives (expected AP over random subsets of the larger set), negatives "
        "the controls; mean per treatment, then over treatments. 0 with no batch effect, "
        "positive when same-batch replicates are easier to retrieve"
    ),
    "control_mixing": (
        "on the control wells of the eval rows: kBET and iLISI (own kNN graph of the controls), "
        "and a batch classifier (logistic regression on the profile plus second-order terms of "
        "its leading principal components) cross-validated with folds grouped by plate, with "
        "its chance (the training folds' largest batch) on the same folds"
    ),
    "plate_normalized": (
        "each plate standardised (mean/std) against its own control profiles; a feature whose "
        "controls do not vary on a plate gets scale 1 (pycytominer/scikit-learn convention)"
    ),
    "tvn": "PCA whitening fitted on all control profiles (Ando et al. 2017); +coral: per batch",
    "sampling": (
        f"above {EXACT_MAX:,} rows, {QUERY_SAMPLE:,} seeded query rows (kNN accuracy, kBET, "
        f"iLISI; {SILHOUETTE_SAMPLE:,} for silhouettes and mAP, spread over groups for mAP) "
        f"are scored against all rows, with a standard error; logistic probe on at most {PROBE_MAX_TRAIN:,} training wells; GRIT "
        f"against at most {GRIT_MAX_CONTROLS:,} controls"
    ),
    "mixing_per_treatment": (
        "kBET, iLISI, batch silhouette and graph connectivity within each treatment present "
        "in >= 2 evaluated batches, averaged over treatments; others listed, left out. kBET and "
        "iLISI follow scib's per-label rules (treatments under 10 profiles skipped, k0 from the "
        "treatment's batch sizes, fragmented treatments scored 0) and are not averaged over "
        "fewer than 3 treatments; kBET leaves out a treatment with fewer than 3 k0 rows (split, "
        "it would score 0 however well it mixes); graph connectivity is scib's, on one kNN graph of all rows. "
        f"Above {EXACT_MAX:,} rows kBET and graph connectivity score a seeded sample of whole "
        "treatments (all their rows, searched exactly against all rows) with its standard "
        "error; treatments too large for the sample are listed and left out"
    ),
}


class Timer:
    """Collects wall-clock seconds per named stage; with ``echo``, prints each to stderr."""

    def __init__(self, echo: bool = False) -> None:
        self.times: dict[str, float] = {}
        self.echo = echo

    def __call__(self, name: str) -> _Stage:
        """A context manager timing one stage (times of the same name add up)."""
        return _Stage(self, name)

    def say(self, line: str) -> None:
        """Print one progress line to stderr when echoing (stdout stays the result table)."""
        if self.echo:
            progress.say(f"cdcl evaluate: {line}")

    def report(self, name: str, seconds: float) -> None:
        """Print a finished stage's time when echoing."""
        self.say(f"{name}: {seconds:.1f} s")


class _Stage:
    def __init__(self, timer: Timer, name: str) -> None:
        self.timer, self.name = timer, name

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()
        progress.working_on(self.name)

    def __exit__(self, exc_type: object, *exc: object) -> None:
        dt = time.perf_counter() - self.t0
        self.timer.times[self.name] = round(self.timer.times.get(self.name, 0.0) + dt, 3)
        if exc_type is None:  # a failed stage says so through its error, not a time
            self.timer.report(self.name, dt)


def _one_line(e: BaseException) -> str:
    """An exception as one line: scikit-learn's multi-line reports keep their last error line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    errs = [ln for ln in lines if ln.split(":", 1)[0].endswith(("Error", "Exception"))]
    if errs:
        return errs[-1][:300]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def _safe(errors: dict[str, str], name: str, fn: Callable[[], Any]) -> Any:
    """Run one metric; a failure is recorded as one line instead of losing the others.

    Library warnings are silenced here; the command prints the recorded lines once.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn()
    except Exception as e:  # a metric failing must not lose the evaluation of the rest
        errors[name] = _one_line(e)
        return None


class _Log:
    """Wraps metric calls to print one line with its time to stderr (large or verbose runs)."""

    def __init__(self, on: bool, prefix: str) -> None:
        self.on, self.prefix = on, prefix

    def __call__(self, name: str, fn: Callable[[], Any]) -> Callable[[], Any]:
        """``fn`` that, when on, reports its wall time as ``prefix name: T s``."""
        if not self.on:
            return fn

        def timed() -> Any:
            t0 = time.perf_counter()
            progress.working_on(f"{self.prefix} {name}")
            try:
                return fn()
            finally:
                dt = time.perf_counter() - t0
                progress.say(f"  {self.prefix} {name}: {dt:.1f} s")

        return timed


def _queries(n: int) -> int | None:
    """Query sample size for n rows: None (every row) up to EXACT_MAX."""
    return None if n <= EXACT_MAX else QUERY_SAMPLE


def _n_labels_ok(labels: np.ndarray) -> bool:
    n_lab = pd.Series(labels).nunique()
    return 2 <= n_lab <= len(labels) - 1


def _classification(
    x: np.ndarray,
    meta: pd.DataFrame,
    train: np.ndarray,
    test: np.ndarray,
    k: int,
    seed: int,
    log: _Log | None = None,
) -> dict[str, Any]:
    ctrl = meta["is_control"].to_numpy(bool)
    tr, te = train & ~ctrl, test & ~ctrl
    y = meta["treatment"].astype(str).to_numpy()
    out: dict[str, Any] = {"n_train": int(tr.sum()), "n_test": int(te.sum())}
    if tr.sum() < 2 or te.sum() < 1 or np.unique(y[tr]).size < 2:
        out["note"] = "too few training or test wells with treatments"
        return out
    if not label_isin(y[te], y[tr]).any():
        # Nothing to learn across batches (e.g. BBBC021: each treatment on one week only).
        out["note"] = "no held-out treatment occurs in the training batches"
        return out
    log = log or _Log(False, "")
    # Rows are passed as indices: no copy of the training or held-out part of a large table.
    tr_rows, te_rows = np.flatnonzero(tr), np.flatnonzero(te)
    rows = {"train_rows": tr_rows, "test_rows": te_rows}
    out["logistic"] = log(
        "logistic probe",
        lambda: classification.logistic_probe_accuracy(
            x, y[tr], x, y[te], seed=seed, max_train=PROBE_MAX_TRAIN, **rows
        ),
    )()
    kk = min(k, int(tr.sum()))
    nq = _queries(int(te.sum()))
    out["knn"] = log(
        "weighted kNN",
        lambda: neighbours.weighted_knn_accuracy(
            x, y[tr], x, y[te], k=kk, max_queries=nq, seed=seed, **rows
        ),
    )()
    return out


@dataclass(frozen=True)
class _Context:
    """What every unsupervised metric reads: the evaluation rows and the shared settings."""

    x: np.ndarray
    meta: pd.DataFrame
    ctrl: np.ndarray
    batch: np.ndarray
    treat: np.ndarray
    has_moa: bool
    seed: int
    null_size: int
    nq: int | None  # query sample for kNN graphs and control mixing (None: every row)
    map_kw: dict[str, Any]  # mAP settings shared by the plain and batch-aware rankings


def _context(x: np.ndarray, meta: pd.DataFrame, null_size: int, seed: int) -> _Context:
    """The context of one set of evaluation rows."""
    ctrl = meta["is_control"].to_numpy(bool)
    map_kw: dict[str, Any] = {"null_size": null_size, "seed": seed}
    map_kw["max_queries"] = None if len(x) <= EXACT_MAX else MAP_QUERY_SAMPLE
    map_kw["max_null_elems"] = MAP_NULL_BUDGET
    return _Context(
        x=x,
        meta=meta,
        ctrl=ctrl,
        batch=meta["batch"].astype(str).to_numpy(),
        treat=meta["treatment"].astype(str).to_numpy(),
        has_moa=bool("moa" in meta.columns and meta.loc[~ctrl, "moa"].notna().any()),
        seed=seed,
        null_size=null_size,
        nq=_queries(len(x)),
        map_kw=map_kw,
    )


def _moa_matching(c: _Context) -> dict[str, Any]:
    """NSC/NSCB."""
    return matching.nsc_nscb(c.x, c.meta)


def _per_treatment(c: _Context) -> dict[str, Any]:
    """kBET, iLISI and graph connectivity per treatment."""
    # One kNN graph per treatment serves kBET, iLISI and graph connectivity.
    return mixing.mixing_per_treatment(c.x, c.batch, c.treat, seed=c.seed)


def _global_mixing(c: _Context) -> dict[str, Any]:
    """kBET and iLISI over all rows."""
    # One kNN graph over all rows (sampled queries above EXACT_MAX) for kBET and iLISI.
    if pd.Series(c.batch).nunique() < 2:
        return {"kbet": mixing.kbet(c.x, c.batch), "ilisi": mixing.ilisi(c.x, c.batch)}
    k_kbet = mixing.default_kbet_k(c.batch)
    rows = neighbours.sample_rows(len(c.x), c.nq, c.seed)
    graph = neighbours.neighbor_graph(c.x, max(k_kbet - 1, mixing.LISI_K), query_indices=rows)
    return {
        "kbet": mixing.kbet(c.x, c.batch, graph=graph),
        "ilisi": mixing.ilisi(c.x, c.batch, graph=graph),
    }


def _silhouettes(c: _Context) -> dict[str, Any]:
    """Batch, treatment and MoA silhouettes."""
    x, seed = c.x, c.seed
    # Exact up to SILHOUETTE_EXACT_MAX rows; beyond, a seeded sample of query rows scored
    # against all rows (O(sample * n) instead of O(n^2)).
    kw = {"sample_size": SILHOUETTE_SAMPLE if len(x) > SILHOUETTE_EXACT_MAX else None}
    kw["seed"] = seed
    s: dict[str, Any] = {"n_queries": kw["sample_size"] or len(x)}
    # One pass of batch-label silhouettes s_i (Euclidean, as scib) serves three figures:
    # the mean s; scib's silhouette_batch with every row in one label, mean of 1 - |s_i|;
    # and 1 - |mean s| (not scib's: opposite signs cancel), kept for comparison.
    if _n_labels_ok(c.batch):
        codes = pd.factorize(pd.Series(c.batch))[0]
        q = neighbours.sample_rows(len(x), kw["sample_size"], seed)
        s_i = mixing.silhouette_values(x, codes, q, metric="euclidean")
        s["batch"] = float(s_i.mean())
        s["batch_scib"] = float(np.mean(1.0 - np.abs(s_i)))
        s["batch_global_1_minus_abs"] = 1.0 - abs(s["batch"])
    else:
        s["batch"] = s["batch_scib"] = s["batch_global_1_minus_abs"] = float("nan")
    # Row subsets are passed as indices: no copy of a screen-sized table.
    nc = ~c.ctrl
    kw["rows"] = np.flatnonzero(nc)
    treat = c.treat[nc]
    s["treatment"] = mixing.silhouette(x, treat, **kw) if _n_labels_ok(treat) else float("nan")
    if c.has_moa:
        moa_ok = nc & c.meta["moa"].notna().to_numpy()
        m = c.meta["moa"].astype(str).to_numpy()[moa_ok]
        kw["rows"] = np.flatnonzero(moa_ok)
        s["moa"] = mixing.silhouette(x, m, **kw) if _n_labels_ok(m) else float("nan")
    return s


def _grit(c: _Context) -> dict[str, Any]:
    """GRIT summary and per-treatment GRIT."""
    if c.ctrl.sum() < 2:
        return {"mean_grit": float("nan"), "note": "fewer than 2 control profiles"}
    table = reproducibility.grit(c.x, c.meta, max_controls=GRIT_MAX_CONTROLS, seed=c.seed)
    r = dict(reproducibility.grit_summary(table))
    r["per_treatment"] = dict(zip(table["treatment"].astype(str), table["grit"]))
    return r


# The plain and batch-aware settings of a recipe share its queries and similarities (one
# ranking, two sets of positives); rows are normalised as they are read, so no copy of a
# screen-sized table is made.
def _replicate_map(c: _Context) -> dict[str, Any]:
    """Replicate mAP, plain and batch-aware, with the cross-batch retrieval penalty."""
    # Replicate retrieval adds a third set of positives (same batch) to the same ranking.
    plain, aware, penalty = retrieval.replicate_maps_with_penalty(c.x, c.meta, **c.map_kw)
    return {"": plain, "_batch_aware": aware, "penalty": penalty}


def _moa_map(c: _Context) -> dict[str, Any]:
    """MoA mAP, plain and batch-aware."""
    plain, aware = retrieval.moa_maps(c.x, c.meta, (False, True), **c.map_kw)
    return {"": plain[0], "_batch_aware": aware[0]}


def _control_mixing(c: _Context) -> dict[str, Any]:
    """Control-well mixing across batches."""
    return control_mixing(c.x, c.meta, seed=c.seed, max_queries=c.nq)


def _batch_classifier(c: _Context) -> dict[str, Any]:
    """Batch classifier accuracy."""
    return classification.batch_classifier_accuracy(c.x, c.batch, seed=c.seed)


def _always(_: _Context) -> bool:
    return True


def _controls_and_treated(c: _Context) -> bool:
    return bool(c.ctrl.any() and (~c.ctrl).any())


def _with_moa(c: _Context) -> bool:
    return c.has_moa


@dataclass(frozen=True)
class _Metric:
    """One unsupervised metric family: where its result goes, when it runs, how it is logged."""

    key: str  # result key in the registry's results; errors are recorded as "<variant>.<key>"
    label: str  # log label
    fn: Callable[[_Context], Any]
    skip_if: tuple[str, ...] = ()  # not run when every one of these is unavailable (why)
    when: Callable[[_Context], bool] = _always  # False: not run and absent from the results
    shares_failure: str | None = None  # error key that also gets this metric's failure


_MAP_REPLICATE = ("map.replicate", "map.replicate_batch_aware")
_MAP_MOA = ("map.moa", "map.moa_batch_aware")
# Run in this order (the order of the hand-wired version: same seeds, same call sequence).
UNSUPERVISED: tuple[_Metric, ...] = (
    _Metric("moa_matching", "NSC/NSCB", _moa_matching, ("moa_matching",), _with_moa),
    _Metric("mixing_per_treatment", "mixing per treatment", _per_treatment),
    _Metric("kbet", "kBET + iLISI", _global_mixing, ("kbet",)),
    _Metric("silhouette", "silhouettes", _silhouettes, ("silhouette",)),
    _Metric("grit", "GRIT", _grit, ("grit",)),
    # The two settings share one ranking: its failure is both settings' failure.
    _Metric(
        "map.replicate",
        "replicate mAP + batch-aware",
        _replicate_map,
        _MAP_REPLICATE,
        _controls_and_treated,
        shares_failure="map.replicate_batch_aware",
    ),
    _Metric(
        "map.moa",
        "MoA mAP + batch-aware",
        _moa_map,
        _MAP_MOA,
        _with_moa,
        shares_failure="map.moa_batch_aware",
    ),
    _Metric("control_mixing", "control mixing", _control_mixing),
    _Metric("batch_classifier", "batch classifier", _batch_classifier, ("batch_classifier",)),
)


def _run_metrics(
    c: _Context, why: dict[str, str], errors: dict[str, str], pre: str, log: _Log
) -> dict[str, Any]:
    """Every metric of UNSUPERVISED in order: key -> result (None: skipped or failed)."""
    res: dict[str, Any] = {}
    for m in UNSUPERVISED:
        if not m.when(c):
            continue
        if m.skip_if and all(k in why for k in m.skip_if):
            res[m.key] = None
            continue
        name = f"{pre}.{m.key}"
        res[m.key] = _safe(errors, name, log(m.label, functools.partial(m.fn, c)))
        if res[m.key] is None and m.shares_failure and name in errors:
            errors[f"{pre}.{m.shares_failure}"] = errors[name]
    return res


def _kbet_with_per_treatment(r: dict[str, Any], mix: dict[str, Any] | None) -> dict[str, Any]:
    """Global kBET with the per-treatment kBET fields merged in (in place)."""
    if mix is not None:
        r["per_treatment_mean"] = mix["kbet"]
        r["per_treatment_n"] = mix["kbet_n"]  # treatments scored under scib's rules
        r["per_treatment_stderr"] = mix["kbet_stderr"]  # > 0 when treatments were sampled
        if mix.get("kbet_note"):
            r["per_treatment_note"] = mix["kbet_note"]
        r["per_treatment"] = {t: v["kbet"] for t, v in mix["per_treatment"].items()}
    return r


def _maps(res: dict[str, Any], why: dict[str, str]) -> dict[str, Any]:
    """The mAP figures: ``replicate``, ``moa`` and their ``_batch_aware`` settings."""
    maps: dict[str, Any] = {}
    for key in ("replicate", "moa"):
        if f"map.{key}" not in res:  # the recipe does not apply to these rows
            continue
        pair = res[f"map.{key}"]
        for suffix in ("", "_batch_aware"):
            nm = f"map.{key}{suffix}"
            maps[f"{key}{suffix}"] = None if pair is None or nm in why else pair[suffix]
    return maps


def _retrieval_penalty(res: dict[str, Any], why: dict[str, str]) -> dict[str, Any]:
    """The cross-batch retrieval penalty, or why it is not computable."""
    if "map.replicate" not in res:
        return {
            "not_computable": "not computable on this design: replicate retrieval needs "
            "control and treated wells (the controls are the negatives)"
        }
    pair = res["map.replicate"]
    if pair is not None:
        return pair["penalty"]
    reason = why.get("map.replicate_batch_aware") or "replicate retrieval failed"
    return {"not_computable": str(reason)}


def _unsupervised(
    x: np.ndarray,
    meta: pd.DataFrame,
    null_size: int,
    seed: int,
    errors: dict[str, str],
    pre: str,
    skipped: dict[str, str] | None = None,
    log: _Log | None = None,
) -> dict[str, Any]:
    """Every metric that needs no training split, on the given rows.

    A metric the rows cannot support is not run; ``skipped`` gets one line saying why.
    """
    log = log or _Log(False, pre)
    c = _context(x, meta, null_size, seed)
    why = unavailable(meta, c.has_moa)
    skipped = {} if skipped is None else skipped
    skipped.update({f"{pre}.{k}": v for k, v in why.items()})
    res = _run_metrics(c, why, errors, pre, log)
    out: dict[str, Any] = {}
    if "moa_matching" in res:
        out["moa_matching"] = res["moa_matching"]
    mix = out["mixing_per_treatment"] = res["mixing_per_treatment"]
    glob = res["kbet"]
    if glob is not None:
        out["kbet"] = _kbet_with_per_treatment(glob["kbet"], mix)
        out["ilisi"] = glob["ilisi"]
    else:
        out["kbet"] = None
    out["silhouette"] = res["silhouette"]
    out["grit"] = res["grit"]
    out["map"] = _maps(res, why)
    out["batch_endpoints"] = {"retrieval_penalty": _retrieval_penalty(res, why)}
    out["control_mixing"] = res["control_mixing"]
    out["batch_classifier"] = res["batch_classifier"]
    return out


def _checked(features: Any, meta: pd.DataFrame, name: str) -> np.ndarray:
    """Profiles as float32, after refusing an empty, misaligned or non-finite feature set."""
    x = np.asarray(features, dtype=np.float32)
    n = x.shape[0]
    if n == 0 or x.ndim != 2 or x.shape[1] == 0:
        raise CdclError(f"{name}: empty feature set (shape {x.shape}); nothing to evaluate")
    if len(meta) != n:
        raise ValueError(f"{n} profiles but {len(meta)} metadata rows")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x).all(axis=1)).sum())
        raise CdclError(
            f"{name}: {bad} profiles contain NaN or infinite values; drop or impute them"
        )
    return x


def _row_masks(
    n: int,
    train_mask: np.ndarray | None,
    test_mask: np.ndarray | None,
    eval_mask: np.ndarray | None,
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """(train or None, test, eval) rows; test defaults to every row, eval to the test rows."""
    all_rows = np.ones(n, dtype=bool)
    test = all_rows if test_mask is None else np.asarray(test_mask, bool)
    train = None if train_mask is None else np.asarray(train_mask, bool)
    ev = (
        (test if test_mask is not None else all_rows)
        if eval_mask is None
        else np.asarray(eval_mask, bool)
    )
    return train, test, ev


def _counts(
    x: np.ndarray,
    meta: pd.DataFrame,
    train: np.ndarray | None,
    test: np.ndarray,
    ev: np.ndarray,
) -> dict[str, int]:
    """The ``n`` block of the results: profiles, dims and the rows of each role."""
    return {
        "profiles": x.shape[0],
        "dims": int(x.shape[1]),
        "train": int(train.sum()) if train is not None else 0,
        "test": int(test.sum()),
        "eval": int(ev.sum()),
        "eval_batches": int(meta.loc[ev, "batch"].nunique()),
    }


def _score_variant(
    variant: str,
    x: np.ndarray,
    meta: pd.DataFrame,
    masks: tuple[np.ndarray | None, np.ndarray, np.ndarray],
    k: int,
    null_size: int,
    seed: int,
    errors: dict[str, str],
    skipped: dict[str, str],
    log: _Log,
) -> dict[str, Any]:
    """Every metric of one variant; ``masks`` are (train or None, test, eval) rows."""
    train, test, ev = masks
    norm_info: dict[str, Any] = {}
    if variant == "raw":
        xv = x
    elif variant == "plate_normalized":
        normalize = functools.partial(plate_normalize, x, meta, info=norm_info)
        xv = log("plate normalisation", normalize)()
    else:
        raise ValueError(f"unknown variant {variant!r}")
    res: dict[str, Any] = {"normalization": norm_info} if norm_info else {}
    if train is not None and train.any():
        res["classification"] = _safe(
            errors,
            f"{variant}.classification",
            lambda xv=xv, log=log: _classification(xv, meta, train, test, k, seed, log),
        )
        why = classification_unavailable(meta, train, test)
        if why:
            skipped[f"{variant}.classification"] = why
    sub_meta = meta.loc[ev].reset_index(drop=True)
    xe = xv if ev.all() else xv[ev]  # no copy of the whole table when scoring every row
    res.update(_unsupervised(xe, sub_meta, null_size, seed, errors, variant, skipped, log))
    res["aggregate"] = aggregate_scores(res)
    return res


def _note_single_batch(out: dict[str, Any], variants: tuple[str, ...], name: str) -> None:
    """Print which treatments the per-treatment mixing metrics left out (one evaluated batch)."""
    first = out.get(variants[0], {}) if variants else {}
    mix = first.get("mixing_per_treatment") or {}
    if mix.get("n_single_batch"):
        shown = ", ".join(mix["single_batch_treatments"][:5])
        more = " ..." if mix["n_single_batch"] > 5 else ""
        print(
            f"note: {name}: {mix['n_single_batch']} treatment(s) occur in only one evaluated "
            f"batch ({shown}{more}); left out of the per-treatment mixing metrics",
            file=sys.stderr,
        )


def evaluate_features(
    features: np.ndarray,
    meta: pd.DataFrame,
    train_mask: np.ndarray | None = None,
    test_mask: np.ndarray | None = None,
    *,
    eval_mask: np.ndarray | None = None,
    k: int = 10,
    null_size: int = 2000,
    seed: int = 0,
    variants: tuple[str, ...] = VARIANTS,
    timer: Timer | None = None,
    name: str = "features",
    verbose: bool | None = None,
) -> dict[str, Any]:
    """All metrics of one feature set: ``{"raw": {...}, "plate_normalized": {...}, "n": ...}``.

    ``meta`` holds the canonical columns (``plate, well, batch, treatment, is_control``; ``moa``
    and ``compound`` where known), one row per profile. Classification needs both masks
    (training rows, held-out rows); the other metrics run on ``eval_mask`` (default: the test
    rows, or all rows without a split). Failed metrics are listed under ``errors``.

    ``verbose`` (default: on above ``EXACT_MAX`` profiles) prints one line per metric with its
    wall time to stderr. Each variant also gets ``aggregate``, the scib-style overall score
    (:func:`aggregate_scores`).
    """
    x = _checked(features, meta, name)
    n = x.shape[0]
    meta = meta.reset_index(drop=True)
    constant = bool(n > 1 and (x.min(axis=0) == x.max(axis=0)).all())
    timer = timer or Timer()
    train, test, ev = _row_masks(n, train_mask, test_mask, eval_mask)
    errors: dict[str, str] = {}
    skipped: dict[str, str] = {}  # metric -> why the rows cannot support it
    out: dict[str, Any] = {"n": _counts(x, meta, train, test, ev)}
    if verbose is None:
        verbose = n > EXACT_MAX
    for variant in variants:
        log = _Log(bool(verbose), f"{name} {variant}")
        with timer(f"{name}.{variant}"):
            args = (k, null_size, seed, errors, skipped, log)
            out[variant] = _score_variant(variant, x, meta, (train, test, ev), *args)
    _note_single_batch(out, variants, name)
    if constant:
        out["note"] = (
            f"{name}: every feature is constant over the profiles: all similarities tie, so "
            "retrieval scores chance (ties count as chance) and no figure here says anything"
        )
        print(f"note: {out['note']}", file=sys.stderr)
    if errors:
        out["errors"] = errors
    if skipped:
        out["unavailable"] = skipped
    return out


# The aggregate's components and their paths inside a variant's results; each is a score in
# [0, 1] with 1 = best, used on that fixed range (never rescaled over the rows of a report).
AGGREGATE_BATCH = {
    "kbet_per_treatment": ("mixing_per_treatment", "kbet"),
    "ilisi_per_treatment": ("mixing_per_treatment", "ilisi"),
    "batch_silhouette_per_treatment": ("mixing_per_treatment", "batch_silhouette"),
    "graph_connectivity": ("mixing_per_treatment", "graph_connectivity"),
}
AGGREGATE_BIO = {
    "nsc": ("moa_matching", "nsc"),
    "nscb": ("moa_matching", "nscb"),
    "moa_map": ("map", "moa", "map"),
    "treatment_knn_accuracy": ("classification", "knn", "accuracy"),
}
AGGREGATE_RANGE = (
    "each component is a score in [0, 1] (1 = best) used as it is: totals are not rescaled "
    "over the rows of a report, so a feature set's total is the same in every report"
)


def aggregate_scores(res: dict[str, Any], left_out: dict[str, str] | None = None) -> dict[str, Any]:
    """scib-style overall score of one variant: 0.4 x batch-mixing mean + 0.6 x biology mean.

    Batch-mixing components (all per treatment, so that design imbalance cannot pass for a
    batch effect): kBET acceptance, scaled iLISI, scib's batch silhouette (mean 1 - |s_i|) and graph
    connectivity (:func:`cdcl.metrics.mixing_per_treatment`). Biology components:
    NSC and NSCB (MoA of the nearest other compound, the latter across batches), MoA
    retrieval mAP, and held-out treatment accuracy of the weighted kNN classifier (where a
    train/test split exists). Each is in [0, 1] with 1 = best, on that fixed range
    (``AGGREGATE_RANGE``); missing ones are dropped and named (``dropped``). ``left_out``
    (component -> reason, e.g. no power on this design) removes components; they are kept
    under ``left_out``. Batch-classifier accuracy is left out: its chance level depends on
    the batch sizes, so it is not on the [0, 1] best-is-1 scale of the others.
    """
    left_out = left_out or {}
    batch = {
        k: get_path(res, p, number=True) for k, p in AGGREGATE_BATCH.items() if k not in left_out
    }
    bio = {k: get_path(res, p, number=True) for k, p in AGGREGATE_BIO.items() if k not in left_out}
    out = mixing.scib_aggregate(batch, bio)
    out["range"] = AGGREGATE_RANGE
    if left_out:
        out["left_out"] = dict(left_out)
    return out


def online_probe_scores(
    probe: Any,
    image_features: np.ndarray,
    treatments: np.ndarray,
    label_of: dict[str, int],
    mask: np.ndarray,
) -> dict[str, Any]:
    """Accuracy and macro F1 of the checkpoint's online linear probe on the masked images."""

    t = np.asarray(treatments).astype(str)
    keep = np.asarray(mask, bool) & label_isin(t, list(label_of))
    if not keep.any():
        return {
            "note": "online probe: needs held-out images of a treatment seen in training; have 0",
            "n_test": 0,
        }
    classes = np.empty(max(label_of.values()) + 1, dtype=object)
    for name, i in label_of.items():
        classes[i] = name
    preds = []
    with torch.inference_mode():
        probe.eval()
        for a in range(0, int(keep.sum()), 4096):
            block = torch.from_numpy(image_features[keep][a : a + 4096])
            preds.append(probe(block).argmax(dim=1).cpu().numpy())
    pred = classes[np.concatenate(preds)].astype(str)
    out: dict[str, Any] = dict(classification.classification_scores(t[keep], pred))
    out["n_test"] = int(keep.sum())
    return out


def base_results(kind: str, **fields: Any) -> dict[str, Any]:
    """The common header of a results.json."""
    return {
        "results_version": RESULTS_VERSION,
        "kind": kind,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": versions(),
        "protocol": PROTOCOL,
        **fields,
    }


def corrected_sets(
    x: np.ndarray,
    meta: pd.DataFrame,
    corrections: tuple[str, ...],
    *,
    seed: int,
    timer: Timer,
    name: str,
) -> dict[str, np.ndarray]:
    """``{"<name>+<correction>": profiles}``: each post-hoc correction of one feature set, timed."""

    out: dict[str, np.ndarray] = {}
    for c in corrections:
        with timer(f"{name}+{c}.fit"):
            out[f"{name}+{c}"] = apply_corrections(
                x,
                meta["batch"].astype(str).to_numpy(),
                meta["is_control"].to_numpy(bool),
                (c,),
                seed=seed,
            )[c]
    return out


def protocol_with(corrections: tuple[str, ...]) -> dict[str, str]:
    """PROTOCOL, plus the transductive-fit statement when post-hoc corrections were scored."""
    if not corrections:
        return PROTOCOL

    return {**PROTOCOL, "corrections": TRANSDUCTIVE_NOTE}


def split_masks(samples: pd.DataFrame, split: pd.Series) -> dict[str, Any]:
    """Train/test batch lists of a split (per image)."""
    s = split.astype(str).to_numpy()
    b = samples["batch"].astype(str).to_numpy()
    return {
        "train_batches": sorted(set(b[s == "train"])),
        "val_batches": sorted(set(b[s == "val"])),
        "test_batches": sorted(set(b[s == "test"])),
    }
