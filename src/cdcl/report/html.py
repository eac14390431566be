"""Plots and the self-contained HTML report of an evaluation, and side-by-side comparison of runs.

- UMAP of well profiles coloured by batch and by treatment/MoA (the paper's Figure 1), with a
  fixed random state (umap-learn; PCA when there are too few points for a neighbour graph);
- training curves from ``metrics.jsonl``;
- a metrics table (headline figures of every feature set, raw and plate-normalised);
- ``report.html`` with every image inlined as a base64 PNG (no external resources), plus the
  PNGs next to it; :func:`compare` puts several results directories side by side.
"""

from __future__ import annotations

import contextlib
import html
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cdcl.data.dataset_dir import atomic_write_text
from cdcl.errors import CdclError
from cdcl.report.chance import RANDOM_SETS, VARIANT_TEXT, chance_warnings
from cdcl.report.design import design_banner, design_lines
from cdcl.report.figure import (  # noqa: F401  (re-exported: the report's figure API)
    BASELINE_SETS,
    FIGURE_METRICS,
    SAME_AS_BASELINE_TOL,
    WEIGHTS,
    glossary_html,
    greyed_columns,
    indistinguishable_warnings,
    learned_sets,
    results_figure_html,
    stored_totals,
    summary_html,
)
from cdcl.report.figure import fmt as _fmt
from cdcl.report.page import frame_html, img_html, write_html
from cdcl.report.plot_sample import DEFAULT_PLOT_SAMPLE, stratified_plot_rows
from cdcl.report.results import read_results
from cdcl.schema import get_path

# (label, path inside a variant's results, higher is better?)
HEADLINE: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("logistic probe accuracy", ("classification", "logistic", "accuracy"), True),
    ("logistic probe macro F1", ("classification", "logistic", "macro_f1"), True),
    ("kNN accuracy", ("classification", "knn", "accuracy"), True),
    ("kNN macro F1", ("classification", "knn", "macro_f1"), True),
    ("NSC", ("moa_matching", "nsc"), True),
    ("NSCB", ("moa_matching", "nscb"), True),
    ("kBET acceptance", ("kbet", "acceptance_rate"), True),
    ("kBET acceptance per treatment", ("kbet", "per_treatment_mean"), True),
    ("iLISI (scaled)", ("ilisi", "ilisi"), True),
    ("iLISI per treatment", ("mixing_per_treatment", "ilisi"), True),
    ("batch 1-|s| per treatment", ("mixing_per_treatment", "batch_silhouette"), True),
    ("graph connectivity", ("mixing_per_treatment", "graph_connectivity"), True),
    ("batch silhouette 1-|s_i| (scib)", ("silhouette", "batch_scib"), True),
    ("treatment silhouette", ("silhouette", "treatment"), True),
    ("MoA silhouette", ("silhouette", "moa"), True),
    ("GRIT (mean)", ("grit", "mean_grit"), True),
    ("replicate mAP", ("map", "replicate", "map"), True),
    ("replicate retrieved (p<0.05)", ("map", "replicate", "fraction_significant"), True),
    ("replicate mAP, batch-aware", ("map", "replicate_batch_aware", "map"), True),
    (
        "replicate retrieved, batch-aware",
        ("map", "replicate_batch_aware", "fraction_significant"),
        True,
    ),
    ("MoA mAP", ("map", "moa", "map"), True),
    ("MoA retrieved (p<0.05)", ("map", "moa", "fraction_significant"), True),
    ("MoA mAP, batch-aware", ("map", "moa_batch_aware", "map"), True),
    ("MoA retrieved, batch-aware", ("map", "moa_batch_aware", "fraction_significant"), True),
    ("batch classifier accuracy", ("batch_classifier", "accuracy"), False),
    ("batch classifier chance", ("batch_classifier", "chance"), False),
    ("scib-style aggregate (0.4 batch + 0.6 bio)", ("aggregate", "score"), True),
)
ONLINE_PROBE = (
    ("online probe accuracy", ("online_probe", "accuracy"), True),
    ("online probe macro F1", ("online_probe", "macro_f1"), True),
)


