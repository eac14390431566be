"""Negative and positive controls for every metric, on the design being evaluated.

``cdcl evaluate --calibrate``: the evaluated rows, treatments and batches are kept and the
features are replaced by

- a null with no batch signal: each treatment's profiles permuted among that treatment's
  rows (equivalently, batch labels permuted within treatment), ``NULL_DRAWS`` seeded draws;
- graded injected batch effects, added to the first null draw *before* each variant's
  normalisation (the injected raw matrix goes through the same scoring path,
  :func:`cdcl.metrics.score.evaluate_features`, which normalises it), at strengths ``s`` in
  ``STRENGTHS``:

  - ``shift`` (raw variant only): a per-batch shift of ``s`` x the median treatment effect
    along a seeded random unit direction per batch. Per-plate standardisation removes it
    exactly, so it is not scored on the normalised variant;
  - ``power``: per batch, a monotone power transform of every feature's standardised value,
    ``z -> sign(z) |z|^p_b``, ``log p_b = lambda_s u_b`` with ``u_b`` spread evenly over
    [-1, 1] (seeded order);
  - ``mixing``: per batch, channel/feature mixing of the centred profiles,
    ``x -> mu + (x - mu)(I + a_s R_b)`` with ``R_b`` a seeded Gaussian matrix / sqrt(d);
  - ``rotation``: per batch, a seeded ``ROTATION_DIMS``-dimensional subspace of the centred
    profiles rotated by ``theta_s`` in each of its planes.

  The median treatment effect is the median over non-control treatments of the Euclidean
  distance between the treatment's mean profile and the controls' mean profile. For the
  three non-additive injections ``lambda_s``, ``a_s`` and ``theta_s`` are ``s`` times the
  amount that displaces a row by one median treatment effect (root mean square over rows),
  so ``s`` means the same size of change for every injection (``POWER_LOG_MAX`` and pi cap
  the power and the angle).

Every metric is computed on each variant (raw, plate-normalised) of each condition. A
metric whose value at the strongest strength of some injection lies further than
``max(3 x null SD, POWER_MIN_DIFF)`` from its null mean has power on that variant; one that
no injection moves that far cannot tell a batch effect of four median treatment effects
from none on this design, on that variant: it is marked "no power in this design", with the
reason. A metric that cannot be computed at all on the design (e.g. per-treatment kBET when
too few treatments have enough profiles in two batches) is marked the same way, saying so.
:func:`pooled_power` decides the same question once for a study, from all its replicates.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits  # a direct dependency (pyproject.toml)

from cdcl.profiles.variants import VARIANTS
from cdcl.progress import working_on
from cdcl.report.calibration import NO_POWER
from cdcl.schema import get_path

STRENGTHS = (0.25, 0.5, 1.0, 2.0, 4.0)
NULL_DRAWS = 10
INJECTIONS = ("shift", "power", "mixing", "rotation")
NON_ADDITIVE = ("power", "mixing", "rotation")
ROTATION_DIMS = 8
POWER_LOG_MAX = math.log(4.0)  # |log p_b| at most log 4: p_b in [1/4, 4]
POWER_MIN_DIFF = 0.02  # on [0, 1] scores: smaller moves are within rounding of the null
CALIBRATION_NULL_SIZE = 500  # mAP null size per condition (p-values are not calibrated here)
SINGLE_THREAD_MAX = 20_000  # evaluated rows up to which the calibration runs BLAS on one thread
POWER_RULE = (
    "power when |value at the strongest strength of some injection - null mean| > max(3 null "
    f"SD, {POWER_MIN_DIFF})"
)

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
    (
        "retrieval penalty (same − other batch)",
        ("batch_endpoints", "retrieval_penalty", "mean"),
        "batch",
    ),
    ("control kBET", ("control_mixing", "kbet"), "batch"),
    ("control iLISI", ("control_mixing", "ilisi"), "batch"),
    (
        "control batch-classifier acc",
        ("control_mixing", "batch_classifier", "accuracy"),
        "batch",
    ),
    ("NSC", ("moa_matching", "nsc"), "bio"),
    ("NSCB", ("moa_matching", "nscb"), "bio"),
    ("replicate mAP", ("map", "replicate", "map"), "bio"),
    ("replicate mAP, batch-aware", ("map", "replicate_batch_aware", "map"), "bio"),
    ("MoA mAP", ("map", "moa", "map"), "bio"),
    ("MoA mAP, batch-aware", ("map", "moa_batch_aware", "map"), "bio"),
    ("aggregate", ("aggregate", "score"), "aggregate"),
)


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


def _batches(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Batch names (sorted) and each row's batch as text."""
    b = pd.Series(batch).astype(str).to_numpy()
    return np.unique(b), b


