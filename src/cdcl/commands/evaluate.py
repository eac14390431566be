"""`cdcl evaluate`: score a run (embeddings + baselines) or any profile table; results.json + report."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cdcl.errors import CdclError

BIG_TABLE_BYTES = 64 * 2**20  # a profile table this large prints progress from the start
HELP = (
    "Evaluate a run on its held-out batches (writes RUN/results.json, plots, report.html), "
    "or score any profile table with --features FILE --out DIR."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `cdcl evaluate`."""
    parser.add_argument("run", nargs="?", type=Path, help="run directory (omit with --features)")
    parser.add_argument(
        "--checkpoint",
        default="best",
        help="best | last | PATH to a checkpoint file (default best)",
    )
    parser.add_argument("--data", type=Path, help="dataset directory (default: the run's)")
    parser.add_argument(
        "--split",
        type=int,
        help="held-out-batch fold (default: the run's; for --features the table's "
        "Metadata_Split column, else fold 1)",
    )
    parser.add_argument("--out", type=Path, help="output directory (default: the run directory)")
    parser.add_argument(
        "--level",
        choices=("well", "image"),
        default="well",
        help="profiles to score: well (mean over a well's images, default) or image (each "
        "image on its own, e.g. single-cell crops as in BBBC021)",
    )
    parser.add_argument(
        "--no-baselines", action="store_true", help="skip the intensity and random baselines"
    )
    parser.add_argument(
        "--cellprofiler",
        action="store_true",
        help="also score CellProfiler features (cp-measure on every cell, median per well, "
        "normalised and feature-selected; see docs/cellprofiler.md), with the --correct rows",
    )
    parser.add_argument("--no-umap", action="store_true", help="skip the UMAP plots")
    parser.add_argument(
        "--plot-sample",
        type=int,
        default=20_000,
        metavar="N",
        help="UMAPs draw a seeded sample of at most N rows, stratified by batch and treatment "
        "(default 20000; 0 = every row); metrics always use every row",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--null-size", type=int, default=2000, help="mAP null distribution size")
    parser.add_argument("--seed", type=int, default=0, help="seed of baselines, UMAP, kBET")
    parser.add_argument(
        "--correct",
        metavar="LIST",
        help="also score every feature set after post-hoc batch corrections, comma-separated: "
        "sphering, harmony, combat (Harmony and ComBat are fitted on the evaluated profiles)",
    )
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="also score the main feature set's design under a null (profiles permuted within "
        "treatment) and injected batch effects (0.25-4 x the median treatment effect, and a "
        "non-linear one); metrics that cannot see the strongest are marked 'no power'",
    )
    g = parser.add_argument_group("profile tables (--features)")
    g.add_argument("--features", type=Path, help="profile table: .csv[.gz], .parquet or .h5ad")
    g.add_argument("--batch-col", help="batch column (default Metadata_Batch, else the plate)")
    g.add_argument(
        "--batch-pattern",
        help=r"regex applied to the batch column; its first group is the batch (e.g. '^(Week\d+)')",
    )
    g.add_argument(
        "--treatment-col", help="treatment column(s), comma-separated to combine (e.g. A,B)"
    )
    g.add_argument("--compound-col", help="compound column (default Metadata_Compound)")
    g.add_argument("--moa-col", help="MoA column (default Metadata_MoA)")
    g.add_argument("--plate-col", help="plate column (default Metadata_Plate)")
    g.add_argument("--well-col", help="well column (default Metadata_Well)")
    g.add_argument(
        "--control-query",
        help="condition selecting negative controls, e.g. \"Metadata_Compound == 'DMSO'\" "
        "(column comparisons ==, !=, <, >, <=, >=, in [...], joined with &, |, ~; nothing else; "
        "default: Metadata_control_type == negcon, else a Metadata_is_control column, else "
        "treatments named DMSO)",
    )
    g.add_argument(
        "--eval-on",
        choices=("all", "test"),
        default=None,
        help="rows for the unsupervised metrics of a table (default: the held-out rows when the "
        "table has a Metadata_Split column, as for a run; else all)",
    )
    g.add_argument("--tvn", action="store_true", help="also score the table after TVN")
    g.add_argument(
        "--variants",
        default="raw,plate_normalized",
        help="profile variants to score, comma-separated: raw, plate_normalized (default both; "
        "raw alone needs one copy of the table less)",
    )
    g.add_argument("--name", help="name of the feature set in the results (default features)")


