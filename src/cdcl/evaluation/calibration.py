"""Negative and positive controls for every metric, on the design being evaluated.

``cdcl evaluate --calibrate``: the evaluated rows, treatments and batches are kept and the
features are replaced by

- a null with no batch signal: each treatment's profiles permuted among that treatment's
  rows (equivalently, batch labels permuted within treatment), ``NULL_DRAWS`` seeded draws;
- graded injected batch effects: the first null draw plus an additive shift per batch of
  ``s`` x the median treatment effect (``s`` in ``STRENGTHS``) along a seeded random unit
  direction per batch; the median treatment effect is the median over non-control
  treatments of the Euclidean distance between the treatment's mean profile and the
  controls' mean profile;
- one non-linear effect: per batch, a monotone power transform of every feature's
  standardised value, ``z -> sign(z) |z|^p_b`` with ``p_b`` drawn in [0.5, 2].

Every metric is computed on each (raw profiles, evaluated rows). A metric whose value at the
strongest injected effect lies within ``max(3 x null SD, POWER_MIN_DIFF)`` of its null mean
cannot tell a batch effect of four median treatment effects from none on this design: it is
marked "no power in this design", with the reason. A metric that cannot be computed at all
on the design (e.g. per-treatment kBET when too few treatments have 10 profiles in two
batches) is marked the same way, saying so.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from cdcl.progress import working_on
from cdcl.report.calibration import NO_POWER

STRENGTHS = (0.25, 0.5, 1.0, 2.0, 4.0)
NULL_DRAWS = 3
POWER_MIN_DIFF = 0.02  # on [0, 1] scores: smaller moves are within rounding of the null
CALIBRATION_NULL_SIZE = 500  # mAP null size per condition (p-values are not calibrated here)

# (label, path inside a variant's results, kind): the figures calibrated.
CALIBRATED: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("kBET acceptance", ("kbet", "acceptance_rate"), "batch"),
    ("kBET per treatment", ("mixing_per_treatment", "kbet"), "batch"),
    ("iLISI", ("ilisi", "ilisi"), "batch"),
    ("iLISI per treatment", ("mixing_per_treatment", "ilisi"), "batch"),
    (
        "batch silhouette per treatment (scib)",
        ("mixing_per_treatment", "batch_silhouette"),
        "batch",
    ),
    ("batch silhouette, all rows (scib)", ("silhouette", "batch_scib"), "batch"),
    ("batch 1-|mean s| (not scib)", ("silhouette", "batch_global_1_minus_abs"), "batch"),
    ("graph connectivity", ("mixing_per_treatment", "graph_connectivity"), "batch"),
    ("batch classifier accuracy", ("batch_classifier", "accuracy"), "batch"),
    ("NSC", ("moa_matching", "nsc"), "bio"),
    ("NSCB", ("moa_matching", "nscb"), "bio"),
    ("replicate mAP", ("map", "replicate", "map"), "bio"),
    ("replicate mAP, batch-aware", ("map", "replicate_batch_aware", "map"), "bio"),
    ("MoA mAP", ("map", "moa", "map"), "bio"),
    ("MoA mAP, batch-aware", ("map", "moa_batch_aware", "map"), "bio"),
    ("aggregate", ("aggregate", "score"), "aggregate"),
)


def _get(d: Any, path: tuple[str, ...]) -> float:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return float("nan")
        d = d[key]
    return float(d) if isinstance(d, (int, float)) and not isinstance(d, bool) else float("nan")


def permute_within_treatment(x: np.ndarray, treatment: np.ndarray, seed: int) -> np.ndarray:
    """Each treatment's profiles shuffled among its own rows: no batch signal is left."""
    rng = np.random.default_rng(seed)
    out = np.empty_like(x)
    codes = pd.factorize(pd.Series(treatment).astype(str))[0]
    for g in range(int(codes.max()) + 1 if codes.size else 0):
        rows = np.flatnonzero(codes == g)
        out[rows] = x[rng.permutation(rows)]
    return out


