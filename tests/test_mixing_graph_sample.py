"""Per-treatment kBET and graph connectivity above 10^4 rows: a sample of whole treatments
scored on the kNN graph over ALL rows equals the exact computation within its standard error."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cdcl.metrics.mixing import GRAPH_PAIRS, label_graph, mixing_per_treatment
from cdcl.metrics.score import evaluate_features

N = 20_000
SAMPLE_ROWS = 3_000  # graph search budget of the sampled runs: ~80 of 500 treatments


def _layout(seed: int = 0) -> tuple[np.random.Generator, np.ndarray, np.ndarray]:
    """bench_cli_evaluate's design: 20 contiguous batches, 500 treatments + DMSO (10 %)."""
    rng = np.random.default_rng(seed)
    batch = (np.arange(N) * 80 // N) * 20 // 80
    treat = np.where(rng.random(N) < 0.10, 0, rng.integers(1, 501, N))
    return rng, batch, np.where(treat == 0, "DMSO", treat.astype(str))


def _random_table(d: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random profiles: a treatment's rows are never each other's neighbours (fragmented)."""
    rng, b, t = _layout()
    return rng.standard_normal((N, d), dtype=np.float32), b, t


def _compact_table(d: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tight, far-apart treatment clusters with no batch effect: compact and batch-mixed."""
    rng, b, t = _layout()
    codes = pd.factorize(t)[0]
    centres = 30.0 * rng.standard_normal((codes.max() + 1, d), dtype=np.float32)
    return centres[codes] + rng.standard_normal((N, d), dtype=np.float32), b, t


def _on_frame(exact: dict, sampled: dict, key: str) -> float:
    """The exact mean over the treatments the sample was drawn from (too-large ones left out)."""
    left = set(sampled.get("too_large_treatments", []))
    vals = [v[key] for t, v in exact["per_treatment"].items() if t not in left]
    return float(np.nanmean(vals))


@pytest.fixture(scope="module")
def random_runs() -> tuple[dict, dict]:
    x, b, t = _random_table()
    return mixing_per_treatment(x, b, t), mixing_per_treatment(x, b, t, pair_budget=SAMPLE_ROWS * N)


@pytest.fixture(scope="module")
def compact_runs() -> tuple[dict, dict]:
    x, b, t = _compact_table()
    return mixing_per_treatment(x, b, t), mixing_per_treatment(x, b, t, pair_budget=SAMPLE_ROWS * N)


def test_label_graph_sample_holds_the_full_graphs_subgraphs() -> None:
    rng = np.random.default_rng(1)
    n = 3_000
    x = rng.standard_normal((n, 6), dtype=np.float32)
    codes = rng.integers(0, 60, n)
    ok = np.ones(60, dtype=bool)
    full = label_graph(x, codes, ok, exact_max=None)
    part = label_graph(x, codes, ok, exact_max=0, pair_budget=600 * n, seed=2)
    assert 3 <= part.scored.size < 60 and part.info(n)["sampled"]
    assert part.n_query_rows == int(np.isin(codes, part.scored).sum()) <= 900
    for g in part.scored:
        rows = np.flatnonzero(codes == g)
        sub = part.adj[rows][:, rows]
        assert (sub != full.adj[rows][:, rows]).nnz == 0  # the same edges as the full graph
    unsearched = ~np.isin(codes, part.scored)
    assert part.adj[np.flatnonzero(unsearched)].nnz == 0


@pytest.mark.slow
def test_random_table_exact_figures_are_fragmented(random_runs) -> None:
    exact, _ = random_runs
    # 2e4 rows fit the default graph budget: every row is searched, every treatment scored.
    assert N * N <= GRAPH_PAIRS
    assert exact["graph"]["sampled"] is False and exact["graph"]["n_query_rows"] == N
    assert exact["kbet_stderr"] == 0.0 and exact["graph_connectivity_stderr"] == 0.0
    # Treatments under 3 k0 = 30 rows are left out of kBET (a split one would score 0 for
    # compactness); the others are scored.
    assert exact["kbet_n"] + exact["n_kbet_not_computable"] == 501 and exact["kbet_n"] > 400
    # Every treatment falls apart in the graph over all rows: kBET 0 (scib's rule), except
    # DMSO (2,000 rows, ~1.4 of each row's 14 neighbours): at most 1/kbet_n of the mean.
    assert exact["kbet"] <= 1.0 / exact["kbet_n"] + 1e-9
    assert exact["graph_connectivity"] < 0.1


@pytest.mark.slow
def test_random_table_sample_within_its_error(random_runs) -> None:
    exact, est = random_runs
    g = est["graph"]
    assert g["sampled"] is True and g["n_query_rows"] <= 1.3 * SAMPLE_ROWS
    assert est["too_large_treatments"] == ["DMSO"]  # 2,000 rows: over a third of the budget
    assert 60 <= est["kbet_n"] <= est["graph_connectivity_n"] == g["labels_scored"] < 500
    # Every sampled treatment is fragmented (0): no spread to estimate from, so the stated
    # error is that of one treatment in kbet_n scoring 1 (~1 / kbet_n).
    assert est["kbet"] == 0.0 == _on_frame(exact, est, "kbet")
    assert 0.5 / est["kbet_n"] < est["kbet_stderr"] < 1.0 / est["kbet_n"]
    assert abs(est["kbet"] - exact["kbet"]) <= 3 * est["kbet_stderr"]  # DMSO included
    gc, se = est["graph_connectivity"], est["graph_connectivity_stderr"]
    assert 0 < se < 0.01
    assert abs(gc - _on_frame(exact, est, "graph_connectivity")) <= 3 * se
    # iLISI and the batch silhouette still score every treatment.
    assert est["ilisi_n"] == exact["ilisi_n"] and est["ilisi"] == exact["ilisi"]


@pytest.mark.slow
def test_compact_table_near_one_and_sample_within_its_error(compact_runs) -> None:
    exact, est = compact_runs
    assert exact["kbet"] > 0.9 and exact["graph_connectivity"] > 0.95
    assert est["kbet"] > 0.9 and est["graph_connectivity"] > 0.95
    for key in ("kbet", "graph_connectivity"):
        se = est[f"{key}_stderr"]
        assert se < 0.02
        assert abs(est[key] - _on_frame(exact, est, key)) <= 3 * se + 1e-12


@pytest.mark.slow
def test_sample_is_seeded() -> None:
    x, b, t = _random_table(d=8)
    kw = {"pair_budget": SAMPLE_ROWS * N}

    def scored(r: dict) -> set[str]:
        return {t for t, v in r["per_treatment"].items() if np.isfinite(v["graph_connectivity"])}

    a, again = (mixing_per_treatment(x, b, t, seed=0, **kw) for _ in range(2))
    assert scored(a) == scored(again) and a["graph_connectivity"] == again["graph_connectivity"]
    assert scored(a) != scored(mixing_per_treatment(x, b, t, seed=1, **kw))


@pytest.mark.slow
def test_evaluate_features_reports_the_full_graph_figures() -> None:
    """results.json's per-treatment kBET on the 2e4 random table: 0, not ~1 as before."""
    x, b, t = _random_table()
    meta = pd.DataFrame(
        {
            "plate": b.astype(str),
            "well": np.arange(N).astype(str),
            "batch": b.astype(str),
            "treatment": t,
            "is_control": t == "DMSO",
        }
    )
    res = evaluate_features(x, meta, variants=("raw",), null_size=100, verbose=False)["raw"]
    kb = res["kbet"]
    mix = res["mixing_per_treatment"]
    assert kb["per_treatment_mean"] <= 1.0 / kb["per_treatment_n"] + 1e-9
    assert kb["per_treatment_n"] + mix["n_kbet_not_computable"] == 501
    assert kb["per_treatment_stderr"] == 0.0
    assert mix["graph"]["n_rows"] == N and mix["graph_connectivity_stderr"] == 0.0
