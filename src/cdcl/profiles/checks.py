"""Checks of a profile table as read: its columns, its separator and the size of its values.

A table is refused in one line naming the file and the column when a metadata column appears
twice (pandas would rename the second ``Metadata_Batch.1`` and score with the first), when it has
feature columns but no ``Metadata_*`` column, or when a finite feature value is too large for
the float32 arithmetic every metric uses (cast to float32, 1e300 becomes infinity; above
``FEATURE_MAX`` the squares in distances and variances overflow). A CSV whose header is
separated by semicolons (or tabs) is read with that separator instead of as one column.
"""

from __future__ import annotations

import csv
import gzip
import re
from pathlib import Path

import numpy as np

from cdcl.errors import CdclError

METADATA_PREFIX = "Metadata_"  # as cdcl.profiles.table.METADATA_PREFIX
FLOAT32_MAX = float(np.finfo(np.float32).max)
# Largest feature magnitude scored: squares (1e30) summed over a million rows stay in float32.
FEATURE_MAX = 1e15
_DECIMAL_COMMA = re.compile(r"[-+]?\d+,\d+(?:[eE][-+]?\d+)?")


def check_column_names(names: list[str], where: str) -> None:
    """Refuse a repeated column name, and a table without feature or without metadata columns."""
    first: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in first:
            raise CdclError(
                f"{where}: column `{name}` appears twice (columns {first[name] + 1} and {i + 1});"
                " rename or drop one, so that it is clear which one holds the metadata"
            )
        first[name] = i
    meta = [n for n in names if n.startswith(METADATA_PREFIX)]
    if len(meta) == len(names):
        raise CdclError(
            f"{where}: the profile table has no feature columns (every column starts with "
            "`Metadata_`)"
        )
    if not meta:
        shown = ", ".join(f"`{n}`" for n in names[:3]) + (" ..." if len(names) > 3 else "")
        raise CdclError(
            f"{where}: no metadata columns: none of its {len(names)} columns ({shown}) starts "
            "with `Metadata_`; name the plate, well, batch and treatment columns "
            "Metadata_Plate, Metadata_Well, Metadata_Batch and Metadata_Treatment"
        )


def check_feature_values(values: np.ndarray, name: str, where: str, first_row: int = 0) -> None:
    """Refuse finite values of feature column ``name`` too large for float32 arithmetic."""
    v = np.asarray(values)
    if v.size == 0 or v.dtype.kind not in "fiu":
        return
    if v.dtype.kind in "iu":
        big = np.abs(v.astype(np.float64)) > FEATURE_MAX
    else:
        with np.errstate(invalid="ignore", over="ignore"):
            big = np.isfinite(v) & (np.abs(v) > FEATURE_MAX)
    if not big.any():
        return
    at = np.flatnonzero(big)
    x = float(v[at[0]])
    reason = (
        f"beyond float32 (largest {FLOAT32_MAX:.3g}), in which cdcl holds features"
        if abs(x) > FLOAT32_MAX
        else f"above {FEATURE_MAX:.0e} its square overflows float32 in distances and variances"
    )
    raise CdclError(
        f"{where}: feature column `{name}` holds {x:.3g} (in row {first_row + int(at[0])}), "
        f"too large to score: {reason}; rescale the column (e.g. standardise it, or take the "
        "logarithm of a count) or leave it out"
    )


def _first_lines(path: Path, n: int = 2) -> list[str]:
    """The first ``n`` lines of a text file (gzip when named .gz), at most 1 MB each."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = [f.readline(1 << 20) for _ in range(n)]
    return [r.decode("utf-8-sig", errors="replace").rstrip("\r\n") for r in raw if r]


def sniff_csv(path: Path, sep: str) -> tuple[str, str, list[str]]:
    """(separator, decimal mark, header names) of a delimited text table.

    ``sep`` is the separator the file name implies; when the header holds none of it but
    semicolons or tabs, the more frequent of those is used, and a semicolon file whose first
    row writes numbers as ``1,5`` is read with a decimal comma.
    """
    lines = _first_lines(path)
    if not lines:
        return sep, ".", []
    header = lines[0]
    if sep not in header:
        counts = {s: header.count(s) for s in (",", ";", "\t") if s != sep}
        best = max(counts, key=lambda s: counts[s])
        if counts[best]:
            sep = best
    decimal = "."
    if sep == ";" and len(lines) > 1:
        cells = next(csv.reader([lines[1]], delimiter=sep), [])
        if any(_DECIMAL_COMMA.fullmatch(c.strip()) for c in cells):
            decimal = ","
    names = next(csv.reader([header], delimiter=sep), [])
    return sep, decimal, names
