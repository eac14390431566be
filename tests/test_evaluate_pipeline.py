"""The evaluation pipeline: evaluate_features, TVN, image datasets, runs and `cdcl evaluate`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from cli_process import cdcl as _cdcl
from conftest import SHARED_DATA, write_random_dataset

from cdcl.evaluation.run import evaluate_images
from cdcl.metrics.score import evaluate_features
from cdcl.profiles.columns import ColumnSpec, tvn
from cdcl.report.results import to_jsonable

BBBC021_PROFILES = (
    SHARED_DATA / "bbbc021_metadata" / "BBBC021_well_profiles_feature_selected_mad_robustize.csv.gz"
)


def planted_profiles(seed: int = 0, batch_shift: float = 6.0) -> tuple[np.ndarray, pd.DataFrame]:
    """Well profiles with a treatment signal (2 MoAs x 2 compounds) and a large plate offset."""
    rng = np.random.default_rng(seed)
    d = 16
    moa_dir = {"m0": rng.normal(size=d), "m1": rng.normal(size=d)}
    comp = {f"c{i}": ("m0" if i < 2 else "m1") for i in range(4)}
    comp_dir = {c: 1.0 * rng.normal(size=d) for c in comp}
    rows, feats = [], []
    for b in range(4):
        for p in range(2):
            plate = f"b{b}p{p}"
            offset = batch_shift * rng.normal(size=d)
            for w in range(12):
                # Compounds c0/c2 on batches 0-1, c1/c3 on batches 2-3: NSCB has candidates.
                c = None if w < 4 else ("c0", "c2", "c1", "c3")[2 * (b // 2) + (w - 4) % 2]
                signal = np.zeros(d) if c is None else 2.0 * moa_dir[comp[c]] + comp_dir[c]
                feats.append(offset + signal + 0.3 * rng.normal(size=d))
                rows.append(
                    {
                        "plate": plate,
                        "well": f"w{w}",
                        "batch": f"b{b}",
                        "treatment": c or "DMSO",
                        "compound": c or "DMSO",
                        "moa": comp[c] if c else None,
                        "is_control": c is None,
                    }
                )
    return np.asarray(feats, np.float32), pd.DataFrame(rows)


def _no_nan(obj: object) -> None:
    """json.loads must never meet NaN or Infinity."""
    json.loads(json.dumps(obj), parse_constant=lambda c: pytest.fail(f"{c} in results"))


def test_evaluate_features_plate_normalisation_removes_plate_effect() -> None:
    x, meta = planted_profiles()
    train = meta["batch"].isin(["b0", "b1", "b2"]).to_numpy()
    test = ~train
    res = evaluate_features(x, meta, train, test, eval_mask=np.ones(len(x), bool), null_size=200)
    assert "errors" not in res, res.get("errors")
    raw, norm = res["raw"], res["plate_normalized"]
    assert res["n"] == {
        "profiles": 96,
        "dims": 16,
        "train": 72,
        "test": 24,
        "eval": 96,
        "eval_batches": 4,
    }
    # The plate offset dominates raw profiles; control standardisation removes it.
    assert raw["batch_classifier"]["accuracy"] > 0.9
    assert norm["batch_classifier"]["accuracy"] < raw["batch_classifier"]["accuracy"]
    assert norm["kbet"]["acceptance_rate"] > raw["kbet"]["acceptance_rate"]
    assert norm["silhouette"]["batch_scib"] >= raw["silhouette"]["batch_scib"] - 0.05
    assert norm["moa_matching"]["nsc"] == 1.0 and norm["moa_matching"]["nscb"] == 1.0
    assert norm["moa_matching"]["nsc"] >= raw["moa_matching"]["nsc"]
    assert norm["classification"]["logistic"]["accuracy"] > 0.7  # chance 0.25
    assert norm["classification"]["knn"]["accuracy"] > 0.7
    assert norm["classification"]["n_train"] == 48 and norm["classification"]["n_test"] == 16
    assert norm["grit"]["mean_grit"] > 1.0
    for key in ("replicate", "replicate_batch_aware", "moa", "moa_batch_aware"):
        assert 0.0 <= norm["map"][key]["map"] <= 1.0, key
    assert norm["map"]["moa_batch_aware"]["map"] > 0.9
    _no_nan(to_jsonable(res))


def test_evaluate_features_rejects_empty_and_nan() -> None:
    from cdcl.errors import CdclError

    x, meta = planted_profiles()
    with pytest.raises(CdclError, match="empty feature set"):
        evaluate_features(np.zeros((len(x), 0), np.float32), meta)
    x[3, 2] = np.nan
    with pytest.raises(CdclError, match="NaN"):
        evaluate_features(x, meta)


def test_to_jsonable_turns_nan_into_null() -> None:
    out = to_jsonable({"a": float("nan"), "b": np.float32(1.5), "c": [np.inf, np.int64(2)]})
    assert out == {"a": None, "b": 1.5, "c": [None, 2]}


def test_tvn_whitens_controls_and_coral_aligns_batches() -> None:
    x, meta = planted_profiles(batch_shift=1.0)
    ctrl = meta["is_control"].to_numpy()
    t = tvn(x, meta, eps=1e-6)
    cov = np.cov(t[ctrl], rowvar=False)
    np.testing.assert_allclose(cov, np.eye(cov.shape[0]), atol=1e-3)
    np.testing.assert_allclose(t[ctrl].mean(0), 0.0, atol=1e-4)
    tc = tvn(x, meta, coral=True)
    for b in meta["batch"].unique():
        rows = ctrl & (meta["batch"] == b).to_numpy()
        np.testing.assert_allclose(tc[rows].mean(0), 0.0, atol=1e-4)


def test_column_spec_combines_columns_and_patterns() -> None:
    from cdcl.errors import CdclError

    t = pd.DataFrame(
        {
            "Metadata_Plate": ["Week1_1", "Week1_2", "Week2_9"],
            "Metadata_Well": ["A01", "A02", "A01"],
            "Metadata_Compound": ["DMSO", "taxol", "taxol"],
            "Metadata_Concentration": [0.0, 1.0, 3.0],
            "Metadata_moa": ["DMSO", "MT", "MT"],
        }
    )
    m = ColumnSpec(
        batch_col="Metadata_Plate",
        batch_pattern=r"^(Week\d+)",
        treatment_col="Metadata_Compound,Metadata_Concentration",
    ).resolve(t)
    assert list(m["batch"]) == ["Week1", "Week1", "Week2"]
    assert list(m["treatment"]) == ["DMSO@0.0", "taxol@1.0", "taxol@3.0"]
    assert list(m["is_control"]) == [True, False, False]  # DMSO found by name
    assert list(m["plate"]) == list(t["Metadata_Plate"])
    m2 = ColumnSpec(control_query="Metadata_Concentration > 2").resolve(t)
    assert list(m2["is_control"]) == [False, False, True]
    with pytest.raises(CdclError, match="--batch-col Metadata_Batch: no such column"):
        ColumnSpec(batch_col="Metadata_Batch").resolve(t)


def test_evaluate_images_with_random_backbone(tmp_path: Path) -> None:
    from cdcl.data.dataset_dir import open_dataset
    from cdcl.data.splits import assign_split
    from cdcl.embed.baselines import IntensityFeatures, random_timm_backbone
    from cdcl.embed.inference import make_view_fn

    torch.set_num_threads(1)
    ds = open_dataset(write_random_dataset(tmp_path / "ds", size=32))
    split = assign_split(ds.samples, ds.info.source, 1)
    net = random_timm_backbone("resnet18", in_chans=5, seed=0)
    treatments = sorted(ds.samples["treatment"].unique())
    probe = torch.nn.Linear(512, len(treatments))
    results, profiles = evaluate_images(
        ds,
        split,
        {"resnet": net, "intensity": IntensityFeatures()},
        make_view_fn(size=24),
        tvn_on=("resnet",),
        online_probe={
            "set": "resnet",
            "probe": probe,
            "label_of": {t: i for i, t in enumerate(treatments)},
        },
        null_size=100,
        progress=False,
    )
    assert set(results) == {"resnet", "resnet+tvn", "intensity"}
    for name, res in results.items():
        assert "errors" not in res, (name, res.get("errors"))
        cls = res["raw"]["classification"]
        assert cls["n_train"] == 8 and cls["n_test"] == 4  # 4 treatment wells per batch
        assert 0.0 <= cls["knn"]["accuracy"] <= 1.0
        assert res["n"]["eval"] == 5 and res["n"]["eval_batches"] == 1  # the held-out batch
    op = results["resnet"]["online_probe"]
    assert op["n_test"] == 8 and 0.0 <= op["accuracy"] <= 1.0
    wp, wmeta = profiles["resnet"]
    assert wp.shape == (15, 512) and set(wmeta["split"]) == {"train", "test"}
    assert profiles["intensity"][0].shape == (15, 50)


def test_a_screen_without_controls_skips_the_control_fitted_sets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cdcl.data.dataset_dir import open_dataset
    from cdcl.data.splits import assign_split
    from cdcl.embed.baselines import IntensityFeatures

    data = write_random_dataset(tmp_path / "ds", size=16)
    samples = pd.read_parquet(data / "samples.parquet")
    # no negative controls at all: the DMSO wells become a fifth treatment
    ctrl = samples["is_control"].to_numpy(bool)
    samples.loc[ctrl, ["treatment", "compound", "moa"]] = ["t4", "t4", "m1"]
    samples["is_control"] = False
    samples.to_parquet(data / "samples.parquet")
    ds = open_dataset(data)
    split = assign_split(ds.samples, ds.info.source, 1)
    results, _ = evaluate_images(
        ds,
        split,
        {"intensity": IntensityFeatures()},
        tvn_on=("intensity",),
        corrections=("sphering", "harmony"),
        null_size=50,
        progress=False,
    )
    # TVN and sphering need controls; Harmony does not and still runs
    assert set(results) == {"intensity", "intensity+harmony"}
    err = capsys.readouterr().err
    assert "intensity+tvn not computed" in err and "intensity+sphering not computed" in err
    # each with the transform's own reason
    assert "TVN needs at least 3 control profiles, found 0" in err
    assert "sphering needs at least 2 control profiles, found 0" in err


@pytest.mark.slow
def test_cli_evaluate_bbbc021_profiles(tmp_path: Path) -> None:
    out = tmp_path / "bbbc"
    r = _cdcl(
        "evaluate",
        "--features",
        str(BBBC021_PROFILES),
        "--out",
        str(out),
        "--batch-col",
        "Metadata_Plate",
        "--batch-pattern",
        r"^(Week\d+)",
        "--treatment-col",
        "Metadata_Compound,Metadata_Concentration",
        "--control-query",
        "Metadata_Compound == 'DMSO'",
        "--null-size",
        "300",
        "--no-umap",
    )
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "results.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    fs = res["feature_sets"]["features"]
    assert "errors" not in fs
    mm = fs["raw"]["moa_matching"]
    # Ljosa et al. 2013: CellProfiler profiles reach ~0.9 NSC and less NSCB; chance is 1/12.
    assert mm["n_treatments"] == 103 and mm["n_moas"] == 12
    assert mm["nsc"] >= mm["nscb"] > 3 / 12
    assert mm["nsc"] > 0.8
    assert fs["plate_normalized"]["moa_matching"]["nsc"] > 0.5
    assert res["source"]["n_profiles"] == 632 and res["source"]["columns"]["n_controls"] == 330
    assert len(res["split"]["test_batches"]) >= 1
    assert (out / "report.html").is_file()
    assert "NSCB" in r.stdout


def test_cli_evaluate_bad_inputs(tmp_path: Path) -> None:
    x, meta = planted_profiles()
    table = pd.concat(
        [meta.add_prefix("Metadata_"), pd.DataFrame(x, columns=[f"f{i}" for i in range(16)])],
        axis=1,
    )
    good = tmp_path / "t.parquet"
    table.to_parquet(good)
    r = _cdcl(
        "evaluate", "--features", str(good), "--out", str(tmp_path / "o"), "--batch-col", "Nope"
    )
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "--batch-col Nope: no such column" in r.stderr
    only_meta = tmp_path / "m.csv"
    meta.add_prefix("Metadata_").to_csv(only_meta, index=False)
    r = _cdcl("evaluate", "--features", str(only_meta), "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "no feature columns" in r.stderr
    r = _cdcl("evaluate", "--features", str(good))
    assert r.returncode == 2 and "--out" in r.stderr
    r = _cdcl("evaluate", str(tmp_path / "no_run"))
    assert r.returncode == 2 and "no_run" in r.stderr


@pytest.mark.slow
def test_cli_evaluate_run_end_to_end(tmp_path: Path) -> None:
    ds = write_random_dataset(tmp_path / "ds", size=32)
    run = tmp_path / "run"
    r = _cdcl(
        "train",
        "--preset",
        "synthetic-dino",
        "--data",
        str(ds),
        "--out",
        str(run),
        "train.max_steps=2",
        "train.batch_size=8",
        "model.depth=1",
        "model.embed_dim=32",
        "model.num_heads=2",
    )
    assert r.returncode == 0, r.stderr
    r = _cdcl("evaluate", str(run), "--checkpoint", "last", "--no-umap", "--null-size", "100")
    assert r.returncode == 0, r.stderr
    res = json.loads((run / "results.json").read_text())
    assert set(res["feature_sets"]) == {"dino", "dino+tvn", "intensity", "random"}
    src = res["source"]
    assert len(src["checkpoint_sha256"]) == 16 and src["checkpoint"].endswith("last.pt")
    assert src["n_images"] == 30 and src["dataset_name"] == "random"
    assert res["split"]["test_batches"] == ["b0"]
    assert res["config"]["method"]["name"] == "dino"
    assert "online_probe" in res["feature_sets"]["dino"]
    assert res["timings_s"]["embed.dino"] >= 0
    for name, fs in res["feature_sets"].items():
        assert "errors" not in fs, name
        assert {"raw", "plate_normalized"} <= set(fs)
    assert (run / "report.html").is_file() and (run / "plots" / "training_curves.png").is_file()
