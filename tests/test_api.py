"""The Python API (`import cdcl`): light import, documented verbs, a notebook-style session."""

from __future__ import annotations

import inspect
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cli_process import TINY_MODEL_VALUES
from cli_process import cdcl as run_cdcl

import cdcl

VERBS = (
    "synth",
    "build_table",
    "build_rxrx1",
    "build_cpg0004",
    "open_dataset",
    "info",
    "train",
    "embed",
    "evaluate",
    "metrics",
    "correct",
    "compare",
    "demo",
    "study",
)
# A tiny network so that an epoch of the tiny screen takes seconds on one core.
TINY = {**TINY_MODEL_VALUES, "train.batch_size": 8, "train.epochs": 1}
# Figures that compare held-out batches with each other (all need >= 2 held-out batches).
BATCH_FIGURES = (
    ("kbet", "acceptance_rate"),
    ("ilisi", "ilisi"),
    ("silhouette", "batch_scib"),
    ("batch_classifier", "accuracy"),
    ("map", "replicate_batch_aware", "map"),
)


def figure(results: dict, name: str, path: tuple[str, ...], variant: str = "raw") -> float:
    """One figure of a results dict (NaN when absent)."""
    d = results["feature_sets"][name][variant]
    for key in path:
        if not isinstance(d, dict) or d.get(key) is None:
            return float("nan")
        d = d[key]
    return float(d)


def test_import_is_light_and_exposes_documented_verbs() -> None:
    code = "import sys, cdcl; print(sorted(m for m in ('torch', 'timm', 'scanpy', 'anndata') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    for verb in VERBS:
        fn = getattr(cdcl, verb)
        doc = inspect.getdoc(fn) or ""
        assert doc and "Parameters\n----------" in doc and "Returns\n-------" in doc, verb
        # Every parameter is documented by name.
        for p in inspect.signature(fn).parameters.values():
            if p.kind is p.VAR_KEYWORD:
                continue
            assert p.name in doc, f"{verb}: parameter {p.name} undocumented"
    assert cdcl.__version__ and set(VERBS) <= set(cdcl.__all__)


