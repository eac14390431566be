"""Fit the simulated screen's nuisance half-widths to the BBBC021 calibration targets.

Run: ``PYTHONPATH=src python benchmarks/fit_calibration.py --optics 1 --bio 1 [--seeds 0]``
(multipliers of the current, fitted half-widths; 1 1 measures the calibrated screen).
Two multipliers scale the half-widths in ``cdcl.data.nuisance.KNOBS``: ``--optics`` (staining
response, bleed-through, blur and focus, noise, illumination, gain/offset) and ``--bio``
(density, size, response, edge and plate jitter). For each pair it renders the training and
validation batches of a ``small`` screen with 2 extra validation batches (6 measured batches,
as BBBC021 week 4 has 6 plates) and prints the calibration measures next to the targets.
Only nuisance parameters move; treatments are untouched (docs/calibration.md).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from cdcl.data import nuisance as nz
from cdcl.data import synthetic
from cdcl.experiments import screen_calibration as calibration

OPTICS = (
    "log_gain", "offset", "log_gamma", "log_saturation", "bleed", "log_blur", "focus_sd",
    "log_read_noise", "log_shot_noise", "illum_gradient", "vignetting", "plate_log_gain_sd",
)  # fmt: skip
BIO = (
    "log_density", "log_size", "log_response", "edge", "plate_log_density_sd", "log_well_jitter",
)  # fmt: skip


def measure(optics: float, bio: float, seed: int, strength: float = 1.0) -> dict:
    """Render the non-test batches with scaled half-widths and measure them."""
    saved = {k: dict(v) for k, v in nz.KNOBS.items()}
    try:
        for k in OPTICS:
            nz.KNOBS[k]["half"] *= optics
        for k in BIO:
            nz.KNOBS[k]["half"] *= bio
        over = {"val_batches": 2, "batch_strength": strength}
        cfg = synthetic.resolve_config("small", **over)
        samples = synthetic.design_samples("small", seed, **over)
        keep = np.flatnonzero(samples["split"].to_numpy() != "test")
        t = time.perf_counter()
        imgs = np.zeros((len(samples), 5, cfg.image_size, cfg.image_size), np.uint16)
        imgs[keep] = synthetic.render("small", seed, keep, **over)
        dt = time.perf_counter() - t
        radius = synthetic.BASE["nuc_radius_px"] * cfg.image_size / 64.0
        m = calibration.measure_screen(imgs, samples, synthetic.CHANNELS, radius)
        m["render_s"] = round(dt, 1)
        return m
    finally:
        nz.KNOBS.clear()
        nz.KNOBS.update(saved)


def main() -> None:
    """Measure each (optics, bio) pair and print one JSON line per pair and seed."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--optics", type=float, nargs="+", default=[1.0])
    ap.add_argument("--bio", type=float, nargs="+", default=[1.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--strength", type=float, default=1.0)
    args = ap.parse_args()
    keys = ("cell_batch_accuracy_normalised", "batch_share", "treatment_share", "control_kbet")
    print("targets", json.dumps({k: calibration.REAL_TARGETS["bbbc021"][k] for k in keys}))
    for o in args.optics:
        for b in args.bio:
            for s in args.seeds:
                m = measure(o, b, s, args.strength)
                row = {"optics": o, "bio": b, "seed": s, **{k: m[k] for k in keys}}
                row["field_acc"] = m["field_batch_accuracy"]
                row["render_s"] = m["render_s"]
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
