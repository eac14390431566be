"""The built documentation site as a reader sees it: the API reference shows each parameter's
type and default as the signature has them, and no table is wider than a 1,400-px window."""

from __future__ import annotations

import ast
import html
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import cdcl.api

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
PAGE_WIDTH = 1400
# Pages with the widest tables: the metrics reference, the study results, the API parameters.
TABLE_PAGES = ("metrics", "studies", "api", "configuration")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The documentation built once into a temporary directory."""
    out = tmp_path_factory.mktemp("site")
    r = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _text(fragment: str) -> str:
    """The visible text of an HTML fragment, with whitespace removed."""
    return re.sub(r"\s+", "", html.unescape(re.sub(r"<[^>]+>", "", fragment)))


def _parameter_rows(page: str, name: str) -> dict[str, tuple[str, str]]:
    """``{parameter: (type, default)}`` from the Parameters table of ``cdcl.api.<name>``."""
    start = page.index(f'id="cdcl.api.{name}"')
    end = page.find('class="doc doc-object doc-function"', start)
    section = page[start : end if end > 0 else len(page)]
    table = re.search(r"<table>.*?</table>", section, flags=re.S)
    assert table and ">Default<" in table.group(0), f"{name}: no parameter table"
    rows = {}
    for row in re.findall(r'<tr class="doc-section-item">(.*?)</tr>', table.group(0), re.S):
        cells = re.findall(r"<td>(.*?)</td>", row, flags=re.S)
        assert len(cells) == 4, row
        rows[_text(cells[0]).lstrip("*")] = (_text(cells[1]), _text(cells[3]))
    return rows


def test_api_parameters_render_as_in_the_signature(site: Path) -> None:
    """Every parameter of every API function: its type and default as the signature has them."""
    page = (site / "api" / "index.html").read_text()
    for name in cdcl.api.__all__:
        sig = inspect.signature(getattr(cdcl.api, name))
        if not sig.parameters:  # e.g. presets(): nothing to document, only its return value
            continue
        rows = _parameter_rows(page, name)
        assert list(rows) == list(sig.parameters), name  # each documented, once, in order
        for p in sig.parameters.values():
            shown_type, shown_default = rows[p.name]
            assert shown_type == re.sub(r"\s+", "", str(p.annotation)), (name, p.name)
            if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                continue
            if p.default is inspect.Parameter.empty:
                assert shown_default == "required", (name, p.name)
            else:
                assert ast.literal_eval(shown_default) == p.default, (name, p.name)


def test_api_page_shows_no_sphinx_roles(site: Path) -> None:
    """Cross-references are Markdown: no raw ``:func:`` or ``:mod:`` text reaches the page."""
    text = html.unescape(re.sub(r"<[^>]+>", " ", (site / "api" / "index.html").read_text()))
    assert not re.findall(r":(?:func|mod|class|meth|attr|data):", text)


def _table_widths(page: Path, tmp_path: Path) -> tuple[int, list[dict]]:
    """The window width and each content table's right edge and widths, from headless Chromium."""
    script = """<script>window.addEventListener('load', () => {
      const tables = [...document.querySelectorAll('article table')].map(t => ({
        right: Math.ceil(t.getBoundingClientRect().right),
        width: t.scrollWidth,
        room: (t.closest('.md-typeset__scrollwrap') || t.parentElement).clientWidth,
        head: (t.querySelector('th') || {textContent: ''}).textContent}));
      document.body.setAttribute('data-probe', JSON.stringify(
        {window: window.innerWidth, tables: tables}));
    });</script></body>"""
    probe = page.with_name(f"probe_{tmp_path.name}.html")
    probe.write_text(page.read_text().replace("</body>", script))
    r = subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--window-size={PAGE_WIDTH},1000",
            "--virtual-time-budget=5000",
            "--dump-dom",
            probe.as_uri(),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=120,
    )
    probe.unlink()
    found = re.search(r'data-probe="([^"]*)"', r.stdout)
    assert found, r.stderr[-2000:]
    data = json.loads(html.unescape(found.group(1)))
    return int(data["window"]), data["tables"]


def _overflowing(tables: list[dict], window: int) -> list[dict]:
    """Tables cut off by their scrolling frame or running past the window's edge."""
    return [t for t in tables if t["width"] > t["room"] + 1 or t["right"] > window]


@pytest.mark.skipif(not CHROMIUM.is_file(), reason="needs Debian's chromium at /usr/bin/chromium")
@pytest.mark.parametrize("name", TABLE_PAGES)
def test_docs_tables_fit_a_1400px_window(site: Path, tmp_path: Path, name: str) -> None:
    """No table of the page is wider than its column at a 1,400-px window."""
    window, tables = _table_widths(site / name / "index.html", tmp_path)
    assert window == PAGE_WIDTH and tables
    assert not _overflowing(tables, window), _overflowing(tables, window)


@pytest.mark.skipif(not CHROMIUM.is_file(), reason="needs Debian's chromium at /usr/bin/chromium")
def test_a_table_wider_than_its_column_is_detected(site: Path, tmp_path: Path) -> None:
    """The probe can fail: a table forced to 2,000 px is reported."""
    page = tmp_path / "index.html"
    wide = (
        (site / "metrics" / "index.html")
        .read_text()
        .replace("<table>", '<table style="min-width:2000px">', 1)
    )
    page.write_text(wide.replace('href="../', f'href="{(site / "metrics").as_uri()}/../'))
    window, tables = _table_widths(page, tmp_path)
    assert len(_overflowing(tables, window)) == 1
