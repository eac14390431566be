"""Statistics across replicates (cdcl.experiments.statistics) checked against scipy, verdict logic,
and the study's aggregation and outputs on fixed replicate tables (no training)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from cli_process import cdcl, cdcl_argv
from scipy import stats

from cdcl.errors import CdclError
from cdcl.experiments import statistics as st
from cdcl.experiments.preregistration import design_hash
from cdcl.experiments.study import (
    TRANSDUCTIVE_NOTE,
    Replicate,
    StudySpec,
    aggregate_study,
    finish_study,
    is_primary,
    parse_ints,
    replicates,
)

A = [0.61, 0.58, 0.66, 0.70, 0.55]
B = [0.52, 0.57, 0.55, 0.61, 0.50]


def test_summary_matches_scipy_t_interval() -> None:
    s = st.summarise(A)
    x = np.array(A)
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    assert s["n"] == 5
    assert s["mean"] == pytest.approx(x.mean(), abs=1e-12)
    assert s["sd"] == pytest.approx(x.std(ddof=1), abs=1e-12)
    assert (s["ci_low"], s["ci_high"]) == pytest.approx((lo, hi), abs=1e-12)


def test_paired_difference_matches_scipy_ttest_rel() -> None:
    d = st.paired_difference(A, B)
    diff = np.array(A) - np.array(B)
    res = stats.ttest_rel(A, B)
    lo, hi = stats.t.interval(0.95, len(diff) - 1, loc=diff.mean(), scale=stats.sem(diff))
    assert d["n"] == 5
    assert d["mean_diff"] == pytest.approx(diff.mean(), abs=1e-12)
    assert d["p"] == pytest.approx(res.pvalue, rel=1e-12)
    assert d["t"] == pytest.approx(res.statistic, rel=1e-12)
    assert (d["ci_low"], d["ci_high"]) == pytest.approx((lo, hi), abs=1e-12)
    assert d["p"] < 0.05 and d["verdict"] == st.BETTER
    assert math.isnan(d["p_wilcoxon"])  # n < 6


def test_wilcoxon_from_six_replicates() -> None:
    a, b = [*A, 0.64], [*B, 0.60]
    d = st.paired_difference(a, b)
    assert d["p_wilcoxon"] == pytest.approx(stats.wilcoxon(a, b).pvalue, rel=1e-12)


def test_lower_is_better_flips_the_verdict() -> None:
    # A is higher than B in every replicate: better for accuracy, worse for a batch classifier.
    assert st.paired_difference(A, B, lower_is_better=False)["verdict"] == st.BETTER
    assert st.paired_difference(A, B, lower_is_better=True)["verdict"] == st.WORSE
    assert st.paired_difference(B, A, lower_is_better=True)["verdict"] == st.BETTER


def test_verdict_cases() -> None:
    assert st.verdict(0.1, 0.01, 5) == st.BETTER
    assert st.verdict(-0.1, 0.01, 5) == st.WORSE
    assert st.verdict(0.1, 0.2, 5) == st.NO_DIFFERENCE
    assert st.verdict(0.1, 0.049, 5, alpha=0.01) == st.NO_DIFFERENCE
    assert st.verdict(0.1, math.nan, 5) == st.NO_DIFFERENCE
    assert st.verdict(0.1, 0.0, 1) == st.TOO_FEW
    assert st.verdict(math.nan, math.nan, 0) == st.NOT_COMPUTABLE  # no unit holds it


def test_missing_figures_pair_only_complete_replicates() -> None:
    a = [0.6, None, 0.7, float("nan"), 0.65, 0.62]
    b = [0.5, 0.4, None, 0.55, 0.52, 0.50]
    d = st.paired_difference(a, b)
    keep_a, keep_b = [0.6, 0.65, 0.62], [0.5, 0.52, 0.50]
    assert d["n"] == 3
    assert d["p"] == pytest.approx(stats.ttest_rel(keep_a, keep_b).pvalue, rel=1e-12)
    s = st.summarise(a)
    assert s["n"] == 4 and s["mean"] == pytest.approx(np.mean([0.6, 0.7, 0.65, 0.62]))
    one = st.paired_difference([0.6, None], [0.5, 0.4])
    assert one["n"] == 1 and one["verdict"] == st.TOO_FEW and math.isnan(one["ci_low"])


def test_constant_nonzero_difference_is_flagged() -> None:
    d = st.paired_difference([0.5, 0.583, 0.7], [0.4, 0.483, 0.6])  # equal up to rounding
    assert d["zero_variance"] and d["mean_diff"] == pytest.approx(0.1)
    assert not st.paired_difference(A, B)["zero_variance"]


def test_identical_figures_are_no_difference() -> None:
    d = st.paired_difference([0.5, 0.6, 0.7], [0.5, 0.6, 0.7])
    assert d["mean_diff"] == 0.0 and d["p"] == 1.0 and d["verdict"] == st.NO_DIFFERENCE
    assert (d["ci_low"], d["ci_high"]) == (0.0, 0.0)


def _fig(rows: dict[str, dict[str, float | None]]) -> dict[str, dict[str, dict[str, float | None]]]:
    return {"plate_normalized": rows}


def _replicate_figures() -> list[dict[str, dict[str, dict[str, float | None]]]]:
    """Five replicates: CDCL beats DINO on NSCB, is worse (higher) on batch-classifier accuracy,
    DINO+harmony is missing in one replicate, and a new per-treatment iLISI column exists."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(5):
        e = rng.normal(0, 0.01, 4)
        rows = {
            "DINO": {
                "NSCB": 0.50 + e[0],
                "batch-classifier acc": 0.60 + e[1],
                "iLISI (per treatment)": 0.3,
            },
            "CDCL": {
                "NSCB": 0.60 + e[2],
                "batch-classifier acc": 0.70 + e[3],
                "iLISI (per treatment)": 0.3,
            },
        }
        if i != 2:
            rows["DINO+harmony"] = {"NSCB": 0.55, "batch-classifier acc": None}
        out.append(_fig(rows))
    return out


