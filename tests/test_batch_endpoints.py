"""Batch endpoints that see batch effects left after per-plate standardisation.

The design is that of the simulated screen's held-out part: 6 batches x 2 plates, each plate
with 12 compounds x 2 wells and 8 control wells, 32 features. Every well varies along a few
strong shared directions (as real profiles do) plus a little independent noise; each compound
has its own effect vector. The null band of each endpoint is its spread over the profiles
with batch labels permuted within treatment.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from conftest import profile_design
from threadpoolctl import threadpool_limits

from cdcl.evaluation.calibrated import apply_calibration, left_out_components
from cdcl.evaluation.calibration import (
    CALIBRATED,
    NO_POWER,
    calibrate,
    inject_mixing,
    inject_power,
    inject_shift,
    median_treatment_effect,
    permute_within_treatment,
    pooled_power,
    unit_amounts,
)
from cdcl.experiments.demo import COLUMNS, LOWER_IS_BETTER
from cdcl.metrics.control_mixing import control_mixing, grouped_batch_classifier
from cdcl.metrics.mixing import mixing_per_treatment
from cdcl.metrics.retrieval import (
    _expected_ap,
    matched_ap,
    replicate_maps_with_penalty,
    same_batch_rule,
)
from cdcl.metrics.score import evaluate_features
from cdcl.profiles.columns import plate_normalize
from cdcl.report.calibration import calibration_table

ENDPOINTS = {
    "retrieval penalty (same − other batch)": +1,  # grows with a batch effect
    "control kBET": -1,
    "control iLISI": -1,
    "control batch-classifier acc": +1,
}
PATHS = {label: path for label, path, _ in CALIBRATED}
NULL_PERMUTATIONS = 8
BAND_SDS = 4.0
MIN_BAND = 0.02


def screen(seed: int = 0, n_batches: int = 6, d: int = 32) -> tuple[np.ndarray, pd.DataFrame]:
    """Raw profiles without batch effect on the held-out design (see the module doc)."""
    rng = np.random.default_rng(seed)
    effects = {f"c{t}": 1.5 * rng.normal(size=d) for t in range(12)}
    effects["DMSO"] = np.zeros(d)
    loadings = rng.normal(size=(3, d)) / math.sqrt(3)
    offset = 5.0 + 2.0 * rng.normal(size=d)
    moas = {name: None if name == "DMSO" else f"m{int(name[1:]) % 4}" for name in effects}
    meta = profile_design(n_batches, moas, wells=2, control_wells=8)
    xs = []
    for name in meta["treatment"]:  # one draw per row, in row order
        shared = 3.0 * rng.normal(size=3) @ loadings
        xs.append(offset + effects[name] + shared + 0.5 * rng.normal(size=d))
    return np.asarray(xs, dtype=np.float32), meta


def _value(res: dict, label: str) -> float:
    node = res
    for key in PATHS[label]:
        node = node[key]
    return float(node)


def endpoints(x: np.ndarray, meta: pd.DataFrame, variant: str = "plate_normalized") -> dict:
    """The four endpoints of one raw feature matrix, scored on ``variant``."""
    with threadpool_limits(limits=1):
        res = evaluate_features(x, meta, null_size=100, variants=(variant,), verbose=False)
    return {label: _value(res[variant], label) for label in ENDPOINTS}


@pytest.fixture(scope="module")
def design() -> dict:
    """Profiles, their null band and their endpoints with and without injected effects."""
    x, meta = screen()
    treat, batch = meta["treatment"].to_numpy(), meta["batch"].to_numpy()
    nulls = [
        endpoints(permute_within_treatment(x, treat, 100 + i), meta)
        for i in range(NULL_PERMUTATIONS)
    ]
    band = {}
    for label in ENDPOINTS:
        vals = np.array([n[label] for n in nulls])
        band[label] = (vals.mean(), max(BAND_SDS * vals.std(ddof=1), MIN_BAND))
    effect = median_treatment_effect(x, treat, meta["is_control"].to_numpy())
    units = unit_amounts(x, batch, effect, seed=0)
    shifted = inject_shift(x, batch, 4.0 * effect, seed=1)
    return {
        "x": x,
        "meta": meta,
        "band": band,
        "effect": effect,
        "clean": endpoints(x, meta),
        "mixed": endpoints(inject_mixing(x, batch, 4.0 * units["mixing"], seed=2), meta),
        "shifted": endpoints(shifted, meta),
        "shifted_raw": endpoints(shifted, meta, "raw"),
        "clean_raw": endpoints(x, meta, "raw"),
    }


def test_new_columns_and_directions_are_declared() -> None:
    labels = [label for label, _ in COLUMNS]
    assert labels[-4:] == list(ENDPOINTS)
    for label, sign in ENDPOINTS.items():
        assert (label in LOWER_IS_BETTER) == (sign > 0), label
        assert dict(COLUMNS)[label] == PATHS[label]
    assert "−" in labels[-4] and "\u2212" in labels[-4]


def test_no_batch_signal_lies_within_the_null_band(design) -> None:
    for label, value in design["clean"].items():
        centre, half = design["band"][label]
        assert abs(value - centre) <= half, (label, value, centre, half)
    # The penalty is about 0 with no batch effect: the positives are matched in number.
    assert abs(design["band"]["retrieval penalty (same − other batch)"][0]) < 0.02


def test_feature_mixing_before_normalisation_moves_every_endpoint(design) -> None:
    for label, sign in ENDPOINTS.items():
        centre, half = design["band"][label]
        moved = design["mixed"][label] - centre
        assert sign * moved > half, (label, design["mixed"][label], centre, half)


def test_additive_shift_is_removed_by_plate_normalisation(design) -> None:
    for label in ENDPOINTS:
        assert design["shifted"][label] == pytest.approx(design["clean"][label], abs=0.02)
    # ... while on the raw profiles the same shift is plain to see.
    raw, clean = design["shifted_raw"], design["clean_raw"]
    assert raw["control kBET"] < clean["control kBET"] - 0.5
    assert raw["control batch-classifier acc"] > clean["control batch-classifier acc"] + 0.5
    assert raw["retrieval penalty (same − other batch)"] > 0.2


def test_linear_classifier_is_blind_on_plate_normalised_controls(design) -> None:
    # Each plate's controls have mean 0 in every feature after standardisation: a linear
    # classifier predicts the majority batch, i.e. scores exactly its chance.
    x, meta = design["x"], design["meta"]
    batch = meta["batch"].to_numpy()
    mixed = inject_mixing(x, batch, 4.0 * unit_amounts(x, batch, design["effect"], 0)["mixing"], 2)
    xn = plate_normalize(mixed, meta)
    ctrl = meta["is_control"].to_numpy()
    with threadpool_limits(limits=1):
        clf = grouped_batch_classifier(xn[ctrl], batch[ctrl], meta.loc[ctrl, "plate"])
    assert clf["linear_accuracy"] == pytest.approx(clf["chance"], abs=1e-9)
    assert clf["accuracy"] > clf["chance"] + 0.3
    assert clf["n_folds"] == 5 and clf["n_samples"] == 96 and clf["n_batches"] == 6


def test_control_mixing_result_and_not_computable(design) -> None:
    x, meta = design["x"], design["meta"]
    res = control_mixing(x, meta)
    assert res["n_controls"] == 96 and res["n_batches"] == 6
    assert set(res["batch_classifier"]) >= {"accuracy", "chance", "n_folds"}
    one = meta["batch"].isin(["B0"]).to_numpy()
    assert "not_computable" in control_mixing(x[one], meta.loc[one])
    # One plate per batch: no batch can be tested on a plate it was not trained on.
    half = (meta["plate"].str.endswith("P0")).to_numpy()
    clf = control_mixing(x[half], meta.loc[half])["batch_classifier"]
    assert "not_computable" in clf and "2 plates" in clf["not_computable"]


def test_retrieval_penalty_matches_positives_and_reports_per_treatment(design) -> None:
    x, meta = design["x"], design["meta"]
    assert same_batch_rule(meta)[0] == ("plate",)
    plain, aware, pen = replicate_maps_with_penalty(x, meta, null_size=100)
    assert pen["n_treatments"] == 12 and set(pen["per_treatment"]) == {f"c{t}" for t in range(12)}
    assert pen["mean"] == pytest.approx(np.mean(list(pen["per_treatment"].values())))
    assert plain["n_groups"] == aware["n_groups"] == 12
    # Exact expectation over the m-subsets of the positives (no ties here).
    rng = np.random.default_rng(3)
    kp, kn = rng.random(6), np.sort(rng.random(9))
    every = [_expected_ap(np.array(c), kn) for c in itertools.combinations(kp, 2)]
    assert matched_ap(kp, kn, 2) == pytest.approx(np.mean(every), abs=1e-12)
    # No treatment in two batches: not computable, said so.
    one = meta["batch"].isin(["B0"]).to_numpy()
    _, _, none = replicate_maps_with_penalty(x[one], meta.loc[one], null_size=100)
    assert none["not_computable"].startswith("not computable on this design")


def test_small_treatments_get_no_per_treatment_kbet(design) -> None:
    # 24 wells per compound < 3 k0 = 30: a split compound would score 0 however well its
    # batches mix, so per-treatment kBET leaves it out and says why instead of reporting 0.
    x, meta = design["x"], design["meta"]
    batch, treat = meta["batch"].to_numpy(), meta["treatment"].to_numpy()
    split = x + 6.0 * pd.factorize(batch)[0][:, None].astype(np.float32)
    mix = mixing_per_treatment(split, batch, treat)
    assert math.isnan(mix["kbet"]) and mix["kbet"] != 0.0
    assert mix["kbet_note"].startswith("not computable on this design")
    assert mix["n_kbet_not_computable"] == 12
    assert all(math.isnan(v["kbet"]) for t, v in mix["per_treatment"].items() if t != "DMSO")
    # Large enough treatments are still scored (and a batch split still scores low).
    twice = np.concatenate([split, split + 0.01])
    mix2 = mixing_per_treatment(twice, np.concatenate([batch, batch]), np.concatenate([treat] * 2))
    assert mix2["kbet_n"] == 13 and mix2["kbet"] < 0.5


@pytest.fixture(scope="module")
def calibration(design) -> dict:
    x, meta = design["x"], design["meta"]
    return calibrate(
        x,
        meta,
        null_draws=5,
        strengths=(1.0, 4.0),
        injections=("shift", "power", "mixing", "rotation"),
        null_size=100,
        seed=0,
    )


def test_calibration_gives_power_null_sd_and_draws_per_variant(calibration) -> None:
    cal = calibration
    assert set(cal["variants"]) == {"raw", "plate_normalized"}
    assert cal["no_power"] == cal["no_power_by_variant"]["raw"]  # the earlier field, kept
    assert cal["metrics"] is cal["variants"]["raw"]["metrics"]
    for variant in ("raw", "plate_normalized"):
        metrics = cal["variants"][variant]["metrics"]
        for label in ENDPOINTS:
            rec = metrics[label]
            assert rec["power"], (variant, label, rec.get("reason"))
            assert rec["null_draws"] == 5 and math.isfinite(rec["null_sd"])
            assert label not in cal["no_power_by_variant"][variant]
    pn = cal["variants"]["plate_normalized"]["metrics"]
    assert "shift" not in pn["control kBET"]["injected"]  # removed exactly: not scored there
    assert set(pn["control kBET"]["injected"]) == {"power", "mixing", "rotation"}
    # Unchanged readers: the table (per variant) and the aggregate's left-out components.
    table = calibration_table(cal, "plate_normalized")
    assert {"null", "null SD", "null draws", "mixing 4x", "power"} <= set(table.columns)
    assert set(calibration_table(cal)["metric"]) == {label for label, _, _ in CALIBRATED}
    assert isinstance(left_out_components(cal, "plate_normalized"), dict)


def test_aggregate_leaves_out_per_variant(calibration) -> None:
    cal = {
        "no_power": [],
        "metrics": {},
        "variants": {
            "raw": {"metrics": {}, "no_power": []},
            "plate_normalized": {
                "metrics": {"graph connectivity": {"null": 1.0, "reason": f"{NO_POWER}: flat"}},
                "no_power": ["graph connectivity"],
            },
        },
    }
    res = {"mixing_per_treatment": {"graph_connectivity": 1.0, "batch_silhouette": 0.5}}
    sets = {"a": {"raw": {**res, "aggregate": {}}, "plate_normalized": {**res, "aggregate": {}}}}
    apply_calibration(sets, cal)
    assert "graph_connectivity" in sets["a"]["plate_normalized"]["aggregate"]["left_out"]
    assert "left_out" not in sets["a"]["raw"]["aggregate"]


def _record(nulls: list[float], top: float) -> dict:
    return {"null_values": nulls, "injected": {"mixing": {"1": top, "4": top}}}


def test_pooled_power_decides_from_all_replicates(calibration) -> None:
    # Each replicate alone: moved 0.06 against a margin of 3 x 0.03 = 0.09, no power. Four
    # replicates: the mean shift 0.06 against 3 x 0.03 / 2 = 0.045: power.
    nulls = [0.47, 0.50, 0.53, 0.50, 0.47, 0.53]  # SD 0.027
    rep = {"variants": {"plate_normalized": {"metrics": {"m": _record(nulls, 0.56)}}}}
    one = pooled_power([rep])
    assert one["variants"]["plate_normalized"]["m"]["power"] is False
    assert "no power" in one["variants"]["plate_normalized"]["m"]["reason"]
    four = pooled_power([rep] * 4)
    rec = four["variants"]["plate_normalized"]["m"]
    assert rec["power"] and rec["n_replicates"] == 4
    assert rec["mean_shift"]["mixing"] == pytest.approx(0.06)
    # A replicate where the metric is not computable leaves the decision to the others.
    failed = {"variants": {"plate_normalized": {"metrics": {"m": _record([math.nan] * 6, 0.5)}}}}
    assert pooled_power([rep] * 4 + [failed])["variants"]["plate_normalized"]["m"]["power"]
    # Real calibrations pool too: the endpoints keep their power on the normalised variant.
    pooled = pooled_power([calibration, calibration])
    assert not set(ENDPOINTS) & set(pooled["no_power_by_variant"]["plate_normalized"])
    assert pooled["n_replicates"] == 2 and "sqrt" in pooled["rule"]


def test_power_injection_keeps_order_within_batch(design) -> None:
    x, meta = design["x"], design["meta"]
    out, powers = inject_power(x, meta["batch"].to_numpy(), math.log(2.0), seed=0)
    assert min(powers) == pytest.approx(0.5) and max(powers) == pytest.approx(2.0)
    rows = (meta["batch"] == "B0").to_numpy()
    np.testing.assert_array_equal(np.argsort(x[rows, 0]), np.argsort(out[rows, 0]))
