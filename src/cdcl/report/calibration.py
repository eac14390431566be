"""The calibration of the metrics as a table (``cdcl evaluate --calibrate``'s printout and report).

The calibration itself (null and injected batch effects on the evaluated design) is computed by
:mod:`cdcl.evaluation.calibration`; this module only formats its result, so that the report
does not import the evaluation.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

NO_POWER = "no power in this design"


def calibration_table(cal: dict[str, Any]) -> pd.DataFrame:
    """One row per metric: null, each strength, nonlinear, power (for reports)."""
    rows = []
    for label, rec in cal.get("metrics", {}).items():
        row: dict[str, Any] = {"metric": label, "null": rec["null"], "null SD": rec["null_sd"]}
        for s, v in rec["strength"].items():
            row[f"shift {s}x"] = v
        row["nonlinear"] = rec["nonlinear"]
        row["power"] = "yes" if rec["power"] else NO_POWER
        rows.append(row)
    return pd.DataFrame(rows)