def test_aggregate_is_generic_over_rows_and_columns() -> None:
    figs = _replicate_figures()
    agg = aggregate_study(
        figs, ("DINO", "DINO+harmony", "nowhere"), lower_is_better={"batch-classifier acc"}
    )
    assert agg["references_present"] == ["DINO", "DINO+harmony"]
    assert agg["references_missing"] == ["nowhere"]
    diff = {(d["features"], d["reference"], d["metric"]): d for d in agg["differences"]}
    nscb = diff[("CDCL", "DINO", "NSCB")]
    assert nscb["verdict"] == st.BETTER and nscb["n"] == 5
    assert diff[("CDCL", "DINO", "batch-classifier acc")]["verdict"] == st.WORSE
    # the harmony row exists in 4 of 5 replicates; its batch-classifier figure in none
    assert diff[("DINO+harmony", "DINO", "NSCB")]["n"] == 4
    assert ("DINO+harmony", "DINO", "batch-classifier acc") not in diff
    summ = {(r["features"], r["metric"]): r for r in agg["summary"]}
    assert summ[("DINO+harmony", "NSCB")]["n"] == 4
    vals = [f["plate_normalized"]["CDCL"]["NSCB"] for f in figs]
    assert summ[("CDCL", "NSCB")]["mean"] == pytest.approx(np.mean(vals))
    head = {h["reference"]: h for h in agg["headline"]}
    assert head["DINO"]["metrics"] == {"NSCB": st.BETTER, "iLISI (per treatment)": st.NO_DIFFERENCE}
    assert head["DINO"]["overall"] == st.BETTER


def test_primary_metrics() -> None:
    for m in (
        "NSCB",
        "treatment acc (logistic)",
        "replicate mAP (other batch)",
        "kBET (per treatment)",
        "iLISI within treatment",
    ):
        assert is_primary(m), m
    for m in ("kBET", "NSC", "batch-classifier acc", "MoA mAP"):
        assert not is_primary(m), m


