"""The one HTML page shell of every page the tool writes (an evaluation's report.html,
compare.html, the demo's and the study's report.html): head, inline style, title, sections.

Pages are self-contained: the style is inline and images are data URIs, so a page can be
mailed or archived on its own.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import TYPE_CHECKING

from cdcl.data.dataset_dir import atomic_write_text

if TYPE_CHECKING:
    import pandas as pd

PAGE_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:12px;margin:8px 0}
td,th{border:1px solid #ddd;padding:3px 7px;text-align:right}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}
.best{font-weight:bold;background:#e8f4e8}.meta td{text-align:left}
img{max-width:100%;border:1px solid #eee;margin:4px 0}
.err{color:#a00}.small{font-size:11px;color:#666}
.scroll{max-width:100%;overflow-x:auto}pre{white-space:pre-wrap}
.warn{background:#fff4e0;border-left:4px solid #e69500;padding:6px 10px;margin:8px 0}
table.fig{table-layout:fixed;width:100%;max-width:1340px}
table.fig th{font-size:11px;font-weight:normal;white-space:normal;vertical-align:bottom}
table.fig th.grp{font-weight:bold;text-align:center}table.fig td{padding:2px 4px}
table.fig td:first-child,table.fig th:first-child{width:150px;overflow-wrap:anywhere}
.bar{position:relative;height:16px;background:#f3f3f3}
.bar i{position:absolute;left:0;top:0;bottom:0;background:#9ecae1}
.bar.agg i{background:#74c476}.bar span{position:relative;font-size:11px;padding-right:3px}
table.gloss td,table.gloss th{text-align:left;vertical-align:top}
.grey,.grey span{color:#999}.grey .bar i{background:#e0e0e0}
.design{background:#f4f7fb;border-left:4px solid #6b8fb5;padding:6px 10px;margin:8px 0}
"""


def png_data_uri(path: Path) -> str:
    """A PNG file as a ``data:`` URI, for an ``<img>`` that needs no file next to the page."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def img_html(path: Path | None, alt: str) -> str:
    """An inlined ``<img>`` of the PNG at ``path``; empty when there is no such file."""
    if path is None or not Path(path).is_file():
        return ""
    return f'<img alt="{html.escape(alt)}" src="{png_data_uri(Path(path))}">'


def frame_html(frame: pd.DataFrame, decimals: int | None = None) -> str:
    """A data table as HTML, text escaped, missing values as "-" (metric tables: `table_html`)."""
    fmt = None if decimals is None else (lambda v: f"{v:.{decimals}f}")
    return frame.to_html(escape=True, border=0, na_rep="-", float_format=fmt)


def page_html(title: str, sections: list[tuple[str, str]]) -> str:
    """The whole page: the title as ``<title>`` and ``<h1>``, then each (heading, HTML body)."""
    body = "".join(f"<h2>{html.escape(h)}</h2>{content}" for h, content in sections)
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{PAGE_CSS}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>{body}</body></html>"
    )


def write_html(path: str | Path, title: str, sections: list[tuple[str, str]]) -> Path:
    """Write a self-contained HTML page (inline CSS, images as data URIs) atomically."""
    path = Path(path)
    atomic_write_text(path, page_html(title, sections))
    return path
