"""Column conventions shared by image tables and profile tables: names, and negative controls.

`cdcl build table` (:mod:`cdcl.data.table`, one row per image) and profile-table scoring
(:mod:`cdcl.profiles.columns`, one row per well or image) find columns the same way and take
the same rows as negative controls: one list of control names (:data:`CONTROL_NAMES`) and one
:func:`control_mask`. They live here, in the data layer, because control queries are evaluated
by :mod:`cdcl.data.query` and the profile layer may import from the data layer, not the other
way round.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from cdcl.data.query import query_mask

CONTROL_TYPE_COLUMN = "Metadata_control_type"  # pycytominer: negcon / poscon / trt
NEGCON = "negcon"  # pycytominer's control type of the negative controls
IS_CONTROL_COLUMN = "Metadata_is_control"  # a True/False column (cdcl's and others' exports)
TRUE_WORDS = ("true", "1", "yes")  # a text Metadata_is_control column's values meaning True

# Treatment or compound names that mark negative controls, compared stripped and ignoring case.
# The union of what the build and the profile scoring used to know, so a table's controls are
# the same rows for both.
CONTROL_NAMES = (
    "dmso",  # the vehicle of compound screens (BBBC021, JUMP, LINCS): the usual control
    "negcon",  # pycytominer's control type, also written into the treatment by some platemaps
    "negative_control",  # the same label spelled out
    "control",  # the plain word of hand-made tables, e.g. siRNA or CRISPR screens without a vehicle
    "untreated",  # wells given nothing, in screens whose perturbations have no vehicle
    "empty",  # platemaps that leave the control wells unperturbed call them empty
)


def find_column(columns: Sequence[str], *names: str) -> str | None:
    """The first of ``names`` among ``columns``: exact matches first, then ignoring case."""
    for n in names:
        if n in columns:
            return n
    low = {c.lower(): c for c in columns}
    for n in names:
        if n.lower() in low:
            return low[n.lower()]
    return None


def _words(values: pd.Series) -> pd.Series:
    """Values as stripped lower-case text, the form every convention compares."""
    return values.astype(str).str.strip().str.lower()


def control_names(values: pd.Series) -> np.ndarray:
    """True where a value (a treatment, a compound) is one of :data:`CONTROL_NAMES`."""
    return _words(values).isin(CONTROL_NAMES).to_numpy()


def negcon(values: pd.Series) -> np.ndarray:
    """True where a ``Metadata_control_type`` value is pycytominer's ``negcon``."""
    return _words(values).eq(NEGCON).to_numpy()


def control_mask(
    frame: pd.DataFrame,
    query: str | None = None,
    *,
    names: Sequence[pd.Series | None] = (),
    option: str = "--control-query",
) -> np.ndarray:
    """Boolean negative-control flag per row of ``frame``: ``query``, else by convention.

    A query is evaluated by :func:`cdcl.data.query.query_mask` (errors name ``option``).
    Without one: pycytominer's ``Metadata_control_type == "negcon"``, else a True/False
    ``Metadata_is_control`` column, else the rows where any of ``names`` (value series aligned
    with ``frame``, e.g. treatments and compounds; None is skipped) is a control name.
    """
    if query:
        return query_mask(frame, query, option=option)
    cols = [str(c) for c in frame.columns]
    ctype = find_column(cols, CONTROL_TYPE_COLUMN)
    if ctype is not None:
        return negcon(frame[ctype])
    flag = find_column(cols, IS_CONTROL_COLUMN)
    if flag is not None:
        v = frame[flag]
        return v.to_numpy() if v.dtype == bool else _words(v).isin(TRUE_WORDS).to_numpy()
    mask = np.zeros(len(frame), dtype=bool)
    for values in names:
        if values is not None:
            mask |= control_names(values)
    return mask


def default_control_query(frame: pd.DataFrame, name_columns: Sequence[str | None]) -> str | None:
    """The control query a table's conventions give, or None when they find no controls.

    `cdcl build table` records its controls as a query (``build.args.control_query``), so the
    convention is written out: ``Metadata_control_type`` values that are ``negcon``, else the
    control names (:data:`CONTROL_NAMES`) of the first of ``name_columns`` holding any.
    """

    def hits(column: str, test: Callable[[pd.Series], np.ndarray]) -> list[str]:
        values = pd.Series(frame[column].astype(str).unique(), dtype=object)
        return sorted(values[test(values)])

    ctype = find_column([str(c) for c in frame.columns], CONTROL_TYPE_COLUMN)
    if ctype is not None:
        found = hits(ctype, negcon)
        if found:
            return f"`{ctype}` in {found!r}"
    for col in dict.fromkeys(c for c in name_columns if c):
        found = hits(col, control_names)
        if found:
            return f"`{col}` in {found!r}"
    return None
