"""The calibration step of an evaluation: whether it runs, and what it changes in the results.

On a small design (fewer than ``SMALL_DESIGN_PROFILES`` evaluated profiles in every evaluated
batch) the calibration (:func:`cdcl.evaluation.calibration.calibrate`) costs seconds, and
small designs are where metrics lack power, so it runs unless switched off
(``calibrate=False``, ``--no-calibrate``). Its verdicts then apply to every feature set of the
evaluation (they share the design): a metric without power on the design leaves the aggregate
(``aggregate.left_out``) and the report shows it greyed.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np
import pandas as pd

from cdcl.evaluation.calibration import calibrate
from cdcl.metrics.score import AGGREGATE_BATCH, AGGREGATE_BIO, aggregate_scores

SMALL_DESIGN_PROFILES = 50  # evaluated profiles per batch below which calibration is default
# Calibrated metric (cdcl.evaluation.calibration.CALIBRATED label) -> aggregate component.
COMPONENT_OF = {
    "kBET per treatment": "kbet_per_treatment",
    "iLISI per treatment": "ilisi_per_treatment",
    "batch silhouette per treatment (scib)": "batch_silhouette_per_treatment",
    "graph connectivity": "graph_connectivity",
    "NSC": "nsc",
    "NSCB": "nscb",
    "MoA mAP": "moa_map",
}


def small_design(meta: pd.DataFrame, ev: np.ndarray) -> bool:
    """Whether every evaluated batch holds fewer than ``SMALL_DESIGN_PROFILES`` profiles."""
    rows = meta.loc[np.asarray(ev, bool)]
    if rows.empty:
        return False
    return int(rows["batch"].astype(str).value_counts().max()) < SMALL_DESIGN_PROFILES


def should_calibrate(calibrate_opt: bool | None, meta: pd.DataFrame, ev: np.ndarray) -> bool:
    """``calibrate_opt`` when given; by default (None) on small designs, saying so on stderr.

    A design without treated profiles cannot be calibrated (the injected effects are scaled
    by the treatment effect): it is skipped, with a note when calibration was asked for.
    """
    if calibrate_opt is False:
        return False
    treated = int((~meta.loc[np.asarray(ev, bool), "is_control"].to_numpy(bool)).sum())
    if treated == 0:
        if calibrate_opt:
            print(
                "note: calibration skipped: the evaluated profiles hold no treated profile, "
                "and the injected batch effects are scaled by the treatment effect",
                file=sys.stderr,
            )
        return False
    if calibrate_opt or not small_design(meta, ev):
        return bool(calibrate_opt)
    print(
        f"note: small design (under {SMALL_DESIGN_PROFILES} evaluated profiles per batch): "
        "calibrating the metrics on it by default (seconds; --no-calibrate skips it)",
        file=sys.stderr,
    )
    return True


def left_out_components(cal: dict[str, Any], variant: str | None = None) -> dict[str, str]:
    """Aggregate component -> reason, for the calibrated metrics without power on the design.

    ``variant``: that variant's verdicts where the calibration has them (``variants``); else,
    and by default, the top-level ones (the raw variant's).
    """
    out = {}
    body = (cal.get("variants") or {}).get(variant) if variant is not None else None
    body = body if isinstance(body, dict) else cal
    for label in body.get("no_power", []):
        comp, rec = COMPONENT_OF.get(label), body["metrics"][label]
        # A metric without a null value is not computable here: dropped as such, not left out.
        null = rec.get("null")
        if comp is not None and isinstance(null, int | float) and math.isfinite(null):
            out[comp] = str(rec.get("reason", "no power in this design"))
    return out


def apply_calibration(results_sets: dict[str, Any], cal: dict[str, Any]) -> None:
    """Recompute every set's aggregate without the components the calibration found powerless.

    Each variant leaves out what the calibration found without power on that variant (the
    raw variant's verdicts where it calibrated one variant only).
    """
    known = set(AGGREGATE_BATCH) | set(AGGREGATE_BIO)
    for res in results_sets.values():
        if not isinstance(res, dict):
            continue
        for variant, body in res.items():
            if isinstance(body, dict) and "aggregate" in body:
                left_out = left_out_components(cal, variant)
                left_out = {k: v for k, v in left_out.items() if k in known}
                res[variant]["aggregate"] = aggregate_scores(body, left_out)


def calibrate_sets(
    results_sets: dict[str, Any],
    name: str,
    x: np.ndarray,
    meta: pd.DataFrame,
    ev: np.ndarray,
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """Calibrate ``name``'s design, store it under its results and apply it to every set."""
    cal = calibrate(x, meta, eval_mask=ev, seed=seed, name=name)
    results_sets[name]["calibration"] = cal
    apply_calibration(results_sets, cal)
    return cal
