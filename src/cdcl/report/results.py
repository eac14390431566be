"""results.json: where it lives, how it is written (atomically, strict JSON) and read back.

Shared by the evaluation (which writes it) and the report (which reads it), so neither imports
the other.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from cdcl.data.dataset_dir import atomic_write_text
from cdcl.data.query import check_stored_query
from cdcl.errors import CdclError

RESULTS_FILE = "results.json"


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
    atomic_write_text(path, json.dumps(to_jsonable(results), indent=2, allow_nan=False) + "\n")
    return path


def read_results(path: str | Path) -> dict[str, Any]:
    """Load a results.json (file or directory holding one); CdclError when absent or broken."""
    p = Path(path)
    f = p / RESULTS_FILE if p.is_dir() else p
    if not f.is_file():
        raise CdclError(f"{f}: not found; run `cdcl evaluate` first")
    try:
        results = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CdclError(f"{f}: not valid JSON ({e.msg}, line {e.lineno})") from None
    source = results.get("source") if isinstance(results, dict) else None
    columns = source.get("columns") if isinstance(source, dict) else None
    if isinstance(columns, dict):
        check_stored_query(columns.get("control_query"), str(f), "source.columns.control_query")
    return results
