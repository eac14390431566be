"""The calibration of the metrics as a table (``cdcl evaluate --calibrate``'s printout and report).

The calibration itself (null and injected batch effects on the evaluated design) is computed by
:mod:`cdcl.evaluation.calibration`; this module only formats its result, so that the report
does not import the evaluation.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

NO_POWER = "no power in this design"


def calibrated_variants(cal: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{variant: {"metrics", "no_power"}}``; a calibration of one variant (earlier) as raw."""
    if isinstance(cal.get("variants"), dict):
        return cal["variants"]
    variant = (cal.get("design") or {}).get("variant", "raw")
    return {variant: {"metrics": cal.get("metrics", {}), "no_power": cal.get("no_power", [])}}


def calibration_table(cal: dict[str, Any], variant: str | None = None) -> pd.DataFrame:
    """One row per metric: null, its SD and draws, each injection's values, power.

    ``variant``: that variant's records (default: the top-level ones, the raw variant's).
    """
    metrics = (
        cal.get("metrics", {}) if variant is None else calibrated_variants(cal)[variant]["metrics"]
    )
    rows = []
    for label, rec in metrics.items():
        row: dict[str, Any] = {"metric": label, "null": rec["null"], "null SD": rec["null_sd"]}
        if "null_draws" in rec:
            row["null draws"] = rec["null_draws"]
        injected = rec.get("injected")
        if injected is None:  # an earlier calibration: the shift and one non-linear condition
            for s, v in rec["strength"].items():
                row[f"shift {s}x"] = v
            row["nonlinear"] = rec["nonlinear"]
        else:
            for kind, vals in injected.items():
                # The shift at every strength (as before); the others at their strongest.
                shown = vals if kind == "shift" else dict(list(vals.items())[-1:])
                for s, v in shown.items():
                    row[f"{kind} {s}x"] = v
        row["power"] = "yes" if rec["power"] else NO_POWER
        rows.append(row)
    return pd.DataFrame(rows)
