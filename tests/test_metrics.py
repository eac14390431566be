"""Tests of cdcl.metrics: known answers, references (sklearn, copairs, dense) and data."""

from __future__ import annotations

import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import chi2
from sklearn.metrics import silhouette_score

import cdcl.metrics.reproducibility as grit_mod
import cdcl.metrics.retrieval as ap_mod
from cdcl.metrics import (
    average_precision,
    batch_classifier_accuracy,
    batch_silhouette_global,
    batch_silhouette_score,
    classification_scores,
    grit,
    grit_summary,
    kbet,
    kbet_per_group,
    knn_indices,
    logistic_probe_accuracy,
    map_pvalues,
    matching,
    mean_average_precision,
    mixing,
    moa_map,
    neighbours,
    nsc_nscb,
    replicate_map,
    silhouette,
    treatment_profiles,
    weighted_knn_accuracy,
)
from cdcl.profiles.columns import standardize_per_plate

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BBBC021_WELLS = (
    SHARED_DATA / "bbbc021_metadata" / "BBBC021_well_profiles_feature_selected_mad_robustize.csv.gz"
)


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny block budget so that every blocked loop runs over many blocks."""
    for module in (neighbours, mixing, matching, grit_mod, ap_mod):
        monkeypatch.setattr(module, "BLOCK_ELEMS", 64)
    monkeypatch.setattr(ap_mod, "_MAP_BLOCK", 64)


def _gauss(n: int, d: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


# ------------------------------------------------------------------------------ kNN


def _brute_knn(x: np.ndarray, q: np.ndarray, k: int, metric: str, self_rows=None):
    if metric == "cosine":
        xn = x / np.linalg.norm(x, axis=1, keepdims=True)
        qn = q / np.linalg.norm(q, axis=1, keepdims=True)
        score = qn.astype(np.float64) @ xn.T.astype(np.float64)
    else:
        score = -np.sqrt(((q[:, None, :].astype(np.float64) - x[None]) ** 2).sum(-1))
    if self_rows is not None:
        score[np.arange(len(q)), self_rows] = -np.inf
    order = np.argsort(-score, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(score, order, axis=1)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("chunk", [7, 2048])
def test_knn_matches_brute_force(metric, chunk, small_blocks):
    x = _gauss(200, 6)
    idx, sim = knn_indices(x, 5, chunk_size=chunk, metric=metric)
    ref_idx, ref_sim = _brute_knn(x, x, 5, metric, self_rows=np.arange(200))
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(sim, ref_sim, atol=1e-5)
    assert idx.dtype == np.int64 and sim.dtype == np.float32
    # Separate queries (no self-exclusion) and a subset of rows as queries.
    q = _gauss(30, 6, seed=1)
    idx, _ = knn_indices(x, 4, query=q, chunk_size=chunk, metric=metric)
    np.testing.assert_array_equal(idx, _brute_knn(x, q, 4, metric)[0])
    rows = np.array([3, 150, 7])
    idx, _ = knn_indices(x, 4, query_indices=rows, chunk_size=chunk, metric=metric)
    np.testing.assert_array_equal(idx, _brute_knn(x, x[rows], 4, metric, self_rows=rows)[0])


def test_knn_ties_lowest_index_first(small_blocks):
    # One-hot rows: cosine similarities are exactly 1 or 0, so ties are exact.
    labels = np.array([0, 1, 0, 2, 0, 0, 1, 0, 2, 0, 0, 1])
    x = np.eye(3, dtype=np.float32)[labels]
    idx, sim = knn_indices(x, 4, chunk_size=5)
    # Row 0: the other rows of direction 0 are 2, 4, 5, 7, 9, 10 -> the 4 lowest.
    np.testing.assert_array_equal(idx[0], [2, 4, 5, 7])
    np.testing.assert_array_equal(sim[0], [1, 1, 1, 1])
    # Row 3 (direction 2) has one twin (8), then a tie at 0 among all others: 0, 1, 2.
    np.testing.assert_array_equal(idx[3], [8, 0, 1, 2])
    # Deterministic whatever the chunking.
    idx2, _ = knn_indices(x, 4, chunk_size=2048)
    np.testing.assert_array_equal(idx, idx2)


def test_knn_rejects_bad_k():
    x = _gauss(5, 3)
    with pytest.raises(ValueError):
        knn_indices(x, 5)  # only 4 other rows
    assert knn_indices(x, 5, query=x)[0].shape == (5, 5)
    with pytest.raises(ValueError):
        knn_indices(np.full((4, 2), np.nan, dtype=np.float32), 1)


# ------------------------------------------------------------------------------ accuracy


def test_weighted_knn_weights_matter():
    # Query [1, 0]; one neighbour of class A at cos 1, two of class B at cos 0.5.
    c, s = 0.5, np.sqrt(0.75)
    train = np.array([[1, 0], [c, s], [c, -s]], dtype=np.float32)
    ytr = np.array(["A", "B", "B"])
    test = np.array([[1, 0]], dtype=np.float32)
    # T = 0.1: e^10 > 2 e^5, A wins; T = 10: nearly a majority vote, B wins.
    sharp = weighted_knn_accuracy(train, ytr, test, ["A"], k=3, temperature=0.1)
    flat = weighted_knn_accuracy(train, ytr, test, ["A"], k=3, temperature=10.0)
    assert sharp["accuracy"] == 1.0 and flat["accuracy"] == 0.0


def test_weighted_knn_and_probe_on_clusters():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16)) * 5
    y = np.repeat(np.arange(4), 50)
    x = (centres[y] + rng.normal(size=(200, 16))).astype(np.float32)
    tr, te = np.arange(200) % 2 == 0, np.arange(200) % 2 == 1
    res = weighted_knn_accuracy(x[tr], y[tr], x[te], y[te])
    assert res["accuracy"] == 1.0 and res["macro_f1"] == 1.0 and res["k"] == 10
    res = logistic_probe_accuracy(x[tr], y[tr], x[te], y[te])
    assert res["accuracy"] == 1.0 and res["n_test_unseen_label"] == 0
    # A test label absent from training is an error and is counted.
    y_te = y[te].copy()
    y_te[:5] = 9
    res = logistic_probe_accuracy(x[tr], y[tr], x[te], y_te)
    assert res["n_test_unseen_label"] == 5 and res["n_unseen_classes"] == 1
    assert res["accuracy"] == pytest.approx(95 / 100)
    res = weighted_knn_accuracy(x[tr], y[tr], x[te], y_te)
    assert res["n_test_unseen_label"] == 5 and res["accuracy"] == pytest.approx(0.95)


def test_classification_scores_known():
    res = classification_scores(["a", "a", "b", "b"], ["a", "b", "b", "b"])
    assert res["accuracy"] == 0.75
    # F1(a) = 2/3, F1(b) = 0.8.
    assert res["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)


def test_batch_classifier_accuracy():
    rng = np.random.default_rng(0)
    batch = np.repeat(["p1", "p2", "p3"], [60, 60, 80])
    x = rng.normal(size=(200, 8)).astype(np.float32)
    mixed = batch_classifier_accuracy(x, batch)
    assert mixed["chance"] == pytest.approx(0.4)
    assert mixed["accuracy"] < 0.6
    shifted = x + (pd.factorize(batch)[0][:, None] * 5.0).astype(np.float32)
    sep = batch_classifier_accuracy(shifted, batch)
    assert sep["accuracy"] > 0.98 and sep["n_splits"] == 5
    assert np.isnan(batch_classifier_accuracy(x, np.zeros(200))["accuracy"])


# ------------------------------------------------------------------------------ normalisation


def test_standardize_per_plate_controls_and_fallback():
    rng = np.random.default_rng(0)
    plates = np.repeat(["P1", "P2", "P3"], 20)
    ctrl = np.tile(np.arange(20) < 8, 3)
    ctrl[40:] = False  # P3 has no controls
    x = (rng.normal(size=(60, 4)) * [1, 2, 3, 4] + np.repeat([0, 10, -5], 20)[:, None]).astype(
        np.float32
    )
    with pytest.warns(UserWarning, match="P3"):
        z = standardize_per_plate(x, plates, ctrl)
    assert z.dtype == np.float32 and z.shape == x.shape
    for p in ("P1", "P2"):
        rows = (plates == p) & ctrl
        np.testing.assert_allclose(z[rows].mean(0), 0, atol=1e-5)
        np.testing.assert_allclose(z[rows].std(0), 1, atol=1e-4)
    # P3 fell back to all of its rows.
    np.testing.assert_allclose(z[40:].mean(0), 0, atol=1e-5)
    # Plate P1's treated rows use P1's control statistics, not their own.
    c = x[:8]
    np.testing.assert_allclose(z[10], (x[10] - c.mean(0)) / (c.std(0) + 1e-6), rtol=1e-5)
    # Robust variant: pycytominer mad_robustize convention.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = standardize_per_plate(x, plates, ctrl, robust=True)
    med = np.median(c, axis=0)
    mad = np.median(np.abs(c - med), axis=0)
    np.testing.assert_allclose(r[10], (x[10] - med) / (1.4826 * mad + 1e-6), rtol=1e-5)


def test_treatment_profiles_mean_and_keep():
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    df = pd.DataFrame(
        {
            "treatment": ["b", "a", "b", "a", "c", "b"],
            "compound": ["B", "A", "B", "A", "C", "B"],
            "batch": ["p1", "p1", "p2", "p1", "p3", "p2"],
        }
    )
    prof, meta = treatment_profiles(x, df)
    assert list(meta["treatment"]) == ["a", "b", "c"]
    np.testing.assert_allclose(prof[0], x[[1, 3]].mean(0))
    np.testing.assert_allclose(prof[1], x[[0, 2, 5]].mean(0))
    assert meta.loc[0, "batch"] == "p1"
    assert meta.loc[1, "batch"] == ("p1", "p2")
    assert list(meta["n_rows"]) == [2, 3, 1]
    assert "moa" not in meta.columns


# ------------------------------------------------------------------------------ NSC / NSCB


def _nsc_case() -> tuple[np.ndarray, pd.DataFrame]:
    # Treatments (two wells each): MoA M1 near e0, M2 near e1.
    # T1 (c1, M1) and T1b (c1, M1) are twins; T1's nearest other compound is T3 (M2).
    e = np.eye(4, dtype=np.float32)
    prof = {
        "T1": e[0] + 0.9 * e[1],
        "T1b": e[0] + 0.95 * e[1],
        "T2": e[0] + 0.1 * e[2],
        "T3": e[1] + 0.5 * e[0],
        "T4": e[1] + 0.1 * e[3],
        "T5": e[0] + 0.2 * e[3],
    }
    info = {  # compound, moa, batches of its two wells
        "T1": ("c1", "M1", ("b1", "b1")),
        "T1b": ("c1", "M1", ("b2", "b2")),
        "T2": ("c2", "M1", ("b2", "b2")),
        "T3": ("c3", "M2", ("b1", "b1")),
        "T4": ("c4", "M2", ("b2", "b2")),
        "T5": ("c5", "M1", ("b1", "b2")),  # spans both batches: no NSCB candidate
    }
    rows, feats = [], []
    for t, (c, m, batches) in info.items():
        for b in batches:
            rows.append({"treatment": t, "compound": c, "moa": m, "batch": b, "is_control": False})
            feats.append(prof[t])
    for b in ("b1", "b2"):  # controls never take part
        ctrl = {"treatment": "DMSO", "compound": "DMSO", "moa": "DMSO", "is_control": True}
        rows.append({**ctrl, "batch": b})
        feats.append(e[0] + 0.9 * e[1])
    rows.append(
        {"treatment": "X", "compound": "x", "moa": None, "batch": "b1", "is_control": False}
    )
    feats.append(e[0])
    return np.array(feats, dtype=np.float32), pd.DataFrame(rows)


def test_nsc_nscb_hand_made():
    x, meta = _nsc_case()
    res = nsc_nscb(x, meta)
    assert res["n_treatments"] == 6 and res["n_moas"] == 2
    # NSC (cosines in the comments): T1 -> T3 (.93; its twin T1b is the same compound):
    # wrong. T1b -> T3 (.94): wrong. T2 -> T5 (.98): right. T3 -> T1b (.94): wrong.
    # T4 -> T3 (.89): right. T5 -> T2 (.98): right.
    assert res["n_nsc"] == 6 and res["n_skipped_nsc"] == 0
    assert res["nsc"] == pytest.approx(3 / 6)
    # NSCB queries are (treatment, batch) profiles looking only in the other batch; T5
    # spans both batches and so is a query twice (T5@b1, T5@b2), never its own candidate.
    # T1@b1 -> {T2 .74, T4, T5@b2 .73}: T2 right. T1b@b2 -> {T3 .94, T5@b1 .71}: wrong.
    # T2@b2 -> {T1, T3, T5@b1 .97}: T5 right. T3@b1 -> {T1b .94, T2, T4, T5@b2}: wrong.
    # T4@b2 -> {T1, T3 .89, T5@b1}: T3 right. T5@b1 -> {T1b, T2 .97, T4}: right.
    # T5@b2 -> {T1 .73, T3 .44}: right.
    assert res["n_skipped_nscb"] == 0 and res["n_nscb"] == 7
    assert res["nscb"] == pytest.approx(5 / 7)


def test_nscb_skips_queries_without_another_batch():
    x, meta = _nsc_case()
    one_batch = meta.assign(batch="b1")
    res = nsc_nscb(x, one_batch)
    assert res["n_nscb"] == 0 and res["n_skipped_nscb"] == 6 and np.isnan(res["nscb"])


def test_nsc_compound_defaults_to_treatment():
    x, meta = _nsc_case()
    res = nsc_nscb(x, meta.drop(columns="compound"))
    # T1 may now match its twin T1b (another "compound"): T1 and T1b become right.
    assert res["nsc"] == pytest.approx(5 / 6)


# ------------------------------------------------------------------------------ kBET


def _dense_kbet(x: np.ndarray, batch: np.ndarray, k: int, alpha: float) -> tuple[float, float]:
    d = np.sqrt(((x[:, None].astype(np.float64) - x[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    nbr = np.argsort(d, axis=1, kind="stable")[:, : k - 1]
    levels, codes = np.unique(batch, return_inverse=True)
    freq = np.bincount(codes) / len(codes)
    pvals = []
    for i in range(len(x)):
        env = np.r_[i, nbr[i]]
        obs = np.bincount(codes[env], minlength=len(levels))
        exp = k * freq
        pvals.append(chi2.sf(((obs - exp) ** 2 / exp).sum(), len(levels) - 1))
    pvals = np.array(pvals)
    return float(np.mean(pvals >= alpha)), float(pvals.mean())


def test_kbet_matches_dense_reference(small_blocks):
    rng = np.random.default_rng(3)
    batch = np.repeat(["a", "b", "c"], 20)
    x = rng.normal(size=(60, 5)).astype(np.float32)
    x[batch == "c"] += 1.2  # partly separated: acceptance strictly between 0 and 1
    for k in (8, 15):
        res = kbet(x, batch, k=k)
        acc, mean_p = _dense_kbet(x, batch, k, 0.05)
        assert res["acceptance_rate"] == pytest.approx(acc)
        assert res["mean_p_value"] == pytest.approx(mean_p, rel=1e-6)
        assert res["n_queries"] == 60 and res["k"] == k
    assert 0.0 < kbet(x, batch, k=15)["acceptance_rate"] < 1.0


def test_kbet_mixing_vs_separation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 8)).astype(np.float32)
    mixed = rng.permutation(np.repeat(["p1", "p2", "p3"], 200))
    res = kbet(x, mixed)
    assert res["acceptance_rate"] > 0.85  # ~ 1 - alpha under perfect mixing
    assert res["k"] == 50  # a quarter of the mean batch size (200)
    sep_batch = np.repeat(["p1", "p2", "p3"], 200)
    shifted = x + np.repeat(np.arange(3) * 20.0, 200)[:, None].astype(np.float32)
    assert kbet(shifted, sep_batch)["acceptance_rate"] == 0.0
    assert kbet(shifted, sep_batch, metric="cosine", n_queries=100)["acceptance_rate"] < 0.1
    single = kbet(x, np.zeros(600))
    assert single["acceptance_rate"] == 1.0 and "note" in single


def test_kbet_per_group_skips_single_batch_groups():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(90, 4)).astype(np.float32)
    groups = np.repeat(["t1", "t2", "t3"], 30)
    batch = np.where(np.arange(90) % 2 == 0, "p1", "p2")
    batch[60:] = "p1"  # t3 lives in one batch only
    x[30:60][batch[30:60] == "p2"] += 10.0  # t2 is batch-separated
    res = kbet_per_group(x, batch, groups)
    assert res["n_groups"] == 2 and res["n_skipped"] == 1
    assert res["per_group"]["t1"] > 0.8 and res["per_group"]["t2"] == 0.0
    assert res["mean_acceptance"] == pytest.approx(np.mean(list(res["per_group"].values())))


# ------------------------------------------------------------------------------ silhouette


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_silhouette_matches_sklearn(metric, small_blocks):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(150, 6)).astype(np.float32)
    x[:50] += 1.0
    label_sets = [
        np.repeat([0, 1, 2], 50),
        rng.integers(0, 2, 150),
        rng.integers(0, 12, 150),
        np.array([f"l{i % 7}" for i in range(150)]),
        np.r_[np.zeros(148, int), 1, 2],  # two singletons: s = 0 for them
    ]
    for labels in label_sets:
        ours = silhouette(x, labels, metric=metric, chunk_size=16)
        ref = silhouette_score(x.astype(np.float64), labels, metric=metric)
        assert ours == pytest.approx(ref, abs=1e-5)


def test_silhouette_separation_mixing_and_errors():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 5)).astype(np.float32)
    lab = np.repeat([0, 1, 2], 100)
    far = x * 0.01 + np.eye(5, dtype=np.float32)[lab] * 10
    assert silhouette(far, lab) > 0.95
    assert abs(silhouette(x, rng.permutation(lab))) < 0.05
    res = batch_silhouette_global(far, lab)
    assert res["score"] == pytest.approx(1 - abs(res["silhouette"])) and res["score"] < 0.05
    assert batch_silhouette_global(x, rng.permutation(lab))["score"] > 0.95
    assert np.isnan(batch_silhouette_global(x, np.zeros(300))["score"])
    # scib's rule averages 1 - |s_i| per row: separated batches score ~0, mixed ones high.
    assert batch_silhouette_score(far, lab)["score"] < 0.05
    assert batch_silhouette_score(x, rng.permutation(lab))["score"] > 0.85
    assert np.isnan(batch_silhouette_score(x, np.zeros(300))["score"])
    with pytest.raises(ValueError):
        silhouette(x, np.zeros(300))
    # Sampled queries against all points: close to the full value.
    full = silhouette(x, lab)
    assert silhouette(x, lab, sample_size=200, seed=1) == pytest.approx(full, abs=0.02)


# ------------------------------------------------------------------------------ GRIT


def _dense_grit(x, meta):
    corr = np.corrcoef(x.astype(np.float64))
    ctrl = meta["is_control"].to_numpy()
    out = {}
    for t, g in meta[~ctrl].groupby("treatment"):
        rows = g.index.to_numpy()
        zs = []
        for r in rows:
            others = rows[rows != r]
            if others.size == 0:
                continue
            c = corr[r, ctrl]
            zs.append((corr[r, others].mean() - c.mean()) / c.std())
        out[t] = np.mean(zs) if zs else np.nan
    return out


def test_grit_matches_dense_and_singletons(small_blocks):
    rng = np.random.default_rng(0)
    treatments = ["DMSO"] * 10 + ["a"] * 3 + ["b"] * 4 + ["solo"]
    meta = pd.DataFrame({"treatment": treatments})
    meta["is_control"] = meta["treatment"] == "DMSO"
    base = {"DMSO": 0.0, "a": 2.0, "b": -1.0, "solo": 1.0}
    sig = rng.normal(size=(4, 20))
    x = np.stack(
        [rng.normal(size=20) + base[t] * sig[list(base).index(t)] for t in treatments]
    ).astype(np.float32)
    table = grit(x, meta)
    assert list(table["treatment"]) == ["a", "b", "solo"]  # controls not scored
    ref = _dense_grit(x, meta)
    for _, row in table.iterrows():
        if row["treatment"] == "solo":
            assert np.isnan(row["grit"]) and row["n_scored"] == 0
        else:
            assert row["grit"] == pytest.approx(ref[row["treatment"]], rel=1e-6)
    assert table.set_index("treatment").loc["a", "grit"] > 2  # strong replicate signal
    summ = grit_summary(table)
    assert summ["n_perturbations"] == 3 and summ["n_scored"] == 2
    assert summ["mean_grit"] == pytest.approx(np.mean([ref["a"], ref["b"]]))


def test_grit_group_col_uses_other_perturbations_of_the_group():
    rng = np.random.default_rng(1)
    meta = pd.DataFrame(
        {
            "treatment": ["DMSO"] * 6 + ["g1a", "g1a", "g1b", "g1b", "g2a", "g2a"],
            "gene": [None] * 6 + ["G1"] * 4 + ["G2"] * 2,
        }
    )
    meta["is_control"] = meta["treatment"] == "DMSO"
    x = rng.normal(size=(12, 10)).astype(np.float32)
    table = grit(x, meta, group_col="gene")
    corr = np.corrcoef(x.astype(np.float64))
    c = corr[6][:6]
    expect = (corr[6, [8, 9]].mean() - c.mean()) / c.std()
    z7 = (corr[7, [8, 9]].mean() - corr[7][:6].mean()) / corr[7][:6].std()
    row = table.set_index("treatment").loc["g1a"]
    assert row["gene"] == "G1" and row["grit"] == pytest.approx((expect + z7) / 2)
    assert np.isnan(table.set_index("treatment").loc["g2a", "grit"])  # only guide of G2


# ------------------------------------------------------------------------------ mAP


def test_average_precision_hand_made():
    # Query 0 ranks: 1 (pos, cos .99), 3 (neg, .9), 2 (pos, .5), 4 (neg, -.5).
    angles = np.array([0.0, np.arccos(0.99), np.arccos(0.5), np.arccos(0.9), np.arccos(-0.5)])
    x = np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32)
    meta = pd.DataFrame({"t": ["A", "A", "A", "B", "C"]})
    ap = average_precision(x, meta, pos_sameby=["t"], neg_diffby=["t"])
    assert ap.loc[0, "average_precision"] == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert ap.loc[0, "n_pos_pairs"] == 2 and ap.loc[0, "n_total_pairs"] == 4
    assert np.isnan(ap.loc[3, "average_precision"])  # singleton: no positive


def test_bh_matches_statsmodels():
    multipletests = pytest.importorskip("statsmodels.stats.multitest").multipletests
    p = np.random.default_rng(0).uniform(size=50) ** 2
    np.testing.assert_allclose(ap_mod._bh_correct(p), multipletests(p, method="fdr_bh")[1])


def _map_case(seed: int = 0):
    rng = np.random.default_rng(seed)
    n = 90
    meta = pd.DataFrame(
        {
            "treatment": rng.integers(0, 12, n).astype(str),
            "batch": rng.integers(0, 3, n).astype(str),
        }
    )
    meta["is_control"] = meta["treatment"].isin(["0", "1"])
    meta.loc[meta["is_control"], "treatment"] = "DMSO"
    meta["moa"] = "m" + (meta["treatment"].str.len() + meta["treatment"].map(hash) % 3).astype(str)
    meta.loc[meta["is_control"], "moa"] = "DMSO"
    meta["compound"] = meta["treatment"]
    lonely = {"treatment": "lonely", "batch": "0", "is_control": False, "moa": "m9"}
    meta.loc[len(meta)] = {**lonely, "compound": "lonely"}  # a treatment with one replicate
    x = rng.normal(size=(len(meta), 12)).astype(np.float32)
    codes = pd.factorize(meta["treatment"])[0]
    x += 0.8 * rng.normal(size=(codes.max() + 1, 12)).astype(np.float32)[codes]
    return x, meta


@pytest.mark.parametrize("batch_aware", [False, True])
def test_map_matches_copairs(batch_aware, tmp_path, small_blocks):
    cmap = pytest.importorskip("copairs.map")
    from copairs.matching import assign_reference_index

    x, meta = _map_case()
    # Replicate retrieval against controls, copairs' recipe verbatim.
    ref_meta = assign_reference_index(meta, "is_control", reference_col="ref", default_value=-1)
    rules = {
        "pos_sameby": ["treatment", "ref"],
        "pos_diffby": ["batch"] if batch_aware else [],
        "neg_sameby": [],
        "neg_diffby": ["treatment", "ref"],
    }
    ref_ap = cmap.average_precision(ref_meta, x, progress_bar=False, **rules)
    ours_ap = average_precision(x, ref_meta, **rules)
    a, b = ref_ap["average_precision"].to_numpy(), ours_ap["average_precision"].to_numpy()
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    np.testing.assert_allclose(a[~np.isnan(a)], b[~np.isnan(b)], atol=1e-6)
    np.testing.assert_array_equal(ref_ap["n_pos_pairs"], ours_ap["n_pos_pairs"])
    np.testing.assert_array_equal(ref_ap["n_total_pairs"], ours_ap["n_total_pairs"])

    ref_map = cmap.mean_average_precision(
        ref_ap,
        ["treatment"],
        null_size=2000,
        threshold=0.05,
        seed=7,
        progress_bar=False,
        cache_dir=tmp_path,
    )
    summary, table = replicate_map(x, meta, batch_aware=batch_aware, null_size=2000, seed=7)
    assert list(table["treatment"]) == list(ref_map["treatment"])
    assert "lonely" not in set(table["treatment"])  # singleton: no positive, no group
    np.testing.assert_allclose(
        table["mean_average_precision"], ref_map["mean_average_precision"], atol=1e-6
    )
    # Same null construction and seeds as copairs: p-values agree (up to float rounding).
    np.testing.assert_allclose(table["p_value"], ref_map["p_value"], atol=1e-6)
    np.testing.assert_allclose(table["corrected_p_value"], ref_map["corrected_p_value"], atol=0.01)
    assert summary["map"] == pytest.approx(ref_map["mean_average_precision"].mean())
    assert summary["fraction_significant"] == pytest.approx(ref_map["below_corrected_p"].mean())
    assert summary["n_groups"] == len(ref_map)

    # MoA retrieval: same MoA, different compound; negatives: other MoAs (controls dropped).
    keep = ~meta["is_control"]
    moa_rules = {
        "pos_sameby": ["moa"],
        "pos_diffby": ["compound"] + (["batch"] if batch_aware else []),
        "neg_sameby": [],
        "neg_diffby": ["moa"],
    }
    sub = meta[keep].reset_index(drop=True)
    ref_ap = cmap.average_precision(sub, x[keep.to_numpy()], progress_bar=False, **moa_rules)
    ref_map = cmap.mean_average_precision(
        ref_ap,
        ["moa"],
        null_size=2000,
        threshold=0.05,
        seed=1,
        progress_bar=False,
        cache_dir=tmp_path / "moa",
    )
    summary, table = moa_map(x, meta, batch_aware=batch_aware, null_size=2000, seed=1)
    np.testing.assert_allclose(
        table["mean_average_precision"], ref_map["mean_average_precision"], atol=1e-6
    )
    np.testing.assert_allclose(table["p_value"], ref_map["p_value"], atol=1e-6)


def test_ap_ties_count_as_chance():
    rng = np.random.default_rng(4)
    # Rows copied from 4 prototypes: exact similarity ties between positives and negatives.
    x = rng.normal(size=(4, 5)).astype(np.float32)[rng.integers(0, 4, 60)]
    meta = pd.DataFrame({"t": rng.integers(0, 6, 60).astype(str)})
    rules = {"pos_sameby": ["t"], "pos_diffby": [], "neg_sameby": [], "neg_diffby": ["t"]}
    ours = average_precision(x, meta, **rules)["average_precision"].to_numpy()
    # Expected AP over random orders of the tied items, by simulation (2,000 orders).
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = np.round(unit @ unit.T, 5)
    t = meta["t"].to_numpy()
    for q in (0, 7, 31):
        others = np.flatnonzero(np.arange(60) != q)
        rel = (t[others] == t[q]).astype(float)
        aps = []
        for _ in range(2000):
            order = np.lexsort((rng.random(others.size), -sims[q, others]))
            r = rel[order]
            aps.append(np.mean((np.cumsum(r) / np.arange(1, r.size + 1))[r == 1]))
        assert ours[q] == pytest.approx(np.mean(aps), abs=0.01)
    # A positive tied with a negative: 1/2 chance of rank 1, else rank 2 -> AP 0.75.
    meta2 = pd.DataFrame({"t": ["a", "a", "b"]})
    same = np.ones((3, 2), dtype=np.float32)
    assert average_precision(same, meta2, **rules).loc[0, "average_precision"] == 0.75


def test_map_significance_separates_signal_from_noise():
    x, meta = _map_case(seed=2)
    strong = x.copy()
    codes = pd.factorize(meta["treatment"])[0]
    strong += (
        5 * np.random.default_rng(0).normal(size=(codes.max() + 1, 12)).astype(np.float32)[codes]
    )
    s_strong, _ = replicate_map(strong, meta, null_size=1000)
    noise = np.random.default_rng(5).normal(size=x.shape).astype(np.float32)
    s_noise, _ = replicate_map(noise, meta, null_size=1000)
    assert s_strong["map"] > 0.9 and s_strong["fraction_significant"] > 0.8
    assert s_noise["fraction_significant"] < 0.3


def test_map_pvalues_single_query_group_exact():
    # One query with 1 positive among 2: AP is 1 or 1/2 with probability 1/2 each.
    ap = pd.DataFrame(
        {"g": ["x"], "average_precision": [0.5], "n_pos_pairs": [1], "n_total_pairs": [2]}
    )
    table = map_pvalues(ap, ["g"], null_size=4000)
    # P(null > 0.5) = 1/2.
    assert table.loc[0, "p_value"] == pytest.approx(0.5, abs=0.03)
    summary, _ = mean_average_precision(
        _gauss(6, 3),
        pd.DataFrame({"t": list("aabbcc")}),
        pos_sameby=["t"],
        neg_diffby=["t"],
        null_size=100,
    )
    assert summary["n_groups"] == 3


# ------------------------------------------------------------------------------ real data


@pytest.mark.skipif(not BBBC021_WELLS.exists(), reason=f"real data not found at {BBBC021_WELLS}")
def test_bbbc021_nsc_nscb_real_profiles():
    df = pd.read_csv(BBBC021_WELLS)
    meta_cols = [c for c in df.columns if c.startswith("Metadata_")]
    x = df.drop(columns=meta_cols).to_numpy(dtype=np.float32)
    meta = pd.DataFrame(
        {
            "treatment": df["Metadata_Compound"] + "@" + df["Metadata_Concentration"].astype(str),
            "compound": df["Metadata_Compound"],
            "moa": df["Metadata_moa"],
            # Batch = plate (Ljosa et al. used the experimental batch; the plate is the unit
            # these profiles were normalised on). The week is printed for comparison.
            "batch": df["Metadata_Plate"],
            "week": df["Metadata_Plate"].str.split("_").str[0],
            "is_control": df["Metadata_Compound"] == "DMSO",
        }
    )
    assert x.shape == (632, 189)
    res = nsc_nscb(x, meta)
    res_week = nsc_nscb(x, meta, batch_col="week")
    rep, _ = replicate_map(x, meta, null_size=2000)
    moa, _ = moa_map(x, meta, null_size=2000)
    g = grit_summary(grit(x, meta))
    print(
        f"\nBBBC021 (632 wells, {res['n_treatments']} treatments, {res['n_moas']} MoAs): "
        f"NSC={res['nsc']:.3f} NSCB(plate)={res['nscb']:.3f} "
        f"NSCB(week)={res_week['nscb']:.3f} skipped(plate)={res['n_skipped_nscb']} "
        f"replicate mAP={rep['map']:.3f} ({rep['fraction_significant']:.2f} significant) "
        f"MoA mAP={moa['map']:.3f} GRIT={g['mean_grit']:.2f}"
    )
    chance = 1 / 12
    assert res["n_treatments"] == 103 and res["n_moas"] == 12
    assert res["n_nsc"] == 103
    assert res["nsc"] >= res["nscb"] >= res_week["nscb"]
    assert res["nsc"] > 0.7 and res["nscb"] > 0.5 and res_week["nscb"] > 4 * chance


# ------------------------------------------------------------------------------ memory


def test_memory_bounded_on_50k_profiles():
    n, d = 50_000, 384
    x = np.random.default_rng(0).normal(size=(n, d)).astype(np.float32)
    batch = np.repeat(np.arange(10), n // 10)
    queries = np.arange(0, n, 20)  # 2,500 queries against all 50,000 points
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        idx, sim = knn_indices(x, 10, query_indices=queries)
        res = kbet(x, batch, n_queries=1000)
        s = silhouette(x, batch, sample_size=1000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert idx.shape == (2500, 10) and (idx != queries[:, None]).all()
    assert 0.0 <= res["acceptance_rate"] <= 1.0 and res["k"] == 100
    assert abs(s) < 0.05  # random labels on noise
    # A dense 50k x 50k float32 matrix alone would be 9.3 GiB.
    assert peak < 512 * 2**20, f"peak traced memory {peak / 2**20:.0f} MiB"


def test_label_isin_matches_numpy_on_labels() -> None:
    """The hashed membership test gives np.isin's answer on string, object and integer labels."""
    from cdcl.profiles.arrays import label_isin

    rng = np.random.default_rng(0)
    words = np.array([f"cmpd_{i:03d}" for i in rng.integers(0, 40, 500)])
    allowed = words[rng.random(500) < 0.3]
    for values, ref in (
        (words, allowed),
        (words.astype(object), allowed.astype(object)),
        (rng.integers(0, 40, 300), np.arange(0, 40, 3)),
    ):
        assert np.array_equal(label_isin(values, ref), np.isin(values, ref))
    assert not label_isin(np.array(["a"]), np.array([], dtype=object)).any()


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_silhouette_of_a_row_subset_equals_the_copied_subset(metric):
    # `rows=` scores a subset in place (no copy of a large table): same figure as the copy.
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    labels = rng.integers(0, 4, 300)
    rows = np.flatnonzero(rng.random(300) < 0.6)
    for size in (None, 50):
        copied = silhouette(x[rows], labels[rows], metric=metric, sample_size=size, seed=1)
        in_place = silhouette(x, labels[rows], metric=metric, sample_size=size, seed=1, rows=rows)
        assert in_place == copied
    # and the subset is really a subset: the full table scores differently
    assert silhouette(x, labels, metric=metric) != silhouette(x[rows], labels[rows], metric=metric)


