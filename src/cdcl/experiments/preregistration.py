"""A study's pre-registration: what it will test, fixed in ``design.json`` before any training.

The design names the methods, the references, the compounds the methods train on, the batch
strengths and seeds, the significance level, the decision rule and the endpoints: one primary
endpoint and a family of secondary endpoints. Every endpoint is a contrast between cells of the
study, ``sum(sign · value)`` over its terms, where a cell is (row, compounds, batch strength)
on one metric of one profile variant; each unit (seed, or fold) gives one value of the contrast,
so a strength interaction or a seen − unseen difference is analysed within seed.

The design's SHA-256 (of its canonical JSON, without the output folder) identifies it: a study
that reports the same design again, in any folder, is a second look at the same question, and
the look ledger (:func:`record_look`) says so.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cdcl.atomic import atomic_write_text
from cdcl.experiments import statistics as st
from cdcl.report.markdown import markdown_table

PRIMARY_METRIC = "replicate mAP (other batch)"
PRIMARY_VARIANT = "plate_normalized"
HEADLINE_METHOD = "CDCL"
SAME_BATCH_CONTROL = "CDCL-same-batch"
# Other pre-declared metrics, tested as secondary endpoints against the first reference.
SECONDARY_METRICS = ("treatment acc (logistic)", "NSCB")
# The batch endpoints: they see batch signal on the profiles compared (docs/studies.md).
BATCH_METRICS = (
    "retrieval penalty (same − other batch)",
    "control iLISI",
    "control batch-classifier acc",
)
LOWER_IS_BETTER = {"batch-classifier acc", "control batch-classifier acc"} | {BATCH_METRICS[0]}
RULE = (
    "The primary endpoint is tested alone at alpha with the paired t-test over units (its "
    "sign-flip p is reported next to it); the secondary endpoints form one family whose "
    "paired-t p-values are Holm-adjusted together. An endpoint is 'better' or 'worse' when its "
    "(adjusted) p is below alpha, in the direction of its sign; otherwise 'no detectable "
    "difference', with the smallest difference the design detects at 80% power."
)
DESIGN_VERSION = 2
LEDGER_ENV = "CDCL_STATE_DIR"


@dataclass(frozen=True)
class Cell:
    """One figure of the study: a row's metric on a set of compounds at one batch strength."""

    row: str
    compounds: str  # all | seen | unseen
    strength: float | None  # None: the study's only screen


def _cell(sign: int, row: str, compounds: str, strength: float | None) -> dict[str, Any]:
    return {"sign": sign, "row": row, "compounds": compounds, "strength": strength}


def _strength_words(strength: float | None) -> str:
    return "" if strength is None else f", batch strength {strength:g}"


def default_endpoints(
    methods: Sequence[str],
    references: Sequence[str],
    strengths: Sequence[float] | None,
    train_treatments: str,
    primary_metric: str = PRIMARY_METRIC,
) -> list[dict[str, Any]]:
    """The endpoints a study declares by default (the rule is written in docs/studies.md).

    Primary: CDCL − the first reference on ``primary_metric`` (default replicate mAP across
    batches; a design whose folds hold out one batch cannot compute it), plate-normalised, on
    the compounds no method trained on (all compounds when every method saw them), at the
    strongest batch effect. Secondary: the same contrast against every other reference, the
    other pre-declared and batch metrics against the first reference, the strength
    interaction (the gain at the strongest minus the gain at the weakest strength, within
    seed), the label-use contrast (the gain on seen minus the gain on unseen compounds) and
    the pairing control (CDCL − CDCL-same-batch).
    """
    if HEADLINE_METHOD not in methods or not references:
        return []
    ref = references[0]
    top = max(strengths) if strengths else None
    low = min(strengths) if strengths and len(strengths) > 1 else None
    group = "unseen" if train_treatments == "half" else "all"
    question = (
        f"Does {HEADLINE_METHOD} retrieve a compound's replicates across batches better than {ref}?"
    )
    out = [_gain(primary_metric, ref, "primary", question, group, top)]
    for other in references[1:]:
        out.append(
            _gain(primary_metric, other, "secondary", f"... and better than {other}?", group, top)
        )
    others = [m for m in (PRIMARY_METRIC, *SECONDARY_METRICS) if m != primary_metric]
    for metric in (*others, *BATCH_METRICS):
        question = f"{metric}: {HEADLINE_METHOD} vs {ref}"
        out.append(_gain(metric, ref, "secondary", question, group, top))
    if low is not None:
        out.append(_strength_interaction(primary_metric, ref, group, top, low))
    if train_treatments == "half":
        out.append(_label_use(primary_metric, ref, top))
    if SAME_BATCH_CONTROL in methods:
        question = "Does pairing across batches, rather than within a batch, make the gain?"
        out.append(_gain(primary_metric, SAME_BATCH_CONTROL, "secondary", question, group, top))
    for i, e in enumerate(out, 1):
        e["id"] = f"E{i}"
    return out


