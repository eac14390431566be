"""The batch-strength curve and metrics without power in studies."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from cli_process import cdcl

from cdcl.errors import CdclError
from cdcl.experiments import statistics as st
from cdcl.experiments.curve import (
    CURVE_REFERENCES,
    curve_figure,
    curve_markdown,
    curve_rows,
    parse_strengths,
    strength_dir,
)
from cdcl.experiments.study import NO_POWER, StudySpec, finish_study, metrics_without_power


def _figures(gap: float, seed: int) -> list[dict]:
    """Five replicates where CDCL − every reference is ``gap`` on NSCB, 0 on the others."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(5):
        noise = rng.normal(0, 0.01, 8)
        rows = {
            ref: {
                "NSCB": 0.5 + noise[i],
                "treatment acc (logistic)": 0.3 + noise[4],  # the same for every row
                "kBET per treatment": 0.2,
            }
            for i, ref in enumerate(("CDCL", *CURVE_REFERENCES))
        }
        rows["CDCL"]["NSCB"] += gap
        out.append({"plate_normalized": rows})
    return out


def _study(tmp_path: Path, name: str, gap: float, no_power: dict | None = None) -> dict:
    records = [
        {"name": f"seed{i}", "seed": i, "fold": None, "tables": {}, "timings_s": {}}
        for i in range(5)
    ]
    spec = StudySpec(
        out=tmp_path / name, seeds=tuple(range(5)), methods=("DINO", "CDCL"),
        references=CURVE_REFERENCES,
    )  # fmt: skip
    return finish_study(spec, ["DINO", "CDCL"], records, _figures(gap, 0), None, no_power)["study"]


def test_curve_rows_table_and_figure(tmp_path: Path) -> None:
    studies = {0.0: _study(tmp_path, "a", 0.0), 2.0: _study(tmp_path, "b", 0.2)}
    rows = curve_rows(studies)
    # 2 strengths x 3 references x 3 pre-declared metrics present
    assert len(rows) == 2 * 3 * 3
    assert {r["reference"] for r in rows} == set(CURVE_REFERENCES)
    at2 = [r for r in rows if r["batch_strength"] == 2.0 and r["metric"] == "NSCB"]
    assert all(r["verdict"] == st.BETTER and r["ci_low"] > 0 for r in at2)
    at0 = [r for r in rows if r["batch_strength"] == 0.0 and r["metric"] == "NSCB"]
    assert all(r["verdict"] == st.NO_DIFFERENCE and r["ci_low"] < 0 < r["ci_high"] for r in at0)
    md = curve_markdown(rows, studies)
    for ref in CURVE_REFERENCES:
        assert f"## CDCL − {ref}" in md
    assert "| NSCB |" in md and "strength 2" in md and "vs DINO: **better**" in md
    png = curve_figure(rows, tmp_path / "curve.png")
    assert png is not None and png.stat().st_size > 5000


def test_metric_without_power_is_left_out_of_the_verdict(tmp_path: Path) -> None:
    results = [
        {
            "feature_sets": {
                "DINO": {
                    "calibration": {
                        "no_power": ["kBET per treatment", "NSC"],
                        "metrics": {"kBET per treatment": {"reason": f"{NO_POWER}: moves 0.001"}},
                    }
                },
                "CDCL": {},
            }
        }
    ]
    no_power = metrics_without_power(results)
    assert set(no_power) == {"kBET per treatment", "NSC"}
    assert no_power["kBET per treatment"].startswith(NO_POWER)
    # NSCB is better, treatment accuracy not: without the rule, kBET (equal) would not matter
    # either; with a fake "worse" on kBET the verdict would be mixed; check it is left out.
    study = _study(tmp_path, "c", 0.2, no_power)
    kbet = [
        d
        for d in study["differences"]
        if d["metric"] == "kBET per treatment" and d["features"] == "CDCL"
    ]
    assert kbet and all(d["verdict"] == NO_POWER and d["p_holm"] is None for d in kbet)
    head = {h["reference"]: h for h in study["headline"]}
    assert head["DINO"]["overall"] == st.BETTER
    assert "kBET per treatment" in head["DINO"]["left_out"]
    assert any("kBET per treatment: left out of the verdicts" in n for n in study["notes"])
    md = (tmp_path / "c" / "study.md").read_text()
    assert NO_POWER in md


