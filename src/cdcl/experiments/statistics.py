"""Statistics across replicates: mean and t-interval per figure, paired differences, verdicts.

Pure functions over plain numbers. A replicate is one training + evaluation (one seed and/or one
held-out-batch fold); figures missing in a replicate (None or NaN) are left out, and a paired
difference uses only the replicates where both figures exist, so every result carries its ``n``.

When several replicates share a unit (seeds evaluated on the same held-out fold), the unit is
what is independent: figures are averaged within the unit first and the test runs on the unit
means, so ``n`` counts units. Holm's step-down adjustment guards a family of metrics, and the
minimum detectable difference says how large an effect the design could have found. An exact
sign-flip test over the same units gives a p-value that assumes no normality.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from scipy import stats

ALPHA = 0.05
CONFIDENCE = 0.95
PAIRED_TEST = "paired t-test (scipy.stats.ttest_rel), two-sided"
CI_METHOD = "95% t-interval across replicates: mean ± t(0.975, n-1) · sd / sqrt(n)"
WILCOXON_TEST = "Wilcoxon signed-rank (scipy.stats.wilcoxon), two-sided, when n >= 6"
WILCOXON_MIN_N = 6
SIGNFLIP_MAX_EXACT = 20  # up to this many units every sign assignment is enumerated (2^20)
SIGNFLIP_DRAWS = 100_000  # Monte Carlo draws above it
SIGNFLIP_SEED = 0
SIGNFLIP_TIE = 1e-9  # |sum| within this share of sum|d| of the observed one counts as a tie
SIGNFLIP_TEST = (
    "sign-flip (permutation) test of the mean paired difference over units, two-sided: the share "
    "of the 2^n assignments of signs to the n differences whose |mean| is at least the observed "
    "|mean| (ties, to within 1e-9 x mean|d|, count as at least as extreme; the observed "
    f"assignment is one of them), exact up to n = {SIGNFLIP_MAX_EXACT}; above, {SIGNFLIP_DRAWS} random "
    f"assignments (seed {SIGNFLIP_SEED}) and p = (1 + hits) / (1 + draws)"
)
UNIT_TEST = "paired t on fold means (scipy.stats.ttest_rel over per-fold averages), two-sided"
HOLM = "Holm step-down adjustment across the pre-declared metrics, per reference"
POWER = 0.8
MDD_METHOD = (
    "smallest mean paired difference detectable at the study's n (two-sided α, power 0.8), "
    "from the observed sd of the paired differences; exact noncentral t (scipy.stats.nct)"
)
BETTER, WORSE, NO_DIFFERENCE, TOO_FEW = (
    "better",
    "worse",
    "no detectable difference",
    "too few replicates",
)
# No unit holds the figure at all (e.g. it needs controls or two held-out batches per fold):
# more replicates of the same design would not help, unlike "too few replicates".
NOT_COMPUTABLE = "not computable on this design"


def _finite(v: Any) -> bool:
    return isinstance(v, int | float | np.integer | np.floating) and math.isfinite(float(v))


def clean(values: Iterable[Any]) -> np.ndarray:
    """The finite numbers of ``values`` as float64 (None, NaN and non-numbers dropped)."""
    return np.array([float(v) for v in values if _finite(v)], dtype=np.float64)


def t_interval(values: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Two-sided t confidence interval of the mean; (nan, nan) with fewer than 2 values."""
    n = len(values)
    if n < 2:
        return math.nan, math.nan
    mean = float(np.mean(values))
    sem = float(np.std(values, ddof=1)) / math.sqrt(n)
    if sem == 0.0:
        return mean, mean
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sem
    return mean - half, mean + half


def unit_means(values: Sequence[Any], units: Sequence[Any]) -> np.ndarray:
    """The mean of the finite values within each unit, units in order of first appearance."""
    if len(values) != len(units):
        raise ValueError(f"values and units need equal lengths, got {len(values)}, {len(units)}")
    groups: dict[Any, list[float]] = {}
    for v, u in zip(values, units):
        if _finite(v):
            groups.setdefault(u, []).append(float(v))
    return np.array([np.mean(g) for g in groups.values()], dtype=np.float64)


def shares_units(units: Sequence[Any] | None) -> bool:
    """Whether some unit holds more than one replicate (so replicates are not independent)."""
    return units is not None and len(set(units)) < len(units)


