"""``cdcl evaluate --features FILE``: score any profile table with the run's code."""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cdcl.data.splits import rotating_batch_split
from cdcl.errors import CdclError
from cdcl.evaluation.calibrated import calibrate_sets, should_calibrate
from cdcl.hashing import file_sha256
from cdcl.metrics.design import design_facts
from cdcl.metrics.score import (
    EXACT_MAX,
    VARIANTS,
    Timer,
    base_results,
    corrected_sets,
    evaluate_features,
    protocol_with,
    split_masks,
)
from cdcl.profiles.columns import ColumnSpec
from cdcl.profiles.columns import tvn as tvn_fn
from cdcl.profiles.table import (
    parquet_shape,
    read_parquet_profiles,
    read_profile_table,
    split_table,
)
from cdcl.progress import keep_alive
from cdcl.report.html import announce, make_plots, render_report
from cdcl.report.plot_sample import (
    DEFAULT_PLOT_SAMPLE,
    plot_sample_info,
    stratified_plot_rows,
)
from cdcl.report.results import RESULTS_FILE, write_results

SPLIT_COLUMN = "Metadata_Split"  # what `cdcl embed` writes: the run's train / val / test part


def evaluate_table(
    features_file: str | Path | pd.DataFrame,
    out: str | Path,
    *,
    columns: ColumnSpec | None = None,
    split_number: int | None = None,
    eval_on: str | None = None,
    tvn: bool = False,
    corrections: tuple[str, ...] = (),
    null_size: int = 2000,
    seed: int = 0,
    umap: bool = True,
    name: str | None = None,
    before_write: Callable[[dict[str, Any]], None] | None = None,
    calibrate: bool | None = None,
    plot_sample: int | None = DEFAULT_PLOT_SAMPLE,
    variants: tuple[str, ...] = VARIANTS,
) -> Path:
    """``cdcl evaluate --features FILE``: score any ``Metadata_*`` profile table with the same code.

    ``features_file`` is a file or a DataFrame; ``columns`` says which of its ``Metadata_*``
    columns hold what (default: all found by convention). Without ``split_number``, a
    ``Metadata_Split`` column (``cdcl embed`` writes the run's split there) decides:
    classification trains on its ``train`` rows and tests on its ``test`` rows, and the other
    metrics run on the ``test`` rows, as ``cdcl evaluate RUN`` does. Otherwise classification trains on the batches of fold
    ``split_number`` (default 1, ``rotating_batch_split``) and tests on its held-out batches,
    and the other metrics run on all rows. ``eval_on`` (``"all"`` or ``"test"``) overrides that
    choice of rows. Which batches are held out, and why, is printed and kept in the results.
    ``corrections`` adds the table after each post-hoc correction (``sphering``, ``harmony``,
    ``combat``), fitted on all rows.
    ``before_write`` sees the results first and may refuse them (raise): then nothing in
    ``out`` is touched. Exact duplicate rows are dropped (said in ``source.notes``).
    ``calibrate`` adds the table's null and injected-batch-effect scores
    (:func:`cdcl.evaluation.calibration.calibrate`) under ``calibration`` of the table's set;
    None (the default) calibrates small designs only, saying so.
    UMAPs are drawn on a stratified sample of at most ``plot_sample`` rows (None or 0: all);
    its size is recorded under ``plots`` in results.json. Above ``EXACT_MAX`` rows every stage
    prints its time to stderr. ``variants``: ``("raw",)`` skips the plate-normalised scores
    (and their copy of the table).
    """

    if eval_on not in (None, "all", "test"):
        raise CdclError(f"--eval-on {eval_on}: use all or test")
    columns = ColumnSpec() if columns is None else columns
    timer = Timer()
    t0 = time.perf_counter()
    n_sets = 1 + int(tvn) + len(corrections)
    shape = _announce_plan(features_file, timer, n_sets, len(variants))
    with keep_alive(timer.echo), timer("load"):
        x, meta, names, parts, notes = _load_table(features_file, columns)
    if shape is None and len(meta) > EXACT_MAX:
        timer.echo = True
        timer.report("load", time.perf_counter() - t0)
    timer.say(f"{len(meta):,} profiles x {len(names):,} features")
    with keep_alive(timer.echo):
        return _score_table(
            x,
            meta,
            names,
            parts,
            notes,
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
            before_write=before_write,
            calibrate=calibrate,
        )