def _gain(
    metric: str, other: str, role: str, question: str, group: str, top: float | None
) -> dict[str, Any]:
    """The endpoint CDCL − ``other`` on ``metric``, on compound ``group`` at strength ``top``."""
    # Control wells belong to no compound group: their endpoints read every compound's run.
    control = metric.startswith("control ")
    g = "all" if control else group
    where = "control wells" if control else f"{group} compounds"
    return {
        "role": role,
        "label": f"{HEADLINE_METHOD} − {other}, {metric}, {where}{_strength_words(top)}",
        "metric": metric,
        "variant": PRIMARY_VARIANT,
        "lower_is_better": metric in LOWER_IS_BETTER,
        "terms": [_cell(1, HEADLINE_METHOD, g, top), _cell(-1, other, g, top)],
        "question": question,
    }


def _strength_interaction(
    metric: str, ref: str, group: str, top: float, low: float
) -> dict[str, Any]:
    """The gain over ``ref`` at the strongest batch effect minus the gain at the weakest."""
    return {
        "role": "secondary",
        "label": f"strength interaction: ({HEADLINE_METHOD} − {ref}) at {top:g} minus at "
        f"{low:g}, {metric}, {group} compounds",
        "metric": metric,
        "variant": PRIMARY_VARIANT,
        "lower_is_better": False,
        "terms": [
            _cell(1, HEADLINE_METHOD, group, top),
            _cell(-1, ref, group, top),
            _cell(-1, HEADLINE_METHOD, group, low),
            _cell(1, ref, group, low),
        ],
        "question": "Does the gain grow with the batch effect (batch robustness)?",
    }


def _label_use(metric: str, ref: str, top: float | None) -> dict[str, Any]:
    """The gain over ``ref`` on the compounds trained on minus the gain on the unseen ones."""
    return {
        "role": "secondary",
        "label": f"label use: ({HEADLINE_METHOD} − {ref}) on seen minus on unseen "
        f"compounds, {metric}{_strength_words(top)}",
        "metric": metric,
        "variant": PRIMARY_VARIANT,
        "lower_is_better": False,
        "terms": [
            _cell(1, HEADLINE_METHOD, "seen", top),
            _cell(-1, ref, "seen", top),
            _cell(-1, HEADLINE_METHOD, "unseen", top),
            _cell(1, ref, "unseen", top),
        ],
        "question": "Is the gain larger on the compounds the methods paired on?",
    }