def test_map_null_cache_returns_the_same_read_only_draws():
    from cdcl.metrics.retrieval import _null_ap

    _null_ap.cache_clear()
    first = _null_ap(5, 40, 300, 7)
    again = _null_ap(5, 40, 300, 7)
    assert again is first and not first.flags.writeable
    _null_ap.cache_clear()
    assert np.array_equal(_null_ap(5, 40, 300, 7), first)  # redrawn: the same seeded draws
    assert not np.array_equal(_null_ap(5, 40, 300, 8), first)


def test_probe_and_knn_on_row_indices_equal_the_copied_rows():
    # train_rows/test_rows score parts of one table in place: same figures as the copies.
    rng = np.random.default_rng(5)
    x = rng.normal(size=(400, 6)).astype(np.float32)
    y = rng.integers(0, 5, 400).astype(str)
    x[:, 0] += y.astype(float)  # some signal, so that accuracy is not trivial
    tr, te = np.flatnonzero(np.arange(400) % 3 != 0), np.flatnonzero(np.arange(400) % 3 == 0)
    for kw in ({}, {"max_train": 100}):
        copied = logistic_probe_accuracy(x[tr], y[tr], x[te], y[te], seed=2, **kw)
        in_place = logistic_probe_accuracy(
            x, y[tr], x, y[te], seed=2, train_rows=tr, test_rows=te, **kw
        )
        assert in_place == copied
    for nq in (None, 40):
        copied = weighted_knn_accuracy(x[tr], y[tr], x[te], y[te], k=7, max_queries=nq, seed=1)
        in_place = weighted_knn_accuracy(
            x, y[tr], x, y[te], k=7, max_queries=nq, seed=1, train_rows=tr, test_rows=te
        )
        assert in_place == copied and copied["accuracy"] > 0.3
