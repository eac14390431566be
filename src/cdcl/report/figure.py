"""The results figure: one row per feature set, metrics grouped as in scib-metrics, a total.

Every bar and every total is on a fixed range, never rescaled over the rows shown: each metric
is a score in [0, 1] (1 = best; for the batch classifier, where lower is better, the bar is
1 - accuracy), and the aggregate is the one stored in results.json
(:func:`cdcl.metrics.score.aggregate_scores`), so a feature set's total is the same in its own
report, in the demo and in ``compare.html``. Columns that the calibration found without power
on the design are greyed and stay out of the total; a metric that cannot be computed on the
design is empty and stays out too.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from cdcl.metrics.info import BATCH, BIO, info_for
from cdcl.metrics.score import AGGREGATE_BATCH, AGGREGATE_BIO

BASELINE_SETS = ("random network", "intensity stats", "random", "intensity")
WEIGHTS = ((BATCH, 0.4), (BIO, 0.6))  # scib's aggregate weighting
TOTAL = "total"
# The figure's metrics (one per idea: no macro F1 or share-significant twins); the full table
# below it keeps every figure.
FIGURE_METRICS = {
    ("online_probe", "accuracy"),
    ("classification", "logistic", "accuracy"),
    ("classification", "knn", "accuracy"),
    ("moa_matching", "nsc"),
    ("moa_matching", "nscb"),
    ("map", "replicate_batch_aware", "map"),
    ("map", "moa", "map"),
    ("map", "moa_batch_aware", "map"),
    ("kbet", "acceptance_rate"),
    ("kbet", "per_treatment_mean"),
    ("mixing_per_treatment", "kbet"),
    ("ilisi", "ilisi"),
    ("mixing_per_treatment", "ilisi"),
    ("mixing_per_treatment", "batch_silhouette"),
    ("mixing_per_treatment", "graph_connectivity"),
    ("silhouette", "batch_scib"),
    ("batch_classifier", "accuracy"),
}
# Path -> aggregate component (kBET per treatment is stored under two paths).
COMPONENT = {
    **{p: k for k, p in AGGREGATE_BATCH.items()},
    **{p: k for k, p in AGGREGATE_BIO.items()},
    ("kbet", "per_treatment_mean"): "kbet_per_treatment",
}
SAME_AS_BASELINE_TOL = 0.01  # every headline figure this close to a baseline's: no signal


def fmt(v: Any) -> str:
    """A figure with 3 decimals, – for a missing one, escaped text otherwise."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}"
    return html.escape(str(v))


def learned_sets(names: list[str]) -> list[str]:
    """The trained representations among feature-set names (not baselines, not corrections)."""
    return [n for n in names if n not in BASELINE_SETS and "+" not in n]


def fixed_score(value: Any, higher_is_better: bool) -> float:
    """A metric's bar on its fixed [0, 1] range (1 = best); NaN when there is no value."""
    v = pd.to_numeric(value, errors="coerce")
    if v is None or not np.isfinite(v):
        return float("nan")
    v = float(np.clip(v, 0.0, 1.0))
    return v if higher_is_better else 1.0 - v


def frame_totals(
    frame: pd.DataFrame, paths: dict[str, tuple[str, ...]], greyed: dict[str, str]
) -> pd.DataFrame:
    """Group means and total of each row, from the aggregate's components among the columns.

    Used where no stored aggregate is at hand; the same rule as the stored one.
    """
    cols: dict[str, dict[str, str]] = {BATCH: {}, BIO: {}}
    for c in frame.columns:
        comp = COMPONENT.get(tuple(paths.get(c, ())))
        if comp is not None and c not in greyed:
            cols[BATCH if comp in AGGREGATE_BATCH else BIO].setdefault(comp, c)
    out = pd.DataFrame(index=frame.index)
    for g, chosen in cols.items():
        vals = frame[list(chosen.values())].apply(pd.to_numeric, errors="coerce")
        out[g] = vals.mean(axis=1, skipna=True) if chosen else np.nan
    out[TOTAL] = sum(out[g] * w for g, w in WEIGHTS)
    return out