def test_replicates_and_parse_ints() -> None:
    spec = StudySpec(out=Path("x"), seeds=(0, 1), folds=(1, 2, 3))
    names = [r.name for r in replicates(spec)]
    assert names == [
        "seed0_fold1",
        "seed0_fold2",
        "seed0_fold3",
        "seed1_fold1",
        "seed1_fold2",
        "seed1_fold3",
    ]
    assert Replicate(2, None).name == "seed2"
    assert parse_ints("0, 1,2", "--seeds") == (0, 1, 2)
    assert parse_ints(None, "--seeds") is None
    with pytest.raises(CdclError, match="--seeds"):
        parse_ints("0,a", "--seeds")
    with pytest.raises(CdclError, match="repeated"):
        parse_ints("1,1", "--folds")


def test_outputs_from_fixed_replicates(tmp_path: Path) -> None:
    figs = _replicate_figures()
    records = [
        {"name": f"seed{i}", "seed": i, "fold": None, "tables": {}, "timings_s": {}}
        for i in range(5)
    ]
    spec = StudySpec(out=tmp_path / "s", seeds=tuple(range(5)), methods=("DINO", "CDCL"))
    result = finish_study(spec, ["DINO", "CDCL"], records, figs)
    study = json.loads((tmp_path / "s" / "study.json").read_text())
    assert study["test"]["paired"] == st.PAIRED_TEST
    assert TRANSDUCTIVE_NOTE in study["notes"]
    assert {"aggregate", "report"} <= set(study["timings_s"])
    md = (tmp_path / "s" / "study.md").read_text()
    assert "ttest_rel" in md and TRANSDUCTIVE_NOTE in md
    assert "| NSCB |" in md and "better" in md
    html = (tmp_path / "s" / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 1 and 'src="http' not in html
    assert (tmp_path / "s" / "forest_plate_normalized.png").is_file()
    assert result["study"]["headline"][0]["overall"] == st.BETTER


# ---------------------------------------------------------------- end to end (real training)

STUDY_ARGS = ("--quick", "--methods", "DINO,CDCL", "--epochs", "1", "--no-progress")


def _study_cmd(out: Path) -> list[str]:
    return cdcl_argv("study", *STUDY_ARGS, "--out", out)


def _run_study(out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return cdcl("study", *STUDY_ARGS, "--out", out, env=env, timeout=900)


def _figures(study: dict) -> dict:
    """study.json without what legitimately changes between runs (times, reuse, versions)."""
    drop = {"timings_s", "reused", "versions", "wall_s", "images_per_s"}

    def strip(v: object) -> object:
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if k not in drop}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v

    return strip(study)  # type: ignore[return-value]


def _assert_close(a: object, b: object, where: str = "") -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for k in a:
            _assert_close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert b == pytest.approx(a, abs=1e-4), where
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def quick_study(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, subprocess.CompletedProcess]:
    """One uninterrupted quick study (tiny screen, 2 seeds, DINO and CDCL, one epoch)."""
    out = tmp_path_factory.mktemp("study") / "a"
    proc = _run_study(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


@pytest.mark.slow
def test_quick_study_outputs_and_statistics(
    quick_study: tuple[Path, subprocess.CompletedProcess],
) -> None:
    out, proc = quick_study
    for name in ("study.json", "study.md", "report.html", "forest_plate_normalized.png"):
        assert (out / name).is_file(), name
    for rep in ("seed0", "seed1"):
        assert (out / "replicates" / rep / "results.json").is_file()
    assert "CDCL vs DINO" in proc.stdout and f"report: {out / 'report.html'}" in proc.stdout
    study = json.loads((out / "study.json").read_text())
    assert [r["name"] for r in study["replicates"]] == ["seed0", "seed1"]
    assert all(r["held_out"] == ["B03", "B04"] for r in study["replicates"])  # tiny: stored split
    assert study["config"]["methods"] == ["DINO", "CDCL"]
    for stage in ("replicate seed0 (1/2)", "replicate seed1 (2/2)", "aggregate", "report"):
        assert study["timings_s"][stage] >= 0
    for rep in study["replicates"]:
        assert {"data", "train DINO", "train CDCL", "evaluate"} <= set(rep["timings_s"])
    # Every summary and difference recomputed from the replicates' own tables with scipy.
    by_rep = [
        {r["features"]: r for r in rep["tables"]["plate_normalized"]} for rep in study["replicates"]
    ]
    rows = {r["features"] for r in study["summary"] if r["variant"] == "plate_normalized"}
    assert {"DINO", "CDCL", "DINO+tvn", "intensity stats", "random network"} <= rows
    checked = 0
    for s in (r for r in study["summary"] if r["variant"] == "plate_normalized"):
        vals = [t[s["features"]][s["metric"]] for t in by_rep]
        vals = [v for v in vals if v is not None]
        assert s["n"] == len(vals)
        assert s["mean"] == pytest.approx(np.mean(vals), abs=1e-12)
        if len(vals) == 2 and np.std(vals) > 0:
            lo, hi = stats.t.interval(0.95, 1, loc=np.mean(vals), scale=stats.sem(vals))
            assert (s["ci_low"], s["ci_high"]) == pytest.approx((lo, hi), abs=1e-9)
            checked += 1
    for d in (r for r in study["differences"] if r["variant"] == "plate_normalized"):
        a = [t[d["features"]][d["metric"]] for t in by_rep]
        b = [t[d["reference"]][d["metric"]] for t in by_rep]
        diff = np.subtract(a, b)
        if d["n"] == 2 and np.std(diff) > 1e-9:
            assert d["p"] == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-9)
            checked += 1
    assert checked > 5
    md = (out / "study.md").read_text()
    assert "ttest_rel" in md and "## CDCL vs DINO" in md
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and 'src="http' not in html


@pytest.mark.slow
def test_study_rerun_reuses_replicates_and_gives_the_same_json(
    quick_study: tuple[Path, subprocess.CompletedProcess],
) -> None:
    out, _ = quick_study
    first = json.loads((out / "study.json").read_text())
    ckpts = sorted((out / "replicates").glob("*/runs/*/checkpoints/last.pt"))
    assert len(ckpts) == 4
    before = {p: p.stat().st_mtime_ns for p in ckpts}
    proc = _run_study(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("reused replicates/") == 2
    assert {p: p.stat().st_mtime_ns for p in ckpts} == before
    again = json.loads((out / "study.json").read_text())
    assert all(r["reused"] for r in again["replicates"])
    _assert_close(_figures(first), _figures(again))
    # the same replicates again are the same look at the plan fixed by the first run
    design = again["design"]
    assert (design["replicates"], design["n"]) == (["seed0", "seed1"], 2)
    assert design == first["design"] and design["hash"] == design_hash(design)
    assert [lk["look"] for lk in again["looks"]] == [1]
    assert [lk["look"] for lk in again["preregistered"]["looks"]] == [1]


@pytest.mark.slow
def test_killed_study_resumes_and_matches_an_uninterrupted_one(
    quick_study: tuple[Path, subprocess.CompletedProcess], tmp_path: Path
) -> None:
    out_a, _ = quick_study
    out = tmp_path / "b"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        _study_cmd(out),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,  # its own process group: the kill reaches the loader worker too
    )
    first_done = out / "replicates" / "seed0" / "replicate.json"
    deadline = time.monotonic() + 900
    try:
        while not first_done.exists():
            assert proc.poll() is None, "the study ended before the first replicate finished"
            assert time.monotonic() < deadline, "first replicate never finished"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "study.json").exists()
    resumed = _run_study(out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "reused replicates/seed0/" in resumed.stdout
    a = json.loads((out_a / "study.json").read_text())
    b = json.loads((out / "study.json").read_text())
    _assert_close(_figures(a)["summary"], _figures(b)["summary"])
    _assert_close(_figures(a)["differences"], _figures(b)["differences"])
    _assert_close([r["tables"] for r in a["replicates"]], [r["tables"] for r in b["replicates"]])


def test_bad_options_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from cdcl.cli import main

    out = str(tmp_path / "o")
    cases = [
        (["--methods", "FOO"], "--methods FOO: unknown on synthetic"),
        (["--methods", "CDCL"], "--reference DINO: not among --methods CDCL"),
        (["--seeds", "0,x"], "--seeds 0,x: expected comma-separated integers"),
        (["--folds", "0"], "--folds 0: folds are numbered from 1"),
    ]
    for args, message in cases:
        assert main(["study", "--out", out, *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists()
