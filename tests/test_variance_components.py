"""REML variance components of nested designs (cdcl.metrics.variance_components)."""

from __future__ import annotations

import numpy as np
import pytest

from cdcl.metrics import variance_components as vc

# Balanced design: 40 batches x 2 plates x 3 wells x 5 cells = 1,200 rows.
N_BATCH, N_PLATE, N_WELL, N_CELL = 40, 2, 3, 5
FEATURES = 8


def _design() -> dict[str, np.ndarray]:
    n = N_BATCH * N_PLATE * N_WELL * N_CELL
    row = np.arange(n)
    return {
        "batch": row // (N_PLATE * N_WELL * N_CELL),
        "plate": row // (N_WELL * N_CELL) % N_PLATE,  # plate 0/1 within each batch
        "well": row // N_CELL % N_WELL,  # well 0/1/2 within each plate
    }


def _simulate(var: dict[str, float], seed: int) -> np.ndarray:
    """FEATURES independent features with the given component variances."""
    rng = np.random.default_rng(seed)
    codes = vc.nested_codes(_design())
    cols = []
    for _ in range(FEATURES):
        y = rng.normal(scale=np.sqrt(var["residual"]), size=len(codes["batch"]))
        for f in ("batch", "plate", "well"):
            y += rng.normal(scale=np.sqrt(var[f]), size=codes[f].max() + 1)[codes[f]]
        cols.append(y)
    return np.stack(cols, axis=1)


def _anova_se(var: dict[str, float]) -> dict[str, float]:
    """Standard error of each ANOVA variance estimate in this balanced design (REML equals
    ANOVA here when no estimate is negative): difference of two mean squares, each with
    variance 2 E[MS]^2 / df, over the number of rows per level."""
    ems_e = var["residual"]
    ems_w = ems_e + N_CELL * var["well"]
    ems_p = ems_w + N_CELL * N_WELL * var["plate"]
    ems_b = ems_p + N_CELL * N_WELL * N_PLATE * var["batch"]
    df_b = N_BATCH - 1
    df_p = N_BATCH * (N_PLATE - 1)
    df_w = N_BATCH * N_PLATE * (N_WELL - 1)
    df_e = N_BATCH * N_PLATE * N_WELL * (N_CELL - 1)

    def se(ems_hi: float, df_hi: int, ems_lo: float, df_lo: int, k: int) -> float:
        return float(np.sqrt(2 * (ems_hi**2 / df_hi + ems_lo**2 / df_lo)) / k)

    return {
        "batch": se(ems_b, df_b, ems_p, df_p, N_CELL * N_WELL * N_PLATE),
        "plate": se(ems_p, df_p, ems_w, df_w, N_CELL * N_WELL),
        "well": se(ems_w, df_w, ems_e, df_e, N_CELL),
        "residual": float(np.sqrt(2 * ems_e**2 / df_e)),
    }


def _fits(y: np.ndarray) -> list[dict[str, float]]:
    codes = vc.nested_codes(_design())
    fits = [vc.fit_feature(y[:, j], codes) for j in range(y.shape[1])]
    assert all(f["converged"] for f in fits)
    return fits


def _mean(fits: list[dict[str, float]]) -> dict[str, float]:
    return {c: float(np.mean([f[c] for f in fits])) for c in ("batch", "plate", "well", "residual")}


def test_reml_recovers_known_components() -> None:
    # Distinct variances, so a component read from the wrong slot falls outside its band
    # (e.g. plate and well swapped: 0.25 and 0.5 against bands of about 0.5 +- 0.21 and
    # 0.25 +- 0.07).
    truth = {"batch": 1.0, "plate": 0.5, "well": 0.25, "residual": 1.0}
    got = _mean(_fits(_simulate(truth, seed=0)))
    se = _anova_se(truth)
    for c, want in truth.items():
        band = 4 * se[c] / np.sqrt(FEATURES)  # mean of FEATURES independent estimates
        assert abs(got[c] - want) <= band, (c, got[c], want, band)


def test_an_absent_component_is_estimated_near_zero() -> None:
    truth = {"batch": 1.0, "plate": 0.0, "well": 0.25, "residual": 1.0}
    fits = _fits(_simulate(truth, seed=1))
    got = _mean(fits)
    se = _anova_se(truth)
    assert 0.0 <= got["plate"] <= 4 * se["plate"] / np.sqrt(FEATURES), got["plate"]
    assert abs(got["well"] - 0.25) <= 4 * se["well"] / np.sqrt(FEATURES)
    # as a share of the total variance (2.25): the band above is 0.053 / 2.25 = 0.024
    plate_share = np.median([vc.shares(f)["plate"] for f in fits])
    assert plate_share < 0.02 and np.median([vc.shares(f)["well"] for f in fits]) > 0.05


def test_shares_do_not_depend_on_feature_scale() -> None:
    y = _simulate({"batch": 0.5, "plate": 0.2, "well": 0.1, "residual": 1.0}, seed=2)[:, :2]
    a = vc.variance_components(y, _design(), ["a", "b"])
    b = vc.variance_components(y * [100.0, 0.01] + 7.0, _design(), ["a", "b"])
    for name in ("a", "b"):
        for c, share in a["per_feature"][name]["share"].items():
            assert b["per_feature"][name]["share"][c] == pytest.approx(share, abs=1e-4)
    assert sum(a["per_feature"]["a"]["share"].values()) == pytest.approx(1.0)
    assert a["components"] == ["batch", "plate", "well", "residual"]


def test_design_table_says_what_the_design_cannot_separate() -> None:
    # LINCS: 2 batches (1 and 4 plates), 2 wells per plate
    plates = np.repeat(["p1", "p2", "p3", "p4", "p5"], 2)
    lincs = vc.design_table(
        {"batch": np.where(plates == "p1", "b1", "b3"), "plate": plates, "well": ["A", "J"] * 5}
    )
    assert lincs["batch"] == {"levels": 2, "df": 1, "fitted": False, "in": "plate"}
    assert lincs["plate"] == {"levels": 5, "df": 3, "fitted": True, "in": "plate"}
    assert lincs["well"] == {"levels": 10, "df": 5, "fitted": True, "in": "well"}
    # BBBC021 week 4: one week, 6 plates with one DMSO well each
    six = np.arange(6)
    bbbc = vc.design_table({"batch": ["week4"] * 6, "plate": six, "well": ["B02"] * 6})
    assert bbbc["batch"]["in"] is None and not bbbc["batch"]["fitted"]
    assert bbbc["plate"]["fitted"] and bbbc["well"] == {
        "levels": 6,
        "df": 0,
        "fitted": False,
        "in": "plate",
    }
    # a plate per batch and two batches: neither separable from the wells below
    same = vc.design_table({"batch": [0, 0, 1, 1], "plate": [0, 0, 1, 1], "well": [0, 1, 2, 3]})
    assert same["batch"]["in"] == "well" and same["plate"]["in"] == "well"
    assert same["well"]["fitted"]


def test_nothing_fitted_leaves_the_variance_as_residual() -> None:
    y = np.array([1.0, 2.0, 4.0, 7.0])
    r = vc.variance_components(y[:, None], {"batch": [0] * 4, "plate": [0] * 4}, ["f"])
    assert r["components"] == ["residual"]
    assert r["per_feature"]["f"]["share"] == {"residual": 1.0}
    assert vc.fit_feature(y, {})["residual"] == pytest.approx(np.var(y, ddof=1))
