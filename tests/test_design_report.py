"""Every report states the design it scored and whether that design can rank its rows.

Design facts (rows, held-out plates, queries, steps), metrics not computable by their own rule
(never a 0 in the aggregate), the calibration's no-power verdicts (out of the aggregate,
greyed), the banner when rows cannot be separated, the chance warning against the random
network, totals on a fixed range (the same in a report and in compare.html), and the default
calibration of small designs. Small planted data; no training.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cdcl.evaluation.calibrated import (
    SMALL_DESIGN_PROFILES,
    apply_calibration,
    left_out_components,
    should_calibrate,
)
from cdcl.evaluation.table_file import evaluate_table
from cdcl.metrics.design import design_facts, noise_floor
from cdcl.metrics.feasibility import unavailable
from cdcl.metrics.score import aggregate_scores, evaluate_features
from cdcl.report.chance import chance_warnings
from cdcl.report.design import design_banner, design_lines
from cdcl.report.html import LABEL_PATHS, compare, render_report, sets_frame
from cdcl.report.results import write_results


def lincs_like(plates: int = 3, seed: int = 0) -> tuple[np.ndarray, pd.DataFrame]:
    """The LINCS fields design: per plate 2 DMSO wells, orantinib, lonafarnib (1 MoA each)."""
    rows = []
    for p in range(plates):
        for well, t, moa in (
            ("A01", "DMSO", "DMSO"),
            ("J18", "DMSO", "DMSO"),
            ("A13", "orantinib", "FGFR inhibitor"),
            ("P13", "lonafarnib", "farnesyltransferase inhibitor"),
        ):
            rows.append(
                {
                    "plate": f"SQ{p}",
                    "well": well,
                    "batch": f"SQ{p}",
                    "treatment": t,
                    "compound": t,
                    "moa": moa,
                    "is_control": t == "DMSO",
                }
            )
    meta = pd.DataFrame(rows)
    x = np.random.default_rng(seed).normal(size=(len(meta), 16)).astype(np.float32)
    return x, meta


def test_design_facts_name_rows_plates_queries_and_steps() -> None:
    x, meta = lincs_like()
    test = meta["plate"].isin(["SQ1", "SQ2"]).to_numpy()
    d = design_facts(meta, ~test, test, test)
    assert d["evaluated_profiles"] == 8 and d["profiles"] == 12
    assert d["held_out_plates"] == ["SQ1", "SQ2"] and d["training_batches"] == ["SQ0"]
    knn = d["metrics"]["classification.knn.accuracy"]
    assert knn["queries"] == 4 and knn["step"] == 0.25
    assert d["metrics"]["kbet.acceptance_rate"]["step"] == 1 / 8
    assert knn["noise_floor"] == pytest.approx(1.96 * math.sqrt(0.5 / 4))
    assert noise_floor(0) == float("inf")
    lines = design_lines({"design": d})
    assert "8 well profiles scored" in lines[0] and "SQ1, SQ2" in lines[0]
    assert "steps of 0.250" in lines[1]


def test_nsc_without_a_second_compound_per_moa_is_not_computable_and_not_a_zero() -> None:
    x, meta = lincs_like()
    why = unavailable(meta, has_moa=True)
    assert why["moa_matching"].startswith("NSC/NSCB: not computable, because no MoA has a")
    res = evaluate_features(x, meta, variants=("raw",))
    assert res["raw"]["moa_matching"] is None
    agg = res["raw"]["aggregate"]
    assert {"nsc", "nscb"} <= set(agg["dropped"]) and not {"nsc", "nscb"} & set(agg["bio"])
    assert "not computable" in res["unavailable"]["raw.moa_matching"]


def test_no_power_components_leave_every_sets_aggregate() -> None:
    res = {
        "mixing_per_treatment": {"batch_silhouette": 0.8, "graph_connectivity": 1.0},
        "classification": {"knn": {"accuracy": 0.5}},
    }
    full = aggregate_scores(res)
    assert full["score"] == pytest.approx(0.4 * 0.9 + 0.6 * 0.5)
    cal = {
        "no_power": ["graph connectivity", "kBET acceptance", "NSC"],
        "metrics": {
            "graph connectivity": {"null": 1.0, "reason": "no power in this design: flat"},
            "kBET acceptance": {"null": 1.0, "reason": "no power in this design: flat"},
            "NSC": {"null": None, "reason": "no power in this design: not computed"},
        },
    }
    assert left_out_components(cal) == {"graph_connectivity": "no power in this design: flat"}
    sets = {"a": {"raw": copy.deepcopy(res) | {"aggregate": full}}, "b": {"raw": {**res}}}
    sets["b"]["raw"]["aggregate"] = full
    apply_calibration(sets, cal)
    for name in ("a", "b"):
        agg = sets[name]["raw"]["aggregate"]
        assert agg["score"] == pytest.approx(0.4 * 0.8 + 0.6 * 0.5)
        assert agg["left_out"] == {"graph_connectivity": "no power in this design: flat"}


def test_small_designs_calibrate_by_default_and_can_opt_out(capsys) -> None:
    x, meta = lincs_like()
    ev = np.ones(len(meta), bool)
    assert should_calibrate(None, meta, ev)
    assert "calibrating the metrics on it by default" in capsys.readouterr().err
    assert not should_calibrate(False, meta, ev)
    big = pd.concat([meta] * SMALL_DESIGN_PROFILES, ignore_index=True)
    assert not should_calibrate(None, big, np.ones(len(big), bool))
    assert should_calibrate(True, big, np.ones(len(big), bool))


def _two_sets(same: bool) -> dict:
    """Results of a learned set and the random network: identical, or far apart."""
    variant = {
        "classification": {"knn": {"accuracy": 0.5}, "logistic": {"accuracy": 0.5}},
        "kbet": {"acceptance_rate": 1.0},
        "ilisi": {"ilisi": 0.4},
    }
    other = copy.deepcopy(variant)
    if not same:
        other["classification"]["knn"]["accuracy"] = 1.0
        other["ilisi"]["ilisi"] = 0.9
    return {
        "feature_sets": {
            "cdcl": {"raw": variant, "plate_normalized": variant},
            "random": {"raw": other, "plate_normalized": other},
        }
    }


def test_chance_warning_fires_on_every_variant() -> None:
    lines = chance_warnings(_two_sets(same=True))
    assert len(lines) == 2
    assert "cdcl (raw profiles) equals the random network" in lines[0]
    assert "plate-normalised" in lines[1]
    assert chance_warnings(_two_sets(same=False)) == []
    # Within the calibration's null spread counts as the same row.
    close = _two_sets(same=False)
    cal = {
        "metrics": {
            "a": {"path": "classification.knn.accuracy", "null_sd": 0.3},
            "b": {"path": "ilisi.ilisi", "null_sd": 0.3},
        }
    }
    close["feature_sets"]["cdcl"]["calibration"] = cal
    assert "within the calibration's null spread" in chance_warnings(close)[0]


def test_banner_when_the_design_cannot_separate_the_rows() -> None:
    x, meta = lincs_like()
    test = meta["plate"].isin(["SQ1", "SQ2"]).to_numpy()
    results = {"design": design_facts(meta, ~test, test, test)}
    paths = {"kNN accuracy": ("classification", "knn", "accuracy")}
    tight = pd.DataFrame({"kNN accuracy": [0.5, 0.75]}, index=["cdcl", "random"])
    banner = design_banner(tight, paths, results)
    assert banner and banner.startswith("This design cannot separate the rows shown")
    wide = pd.DataFrame({"kNN accuracy": [0.0, 1.0]}, index=["cdcl", "random"])
    assert design_banner(wide, paths, results) is None


def test_report_states_design_and_compare_keeps_each_total(tmp_path: Path) -> None:
    """A run's total in its own report equals the one in compare.html (fixed range)."""
    x, meta = lincs_like(plates=4, seed=1)
    table = pd.DataFrame(
        {
            "Metadata_Plate": meta["plate"],
            "Metadata_Well": meta["well"],
            "Metadata_Compound": meta["treatment"],
            "Metadata_MoA": meta["moa"],
        }
    )
    feats = pd.DataFrame(x, columns=[f"f{i}" for i in range(x.shape[1])])
    table = pd.concat([table, feats], axis=1)
    dirs = []
    for i in (0, 1):
        t = table.copy()
        t[feats.columns] += i * 0.5 * np.arange(len(t))[:, None]
        out = tmp_path / f"run{i}"
        evaluate_table(t, out, umap=False, calibrate=False)
        dirs.append(out)
    doc = (dirs[0] / "report.html").read_text()
    assert 'class="design"' in doc and "held out: batches" in doc
    cmp = compare(dirs, tmp_path / "cmp")
    text = cmp.read_text()

    def total(page: str, row: str) -> str:
        body = re.search(rf"<tr><td>{re.escape(row)}</td>(.*?)</tr>", page).group(1)
        return re.findall(r"<span>([^<]*)</span>", body)[-1]

    assert total(doc, "features") == total(text, "run0: features")
    own1 = (dirs[1] / "report.html").read_text()
    assert total(own1, "features") == total(text, "run1: features")


