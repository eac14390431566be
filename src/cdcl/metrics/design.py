"""The design an evaluation scored: rows, held-out plates and batches, queries per metric.

A metric is a mean over queries (held-out wells for treatment accuracy, treatments for NSC,
evaluated profiles for kBET, ...). With few queries it moves in coarse steps and two rows
cannot differ by less than query noise. :func:`design_facts` states the design;
:func:`noise_floor` is the smallest difference between two rows that the queries can
resolve: the 95% half-width of a difference of two means of ``n`` scores in [0, 1] at their
largest variance (0.25 per query), ``1.96 x sqrt(2 x 0.25 / n)``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

NOISE_Z = 1.96  # a two-sided 95% interval
MAX_QUERY_VAR = 0.25  # the largest variance of a score in [0, 1] (half the queries 0, half 1)

# Metric path (joined with ".") -> the query unit it averages over (keys of ``queries``).
QUERY_UNIT = {
    "classification.logistic.accuracy": "held-out treated profiles",
    "classification.knn.accuracy": "held-out treated profiles",
    "moa_matching.nsc": "treatments with a MoA",
    "moa_matching.nscb": "treatment-batch profiles with a MoA",
    "kbet.acceptance_rate": "evaluated profiles",
    "kbet.per_treatment_mean": "profiles of treatments in >= 2 batches",
    "ilisi.ilisi": "evaluated profiles",
    "mixing_per_treatment.kbet": "profiles of treatments in >= 2 batches",
    "mixing_per_treatment.ilisi": "profiles of treatments in >= 2 batches",
    "mixing_per_treatment.batch_silhouette": "profiles of treatments in >= 2 batches",
    "mixing_per_treatment.graph_connectivity": "profiles of treatments in >= 2 batches",
    "silhouette.batch_scib": "evaluated profiles",
    "batch_classifier.accuracy": "evaluated profiles",
    "map.replicate.map": "treated profiles with a replicate",
    "map.replicate_batch_aware.map": "treated profiles with a replicate",
    "map.moa.map": "treated profiles with a MoA",
    "map.moa_batch_aware.map": "treated profiles with a MoA",
}
# Metrics that count hits: they move in steps of 1 / queries.
STEPPED = (
    "classification.logistic.accuracy",
    "classification.knn.accuracy",
    "moa_matching.nsc",
    "moa_matching.nscb",
    "kbet.acceptance_rate",
    "batch_classifier.accuracy",
)


def noise_floor(n_queries: int) -> float:
    """Smallest difference two rows scored on ``n_queries`` queries can resolve (module doc)."""
    if n_queries < 1:
        return float("inf")
    return NOISE_Z * math.sqrt(2.0 * MAX_QUERY_VAR / n_queries)


def _sorted(values: pd.Series) -> list[str]:
    return sorted(values.astype(str).unique())


def _query_counts(ev: pd.DataFrame, held_out_treated: int) -> dict[str, int]:
    """Queries of each unit on the evaluated rows."""
    ctrl = ev["is_control"].to_numpy(bool)
    treated = ev.loc[~ctrl]
    t = treated["treatment"].astype(str)
    has_moa = treated["moa"].notna() if "moa" in treated else pd.Series(False, index=treated.index)
    batches_per_t = ev.groupby(ev["treatment"].astype(str))["batch"].nunique()
    spanning = ev["treatment"].astype(str).map(batches_per_t).to_numpy() >= 2
    moa_rows = treated.loc[has_moa]
    return {
        "held-out treated profiles": held_out_treated,
        "treatments with a MoA": int(moa_rows["treatment"].nunique()),
        "treatment-batch profiles with a MoA": int(
            moa_rows[["treatment", "batch"]].astype(str).drop_duplicates().shape[0]
        ),
        "evaluated profiles": len(ev),
        "profiles of treatments in >= 2 batches": int(spanning.sum()),
        "treated profiles with a replicate": int((t.map(t.value_counts()) >= 2).sum()),
        "treated profiles with a MoA": int(has_moa.sum()),
    }


def design_facts(
    meta: pd.DataFrame,
    train: np.ndarray | None,
    test: np.ndarray,
    ev: np.ndarray,
    level: str = "well",
) -> dict[str, Any]:
    """Rows, held-out plates and batches, and queries, step and noise floor of every metric."""
    meta = meta.reset_index(drop=True)
    # Held out are the batches the run paired across, even when mixing is judged by another.
    pairing = "pairing_batch" if "pairing_batch" in meta.columns else "batch"
    test, ev = np.asarray(test, bool), np.asarray(ev, bool)
    ctrl = meta["is_control"].to_numpy(bool)
    train_rows = meta.loc[np.asarray(train, bool)] if train is not None else meta.iloc[:0]
    known = meta["treatment"].astype(str).isin(set(train_rows["treatment"].astype(str)))
    held_out_treated = int((test & ~ctrl & known.to_numpy()).sum()) if train is not None else 0
    queries = _query_counts(meta.loc[ev], held_out_treated)
    metrics = {}
    for path, unit in QUERY_UNIT.items():
        n = queries[unit]
        rec: dict[str, Any] = {"unit": unit, "queries": n, "noise_floor": noise_floor(n)}
        if path in STEPPED:
            rec["step"] = 1.0 / n if n else None
        metrics[path] = rec
    return {
        "level": level,
        "profiles": len(meta),
        "train_profiles": int(len(train_rows)),
        "held_out_profiles": int(test.sum()),
        "evaluated_profiles": int(ev.sum()),
        "training_batches": _sorted(train_rows[pairing]),
        "held_out_batches": _sorted(meta.loc[test, pairing]),
        "held_out_plates": _sorted(meta.loc[test, "plate"]),
        "evaluated_batches": _sorted(meta.loc[ev, "batch"]),
        "evaluated_plates": _sorted(meta.loc[ev, "plate"]),
        "queries": queries,
        "metrics": metrics,
        "noise_rule": (
            "noise floor = 1.96 x sqrt(2 x 0.25 / queries): the 95% half-width of the "
            "difference of two rows' means of per-query scores in [0, 1]"
        ),
    }
