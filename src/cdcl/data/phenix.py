"""Well names and Opera Phenix / Operetta file names: well ``C12`` is row 3, column 12.

Phenix and Operetta exports name each plane ``r{RR}c{CC}f{FF}p{PP}-ch{N}sk1fk1fl1.tiff``
(row 01 = A, field = site, plane, channel), so a path template of ``cdcl build table`` can
build these names from a well column with the fields ``{well_row}`` and ``{well_column}``,
e.g. ``r{well_row:02d}c{well_column:02d}f{Metadata_Site:02d}p01-ch{channel_index}sk1fk1fl1.png``.
"""

from __future__ import annotations

import re

import pandas as pd

from cdcl.errors import CdclError

WELL_FIELDS = ("well_row", "well_column")  # path-template fields derived from the well name
_WELL = re.compile(r"^\s*([A-Za-z]{1,2})\s*0*(\d{1,3})\s*$")
_PHENIX = re.compile(
    r"^r(\d+)c(\d+)f(\d+)p(\d+)-ch(\d+)sk\d+fk\d+fl\d+\.(tiff?|png)$", flags=re.IGNORECASE
)


def well_row_column(well: str) -> tuple[int, int]:
    """1-based (row, column) of a well name: ``A01`` -> (1, 1), ``C12`` -> (3, 12), ``AF48`` -> (32, 48)."""
    m = _WELL.match(str(well))
    if not m or int(m.group(2)) < 1:
        raise ValueError(f"{well!r} is not a well name such as A01 or C12")
    row = 0
    for letter in m.group(1).upper():  # A..Z, then AA..AF on 1536-well plates
        row = row * 26 + ord(letter) - ord("A") + 1
    return row, int(m.group(2))


def well_name(row: int, column: int) -> str:
    """The well name of a 1-based (row, column): (3, 12) -> ``C12``, (32, 48) -> ``AF48``."""
    if row < 1 or column < 1:
        raise ValueError(f"row {row}, column {column}: both start at 1")
    letters = ""
    while row:
        row, rest = divmod(row - 1, 26)
        letters = chr(ord("A") + rest) + letters
    return f"{letters}{column:02d}"


def parse_phenix_name(name: str) -> dict[str, int | str]:
    """Well, row, column, site, plane and channel of a Phenix file name (``r03c12f01p01-ch2...``)."""
    m = _PHENIX.match(name.rsplit("/", 1)[-1])
    if not m:
        raise ValueError(
            f"{name!r} is not an Opera Phenix name such as r03c12f01p01-ch1sk1fk1fl1.tiff"
        )
    row, column, site, plane, channel = (int(g) for g in m.groups()[:5])
    return {
        "well": well_name(row, column),
        "well_row": row,
        "well_column": column,
        "site": site,
        "plane": plane,
        "channel_index": channel,
    }


def well_fields(wells: pd.Series, column: str) -> pd.DataFrame:
    """``well_row`` and ``well_column`` of every well name; one-line error naming a bad one."""
    uniq = {}
    for w in pd.unique(wells):
        try:
            uniq[w] = well_row_column(w)
        except ValueError as e:
            raise CdclError(
                f"--path-template uses {{well_row}}/{{well_column}}, but column `{column}`: {e}"
            ) from None
    pairs = [uniq[w] for w in wells]
    return pd.DataFrame(pairs, columns=list(WELL_FIELDS), index=wells.index)
