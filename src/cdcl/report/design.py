"""What design a report scored, and whether that design can tell its rows apart.

``results["design"]`` (:func:`cdcl.metrics.design.design_facts`) holds the rows, held-out
plates and batches and the queries of every metric. Here it becomes lines for the command
output and the report, and a banner when the design cannot separate the rows shown: a
metric separates rows only where the spread between them exceeds its noise floor, the larger
of the query noise floor and the calibration's null spread (``1.96 x sqrt(2) x null SD``).
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from cdcl.metrics.design import NOISE_Z

NULL_SPREAD = NOISE_Z * math.sqrt(2.0)  # x null SD: 95% half-width of a difference of two draws


def _names(items: list[str], most: int = 6) -> str:
    shown = ", ".join(items[:most])
    return shown + (f" and {len(items) - most} more" if len(items) > most else "") or "none"


def design_lines(results: dict[str, Any]) -> list[str]:
    """The design in two or three lines: rows, held-out plates and batches, queries and steps."""
    d = results.get("design")
    if not isinstance(d, dict):
        return []
    unit = "image" if d.get("level") == "image" else "well"
    judge = f" by {d['judged_by']}" if d.get("judged_by") else ""
    lines = [
        f"design: {d['evaluated_profiles']} {unit} profiles scored ({d['profiles']} in all); "
        f"held out: batches {_names(d['held_out_batches'])}, plates "
        f"{_names(d['held_out_plates'])}; mixing judged{judge} across "
        f"{len(d['evaluated_batches'])} batch(es) ({_names(d['evaluated_batches'])})"
    ]
    m = d.get("metrics", {})
    parts = []
    for path, label in (
        ("classification.knn.accuracy", "treatment accuracy"),
        ("moa_matching.nsc", "NSC"),
        ("kbet.acceptance_rate", "kBET, batch classifier"),
        ("map.replicate_batch_aware.map", "replicate mAP"),
    ):
        rec = m.get(path)
        if not rec:
            continue
        text = f"{label} {rec['queries']} {rec['unit']}"
        if rec.get("step"):
            text += f" (steps of {rec['step']:.3f})"
        parts.append(text)
    if parts:
        lines.append("queries: " + "; ".join(parts))
    return lines


def calibration_records(cal: Any, variant: str | None = None) -> dict[str, Any]:
    """One calibration's ``{label: record}`` for ``variant``.

    That variant's records where the calibration has them; else (and by default) the
    top-level ones, the raw variant's (calibrations made before per-variant scoring).
    """
    if not isinstance(cal, dict):
        return {}
    body = (cal.get("variants") or {}).get(variant) if variant else None
    body = body if isinstance(body, dict) else cal
    return body.get("metrics") or {}


def null_spreads(results: dict[str, Any], variant: str | None = None) -> dict[str, float]:
    """Metric path -> calibration null spread (``NULL_SPREAD`` x null SD) on ``variant``.

    The null SD of a metric differs between raw and plate-normalised profiles, so each
    variant's figures are judged by that variant's calibration (see
    :func:`calibration_records` for the fallback).
    """
    out: dict[str, float] = {}
    for res in (results.get("feature_sets") or {}).values():
        cal = res.get("calibration") if isinstance(res, dict) else None
        for rec in calibration_records(cal, variant).values():
            sd, path = rec.get("null_sd"), rec.get("path")
            if path and isinstance(sd, int | float) and math.isfinite(sd):
                out[path] = max(out.get(path, 0.0), NULL_SPREAD * float(sd))
    return out


def noise_floors(results: dict[str, Any], variant: str | None = None) -> dict[str, float]:
    """Metric path -> noise floor: the query floor, or ``variant``'s null spread if larger."""
    metrics = (results.get("design") or {}).get("metrics") or {}
    # A metric without queries has no floor (null in results.json): it has no values either.
    floors = {p: float(r["noise_floor"]) for p, r in metrics.items() if r.get("noise_floor")}
    for path, spread in null_spreads(results, variant).items():
        floors[path] = max(floors.get(path, 0.0), spread)
    return floors


def inseparable(
    frame: pd.DataFrame, paths: dict[str, tuple[str, ...]], floors: dict[str, float]
) -> dict[str, str]:
    """Column -> why it cannot separate the rows (spread between rows within its noise floor)."""
    out = {}
    if len(frame) < 2:
        return out
    for col in frame.columns:
        floor = floors.get(".".join(paths.get(col, ())))
        v = pd.to_numeric(frame[col], errors="coerce").dropna()
        if floor is None or len(v) < 2:
            continue
        spread = float(v.max() - v.min())
        if spread <= floor:
            out[col] = f"rows span {spread:.3f}, noise floor {floor:.3f}"
    return out


def design_banner(
    frame: pd.DataFrame,
    paths: dict[str, tuple[str, ...]],
    results: dict[str, Any],
    variant: str | None = None,
) -> str | None:
    """A sentence when no metric of the figure can separate its rows on this design, else None.

    ``variant``: the profile variant ``frame`` shows, whose calibration gives the null spreads.
    """
    floors = noise_floors(results, variant)
    judged = [
        c
        for c in frame.columns
        if ".".join(paths.get(c, ())) in floors
        and pd.to_numeric(frame[c], errors="coerce").notna().sum() >= 2
    ]
    if not judged:
        return None
    flat = inseparable(frame[judged], paths, floors)
    if len(flat) < len(judged):
        return None
    worst = ", ".join(f"{c}: {why}" for c, why in list(flat.items())[:4])
    return (
        "This design cannot separate the rows shown: for every metric the difference between "
        "rows is within what its few queries (or the calibration's null spread) produce by "
        f"chance ({worst}). Do not rank these rows; score more held-out plates or wells."
    )
