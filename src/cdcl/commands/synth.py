"""`cdcl synth --out DIR`: render the built-in simulated screen into a dataset directory."""

from __future__ import annotations

import argparse
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
    """Generate (or reuse) the dataset through `cdcl.synth`, which prints its summary."""
    from cdcl.api import synth

    synth(
        args.out,
        args.preset,
        seed=args.seed,
        overwrite=args.overwrite,
        calibration=not args.no_calibration,
        montage=args.montage,
        progress=not args.no_progress,
        verbose=True,
        **overrides_from(args),
    )
    return 0
