"""The one Markdown table writer of the reports (results.md, study.md, curve.md).

Cells arrive as text: each caller formats its own numbers (3 decimals, a signed difference,
a p-value) before the table is drawn, so the layout is the same everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pandas as pd


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table: header, rule, one line per row (no final newline)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def frame_markdown(df: pd.DataFrame, cell: Callable[[Any], str] = str) -> str:
    """``df`` as a Markdown table: the index (headed by its name) first, each value ``cell(v)``."""
    header = [df.index.name or "", *map(str, df.columns)]
    return markdown_table(header, ([str(i), *map(cell, r)] for i, r in df.iterrows()))