def median_treatment_effect(x: np.ndarray, treatment: np.ndarray, is_control: np.ndarray) -> float:
    """Median over non-control treatments of |treatment mean - control mean| (Euclidean)."""
    t = pd.Series(treatment).astype(str).to_numpy()
    ctrl = np.asarray(is_control, bool)
    ref = x[ctrl].mean(axis=0) if ctrl.any() else x.mean(axis=0)
    effects = [
        float(np.linalg.norm(x[(t == name) & ~ctrl].mean(axis=0) - ref))
        for name in np.unique(t[~ctrl])
    ]
    return float(np.median(effects)) if effects else float("nan")


def inject_shift(x: np.ndarray, batch: np.ndarray, size: float, seed: int) -> np.ndarray:
    """``x`` plus a shift of length ``size`` per batch, each along a seeded random direction."""
    rng = np.random.default_rng(seed)
    b = pd.Series(batch).astype(str).to_numpy()
    out = np.asarray(x, dtype=np.float64).copy()
    for name in np.unique(b):
        u = rng.normal(size=x.shape[1])
        u /= max(float(np.linalg.norm(u)), 1e-12)
        out[b == name] += size * u
    return out.astype(np.float32)


def inject_monotone(x: np.ndarray, batch: np.ndarray, seed: int) -> tuple[np.ndarray, list[float]]:
    """Per batch, ``z -> sign(z) |z|^p_b`` on every feature's standardised value (monotone)."""
    rng = np.random.default_rng(seed)
    xf = np.asarray(x, dtype=np.float64)
    mu, sd = xf.mean(axis=0), xf.std(axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    z = (xf - mu) / sd
    b = pd.Series(batch).astype(str).to_numpy()
    powers = []
    for name in np.unique(b):
        p = float(np.exp(rng.uniform(math.log(0.5), math.log(2.0))))
        powers.append(p)
        rows = b == name
        z[rows] = np.sign(z[rows]) * np.abs(z[rows]) ** p
    return (mu + sd * z).astype(np.float32), powers


def calibrate(
    features: np.ndarray,
    meta: pd.DataFrame,
    *,
    eval_mask: np.ndarray | None = None,
    strengths: Sequence[float] = STRENGTHS,
    null_draws: int = NULL_DRAWS,
    null_size: int = CALIBRATION_NULL_SIZE,
    seed: int = 0,
    name: str = "features",
) -> dict[str, Any]:
    """Each metric's null value and its value under graded injected batch effects.

    See the module doc. ``features``/``meta`` as :func:`cdcl.metrics.score.evaluate_features`
    (canonical metadata); only the ``eval_mask`` rows (default all) are used. Metrics are
    computed on the raw variant (plate normalisation would remove an additive per-plate
    shift by construction).

    Returns:
        ``{"design", "conditions", "metrics": {label: {"kind", "null", "null_sd",
        "null_values", "strength": {s: value}, "nonlinear", "power", "reason"}},
        "no_power": [labels]}``.
    """
    from cdcl.metrics.score import evaluate_features

    x = np.asarray(features, dtype=np.float32)
    meta = meta.reset_index(drop=True)
    if eval_mask is not None:
        keep = np.asarray(eval_mask, bool)
        x, meta = x[keep], meta.loc[keep].reset_index(drop=True)
    treat = meta["treatment"].astype(str).to_numpy()
    batch = meta["batch"].astype(str).to_numpy()
    ctrl = meta["is_control"].to_numpy(bool)
    effect = median_treatment_effect(np.asarray(x, np.float64), treat, ctrl)

    def score(xc: np.ndarray, cond: str) -> dict[str, Any]:
        working_on(f"calibration, {cond}")  # named by the keep-alive line
        # The design notes (single-batch treatments ...) were printed for the real profiles.
        with np.errstate(all="ignore"), contextlib.redirect_stderr(io.StringIO()):
            return evaluate_features(
                xc,
                meta,
                null_size=null_size,
                seed=seed,
                variants=("raw",),
                name=f"{name} calibration {cond}",
                verbose=False,
            )["raw"]

    nulls = [permute_within_treatment(x, treat, seed + 1000 + i) for i in range(null_draws)]
    results: dict[str, dict[str, Any]] = {
        f"null_{i}": score(v, f"null {i}") for i, v in enumerate(nulls)
    }
    for s in strengths:
        shifted = inject_shift(nulls[0], batch, s * effect, seed + 2000)
        results[f"shift_{s:g}"] = score(shifted, f"shift {s:g}")
    monotone, powers = inject_monotone(nulls[0], batch, seed + 3000)
    results["nonlinear"] = score(monotone, "nonlinear")

    strongest = f"shift_{max(strengths):g}"
    metrics: dict[str, dict[str, Any]] = {}
    no_power: list[str] = []
    for label, path, kind in CALIBRATED:
        null_vals = np.array([_get(results[f"null_{i}"], path) for i in range(null_draws)])
        strength_vals = {f"{s:g}": _get(results[f"shift_{s:g}"], path) for s in strengths}
        top = _get(results[strongest], path)
        rec: dict[str, Any] = {
            "kind": kind,
            "path": ".".join(path),  # where the figure lives in a variant's results
            "null": float(np.nanmean(null_vals)) if np.isfinite(null_vals).any() else float("nan"),
            "null_sd": float(np.nanstd(null_vals, ddof=1))
            if np.isfinite(null_vals).sum() > 1
            else float("nan"),
            "null_values": [float(v) for v in null_vals],
            "strength": strength_vals,
            "nonlinear": _get(results["nonlinear"], path),
        }
        if not np.isfinite(null_vals).any() or not math.isfinite(top):
            rec["power"] = False
            rec["reason"] = f"{NO_POWER}: {_why_missing(results[strongest], path)}"
        else:
            margin = max(
                3.0 * (rec["null_sd"] if math.isfinite(rec["null_sd"]) else 0.0), POWER_MIN_DIFF
            )
            moved = abs(top - rec["null"])
            rec["power"] = bool(moved > margin)
            rec["margin"] = margin
            if not rec["power"]:
                rec["reason"] = (
                    f"{NO_POWER}: at {max(strengths):g} x the median treatment effect it moves "
                    f"{moved:.3f} from its null ({rec['null']:.3f}), within {margin:.3f} "
                    f"(3 null SDs or {POWER_MIN_DIFF})"
                )
        if not rec["power"]:
            no_power.append(label)
        metrics[label] = rec
    return {
        "design": {
            "n_profiles": int(len(meta)),
            "n_batches": int(pd.Series(batch).nunique()),
            "n_treatments": int(pd.Series(treat[~ctrl]).nunique()),
            "median_treatment_effect": effect,
            "variant": "raw",
        },
        "conditions": {
            "null": f"each treatment's profiles permuted among its rows ({null_draws} draws)",
            "shift": (
                "null draw 0 + per-batch shift of s x the median treatment effect along a "
                f"random unit direction, s in {list(strengths)}"
            ),
            "nonlinear": (
                "null draw 0, per batch z -> sign(z)|z|^p on standardised features, p = "
                + ", ".join(f"{p:.2f}" for p in powers)
            ),
            "power_rule": (
                f"power when |value at s = {max(strengths):g} - null mean| > max(3 null SD, "
                f"{POWER_MIN_DIFF})"
            ),
        },
        "metrics": metrics,
        "no_power": no_power,
    }


def _why_missing(res: dict[str, Any], path: tuple[str, ...]) -> str:
    """Why a metric has no value on this design (its note, or 'not computed')."""
    node: Any = res
    for key in path[:-1]:
        node = node.get(key) if isinstance(node, dict) else None
    if isinstance(node, dict):
        note = node.get(f"{path[-1]}_note") or node.get("note")
        if note:
            return str(note)
    unavailable = res.get("unavailable", {}) if isinstance(res, dict) else {}
    key = ".".join(path[:-1]) or path[0]
    why = [str(v) for k, v in unavailable.items() if k.endswith(key)]
    return "not computed on this design" + (f" ({why[0]})" if why else "")