def stored_totals(results: dict[str, Any], variant: str) -> pd.DataFrame:
    """Group means and total of each feature set as stored in results.json (``aggregate``)."""
    rows = {}
    for name, res in (results.get("feature_sets") or {}).items():
        agg = (res.get(variant) or {}).get("aggregate") if isinstance(res, dict) else None
        if isinstance(agg, dict):
            rows[name] = {
                BATCH: agg.get("batch_mean"),
                BIO: agg.get("bio_mean"),
                TOTAL: agg.get("score"),
            }
    frame = pd.DataFrame.from_dict(rows, orient="index", columns=[BATCH, BIO, TOTAL])
    return frame.apply(pd.to_numeric, errors="coerce")


def greyed_columns(
    results: dict[str, Any], paths: dict[str, tuple[str, ...]], variant: str | None = None
) -> dict[str, str]:
    """Figure column -> the calibration's reason, for metrics without power on the design.

    ``variant``: that variant's verdicts where the calibration has them; else (and by
    default) the top-level ones, the raw variant's.
    """
    reasons = {}
    for res in (results.get("feature_sets") or {}).values():
        cal = res.get("calibration") if isinstance(res, dict) else None
        body = ((cal or {}).get("variants") or {}).get(variant) if variant else None
        body = body if isinstance(body, dict) else cal
        for label in (body or {}).get("no_power", []):
            rec = body["metrics"][label]
            # A metric with no null value is not computable here: empty, explained as such.
            null = rec.get("null")
            if rec.get("path") and isinstance(null, int | float) and math.isfinite(null):
                reasons[rec["path"]] = str(rec.get("reason", "no power in this design"))
    return {
        c: reasons[".".join(p)]
        for c, p in paths.items()
        if tuple(p) in FIGURE_METRICS and ".".join(p) in reasons
    }


def _bar(value: Any, score: float, cls: str = "bar") -> str:
    width = 0.0 if not np.isfinite(score) else 100.0 * float(score)
    return f'<div class="{cls}"><i style="width:{width:.0f}%"></i><span>{fmt(value)}</span></div>'


def _groups(frame: pd.DataFrame, paths: dict[str, tuple[str, ...]]) -> dict[str, list[str]]:
    """The figure's columns of each group (batch removal, biology conservation), in order."""
    groups = {g: [] for g in (BATCH, BIO)}
    for c in frame.columns:
        info = info_for(paths.get(c, ()))
        if info is not None and info.group in groups:
            groups[info.group].append(c)
    return {g: cols for g, cols in groups.items() if cols}


def _head(col: str, paths: dict[str, tuple[str, ...]], greyed: dict[str, str]) -> str:
    arrow = "↑" if info_for(paths[col]).higher_is_better else "↓"
    sigma = "<sup>Σ</sup>" if tuple(paths[col]) in COMPONENT else ""
    cls = ' class="grey"' if col in greyed else ""
    return f"<th{cls}>{html.escape(col)} {arrow}{sigma}</th>"


def results_figure_html(
    frame: pd.DataFrame,
    paths: dict[str, tuple[str, ...]],
    totals: pd.DataFrame | None = None,
    greyed: dict[str, str] | None = None,
) -> str:
    """The scib-style results table: metrics grouped into batch removal and biology conservation,
    a bar per value on its fixed [0, 1] range, and per row the group means and 0.4/0.6 total.

    ``totals`` (group means and total per row, e.g. :func:`stored_totals`) default to the same
    rule applied to the columns shown; ``greyed`` columns (no power) are drawn grey.
    """
    shown = [c for c in frame.columns if tuple(paths.get(c, ())) in FIGURE_METRICS]
    frame = frame[shown or list(frame.columns)]
    greyed = greyed or {}
    groups = _groups(frame, paths)
    if frame.empty or not groups:
        return ""
    agg = totals if totals is not None else frame_totals(frame, paths, greyed)
    agg = agg.reindex(index=frame.index, columns=[BATCH, BIO, TOTAL])
    top = "".join(
        f'<th class="grp" colspan="{len(c)}">{html.escape(g)}</th>' for g, c in groups.items()
    )
    top = f'<tr><th></th>{top}<th class="grp" colspan="3">aggregate</th></tr>'
    heads = "".join(_head(c, paths, greyed) for cols in groups.values() for c in cols)
    heads += "".join(f"<th>{html.escape(c)}</th>" for c in agg.columns)
    rows = [top, f"<tr><th>features</th>{heads}</tr>"]
    order = agg.sort_values([TOTAL, BIO], ascending=False, na_position="last").index
    for name in order:
        cells = ""
        for c in (c for cols in groups.values() for c in cols):
            score = fixed_score(frame.at[name, c], info_for(paths[c]).higher_is_better)
            cls = ' class="grey"' if c in greyed else ""
            cells += f"<td{cls}>{_bar(frame.at[name, c], score)}</td>"
        cells += "".join(
            f"<td>{_bar(agg.at[name, c], agg.at[name, c], 'bar agg')}</td>" for c in agg.columns
        )
        rows.append(f"<tr><td>{html.escape(str(name))}</td>{cells}</tr>")
    return '<table class="fig">' + "".join(rows) + "</table>" + _caption(greyed)


