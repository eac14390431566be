"""`cdcl evaluate`: score a run (embeddings + baselines) or any profile table; results.json + report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cdcl.errors import CdclError

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
    parser.add_argument(
        "--no-umap",
        action="store_true",
        help="skip the UMAP plots (drawn by default, as by cdcl.evaluate)",
    )
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
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also score the main feature set's design under a null (profiles permuted within "
        "treatment) and injected batch effects (0.25-4 x the median treatment effect, and a "
        "non-linear one); metrics that cannot see the strongest are marked 'no power' and "
        "left out of the aggregate (default: on for designs under 50 profiles per batch)",
    )
    g = parser.add_argument_group("profile tables (--features)")
    g.add_argument("--features", type=Path, help="profile table: .csv[.gz], .parquet or .h5ad")
    g.add_argument(
        "--batch-col",
        help="batch column mixing is judged by (default Metadata_Batch, else the plate; with a "
        "RUN, any Metadata_* column of its dataset, e.g. the acquisition batch of a run paired "
        "by plate)",
    )
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
    """Evaluate the run or the table through `cdcl.evaluate` and print where the results went."""
    from cdcl.api import evaluate

    if args.features is not None and args.run is not None:
        raise CdclError("give either a RUN directory or --features FILE, not both")
    if args.features is None and args.run is None:
        raise CdclError("give a RUN directory, or --features FILE --out DIR")
    if args.features is not None and args.out is None:
        raise CdclError("--features needs --out DIR for results.json and the report")
    results = evaluate(
        args.features if args.features is not None else args.run,
        args.out,
        fold=args.split,
        batch_col=args.batch_col,
        batch_pattern=args.batch_pattern,
        treatment_col=args.treatment_col,
        compound_col=args.compound_col,
        moa_col=args.moa_col,
        plate_col=args.plate_col,
        well_col=args.well_col,
        control_query=args.control_query,
        eval_on=args.eval_on,
        tvn=args.tvn,
        variants=args.variants,
        name=args.name,
        corrections=args.correct or (),
        checkpoint=args.checkpoint,
        data=args.data,
        level=args.level,
        baselines=not args.no_baselines,
        cellprofiler=args.cellprofiler,
        batch_size=args.batch_size,
        null_size=args.null_size,
        seed=args.seed,
        calibrate=args.calibrate,
        umap=not args.no_umap,
        plot_sample=args.plot_sample,
        progress=True,
    )
    _print_results(results, Path(args.out or args.run) / "results.json")
    return 0


def _print_results(results: dict[str, Any], path: Path) -> None:
    """The calibration, the metrics table, the corrections, where the results went, and notes."""
    from cdcl.evaluation.checks import why_missing
    from cdcl.report.html import metrics_table

    _print_calibration(results)
    table = metrics_table(results)
    if not table.empty:
        import pandas as pd

        with pd.option_context("display.width", 160, "display.max_columns", 12):
            print(table.apply(pd.to_numeric).round(3).to_string(na_rep="-"))
    fitted = (results.get("protocol") or {}).get("corrections")
    if fitted:  # the corrections were fitted on the evaluated profiles: say so
        print(fitted)
    print(f"results: {path}")
    print(f"report:  {path.parent / 'report.html'}")
    for line in [*((results.get("source") or {}).get("notes") or []), *why_missing(results)]:
        print(f"cdcl evaluate: note: {line}", file=sys.stderr)


def _print_calibration(results: dict[str, Any]) -> None:
    """The calibration table of each calibrated feature set, and its metrics without power."""
    from cdcl.report.calibration import calibrated_variants, calibration_table

    for name, res in (results.get("feature_sets") or {}).items():
        cal = res.get("calibration") if isinstance(res, dict) else None
        if not cal:
            continue
        import pandas as pd

        for variant, body in calibrated_variants(cal).items():
            rows = cal["design"]["n_profiles"]
            print(f"calibration of {name} ({variant} profiles, {rows} rows):")
            with pd.option_context("display.width", 200, "display.max_columns", 12):
                table = calibration_table(cal, variant)
                print(table.round(3).to_string(index=False, na_rep="-"))
            for label in body.get("no_power", []):
                print(f"  {label}: {body['metrics'][label]['reason']}")
