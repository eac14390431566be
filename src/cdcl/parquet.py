"""Every Parquet read and write of cdcl, through pyarrow with a file-system path.

``pandas.read_parquet(path)`` opens a local file as a *Python* file object and hands it to
pyarrow. Arrow's I/O threads then hold read-ahead buffers owned by that Python object; when
the last reference to one is dropped by an Arrow pool thread while the interpreter is
finalising (the read was a script's last statement), the thread needs the GIL, is ended
inside C++ code, and the process dies with "terminate called without an active exception"
(SIGABRT) after all its work is done. Giving pyarrow the path instead makes it open the file
with its own native reader: no Python object is involved and nothing needs the GIL at exit.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cdcl.atomic import naming_failures


def read_parquet(path: str | Path, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """A Parquet file as a DataFrame, read natively by pyarrow (see the module doc for why)."""
    table = pq.read_table(os.fspath(path), columns=list(columns) if columns else None)
    return table.to_pandas()


def write_parquet(df: pd.DataFrame, path: str | Path) -> None:
    """Write a DataFrame (without its index) as Parquet, opened natively by pyarrow.

    A failed write (a full disk, a read-only folder) is one line naming ``path``.
    """
    table = pa.Table.from_pandas(df, preserve_index=False)
    with naming_failures(path):
        pq.write_table(table, os.fspath(path))
