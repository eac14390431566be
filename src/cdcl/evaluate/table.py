"""``cdcl evaluate --features FILE``: score any profile table with the run's code."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cdcl.data.splits import rotating_batch_split
from cdcl.errors import CdclError
from cdcl.evaluate.embed import (
    parquet_shape,
    read_parquet_profiles,
    read_profile_table,
    split_table,
)
from cdcl.evaluate.plot_sample import (
    DEFAULT_PLOT_SAMPLE,
    plot_sample_info,
    stratified_plot_rows,
)
from cdcl.evaluate.profiles import resolve_table_meta
from cdcl.evaluate.profiles import tvn as tvn_fn
from cdcl.evaluate.progress import keep_alive
from cdcl.evaluate.report import make_plots, render_report
from cdcl.evaluate.results import RESULTS_FILE, write_results
from cdcl.evaluate.score import (
    EXACT_MAX,
    VARIANTS,
    Timer,
    base_results,
    corrected_sets,
    evaluate_features,
    file_sha256,
    protocol_with,
    split_masks,
)


def evaluate_table(
    features_file: str | Path,
    out: str | Path,
    *,
    batch_col: str | None = None,
    batch_pattern: str | None = None,
    treatment_col: str | None = None,
    compound_col: str | None = None,
    moa_col: str | None = None,
    plate_col: str | None = None,
    well_col: str | None = None,
    control_query: str | None = None,
    split_number: int = 1,
    eval_on: str = "all",
    tvn: bool = False,
    corrections: tuple[str, ...] = (),
    null_size: int = 2000,
    seed: int = 0,
    umap: bool = True,
    name: str | None = None,
    plot_sample: int | None = DEFAULT_PLOT_SAMPLE,
    variants: tuple[str, ...] = VARIANTS,
) -> Path:
    """``cdcl evaluate --features FILE``: score any ``Metadata_*`` profile table with the same code.

    Classification trains on the batches of fold ``split_number`` (``rotating_batch_split``) and
    tests on its held-out batches; the other metrics run on all rows (``eval_on="all"``) or
    on the held-out batches only (``"test"``, as for a run). ``corrections`` adds the table
    after each post-hoc correction (``sphering``, ``harmony``, ``combat``), fitted on all rows.
    UMAPs are drawn on a stratified sample of at most ``plot_sample`` rows (None or 0: all);
    its size is recorded under ``plots`` in results.json. Above ``EXACT_MAX`` rows every stage
    prints its time to stderr. ``variants``: ``("raw",)`` skips the plate-normalised scores
    (and their copy of the table).
    """

    if eval_on not in ("all", "test"):
        raise CdclError(f"--eval-on {eval_on}: use all or test")
    timer = Timer()
    t0 = time.perf_counter()
    columns = {
        "batch_col": batch_col,
        "batch_pattern": batch_pattern,
        "treatment_col": treatment_col,
        "compound_col": compound_col,
        "moa_col": moa_col,
        "plate_col": plate_col,
        "well_col": well_col,
        "control_query": control_query,
    }
    # Small tables finish in seconds; large ones say what they are doing as they go, and
    # what memory they will need before anything is loaded (Parquet's footer has the shape).
    shape = parquet_shape(features_file)
    if shape is not None:
        timer.echo = shape[0] > EXACT_MAX
        n_sets = 1 + int(tvn) + len(corrections)
        for line in memory_plan(shape[0], shape[1], n_sets, len(variants)):
            timer.say(line)
    with keep_alive(timer.echo), timer("load"):
        x, meta, names = _load_table(features_file, columns)
    if shape is None and len(meta) > EXACT_MAX:
        timer.echo = True
        timer.report("load", time.perf_counter() - t0)
    timer.say(f"{len(meta):,} profiles x {len(names):,} features")
    with keep_alive(timer.echo):
        return _score_table(
            x,
            meta,
            names,
            features_file,
            out,
            timer,
            columns=columns,
            split_number=split_number,
            eval_on=eval_on,
            tvn=tvn,
            corrections=corrections,
            null_size=null_size,
            seed=seed,
            umap=umap,
            name=name,
            plot_sample=plot_sample,
            variants=variants,
        )


FIXED_GIB = 2.0  # libraries, metadata and metric working memory, beyond the table's copies


def memory_plan(n: int, d: int, n_sets: int = 1, n_variants: int = 2) -> list[str]:
    """Lines stating the estimated peak memory of the evaluation, and an option when it won't fit.

    Model (float32): every feature set is held (n x d x 4 bytes each), the plate-normalised
    variant adds one copy while it is scored, and the largest metric step (mAP's unit-norm
    copy) one more; plus ~2 GiB of libraries, metadata and metric working memory (the peak
    measured at 10^5 x 384, where the table itself is 0.14 GiB, was 2.5 GiB).
    """
    gib = n * d * 4 / 2**30
    copies = n_sets + (n_variants > 1) + 1
    need = copies * gib + FIXED_GIB
    lines = [f"{n:,} profiles x {d:,} features: estimated peak memory {need:.1f} GiB"]
    avail = available_memory_gib()
    if avail is not None and need > avail:
        fix = (
            "--variants raw (skips the plate-normalised copy)"
            if n_variants > 1
            else "fewer feature sets (drop --tvn/--correct) or a machine with more memory"
        )
        if n_sets > 1 and n_variants > 1:
            fix += "; or drop --tvn/--correct"
        lines.append(
            f"warning: only {avail:.1f} GiB available; the scoring stage needs ~{need:.1f} GiB "
            f"and would not fit; use {fix}"
        )
    return lines


def available_memory_gib() -> float | None:
    """MemAvailable of /proc/meminfo in GiB (None where there is no such file)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        return None
    return None