def test_rendered_report_greys_no_power_and_lists_not_computable(tmp_path: Path) -> None:
    x, meta = lincs_like()
    test = meta["plate"].isin(["SQ1", "SQ2"]).to_numpy()
    res = evaluate_features(x, meta, ~test, test)
    results = {
        "design": design_facts(meta, ~test, test, test),
        "feature_sets": {"cdcl": res, "random": copy.deepcopy(res)},
    }
    res["calibration"] = {
        "no_power": ["graph connectivity"],
        "metrics": {
            "graph connectivity": {
                "path": "mixing_per_treatment.graph_connectivity",
                "null": 1.0,
                "null_sd": 0.0,
                "strength": {"4": 1.0},
                "nonlinear": 1.0,
                "power": False,
                "reason": "no power in this design: flat at 1",
            }
        },
    }
    write_results(results, tmp_path)
    doc = render_report(results, tmp_path).read_text()
    assert '<th class="grey">graph connectivity' in doc
    assert "NSC/NSCB: not computable, because" in doc
    assert "equals the random network" in doc
    assert not sets_frame(results, "raw").empty and LABEL_PATHS


def _split_calibration() -> dict:
    """A calibration where kBET has power on raw profiles and none on plate-normalised ones."""

    def rec(power: bool, null_sd: float) -> dict:
        out = {"path": "kbet.acceptance_rate", "null": 0.9, "null_sd": null_sd, "power": power}
        return out if power else {**out, "reason": "no power in this design: flat on pn"}

    raw = {"metrics": {"kBET acceptance": rec(True, 0.001)}, "no_power": []}
    pn = {"metrics": {"kBET acceptance": rec(False, 0.1)}, "no_power": ["kBET acceptance"]}
    return {
        "variants": {"raw": raw, "plate_normalized": pn},
        "no_power_by_variant": {"raw": [], "plate_normalized": ["kBET acceptance"]},
        # Top level: the raw variant's, as calibrate() stores it.
        "metrics": raw["metrics"],
        "no_power": [],
    }