def _announce_plan(
    features_file: str | Path | pd.DataFrame, timer: Timer, n_sets: int, n_variants: int
) -> tuple[int, int] | None:
    """A Parquet table's shape from its footer, its memory and time plan said; else None.

    Small tables finish in seconds; large ones say what they are doing as they go, and what
    memory they will need before anything is loaded (Parquet's footer has the shape).
    """
    shape = None if isinstance(features_file, pd.DataFrame) else parquet_shape(features_file)
    if shape is not None:
        timer.echo = shape[0] > EXACT_MAX
        plan = memory_plan(shape[0], shape[1], n_sets, n_variants)
        plan += time_plan(shape[0], shape[1], n_sets, n_variants)
        for line in plan:
            timer.say(line)
    return shape


FIXED_GIB = 2.0  # libraries, metadata and metric working memory, beyond the table's copies


def memory_plan(n: int, d: int, n_sets: int = 1, n_variants: int = 2) -> list[str]:
    """Lines stating the estimated peak memory of the evaluation, and an option when it won't fit.

    Model (float32): every feature set is held (n x d x 4 bytes each) and the plate-normalised
    variant adds one copy while it is scored; the metrics read row subsets in place, so no
    metric copies the table. Plus ~2 GiB of libraries, metadata and metric working memory
    (blocks of at most a few hundred MiB), from the peaks measured at 10^5 x 384 to
    10^6 x 768 (docs/benchmarks.md).
    """
    gib = n * d * 4 / 2**30
    copies = n_sets + (n_variants > 1)
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


# Scoring seconds per variant per (row x feature), per core, measured with
# benchmarks/bench_cli_evaluate.py at 5e5 x 384 on an idle 2-core machine (143-156 s per
# variant); the metrics with sampled queries cost queries x rows x features, so time grows
# with n x d. Loading: ~27 s per 1.9e8 numbers. A rough guide, not a promise.
SCORE_S_PER_CELL_CORE = 2 * 150.0 / (500_000 * 384)
LOAD_S_PER_CELL = 27.0 / (500_000 * 384)
TIME_AIM_MIN = 10.0


def time_plan(
    n: int, d: int, n_sets: int = 1, n_variants: int = 2, cores: int | None = None
) -> list[str]:
    """Lines stating the rough time of the evaluation on this machine, and an option when long.

    Scaled from the measured benchmark (:data:`SCORE_S_PER_CELL_CORE`) by rows x features,
    feature sets, variants and cores; above ``TIME_AIM_MIN`` minutes the line names
    ``--variants raw`` (half the scoring) when both variants are asked for.
    """
    cores = max(1, cores or os.cpu_count() or 1)
    cells = float(n) * float(d)
    load_s = cells * LOAD_S_PER_CELL
    variant_s = n_sets * cells * SCORE_S_PER_CELL_CORE / cores  # every feature set, one variant

    def minutes(n_var: int) -> float:
        return (load_s + n_var * variant_s) / 60.0

    line = f"estimated time ~{minutes(n_variants):.0f} min on {cores} core(s) (scaled from the benchmark)"
    if minutes(n_variants) > TIME_AIM_MIN and n_variants > 1:
        line += f"; --variants raw would take ~{minutes(1):.0f} min"
    return [line]


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
    parts: pd.Series | None,
    notes: list[str],
    features_file: str | Path | pd.DataFrame,
    out: str | Path,
    timer: Timer,
    *,
    columns: ColumnSpec,
    split_number: int | None,
    eval_on: str | None,
    tvn: bool,
    corrections: tuple[str, ...],
    null_size: int,
    seed: int,
    umap: bool,
    name: str | None,
    plot_sample: int | None,
    variants: tuple[str, ...],
    before_write: Callable[[dict[str, Any]], None] | None,
    calibrate: bool | None,
) -> Path:
    """Every stage after loading: metrics of each feature set, plots, results.json, report."""
    train, test, split_info = _held_out_split(meta, split_number, parts)
    ev, eval_on = _evaluated_rows(meta, test, split_info, eval_on)
    set_name = name or "features"
    sets = _feature_sets(x, meta, set_name, tvn, corrections, seed, timer)
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
    if should_calibrate(calibrate, meta, ev):
        with timer("calibration"):
            calibrate_sets(results_sets, set_name, x, meta, ev, seed=seed)
    results = base_results(
        "features",
        source=_table_source(features_file, meta, names, eval_on, columns, corrections, notes),
        protocol=protocol_with(corrections),
        split=split_info,
        design=design_facts(meta, train, test, ev),
        feature_sets=results_sets,
    )
    if columns.batch_col:
        results["design"]["judged_by"] = columns.batch_col
    results["warnings"] = announce(results)
    if before_write is not None:
        before_write(results)
    return _plot_and_write(results, Path(out), sets, meta, timer, umap, plot_sample, seed)