def run(args: argparse.Namespace) -> int:
    """Dispatch to the table or the run evaluation and print where the results went."""
    from cdcl.locking import command_lock
    from cdcl.report.html import metrics_table
    from cdcl.report.results import read_results

    def refuse_empty(results: dict[str, Any]) -> None:
        # Called before anything is written: an earlier results.json in --out stays intact.
        if any_figure(results):
            return
        lines = why_missing(results)
        for line in lines:
            print(f"cdcl evaluate: note: {line}", file=sys.stderr)
        first = lines[0] if lines else "every metric came out empty"
        level = "" if args.features is not None or args.level == "image" else "; or --level image"
        raise CdclError(
            f"no metric could be computed on the held-out profiles ({first}); evaluate a fold "
            f"whose held-out batches carry treatments the training batches have (--split N){level}"
            "; nothing was written"
        )

    if args.plot_sample < 0:
        raise CdclError(f"--plot-sample {args.plot_sample}: give a row count >= 0 (0 = every row)")
    corrections: tuple[str, ...] = ()
    if args.correct is not None:
        from cdcl.profiles.correction import parse_corrections

        # Checked before any loading: a typo costs no embedding time.
        corrections = parse_corrections(args.correct)
    if args.features is not None:
        if args.run is not None:
            raise CdclError("give either a RUN directory or --features FILE, not both")
        if args.out is None:
            raise CdclError("--features needs --out DIR for results.json and the report")
        if args.cellprofiler:
            raise CdclError(
                "--cellprofiler measures a run's images; for a table, make one with "
                "`cdcl embed --features cellprofiler` and score it with --features"
            )
    elif args.run is None:
        raise CdclError("give a RUN directory, or --features FILE --out DIR")
    with command_lock(args.out or args.run, "cdcl evaluate"):
        path = _evaluate(args, corrections, refuse_empty)
    results = read_results(path)
    _print_calibration(results)
    table = metrics_table(results)
    if not table.empty:
        import pandas as pd

        with pd.option_context("display.width", 160, "display.max_columns", 12):
            print(table.apply(pd.to_numeric).round(3).to_string(na_rep="-"))
    if corrections:
        from cdcl.metrics.score import protocol_with

        print(protocol_with(corrections)["corrections"])
    print(f"results: {path}")
    print(f"report:  {path.parent / 'report.html'}")
    for line in [*((results.get("source") or {}).get("notes") or []), *why_missing(results)]:
        print(f"cdcl evaluate: note: {line}", file=sys.stderr)
    return 0


def _evaluate(
    args: argparse.Namespace,
    corrections: tuple[str, ...],
    before_write: Callable[[dict[str, Any]], None],
) -> Path:
    """Run the table or the run evaluation; the path of its results.json."""
    if args.features is not None:
        return _evaluate_table(args, corrections, before_write)
    from cdcl.evaluation.run import evaluate_run  # models and views: runs only
    from cdcl.progress import keep_alive

    # Embedding, scoring and drawing: a line per stage, and one after every 10 s of silence.
    with keep_alive(True):
        return _run_evaluation(evaluate_run, args, corrections, before_write)


