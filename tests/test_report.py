"""Report: metrics table, UMAP and training-curve PNGs, self-contained HTML, compare."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cli_process import cdcl
from test_evaluate_pipeline import planted_profiles

from cdcl.metrics.score import base_results, evaluate_features
from cdcl.report.html import (
    make_report,
    metrics_table,
    plot_training_curves,
    read_metrics_jsonl,
    table_html,
    umap_coords,
)
from cdcl.report.results import write_results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _results(seed: int = 0) -> tuple[dict, np.ndarray, pd.DataFrame]:
    x, meta = planted_profiles(seed)
    train = meta["batch"].isin(["b0", "b1", "b2"]).to_numpy()
    fs = {
        "model": evaluate_features(
            x, meta, train, ~train, eval_mask=np.ones(len(x), bool), null_size=100
        )
    }
    res = base_results("features", source={"features_file": f"planted{seed}"}, feature_sets=fs)
    return res, x, meta


def _external_refs(doc: str) -> list[str]:
    """Every src/href attribute value that is not a data: URI."""
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", doc, flags=re.I)
    return [r for r in refs if not r.startswith("data:")]


def test_metrics_table_rows_and_columns() -> None:
    res, _, _ = _results()
    table = metrics_table(res)
    assert list(table.columns) == ["model | raw", "model | plate_normalized"]
    assert {"NSC", "NSCB", "kBET acceptance", "GRIT (mean)", "MoA mAP, batch-aware"} <= set(
        table.index
    )
    assert table.loc["NSC", "model | plate_normalized"] == 1.0
    doc = table_html(table)
    # Best value per row is highlighted; batch-classifier accuracy: lower is better.
    row = re.search(r"<tr><td>batch classifier accuracy ↓</td>(.*?)</tr>", doc).group(1)
    cells = re.findall(r'<td( class="best")?>([^<]*)</td>', row)
    best = [v for cls, v in cells if cls]
    assert best == [min(v for _, v in cells)]


def test_training_curves_from_metrics_jsonl(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    lines = [
        json.dumps({"step": i, "loss": 5.0 / (i + 1), "lr": 1e-3, "phase": "train"})
        for i in range(20)
    ]
    log.write_text("\n".join(lines) + '\n{"step": 20, "loss"')  # a half-written last line
    df = read_metrics_jsonl(log)
    assert len(df) == 20 and set(df.columns) == {"step", "loss", "lr"}
    png = plot_training_curves(log, tmp_path / "curves.png")
    assert png is not None and png.read_bytes().startswith(PNG_MAGIC)
    assert plot_training_curves(tmp_path / "missing.jsonl", tmp_path / "c2.png") is None


@pytest.mark.slow
def test_report_is_self_contained_and_compare(tmp_path: Path) -> None:
    dirs = []
    for seed in (0, 1):
        res, x, meta = _results(seed)
        out = tmp_path / f"run{seed}"
        log = out / "metrics.jsonl"
        out.mkdir()
        log.write_text(
            "".join(json.dumps({"step": i, "loss": 1.0 / (i + 1)}) + "\n" for i in range(5))
        )
        write_results(res, out)
        path = make_report(res, out, profiles={"model": (x, meta)}, metrics_jsonl=log)
        dirs.append(out)
    doc = path.read_text()
    assert _external_refs(doc) == []
    assert "<table" in doc and "NSCB" in doc and "kBET acceptance" in doc
    imgs = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,', doc)
    assert imgs == ["UMAP model", "training curves"]
    assert (out / "plots" / "umap_model.png").read_bytes().startswith(PNG_MAGIC)
    umap_df = pd.read_csv(out / "plots" / "umap_model.csv")
    assert len(umap_df) == len(x) and np.isfinite(umap_df[["umap_x", "umap_y"]]).all().all()

    # compare, through the command line
    cmp_dir = tmp_path / "cmp"
    r = cdcl("compare", *dirs, "--out", cmp_dir, timeout=300)
    assert r.returncode == 0, r.stderr
    table = pd.read_csv(cmp_dir / "comparison.csv")
    assert set(table["run"]) == {"run0", "run1"}
    nsc = table[(table["metric"] == "NSC") & (table["variant"] == "plate_normalized")]
    assert len(nsc) == 2
    html = (cmp_dir / "compare.html").read_text()
    assert _external_refs(html) == []
    assert "run0 | model | raw" in html and "run1 | model | raw" in html
    assert (cmp_dir / "umap_grid.png").read_bytes().startswith(PNG_MAGIC)
    assert html.count("data:image/png;base64,") == 1


def test_compare_rejects_missing_results(tmp_path: Path) -> None:
    r = cdcl("compare", tmp_path, "--out", tmp_path / "o", timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "results.json" in r.stderr


@pytest.mark.slow
def test_umap_leaves_torch_thread_count_alone() -> None:
    """UMAP (numba's OpenMP layer shares torch's libgomp) must not change torch's thread count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # above UMAP_MIN_POINTS, so UMAP (numba) runs rather than the PCA layout
        xy = umap_coords(np.random.default_rng(0).normal(size=(120, 8)), seed=0, n_epochs=20)
        assert xy.shape == (120, 2)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_few_dozen_points_get_a_labelled_pca_layout(tmp_path: Path) -> None:
    """Below UMAP_MIN_POINTS the layout is the first two principal components, and says so."""
    from sklearn.decomposition import PCA

    from cdcl.report.html import UMAP_MIN_POINTS, plot_umap, umap_frame

    rng = np.random.default_rng(1)
    n = 2 * (UMAP_MIN_POINTS // 6)
    x = rng.normal(size=(n, 6)) * np.array([5.0, 3.0, 1.0, 1.0, 1.0, 1.0])
    meta = pd.DataFrame({"batch": ["a", "b"] * (n // 2), "treatment": "t", "is_control": False})
    df = umap_frame(x, meta)
    assert (df["projection"] == "PCA").all()
    z = (x - x.mean(0)) / x.std(0)
    want = PCA(n_components=2).fit_transform(z)
    got = df[["umap_x", "umap_y"]].to_numpy()
    for k in range(2):  # the same components up to sign
        assert abs(np.corrcoef(got[:, k], want[:, k])[0, 1]) > 0.999
    path = plot_umap(df, "model", tmp_path / "u.png")
    assert path.read_bytes().startswith(PNG_MAGIC)