def _evaluated_rows(
    meta: pd.DataFrame, test: np.ndarray, split_info: dict[str, Any], eval_on: str | None
) -> tuple[np.ndarray, str]:
    """The rows the metrics run on and their name (``all`` / ``test``), said on stderr.

    By default the test rows of a ``Metadata_Split`` column, else all rows; ``split_info``
    records the choice.
    """
    if eval_on is None:
        eval_on = "test" if split_info.get("from_column") else "all"
    split_info["eval_on"] = eval_on
    print(f"note: held out: {split_info['how']}; metrics on {eval_on} rows", file=sys.stderr)
    return (np.ones(len(meta), bool) if eval_on == "all" else test), eval_on


def _feature_sets(
    x: np.ndarray,
    meta: pd.DataFrame,
    set_name: str,
    tvn: bool,
    corrections: tuple[str, ...],
    seed: int,
    timer: Timer,
) -> dict[str, np.ndarray]:
    """The table's profiles, their TVN variant (if asked) and each post-hoc correction."""
    sets = {set_name: x}
    if tvn:
        with timer("tvn"):
            sets[f"{set_name}+tvn"] = tvn_fn(x, meta)
    sets.update(corrected_sets(x, meta, corrections, seed=seed, timer=timer, name=set_name))
    return sets


def _table_source(
    features_file: str | Path | pd.DataFrame,
    meta: pd.DataFrame,
    names: list[str],
    eval_on: str,
    columns: ColumnSpec,
    corrections: tuple[str, ...],
    notes: list[str],
) -> dict[str, Any]:
    """The results' ``source``: the table's origin, size, columns read, corrections and notes."""
    return {
        **_origin(features_file),
        "n_profiles": len(meta),
        "n_features": len(names),
        "eval_on": eval_on,
        "columns": {
            "batch": columns.batch_col,
            "batch_pattern": columns.batch_pattern,
            "treatment": columns.treatment_col,
            "compound": columns.compound_col,
            "moa": columns.moa_col,
            "control_query": columns.control_query,
            "n_controls": int(meta["is_control"].sum()),
        },
        "corrections": list(corrections),
        "notes": notes,
    }


def _plot_and_write(
    results: dict[str, Any],
    out: Path,
    sets: dict[str, np.ndarray],
    meta: pd.DataFrame,
    timer: Timer,
    umap: bool,
    plot_sample: int | None,
    seed: int,
) -> Path:
    """UMAPs of every feature set (if ``umap``), then results.json and the report in ``out``."""
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


def _origin(features_file: str | Path | pd.DataFrame) -> dict[str, Any]:
    """Where the profiles came from: the file and its hash, or a DataFrame's content hash."""
    if isinstance(features_file, pd.DataFrame):
        digest = pd.util.hash_pandas_object(features_file, index=False).to_numpy().tobytes()
        return {"features_file": None, "features_sha256": hashlib.sha256(digest).hexdigest()[:16]}
    return {
        "features_file": str(Path(features_file).resolve()),
        "features_sha256": file_sha256(features_file),
    }


def _load_table(
    features_file: str | Path | pd.DataFrame, columns: ColumnSpec
) -> tuple[np.ndarray, pd.DataFrame, list[str], pd.Series | None, list[str]]:
    """Profiles, canonical metadata, feature names, the ``Metadata_Split`` column if any, notes.

    Parquet files stream into one float32 array (no DataFrame copy of the features). Exact
    duplicate rows are dropped (the notes say so) and a table without variance is refused.
    """
    if isinstance(features_file, pd.DataFrame):
        where = "profile table"
        x, meta_table, names = split_table(features_file.reset_index(drop=True))
    elif str(features_file).lower().endswith(".parquet"):
        where = str(features_file)
        x, meta_table, names = read_parquet_profiles(features_file)
    else:
        where = str(features_file)
        table = read_profile_table(features_file)
        if len(table) == 0:
            raise CdclError(f"{where}: the table has no rows")
        x, meta_table, names = split_table(table, where)
        del table  # the features now live in x only
    if len(x) == 0:
        raise CdclError(f"{where}: the table has no rows")
    # One memory layout whatever the source: BLAS sums in layout order, and a table with its
    # duplicates dropped must score exactly as the same table without them.
    x = np.ascontiguousarray(x)
    x, meta_table, notes = drop_duplicate_rows(x, meta_table, where)
    require_variance(x, where)
    low = {str(c).lower(): c for c in meta_table.columns}
    split_col = low.get(SPLIT_COLUMN.lower())
    parts = None
    if split_col is not None:
        parts = meta_table[split_col].astype(str).str.strip().str.lower()
    return x, columns.resolve(meta_table), names, parts, notes


