"""Variance components of a nested design (e.g. batch > plate > well > cell), fitted by REML.

For every feature, the random-effects model

    y = mu + a_batch + b_plate(batch) + c_well(plate) + e,

with independent normal effects of variances ``var_batch``, ``var_plate``, ``var_well`` and
``var_residual``, is fitted by restricted maximum likelihood (statsmodels' ``MixedLM``). REML
estimates the variances of the population the design samples from, so two screens laid out
differently estimate the same quantities (with different precision); sum-of-squares shares and
neighbourhood measures such as kBET move with the numbers of plates, wells and cells instead.

A factor is fitted only when the design can separate it from its neighbours: it needs at least
``MIN_DF`` degrees of freedom (its number of levels minus its parent's). Otherwise

- a factor with as many levels as its parent (one well per plate; one batch) is the same
  partition: its variance is carried by the parent, or is not observable at all when there is
  no parent (a single batch);
- a factor with fewer than ``MIN_DF`` extra levels (two batches: a single contrast) cannot be
  told apart from the variance of the level below it, which carries it.

The report names, for each factor, its levels, its degrees of freedom and which component
carries it. Pure functions: arrays in, dictionaries out.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

# One contrast (2 levels) leaves a variance with a chi-square(1) error: its 95% interval spans
# a factor of about 1000, so it is reported as not separable rather than as a number.
MIN_DF = 2
RESIDUAL = "residual"


def nested_codes(factors: Mapping[str, ArrayLike]) -> dict[str, np.ndarray]:
    """Integer codes of each factor nested in the ones before it (outermost first).

    A well named ``A01`` on two plates is two levels: each level is the tuple of its own and
    all outer factors' labels.
    """
    codes: dict[str, np.ndarray] = {}
    key: pd.Series | None = None
    for name, labels in factors.items():
        part = pd.Series(np.asarray(labels).astype(str))
        key = part if key is None else key + "\x1f" + part
        codes[name] = pd.factorize(key)[0].astype(np.int64)
    return codes


def _carriers(names: list[str], levels: list[int], fitted: list[bool]) -> dict[str, str | None]:
    """The component carrying each factor's variance: itself when fitted; else see the module."""
    carrier: dict[str, str | None] = {}
    for k, name in enumerate(names):
        if fitted[k]:
            carrier[name] = name
        elif levels[k] == (levels[k - 1] if k else 1):  # the same partition as its parent
            carrier[name] = carrier[names[k - 1]] if k else None
        else:
            finer = [names[j] for j in range(k + 1, len(names)) if fitted[j]]
            carrier[name] = finer[0] if finer else RESIDUAL
    return carrier


def design_table(factors: Mapping[str, ArrayLike]) -> dict[str, dict[str, Any]]:
    """Per factor: levels, degrees of freedom, whether it is fitted and what carries it.

    ``in`` names the fitted component (or ``residual``) that carries the factor's variance;
    it is the factor itself when fitted and ``None`` when the variance is not observable.
    """
    codes = nested_codes(factors)
    names = list(codes)
    levels = [int(codes[n].max()) + 1 for n in names]
    dfs = [levels[k] - (levels[k - 1] if k else 1) for k in range(len(names))]
    fitted = [df >= MIN_DF for df in dfs]
    carrier = _carriers(names, levels, fitted)
    return {
        name: {"levels": levels[k], "df": dfs[k], "fitted": fitted[k], "in": carrier[name]}
        for k, name in enumerate(names)
    }


def _vc_spec(groups: np.ndarray, inner: Mapping[str, np.ndarray]) -> Any:
    """statsmodels' variance-component spec: per inner factor and group, level indicators."""
    from statsmodels.regression.mixed_linear_model import VCSpec

    group_ids = np.unique(groups)
    names, colnames, mats = [], [], []
    for name, codes in inner.items():
        cols, blocks = [], []
        for g in group_ids:
            levels = np.unique(codes[groups == g])
            cols.append([f"{name}{v}" for v in levels])
            blocks.append((codes[groups == g][:, None] == levels[None, :]).astype(np.float64))
        names.append(name)
        colnames.append(cols)
        mats.append(blocks)
    return VCSpec(names, colnames, mats)


