"""`cdcl study`: the demo's comparison over seeds and held-out-batch folds, with CIs and verdicts."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

HELP = (
    "Run the demo's methods over several seeds and/or held-out-batch folds, and report the mean, "
    "95 percent CI and the paired difference from a reference (with a paired t-test and a verdict) for "
    "every metric: study.json, study.md, report.html."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `cdcl study`."""
    parser.add_argument("--out", type=Path, default=Path("study_out"), help="output directory")
    parser.add_argument(
        "--dataset",
        choices=("synthetic", "bbbc021"),
        default="synthetic",
        help="synthetic: the `small` simulated screen, regenerated per seed (default); "
        "bbbc021: the real week-4 crops",
    )
    parser.add_argument(
        "--methods",
        default=None,
        help="comma-separated methods (default: all of the dataset's: supervised,DINO,DINO-CB,"
        "CDCL on synthetic, DINO,CDCL on bbbc021); CDCL-same-batch, the pairing control, only "
        "when named",
    )
    parser.add_argument(
        "--seeds",
        default=None,
        help="comma-separated seeds (default 0,1,2; --quick: 0,1); on the simulated screen the "
        "seed sets both the screen and the training",
    )
    parser.add_argument(
        "--folds",
        default=None,
        help="comma-separated held-out-batch folds (`--split N` of training), e.g. 1,2,3 "
        "(default: the dataset's stored held-out batches)",
    )
    parser.add_argument(
        "--reference",
        default=None,
        help="row(s) every other row is compared with, comma-separated; rows not present are "
        "skipped (default DINO,DINO+harmony; with --cellprofiler also CellProfiler+harmony)",
    )
    parser.add_argument(
        "--epochs", type=int, default=None, help="training epochs per method (default: the demo's)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the tiny screen, 2 replicates, the demo's quick budget",
    )
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level (0.05)")
    parser.add_argument(
        "--bbbc021-dir", type=Path, default=None, help="folder with cells_subset.npz (bbbc021)"
    )
    parser.add_argument(
        "--test-batches",
        type=int,
        default=None,
        help="simulated screen: held-out batches, added after the training batches (which "
        "stay identical); default: the preset's",
    )
    parser.add_argument(
        "--batch-strength",
        default=None,
        help="simulated screen: batch-effect multiplier, 0 none, 1 calibrated (default 1); "
        "several, e.g. 0,0.5,1,2, run one study per strength in OUT/bs<s>/ and write the "
        "curve of CDCL - reference against strength (curve.md, curve.json, curve.png)",
    )
    parser.add_argument(
        "--cellprofiler",
        action="store_true",
        help="add the CellProfiler row (cp-measure per cell) and its corrected rows to every "
        "replicate, and CellProfiler+harmony to the default references",
    )
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="calibrate every replicate's design (null and injected batch effects); "
        "pre-declared metrics without power are reported and left out of the verdicts",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="a screen you built (cdcl build ...): train the generic presets on it and score "
        "its held-out-batch folds (--folds); leave-one-plate-out or leave-one-replicate-out "
        "come from building it with that column as the batch",
    )
    parser.add_argument(
        "--level",
        choices=("well", "image"),
        default=None,
        help="score well or image profiles (default: the dataset's; image on BBBC021)",
    )
    parser.add_argument(
        "--primary-metric",
        default=None,
        help="the metric of the pre-registered primary endpoint, CDCL - the first reference "
        "(default: replicate mAP (other batch), which needs two held-out batches per fold)",
    )
    parser.add_argument(
        "--train-treatments",
        choices=("all", "half"),
        default="all",
        help="all: train on every compound (default); half: every method trains on the same "
        "half of the compounds (drawn with each replicate's seed) plus the controls, and every metric is "
        "also reported on the seen and on the unseen compounds",
    )
    parser.add_argument(
        "--note",
        default=None,
        help="the design's rationale (why these seeds, say), stored in OUT/design.json with "
        "the endpoints when the design is fixed",
    )
    parser.add_argument("--fresh", action="store_true", help="rebuild data and retrain everything")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Run the study through `cdcl.study` and print the headline comparison and the report."""
    from cdcl.api import study
    from cdcl.experiments.study import headline_text

    t0 = time.perf_counter()
    out = study(
        args.out,
        dataset=args.dataset,
        methods=args.methods,
        seeds=args.seeds,
        folds=args.folds,
        references=args.reference,
        epochs=args.epochs,
        quick=args.quick,
        fresh=args.fresh,
        bbbc021_dir=args.bbbc021_dir,
        alpha=args.alpha,
        test_batches=args.test_batches,
        batch_strength=args.batch_strength,
        cellprofiler=args.cellprofiler,
        calibrate=args.calibrate,
        train_treatments=args.train_treatments,
        note=args.note,
        data=args.data,
        level=args.level,
        primary_metric=args.primary_metric,
        progress=not args.no_progress,
    )
    print()
    if "curve" in out:
        print(out["paths"]["md"].read_text())
        print(f"curve: {out['paths']['md']} {out['paths']['png'] or ''}")
        print(f"  {'total':<32s} {time.perf_counter() - t0:7.1f} s")
        return 0
    print(headline_text(out["study"]))
    print()
    for name, secs in out["study"]["timings_s"].items():
        print(f"  {name:<32s} {secs:7.1f} s")
    print(f"  {'total':<32s} {time.perf_counter() - t0:7.1f} s")
    print(f"\nreport: {out['paths']['html']}")
    print(f"tables: {out['paths']['md']}")
    return 0
