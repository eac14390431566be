"""Post-hoc batch correction: sphering, Harmony, ComBat and `cdcl evaluate --correct`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cli_process import cdcl as _cdcl

from cdcl.errors import CdclError
from cdcl.metrics import batch_classifier_accuracy
from cdcl.profiles.columns import tvn
from cdcl.profiles.correction import (
    CORRECTIONS,
    apply_corrections,
    combat,
    harmony,
    parse_corrections,
    sphering,
)


def shifted_toy(
    seed: int = 0, n: int = 600, d: int = 20, shift: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Profiles = treatment signal (4 treatments) + a known additive shift per batch (3) + noise."""
    rng = np.random.default_rng(seed)
    batch = rng.integers(0, 3, n)
    treat = rng.integers(0, 4, n)
    x = rng.normal(size=(n, d)) + 2.0 * rng.normal(size=(4, d))[treat]
    x += shift * rng.normal(size=(3, d))[batch]
    return x, batch.astype(str), treat.astype(str)


def test_harmony_lowers_batch_accuracy_and_keeps_treatment_signal() -> None:
    x, batch, treat = shifted_toy()
    y = harmony(x, batch, seed=0)
    assert y.shape == (600, 20) and y.dtype == np.float32  # min(50, d) components
    raw_b = batch_classifier_accuracy(x, batch, seed=0)["accuracy"]
    cor_b = batch_classifier_accuracy(y, batch, seed=0)["accuracy"]
    assert raw_b > 0.9  # the shift is plainly visible before correction
    assert cor_b < raw_b - 0.3  # measured: 0.99 -> 0.48 (chance 0.36)
    assert batch_classifier_accuracy(y, treat, seed=0)["accuracy"] > 0.95


def test_harmony_reduces_to_n_components() -> None:
    x, batch, _ = shifted_toy(n=300, d=64)
    assert harmony(x, batch, n_components=8).shape == (300, 8)
    assert harmony(x, batch).shape == (300, 50)
    assert harmony(x, batch, n_components=None).shape == (300, 64)


def test_combat_equalises_per_batch_means_and_variances() -> None:
    rng = np.random.default_rng(1)
    n, d, nb = 900, 12, 3
    batch = np.repeat(np.arange(nb), n // nb)
    loc = rng.normal(scale=3.0, size=(nb, d))
    scale = rng.uniform(0.5, 2.5, size=(nb, d))
    x = rng.normal(size=(n, d)) * scale[batch] + loc[batch]
    y = combat(x, batch.astype(str))
    means = pd.DataFrame(y).groupby(batch).mean().to_numpy()
    stds = pd.DataFrame(y).groupby(batch).std().to_numpy()
    raw_means = pd.DataFrame(x).groupby(batch).mean().to_numpy()
    assert np.ptp(raw_means, axis=0).min() > 0.5
    # Per feature, every batch ends with the same mean and variance (up to EB shrinkage).
    assert np.ptp(means, axis=0).max() < 0.05 * stds.mean()
    raw_stds = pd.DataFrame(x).groupby(batch).std().to_numpy()
    assert np.median(raw_stds.max(axis=0) / raw_stds.min(axis=0)) > 1.5
    # Measured: at most 1.08 (the inverse-gamma prior shrinks each batch's scale a little).
    assert (stds.max(axis=0) / stds.min(axis=0)).max() < 1.15


def test_combat_leaves_constant_features_and_rejects_singleton_batches() -> None:
    x, batch, _ = shifted_toy(n=120, d=5)
    x[:, 2] = 7.0
    y = combat(x, batch)
    assert np.all(y[:, 2] == 7.0) and np.isfinite(y).all()
    b = batch.copy()
    b[0] = "lonely"
    with pytest.raises(CdclError, match="'lonely' has 1"):
        combat(x, b)


def test_sphering_makes_control_covariance_identity() -> None:
    rng = np.random.default_rng(2)
    d = 8
    mix = rng.normal(size=(d, d))
    ctrl = rng.normal(size=(3000, d)) @ mix + 5.0
    treated = rng.normal(size=(500, d)) @ mix + 2.0
    x = np.vstack([ctrl, treated])
    is_ctrl = np.arange(len(x)) < 3000
    y = sphering(x, is_ctrl, epsilon=1e-9)
    np.testing.assert_allclose(np.cov(y[is_ctrl], rowvar=False), np.eye(d), atol=1e-4)
    np.testing.assert_allclose(y[is_ctrl].mean(axis=0), 0.0, atol=1e-4)
    # The default regulariser: covariance Λ / (Λ + 1e-3 min Λ) in the eigenbasis (full rank).
    vals = np.linalg.eigvalsh(np.cov(ctrl, rowvar=False))
    got = np.linalg.eigvalsh(np.cov(sphering(x, is_ctrl)[is_ctrl], rowvar=False))
    np.testing.assert_allclose(np.sort(got), np.sort(vals / (vals + 1e-3 * vals.min())), 1e-4)


def test_sphering_is_tvn_up_to_a_rotation() -> None:
    # ZCA = U · PCA whitening: the same pairwise distances as TVN when nothing is truncated.
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))
    meta = pd.DataFrame({"is_control": np.arange(400) < 300, "batch": "b0"})
    a = sphering(x, meta["is_control"].to_numpy(), epsilon=1e-9).astype(np.float64)
    b = tvn(x, meta, eps=1e-9).astype(np.float64)
    da = np.linalg.norm(a[:, None] - a[None], axis=2)
    db = np.linalg.norm(b[:, None] - b[None], axis=2)
    np.testing.assert_allclose(da, db, rtol=1e-3, atol=1e-3)