def design_hash(design: dict[str, Any]) -> str:
    """SHA-256 of the design's canonical JSON (sorted keys, without the ``hash`` field)."""
    body = {k: v for k, v in design.items() if k != "hash"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def preregistration(
    *,
    dataset: str,
    methods: Sequence[str],
    references: Sequence[str],
    seeds: Sequence[int],
    folds: Sequence[int] | None,
    strengths: Sequence[float] | None,
    screen: dict[str, Any],
    train_treatments: str,
    budget: Sequence[str],
    alpha: float,
    note: str | None = None,
    primary_metric: str = PRIMARY_METRIC,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The pre-registered part of ``design.json`` (everything but the replicate list)."""
    endpoints = default_endpoints(methods, references, strengths, train_treatments, primary_metric)
    return {
        "format_version": DESIGN_VERSION,
        "dataset": dataset,
        "methods": list(methods),
        "references": list(references),
        "seeds": list(seeds),
        "folds": list(folds) if folds else None,
        "strengths": list(strengths) if strengths else None,
        "screen": dict(screen),
        "train_treatments": train_treatments,
        # the training budget shared by every replicate (each replicate's seed is its own)
        "budget": [b for b in budget if not b.startswith("train.seed=")],
        "alpha": alpha,
        "rule": RULE,
        "test": {"paired": st.PAIRED_TEST, "signflip": st.SIGNFLIP_TEST},
        "endpoints": endpoints,
        "primary": next((e["id"] for e in endpoints if e["role"] == "primary"), None),
        "family": [e["id"] for e in endpoints if e["role"] == "secondary"],
        **({"note": note} if note else {}),
        **(extra or {}),
    }


# ------------------------------------------------------------------------------ analysis

Lookup = Callable[[Cell, str, str], list[float]]  # (cell, metric, variant) -> one value per unit


def endpoint_values(endpoint: dict[str, Any], lookup: Lookup) -> list[float]:
    """The endpoint's contrast per unit (nan where a cell is missing in that unit)."""
    total: list[float] | None = None
    for term in endpoint["terms"]:
        cell = Cell(term["row"], term["compounds"], term["strength"])
        vals = [term["sign"] * v for v in lookup(cell, endpoint["metric"], endpoint["variant"])]
        total = vals if total is None else [a + b for a, b in zip(total, vals, strict=True)]
    return total or []


def test_endpoints(
    design: dict[str, Any], lookup: Lookup, units: Sequence[Any] | None = None
) -> list[dict[str, Any]]:
    """Every declared endpoint tested by the declared rule: mean, CI, t and sign-flip p, verdict.

    ``units`` (one per value, e.g. the fold of each replicate) averages the values that share
    a unit before testing, as the study's paired comparisons do.
    """
    alpha = float(design["alpha"])
    rows: list[dict[str, Any]] = []
    for e in design.get("endpoints", []):
        values = endpoint_values(e, lookup)
        zeros = [0.0 if math.isfinite(v) else math.nan for v in values]
        d = st.paired_difference(values, zeros, e["lower_is_better"], alpha, units=units)
        rows.append({**{k: e[k] for k in ("id", "role", "label", "metric", "variant")}, **d})
        rows[-1]["values"] = values
    family = [r for r in rows if r["role"] == "secondary"]
    for r, p_adj in zip(family, st.holm([r["p"] for r in family]), strict=True):
        r["p_holm"] = p_adj
    for r in rows:
        p = r["p"] if r["role"] == "primary" else r.get("p_holm", math.nan)
        lower = next(e for e in design["endpoints"] if e["id"] == r["id"])["lower_is_better"]
        r["verdict"] = st.verdict(r["mean_diff"], p, r["n"], lower, alpha)
    return rows


def table_lookup(records: dict[float | None, list[dict[str, Any]]], names: Sequence[str]) -> Lookup:
    """A :data:`Lookup` over replicate records (``tables`` and ``tables_by_compounds``).

    ``records`` maps each batch strength (None for a study of one screen) to its replicates'
    records; ``names`` orders the units, so a contrast across strengths pairs the same seed.
    """

    def at(strength: float | None) -> list[dict[str, Any]]:
        if strength in records:
            return records[strength]
        if len(records) == 1:  # a one-screen study declared at its one strength
            return next(iter(records.values()))
        return []

    def lookup(cell: Cell, metric: str, variant: str) -> list[float]:
        by_name = {r["name"]: r for r in at(cell.strength)}
        out: list[float] = []
        for name in names:
            rec = by_name.get(name) or {}
            tables = (
                rec.get("tables", {})
                if cell.compounds == "all"
                else (rec.get("tables_by_compounds") or {}).get(cell.compounds, {})
            )
            row = next((r for r in tables.get(variant, []) if r.get("features") == cell.row), {})
            v = row.get(metric)
            out.append(float(v) if isinstance(v, int | float) and math.isfinite(v) else math.nan)
        return out

    return lookup


# The endpoint table's columns (study.md, curve.md).
ENDPOINT_COLUMNS = (
    "id",
    "role",
    "endpoint",
    "n",
    "mean [95% CI]",
    "p (t)",
    "p (sign-flip)",
    "p (Holm)",
    "smallest detectable",
    "verdict",
)


def endpoint_markdown(rows: list[dict[str, Any]], design: dict[str, Any]) -> str:
    """The pre-registered endpoints as a Markdown section (every row, as measured)."""
    intro = f"Design `{design.get('hash', '')[:16]}` (design.json, fixed before training). "
    table = markdown_table(ENDPOINT_COLUMNS, [_endpoint_cells(r) for r in rows])
    return (
        "\n".join(["## Pre-registered endpoints", "", intro + design.get("rule", ""), "", table])
        + "\n"
    )


def _endpoint_cells(r: dict[str, Any]) -> list[str]:
    """One tested endpoint as the cells of the endpoint table."""
    mean = f"{_num(r['mean_diff'], True)} [{_num(r['ci_low'], True)}, {_num(r['ci_high'], True)}]"
    return [
        f"{r['id']}",
        f"{r['role']}",
        f"{r['label']}",
        f"{r['n']}",
        mean,
        _num(r["p"]),
        _num(r["p_signflip"]),
        _num(r.get("p_holm")),
        _num(r["min_detectable_diff"]),
        f"{r['verdict']}",
    ]


def _num(v: Any, signed: bool = False) -> str:
    """An endpoint-table figure: 3 decimals (3 significant digits below 0.001), – if missing."""
    if not isinstance(v, int | float) or not math.isfinite(v):
        return "–"
    return f"{v:+.3f}" if signed else (f"{v:.3g}" if v < 0.001 else f"{v:.3f}")


# ------------------------------------------------------------------------------ look ledger


def ledger_dir() -> Path:
    """Where looks are recorded across output folders: $CDCL_STATE_DIR, else the user's state."""
    if os.environ.get(LEDGER_ENV):
        return Path(os.environ[LEDGER_ENV])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "cdcl"


def record_look(design_id: str, out: Path, replicates: list[str], outcome: Any) -> list[dict]:
    """Add this report of ``design_id`` to the ledger; returns every look at it so far.

    Reporting the same replicates from the same folder again is the same look; any other
    report of the same design (another folder, or more replicates) is a further look.
    """
    path = ledger_dir() / "looks" / f"{design_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # studies reporting at once each add their look
        looks: list[dict[str, Any]] = []
        if path.is_file():
            try:
                looks = json.loads(path.read_text())["looks"]
            except (ValueError, KeyError, TypeError):
                looks = []  # a damaged ledger: start it again rather than fail the study
        where = str(Path(out).resolve())
        entry = {
            "out": where,
            "replicates": list(replicates),
            "outcome": outcome,
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        same = [i for i, lk in enumerate(looks) if lk["out"] == where]
        if same and looks[same[-1]]["replicates"] == entry["replicates"]:
            # the same look reported again: it keeps its number and the time it was first made
            old = looks[same[-1]]
            looks[same[-1]] = {**entry, "look": old["look"], "at": old.get("at", entry["at"])}
        else:
            looks.append({**entry, "look": len(looks) + 1})
        atomic_write_text(path, json.dumps({"design": design_id, "looks": looks}, indent=2))
    return looks