def test_cli_version() -> None:
    out = run_cdcl("--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"cdcl {cdcl.__version__}"


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A notebook-style session on the tiny simulated screen: synth, train, embed."""
    root = tmp_path_factory.mktemp("api")
    data = cdcl.synth(root / "screen", preset="tiny")
    run = cdcl.train(data, root / "run", preset="synthetic-cdcl", overrides=TINY)
    profiles = cdcl.embed(run)
    adata = cdcl.embed(run, as_anndata=True, out=root / "profiles.h5ad")
    return {"root": root, "data": data, "run": run, "profiles": profiles, "adata": adata}


@pytest.mark.slow
def test_notebook_session_end_to_end(session: dict) -> None:
    data, run, profiles = session["data"], session["run"], session["profiles"]
    ds = cdcl.open_dataset(data)
    assert len(ds.samples) == 96 and "held out" in cdcl.info(data)
    assert (Path(run) / "checkpoints").is_dir()
    # A pycytominer-style DataFrame: Metadata_* columns then features.
    assert isinstance(profiles, pd.DataFrame) and len(profiles) == 32  # 4 plates x 8 wells
    for col in ("Metadata_Plate", "Metadata_Well", "Metadata_Batch", "Metadata_Split"):
        assert col in profiles.columns
    # The run's held-out batches travel with the profiles.
    test_batches = sorted(ds.samples.loc[ds.samples["split"] == "test", "batch"].unique())
    exported = profiles.loc[profiles["Metadata_Split"] == "test", "Metadata_Batch"]
    assert sorted(exported.unique()) == test_batches
    results = cdcl.evaluate(profiles, null_size=200)
    assert results["split"]["test_batches"] == test_batches
    assert results["split"]["from_column"] == "Metadata_Split"
    for path in BATCH_FIGURES:
        assert math.isfinite(figure(results, "features", path)), path
    table = cdcl.metrics(results)
    assert "features | raw" in table.columns and table.notna().any().any()
    # The AnnData of the same run scores the same.
    same = cdcl.evaluate(session["adata"], null_size=200)
    for path in BATCH_FIGURES:
        assert figure(same, "features", path) == pytest.approx(figure(results, "features", path))
    # A post-hoc correction keeps the table's shape and metadata.
    fixed = cdcl.correct(profiles, "combat")
    assert fixed.shape == profiles.shape
    pd.testing.assert_frame_equal(fixed.filter(like="Metadata_"), profiles.filter(like="Metadata_"))
    assert not np.allclose(fixed.filter(like="Cells_"), profiles.filter(like="Cells_"))


@pytest.mark.slow
def test_h5ad_carries_provenance_names_and_var(session: dict) -> None:
    import anndata as ad

    a = ad.read_h5ad(session["root"] / "profiles.h5ad")
    info = a.uns["cdcl"]
    assert len(info["checkpoint_sha256"]) == 16 and info["method"] == "cdcl"
    assert json.loads(info["config"])["method"]["name"] == "cdcl"
    assert {"cdcl", "torch", "numpy"} <= set(info["versions"])
    # Well profiles are named plate_well; features are named in var.
    first = a.obs.iloc[0]
    assert a.obs_names[0] == f"{first['Metadata_Plate']}_{first['Metadata_Well']}"
    assert a.obs_names.is_unique
    assert list(a.var_names) == [f"Cells_Embedding_{i:04d}" for i in range(a.n_vars)]


@pytest.mark.slow
def test_cli_evaluate_features_honours_the_exported_split(session: dict, tmp_path: Path) -> None:
    path = tmp_path / "profiles.parquet"
    session["profiles"].to_parquet(path, index=False)
    args = ["evaluate", "--features", path, "--no-umap"]
    r = run_cdcl(*args, "--out", tmp_path / "a", "--null-size", "100")
    assert r.returncode == 0, r.stderr
    assert "Metadata_Split column" in r.stderr
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    held = sorted(session["profiles"].query("Metadata_Split == 'test'")["Metadata_Batch"].unique())
    assert res["split"]["test_batches"] == held and res["split"]["eval_on"] == "test"
    # Without the column: fold 1 of the rotation, and the message says which and why.
    path.unlink()
    session["profiles"].drop(columns="Metadata_Split").to_parquet(path, index=False)
    r = run_cdcl(*args, "--out", tmp_path / "b", "--null-size", "100")
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stderr.splitlines() if ln.startswith("note: held out:"))
    assert "fold 1" in line and "no Metadata_Split column" in line


def test_old_lowercase_exports_still_evaluate(tmp_path: Path) -> None:
    """Exports written before the pycytominer names (Metadata_plate, f0 ...) are still read."""
    rng = np.random.default_rng(0)
    rows = [
        {"Metadata_plate": f"p{p}", "Metadata_well": f"w{w}", "Metadata_batch": f"p{p}",
         "Metadata_treatment": "DMSO" if w < 2 else f"t{w % 3}", "Metadata_is_control": w < 2}
        for p in range(4) for w in range(6)
    ]  # fmt: skip
    meta = pd.DataFrame(rows)
    feats = pd.DataFrame(rng.normal(size=(len(meta), 8)), columns=[f"f{i}" for i in range(8)])
    res = cdcl.evaluate(pd.concat([meta, feats], axis=1), null_size=50)
    assert res["split"]["test_batches"] == ["p0", "p1"]  # two of four plates held out
    assert math.isfinite(figure(res, "features", ("kbet", "acceptance_rate")))


def test_exports_run_through_pycytominer_with_default_arguments(tmp_path: Path) -> None:
    """aggregate, normalize and feature_select find cdcl's metadata and features by default."""
    import pycytominer
    from conftest import write_random_dataset

    data = write_random_dataset(tmp_path / "ds", n_batches=2, sites=2)
    images = cdcl.embed("intensity", data, level="image")
    assert {"Metadata_Plate", "Metadata_Well", "Metadata_Site"} <= set(images.columns)
    features = [c for c in images.columns if c.startswith("Cells_")]
    assert pycytominer.cyto_utils.infer_cp_features(images) == features
    wells = pycytominer.aggregate(images)
    assert len(wells) == images.groupby(["Metadata_Plate", "Metadata_Well"]).ngroups
    np.testing.assert_allclose(
        wells[features].to_numpy(),
        images.groupby(["Metadata_Plate", "Metadata_Well"])[features].median().to_numpy(),
        rtol=1e-5,
    )
    normalized = pycytominer.normalize(images)
    assert normalized.shape == images.shape
    kept = pycytominer.cyto_utils.infer_cp_features(normalized)
    np.testing.assert_allclose(normalized[kept].mean().to_numpy(), 0, atol=1e-4)
    selected = pycytominer.feature_select(normalized)
    n_selected = len(pycytominer.cyto_utils.infer_cp_features(selected))
    assert 0 < n_selected <= len(features)
    # cdcl evaluates pycytominer's output directly (its Metadata_* names, no extra flags).
    res = cdcl.evaluate(
        pd.concat([images.filter(like="Metadata_"), selected.filter(like="Cells_")], axis=1),
        null_size=50,
    )
    assert res["source"]["n_features"] == n_selected


def test_the_api_page_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/api.md's snippet, run as written."""
    import re

    page = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    assert blocks and "::: cdcl.api" in page
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/api.md", "exec"), namespace)  # noqa: S102 - the page's code
    table = cdcl.metrics(namespace["results"])
    assert "features | raw" in table.columns
    assert math.isfinite(figure(namespace["results"], "features", ("kbet", "acceptance_rate")))
