"""Studies that can decide: fold means as the unit, Holm across the pre-declared metrics, the
minimum detectable difference, and second looks, on synthetic numbers (no training)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from cdcl.experiments import statistics as st
from cdcl.experiments.study import StudySpec, aggregate_study, finish_study


def _seeds_by_folds(n_seeds: int = 2, n_folds: int = 3) -> tuple[list, list, list]:
    """Method and reference figures for seeds × folds, the seeds of a fold sharing a fold effect."""
    rng = np.random.default_rng(7)
    fold_effect = rng.normal(0, 0.05, n_folds)
    method, reference, units = [], [], []
    for _seed in range(n_seeds):
        for f in range(n_folds):
            base = 0.5 + fold_effect[f]
            reference.append(base + rng.normal(0, 0.01))
            method.append(base + 0.03 + fold_effect[f] + rng.normal(0, 0.01))
            units.append(f + 1)
    return method, reference, units


def test_fold_means_are_the_unit_and_match_ttest_rel() -> None:
    a, b, units = _seeds_by_folds()
    d = st.paired_difference(a, b, units=units)
    assert d["n"] == 3 and d["n_replicates"] == 6
    assert d["unit"] == "fold" and d["test"] == st.UNIT_TEST
    fa = [np.mean([x for x, u in zip(a, units) if u == f]) for f in (1, 2, 3)]
    fb = [np.mean([x for x, u in zip(b, units) if u == f]) for f in (1, 2, 3)]
    ref = stats.ttest_rel(fa, fb)
    assert d["p"] == pytest.approx(ref.pvalue, rel=1e-12)
    assert d["t"] == pytest.approx(ref.statistic, rel=1e-12)
    assert d["mean_diff"] == pytest.approx(np.mean(np.subtract(fa, fb)), abs=1e-15)
    lo, hi = st.t_interval(np.subtract(fa, fb))
    assert (d["ci_low"], d["ci_high"]) == pytest.approx((lo, hi))
    # treating the six replicates as independent would claim n = 6 and a smaller p
    naive = st.paired_difference(a, b)
    assert naive["n"] == 6 and naive["unit"] == "replicate" and naive["p"] < d["p"]


def test_units_that_are_all_distinct_change_nothing() -> None:
    a, b, _ = _seeds_by_folds(n_seeds=1, n_folds=4)
    with_units = st.paired_difference(a, b, units=[1, 2, 3, 4])
    assert with_units == st.paired_difference(a, b)


def test_fold_means_skip_incomplete_pairs() -> None:
    a, b, units = _seeds_by_folds()
    a[0] = None  # seed 0, fold 1: fold 1 rests on seed 1 alone
    d = st.paired_difference(a, b, units=units)
    assert d["n"] == 3 and d["n_replicates"] == 5
    fa = [a[3], np.mean([a[1], a[4]]), np.mean([a[2], a[5]])]
    fb = [b[3], np.mean([b[1], b[4]]), np.mean([b[2], b[5]])]
    assert d["p"] == pytest.approx(stats.ttest_rel(fa, fb).pvalue, rel=1e-12)


def test_holm_by_hand() -> None:
    # sorted 0.01, 0.03, 0.04 -> 3·0.01, max(0.03, 2·0.03), max(0.06, 1·0.04)
    assert st.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    # capped at 1; a missing p stays out of the family (m = 2)
    adj = st.holm([0.6, math.nan, 0.02])
    assert adj[0] == pytest.approx(0.6) and math.isnan(adj[1]) and adj[2] == pytest.approx(0.04)
    assert st.holm([0.5, 0.7]) == pytest.approx([1.0, 1.0])


def test_holm_equals_statsmodels() -> None:
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    p = np.random.default_rng(3).uniform(0, 0.2, 7)
    expected = multitest.multipletests(p, method="holm")[1]
    assert st.holm(list(p)) == pytest.approx(list(expected), rel=1e-12)


def test_min_detectable_difference() -> None:
    # G*Power, paired t, dz = 1, n = 10, α 0.05 two-sided: power 0.8030969.
    assert st.detectable_power(1.0, 1.0, 10) == pytest.approx(0.8030969, abs=1e-7)
    mdd = st.min_detectable_difference(2.0, 10)
    # just under dz = 1 (which has power 0.803), in the units of the sd
    assert 1.9 < mdd < 2.0
    assert st.detectable_power(mdd, 2.0, 10) == pytest.approx(0.8, abs=1e-9)
    # the normal approximation (z_0.975 + z_0.8) · sd / sqrt(n) is the large-n limit
    z = stats.norm.ppf(0.975) + stats.norm.ppf(0.8)
    assert st.min_detectable_difference(1.0, 2000) == pytest.approx(z / math.sqrt(2000), rel=1e-3)
    assert math.isnan(st.min_detectable_difference(1.0, 1))
    assert math.isnan(st.min_detectable_difference(0.0, 5))
    d = st.paired_difference([0.61, 0.58, 0.66, 0.70, 0.55], [0.52, 0.57, 0.55, 0.61, 0.50])
    assert d["min_detectable_diff"] == pytest.approx(st.min_detectable_difference(d["sd_diff"], 5))


def test_min_detectable_difference_equals_statsmodels() -> None:
    power = pytest.importorskip("statsmodels.stats.power")
    for n in (3, 5, 8):
        dz = power.TTestPower().solve_power(nobs=n, alpha=0.05, power=0.8)
        assert st.min_detectable_difference(0.1, n) == pytest.approx(0.1 * dz, rel=1e-6)


def _fig(rows: dict) -> dict:
    return {"plate_normalized": rows}


def _three_metric_figures(n: int = 5) -> list[dict]:
    """CDCL ahead of DINO on three pre-declared metrics, one clearly, two marginally."""
    rng = np.random.default_rng(11)
    out = []
    for _ in range(n):
        e = rng.normal(0, 1, 6)
        out.append(
            _fig(
                {
                    "DINO": {"NSCB": 0.5, "treatment acc (logistic)": 0.6, "replicate mAP": 0.3},
                    "CDCL": {
                        "NSCB": 0.6 + 0.01 * e[0],
                        "treatment acc (logistic)": 0.6 + 0.01 + 0.012 * e[1],
                        "replicate mAP": 0.3,
                    },
                }
            )
        )
    return out


def test_holm_drives_the_pre_declared_verdicts() -> None:
    figs = _three_metric_figures()
    agg = aggregate_study(figs, ("DINO",))
    d = {x["metric"]: x for x in agg["differences"]}
    prim = [d["NSCB"], d["treatment acc (logistic)"]]
    adj = st.holm([x["p"] for x in prim])
    assert [x["p_holm"] for x in prim] == pytest.approx(adj)
    assert d["replicate mAP"]["p_holm"] is None  # not pre-declared: exploratory, raw p
    for x in prim:
        assert x["verdict"] == st.verdict(x["mean_diff"], x["p_holm"], x["n"])
    assert agg["headline"][0]["metrics"]["NSCB"] == st.BETTER


def test_holm_can_overturn_a_raw_verdict() -> None:
    # raw p of 0.03 and 0.04 in a family of two: Holm gives 0.06 and 0.06
    diffs = [
        {
            "variant": "plate_normalized",
            "features": "CDCL",
            "reference": "DINO",
            "metric": m,
            "lower_is_better": False,
            "mean_diff": 0.05,
            "n": 5,
            "p": p,
            "verdict": st.BETTER,
        }
        for m, p in (("NSCB", 0.03), ("treatment acc (logistic)", 0.04))
    ]
    from cdcl.experiments.study import adjust_primary_family

    adjust_primary_family(diffs)
    assert [x["p_holm"] for x in diffs] == pytest.approx([0.06, 0.06])
    assert [x["verdict"] for x in diffs] == [st.NO_DIFFERENCE] * 2
    assert [x["verdict_raw"] for x in diffs] == [st.BETTER] * 2


def _records(seeds: list[int], folds: list[int | None]) -> list[dict]:
    return [
        {
            "name": f"seed{s}" + (f"_fold{f}" if f is not None else ""),
            "seed": s,
            "fold": f,
            "tables": {},
            "timings_s": {},
        }
        for s in seeds
        for f in folds
    ]


def test_folds_are_the_unit_in_the_study_outputs(tmp_path: Path) -> None:
    a, b, units = _seeds_by_folds()
    figs = [_fig({"DINO": {"NSCB": y}, "CDCL": {"NSCB": x}}) for x, y in zip(a, b)]
    spec = StudySpec(
        out=tmp_path / "s", dataset="bbbc021", seeds=(0, 1), folds=(1, 2, 3), methods=None
    )
    finish_study(spec, ["DINO", "CDCL"], _records([0, 1], [1, 2, 3]), figs)
    study = json.loads((spec.out / "study.json").read_text())
    assert study["n_units"] == 3 and study["unit"] == "fold"
    assert study["test"]["paired"] == st.UNIT_TEST
    d = next(x for x in study["differences"] if x["metric"] == "NSCB")
    assert d["n"] == 3 and d["n_replicates"] == 6 and d["test"] == st.UNIT_TEST
    md = (spec.out / "study.md").read_text()
    assert "paired t on fold means" in md and "p (Holm)" in md and "detectable ±" in md


def _simple_figures(n: int) -> list[dict]:
    rng = np.random.default_rng(5)
    return [
        _fig({"DINO": {"NSCB": 0.5}, "CDCL": {"NSCB": 0.55 + 0.02 * rng.normal()}})
        for _ in range(n)
    ]


def _without_times(study: dict) -> dict:
    return {k: v for k, v in study.items() if k not in ("timings_s", "versions")}


def test_rerun_is_the_same_look_and_extension_is_a_second_look(tmp_path: Path) -> None:
    out = tmp_path / "s"
    figs = _simple_figures(5)
    spec3 = StudySpec(out=out, seeds=(0, 1, 2), methods=("DINO", "CDCL"))
    finish_study(spec3, ["DINO", "CDCL"], _records([0, 1, 2], [None]), figs[:3])
    first = json.loads((out / "study.json").read_text())
    assert first["design"] == {"replicates": ["seed0", "seed1", "seed2"], "n": 3}
    assert [lk["look"] for lk in first["looks"]] == [1]
    assert not any("Look " in n for n in first["notes"])
    # the same replicates again: the same study.json (times aside), still one look
    finish_study(spec3, ["DINO", "CDCL"], _records([0, 1, 2], [None]), figs[:3])
    again = json.loads((out / "study.json").read_text())
    assert _without_times(again) == _without_times(first)
    # more seeds into the same --out: a second look against the fixed plan of 3
    spec5 = StudySpec(out=out, seeds=(0, 1, 2, 3, 4), methods=("DINO", "CDCL"))
    finish_study(spec5, ["DINO", "CDCL"], _records([0, 1, 2, 3, 4], [None]), figs)
    ext = json.loads((out / "study.json").read_text())
    assert ext["design"]["n"] == 3
    assert [lk["look"] for lk in ext["looks"]] == [1, 2]
    assert ext["looks"][0]["overall"] == first["looks"][0]["overall"]
    assert len(ext["looks"][1]["replicates"]) == 5
    assert any(
        n.startswith("Look 2: this study was planned with 3 replicates") for n in ext["notes"]
    )
    md = (out / "study.md").read_text()
    assert "look 2 of a study planned with 3 replicates" in md


def test_a_study_json_without_a_design_counts_as_the_first_look(tmp_path: Path) -> None:
    out = tmp_path / "s"
    out.mkdir()
    figs = _simple_figures(4)
    old = {"replicates": [{"name": f"seed{i}"} for i in range(3)], "headline": []}
    (out / "study.json").write_text(json.dumps(old))
    spec = StudySpec(out=out, seeds=(0, 1, 2, 3), methods=("DINO", "CDCL"))
    finish_study(spec, ["DINO", "CDCL"], _records([0, 1, 2, 3], [None]), figs)
    study = json.loads((out / "study.json").read_text())
    assert study["design"]["replicates"] == ["seed0", "seed1", "seed2"]
    assert len(study["looks"]) == 2


def test_per_query_outcomes_are_stored_and_add_up() -> None:
    import pandas as pd

    from cdcl.metrics.classification import logistic_probe_accuracy
    from cdcl.metrics.matching import nsc_nscb

    rng = np.random.default_rng(2)
    rows = []
    for b in ("B1", "B2"):
        for c in range(6):
            for _ in range(3):
                rows.append({"batch": b, "compound": f"c{c}", "treatment": f"c{c}", "moa": c % 3})
    meta = pd.DataFrame(rows).assign(is_control=False)
    x = rng.normal(size=(len(meta), 8)) + meta["moa"].to_numpy()[:, None] * 0.5
    res = nsc_nscb(x, meta)
    q = res["queries"]
    assert len(q["nsc"]["hit"]) == res["n_nsc"]
    assert np.mean(q["nsc"]["hit"]) == pytest.approx(res["nsc"])
    assert len(q["nscb"]["hit"]) == res["n_nscb"] == 12
    assert np.mean(q["nscb"]["hit"]) == pytest.approx(res["nscb"])
    assert sorted(set(q["nscb"]["batch"])) == ["B1", "B2"]
    assert set(q["nscb"]["compound"]) == {f"c{c}" for c in range(6)}
    tr = meta["batch"].to_numpy() == "B1"
    y = meta["treatment"].to_numpy()
    probe = logistic_probe_accuracy(x[tr], y[tr], x[~tr], y[~tr])
    per = probe["per_label"]
    assert sum(per["n"]) == int((~tr).sum())
    assert sum(per["correct"]) / sum(per["n"]) == pytest.approx(probe["accuracy"])


def test_compound_bootstrap_difference() -> None:
    rng = np.random.default_rng(4)
    comps = [f"c{i}" for i in range(30)]
    method, reference = [], []
    for _rep in range(3):
        hm = rng.random(30) < 0.7
        hr = rng.random(30) < 0.5
        method.append(st.per_compound(comps, hm))
        reference.append(st.per_compound(comps, hr))
    res = st.compound_bootstrap_difference(method, reference, n_boot=2000, seed=1)
    # the point estimate is the plain mean over replicates of the accuracy difference
    plain = np.mean(
        [
            sum(h for h, _ in m.values()) / 30 - sum(h for h, _ in r.values()) / 30
            for m, r in zip(method, reference)
        ]
    )
    assert res["mean_diff"] == pytest.approx(plain)
    assert res["ci_low"] < res["mean_diff"] < res["ci_high"]
    assert res["n_compounds"] == 30 and res["n_boot"] == 2000
    # with one query per compound, the half-width is near the binomial-type standard error
    # of a difference of means over 30 compounds: 1.96 · sd(per-compound diff) / sqrt(30)
    diffs = np.mean([[m[c][0] - r[c][0] for c in comps] for m, r in zip(method, reference)], axis=0)
    se = np.std(diffs, ddof=1) / math.sqrt(30)
    assert (res["ci_high"] - res["ci_low"]) / 2 == pytest.approx(1.96 * se, rel=0.15)
    # identical rows: a zero-width interval at 0
    same = st.compound_bootstrap_difference(method, method, n_boot=200)
    assert (same["mean_diff"], same["ci_low"], same["ci_high"]) == (0.0, 0.0, 0.0)
    # per_compound sums the queries of a compound
    assert st.per_compound(["a", "a", "b"], [1, 0, 1]) == {"a": (1.0, 2.0), "b": (1.0, 1.0)}


def _results_with_queries(rng: np.random.Generator, comps: list[str]) -> dict:
    def row(p: float) -> dict:
        hit = [bool(h) for h in rng.random(len(comps)) < p]
        q = {"nscb": {"treatment": comps, "compound": comps, "batch": ["B1"] * len(comps)}}
        q["nscb"]["hit"] = hit
        return {"plate_normalized": {"moa_matching": {"queries": q, "nscb": float(np.mean(hit))}}}

    return {"feature_sets": {"DINO": row(0.5), "CDCL": row(0.7)}}


def test_compound_interval_in_the_study(tmp_path: Path) -> None:
    from cdcl.experiments.study import replicate_outcomes

    rng = np.random.default_rng(9)
    comps = [f"c{i}" for i in range(24)]
    results = [_results_with_queries(rng, comps) for _ in range(3)]
    outcomes = [replicate_outcomes(r) for r in results]
    assert outcomes[0]["plate_normalized"]["CDCL"]["NSCB"]["c0"][1] == 1.0
    figs = [
        _fig(
            {
                k: {"NSCB": v["plate_normalized"]["moa_matching"]["nscb"]}
                for k, v in r["feature_sets"].items()
            }
        )
        for r in results
    ]
    spec = StudySpec(out=tmp_path / "s", dataset="bbbc021", seeds=(0, 1, 2), methods=None)
    finish_study(spec, ["DINO", "CDCL"], _records([0, 1, 2], [None]), figs, outcomes)
    study = json.loads((spec.out / "study.json").read_text())
    d = next(x for x in study["differences"] if x["metric"] == "NSCB")
    assert d["interval"] == "compounds"  # every replicate evaluated the same compounds
    assert d["bootstrap"]["mean_diff"] == pytest.approx(d["mean_diff"])
    assert d["bootstrap"]["n_compounds"] == 24
    assert "(compounds)" in (spec.out / "study.md").read_text()
    # without stored outcomes the interval is the t-interval over units
    finish_study(
        StudySpec(out=tmp_path / "t", dataset="bbbc021", seeds=(0, 1, 2), methods=None),
        ["DINO", "CDCL"],
        _records([0, 1, 2], [None]),
        figs,
    )
    plain = json.loads((tmp_path / "t" / "study.json").read_text())
    assert next(x for x in plain["differences"] if x["metric"] == "NSCB")["interval"] == "t"
    # the simulated screen draws new compounds per seed: bootstrap kept, t-interval shown
    syn = StudySpec(out=tmp_path / "u", seeds=(0, 1, 2), methods=("DINO", "CDCL"))
    finish_study(syn, ["DINO", "CDCL"], _records([0, 1, 2], [None]), figs, outcomes)
    d = next(
        x
        for x in json.loads((tmp_path / "u" / "study.json").read_text())["differences"]
        if x["metric"] == "NSCB"
    )
    assert d["interval"] == "t" and d["bootstrap"]["n_compounds"] == 24


# ---------------------------------------------------------------- the sign-flip test


def _brute_force_sign_flip(d: list[float]) -> float:
    """Every assignment of signs written out, the statistic |mean| as the docs state it."""
    import itertools

    observed = abs(sum(d) / len(d))
    tie = 1e-9 * sum(abs(x) for x in d) / len(d)
    hits = [
        abs(sum(s * x for s, x in zip(signs, d)) / len(d)) >= observed - tie
        for signs in itertools.product((1, -1), repeat=len(d))
    ]
    return sum(hits) / len(hits)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 10])
def test_sign_flip_equals_brute_force(n: int) -> None:
    rng = np.random.default_rng(n)
    for _ in range(5):
        d = rng.normal(0.01, 0.02, n).tolist()
        assert st.sign_flip_p(d) == pytest.approx(_brute_force_sign_flip(d), abs=1e-15)
    # ties and zeros: repeated magnitudes and exact zeros
    d = rng.choice([-0.1, 0.0, 0.1, 0.2], size=n).tolist()
    assert st.sign_flip_p(d) == pytest.approx(_brute_force_sign_flip(d), abs=1e-15)


def test_sign_flip_known_values() -> None:
    # All differences of one sign: only the observed assignment and its mirror reach |mean|.
    assert st.sign_flip_p([0.01, 0.02, 0.03, 0.04, 0.05]) == 2 / 32
    assert st.sign_flip_p([-1.0, -2.0, -3.0]) == 2 / 8 == 0.25  # n = 3 can never go lower
    assert st.sign_flip_p([0.1] * 20) == 2 / 2**20
    # Ties count as at least as extreme: +1 +1 +1 -1 has |sum| 2, reached by 10 of 16.
    assert st.sign_flip_p([1.0, 1.0, 1.0, -1.0]) == 10 / 16
    # 0.3 + 0.1 - 0.2: |sum| 0.2 is reached by 6 of 8 (0.2 itself within rounding).
    assert st.sign_flip_p([0.3, 0.1, -0.2]) == 6 / 8
    assert st.sign_flip_p([0.0, 0.0, 0.0]) == 1.0  # nothing to flip
    assert st.sign_flip_p([1.0, -1.0]) == 1.0
    assert math.isnan(st.sign_flip_p([])) and math.isnan(st.sign_flip_p([None, math.nan]))
    with pytest.raises(ValueError, match="at most 2\\^24"):
        st.sign_flip_p([1.0], max_exact=25)


def test_sign_flip_monte_carlo_above_twenty_units() -> None:
    d = np.random.default_rng(3).normal(0.2, 1.0, 22)
    exact = st.sign_flip_p(d, max_exact=22)
    mc = st.sign_flip_p(d)  # 22 > 20: 100,000 random assignments, seed 0
    assert mc == st.sign_flip_p(d)  # reproducible
    assert abs(mc - exact) < 4 * math.sqrt(exact * (1 - exact) / st.SIGNFLIP_DRAWS)
    # Never 0: the observed assignment counts, p >= 1 / (1 + draws).
    assert st.sign_flip_p([1.0] * 25) == 1 / (1 + st.SIGNFLIP_DRAWS)
    assert st.sign_flip_p([1.0] * 25, draws=999, seed=1) == 1 / 1000


def test_paired_difference_carries_the_sign_flip_p() -> None:
    a, b = [0.6, 0.55, 0.7, 0.62, 0.58], [0.5, 0.52, 0.6, 0.61, 0.5]
    d = st.paired_difference(a, b)
    assert d["p_signflip"] == 2 / 32 and d["p"] < 0.05  # all five differences positive
    # The same nonzero difference everywhere: t says p = 0, the sign flip stays at 2/2^n.
    z = st.paired_difference([0.6] * 3, [0.5] * 3)
    assert z["zero_variance"] and z["p"] == 0.0 and z["p_signflip"] == 0.25
    assert math.isnan(st.paired_difference([0.6], [0.5])["p_signflip"])  # as p: n < 2
    # Shared units: the test runs on the fold means, like the t-test.
    a, b, units = _seeds_by_folds()
    f = st.paired_difference(a, b, units=units)
    means = st.unit_means(a, units) - st.unit_means(b, units)
    assert f["p_signflip"] == st.sign_flip_p(means) == 0.25  # n = 3 folds


def test_sign_flip_in_the_study_outputs(tmp_path: Path) -> None:
    out = tmp_path / "s"
    spec = StudySpec(out=out, seeds=(0, 1, 2), methods=("DINO", "CDCL"))
    finish_study(spec, ["DINO", "CDCL"], _records([0, 1, 2], [None]), _simple_figures(3))
    study = json.loads((out / "study.json").read_text())
    assert study["test"]["signflip"] == st.SIGNFLIP_TEST
    assert all("p_signflip" in d for d in study["differences"])
    d = next(x for x in study["differences"] if x["metric"] == "NSCB")
    assert d["p_signflip"] == 0.25  # CDCL ahead in all 3 seeds: the smallest p at n = 3
    assert any(
        n.startswith("With n = 3 units the sign-flip p cannot be below") for n in study["notes"]
    )
    md = (out / "study.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| metric |"))
    assert "| p | p (Holm) | p (sign-flip) |" in header
    row = next(line for line in md.splitlines() if line.startswith("| NSCB |"))
    assert row.split(" | ")[header.split(" | ").index("p (sign-flip)")] == "0.25"
    assert "p (sign-flip)" in (out / "report.html").read_text()
