"""``cdcl evaluate --features FILE``: score any profile table with the run's code."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cdcl.data.splits import rotating_batch_split
from cdcl.errors import CdclError
from cdcl.evaluate.calibration import calibrate as calibrate_fn
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

SPLIT_COLUMN = "Metadata_Split"  # what `cdcl embed` writes: the run's train / val / test part


def evaluate_table(
    features_file: str | Path | pd.DataFrame,
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
    split_number: int | None = None,
    eval_on: str | None = None,
    tvn: bool = False,
    corrections: tuple[str, ...] = (),
    null_size: int = 2000,
    seed: int = 0,
    umap: bool = True,
    name: str | None = None,
    before_write: Callable[[dict[str, Any]], None] | None = None,
    calibrate: bool = False,
) -> Path:
    """``cdcl evaluate --features FILE``: score any ``Metadata_*`` profile table with the same code.

    ``features_file`` is a file or a DataFrame. Without ``split_number``, a ``Metadata_Split``
    column (``cdcl embed`` writes the run's split there) decides: classification trains on its
    ``train`` rows and tests on its ``test`` rows, and the other metrics run on the ``test``
    rows, as ``cdcl evaluate RUN`` does. Otherwise classification trains on the batches of fold
    ``split_number`` (default 1, ``rotating_batch_split``) and tests on its held-out batches,
    and the other metrics run on all rows. ``eval_on`` (``"all"`` or ``"test"``) overrides that
    choice of rows. Which batches are held out, and why, is printed and kept in the results.
    ``corrections`` adds the table after each post-hoc correction (``sphering``, ``harmony``,
    ``combat``), fitted on all rows.
    ``before_write`` sees the results first and may refuse them (raise): then nothing in
    ``out`` is touched. Exact duplicate rows are dropped (said in ``source.notes``).
    ``calibrate`` adds the table's null and injected-batch-effect scores
    (:func:`cdcl.evaluate.calibration.calibrate`) under ``calibration`` of the table's set.
    """

    if eval_on not in (None, "all", "test"):
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
        x, meta, names, parts, notes = _load_table(features_file, columns)
    train, test, split_info = _held_out_split(meta, split_number, parts)
    if eval_on is None:
        eval_on = "test" if split_info.get("from_column") else "all"
    split_info["eval_on"] = eval_on
    print(f"held out: {split_info['how']}; metrics on {eval_on} rows", file=sys.stderr)
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
    if calibrate:
        with timer("calibration"):
            results_sets[set_name]["calibration"] = calibrate_fn(
                x, meta, eval_mask=ev, seed=seed, name=set_name
            )
    if isinstance(features_file, pd.DataFrame):
        digest = pd.util.hash_pandas_object(features_file, index=False).to_numpy().tobytes()
        origin = {
            "features_file": None,
            "features_sha256": hashlib.sha256(digest).hexdigest()[:16],
        }
    else:
        origin = {
            "features_file": str(Path(features_file).resolve()),
            "features_sha256": file_sha256(features_file),
        }
    source = {
        **origin,
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
    features_file: str | Path | pd.DataFrame, columns: dict[str, str | None]
) -> tuple[np.ndarray, pd.DataFrame, list[str], pd.Series | None, list[str]]:
    """Profiles, canonical metadata, feature names, the ``Metadata_Split`` column if any, notes.

    Exact duplicate rows are dropped (the notes say so) and a table without variance is refused.
    """
    if isinstance(features_file, pd.DataFrame):
        table, where = features_file.reset_index(drop=True), "profile table"
    else:
        table, where = read_profile_table(features_file), str(features_file)
    if len(table) == 0:
        raise CdclError(f"{where}: the table has no rows")
    table, notes = drop_duplicate_rows(table, where)
    x, meta_table, names = split_table(table)
    require_variance(x, where)
    low = {str(c).lower(): c for c in meta_table.columns}
    split_col = low.get(SPLIT_COLUMN.lower())
    parts = None
    if split_col is not None:
        parts = meta_table[split_col].astype(str).str.strip().str.lower()
    return x, resolve_table_meta(meta_table, **columns), names, parts, notes


def drop_duplicate_rows(table: pd.DataFrame, where: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """The table without repeated rows (same features and metadata), and a note saying so.

    A row listed twice counts twice as its own replicate and inflates retrieval scores.
    """
    dup = table.duplicated(keep="first").to_numpy()
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