def inject_shift(x: np.ndarray, batch: np.ndarray, size: float, seed: int) -> np.ndarray:
    """``x`` plus a shift of length ``size`` per batch, each along a seeded random direction."""
    rng = np.random.default_rng(seed)
    names, b = _batches(batch)
    out = np.asarray(x, dtype=np.float64).copy()
    for name in names:
        u = rng.normal(size=x.shape[1])
        u /= max(float(np.linalg.norm(u)), 1e-12)
        out[b == name] += size * u
    return out.astype(np.float32)


def _power_codes(batch: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batch names, each row's batch and each batch's ``u_b`` (evenly over [-1, 1], seeded)."""
    names, b = _batches(batch)
    u = np.linspace(-1.0, 1.0, names.size) if names.size > 1 else np.zeros(1)
    return names, b, np.random.default_rng(seed).permutation(u)


def inject_power(
    x: np.ndarray, batch: np.ndarray, log_power: float, seed: int
) -> tuple[np.ndarray, list[float]]:
    """Per batch ``z -> sign(z)|z|^p_b`` on standardised features, ``log p_b = log_power u_b``."""
    xf = np.asarray(x, dtype=np.float64)
    mu, sd = xf.mean(axis=0), xf.std(axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    z = (xf - mu) / sd
    names, b, u = _power_codes(batch, seed)
    powers = []
    for name, ub in zip(names, u):
        p = float(np.exp(log_power * ub))
        powers.append(p)
        rows = b == name
        z[rows] = np.sign(z[rows]) * np.abs(z[rows]) ** p
    return (mu + sd * z).astype(np.float32), powers


def inject_monotone(x: np.ndarray, batch: np.ndarray, seed: int) -> tuple[np.ndarray, list[float]]:
    """Per batch, ``z -> sign(z) |z|^p_b`` on every feature's standardised value (monotone).

    ``p_b`` drawn log-uniformly in [0.5, 2] per batch (the single non-linear condition of
    earlier calibrations; :func:`inject_power` is the graded one).
    """
    rng = np.random.default_rng(seed)
    xf = np.asarray(x, dtype=np.float64)
    mu, sd = xf.mean(axis=0), xf.std(axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    z = (xf - mu) / sd
    names, b = _batches(batch)
    powers = []
    for name in names:
        p = float(np.exp(rng.uniform(math.log(0.5), math.log(2.0))))
        powers.append(p)
        rows = b == name
        z[rows] = np.sign(z[rows]) * np.abs(z[rows]) ** p
    return (mu + sd * z).astype(np.float32), powers


def _mixing_matrices(d: int, n_batches: int, seed: int) -> list[np.ndarray]:
    """One seeded Gaussian d x d matrix / sqrt(d) per batch (spectral norm about 2)."""
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(d, d)) / math.sqrt(d) for _ in range(n_batches)]


def inject_mixing(x: np.ndarray, batch: np.ndarray, amount: float, seed: int) -> np.ndarray:
    """Per batch ``x -> mu + (x - mu)(I + amount R_b)``: features mixed batch-specifically."""
    xf = np.asarray(x, dtype=np.float64)
    mu = xf.mean(axis=0)
    names, b = _batches(batch)
    out = xf.copy()
    for name, r in zip(names, _mixing_matrices(x.shape[1], names.size, seed)):
        rows = b == name
        out[rows] += amount * ((xf[rows] - mu) @ r)
    return out.astype(np.float32)


def _rotation_bases(d: int, n_batches: int, seed: int, dims: int) -> list[np.ndarray]:
    """One seeded orthonormal d x k basis per batch (k = dims, even, at most d)."""
    rng = np.random.default_rng(seed)
    k = max(2, min(dims, d) // 2 * 2)
    return [np.linalg.qr(rng.normal(size=(d, k)))[0] for _ in range(n_batches)]


def inject_rotation(
    x: np.ndarray, batch: np.ndarray, angle: float, seed: int, dims: int = ROTATION_DIMS
) -> np.ndarray:
    """Per batch, a seeded ``dims``-dimensional subspace of ``x - mu`` rotated by ``angle``.

    The subspace's basis vectors are paired into planes, each rotated by ``angle``; the rest
    of the profile is untouched. Needs at least 2 features (else ``x`` is returned).
    """
    xf = np.asarray(x, dtype=np.float64)
    if xf.shape[1] < 2:
        return np.asarray(x, dtype=np.float32)
    mu = xf.mean(axis=0)
    names, b = _batches(batch)
    c, s = math.cos(angle), math.sin(angle)
    out = xf.copy()
    for name, u in zip(names, _rotation_bases(x.shape[1], names.size, seed, dims)):
        rows = b == name
        coords = (xf[rows] - mu) @ u  # (rows, k): planes are column pairs (0, 1), (2, 3) ...
        turned = coords.copy()
        turned[:, 0::2] = c * coords[:, 0::2] - s * coords[:, 1::2]
        turned[:, 1::2] = s * coords[:, 0::2] + c * coords[:, 1::2]
        out[rows] += (turned - coords) @ u.T
    return out.astype(np.float32)


def _rms_move(a: np.ndarray, b: np.ndarray) -> float:
    """Root mean square over rows of the Euclidean distance between ``a`` and ``b``."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return float(np.sqrt(np.mean(np.sum(diff**2, axis=1))))


def unit_amounts(x: np.ndarray, batch: np.ndarray, effect: float, seed: int) -> dict[str, float]:
    """Each non-additive injection's amount that moves a row by ``effect`` (RMS over rows).

    ``mixing``: exact (the move is linear in the amount). ``rotation``: a plane rotation by
    theta moves a point by 2 sin(theta / 2) times its distance from the axis, so theta =
    2 arcsin(effect / (2 RMS of the subspace part)), pi at most. ``power``: bisection on
    ``log_power`` in [0, POWER_LOG_MAX] (the cap when even that moves rows less).
    """
    xf = np.asarray(x, dtype=np.float64)
    names, b = _batches(batch)
    mu = xf.mean(axis=0)
    d = x.shape[1]
    moved = np.zeros(len(xf))
    for name, r in zip(names, _mixing_matrices(d, names.size, seed + 1)):
        rows = b == name
        moved[rows] = np.sum(((xf[rows] - mu) @ r) ** 2, axis=1)
    mix_unit = float(np.sqrt(moved.mean()))
    part = np.zeros(len(xf))
    for name, u in zip(names, _rotation_bases(d, names.size, seed + 2, ROTATION_DIMS)):
        rows = b == name
        part[rows] = np.sum(((xf[rows] - mu) @ u) ** 2, axis=1)
    rot_unit = float(np.sqrt(part.mean()))
    out = {
        "mixing": effect / mix_unit if mix_unit > 0 else 0.0,
        "rotation": 2.0 * math.asin(min(1.0, effect / (2.0 * rot_unit))) if rot_unit > 0 else 0.0,
    }
    lo, hi = 0.0, POWER_LOG_MAX
    if _rms_move(inject_power(x, batch, hi, seed + 3)[0], x) <= effect:
        out["power"] = hi
    else:
        for _ in range(30):
            mid = 0.5 * (lo + hi)
            if _rms_move(inject_power(x, batch, mid, seed + 3)[0], x) < effect:
                lo = mid
            else:
                hi = mid
        out["power"] = 0.5 * (lo + hi)
    return out


def inject(
    kind: str,
    x: np.ndarray,
    batch: np.ndarray,
    strength: float,
    effect: float,
    units: dict[str, float],
    seed: int,
) -> np.ndarray:
    """``x`` with injection ``kind`` at ``strength`` (see the module doc; seeds as there)."""
    if kind == "shift":
        return inject_shift(x, batch, strength * effect, seed + 2000)
    if kind == "mixing":
        return inject_mixing(x, batch, strength * units["mixing"], seed + 1)
    if kind == "rotation":
        return inject_rotation(x, batch, min(math.pi, strength * units["rotation"]), seed + 2)
    if kind == "power":
        return inject_power(x, batch, min(POWER_LOG_MAX, strength * units["power"]), seed + 3)[0]
    raise ValueError(f"unknown injection {kind!r}: one of {', '.join(INJECTIONS)}")


def _record(
    label: str,
    path: tuple[str, ...],
    kind: str,
    nulls: list[dict[str, Any]],
    injected: dict[str, dict[str, dict[str, Any]]],
    strongest: str,
) -> dict[str, Any]:
    """One metric's calibration on one variant: null, injected values, power and reason."""
    null_vals = np.array([get_path(r, path, number=True) for r in nulls])
    finite = np.isfinite(null_vals)
    rec: dict[str, Any] = {
        "kind": kind,
        "path": ".".join(path),  # where the figure lives in a variant's results
        "null": float(np.nanmean(null_vals)) if finite.any() else float("nan"),
        "null_sd": float(np.nanstd(null_vals, ddof=1)) if finite.sum() > 1 else float("nan"),
        "null_draws": int(finite.sum()),
        "null_values": [float(v) for v in null_vals],
        "injected": {
            f: {s: get_path(res, path, number=True) for s, res in by_s.items()}
            for f, by_s in injected.items()
        },
    }
    # Earlier readers: the shift's values under "strength", the power transform's strongest
    # value under "nonlinear".
    rec["strength"] = dict(rec["injected"].get("shift", {}))
    rec["nonlinear"] = rec["injected"].get("power", {}).get(strongest, float("nan"))
    tops = {f: vals.get(strongest, float("nan")) for f, vals in rec["injected"].items()}
    if not finite.any() or not any(math.isfinite(v) for v in tops.values()):
        rec["power"] = False
        res = next((r[strongest] for r in injected.values() if strongest in r), None)
        res = res if res is not None else (nulls[0] if nulls else {})
        rec["reason"] = f"{NO_POWER}: {_why_missing(res, path)}"
        return rec
    sd = rec["null_sd"] if math.isfinite(rec["null_sd"]) else 0.0
    margin = max(3.0 * sd, POWER_MIN_DIFF)
    moved = {f: abs(v - rec["null"]) for f, v in tops.items() if math.isfinite(v)}
    rec["margin"] = margin
    rec["moved"] = moved
    rec["direction"] = {f: float(np.sign(tops[f] - rec["null"])) for f in moved}
    rec["power_by_injection"] = {f: bool(m > margin) for f, m in moved.items()}
    rec["power"] = any(rec["power_by_injection"].values())
    if not rec["power"]:
        most = max(moved, key=moved.get)  # type: ignore[arg-type]
        rec["reason"] = (
            f"{NO_POWER}: at {strongest} x the median treatment effect no injected batch effect "
            f"moves it further than {moved[most]:.3f} ({most}) from its null "
            f"({rec['null']:.3f}), within {margin:.3f} (3 null SDs or {POWER_MIN_DIFF})"
        )
    return rec


def calibrate(
    features: np.ndarray,
    meta: pd.DataFrame,
    *,
    eval_mask: np.ndarray | None = None,
    strengths: Sequence[float] = STRENGTHS,
    null_draws: int = NULL_DRAWS,
    raw_null_draws: int | None = None,
    null_size: int = CALIBRATION_NULL_SIZE,
    seed: int = 0,
    name: str = "features",
    variants: Sequence[str] = VARIANTS,
    injections: Sequence[str] = INJECTIONS,
) -> dict[str, Any]:
    """Each metric's null value and its value under graded injected batch effects, per variant.

    See the module doc. ``features``/``meta`` as :func:`cdcl.metrics.score.evaluate_features`
    (canonical metadata); only the ``eval_mask`` rows (default all) are used. Every condition
    is a raw feature matrix scored on each of ``variants`` by ``evaluate_features``, which
    normalises it; the shift is scored on ``raw`` only. ``raw_null_draws`` (default
    ``null_draws``) scores only the first that many null draws on ``raw``, to save time.

    Returns:
        ``{"design", "conditions", "variants": {variant: {"metrics": {label: record},
        "no_power": [labels]}}, "no_power_by_variant", "metrics", "no_power"}`` (its wall time is the caller's: ``timings_s`` of the results);
        a record is ``{"kind", "path", "null", "null_sd", "null_draws", "null_values",
        "injected": {injection: {strength: value}}, "strength" (the shift's), "nonlinear",
        "margin", "moved", "direction", "power_by_injection", "power", "reason"}``.
        ``metrics``/``no_power`` repeat the raw variant's (the first variant's without raw),
        as earlier calibrations stored them.
    """
    variants = tuple(variants)
    unknown = [k for k in injections if k not in INJECTIONS]
    if unknown or not variants:
        raise ValueError(f"injections must be among {INJECTIONS} and variants non-empty")
    x, meta = _evaluated_rows(features, meta, eval_mask)
    treat = meta["treatment"].astype(str).to_numpy()
    batch = meta["batch"].astype(str).to_numpy()
    ctrl = meta["is_control"].to_numpy(bool)
    effect = median_treatment_effect(np.asarray(x, np.float64), treat, ctrl)
    raw_draws = null_draws if raw_null_draws is None else min(raw_null_draws, null_draws)
    # Dozens of evaluations of small matrices: one BLAS thread each. Threaded BLAS spends more
    # on its threads than on matrices this size (about 5x slower on a busy 2-core machine).
    threads = 1 if len(x) <= SINGLE_THREAD_MAX else None
    scorer = _ConditionScorer(meta, null_size, seed, name, threads)
    nulls = [permute_within_treatment(x, treat, seed + 1000 + i) for i in range(null_draws)]
    null_res = _null_results(scorer, nulls, variants, raw_draws)
    units = unit_amounts(nulls[0], batch, effect, seed)
    injected = _injected_results(
        scorer, nulls[0], batch, variants, injections, strengths, effect, units, seed
    )
    strongest = f"{max(strengths):g}"
    by_variant = {v: _variant_calibration(null_res[v], injected[v], strongest) for v in variants}
    first = "raw" if "raw" in by_variant else variants[0]
    return {
        "design": {
            "n_profiles": int(len(meta)),
            "n_batches": int(pd.Series(batch).nunique()),
            "n_treatments": int(pd.Series(treat[~ctrl]).nunique()),
            "median_treatment_effect": effect,
            "variant": first,
            "variants": list(variants),
        },
        "conditions": _conditions(null_draws, null_res, variants, strengths, injections, units),
        "variants": by_variant,
        "no_power_by_variant": {v: list(r["no_power"]) for v, r in by_variant.items()},
        "metrics": by_variant[first]["metrics"],
        "no_power": list(by_variant[first]["no_power"]),
    }


def _evaluated_rows(
    features: np.ndarray, meta: pd.DataFrame, eval_mask: np.ndarray | None
) -> tuple[np.ndarray, pd.DataFrame]:
    """The float32 profiles and metadata (fresh index) of the ``eval_mask`` rows (all if None)."""
    x = np.asarray(features, dtype=np.float32)
    meta = meta.reset_index(drop=True)
    if eval_mask is not None:
        keep = np.asarray(eval_mask, bool)
        x, meta = x[keep], meta.loc[keep].reset_index(drop=True)
    return x, meta


@dataclass(frozen=True)
class _ConditionScorer:
    """Scores one calibration condition's feature matrix on the design's rows, quietly."""

    meta: pd.DataFrame
    null_size: int
    seed: int
    name: str
    threads: int | None

    def __call__(self, xc: np.ndarray, cond: str, on: tuple[str, ...]) -> dict[str, Any]:
        """``evaluate_features`` of ``xc`` on the variants ``on``, named after ``cond``."""
        from cdcl.metrics.score import evaluate_features

        working_on(f"calibration, {cond}")  # named by the keep-alive line
        # The design notes (single-batch treatments ...) were printed for the real profiles.
        quiet = contextlib.redirect_stderr(io.StringIO())
        with np.errstate(all="ignore"), quiet, threadpool_limits(limits=self.threads):
            return evaluate_features(
                xc,
                self.meta,
                null_size=self.null_size,
                seed=self.seed,
                variants=on,
                name=f"{self.name} calibration {cond}",
                verbose=False,
            )


def _null_results(
    scorer: _ConditionScorer,
    nulls: list[np.ndarray],
    variants: tuple[str, ...],
    raw_draws: int,
) -> dict[str, list[dict[str, Any]]]:
    """Per variant, the results of every null draw scored on it (raw: the first ``raw_draws``)."""
    null_res: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for i, xn in enumerate(nulls):
        on = tuple(v for v in variants if v != "raw" or i < raw_draws)
        if on:
            res = scorer(xn, f"null {i}", on)
            for v in on:
                null_res[v].append(res[v])
    return null_res


def _injected_results(
    scorer: _ConditionScorer,
    x0: np.ndarray,
    batch: np.ndarray,
    variants: tuple[str, ...],
    injections: Sequence[str],
    strengths: Sequence[float],
    effect: float,
    units: dict[str, float],
    seed: int,
) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """``{variant: {injection: {strength: results}}}`` of null draw ``x0`` with each injection."""
    keys = [f"{s:g}" for s in strengths]
    injected: dict[str, dict[str, dict[str, dict[str, Any]]]] = {v: {} for v in variants}
    for kind in injections:
        on = variants if kind != "shift" else tuple(v for v in variants if v == "raw")
        if not on:
            continue
        for s, key in zip(strengths, keys):
            xi = inject(kind, x0, batch, s, effect, units, seed)
            res = scorer(xi, f"{kind} {key}", on)
            for v in on:
                injected[v].setdefault(kind, {})[key] = res[v]
    return injected


def _variant_calibration(
    nulls: list[dict[str, Any]],
    injected: dict[str, dict[str, dict[str, Any]]],
    strongest: str,
) -> dict[str, Any]:
    """One variant's ``{"metrics": {label: record}, "no_power": [labels]}``."""
    metrics = {
        label: _record(label, path, kind, nulls, injected, strongest)
        for label, path, kind in CALIBRATED
    }
    return {
        "metrics": metrics,
        "no_power": [label for label, rec in metrics.items() if not rec["power"]],
    }


def _conditions(
    null_draws: int,
    null_res: dict[str, list[dict[str, Any]]],
    variants: tuple[str, ...],
    strengths: Sequence[float],
    injections: Sequence[str],
    units: dict[str, float],
) -> dict[str, str]:
    """The calibration's conditions in words, with the amounts this design's unit gave."""
    return {
        "null": (
            f"each treatment's profiles permuted among its rows ({null_draws} draws; "
            + ", ".join(f"{v}: {len(null_res[v])}" for v in variants)
            + ")"
        ),
        "injected": (
            "null draw 0 with a per-batch effect added to the raw profiles before each "
            f"variant's normalisation, strengths s in {list(strengths)}: "
            + ", ".join(injections)
            + " (shift on raw only: per-plate standardisation removes it exactly)"
        ),
        "shift": (
            "per-batch shift of s x the median treatment effect along a random unit direction"
        ),
        "power": (
            "per batch z -> sign(z)|z|^p_b on standardised features, log p_b = s x "
            f"{units['power']:.3g} x u_b, u_b evenly over [-1, 1] (|log p_b| <= log 4)"
        ),
        "mixing": (
            f"per batch x -> mu + (x - mu)(I + s x {units['mixing']:.3g} R_b), R_b Gaussian "
            "/ sqrt(d)"
        ),
        "rotation": (
            f"per batch a random {ROTATION_DIMS}-dim subspace of x - mu rotated by s x "
            f"{units['rotation']:.3g} rad in each plane (at most pi)"
        ),
        "unit": "s = 1 moves a row by one median treatment effect (RMS over rows)",
        "power_rule": POWER_RULE,
    }


def _why_missing(res: dict[str, Any], path: tuple[str, ...]) -> str:
    """Why a metric has no value on this design (its note, or 'not computed')."""
    node: Any = res
    for key in path[:-1]:
        if isinstance(node, dict) and node.get("not_computable"):
            return str(node["not_computable"])
        node = node.get(key) if isinstance(node, dict) else None
    if isinstance(node, dict):
        note = node.get(f"{path[-1]}_note") or node.get("not_computable") or node.get("note")
        if note:
            return str(note)
    unavailable = res.get("unavailable", {}) if isinstance(res, dict) else {}
    key = ".".join(path[:-1]) or path[0]
    why = [str(v) for k, v in unavailable.items() if k.endswith(key)]
    return "not computed on this design" + (f" ({why[0]})" if why else "")


POOLED_RULE = (
    "per variant and metric, over the replicates where it is computable: the null mean and "
    "the injected value at the strongest strength of each injection are taken per replicate, "
    "their difference averaged over the replicates (mean shift); the null SD is pooled within "
    "replicates (sum of squared deviations from each replicate's null mean over the sum of "
    "draws - 1). Power when for some injection |mean shift| > max(3 x pooled null SD / "
    f"sqrt(replicates), {POWER_MIN_DIFF}): the single-replicate rule applied to the mean of "
    "the replicates' shifts"
)


def _variant_records(cal: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{variant: {label: record}}`` of one calibration (earlier ones: raw only)."""
    if isinstance(cal.get("variants"), dict):
        return {v: body.get("metrics", {}) for v, body in cal["variants"].items()}
    return {(cal.get("design") or {}).get("variant", "raw"): cal.get("metrics", {})}


def pooled_power(calibrations: list[dict[str, Any]]) -> dict[str, Any]:
    """Power of each (variant, metric) decided once from all replicates' calibrations.

    Rule (``POOLED_RULE``): for each injection, the shift at its strongest strength from the
    replicate's null mean is averaged over the replicates where the metric is computable;
    the metric has power on the variant when some injection's mean shift exceeds
    ``max(3 x pooled null SD / sqrt(n), POWER_MIN_DIFF)``, n those replicates and the null SD
    pooled within replicates. One replicate whose calibration fails or lacks power does not
    change the study's family: the evidence of all of them is weighed together.

    Returns:
        ``{"rule", "n_replicates", "variants": {variant: {label: {"power", "mean_shift",
        "pooled_null_sd", "margin", "n_replicates", "reason"?}}}, "no_power_by_variant",
        "no_power"}`` (``no_power``: the raw variant's, or the first variant's).
    """
    cals = [c for c in calibrations if isinstance(c, dict) and c]
    per: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for cal in cals:
        for v, metrics in _variant_records(cal).items():
            for label, rec in metrics.items():
                per.setdefault(v, {}).setdefault(label, []).append(rec)
    out_variants: dict[str, dict[str, Any]] = {}
    for v, labels in per.items():
        out_variants[v] = {label: _pooled_record(recs) for label, recs in labels.items()}
    no_power = {
        v: [label for label, r in recs.items() if not r["power"]]
        for v, recs in out_variants.items()
    }
    first = "raw" if "raw" in no_power else next(iter(no_power), None)
    return {
        "rule": POOLED_RULE,
        "n_replicates": len(cals),
        "variants": out_variants,
        "no_power_by_variant": no_power,
        "no_power": list(no_power.get(first, [])) if first else [],
    }


def _top_values(rec: dict[str, Any]) -> dict[str, float]:
    """Injection -> value at its strongest strength (earlier records: the shift's)."""
    injected = rec.get("injected") or {"shift": rec.get("strength") or {}}
    out = {}
    for kind, vals in injected.items():
        if vals:
            top = max(vals, key=float)
            v = vals[top]
            if isinstance(v, int | float) and math.isfinite(v):
                out[kind] = float(v)
    return out


def _pooled_record(recs: list[dict[str, Any]]) -> dict[str, Any]:
    """The pooled decision for one (variant, metric) over its replicates' records."""
    shifts: dict[str, list[float]] = {}
    ss, dof, used = 0.0, 0, 0
    for rec in recs:
        nulls = np.array([v for v in rec.get("null_values", []) if v is not None], dtype=float)
        nulls = nulls[np.isfinite(nulls)]
        tops = _top_values(rec)
        if nulls.size == 0 or not tops:
            continue
        used += 1
        mean = float(nulls.mean())
        ss += float(((nulls - mean) ** 2).sum())
        dof += nulls.size - 1
        for kind, v in tops.items():
            shifts.setdefault(kind, []).append(v - mean)
    out: dict[str, Any] = {"n_replicates": used}
    if not used:
        out["power"] = False
        reason = next((r.get("reason") for r in recs if r.get("reason")), None)
        out["reason"] = reason or f"{NO_POWER}: not computable in any replicate"
        return out
    sd = math.sqrt(ss / dof) if dof > 0 else 0.0
    margin = max(3.0 * sd / math.sqrt(used), POWER_MIN_DIFF)
    mean_shift = {k: float(np.mean(v)) for k, v in shifts.items()}
    out.update(pooled_null_sd=sd, margin=margin, mean_shift=mean_shift)
    out["power_by_injection"] = {k: bool(abs(m) > margin) for k, m in mean_shift.items()}
    out["power"] = any(out["power_by_injection"].values())
    if not out["power"]:
        most = max(mean_shift, key=lambda k: abs(mean_shift[k]))
        out["reason"] = (
            f"{NO_POWER}: over {used} replicate(s) the largest mean shift at the strongest "
            f"injected batch effect is {mean_shift[most]:+.3f} ({most}), within {margin:.3f} "
            f"(3 pooled null SDs / sqrt({used}) or {POWER_MIN_DIFF})"
        )
    return out