def metrics_long(results: dict[str, Any], run: str = "") -> pd.DataFrame:
    """Headline figures as a long table: run, set, variant, metric, value, higher_is_better."""
    rows = []
    for set_name, res in (results.get("feature_sets") or {}).items():
        for variant in ("raw", "plate_normalized"):
            if variant not in res:
                continue
            for label, path, hib in HEADLINE:
                v = get_path(res[variant], path)
                if isinstance(v, int | float) or v is None:
                    rows.append((run, set_name, variant, label, v, hib))
        for label, path, hib in ONLINE_PROBE:
            v = get_path(res, path)
            if isinstance(v, int | float):
                rows.append((run, set_name, "images", label, v, hib))
    return pd.DataFrame(
        rows, columns=["run", "set", "variant", "metric", "value", "higher_is_better"]
    )


def metrics_table(results: dict[str, Any], run: str = "") -> pd.DataFrame:
    """Headline figures pivoted: one row per metric, one column per (set, variant)."""
    long = metrics_long(results, run)
    if long.empty:
        return pd.DataFrame()
    order = [lab for lab, _, _ in ONLINE_PROBE + HEADLINE]
    long["col"] = long["set"] + " | " + long["variant"]
    cols = list(dict.fromkeys(long["col"]))
    table = long.pivot_table(
        index="metric", columns="col", values="value", aggfunc="first", dropna=False
    )
    table = table.reindex([m for m in order if m in table.index])
    return table.reindex(columns=cols)


# ---------------------------------------------------------------- plotting


def _plt() -> Any:
    # pyplot is imported only after the backend is set, and only when a figure is drawn.
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    return plt


# Below this many points the layout is the first two principal components: a UMAP of a few
# dozen points is a near-complete neighbour graph that shows little, and the first UMAP of a
# process costs a minute of numba compilation on a 2-core machine (68 s measured).
UMAP_MIN_POINTS = 100


def projection_name(n: int) -> str:
    """The layout :func:`umap_coords` draws for ``n`` points: UMAP, or PCA below the minimum."""
    return "UMAP" if n >= UMAP_MIN_POINTS else "PCA"