def _caption(greyed: dict[str, str]) -> str:
    """What the bars and totals mean, and why each greyed column is grey."""
    text = (
        '<p class="small">Bars: each metric on its fixed 0–1 range (full = 1, the best value; '
        "for the batch classifier, where lower is better, the bar is 1 − accuracy), not "
        "rescaled over the rows shown. Aggregate: the mean of the metrics marked Σ in each "
        "group, total = 0.4 × batch removal + 0.6 × biology conservation (scib-metrics' "
        "weighting), as stored in results.json: a row's total is the same in every report "
        "and in compare.html. Metrics not computable on this design (empty) and metrics "
        "without power (grey) are left out of it. Rows sorted by total.</p>"
    )
    if greyed:
        items = "".join(
            f"<li>{html.escape(c)}: {html.escape(why)}</li>" for c, why in greyed.items()
        )
        text += f'<p class="small">Grey (calibration): </p><ul class="small">{items}</ul>'
    return text


def glossary_html(labels: list[str], paths: dict[str, tuple[str, ...]]) -> str:
    """One row per metric shown: its group, better direction, chance/null value and meaning."""
    rows = [
        "<tr><th>metric</th><th>group</th><th>better</th><th>chance / null</th><th>meaning</th></tr>"
    ]
    for lab in labels:
        info = info_for(paths.get(lab, ()))
        if info is None:
            continue
        better = "higher" if info.higher_is_better else "lower"
        rows.append(
            f"<tr><td>{html.escape(lab)}</td><td>{html.escape(info.group or '–')}</td>"
            f"<td>{better}</td><td>{html.escape(info.null)}</td>"
            f"<td>{html.escape(info.meaning)}</td></tr>"
        )
    return '<table class="gloss">' + "".join(rows) + "</table>" if len(rows) > 1 else ""


def indistinguishable_warnings(
    frame: pd.DataFrame,
    learned: list[str],
    baselines: tuple[str, ...] = BASELINE_SETS,
    tol: float = SAME_AS_BASELINE_TOL,
) -> list[str]:
    """A line for each learned row whose every figure is within ``tol`` of a baseline row's."""
    lines = []
    for name in (n for n in learned if n in frame.index):
        a = pd.to_numeric(frame.loc[name], errors="coerce")
        for base in (b for b in baselines if b in frame.index and b != name):
            b = pd.to_numeric(frame.loc[base], errors="coerce")
            both = a.notna() & b.notna()
            if both.sum() >= 2 and ((a[both] - b[both]).abs() <= tol).all():
                lines.append(
                    f"{name} cannot be told apart from {base}: every one of its {int(both.sum())} "
                    f"figures is within {tol} of it. Training has produced nothing these metrics "
                    "see (a longer budget usually helps)."
                )
    return lines


def summary_html(
    frame: pd.DataFrame,
    paths: dict[str, tuple[str, ...]],
    learned: list[str],
    baselines: tuple[str, ...] = BASELINE_SETS,
    *,
    totals: pd.DataFrame | None = None,
    greyed: dict[str, str] | None = None,
    warnings: Sequence[str] = (),
) -> str:
    """Warnings, the results figure and the metric glossary for one table of feature sets.

    ``warnings`` (the design banner, the chance warning) come first, then the rows that
    equal a baseline; ``totals`` and ``greyed`` go to :func:`results_figure_html`.
    """
    lines = [*warnings, *indistinguishable_warnings(frame, learned, baselines)]
    warn = "".join(
        f'<p class="warn"><b>Warning.</b> {html.escape(w)}</p>' for w in dict.fromkeys(lines)
    )
    return (
        warn
        + results_figure_html(frame, paths, totals, greyed)
        + "<h3>What the metrics mean</h3>"
        + glossary_html([c for c in frame.columns], paths)
    )