def summarise(
    values: Sequence[Any], confidence: float = CONFIDENCE, units: Sequence[Any] | None = None
) -> dict[str, Any]:
    """n, mean, sample standard deviation and the t confidence interval of the finite values.

    With ``units`` shared by several replicates, the statistics are over the unit means.
    """
    x = unit_means(values, units) if shares_units(units) else clean(values)
    n = len(x)
    lo, hi = t_interval(x, confidence)
    return {
        "n": n,
        "mean": float(np.mean(x)) if n else math.nan,
        "sd": float(np.std(x, ddof=1)) if n > 1 else math.nan,
        "ci_low": lo,
        "ci_high": hi,
    }


def paired(a: Sequence[Any], b: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """The pairs (a_i, b_i) where both are finite, as two arrays."""
    if len(a) != len(b):
        raise ValueError(f"paired figures need equal lengths, got {len(a)} and {len(b)}")
    keep = [i for i in range(len(a)) if _finite(a[i]) and _finite(b[i])]
    return (
        np.array([float(a[i]) for i in keep], dtype=np.float64),
        np.array([float(b[i]) for i in keep], dtype=np.float64),
    )


def sign_flip_p(
    diffs: Sequence[Any],
    max_exact: int = SIGNFLIP_MAX_EXACT,
    draws: int = SIGNFLIP_DRAWS,
    seed: int = SIGNFLIP_SEED,
) -> float:
    """Two-sided sign-flip p of the mean of ``diffs`` (see SIGNFLIP_TEST); nan when empty.

    Under the null of a distribution symmetric about zero every sign assignment is equally
    likely, so p is the share of assignments whose |sum| reaches the observed |sum|. With
    n ≤ ``max_exact`` all 2^n sums are enumerated (the smallest p is 2/2^n); above, ``draws``
    random assignments estimate it, counting the observed one: (1 + hits) / (1 + draws).
    """
    if max_exact > 24:  # 2^n sums in memory: 2^24 of them take 128 MiB
        raise ValueError(f"max_exact {max_exact}: enumerate at most 2^24 assignments")
    d = clean(diffs)
    n = len(d)
    if n == 0:
        return math.nan
    bound = abs(float(d.sum())) - SIGNFLIP_TIE * float(np.abs(d).sum())
    if n <= max_exact:
        sums = np.zeros(1)
        for x in d:  # every assignment of signs, doubling the list per difference
            sums = np.concatenate((sums + x, sums - x))
        return float(np.count_nonzero(np.abs(sums) >= bound)) / sums.size
    rng = np.random.default_rng(seed)
    hits, done, chunk = 0, 0, max(1, 2**22 // n)
    while done < draws:
        m = min(chunk, draws - done)
        signs = rng.integers(0, 2, size=(m, n), dtype=np.int8) * 2 - 1
        hits += int(np.count_nonzero(np.abs(signs @ d) >= bound))
        done += m
    return (1 + hits) / (1 + draws)


def verdict(
    mean_diff: float, p: float, n: int, lower_is_better: bool = False, alpha: float = ALPHA
) -> str:
    """better / worse / no detectable difference (at ``alpha``); too few replicates (n = 1), or
    not computable on this design (n = 0).

    Direction-aware: for a lower-is-better figure (batch-classifier accuracy) a negative
    difference is an improvement.
    """
    if n < 1:
        return NOT_COMPUTABLE
    if n < 2:
        return TOO_FEW
    if not (math.isfinite(p) and p < alpha) or mean_diff == 0.0:
        return NO_DIFFERENCE
    improves = mean_diff < 0 if lower_is_better else mean_diff > 0
    return BETTER if improves else WORSE


def detectable_power(effect: float, sd: float, n: int, alpha: float = ALPHA) -> float:
    """Power of the two-sided one-sample (paired) t-test to detect a mean ``effect`` at ``n``."""
    if n < 2 or not (math.isfinite(sd) and sd > 0):
        return math.nan
    df = n - 1
    crit = float(stats.t.ppf(1 - alpha / 2, df))
    ncp = effect / (sd / math.sqrt(n))
    upper = float(stats.nct.sf(crit, df, ncp))
    lower = float(stats.nct.cdf(-crit, df, ncp))
    # scipy returns nan for the far tail opposite a large noncentrality, where it is ~0.
    return upper + (lower if math.isfinite(lower) else 0.0)


def min_detectable_difference(
    sd: float, n: int, alpha: float = ALPHA, power: float = POWER
) -> float:
    """Smallest mean paired difference the two-sided t-test detects with ``power`` at ``n``.

    Solves power(δ) = ``power`` with the noncentral t distribution; nan when n < 2 or sd is
    not positive.
    """
    if n < 2 or not (math.isfinite(sd) and sd > 0):
        return math.nan
    from scipy.optimize import brentq

    se = sd / math.sqrt(n)

    def gap(c: float) -> float:
        return detectable_power(c * se, sd, n, alpha) - power

    # Power rises monotonically in the noncentrality: widen the bracket until it holds the
    # root (scipy's nct loses precision far out, so the bracket grows step by step).
    hi = 4.0
    while gap(hi) < 0:
        hi *= 1.5
        if hi > 1e3:
            return math.nan
    return float(brentq(gap, 1e-9, hi, xtol=1e-12) * se)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (as statsmodels' multipletests(method="holm")).

    Non-finite p-values are left out of the family and returned as nan.
    """
    idx = [i for i, p in enumerate(pvalues) if _finite(p)]
    out = [math.nan] * len(pvalues)
    m = len(idx)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda j: float(pvalues[j]))):
        running = max(running, min(1.0, (m - rank) * float(pvalues[i])))
        out[i] = running
    return out


def paired_difference(
    method: Sequence[Any],
    reference: Sequence[Any],
    lower_is_better: bool = False,
    alpha: float = ALPHA,
    confidence: float = CONFIDENCE,
    units: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """method − reference over complete replicate pairs: mean, sd, t CI, t and sign-flip p, verdict.

    With ``units`` (one per replicate) shared by several replicates, each unit's complete pairs
    are averaged first and the test runs on the unit means: ``n`` is the number of units and
    ``n_replicates`` the number of complete pairs behind them.
    """
    if units is not None and len(units) != len(method):
        raise ValueError(f"units need one entry per replicate, got {len(units)}")
    by_unit = shares_units(units)
    if by_unit:
        keep = [i for i in range(len(method)) if _finite(method[i]) and _finite(reference[i])]
        n_reps = len(keep)
        kept_units = [units[i] for i in keep]  # type: ignore[index]
        a = unit_means([method[i] for i in keep], kept_units)
        b = unit_means([reference[i] for i in keep], kept_units)
    else:
        a, b = paired(method, reference)
        n_reps = len(a)
    d = a - b
    n = len(d)
    lo, hi = t_interval(d, confidence)
    t_stat = p = math.nan
    if n >= 2 and np.any(d != 0.0):
        # scipy's own test, so the p-value is exactly the one the output names. Its warning on
        # nearly identical differences is dropped: n and sd_diff are reported next to p.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = stats.ttest_rel(a, b)
        t_stat, p = float(res.statistic), float(res.pvalue)
    elif n >= 2:
        t_stat, p = 0.0, 1.0  # identical figures in every replicate
    # The t-test's companion without a normality assumption (nan, like p, below 2 units).
    p_flip = sign_flip_p(d) if n >= 2 else math.nan
    p_w = math.nan
    if n >= WILCOXON_MIN_N and np.any(d != 0.0):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            p_w = float(stats.wilcoxon(a, b).pvalue)
    mean_diff = float(np.mean(d)) if n else math.nan
    sd_diff = float(np.std(d, ddof=1)) if n > 1 else math.nan
    return {
        "n": n,
        "n_replicates": n_reps,
        "unit": "fold" if by_unit else "replicate",
        "test": UNIT_TEST if by_unit else PAIRED_TEST,
        "mean_diff": mean_diff,
        "sd_diff": sd_diff,
        "ci_low": lo,
        "ci_high": hi,
        "t": t_stat,
        "p": p,
        "p_signflip": p_flip,
        "p_wilcoxon": p_w,
        "verdict": verdict(mean_diff, p, n, lower_is_better, alpha),
        "min_detectable_diff": min_detectable_difference(sd_diff, n, alpha),
        # The same nonzero difference in every replicate (common with count-based figures and
        # few replicates): scipy's t is infinite and p = 0, which overstates the evidence.
        "zero_variance": bool(n >= 2 and np.ptp(d) <= 1e-12 and abs(mean_diff) > 1e-12),
    }


def aggregate(
    figures: Sequence[dict[str, dict[str, Any]]],
    references: Sequence[str],
    lower_is_better: Iterable[str] = (),
    alpha: float = ALPHA,
    units: Sequence[Any] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Summaries and paired differences of ``figures`` (one ``{row: {metric: value}}`` per replicate).

    ``units`` (one per replicate, e.g. its fold) makes shared units the unit of replication.

    Rows and metrics are taken in order of first appearance; a row missing from a replicate
    counts as missing figures there. Returns (summary records, difference records), each record
    naming its row (``features``), ``metric`` and, for differences, ``reference``; cells without
    a single finite figure are left out.
    """
    lower = set(lower_is_better)
    rows: list[str] = []
    metrics: dict[str, None] = {}
    for rep in figures:
        for row, vals in rep.items():
            if row not in rows:
                rows.append(row)
            metrics.update(dict.fromkeys(vals))

    def series(row: str, metric: str) -> list[Any]:
        return [rep.get(row, {}).get(metric) for rep in figures]

    summary: list[dict[str, Any]] = []
    for row in rows:
        for metric in metrics:
            s = summarise(series(row, metric), units=units)
            if s["n"]:
                summary.append(
                    {"features": row, "metric": metric, "lower_is_better": metric in lower, **s}
                )
    diffs: list[dict[str, Any]] = []
    for ref in references:
        if ref not in rows:
            continue
        for row in rows:
            if row == ref:
                continue
            for metric in metrics:
                d = paired_difference(
                    series(row, metric), series(ref, metric), metric in lower, alpha, units=units
                )
                if d["n"]:
                    diffs.append(
                        {
                            "features": row,
                            "reference": ref,
                            "metric": metric,
                            "lower_is_better": metric in lower,
                            **d,
                        }
                    )
    return summary, diffs


BOOTSTRAP_METHOD = (
    "95% percentile interval of a bootstrap over compounds (the same compounds drawn for both "
    "rows and every replicate), {n_boot} resamples"
)


def compound_bootstrap_difference(
    method: Sequence[dict[str, tuple[float, float]]],
    reference: Sequence[dict[str, tuple[float, float]]],
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> dict[str, Any]:
    """Mean over replicates of method − reference accuracy, with a bootstrap CI over compounds.

    Each replicate gives, per row, ``{compound: (correct, answered)}`` (per-query outcomes
    summed per compound, e.g. NSCB queries or probe predictions). One bootstrap draw resamples
    the compounds present in any replicate with replacement and recomputes every replicate's
    accuracy (Σ correct / Σ answered over the drawn compounds) for both rows; the statistic is
    the mean paired difference over replicates. This interval covers the compounds a study
    happens to contain, which an interval over replicates does not when every replicate
    evaluates the same compounds.
    """
    if len(method) != len(reference) or not method:
        raise ValueError("method and reference need the same, non-zero number of replicates")
    compounds = sorted({c for rep in (*method, *reference) for c in rep})
    index = {c: i for i, c in enumerate(compounds)}

    def counts(reps: Sequence[dict[str, tuple[float, float]]]) -> tuple[np.ndarray, np.ndarray]:
        hit = np.zeros((len(reps), len(compounds)))
        tot = np.zeros((len(reps), len(compounds)))
        for r, rep in enumerate(reps):
            for c, (h, n) in rep.items():
                hit[r, index[c]], tot[r, index[c]] = h, n
        return hit, tot

    hm, nm = counts(method)
    hr, nr = counts(reference)

    def statistic(w: np.ndarray) -> np.ndarray:
        # w: (draws, compounds) multiplicities; accuracy per draw and replicate.
        with np.errstate(invalid="ignore", divide="ignore"):
            am = (w @ hm.T) / (w @ nm.T)
            ar = (w @ hr.T) / (w @ nr.T)
        return np.nanmean(am - ar, axis=1)

    point = float(statistic(np.ones((1, len(compounds))))[0])
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(compounds), size=(n_boot, len(compounds)))
    w = np.zeros((n_boot, len(compounds)))
    np.add.at(w, (np.arange(n_boot)[:, None], draws), 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a draw without answered queries
        boot = statistic(w)
    boot = boot[np.isfinite(boot)]
    tail = (1 - confidence) / 2
    lo, hi = (
        (float(np.quantile(boot, tail)), float(np.quantile(boot, 1 - tail)))
        if boot.size
        else (math.nan, math.nan)
    )
    return {
        "mean_diff": point,
        "ci_low": lo,
        "ci_high": hi,
        "n_compounds": len(compounds),
        "n_boot": int(boot.size),
        "interval": BOOTSTRAP_METHOD.format(n_boot=n_boot),
    }


def per_compound(
    compounds: Sequence[Any], hits: Sequence[Any], answered: Sequence[Any] | None = None
) -> dict[str, tuple[float, float]]:
    """``{compound: (correct, answered)}`` from per-query (or per-label) outcomes."""
    answered = [1] * len(hits) if answered is None else answered
    out: dict[str, tuple[float, float]] = {}
    for c, h, n in zip(compounds, hits, answered):
        prev = out.get(str(c), (0.0, 0.0))
        out[str(c)] = (prev[0] + float(h), prev[1] + float(n))
    return out
