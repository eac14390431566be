"""The chance warning: a learned representation that scores like the random network.

After a short budget a trained network can give the same figures as the same architecture
with random weights. Each learned feature set is compared with the random-network set in
every variant (raw, plate-normalised): when every figure of the results figure that both
have lies within that variant's calibration null spread of the random network's (or within
``SAME_AS_RANDOM_TOL`` where nothing was calibrated), the row is flagged.
"""

from __future__ import annotations

import math
from typing import Any

from cdcl.metrics.design import QUERY_UNIT
from cdcl.report.design import null_spreads
from cdcl.schema import get_path

RANDOM_SETS = ("random network", "random")
NOT_LEARNED = (*RANDOM_SETS, "intensity stats", "intensity", "CellProfiler")
SAME_AS_RANDOM_TOL = 0.01  # figures this close count as equal when there is no calibration
EQUAL_TOL = 1e-9
VARIANT_TEXT = {"raw": "raw profiles", "plate_normalized": "plate-normalised profiles"}


def _value(body: Any, path: str) -> float | None:
    v = get_path(body, path.split("."), number=True)
    return v if math.isfinite(v) else None


def _diffs(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    """Metric path -> |a - b| for the figure metrics both variants have."""
    out = {}
    for path in QUERY_UNIT:
        va, vb = _value(a, path), _value(b, path)
        if va is not None and vb is not None:
            out[path] = abs(va - vb)
    return out


def chance_warnings(results: dict[str, Any]) -> list[str]:
    """A line for each learned set and variant that cannot be told from the random network."""
    sets = results.get("feature_sets") or {}
    random = next((s for s in RANDOM_SETS if s in sets), None)
    if random is None:
        return []
    # Each variant is judged by its own calibration's null spreads.
    tols = {v: null_spreads(results, v) for v in VARIANT_TEXT}
    lines = []
    for name, res in sets.items():
        if name in NOT_LEARNED or "+" in name or not isinstance(res, dict):
            continue
        for variant, text in VARIANT_TEXT.items():
            tol = tols[variant]
            how = "the calibration's null spread" if tol else f"{SAME_AS_RANDOM_TOL}"
            a, b = res.get(variant), sets[random].get(variant)
            if not isinstance(a, dict) or not isinstance(b, dict):
                continue
            diffs = _diffs(a, b)
            n = len(diffs)
            if n < 2 or any(d > max(tol.get(p, 0.0), SAME_AS_RANDOM_TOL) for p, d in diffs.items()):
                continue
            equal = all(d <= EQUAL_TOL for d in diffs.values())
            verdict = "equals" if equal else f"is within {how} of"
            lines.append(
                f"{name} ({text}) {verdict} the random network ({random}) on all {n} figures: "
                "training has produced nothing these metrics see (train longer before reading "
                "this row)"
            )
    return lines