def _score_table(
    x: np.ndarray,
    meta: pd.DataFrame,
    names: list[str],
    features_file: str | Path,
    out: str | Path,
    timer: Timer,
    *,
    columns: dict[str, str | None],
    split_number: int,
    eval_on: str,
    tvn: bool,
    corrections: tuple[str, ...],
    null_size: int,
    seed: int,
    umap: bool,
    name: str | None,
    plot_sample: int | None,
    variants: tuple[str, ...],
) -> Path:
    """Every stage after loading: metrics of each feature set, plots, results.json, report."""
    batch_col, batch_pattern = columns["batch_col"], columns["batch_pattern"]
    treatment_col, compound_col = columns["treatment_col"], columns["compound_col"]
    moa_col, control_query = columns["moa_col"], columns["control_query"]
    train, test, split_info = _held_out_split(meta, split_number)
    ev = np.ones(len(meta), bool) if eval_on == "all" else test
    set_name = name or "features"
    sets = {set_name: x}
    if tvn:
        with timer("tvn"):
            sets[f"{set_name}+tvn"] = tvn_fn(x, meta)
    sets.update(corrected_sets(x, meta, corrections, seed=seed, timer=timer, name=set_name))
    results_sets = {
        set_: evaluate_features(
            xs,
            meta,
            train,
            test,
            eval_mask=ev,
            null_size=null_size,
            seed=seed,
            timer=timer,
            name=set_,
            variants=variants,
        )
        for set_, xs in sets.items()
    }
    source = {
        "features_file": str(Path(features_file).resolve()),
        "features_sha256": file_sha256(features_file),
        "n_profiles": len(meta),
        "n_features": len(names),
        "eval_on": eval_on,
        "columns": {
            "batch": batch_col,
            "batch_pattern": batch_pattern,
            "treatment": treatment_col,
            "compound": compound_col,
            "moa": moa_col,
            "control_query": control_query,
            "n_controls": int(meta["is_control"].sum()),
        },
        "corrections": list(corrections),
    }
    results = base_results(
        "features",
        source=source,
        protocol=protocol_with(corrections),
        split=split_info,
        feature_sets=results_sets,
    )
    out = Path(out)
    if umap:
        rows = stratified_plot_rows(meta, plot_sample, seed)
        results["plots"] = plot_sample_info(len(meta), rows, plot_sample, seed)
        with timer("plots"):
            make_plots(
                out,
                {n: (xs, meta) for n, xs in sets.items()},
                seed=seed,
                plot_sample=plot_sample,
                timer=timer,
            )
    with timer("write results + report"):
        results["timings_s"] = timer.times
        write_results(results, out)
        render_report(results, out)
    return out / RESULTS_FILE


def _load_table(
    features_file: str | Path, columns: dict[str, str | None]
) -> tuple[np.ndarray, pd.DataFrame, list[str]]:
    """Profiles, canonical metadata (batch, treatment, controls, ...) and feature names."""
    if str(features_file).lower().endswith(".parquet"):
        x, meta_table, names = read_parquet_profiles(features_file)
    else:
        table = read_profile_table(features_file)
        if len(table) == 0:
            raise CdclError(f"{features_file}: the table has no rows")
        x, meta_table, names = split_table(table)
        del table  # the features now live in x only
    if len(x) == 0:
        raise CdclError(f"{features_file}: the table has no rows")
    return x, resolve_table_meta(meta_table, **columns), names


def _held_out_split(
    meta: pd.DataFrame, split_number: int
) -> tuple[np.ndarray | None, np.ndarray, dict[str, Any]]:
    """Train and test masks of fold ``split_number``; one batch: no train set, all rows test."""
    if meta["batch"].nunique() < 2:
        note = {"number": None, "note": "one batch: no held-out-batch classification"}
        return None, np.ones(len(meta), bool), note
    split = rotating_batch_split(meta, split_number)
    train = (split == "train").to_numpy()
    test = (split == "test").to_numpy()
    return train, test, {"number": split_number, **split_masks(meta, split)}