def test_corrections_are_deterministic_and_independent() -> None:
    x, batch, treat = shifted_toy(n=300)
    ctrl = treat == "0"
    first = apply_corrections(x, batch, ctrl, CORRECTIONS, seed=0)
    second = apply_corrections(x, batch, ctrl, list(reversed(CORRECTIONS)), seed=0)
    assert list(first) == list(CORRECTIONS)
    for name in CORRECTIONS:
        np.testing.assert_array_equal(first[name], second[name])
        assert first[name].shape[0] == 300 and np.isfinite(first[name]).all()


def test_bad_input_is_a_one_line_error() -> None:
    x, batch, _ = shifted_toy(n=60)
    with pytest.raises(CdclError, match="choose from sphering, harmony, combat"):
        parse_corrections("harmony,mnn")
    with pytest.raises(CdclError, match="at least 2 batches"):
        harmony(x, np.full(60, "b0"))
    with pytest.raises(CdclError, match="at least 2 control"):
        sphering(x, np.zeros(60, bool))
    assert parse_corrections(" Harmony, combat,harmony ") == ("harmony", "combat")


def _table(path: Path) -> Path:
    """A small profile table: 4 batches x 2 plates, controls and 3 treatments, a batch shift."""
    rng = np.random.default_rng(4)
    d = 10
    sig = {t: 2.0 * rng.normal(size=d) for t in ("a", "b", "c")}
    rows, feats = [], []
    for b in range(4):
        shift = rng.normal(size=d)
        for p in range(2):
            for w, t in enumerate(["DMSO"] * 3 + ["a", "b", "c"] * 2):
                rows.append((f"b{b}p{p}", f"W{w:02d}", f"b{b}", t))
                feats.append(shift + sig.get(t, 0.0) + 0.3 * rng.normal(size=d))
    meta = pd.DataFrame(
        rows, columns=["Metadata_plate", "Metadata_well", "Metadata_batch", "Metadata_treatment"]
    )
    table = pd.concat([meta, pd.DataFrame(feats, columns=[f"f{i}" for i in range(d)])], axis=1)
    table.to_csv(path, index=False)
    return path


@pytest.mark.slow
def test_cli_evaluate_correct_scores_each_corrected_table(tmp_path: Path) -> None:
    table = _table(tmp_path / "profiles.csv")
    out = tmp_path / "out"
    r = _cdcl(
        "evaluate",
        "--features",
        str(table),
        "--out",
        str(out),
        "--correct",
        "harmony,combat,sphering",
        "--null-size",
        "50",
        "--no-umap",
    )
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "results.json").read_text())
    sets = res["feature_sets"]
    assert list(sets) == ["features", "features+harmony", "features+combat", "features+sphering"]
    for name, fs in sets.items():
        assert "errors" not in fs, name
        assert fs["raw"]["batch_classifier"]["accuracy"] is not None
    assert sets["features+harmony"]["n"]["dims"] == 10
    assert res["source"]["corrections"] == ["harmony", "combat", "sphering"]
    assert "transductively" in res["protocol"]["corrections"]
    assert "transductively" in r.stdout
    assert "transductively" in (out / "report.html").read_text()
    # ComBat equalises the per-batch means that the table's shift made different.
    raw = sets["features"]["raw"]["batch_classifier"]["accuracy"]
    assert sets["features+combat"]["raw"]["batch_classifier"]["accuracy"] < raw


def test_cli_evaluate_bad_correction_names_exit_2(tmp_path: Path) -> None:
    table = _table(tmp_path / "profiles.csv")
    for spec in ("harmony,scanorama", ","):
        r = _cdcl(
            "evaluate", "--features", str(table), "--out", str(tmp_path / "o"), "--correct", spec
        )
        assert r.returncode == 2, r.stderr
        line = r.stderr.strip()
        assert line.count("\n") == 0 and "Traceback" not in line
        assert "choose from sphering, harmony, combat" in line
    assert not (tmp_path / "o" / "results.json").exists()
