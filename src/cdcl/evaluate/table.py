"""``cdcl evaluate --features FILE``: score any profile table with the run's code."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cdcl.data.splits import rotating_batch_split
from cdcl.errors import CdclError
from cdcl.evaluate.embed import (
    METADATA_PREFIX,
    read_profile_table,
    split_table,
)
from cdcl.evaluate.profiles import resolve_table_meta
from cdcl.evaluate.profiles import tvn as tvn_fn
from cdcl.evaluate.report import make_plots, render_report
from cdcl.evaluate.results import RESULTS_FILE, write_results
from cdcl.evaluate.score import (
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
    before_write: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """``cdcl evaluate --features FILE``: score any ``Metadata_*`` profile table with the same code.

    Classification trains on the batches of fold ``split_number`` (``rotating_batch_split``) and
    tests on its held-out batches; the other metrics run on all rows (``eval_on="all"``) or
    on the held-out batches only (``"test"``, as for a run). ``corrections`` adds the table
    after each post-hoc correction (``sphering``, ``harmony``, ``combat``), fitted on all rows.
    ``before_write`` sees the results first and may refuse them (raise): then nothing in
    ``out`` is touched. Exact duplicate rows are dropped (said in ``source.notes``).
    """

    if eval_on not in ("all", "test"):
        raise CdclError(f"--eval-on {eval_on}: use all or test")
    timer = Timer()
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
    with timer("load"):
        x, meta, names, notes = _load_table(features_file, columns)
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
        "notes": notes,
    }
    results = base_results(
        "features",
        source=source,
        protocol=protocol_with(corrections),
        split=split_info,
        feature_sets=results_sets,
    )
    if before_write is not None:
        before_write(results)
    out = Path(out)
    if umap:
        with timer("plots"):
            make_plots(out, {n: (xs, meta) for n, xs in sets.items()}, seed=seed)
    results["timings_s"] = timer.times
    write_results(results, out)
    render_report(results, out)
    return out / RESULTS_FILE


def _load_table(
    features_file: str | Path, columns: dict[str, str | None]
) -> tuple[np.ndarray, pd.DataFrame, list[str], list[str]]:
    """Profiles, canonical metadata, feature names and notes (duplicates dropped)."""
    table = read_profile_table(features_file)
    if len(table) == 0:
        raise CdclError(f"{features_file}: the table has no rows")
    table, notes = drop_duplicate_rows(table, features_file)
    x, meta_table, names = split_table(table)
    require_variance(x, features_file)
    return x, resolve_table_meta(meta_table, **columns), names, notes


def drop_duplicate_rows(table: pd.DataFrame, where: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """The table without repeated rows (same features and metadata), and a note saying so.

    A row listed twice counts twice as its own replicate and inflates retrieval scores.
    """
    try:
        dup = table.duplicated(keep="first").to_numpy()
    except TypeError:  # unhashable cells (lists from an .h5ad's obs): cannot be compared
        return table, []
    if not dup.any():
        return table, []
    hashes = pd.util.hash_pandas_object(table, index=False).to_numpy()
    first = int(np.flatnonzero(dup)[0])
    twin = int(np.flatnonzero(hashes == hashes[first])[0])
    keys = [c for c in table.columns if str(c).startswith(METADATA_PREFIX)][:3]
    shown = ", ".join(f"{k}={table.iloc[first][k]}" for k in keys)
    note = (
        f"{where}: {int(dup.sum())} duplicated rows (identical features and metadata) dropped; "
        f"the first is row {first}{f' ({shown})' if shown else ''}, a copy of row {twin}"
    )
    return table.loc[~dup].reset_index(drop=True), [note]


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