def test_each_variant_is_read_from_its_own_calibration() -> None:
    """No power on plate_normalized only: only the plate-normalised column is greyed, and the
    null spread of each variant is that variant's (demo summary, report, chance warning)."""
    from cdcl.experiments.demo import COLUMN_PATHS, _demo_summary
    from cdcl.report.design import NULL_SPREAD, null_spreads
    from cdcl.report.figure import greyed_columns

    variant = {"kbet": {"acceptance_rate": 0.9}, "ilisi": {"ilisi": 0.5}}
    other = {"kbet": {"acceptance_rate": 0.95}, "ilisi": {"ilisi": 0.5}}
    results = {
        "feature_sets": {
            "CDCL": {"raw": variant, "plate_normalized": variant},
            "random": {"raw": other, "plate_normalized": other},
        }
    }
    results["feature_sets"]["CDCL"]["calibration"] = _split_calibration()

    assert greyed_columns(results, COLUMN_PATHS, "raw") == {}
    assert set(greyed_columns(results, COLUMN_PATHS, "plate_normalized")) == {"kBET"}
    assert null_spreads(results, "raw")["kbet.acceptance_rate"] == pytest.approx(
        NULL_SPREAD * 0.001
    )
    assert null_spreads(results, "plate_normalized")["kbet.acceptance_rate"] == pytest.approx(
        NULL_SPREAD * 0.1
    )
    # kBET differs by 0.05 between the rows: beyond raw's null spread, within the
    # plate-normalised one's, so only the plate-normalised row reads as the random network.
    lines = chance_warnings(results)
    assert len(lines) == 1 and "plate-normalised" in lines[0]

    frame = pd.DataFrame(
        {"kBET": [0.9, 0.95], "NSC": [0.2, 0.8]}, index=["CDCL", "intensity stats"]
    )
    pn = _demo_summary(frame, results, ["CDCL"], "plate_normalized")
    raw = _demo_summary(frame, results, ["CDCL"], "raw")
    assert '<th class="grey">kBET' in pn
    assert '<th class="grey">' not in raw