def drop_duplicate_rows(
    x: np.ndarray, meta_table: pd.DataFrame, where: str | Path
) -> tuple[np.ndarray, pd.DataFrame, list[str]]:
    """The profiles without repeated rows (same features and metadata), and a note saying so.

    A row listed twice counts twice as its own replicate and inflates retrieval scores. Rows are
    compared through a 64-bit hash of features and metadata, then confirmed exactly.
    """
    meta_table = meta_table.reset_index(drop=True)
    try:
        h = pd.util.hash_pandas_object(meta_table, index=False).to_numpy()
    except TypeError:  # unhashable cells (lists from an .h5ad's obs): cannot be compared
        return x, meta_table, []
    h = (
        h * np.uint64(0x9E3779B97F4A7C15)
        ^ pd.util.hash_pandas_object(pd.DataFrame(x, copy=False), index=False).to_numpy()
    )
    first_of = pd.Series(h).groupby(h).transform("idxmin").to_numpy()
    dup = first_of != np.arange(len(h))
    if dup.any():  # exact check of the candidates (hash collisions are not duplicates)
        cand = np.flatnonzero(dup)
        same = np.all(x[cand] == x[first_of[cand]], axis=1) & np.asarray(
            [meta_table.iloc[i].equals(meta_table.iloc[j]) for i, j in zip(cand, first_of[cand])]
        )
        dup[cand[~same]] = False
    if not dup.any():
        return x, meta_table, []
    first = int(np.flatnonzero(dup)[0])
    keys = [c for c in meta_table.columns][:3]
    shown = ", ".join(f"{k}={meta_table.iloc[first][k]}" for k in keys)
    note = (
        f"{where}: {int(dup.sum())} duplicated rows (identical features and metadata) dropped; "
        f"the first is row {first}{f' ({shown})' if shown else ''}, a copy of row "
        f"{int(first_of[first])}"
    )
    keep = ~dup
    return x[keep], meta_table.loc[keep].reset_index(drop=True), [note]


def require_variance(x: np.ndarray, where: str | Path) -> None:
    """Refuse a table whose every feature is constant: any score on it is meaningless."""
    if len(x) < 2:
        raise CdclError(
            f"{where}: {len(x)} profile(s); scoring needs profiles of several treatments and "
            "controls"
        )
    spread = np.ptp(x, axis=0)
    if np.all(spread[np.isfinite(spread)] == 0) and np.isfinite(spread).any():
        raise CdclError(
            f"{where}: every one of the {x.shape[1]} feature columns is constant (no variance); "
            "check the export, nothing can be scored on it"
        )


def _held_out_split(
    meta: pd.DataFrame, split_number: int | None, parts: pd.Series | None = None
) -> tuple[np.ndarray | None, np.ndarray, dict[str, Any]]:
    """Train and test masks: the table's ``Metadata_Split`` column, else fold ``split_number``.

    One batch: no train set, all rows test. The returned dict says which batches are held out
    and why (``how``).
    """
    batches = sorted(meta["batch"].astype(str).unique())
    if len(batches) < 2:
        how = f"nothing (one batch, {batches[0] if batches else '-'}): no held-out-batch classification"
        note = {"number": None, "note": "one batch: no held-out-batch classification", "how": how}
        return None, np.ones(len(meta), bool), note
    if split_number is None and parts is not None:
        split = parts.where(parts.isin(["train", "test"]), "unused").reset_index(drop=True)
        if (split == "train").any() and (split == "test").any():
            info = split_masks(meta, split.rename("split"))
            how = (
                f"{', '.join(info['test_batches'])} (the table's {SPLIT_COLUMN} column: the "
                "batches the run held out)"
            )
            out = {"number": None, "from_column": SPLIT_COLUMN, "how": how, **info}
            return (split == "train").to_numpy(), (split == "test").to_numpy(), out
    number = 1 if split_number is None else int(split_number)
    split = rotating_batch_split(meta, number)
    info = split_masks(meta, split)
    if split_number is not None:
        why = f"fold {number} as asked"
    elif parts is not None:
        why = f"fold {number}: the table's {SPLIT_COLUMN} column has no train and test rows"
    else:
        why = f"fold {number}: the table has no {SPLIT_COLUMN} column; --split N picks another"
    how = (
        f"{', '.join(info['test_batches'])} ({why}; the rotation over {len(batches)} batches "
        "holds out a third of them, at least two from four)"
    )
    out = {"number": number, "how": how, **info}
    return (split == "train").to_numpy(), (split == "test").to_numpy(), out
