"""The report says what good looks like: results figure, glossary, ties, baseline warning, layout."""

from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from test_report import _results

from cdcl.metrics.info import METRIC_INFO
from cdcl.report.html import (
    HEADLINE,
    LABEL_PATHS,
    compare,
    indistinguishable_warnings,
    render_report,
    results_figure_html,
    sets_frame,
    table_html,
)
from cdcl.report.results import write_results

CHROMIUM = Path("/usr/bin/chromium")
PAGE_WIDTH = 1400


def _with_baselines(seed: int = 0, same: bool = True) -> dict:
    """Planted results plus baseline sets: a copy of the model (``same``) or a shifted copy."""
    res, _, _ = _results(seed)
    fs = res["feature_sets"]
    fs["random network"] = copy.deepcopy(fs["model"])
    fs["intensity stats"] = copy.deepcopy(fs["model"])
    for variant in ("raw", "plate_normalized"):
        fs["intensity stats"][variant]["moa_matching"]["nsc"] = 0.25
        if not same:
            fs["random network"][variant]["moa_matching"]["nsc"] = 0.5
            fs["random network"][variant]["kbet"]["acceptance_rate"] = 0.05
    return res


def test_every_headline_metric_is_described() -> None:
    for label, path, higher in HEADLINE:
        info = METRIC_INFO[path]
        assert info.higher_is_better == higher, label
        assert info.null and info.meaning, label


def test_ties_are_not_highlighted_as_best() -> None:
    table = pd.DataFrame(
        {"a": [0.0, 0.9, 0.2], "b": [0.0, 0.5, 0.2], "c": [0.0, 0.1, 0.1]},
        index=["iLISI (scaled)", "NSC", "batch classifier accuracy"],
    )
    doc = table_html(table)
    rows = dict(re.findall(r"<tr><td>([^<]*?) [↑↓]</td>(.*?)</tr>", doc))
    assert 'class="best"' not in rows["iLISI (scaled)"]  # three-way tie at 0
    assert re.findall(r'class="best">([^<]*)<', rows["NSC"]) == ["0.900"]
    # Lower is better: the one lowest value is the best, the tied 0.200s are not.
    assert re.findall(r'class="best">([^<]*)<', rows["batch classifier accuracy"]) == ["0.100"]
    assert doc.startswith('<div class="scroll">')


def test_results_figure_groups_fixed_range_bars_and_aggregate() -> None:
    frame = sets_frame(_with_baselines(same=False), "plate_normalized")
    assert list(frame.index) == ["model", "random network", "intensity stats"]
    doc = results_figure_html(frame, LABEL_PATHS)
    assert "batch removal" in doc and "biology conservation" in doc and "aggregate" in doc
    headers = re.findall(r"<th[^>]*>([^<]*?) [↑↓](?:<sup>Σ</sup>)?</th>", doc)
    nsc = headers.index("NSC")
    # NSC on its fixed 0-1 range, not rescaled over the rows: 1.0 full, 0.5 half, 0.25 a quarter.
    rows = {
        name: re.findall(r'<i style="width:(\d+)%"></i><span>([^<]*)</span>', body)
        for name, body in re.findall(r"<tr><td>([^<]+)</td>(.*?)</tr>", doc)
    }
    nsc_bars = {name: bars[nsc] for name, bars in rows.items()}
    assert nsc_bars == {
        "model": ("100", "1.000"),
        "random network": ("50", "0.500"),
        "intensity stats": ("25", "0.250"),
    }
    # Rows sorted by their total: the model, whose NSC and kBET are best, comes first.
    assert list(rows)[0] == "model" and len(rows) == 3


def test_total_is_the_same_whatever_rows_are_shown() -> None:
    """A row's total does not depend on the other rows (fixed range, not min-max over rows)."""
    frame = sets_frame(_with_baselines(same=False), "plate_normalized")

    def totals(doc: str) -> dict[str, str]:
        rows = re.findall(r"<tr><td>([^<]+)</td>(.*?)</tr>", doc)
        return {n: re.findall(r"<span>([^<]*)</span>", body)[-1] for n, body in rows}

    all_rows = totals(results_figure_html(frame, LABEL_PATHS))
    alone = totals(results_figure_html(frame.loc[["model", "intensity stats"]], LABEL_PATHS))
    assert (
        alone["model"] == all_rows["model"]
        and alone["intensity stats"] == all_rows["intensity stats"]
    )