# Two optimisers, and the fit with the higher restricted likelihood is kept: L-BFGS reaches a
# variance of exactly zero on the boundary, where statsmodels' default (BFGS) stops short, but
# it can also report convergence at a worse point or step to a singular covariance (seen on
# LINCS and BBBC021 features); Powell (no gradient) is slower and does not fail there.
OPTIMISERS = ("lbfgs", "powell")


def _fit_reml(model: Any) -> Any:
    """The REML fit with the highest restricted likelihood over ``OPTIMISERS`` (converged ones
    first)."""
    fits, errors = [], []
    for method in OPTIMISERS:
        try:
            with warnings.catch_warnings():
                # a variance estimated at zero is a result here (a component absent from the
                # data), which statsmodels reports as a boundary / convergence warning
                warnings.simplefilter("ignore")
                fits.append(model.fit(reml=True, method=[method]))
        except (np.linalg.LinAlgError, ValueError) as e:
            errors.append(f"{method}: {e}")
    if not fits:
        raise np.linalg.LinAlgError("REML fit failed: " + "; ".join(errors))
    return max(fits, key=lambda r: (bool(r.converged), r.llf))


def fit_feature(y: ArrayLike, fitted: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """REML variances of one feature for the ``fitted`` nested factors (outermost first).

    The outermost factor is the model's grouping (a random intercept per level), the inner
    ones variance components within it. Returns each factor's variance, ``residual`` and
    whether the optimiser converged.
    """
    from statsmodels.regression.mixed_linear_model import MixedLM

    y = np.asarray(y, dtype=np.float64)
    if not fitted:
        return {RESIDUAL: float(np.var(y, ddof=1)), "converged": True}
    names = list(fitted)
    groups = fitted[names[0]]
    inner = {n: fitted[n] for n in names[1:]}
    ones = np.ones((len(y), 1))
    model = MixedLM(
        y, ones, groups=groups, exog_re=ones, exog_vc=_vc_spec(groups, inner) if inner else None
    )
    res = _fit_reml(model)
    out: dict[str, Any] = {names[0]: float(np.asarray(res.cov_re)[0, 0])}
    out.update({n: float(v) for n, v in zip(names[1:], np.atleast_1d(res.vcomp))})
    out[RESIDUAL] = float(res.scale)
    out["converged"] = bool(res.converged)
    return out


def shares(variances: Mapping[str, float]) -> dict[str, float]:
    """Each component's variance over their sum (the total variance of one observation)."""
    comps = {k: max(float(v), 0.0) for k, v in variances.items() if k != "converged"}
    total = sum(comps.values())
    return {k: (v / total if total > 0 else float("nan")) for k, v in comps.items()}


def variance_components(
    features: ArrayLike,
    factors: Mapping[str, ArrayLike],
    feature_names: list[str] | None = None,
) -> dict[str, Any]:
    """REML variance components of every feature, and their median shares over features.

    ``factors`` maps factor names to per-row labels, outermost first (e.g. batch, plate,
    well); the residual is the variation of rows within the innermost factor. Each feature is
    z-scored first (shares do not depend on its scale); constant features are skipped.
    Returns ``design`` (:func:`design_table`), ``per_feature`` (variances and shares),
    ``median_share`` per component, ``n`` rows and ``n_features``.
    """
    x = np.asarray(features, dtype=np.float64)
    names = feature_names or [f"f{j}" for j in range(x.shape[1])]
    design = design_table(factors)
    codes = nested_codes(factors)
    fitted = {n: codes[n] for n, d in design.items() if d["fitted"]}
    per_feature: dict[str, dict[str, Any]] = {}
    for j, name in enumerate(names):
        col = x[:, j]
        sd = col.std()
        if not sd > 0:
            continue
        var = fit_feature((col - col.mean()) / sd, fitted)
        per_feature[name] = {"variance": var, "share": shares(var)}
    components = [*fitted, RESIDUAL]
    median = {
        c: float(np.median([f["share"][c] for f in per_feature.values()])) for c in components
    }
    return {
        "design": design,
        "components": components,
        "median_share": median,
        "per_feature": per_feature,
        "n": int(len(x)),
        "n_features": len(per_feature),
    }
