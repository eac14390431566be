"""The report layer's one Markdown table writer and one HTML page shell."""

from __future__ import annotations

import pandas as pd

from cdcl.report.markdown import frame_markdown, markdown_table
from cdcl.report.page import img_html, page_html, write_html


def test_markdown_table_layout() -> None:
    text = markdown_table(["metric", "a", "b"], [["x", "1", "2"], ["y", "–", "3"]])
    assert text == "| metric | a | b |\n|---|---|---|\n| x | 1 | 2 |\n| y | – | 3 |"


def test_markdown_table_without_rows_keeps_header_and_rule() -> None:
    assert markdown_table(["a", "b"], []) == "| a | b |\n|---|---|"


def test_frame_markdown_puts_the_index_first_and_formats_cells() -> None:
    df = pd.DataFrame(
        {"acc": [0.5, float("nan")]}, index=pd.Index(["DINO", "CDCL"], name="features")
    )
    text = frame_markdown(df, lambda v: "–" if v != v else f"{v:.3f}")
    assert text.splitlines() == [
        "| features | acc |",
        "|---|---|",
        "| DINO | 0.500 |",
        "| CDCL | – |",
    ]
    # an unnamed index leaves the first header cell empty; cells default to str
    assert frame_markdown(pd.DataFrame({"n": [3]}, index=["r"])).splitlines()[0] == "|  | n |"


def test_page_shell_escapes_the_title_and_writes_every_section(tmp_path) -> None:
    doc = page_html("a <b> & c", [("First", "<p>one</p>"), ("Second & last", "")])
    assert doc.startswith("<!DOCTYPE html><html><head><meta charset='utf-8'><title>a &lt;b&gt;")
    assert "<h1>a &lt;b&gt; &amp; c</h1><h2>First</h2><p>one</p><h2>Second &amp; last</h2>" in doc
    assert doc.endswith("</body></html>")
    path = write_html(tmp_path / "page.html", "t", [])
    assert path.read_text() == page_html("t", [])


def test_img_html_is_empty_without_the_file(tmp_path) -> None:
    assert img_html(None, "x") == ""
    assert img_html(tmp_path / "missing.png", "x") == ""
    png = tmp_path / "p.png"
    png.write_bytes(b"\x89PNG")
    assert (
        img_html(png, 'a "b"') == '<img alt="a &quot;b&quot;" src="data:image/png;base64,iVBORw==">'
    )