def test_warning_only_when_learned_equals_a_baseline() -> None:
    same = sets_frame(_with_baselines(same=True), "plate_normalized")
    lines = indistinguishable_warnings(same, ["model"])
    assert len(lines) == 1 and "model cannot be told apart from random network" in lines[0]
    differ = sets_frame(_with_baselines(same=False), "plate_normalized")
    assert indistinguishable_warnings(differ, ["model"]) == []


def test_report_has_glossary_and_warning(tmp_path: Path) -> None:
    doc = render_report(_with_baselines(same=True), tmp_path).read_text()
    assert "What the metrics mean" in doc and 'class="warn"' in doc
    assert "about 1 / number of MoAs" in doc and "the largest batch&#x27;s share" in doc
    assert doc.index("Results: held-out batches") < doc.index("All metrics")


def test_compare_shows_shared_baselines_once(tmp_path: Path) -> None:
    dirs = []
    for seed in (0, 1):
        res, _, _ = _results(seed)
        base = _with_baselines(0, same=False)["feature_sets"]
        res["feature_sets"]["random network"] = base["random network"]  # identical in both runs
        write_results(res, tmp_path / f"run{seed}")
        dirs.append(tmp_path / f"run{seed}")
    doc = compare(dirs, tmp_path / "cmp").read_text()
    assert "shared | random network | raw" in doc
    assert "run0 | random network" not in doc and "run1 | random network" not in doc
    assert "run0 | model | raw" in doc and "run1 | model | raw" in doc
    full = pd.read_csv(tmp_path / "cmp" / "comparison.csv")  # the CSV keeps every run's rows
    assert set(full.loc[full["set"] == "random network", "run"]) == {"run0", "run1"}


def _scroll_width(page: Path, tmp_path: Path) -> int:
    """The rendered page's document width at a 1,400-px window, from headless Chromium."""
    probe = tmp_path / f"probe_{page.name}"
    script = (
        "<script>document.body.setAttribute('data-sw',"
        "document.documentElement.scrollWidth)</script></body>"
    )
    probe.write_text(page.read_text().replace("</body>", script))
    r = subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--window-size={PAGE_WIDTH},1000",
            "--dump-dom",
            probe.as_uri(),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=120,
    )
    found = re.search(r'data-sw="(\d+)"', r.stdout)
    assert found, r.stderr[-2000:]
    return int(found.group(1))


@pytest.mark.skipif(not CHROMIUM.is_file(), reason="needs Debian's chromium at /usr/bin/chromium")
def test_reports_fit_a_1400px_window(tmp_path: Path) -> None:
    res = _with_baselines(same=False)
    fs = res["feature_sets"]
    # As many rows as the demo's table, with long names.
    for name in ("CDCL", "DINO", "DINO-CB", "supervised"):
        for suffix in ("", "+tvn", "+sphering", "+harmony", "+combat"):
            fs[f"{name}{suffix}"] = copy.deepcopy(fs["model"])
    (tmp_path / "run").mkdir()
    report = render_report(res, tmp_path / "run")
    assert _scroll_width(report, tmp_path) <= PAGE_WIDTH
    write_results(res, tmp_path / "run")
    write_results(_with_baselines(1, same=False), tmp_path / "run2")
    cmp = compare([tmp_path / "run", tmp_path / "run2"], tmp_path / "cmp")
    assert _scroll_width(cmp, tmp_path) <= PAGE_WIDTH


@pytest.mark.skipif(not CHROMIUM.is_file(), reason="needs Debian's chromium at /usr/bin/chromium")
def test_a_page_wider_than_1400px_is_detected(tmp_path: Path) -> None:
    """The width probe itself can fail: a 2,000-px element is measured as overflowing."""
    page = tmp_path / "wide.html"
    page.write_text("<html><body><div style='width:2000px'>x</div></body></html>")
    assert _scroll_width(page, tmp_path) > PAGE_WIDTH
