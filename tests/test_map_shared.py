"""mAP of the plain and batch-aware settings from one shared ranking: same figures as one by one."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cdcl import metrics as M


def screen(n: int, d: int = 24, seed: int = 0) -> tuple[np.ndarray, pd.DataFrame]:
    """n wells: 6 batches with an offset, 60 treatments in 6 MoAs (3 doses), 10 % DMSO."""
    rng = np.random.default_rng(seed)
    batch = rng.integers(0, 6, n)
    ctrl = rng.random(n) < 0.1
    treat = np.where(ctrl, -1, rng.integers(0, 60, n))
    moa = np.where(ctrl, -1, treat % 6)
    compound = np.where(ctrl, -1, treat // 3)
    x = rng.normal(size=(n, d)) + 0.8 * rng.normal(size=(6, d))[batch]
    x += np.where(ctrl[:, None], 0.0, 0.6 * rng.normal(size=(6, d))[np.maximum(moa, 0)])
    meta = pd.DataFrame(
        {
            "batch": [f"b{b}" for b in batch],
            "treatment": np.where(ctrl, "DMSO", [f"t{t}" for t in treat]),
            "compound": np.where(ctrl, "DMSO", [f"c{c}" for c in compound]),
            "moa": pd.Series([None if m < 0 else f"m{m}" for m in moa], dtype=object),
            "is_control": ctrl,
        }
    )
    return x.astype(np.float32), meta


@pytest.fixture(scope="module")
def table() -> tuple[np.ndarray, pd.DataFrame]:
    """3,000 wells: enough for sampled queries (1,000) to differ from every row."""
    return screen(3000)


def _same(shared: tuple, alone: tuple) -> None:
    assert shared[0] == alone[0]
    pd.testing.assert_frame_equal(shared[1], alone[1])


@pytest.mark.parametrize("max_queries", [None, 1000])
@pytest.mark.parametrize("recipe", ["replicate", "moa"])
def test_shared_ranking_equals_each_setting_alone(table, recipe: str, max_queries) -> None:
    x, meta = table
    one = M.replicate_map if recipe == "replicate" else M.moa_map
    many = M.replicate_maps if recipe == "replicate" else M.moa_maps
    kw = {"null_size": 50, "seed": 3, "max_queries": max_queries}
    unit = M.unit_rows_copy(x)
    plain, aware = many(unit, meta, (False, True), unit_rows=True, **kw)
    _same(plain, one(x, meta, False, **kw))
    _same(aware, one(x, meta, True, **kw))
    # The batch offset makes same-batch positives easier: the batch-aware mAP is lower.
    assert aware[0]["map"] < plain[0]["map"]


@pytest.mark.slow
def test_sampled_map_is_within_its_stated_error_of_the_exact_one() -> None:
    """On 10^4 rows, as the evaluation samples them (1,000 queries) and with every row."""
    x, meta = screen(10_000)
    unit = M.unit_rows_copy(x)
    for many in (M.replicate_maps, M.moa_maps):
        exact = many(unit, meta, (False, True), unit_rows=True, null_size=10)
        sampled = many(unit, meta, (False, True), unit_rows=True, null_size=10, max_queries=1000)
        for (e, _), (s, _) in zip(exact, sampled):
            assert e["stderr"] == 0.0 and s["stderr"] > 0
            assert abs(s["map"] - e["map"]) <= 4 * s["stderr"], (many.__name__, e, s)


def test_rows_without_batch_keep_the_plain_setting_unchanged(table) -> None:
    x, meta = table
    meta = meta.copy()
    meta.loc[meta.index[:50], "batch"] = None
    kw = {"null_size": 50, "max_queries": 500}
    for one, many in ((M.replicate_map, M.replicate_maps), (M.moa_map, M.moa_maps)):
        plain, aware = many(x, meta, (False, True), **kw)
        _same(plain, one(x, meta, False, **kw))
        _same(aware, one(x, meta, True, **kw))


def test_chunked_candidates_give_the_same_ap(table, monkeypatch: pytest.MonkeyPatch) -> None:
    """Similarities built from many small candidate chunks and query blocks: same APs."""
    from cdcl.metrics import retrieval

    x, meta = table
    x, meta = x[:800], meta.iloc[:800].reset_index(drop=True)
    unit = M.unit_rows_copy(x)
    kw = {"null_size": 20, "max_queries": 200}
    ref = M.moa_maps(unit, meta, (False, True), unit_rows=True, **kw)
    monkeypatch.setattr(retrieval, "_GATHER_ROWS", 7)
    monkeypatch.setattr(retrieval, "_MAP_BLOCK", 64 * 800)
    got = M.moa_maps(unit, meta, (False, True), unit_rows=True, **kw)
    for (s_ref, t_ref), (s_got, t_got) in zip(ref, got):
        assert s_got["n_queries"] == s_ref["n_queries"]
        assert s_got["map"] == pytest.approx(s_ref["map"], abs=1e-6)
        np.testing.assert_allclose(
            t_got["mean_average_precision"], t_ref["mean_average_precision"], atol=1e-6
        )