def _run_evaluation(
    evaluate_run: Callable[..., Path],
    args: argparse.Namespace,
    corrections: tuple[str, ...],
    before_write: Callable[[dict[str, Any]], None],
) -> Path:
    """``evaluate_run`` with the command's options."""
    return evaluate_run(
        args.run,
        checkpoint=args.checkpoint,
        data=args.data,
        split_number=args.split,
        out=args.out,
        baselines=(() if args.no_baselines else ("intensity", "random"))
        + (("cellprofiler",) if args.cellprofiler else ()),
        corrections=corrections,
        batch_size=args.batch_size,
        null_size=args.null_size,
        seed=args.seed,
        umap=not args.no_umap,
        level=args.level,
        before_write=before_write,
        plot_sample=args.plot_sample,
    )


def _evaluate_table(
    args: argparse.Namespace,
    corrections: tuple[str, ...],
    before_write: Callable[[dict[str, Any]], None],
) -> Path:
    """``evaluate_table`` with the command's options; a large table says so from the start."""
    from cdcl.progress import keep_alive, say

    # Importing the metric libraries takes seconds (tens on a busy machine): a large table
    # gets a first line and the keep-alive before them, not after.
    big = args.features.is_file() and args.features.stat().st_size > BIG_TABLE_BYTES
    if big:
        say("cdcl evaluate: loading the evaluation libraries ...")
    with keep_alive(big):
        from cdcl.evaluation.table_file import evaluate_table

        return evaluate_table(
            args.features,
            args.out,
            batch_col=args.batch_col,
            batch_pattern=args.batch_pattern,
            treatment_col=args.treatment_col,
            compound_col=args.compound_col,
            moa_col=args.moa_col,
            plate_col=args.plate_col,
            well_col=args.well_col,
            control_query=args.control_query,
            split_number=args.split,
            eval_on=args.eval_on,
            tvn=args.tvn,
            corrections=corrections,
            null_size=args.null_size,
            seed=args.seed,
            umap=not args.no_umap,
            name=args.name,
            before_write=before_write,
            calibrate=args.calibrate,
            plot_sample=args.plot_sample,
            variants=_variants(args.variants),
        )


def _print_calibration(results: dict[str, Any]) -> None:
    """The calibration table of each calibrated feature set, and its metrics without power."""
    from cdcl.report.calibration import calibration_table

    for name, res in (results.get("feature_sets") or {}).items():
        cal = res.get("calibration") if isinstance(res, dict) else None
        if not cal:
            continue
        import pandas as pd

        print(f"calibration of {name} (raw profiles, {cal['design']['n_profiles']} rows):")
        with pd.option_context("display.width", 200, "display.max_columns", 12):
            print(calibration_table(cal).round(3).to_string(index=False, na_rep="-"))
        for label in cal.get("no_power", []):
            print(f"  {label}: {cal['metrics'][label]['reason']}")


def _variants(text: str) -> tuple[str, ...]:
    """The --variants list, checked before anything is loaded."""
    from cdcl.metrics.score import VARIANTS

    names = tuple(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    bad = [v for v in names if v not in VARIANTS]
    if bad or not names:
        raise CdclError(f"--variants {text}: use a comma-separated list of {', '.join(VARIANTS)}")
    return names


def why_missing(results: dict[str, Any]) -> list[str]:
    """The distinct one-line reasons of metrics not computed or failed, in first-seen order."""
    lines: dict[str, None] = {}
    for res in (results.get("feature_sets") or {}).values():
        for text in (res.get("unavailable") or {}).values():
            lines[str(text)] = None
        for name, text in (res.get("errors") or {}).items():
            metric = name.split(".", 1)[-1]
            lines[f"{metric}: failed ({text})"] = None
    return list(lines)


def any_figure(results: dict[str, Any]) -> bool:
    """True when at least one headline metric of any feature set is a number."""
    import math

    from cdcl.report.html import metrics_long

    long = metrics_long(results)
    # The batch classifier's chance level depends on the labels only: not a figure of the features.
    long = long[long["metric"] != "batch classifier chance"]
    return any(isinstance(v, int | float) and math.isfinite(v) for v in long["value"])
