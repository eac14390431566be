"""Every metric and correction against the library that defines it, on real profiles.

The table: BBBC021's CellProfiler well profiles (632 wells x 189 features, MAD-robustised and
feature-selected by the Broad's Morpheus exercise; batch = imaging week). Libraries that run
here are called directly (copairs, pycytominer, scanpy, harmonypy, scikit-learn);
scib-metrics needs Python >= 3.12, so its rules are pinned with small hand-checked cases,
each citing the file of YosefLab/scib-metrics that defines it.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from conftest import SHARED_DATA

from cdcl.metrics import (
    average_precision,
    batch_silhouette_global,
    batch_silhouette_score,
    graph_connectivity,
    ilisi,
    kbet_per_group,
    lisi_values,
    mixing_per_treatment,
    moa_map,
    replicate_map,
    silhouette,
)
from cdcl.metrics.mixing import _scib_kbet_k0, silhouette_values
from cdcl.metrics.neighbours import NeighborGraph
from cdcl.profiles.columns import ColumnSpec, standardize_per_plate
from cdcl.profiles.correction import combat, harmony, sphering
from cdcl.profiles.table import read_profile_table, split_table

BBBC021 = (
    SHARED_DATA / "bbbc021_metadata" / "BBBC021_well_profiles_feature_selected_mad_robustize.csv.gz"
)


@pytest.fixture(scope="module")
def bbbc021() -> tuple[np.ndarray, pd.DataFrame, pd.DataFrame]:
    """Profiles (float64), canonical metadata and the raw table (Metadata_* + features)."""
    if not BBBC021.exists():
        pytest.skip(f"{BBBC021} not found")
    table = read_profile_table(BBBC021)
    x, meta_table, _ = split_table(table)
    meta = ColumnSpec(
        batch_col="Metadata_Plate",
        batch_pattern=r"^(Week\d+)",
        treatment_col="Metadata_Compound,Metadata_Concentration",
    ).resolve(meta_table)
    return np.asarray(x, dtype=np.float64), meta, table


# ------------------------------------------------------------------- copairs: every mAP variant


def _copairs_frame(meta: pd.DataFrame) -> pd.DataFrame:
    from copairs.matching import assign_reference_index

    frame = meta[["treatment", "compound", "moa", "batch", "is_control"]].copy()
    return assign_reference_index(frame, "is_control", reference_col="ref", default_value=-1)


@pytest.mark.parametrize("batch_aware", [False, True])
def test_replicate_and_moa_map_equal_copairs_on_bbbc021(bbbc021, batch_aware, tmp_path) -> None:
    cmap = pytest.importorskip("copairs.map")
    x, meta, _ = bbbc021
    x32 = x.astype(np.float32)
    frame = _copairs_frame(meta)
    rules = {
        "pos_sameby": ["treatment", "ref"],
        "pos_diffby": ["batch"] if batch_aware else [],
        "neg_sameby": [],
        "neg_diffby": ["treatment", "ref"],
    }
    ours = average_precision(x32, frame, **rules)
    if batch_aware:
        # No BBBC021 treatment spans two weeks: copairs finds no positive pair and raises;
        # ours gives every query NaN (no positive), which the summaries then skip.
        from copairs.matching import UnpairedException

        with pytest.raises(UnpairedException):
            cmap.average_precision(frame, x32, progress_bar=False, **rules)
        assert ours["average_precision"].isna().all()
    else:
        ref = cmap.average_precision(frame, x32, progress_bar=False, **rules)
        a, b = ref["average_precision"].to_numpy(), ours["average_precision"].to_numpy()
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
        np.testing.assert_allclose(b[~np.isnan(b)], a[~np.isnan(a)], atol=1e-6)
        ref_map = cmap.mean_average_precision(
            ref, ["treatment"], null_size=2000, threshold=0.05, seed=3, progress_bar=False,
            cache_dir=tmp_path,
        )  # fmt: skip
        summary, table = replicate_map(x32, meta, null_size=2000, seed=3)
        np.testing.assert_allclose(
            table["mean_average_precision"], ref_map["mean_average_precision"], atol=1e-6
        )
        np.testing.assert_allclose(table["p_value"], ref_map["p_value"], atol=1e-6)
        assert summary["map"] == pytest.approx(ref_map["mean_average_precision"].mean(), abs=1e-6)

    keep = (~meta["is_control"]).to_numpy()
    sub = frame[keep].reset_index(drop=True)
    moa_rules = {
        "pos_sameby": ["moa"],
        "pos_diffby": ["compound"] + (["batch"] if batch_aware else []),
        "neg_sameby": [],
        "neg_diffby": ["moa"],
    }
    ref = cmap.average_precision(sub, x32[keep], progress_bar=False, **moa_rules)
    ref_map = cmap.mean_average_precision(
        ref, ["moa"], null_size=2000, threshold=0.05, seed=5, progress_bar=False,
        cache_dir=tmp_path / "moa",
    )  # fmt: skip
    summary, table = moa_map(x32, meta, batch_aware=batch_aware, null_size=2000, seed=5)
    assert list(table["moa"]) == list(ref_map["moa"])
    np.testing.assert_allclose(
        table["mean_average_precision"], ref_map["mean_average_precision"], atol=1e-6
    )
    np.testing.assert_allclose(table["p_value"], ref_map["p_value"], atol=1e-6)


def test_constant_table_scores_chance_map_not_one(bbbc021) -> None:
    # copairs ranks a positive tied with a negative first (AP 1 on a table without variance);
    # here ties count as chance: every similarity ties, so AP = its expectation under a random
    # order, which copairs' own null (random rankings) centres on.
    _, meta, _ = bbbc021
    flat = np.ones((len(meta), 5), dtype=np.float32)
    rep, _ = replicate_map(flat, meta, null_size=500)
    moa, _ = moa_map(flat, meta, null_size=500)
    assert rep["map"] < 0.2 and moa["map"] < 0.3
    assert rep["fraction_significant"] == 0.0 and moa["fraction_significant"] == 0.0
    # Exactly the expected AP of a random ranking: p positives among N items.
    meta3 = pd.DataFrame({"t": ["a"] * 3 + ["b"] * 5})
    ap = average_precision(
        np.ones((8, 2), np.float32), meta3, pos_sameby=["t"], neg_diffby=["t"]
    ).loc[0, "average_precision"]
    rng = np.random.default_rng(0)
    sims = [
        np.mean((np.cumsum(r) / np.arange(1, 8))[r == 1])
        for r in (rng.permutation([1, 1, 0, 0, 0, 0, 0]) for _ in range(20000))
    ]
    assert ap == pytest.approx(np.mean(sims), abs=0.005)


# ------------------------------------------------------------------ pycytominer normalisation


def _pycytominer_per_plate(table: pd.DataFrame, method: str, **kw) -> np.ndarray:
    from pycytominer import normalize

    feats = [c for c in table.columns if not c.startswith("Metadata_")]
    meta_cols = [c for c in table.columns if c.startswith("Metadata_")]
    out = np.empty((len(table), len(feats)))
    for _, rows in table.groupby("Metadata_Plate").groups.items():
        part = table.loc[rows]
        z = normalize(
            part, features=feats, meta_features=meta_cols, method=method,
            samples="Metadata_Compound == 'DMSO'", **kw,
        )  # fmt: skip
        out[table.index.get_indexer(rows)] = z[feats].to_numpy()
    return out


def test_plate_standardisation_equals_pycytominer_standardize(bbbc021) -> None:
    pytest.importorskip("pycytominer")
    x, meta, table = bbbc021
    table = table.copy()
    feats = [c for c in table.columns if not c.startswith("Metadata_")]
    # A feature whose DMSO wells do not vary on one plate (a saturated channel, say): the old
    # code divided by std + 1e-6 and sent it to ~1e6; pycytominer (scikit-learn) uses scale 1.
    plate0 = table["Metadata_Plate"].iloc[0]
    dmso0 = (
        (table["Metadata_Plate"] == plate0) & (table["Metadata_Compound"] == "DMSO")
    ).to_numpy()
    table.loc[dmso0, feats[0]] = 0.25
    xs = table[feats].to_numpy(dtype=np.float64)
    info: dict = {}
    ours = standardize_per_plate(
        xs, table["Metadata_Plate"].to_numpy(), meta["is_control"].to_numpy(), info=info
    )
    ref = _pycytominer_per_plate(table, "standardize")
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)  # float32 output
    assert info["zero_scale_pairs"] == 1 and info["zero_scale_plates"] == 1
    assert np.abs(ours).max() < 1e3


def test_plate_mad_robustize_equals_pycytominer(bbbc021) -> None:
    pytest.importorskip("pycytominer")
    x, meta, table = bbbc021
    ours = standardize_per_plate(
        x, table["Metadata_Plate"].to_numpy(), meta["is_control"].to_numpy(), robust=True
    )
    ref = _pycytominer_per_plate(table, "mad_robustize")
    # No control MAD is 0 on this table: pycytominer's 1e-18 epsilon and our scale-1 rule
    # for MAD = 0 do not differ here.
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------- sphering


def test_sphering_pycytominer_convention_equals_spherize_zca(bbbc021) -> None:
    pytest.importorskip("pycytominer")
    from pycytominer.operations import Spherize

    x, meta, _ = bbbc021
    ctrl = meta["is_control"].to_numpy()
    ref = Spherize(method="ZCA", epsilon=1e-6, return_numpy=True).fit(pd.DataFrame(x[ctrl]))
    want = ref.transform(pd.DataFrame(x))
    got = sphering(x, ctrl, epsilon=1e-6, convention="pycytominer")
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # Fewer controls than features (one plate's DMSO wells): pycytominer fills the directions
    # the controls do not span with the smallest spanned singular value; so does ours.
    plate = meta["plate"].to_numpy()
    one = ctrl & (plate == plate[ctrl][0])
    assert one.sum() < x.shape[1]
    ref = Spherize(method="ZCA", epsilon=1e-6, return_numpy=True).fit(pd.DataFrame(x[one]))
    want = ref.transform(pd.DataFrame(x))
    got = sphering(x, one, epsilon=1e-6, convention="pycytominer")
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())


def test_sphered_controls_have_unit_variance(bbbc021) -> None:
    # The old regulariser (1e-2 x the mean eigenvalue) exceeded most control eigenvalues:
    # sphered controls had variance ~0.48 on average. The rule relative to the smallest
    # spanned eigenvalue (x 1e-3) leaves them at >= 0.999 in every direction they span.
    x, meta, _ = bbbc021
    ctrl = meta["is_control"].to_numpy()
    y = sphering(x, ctrl).astype(np.float64)
    var = np.linalg.eigvalsh(np.cov(y[ctrl], rowvar=False))
    rank = np.linalg.matrix_rank(x[ctrl] - x[ctrl].mean(0))
    spanned = np.sort(var)[::-1][:rank]
    assert spanned.mean() > 0.999 and spanned.min() > 0.99


# ------------------------------------------------------------------------- scanpy, harmonypy


def test_combat_equals_scanpy(bbbc021) -> None:
    import anndata
    import scanpy

    x, meta, _ = bbbc021
    batch = meta["batch"].to_numpy()
    adata = anndata.AnnData(x.copy())
    adata.obs["batch"] = pd.Categorical(batch)
    with np.errstate(divide="ignore", invalid="ignore"):
        ref = scanpy.pp.combat(adata, key="batch", inplace=False)
    np.testing.assert_allclose(combat(x, batch), ref, rtol=1e-5, atol=1e-5)


def test_harmony_equals_harmonypy_on_the_same_pcs(bbbc021) -> None:
    import harmonypy

    x, meta, _ = bbbc021
    batch = meta["batch"].to_numpy()
    ours = harmony(x, batch, n_components=20, seed=0, ncores=1)
    # The same standardisation and PCA, then harmonypy with its defaults.
    z = (x - x.mean(0)) / x.std(0)
    vals, vecs = np.linalg.eigh(np.cov(z, rowvar=False))
    vecs = vecs[:, np.argsort(vals)[::-1][:20]]
    pivot = vecs[np.abs(vecs).argmax(axis=0), np.arange(20)]
    pcs = (z - z.mean(0)) @ (vecs * np.sign(pivot))
    ho = harmonypy.run_harmony(
        np.ascontiguousarray(pcs.T), pd.DataFrame({"batch": batch}), "batch",
        nclust=21, random_state=0, verbose=False, ncores=1,
    )  # fmt: skip
    np.testing.assert_allclose(ours, np.asarray(ho.Z_corr), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ scikit-learn


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_silhouette_equals_sklearn_on_bbbc021(bbbc021, metric) -> None:
    from sklearn.metrics import silhouette_samples, silhouette_score

    x, meta, _ = bbbc021
    labels = meta["moa"].astype(str).to_numpy()
    assert silhouette(x, labels, metric=metric) == pytest.approx(
        silhouette_score(x, labels, metric=metric), abs=1e-6
    )
    codes = pd.factorize(labels)[0]
    np.testing.assert_allclose(
        silhouette_values(x, codes, np.arange(len(x)), metric=metric),
        silhouette_samples(x, labels, metric=metric),
        atol=1e-6,
    )


# ------------------------------------------------------------------- scib-metrics, pinned rules


def test_silhouette_batch_is_scib_per_label_mean_of_one_minus_abs(bbbc021) -> None:
    # scib-metrics src/scib_metrics/metrics/_silhouette.py, silhouette_batch: per label,
    # silhouette of the batch labels among that label's rows, 1 - |s_i|, mean per label, mean
    # over labels; labels with one batch (or as many batches as rows) are skipped.
    from sklearn.metrics import silhouette_samples

    x = np.array([[0.0], [1.0], [10.0], [11.0], [0.0], [0.2], [5.0], [5.0], [6.0]])
    batch = np.array(["A", "B", "A", "B", "A", "B", "A", "A", "A"])
    label = np.array(["p", "p", "p", "p", "q", "q", "r", "r", "r"])
    # p: s_i of batch labels among p's rows; q: two rows, two batches -> skipped; r: one batch.
    s_p = silhouette_samples(x[:4], batch[:4])
    res = batch_silhouette_score(x, batch, label)
    assert res["n_labels"] == 1 and res["score"] == pytest.approx(np.mean(1 - np.abs(s_p)))
    # Hand check of p: each row's own batch is 10 away (a = 10); the other batch is 1 and 11
    # (rows 0 and 3: b = 6, s = -0.4) or 1 and 9 away (rows 1 and 2: b = 5, s = -0.5):
    # mean of 1 - |s| = (0.6 + 0.5 + 0.5 + 0.6) / 4 = 0.55.
    assert res["score"] == pytest.approx(0.55)
    # The old figure, 1 - |mean s| over all rows, lets positive and negative s_i cancel.
    xb, meta, _ = bbbc021
    scib = batch_silhouette_score(xb, meta["batch"].to_numpy())["score"]
    s_all = silhouette_samples(xb, meta["batch"].to_numpy())
    assert scib == pytest.approx(np.mean(1 - np.abs(s_all)), abs=1e-6)
    old = batch_silhouette_global(xb, meta["batch"].to_numpy(), metric="euclidean")["score"]
    assert old - scib > 0.05


def test_graph_connectivity_is_scib_subgraph_of_one_global_graph(bbbc021) -> None:
    # scib-metrics src/scib_metrics/metrics/_graph_connectivity.py: ONE kNN graph over all
    # rows (15 neighbours counting the row itself); per label the subgraph on its rows. Label
    # "a" has one row in each of two far clusters of "b" rows: its two rows are no one's
    # neighbours of each other, so it is in 2 pieces (0.5). A graph built among a label's own
    # rows (the old definition) links them and scores 1.
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(30, 2)), rng.normal(size=(30, 2)) + 100.0])
    labels = np.array(["a"] + ["b"] * 29 + ["a"] + ["b"] * 29)
    r = graph_connectivity(x, labels)
    assert r["per_label"]["a"] == 0.5
    # The real figure: DMSO wells of BBBC021 (the only treatment in > 1 week), raw profiles;
    # 0.830 is also what scib-metrics' function gives on the same 15-neighbour graph.
    xb, meta, _ = bbbc021
    mix = mixing_per_treatment(xb, meta["batch"].to_numpy(), meta["treatment"].to_numpy())
    assert mix["graph_connectivity"] == pytest.approx(0.830, abs=0.001)


def test_graph_connectivity_strong_components_hand_checked() -> None:
    # scib-metrics passes the directed kNN graph to connected_components with
    # connection="strong". a0, a1 sit at the right edge of a dense cluster of 20 "b" rows;
    # a2 lies 2.7 to the right: its nearest rows are a0 and a1, but theirs are a1/a0 and the
    # cluster, never a2. Weakly, "a" is one piece; strongly, {a0, a1} and {a2}: 2/3.
    rng = np.random.default_rng(0)
    dense = np.column_stack([rng.uniform(9.7, 10.2, 20), rng.uniform(-0.05, 0.05, 20)])
    a = np.array([[10.3, 0.0], [10.3, 0.01], [13.0, 0.0]])
    far = rng.normal(size=(40, 2)) - 100.0
    x = np.concatenate([a, dense, far])
    labels = np.array(["a"] * 3 + ["b"] * 60)
    r = graph_connectivity(x, labels)
    assert r["per_label"]["a"] == pytest.approx(2 / 3)


def test_kbet_per_label_rules_from_scib(bbbc021) -> None:
    # scib-metrics src/scib_metrics/metrics/_kbet.py, kbet_per_label: labels under 10 rows or
    # with one batch are skipped; k0 = min(70, max(10, floor(mean batch size / 4))); a label
    # whose subgraph of the global graph falls apart is scored on its components of >= 3 k0
    # rows if they hold >= 75% of it, else 0.
    assert _scib_kbet_k0(np.array([20, 20]), 40) == 10
    assert _scib_kbet_k0(np.array([200, 200]), 400) == 50
    assert _scib_kbet_k0(np.array([1000, 1000]), 2000) == 70
    rng = np.random.default_rng(1)
    x = rng.normal(size=(29, 3))
    b = np.array(["A", "B"] * 14 + ["A"])
    t = np.array(["small"] * 9 + ["mixed"] * 20)
    r = kbet_per_group(x, b, t)
    assert r["n_skipped"] == 1 and "small" not in r["per_group"]  # 9 rows: skipped
    # A label split in two far halves of 20 rows each (< 3 k0 = 30): fragmented -> 0.
    x2 = np.concatenate([rng.normal(size=(20, 3)), rng.normal(size=(20, 3)) + 100.0])
    b2 = np.array(["A", "B"] * 20)
    r2 = kbet_per_group(x2, b2, np.full(40, "t"))
    assert r2["per_group"]["t"] == 0.0 and r2["n_fragmented"] == 1


def test_lisi_hand_checked() -> None:
    # scib-metrics src/scib_metrics/metrics/_lisi.py + utils/_lisi.py: Simpson's index under
    # perplexity weights; equal distances give equal weights whatever beta: LISI = 1 / sum
    # of squared batch shares; ilisi = (median LISI - 1) / (n_batches - 1).
    idx = np.array([[1, 2, 3, 4], [0, 2, 3, 4]])
    g = NeighborGraph(np.array([0, 1]), idx, -np.ones((2, 4)), "euclidean", 5)
    codes = np.array([0, 0, 0, 1, 1])
    got = lisi_values(g, codes, perplexity=2.0)
    # Row 0: neighbours 0,0,1,1 -> shares 1/2, 1/2 -> LISI 2; row 1 the same.
    np.testing.assert_allclose(got, [2.0, 2.0], atol=1e-6)
    # 200 identical rows, batches alternating: equal weights, each neighbourhood half A,
    # half B (LISI 2; rows whose 30 neighbours are 16 / 14: 1.99) -> median 2, iLISI 1.
    x = np.zeros((200, 1))
    res = ilisi(x, np.array(["A", "B"] * 100), k=30)
    assert res["median_lisi"] == pytest.approx(2.0) and res["ilisi"] == pytest.approx(1.0)
    assert math.isnan(ilisi(x, np.zeros(200))["ilisi"])


def test_constant_table_is_noted_and_not_a_perfect_score() -> None:
    from cdcl.metrics.score import evaluate_features

    rows = [
        {"plate": f"P{b}", "well": f"{t}{w}", "batch": f"B{b}", "treatment": t, "compound": t,
         "moa": {"DMSO": None, "a": "m0", "b": "m0", "c": "m1", "d": "m1"}[t],
         "is_control": t == "DMSO"}
        for b in range(3) for t in ("DMSO", "a", "b", "c", "d") for w in range(4)
    ]  # fmt: skip
    meta = pd.DataFrame(rows)
    res = evaluate_features(np.full((len(meta), 6), 3.0, np.float32), meta, null_size=200)
    assert "every feature is constant" in res["note"]
    for key in ("replicate", "moa"):
        summary = res["raw"]["map"][key]
        assert summary["map"] < 0.6 and summary["fraction_significant"] == 0.0