def test_parse_strengths() -> None:
    assert parse_strengths("0,0.5,1,2") == (0.0, 0.5, 1.0, 2.0)
    assert parse_strengths(None) is None
    assert strength_dir(Path("o"), 0.5) == Path("o/bs0.5")
    for bad in ("0,x", "-1", "1,1", "nan"):
        with pytest.raises(CdclError, match="--batch-strength"):
            parse_strengths(bad)


@pytest.mark.slow
def test_curve_end_to_end_on_the_tiny_screen(tmp_path: Path) -> None:
    """Two strengths x one seed on the tiny screen, CDCL only for one epoch (its comparison
    with CellProfiler+harmony; the other references are covered above): the real command."""
    out = tmp_path / "curve"
    cmd = [
        "study", "--quick", "--methods", "CDCL", "--reference", "CellProfiler+harmony",
        "--epochs", "1", "--seeds", "0", "--batch-strength", "0,1", "--cellprofiler",
        "--calibrate", "--no-progress", "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = cdcl(*cmd, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    curve = json.loads((out / "curve.json").read_text())
    assert curve["strengths"] == [0.0, 1.0]
    assert curve["references"] == ["CellProfiler+harmony"]  # DINO is not trained here
    for s in ("0", "1"):
        study = json.loads((out / f"bs{s}" / "study.json").read_text())
        assert study["config"]["screen"]["batch_strength"] == float(s)
        assert study["config"]["cellprofiler"] and study["config"]["calibrate"]
        rows = {r["features"] for r in study["summary"]}
        assert {"CellProfiler", "CellProfiler+harmony"} <= rows
        truth = json.loads(
            (out / f"bs{s}" / "data" / f"tiny-seed0-bs{s}" / "ground_truth.json").read_text()
        )
        assert truth["config"]["batch_strength"] == float(s)
        rep = json.loads((out / f"bs{s}" / "replicates" / "seed0" / "results.json").read_text())
        assert "calibration" in rep["feature_sets"]["CDCL"]
    assert (out / "curve.md").read_text().count("## CDCL − CellProfiler+harmony") == 1
    # A second run reuses every replicate and writes the same curve.
    again = cdcl(*cmd, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reused replicates/seed0" in again.stdout
    second = json.loads((out / "curve.json").read_text())
    assert second["rows"] == curve["rows"]


def test_power_is_decided_on_the_plate_normalised_variant_pooled_over_replicates() -> None:
    """Raw has power and the normalised profiles do not: the study's family follows the latter;
    one replicate alone would lack power where four pooled have it."""

    def record(nulls: list[float], top: float) -> dict:
        return {"null_values": nulls, "injected": {"mixing": {"1": top, "4": top}}}

    nulls = [0.47, 0.50, 0.53, 0.50, 0.47, 0.53]  # SD 0.027: one replicate's margin 0.08
    cal = {
        "variants": {
            "raw": {"metrics": {"NSC": record(nulls, 0.9)}},
            "plate_normalized": {"metrics": {"NSC": record(nulls, 0.51)}},
        }
    }
    rep = {"feature_sets": {"DINO": {"calibration": cal}}}
    assert set(metrics_without_power([rep] * 4)) == {"NSC"}
    assert metrics_without_power([rep] * 4, variant="raw") == {}
    moved = {"variants": {"plate_normalized": {"metrics": {"NSC": record(nulls, 0.56)}}}}
    one = {"feature_sets": {"DINO": {"calibration": moved}}}
    assert set(metrics_without_power([one])) == {"NSC"}
    assert metrics_without_power([one] * 4) == {}
