"""Mixing metrics that design imbalance cannot fool (iLISI, graph connectivity, per-treatment
kBET), the shared neighbour graph, and the sampled metrics against their exact values."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from cdcl import metrics as M
from cdcl.metrics.mixing import (
    graph_connectivity,
    ilisi,
    kbet,
    kbet_per_group,
    lisi_values,
    mixing_per_treatment,
    scib_aggregate,
    silhouette,
)
from cdcl.metrics.neighbours import neighbor_graph, sample_rows, weighted_knn_accuracy
from cdcl.metrics.score import evaluate_features


def _dense_lisi(x: np.ndarray, labels: np.ndarray, k: int, perplexity: float) -> np.ndarray:
    """Harmony's compute_lisi/compute_simpson, row by row, on a dense distance matrix."""
    d = np.sqrt(((x[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    out = np.empty(x.shape[0])
    log_u = math.log(perplexity)
    for i in range(x.shape[0]):
        nbr = np.lexsort((np.arange(x.shape[0]), d[i]))[:k]
        dist = d[i, nbr]
        beta, lo, hi = 1.0, -np.inf, np.inf

        def hbeta(b: float, dist: np.ndarray = dist) -> tuple[float, np.ndarray]:
            p = np.exp(-dist * b)
            sp = p.sum()
            return math.log(sp) + b * float((dist * p).sum()) / sp, p / sp

        h, p = hbeta(beta)
        tries = 0
        while abs(h - log_u) > 1e-5 and tries < 50:
            if h - log_u > 0:
                lo = beta
                beta = beta * 2 if np.isinf(hi) else (beta + hi) / 2
            else:
                hi = beta
                beta = beta / 2 if np.isinf(lo) else (beta + lo) / 2
            h, p = hbeta(beta)
            tries += 1
        simpson = sum(p[labels[nbr] == b].sum() ** 2 for b in np.unique(labels))
        out[i] = 1.0 / simpson
    return out


def test_lisi_matches_dense_reference() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(150, 5)).astype(np.float32)
    x[:50] += 1.0  # partly separated batches: LISI strictly between 1 and 3
    b = np.repeat([0, 1, 2], 50)
    g = neighbor_graph(x, 30)
    ours = lisi_values(g, b, 10.0)
    ref = _dense_lisi(x, b, 30, 10.0)
    # Float32 graph distances and the bisection's 1e-5 entropy tolerance: agree to 1e-4.
    np.testing.assert_allclose(ours, ref, rtol=1e-4)
    assert 1.0 < ours.mean() < 3.0


def test_ilisi_perfect_mixing_and_separation() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(600, 8)).astype(np.float32)
    mixed = np.tile([0, 1, 2], 200)  # batches interleaved on one distribution
    r = ilisi(x, mixed)
    # Random batch labels in a neighbourhood of effective size ~30 (perplexity) give an
    # inverse Simpson index a little under 3, hence ~0.85 rather than exactly 1.
    assert r["ilisi"] > 0.8 and r["n_queries"] == 600 and r["stderr"] == 0.0
    sep = np.repeat([0, 1, 2], 200)
    far = x + 50.0 * sep[:, None].astype(np.float32)
    assert ilisi(far, sep)["ilisi"] < 0.01
    assert math.isnan(ilisi(x, np.zeros(600))["ilisi"])


def test_graph_connectivity_known_answers() -> None:
    rng = np.random.default_rng(2)
    blob = rng.normal(size=(100, 4)).astype(np.float32)
    # Label "a": one blob -> one component. Label "b": two far halves of 60 and 40 rows.
    b_rows = rng.normal(size=(100, 4)).astype(np.float32)
    b_rows[60:] += 1000.0
    x = np.concatenate([blob, b_rows + 5000.0])
    labels = np.array(["a"] * 100 + ["b"] * 100)
    r = graph_connectivity(x, labels)
    assert r["per_label"]["a"] == 1.0
    # scib-metrics' strongly connected components: a row that is no other row's neighbour is
    # a piece of its own, so the 60-row half can lose a row or two.
    assert 0.55 <= r["per_label"]["b"] <= 0.6
    assert r["score"] == pytest.approx((1.0 + r["per_label"]["b"]) / 2)


def _confounded_design(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Four tight treatment clusters, no batch effect, treatments unevenly spread over batches."""
    rng = np.random.default_rng(seed)
    centres = 20.0 * rng.normal(size=(4, 6))
    split = {0: (90, 10), 1: (10, 90), 2: (50, 50), 3: (50, 50)}
    xs, bs, ts = [], [], []
    for t, (na, nb) in split.items():
        n = na + nb
        xs.append(centres[t] + rng.normal(size=(n, 6)))
        bs.append(rng.permutation(np.array(["A"] * na + ["B"] * nb)))
        ts.append(np.full(n, f"t{t}"))
    return np.concatenate(xs).astype(np.float32), np.concatenate(bs), np.concatenate(ts)


def test_per_treatment_kbet_not_fooled_by_composition() -> None:
    x, b, t = _confounded_design()
    overall = kbet(x, b, k=25)["acceptance_rate"]
    per = mixing_per_treatment(x, b, t)
    # Overall kBET reads the 90/10 treatments as batch effect; within treatments there is none.
    assert overall < 0.6
    assert per["kbet"] > 0.85
    assert per["ilisi"] > 0.4 and per["graph_connectivity"] > 0.95
    assert per["n_treatments"] == 4 and per["n_single_batch"] == 0
    # A real batch effect (B shifted within every treatment) is caught by every component.
    shifted = x + 8.0 * (b == "B")[:, None].astype(np.float32)
    bad = mixing_per_treatment(shifted, b, t)
    # (kBET accepts the 90% side of a 90/10 treatment: its expected minority count is ~1.)
    assert bad["kbet"] < 0.5 and bad["ilisi"] < 0.1 and bad["batch_silhouette"] < 0.5
    assert bad["graph_connectivity"] < 0.95
    # Same figures as kBET run on each treatment alone.
    assert per["kbet"] == pytest.approx(kbet_per_group(x, b, t)["mean_acceptance"])


def test_single_batch_treatment_is_noted_and_left_out(capsys: pytest.CaptureFixture) -> None:
    x, b, t = _confounded_design(1)
    lone = np.random.default_rng(3).normal(size=(20, 6)).astype(np.float32) + 100.0
    x = np.concatenate([x, lone])
    b = np.concatenate([b, ["A"] * 20])
    t = np.concatenate([t, ["solo"] * 20])
    per = mixing_per_treatment(x, b, t)
    assert per["single_batch_treatments"] == ["solo"] and per["n_single_batch"] == 1
    assert "solo" not in per["per_treatment"] and per["n_treatments"] == 4
    meta = pd.DataFrame(
        {
            "plate": b,
            "well": [f"w{i}" for i in range(len(b))],
            "batch": b,
            "treatment": t,
            "is_control": t == "t3",
            "moa": pd.Series(t).map({"t0": "m0", "t1": "m0", "t2": "m1", "solo": "m1"}),
        }
    )
    res = evaluate_features(x, meta, variants=("raw",), null_size=100)
    mix = res["raw"]["mixing_per_treatment"]
    assert mix["single_batch_treatments"] == ["solo"]
    assert "only one evaluated batch" in capsys.readouterr().err
    agg = res["raw"]["aggregate"]
    assert set(agg["batch"]) == {
        "kbet_per_treatment",
        "ilisi_per_treatment",
        "batch_silhouette_per_treatment",
        "graph_connectivity",
    }
    assert agg["dropped"] == ["treatment_knn_accuracy"]  # no train/test split here
    assert agg["score"] == pytest.approx(0.4 * agg["batch_mean"] + 0.6 * agg["bio_mean"])


def test_shared_graph_gives_the_same_kbet() -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(500, 6)).astype(np.float32)
    b = rng.integers(0, 3, 500)
    x += 0.4 * b[:, None]
    g = neighbor_graph(x, 90)
    assert kbet(x, b, k=20, graph=g) == kbet(x, b, k=20)
    assert ilisi(x, b, graph=g)["ilisi"] == ilisi(x, b)["ilisi"]


def test_scib_aggregate_drops_missing() -> None:
    r = scib_aggregate({"a": 1.0, "b": 0.5, "c": float("nan")}, {"d": 0.2})
    assert r["score"] == pytest.approx(0.4 * 0.75 + 0.6 * 0.2)
    assert r["dropped"] == ["c"]


@pytest.mark.slow
def test_sampled_metrics_within_stated_error_at_1e4() -> None:
    """At 10^4 rows the 2,000-query estimates agree with the exact values within 3 stderr."""
    rng = np.random.default_rng(5)
    n, d = 10_000, 16
    batch = rng.integers(0, 5, n)
    treat = rng.integers(0, 40, n)
    x = rng.normal(size=(n, d)).astype(np.float32)
    x += 0.3 * rng.normal(size=(5, d)).astype(np.float32)[batch]
    x += 0.8 * rng.normal(size=(40, d)).astype(np.float32)[treat]
    q = sample_rows(n, 2000, 0)

    exact = kbet(x, batch, k=50)
    g = neighbor_graph(x, 90, query_indices=q)
    est = kbet(x, batch, k=50, graph=g)
    assert est["n_queries"] == 2000 and 0 < est["stderr"] <= 0.0112
    assert abs(est["acceptance_rate"] - exact["acceptance_rate"]) <= 3 * est["stderr"]

    ex_l, est_l = ilisi(x, batch), ilisi(x, batch, graph=g)
    assert abs(est_l["ilisi"] - ex_l["ilisi"]) <= 3 * est_l["stderr"]

    tr = batch < 4
    full = weighted_knn_accuracy(x[tr], treat[tr], x[~tr], treat[~tr])
    part = weighted_knn_accuracy(x[tr], treat[tr], x[~tr], treat[~tr], max_queries=500)
    assert part["n_queries"] == 500 and full["stderr"] == 0.0
    assert abs(part["accuracy"] - full["accuracy"]) <= 3 * part["stderr"]

    s_exact = silhouette(x, treat)
    vals = M.mixing.silhouette_values(x, pd.factorize(treat, sort=True)[0], q, metric="cosine")
    se = vals.std(ddof=1) / math.sqrt(q.size)
    assert abs(silhouette(x, treat, sample_size=2000) - s_exact) <= 3 * se

    meta = pd.DataFrame(
        {
            "treatment": np.where(treat == 0, "DMSO", treat.astype(str)),
            "is_control": treat == 0,
            "batch": batch.astype(str),
        }
    )
    ex_m = M.replicate_map(x, meta, null_size=100)[0]
    est_m = M.replicate_map(x, meta, null_size=100, max_queries=2000)[0]
    assert est_m["n_queries"] < ex_m["n_queries"] and est_m["stderr"] > 0
    assert abs(est_m["map"] - ex_m["map"]) <= 3 * est_m["stderr"]


def test_verbose_evaluation_prints_one_line_per_metric(capsys: pytest.CaptureFixture) -> None:
    x, b, t = _confounded_design(2)
    meta = pd.DataFrame(
        {"plate": b, "well": np.arange(len(b)).astype(str), "batch": b, "treatment": t}
    )
    meta["is_control"] = meta["treatment"] == "t3"
    evaluate_features(x, meta, variants=("raw",), null_size=100, name="toy", verbose=True)
    err = capsys.readouterr().err
    for metric in ("kBET + iLISI", "mixing per treatment", "silhouettes", "GRIT"):
        assert f"toy raw {metric}:" in err
    evaluate_features(x, meta, variants=("raw",), null_size=100, name="toy")  # small: quiet
    assert "toy raw" not in capsys.readouterr().err


def test_grit_control_sample_and_probe_training_cap() -> None:
    rng = np.random.default_rng(6)
    n = 600
    treat = np.where(np.arange(n) % 6 == 0, "DMSO", (np.arange(n) % 10).astype(str))
    x = rng.normal(size=(n, 12)).astype(np.float32)
    codes = pd.factorize(treat)[0]
    x += 1.5 * rng.normal(size=(codes.max() + 1, 12)).astype(np.float32)[codes]
    meta = pd.DataFrame({"treatment": treat, "is_control": treat == "DMSO"})
    exact = M.grit(x, meta)
    same = M.grit(x, meta, max_controls=int((treat == "DMSO").sum()))
    pd.testing.assert_frame_equal(exact, same)  # cap not reached: exact
    part = M.grit(x, meta, max_controls=40)
    # 40 of 100 controls: each z-score moves by about 1/sqrt(40) of a control sd.
    assert np.abs(part["grit"] - exact["grit"]).max() < 1.0
    assert not np.allclose(part["grit"], exact["grit"])
    y = codes.astype(str)
    r = M.logistic_probe_accuracy(x[:400], y[:400], x[400:], y[400:], max_train=120)
    assert 110 <= r["n_train"] <= 130 and r["accuracy"] > 0.5
