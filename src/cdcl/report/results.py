"""results.json: where it lives, how it is written (atomically, strict JSON) and read back.

Shared by the evaluation (which writes it) and the report (which reads it), so neither imports
the other. A results.json read back is checked against :data:`RESULTS_SCHEMA` first: a document
without results, a metric that is not a number, or a ``results_version`` newer than this cdcl
is one line naming the file and the field, never a run silently left out of a comparison.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from cdcl import schema as sc
from cdcl.data.dataset_dir import atomic_write_text
from cdcl.data.query import check_stored_query
from cdcl.errors import CdclError
from cdcl.metrics.info import METRIC_INFO
from cdcl.profiles.variants import VARIANTS

RESULTS_FILE = "results.json"
RESULTS_VERSIONS = (1,)  # the results_version values this cdcl reads (metrics.score writes 1)


def to_jsonable(obj: Any) -> Any:
    """Recursively convert numpy/pandas/Path values to JSON types; NaN and inf become null."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [to_jsonable(v) for v in obj.tolist()]
    if isinstance(obj, bool | np.bool_):
        return bool(obj)
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, str):
        return obj
    if hasattr(obj, "__dataclass_fields__"):
        return to_jsonable(asdict(obj))
    return str(obj)


def write_results(results: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``OUT/results.json`` atomically (NaN -> null)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / RESULTS_FILE
    write_results_text(path, json.dumps(to_jsonable(results), indent=2, allow_nan=False) + "\n")
    return path


# results.json files this process has started to write, with the hash of their new text: after
# an interrupt, the file on disk says whether it holds the new results or the previous ones.
_WRITTEN: dict[Path, str] = {}


def write_results_text(path: str | Path, text: str) -> None:
    """Write a results document atomically and remember it for :func:`interrupt_note`."""
    path = Path(path).absolute()
    _WRITTEN[path] = hashlib.sha256(text.encode()).hexdigest()
    atomic_write_text(path, text)


def new_results_on_disk(under: str | Path | None = None) -> list[Path]:
    """The results files this process wrote whose new text is on disk (under ``under``, if given)."""
    root = Path(under).absolute() if under is not None else None
    out = []
    for path, digest in _WRITTEN.items():
        if root is not None and root != path.parent and root not in path.parents:
            continue
        try:
            if hashlib.sha256(path.read_bytes()).hexdigest() == digest:
                out.append(path)
        except OSError:
            continue
    return out


def interrupt_note(out_dir: str | Path) -> str:
    """After an interrupt: whether ``out_dir`` holds this run's new results or the previous ones."""
    out = Path(out_dir)
    new = new_results_on_disk(out)
    if len(new) == 1:
        return (
            f"{new[0]} holds the new results, written before the interrupt (files written "
            "after it, such as report.html, may be missing or from before)"
        )
    if new:
        shown = ", ".join(str(p) for p in new[:3]) + (" ..." if len(new) > 3 else "")
        return f"{len(new)} results files hold new results, written before the interrupt: {shown}"
    old = out / RESULTS_FILE
    if old.is_file():
        return f"{old} holds the previous results, unchanged: the new ones were not written"
    return f"no results were written to {out}"


def read_results(path: str | Path, hint: str = "") -> dict[str, Any]:
    """Load a results.json (file or directory holding one); CdclError when absent or broken.

    The document is checked against :data:`RESULTS_SCHEMA`: it must hold at least one feature
    set with results, every metric the reports read is a number or null, and a
    ``results_version`` newer than this cdcl reads is refused (upgrade cdcl). ``hint`` replaces
    the message's advice (default: evaluate again).
    """
    p = Path(path)
    f = p / RESULTS_FILE if p.is_dir() else p
    if not f.is_file():
        raise CdclError(f"{f}: not found; run `cdcl evaluate` first")
    try:
        results = sc.read_json(f, RESULTS_SCHEMA, hint or RESULTS_HINT)
    except OSError as e:
        raise CdclError(f"{f}: cannot be read ({e.strerror or e})") from None
    columns = (results.get("source") or {}).get("columns")
    if isinstance(columns, dict):
        check_stored_query(columns.get("control_query"), str(f), "source.columns.control_query")
    return results


RESULTS_HINT = "evaluate again to rewrite it (`cdcl evaluate`, `cdcl demo` or `cdcl study`)"
_METRIC = sc.Nullable(sc.Float())


def _tree(leaves: dict[tuple[str, ...], sc.Spec]) -> sc.Spec:
    """Nested optional objects (each may be null) with ``leaves[path]`` at each path."""
    heads: dict[str, dict[tuple[str, ...], sc.Spec]] = {}
    for path, spec in leaves.items():
        heads.setdefault(path[0], {})[path[1:]] = spec
    fields = {k: rest[()] if () in rest else _tree(rest) for k, rest in heads.items()}
    return sc.Nullable(sc.Obj(optional=fields))


class _SameLength(sc.Obj):
    """An object whose list fields ``names`` (those present) all have the same length."""

    def __init__(self, names: dict[str, sc.Spec]) -> None:
        super().__init__(optional={k: sc.ListOf(v) for k, v in names.items()})

    def _check(self, value: object, path: str) -> None:
        super()._check(value, path)
        lengths = {k: len(value[k]) for k in self.optional if k in value}  # type: ignore[index]
        if len(set(lengths.values())) > 1:
            shown = ", ".join(f"{k} {n}" for k, n in lengths.items())
            raise sc.SchemaError(path, f"has lists of different lengths ({shown})", "equal ones")


class _WithResults(sc.Obj):
    """A feature set: at least one of raw, plate_normalized or online_probe holds results."""

    def _check(self, value: object, path: str) -> None:
        super()._check(value, path)
        if not any(isinstance(value.get(k), dict) for k in (*VARIANTS, "online_probe")):  # type: ignore[union-attr]
            raise sc.SchemaError(
                path, "holds no results", "an object with raw, plate_normalized or online_probe"
            )


class _TableRow(sc.Spec):
    """A row of a demo's ``tables``: ``features`` names the set, every other value is a metric."""

    expected = "an object with `features` (a name) and metric values (numbers or null)"

    def _check(self, value: object, path: str) -> None:
        sc.Obj(required={"features": sc.Str(nonempty=True)}).check(value, path)
        metrics = {k: v for k, v in value.items() if k != "features"}  # type: ignore[union-attr]
        sc.MapOf(_METRIC).check(metrics, path)


def _variant_spec() -> sc.Spec:
    """One profile variant's results: every metric path of cdcl.metrics.info, plus outcomes."""
    queries = _SameLength({"compound": sc.Str(), "hit": sc.OneOf(sc.Bool(), sc.Float())})
    per_label = _SameLength({"label": sc.Str(), "correct": sc.Float(min=0), "n": sc.Float(min=0)})
    leaves: dict[tuple[str, ...], sc.Spec] = {
        p: _METRIC for p in METRIC_INFO if p[0] != "online_probe"
    }
    leaves[("moa_matching", "queries", "nsc")] = sc.Nullable(queries)
    leaves[("moa_matching", "queries", "nscb")] = sc.Nullable(queries)
    leaves[("classification", "logistic", "per_label")] = sc.Nullable(per_label)
    return _tree(leaves)


_CALIBRATION = sc.Nullable(
    sc.Obj(
        optional={
            "no_power": sc.ListOf(sc.Str()),
            "metrics": sc.MapOf(sc.Nullable(sc.Obj(optional={"reason": sc.Nullable(sc.Str())}))),
        }
    )
)

_FEATURE_SETS = sc.MapOf(
    _WithResults(
        optional={
            **{v: _variant_spec() for v in VARIANTS},
            "online_probe": _tree({p[1:]: _METRIC for p in METRIC_INFO if p[0] == "online_probe"}),
            "calibration": _CALIBRATION,
            "errors": sc.Nullable(sc.MapOf(sc.Str())),
        }
    ),
    min_len=1,
)
_FEATURE_SETS.expected = "an object naming at least one feature set and its results"

# What a results.json must hold before any of it is read (evaluations and demos write it;
# compare, the study and the API read it). Unknown fields are kept and not read.
RESULTS_SCHEMA = sc.Obj(
    required={"feature_sets": _FEATURE_SETS},
    optional={
        "results_version": sc.Version(known=RESULTS_VERSIONS),
        "kind": sc.Str(nonempty=True),
        "source": sc.Nullable(
            sc.Obj(
                optional={
                    "columns": sc.Nullable(sc.Obj()),
                    "notes": sc.Nullable(sc.ListOf(sc.Str())),
                }
            )
        ),
        "protocol": sc.Nullable(sc.MapOf(sc.Any())),
        "plots": sc.Nullable(
            sc.Obj(
                optional={
                    "rows_plotted": sc.Nullable(sc.Int(min=0)),
                    "rows_total": sc.Nullable(sc.Int(min=0)),
                    "stratified_by": sc.Nullable(sc.ListOf(sc.Str())),
                }
            )
        ),
        "tables": sc.MapOf(sc.ListOf(_TableRow())),
        # {group: {variant: rows}}: the same tables on seen and on unseen compounds
        "tables_by_compounds": sc.MapOf(sc.MapOf(sc.ListOf(_TableRow()))),
        "compound_groups": sc.MapOf(sc.ListOf(sc.Str())),
        "training": sc.MapOf(sc.Obj()),
        "timings_s": sc.MapOf(sc.Nullable(sc.Float())),
    },
)
