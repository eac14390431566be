"""`cdcl synth --out DIR`: render the built-in simulated screen into a dataset directory."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

HELP = "Render the built-in simulated Cell Painting screen (tiny/small/medium) as a dataset."

# CLI flag -> ScreenConfig field (all optional; None keeps the preset's value)
OVERRIDES: dict[str, tuple[str, type, str]] = {
    "--batches": ("batches", int, "number of batches"),
    "--plates": ("plates", int, "plates per batch"),
    "--moas": ("moas", int, "mechanisms of action"),
    "--compounds-per-moa": ("compounds_per_moa", int, "compounds per MoA"),
    "--doses": ("doses", str, "comma-separated doses, e.g. 0.3,1,3 ('none': one dose, 1.0)"),
    "--wells-per-treatment": ("wells_per_treatment", int, "wells per treatment on each plate"),
    "--control-wells": ("control_wells", int, "negative-control (DMSO) wells per plate"),
    "--sites": ("sites", int, "fields of view per well"),
    "--image-size": ("image_size", int, "image side in pixels (same field of view)"),
    "--cells-per-field": ("cells_per_field", float, "mean cells per control field"),
    "--test-batches": (
        "test_batches",
        int,
        "held-out test batches, added after the preset's training batches (which stay "
        "identical; with --batches: the last of those batches)",
    ),
    "--val-batches": ("val_batches", int, "batches before the test ones used as val"),
    "--batch-strength": (
        "batch_strength",
        float,
        "multiplier of every batch, plate and well-position effect: 0 none, 1 calibrated "
        "against BBBC021 (default 1)",
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `cdcl synth`."""
    parser.add_argument("--out", type=Path, required=True, help="dataset directory to write")
    parser.add_argument(
        "--preset",
        default="small",
        choices=("tiny", "small", "medium"),
        help="tiny: tests (96 images, 32 px); small: demo (2016 images, 64 px); "
        "medium: benchmarks (8064 images, 64 px, 3 doses). Default small.",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a different dataset already at --out"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--no-calibration",
        action="store_true",
        help="skip measuring the batch effect against the real references (calibration.json)",
    )
    parser.add_argument(
        "--montage", type=Path, default=None, help="also save a PNG montage (one row per batch)"
    )
    group = parser.add_argument_group("overrides of the preset")
    for flag, (dest, kind, text) in OVERRIDES.items():
        group.add_argument(flag, dest=dest, type=kind, default=None, help=text)


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    """The overrides the user actually gave (None means: keep the preset's value)."""
    return {
        dest: getattr(args, dest)
        for dest, _, _ in OVERRIDES.values()
        if getattr(args, dest, None) is not None
    }


def run(args: argparse.Namespace) -> int:
    """Generate (or reuse) the dataset, holding the output directory's lock, and summarise it."""
    from cdcl.locking import command_lock

    with command_lock(args.out, "cdcl synth"):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from cdcl.data import synthetic
    from cdcl.data.dataset_dir import open_dataset

    overrides = overrides_from(args)
    cfg = synthetic.resolve_config(args.preset, **overrides)
    key = synthetic.build_key(args.preset, args.seed, **overrides)
    out: Path = args.out
    start = time.perf_counter()
    if not args.overwrite and synthetic.reusable(out, key):
        print(
            f"cdcl synth: {out} already holds this screen (preset {args.preset}, seed "
            f"{args.seed}); reusing it (--overwrite rebuilds)"
        )
        reused = True
    else:
        synthetic.generate(
            out,
            args.preset,
            args.seed,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            **overrides,
        )
        reused = False
    elapsed = time.perf_counter() - start
    ds = open_dataset(out)
    s = ds.samples
    parts = s.groupby("split")["batch"].unique()
    split = "; ".join(f"{k} {', '.join(sorted(v))}" for k, v in sorted(parts.items()))
    n_t = s.loc[~s["is_control"], "treatment"].nunique()
    n_m = s.loc[~s["is_control"], "moa"].nunique()
    lines = [
        f"screen   preset {args.preset}, seed {args.seed}: {cfg.batches} batches x {cfg.plates} "
        f"plates x {cfg.n_wells} wells x {cfg.sites} sites",
        f"images   {len(s)} ({cfg.image_size}x{cfg.image_size} px, 5 channels "
        f"{', '.join(ds.channels)}, uint16)",
        f"design   {n_t} treatments in {n_m} MoAs + control {synthetic.CONTROL} on every plate",
        f"split    {split}",
    ]
    if not reused:
        lines.append(f"speed    {len(s) / max(elapsed, 1e-9):.0f} images/s ({elapsed:.1f} s)")
    if args.montage is not None:
        from cdcl.data.montage import montage

        lines.append(f"montage  {montage(ds, args.montage)}")
    lines.append(f"strength batch effect x {cfg.batch_strength:g} (1 = calibrated)")
    if not args.no_calibration:
        from cdcl.experiments.screen_calibration import (
            CALIBRATION_FILE,
            dataset_calibration,
            report_lines,
        )

        lines.extend(report_lines(dataset_calibration(out)))
        lines.append(f"calib    {out / CALIBRATION_FILE}")
    lines.append(f"truth    {out / synthetic.GROUND_TRUTH_FILE}")
    lines.append(f"dataset  {out}")
    print("\n".join(lines))
    return 0