def umap_coords(
    profiles: np.ndarray, seed: int = 0, n_epochs: int = 200, n_neighbors: int = 15
) -> np.ndarray:
    """2-D UMAP of profiles (standardised per feature first), fixed random state.

    Below ``UMAP_MIN_POINTS`` points: the first two principal components (see
    :func:`projection_name`).
    """
    x = np.asarray(profiles, dtype=np.float32)
    sd = x.std(axis=0)
    x = (x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    n = x.shape[0]
    if projection_name(n) == "PCA":
        u, s, _ = np.linalg.svd(x - x.mean(0), full_matrices=False)
        out = np.zeros((n, 2), dtype=np.float32)
        k = min(2, u.shape[1])
        out[:, :k] = u[:, :k] * s[:k]
        return out
    # numba's OpenMP layer shares torch's libgomp: UMAP's numba.set_num_threads(...) and its
    # restore to numba's default (every core) would leave torch on every core, and a later
    # training step in this process (demo, study) oversubscribed (measured 5x slower next to
    # another job with OMP_NUM_THREADS=1). Torch's count is put back afterwards.
    import umap  # numba's start-up (seconds) only when a UMAP is drawn

    torch_threads = torch.get_num_threads()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # n_jobs overridden by random_state, etc.
        reducer = umap.UMAP(
            n_neighbors=min(n_neighbors, n - 1),
            n_epochs=n_epochs,
            random_state=seed,
            init="pca" if n < 4000 else "spectral",
            metric="euclidean",
        )
        try:
            return reducer.fit_transform(x).astype(np.float32)
        finally:
            torch.set_num_threads(torch_threads)


def _colour_axes(ax: Any, xy: np.ndarray, labels: pd.Series, title: str, grey: Any = None) -> None:
    plt = _plt()
    lab = labels.astype(str).fillna("NA").to_numpy()
    uniq = sorted(set(lab))
    cmap = plt.get_cmap("tab20" if len(uniq) > 10 else "tab10")
    grey_mask = np.zeros(len(lab), bool) if grey is None else np.asarray(grey, bool)
    if grey_mask.any():
        ax.scatter(xy[grey_mask, 0], xy[grey_mask, 1], s=6, c="#bbbbbb", label="control", lw=0)
    for i, u in enumerate(u for u in uniq if (lab[~grey_mask] == u).any()):
        m = (lab == u) & ~grey_mask
        ax.scatter(xy[m, 0], xy[m, 1], s=8, color=cmap(i % cmap.N), label=u, lw=0)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    if len(uniq) <= 15:
        ax.legend(fontsize=6, markerscale=1.5, loc="best", frameon=False)


def umap_frame(profiles: np.ndarray, meta: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """UMAP coordinates with the metadata used to colour them."""
    xy = umap_coords(profiles, seed=seed)
    cols = [
        c
        for c in ("plate", "well", "batch", "treatment", "moa", "is_control", "split")
        if c in meta
    ]
    df = meta[cols].reset_index(drop=True).copy()
    df.insert(0, "umap_y", xy[:, 1])
    df.insert(0, "umap_x", xy[:, 0])
    df["projection"] = projection_name(len(df))  # the axes' meaning, for the figure and CSV
    return df


def _colour_by(df: pd.DataFrame) -> str:
    """MoA when known (fewer, meaningful colours), else treatment."""
    if "moa" in df and df["moa"].notna().any():
        return "moa"
    return "treatment"


def draw_umap_panels(axes: Any, df: pd.DataFrame, title: str) -> None:
    """Two panels: coloured by batch, and by MoA/treatment (controls grey)."""
    xy = df[["umap_x", "umap_y"]].to_numpy()
    if "projection" in df and (df["projection"] == "PCA").any():
        title = f"{title} (PCA: {len(df)} points, too few for UMAP)"
    _colour_axes(axes[0], xy, df["batch"], f"{title}: batch")
    by = _colour_by(df)
    ctrl = df["is_control"].to_numpy(bool) if "is_control" in df else None
    _colour_axes(axes[1], xy, df[by], f"{title}: {by}", grey=ctrl)


def plot_umap(df: pd.DataFrame, title: str, path: str | Path) -> Path:
    """Save the two-panel UMAP figure as a PNG."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    draw_umap_panels(axes, df, title)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    """Save ``fig`` as a PNG atomically; a failed write (a full disk) names ``path``."""
    from cdcl.atomic import atomic_path

    plt = _plt()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return path


def read_metrics_jsonl(path: str | Path) -> pd.DataFrame:
    """The numeric records of a training log (bad lines, e.g. a half-written last one, skipped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            rows.append(
                {
                    k: v
                    for k, v in rec.items()
                    if isinstance(v, int | float) and not isinstance(v, bool)
                }
            )
    return pd.DataFrame(rows)


def plot_training_curves(
    metrics_path: str | Path, path: str | Path, max_panels: int = 9
) -> Path | None:
    """Small multiples of every logged number against the step (None when nothing to plot)."""
    p = Path(metrics_path)
    if not p.is_file():
        return None
    df = read_metrics_jsonl(p)
    if df.empty:
        return None
    xcol = next((c for c in ("step", "global_step", "iteration", "epoch") if c in df), None)
    x = df[xcol] if xcol else pd.Series(np.arange(len(df)))
    skip = {"step", "global_step", "iteration", "epoch", "time", "timestamp", "wall_s"}
    ys = [c for c in df.columns if c not in skip and df[c].notna().sum() > 1][:max_panels]
    if not ys:
        return None
    plt = _plt()
    ncol = min(3, len(ys))
    nrow = math.ceil(len(ys) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol, 2.6 * nrow), squeeze=False)
    for ax, c in zip(axes.ravel(), ys):
        ok = df[c].notna()
        ax.plot(x[ok], df.loc[ok, c], lw=1)
        ax.set_title(c, fontsize=9)
        ax.set_xlabel(xcol or "record", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[len(ys) :]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------- HTML


TIE_TOL = 5e-4  # values equal to the 3 decimals shown are ties: no single best


def _unique_best(vals: pd.Series, higher: bool) -> Any:
    """The column holding the one best value of a row, None when two or more tie for it."""
    vals = vals.dropna()
    if len(vals) < 2:
        return None
    best = vals.max() if higher else vals.min()
    if ((vals - best).abs() <= TIE_TOL).sum() > 1:
        return None
    return vals.idxmax() if higher else vals.idxmin()


def table_html(table: pd.DataFrame, higher: dict[str, bool] | None = None) -> str:
    """An HTML table of metrics (rows) x columns; a row's unique best value is highlighted."""
    if table.empty:
        return "<p>No metrics.</p>"
    higher = higher or {lab: hib for lab, _, hib in HEADLINE + ONLINE_PROBE}
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
    rows = [f"<tr><th>metric</th>{head}</tr>"]
    for metric, row in table.iterrows():
        vals = pd.to_numeric(row, errors="coerce")
        best = None
        if "chance" not in str(metric):
            best = _unique_best(vals, higher.get(str(metric), True))
        cells = "".join(
            f'<td class="best">{_fmt(v)}</td>' if c == best else f"<td>{_fmt(v)}</td>"
            for c, v in row.items()
        )
        arrow = "↑" if higher.get(str(metric), True) else "↓"
        rows.append(f"<tr><td>{html.escape(str(metric))} {arrow}</td>{cells}</tr>")
    return '<div class="scroll"><table>' + "".join(rows) + "</table></div>"


# Every headline label and the path of its value in a feature set's results.
LABEL_PATHS: dict[str, tuple[str, ...]] = {lab: path for lab, path, _ in ONLINE_PROBE + HEADLINE}


def sets_frame(results: dict[str, Any], variant: str) -> pd.DataFrame:
    """Headline figures of one variant: one row per feature set, one column per metric."""
    long = metrics_long(results)
    long = long[long["variant"].isin([variant, "images"])]
    if not (long["variant"] == variant).any():
        return pd.DataFrame()
    order = [lab for lab in LABEL_PATHS if lab in set(long["metric"])]
    frame = long.pivot_table(
        index="set", columns="metric", values="value", aggfunc="first", dropna=False
    )
    frame = frame.reindex(columns=[c for c in order if "chance" not in c and "aggregate" not in c])
    return frame.reindex(list(dict.fromkeys(long["set"])))


def _kv_html(d: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{_fmt(v) if not isinstance(v, dict | list) else html.escape(json.dumps(v))}</td></tr>"
        for k, v in d.items()
    )
    return f'<table class="meta">{rows}</table>'


def make_plots(
    out_dir: str | Path,
    profiles: dict[str, tuple[np.ndarray, pd.DataFrame]] | None = None,
    metrics_jsonl: str | Path | None = None,
    seed: int = 0,
    plot_sample: int | None = DEFAULT_PLOT_SAMPLE,
    timer: Any = None,
) -> list[Path]:
    """UMAP PNGs (+ coordinates as CSV, for compare) and training curves under ``OUT/plots``.

    Each UMAP is drawn on at most ``plot_sample`` rows, a seeded sample stratified by batch
    and treatment (:func:`cdcl.report.plot_sample.stratified_plot_rows`; None or 0: every
    row), so time and memory do not grow with the table. ``timer`` (a
    :class:`cdcl.metrics.score.Timer`) times each figure.
    """
    plots = Path(out_dir) / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, (x, meta) in (profiles or {}).items():
        if len(x) < 3:
            continue
        rows = stratified_plot_rows(meta, plot_sample, seed)
        if rows.size < len(x):
            # Only the sampled rows are copied: the plot's memory does not grow with the table.
            x, meta = x[rows], meta.iloc[rows].reset_index(drop=True)
        if timer is not None:
            timer.say(f"UMAP of {name} on {rows.size:,} rows ...")
        with timer(f"plots.umap.{name}") if timer is not None else contextlib.nullcontext():
            df = umap_frame(x, meta, seed=seed)
            safe = _safe_name(name)
            tmp = plots / f".umap_{safe}.csv.tmp"
            df.to_csv(tmp, index=False)
            tmp.replace(plots / f"umap_{safe}.csv")
            written.append(plot_umap(df, name, plots / f"umap_{safe}.png"))
    if metrics_jsonl is not None:
        curves = plot_training_curves(metrics_jsonl, plots / "training_curves.png")
        if curves is not None:
            written.append(curves)
    return written


def render_report(results: dict[str, Any], out_dir: str | Path, title: str | None = None) -> Path:
    """``OUT/report.html``: metrics table, the UMAPs and curves found in ``OUT/plots``, provenance."""
    out = Path(out_dir)
    plots = out / "plots"
    sets = list((results.get("feature_sets") or {}).keys())
    umap_imgs = [(n, plots / f"umap_{_safe_name(n)}.png") for n in sets]
    umap_imgs = [(n, p) for n, p in umap_imgs if p.is_file()]
    curves = plots / "training_curves.png"
    src = results.get("source", {})
    title = title or f"cdcl evaluation: {src.get('run') or src.get('features_file') or out.name}"
    sections = [
        *_results_sections(results),
        ("All metrics", table_html(metrics_table(results)) + _protocol_html(results)),
    ]
    if umap_imgs:
        sections.append(
            (
                "UMAP of well profiles",
                f'<p class="small">{html.escape(_plotted_rows_text(results))}; controls grey.</p>'
                + "".join(img_html(p, f"UMAP {n}") for n, p in umap_imgs),
            )
        )
    if curves.is_file():
        sections.append(("Training curves", img_html(curves, "training curves")))
    for name, res in (results.get("feature_sets") or {}).items():
        if isinstance(res, dict) and res.get("calibration"):
            sections.append((f"Calibration of {name}", _calibration_html(res["calibration"])))
    info = {
        k: results.get(k)
        for k in ("kind", "created", "split", "timings_s")
        if results.get(k) is not None
    }
    sections.append(
        ("Provenance", _kv_html({**src, **info}) + _kv_html(results.get("versions", {})))
    )
    errors = {
        f"{s}: {k}": v
        for s, r in (results.get("feature_sets") or {}).items()
        for k, v in (r.get("errors") or {}).items()
    }
    if errors:
        sections.append(("Metrics that failed", f'<div class="err">{_kv_html(errors)}</div>'))
    # Why a metric is empty: one reason per line, the same for every feature set and variant.
    reasons = {
        str(v): None
        for r in (results.get("feature_sets") or {}).values()
        for v in (r.get("unavailable") or {}).values()
    }
    if reasons:
        items = "".join(f"<li>{html.escape(t)}</li>" for t in reasons)
        sections.append(("Metrics not computed", f"<ul>{items}</ul>"))
    return write_html(out / "report.html", title, sections)


def _results_sections(results: dict[str, Any]) -> list[tuple[str, str]]:
    """The design, the results figure (plate-normalised profiles when present), its glossary."""
    for variant, what in (
        ("plate_normalized", "profiles standardised per plate"),
        ("raw", "raw profiles"),
    ):
        frame = sets_frame(results, variant)
        if not frame.empty and frame.shape[1] > 0:
            banner = design_banner(frame, LABEL_PATHS, results, variant)
            # The random network is judged by chance_warnings (calibration-aware), not twice.
            baselines = tuple(b for b in BASELINE_SETS if b not in RANDOM_SETS)
            body = _design_html(results) + summary_html(
                frame,
                LABEL_PATHS,
                learned_sets(list(frame.index)),
                baselines,
                totals=stored_totals(results, variant),
                greyed=greyed_columns(results, LABEL_PATHS, variant),
                warnings=[
                    *([banner] if banner else []),
                    *chance_warnings(results),
                    *results.get("input_warnings", []),
                ],
            )
            return [(f"Results: held-out batches, {what}", body + _not_computable_html(results))]
    return []


def _not_computable_html(results: dict[str, Any]) -> str:
    """Why the figure's empty cells are empty: each metric's own rule, one line each."""
    reasons = {
        str(v): None
        for r in (results.get("feature_sets") or {}).values()
        if isinstance(r, dict)
        for v in (r.get("unavailable") or {}).values()
    }
    if not reasons:
        return ""
    items = "".join(f"<li>{html.escape(t)}</li>" for t in reasons)
    head = '<p class="small">Not computable on this design (left out of the total):</p>'
    return f'{head}<ul class="small">{items}</ul>'


def warning_lines(results: dict[str, Any]) -> list[str]:
    """The report's warnings as text: the design banner, then the chance warnings."""
    lines = []
    for variant in ("plate_normalized", "raw"):
        frame = sets_frame(results, variant)
        if not frame.empty and frame.shape[1] > 0:
            banner = design_banner(frame, LABEL_PATHS, results, variant)
            lines += [banner] if banner else []
            break
    return lines + chance_warnings(results) + list(results.get("input_warnings", []))


def announce(results: dict[str, Any]) -> list[str]:
    """Print the design and the warnings of an evaluation to stderr; the warnings."""
    warnings = warning_lines(results)
    for line in design_lines(results):
        print(f"note: {line}", file=sys.stderr)
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    return warnings


def _design_html(results: dict[str, Any]) -> str:
    """The design scored (rows, held-out plates and batches, queries), above the figure."""
    lines = design_lines(results)
    if not lines:
        return ""
    return '<p class="design">' + "<br>".join(html.escape(ln) for ln in lines) + "</p>"


def _calibration_html(cal: dict[str, Any]) -> str:
    """Null and injected-effect values of every metric, with the metrics that lack power."""
    from cdcl.report.calibration import calibrated_variants, calibration_table

    design = cal.get("design", {})
    intro = (
        f'<p class="small">The {design.get("n_profiles")} evaluated rows '
        f"({design.get('n_batches')} batches, {design.get('n_treatments')} treatments); "
        f"median treatment effect {design.get('median_treatment_effect', float('nan')):.3g}. "
        + "; ".join(html.escape(f"{k}: {v}") for k, v in cal.get("conditions", {}).items())
        + "</p>"
    )
    parts = [intro]
    by_variant = calibrated_variants(cal)
    for variant, body in by_variant.items():
        table = calibration_table(cal, variant).set_index("metric")
        if len(by_variant) > 1 or "variants" in cal:
            parts.append(f"<h4>{html.escape(VARIANT_TEXT.get(variant, variant))}</h4>")
        parts.append(frame_html(table, decimals=3))
        reasons = "".join(
            f"<li>{html.escape(label)}: {html.escape(body['metrics'][label]['reason'])}</li>"
            for label in body.get("no_power", [])
        )
        parts.append(f"<ul>{reasons}</ul>" if reasons else "")
    return "".join(parts)


def make_report(
    results: dict[str, Any],
    out_dir: str | Path,
    profiles: dict[str, tuple[np.ndarray, pd.DataFrame]] | None = None,
    metrics_jsonl: str | Path | None = None,
    seed: int = 0,
    title: str | None = None,
) -> Path:
    """Plots then ``report.html`` in ``out_dir`` (see :func:`make_plots`, :func:`render_report`)."""
    make_plots(out_dir, profiles, metrics_jsonl, seed=seed)
    return render_report(results, out_dir, title=title)


def _plotted_rows_text(results: dict[str, Any]) -> str:
    """Which rows the UMAPs show: all of them, or the stated stratified sample."""
    info = results.get("plots") or {}
    shown, total = info.get("rows_plotted"), info.get("rows_total")
    if shown is None or total is None or shown >= total:
        return "Raw well profiles of all evaluated batches, every row"
    by = " and ".join(info.get("stratified_by") or ())
    return (
        f"Raw well profiles: a seeded sample of {shown:,} of {total:,} rows, stratified by "
        f"{by} (metrics use every row)"
    )


def _protocol_html(results: dict[str, Any]) -> str:
    p = results.get("protocol") or {}
    items = "".join(
        f"<li><b>{html.escape(k)}</b>: {html.escape(str(v))}</li>" for k, v in p.items()
    )
    return f'<ul class="small">{items}</ul>' if items else ""


def _safe_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


# ---------------------------------------------------------------- compare


def compare(
    result_dirs: list[str | Path], out_dir: str | Path, names: list[str] | None = None
) -> Path:
    """Side-by-side metrics (CSV + HTML) and a UMAP panel grid of several results directories."""
    if len(result_dirs) < 1:
        raise CdclError("compare: give at least one run or results directory")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = names or _unique_names([Path(d) for d in result_dirs])
    longs, umaps, every = [], [], {}
    for d, name in zip(result_dirs, names):
        d = Path(d)
        res = read_results(d)
        every[name] = res
        longs.append(metrics_long(res, name))
        base = d if d.is_dir() else d.parent
        first = next(iter(res.get("feature_sets") or {}), None)
        if first is not None:
            f = base / "plots" / f"umap_{_safe_name(first)}.csv"
            if f.is_file():
                umaps.append((f"{name}: {first}", pd.read_csv(f)))
    long = pd.concat(longs, ignore_index=True)
    atomic_write_text(out / "comparison.csv", long.to_csv(index=False))
    long, shared = shared_baselines_once(long)
    long["col"] = long["run"] + " | " + long["set"] + " | " + long["variant"]
    cols = list(dict.fromkeys(long["col"]))
    table = long.pivot_table(
        index="metric", columns="col", values="value", aggfunc="first", dropna=False
    )
    order = [lab for lab, _, _ in ONLINE_PROBE + HEADLINE]
    table = table.reindex([m for m in order if m in table.index]).reindex(columns=cols)
    note = (
        f'<p class="small">{html.escape(", ".join(shared))}: the same figures in every run, '
        f"shown once as “{SHARED_RUN}”.</p>"
        if shared
        else ""
    )
    figure = _compare_results(long, every, shared)
    sections = [*figure, ("All metrics", note + table_html(table))]
    if umaps:
        plt = _plt()
        fig, axes = plt.subplots(len(umaps), 2, figsize=(10, 4.2 * len(umaps)), squeeze=False)
        for row, (title, df) in zip(axes, umaps):
            draw_umap_panels(row, df, title)
        fig.tight_layout()
        grid = _save(fig, out / "umap_grid.png")
        sections.append(("UMAP of well profiles", img_html(grid, "UMAP grid")))
    srcs = {n: str(Path(d)) for n, d in zip(names, result_dirs)}
    sections.append(("Runs", _kv_html(srcs)))
    return write_html(out / "compare.html", "cdcl comparison", sections)


SHARED_RUN = "shared"


def shared_baselines_once(long: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Baseline rows identical in every run kept once, under run ``shared``; their names."""
    runs = list(dict.fromkeys(long["run"]))
    drop = pd.Series(False, index=long.index)
    shared = []
    for s in (s for s in dict.fromkeys(long["set"]) if s in BASELINE_SETS):
        rows = long["set"] == s
        per_run = long[rows].pivot_table(
            index=["variant", "metric"], columns="run", values="value", aggfunc="first",
            dropna=False,
        ).reindex(columns=runs)  # fmt: skip
        if len(runs) < 2 or per_run.isna().all(axis=0).any():
            continue  # a run without this baseline: nothing is shared
        values = per_run.to_numpy(dtype=float)
        if not np.allclose(values, values[:, :1], rtol=0, atol=1e-9, equal_nan=True):
            continue
        drop |= rows & (long["run"] != runs[0])
        long.loc[rows & (long["run"] == runs[0]), "run"] = SHARED_RUN
        shared.append(s)
    return long[~drop].reset_index(drop=True), shared


def _compare_results(
    long: pd.DataFrame, every: dict[str, dict[str, Any]], shared: list[str]
) -> list[tuple[str, str]]:
    """The results figure over every run's feature sets (plate-normalised when present).

    Each row's total is the one stored in its run's results.json: the same as in its report.
    """
    for variant in ("plate_normalized", "raw"):
        sub = long[long["variant"] == variant]
        if sub.empty:
            continue
        sub = sub.assign(row=sub["run"] + ": " + sub["set"])
        frame = sub.pivot_table(
            index="row", columns="metric", values="value", aggfunc="first", dropna=False
        )
        frame = frame.reindex(
            index=list(dict.fromkeys(sub["row"])),
            columns=[c for c in LABEL_PATHS if c in frame.columns and "chance" not in c],
        )
        is_base = sub["set"].isin(BASELINE_SETS)
        learned = list(
            dict.fromkeys(sub.loc[~is_base & ~sub["set"].str.contains("+", regex=False), "row"])
        )
        baselines = tuple(dict.fromkeys(sub.loc[is_base, "row"]))
        frame = frame[[c for c in frame.columns if "aggregate" not in c]]
        totals = _compare_totals(every, variant, shared)
        greyed: dict[str, str] = {}
        for name, res in every.items():
            for col, why in greyed_columns(res, LABEL_PATHS, variant).items():
                greyed.setdefault(col, f"{name}: {why}")
        body = summary_html(frame, LABEL_PATHS, learned, baselines, totals=totals, greyed=greyed)
        return [(f"Results ({variant.replace('_', '-')} profiles)", body)]
    return []


def _compare_totals(every: dict[str, dict[str, Any]], variant: str, shared: list[str]) -> Any:
    """Stored totals of every run's sets, indexed ``run: set`` (shared baselines once)."""
    frames = []
    for name, res in every.items():
        t = stored_totals(res, variant)
        frames.append(t.rename(index=lambda s, n=name: f"{n}: {s}"))
        first = next(iter(every))
        if name == first:
            kept = t.loc[[s for s in shared if s in t.index]]
            frames.append(kept.rename(index=lambda s: f"{SHARED_RUN}: {s}"))
    return pd.concat(frames) if frames else None


def _unique_names(paths: list[Path]) -> list[str]:
    names = [p.name or str(p) for p in paths]
    if len(set(names)) == len(names):
        return names
    return [f"{i}:{n}" for i, n in enumerate(names)]
