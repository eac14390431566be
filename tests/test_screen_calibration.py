"""Batch-strength calibration of the simulated screen against real references."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cli_process import cdcl
from conftest import SHARED_DATA
from scipy.stats import binom

from cdcl.data import synthetic
from cdcl.data.dataset_dir import open_dataset
from cdcl.experiments import screen_calibration as calibration

# A screen with many control fields per batch, cheap to render (32 px): 4 batches x 1 plate x
# (2 treatments + 12 controls) x 3 sites.
NULL_SCREEN = {"control_wells": 12, "moas": 1, "compounds_per_moa": 2, "test_batches": 2}


def _control_field_accuracy(strength: float) -> tuple[float, int, float]:
    """Batch accuracy on control fields' intensity statistics, folds grouped by well.

    No per-plate standardisation here: with a finite control sample it gives every plate its
    own constant shift of background-dominated statistics (p10 becomes (background - mean) / sd
    of that plate's controls), which identifies plates even when batches are alike in
    distribution (docs/calibration.md). This test is about the pixels the screen renders.
    """
    over = {**NULL_SCREEN, "batch_strength": strength}
    s = synthetic.design_samples("tiny", 0, **over)
    imgs = synthetic.render("tiny", 0, **over)
    ctrl = s["is_control"].to_numpy()
    wells = (s["plate"] + "/" + s["well"]).to_numpy()[ctrl]
    stats = calibration.image_statistics(imgs[ctrl].astype(np.float32))
    r = calibration.batch_accuracy(stats, s["batch"][ctrl], groups=wells)
    return r["accuracy"], r["n"], r["chance"]


def _null_bound(n: int, chance: float, alpha: float = 1e-3) -> float:
    # Under no batch signal, each out-of-fold prediction is right with probability `chance`
    # (equal class sizes); wells are whole within folds, so the number right is approximately
    # Binomial(n, chance), and its (1 - alpha) quantile bounds the accuracy at that level.
    return float(binom.ppf(1 - alpha, n, chance)) / n


def test_strength_zero_is_at_chance_and_strength_one_is_not() -> None:
    acc0, n, chance = _control_field_accuracy(0.0)
    assert n == 4 * 12 * 3 and chance == pytest.approx(0.25)
    bound = _null_bound(n, chance)
    assert acc0 <= bound, f"accuracy {acc0:.3f} above the null's 99.9% bound {bound:.3f}"
    acc1, _, _ = _control_field_accuracy(1.0)
    assert acc1 > bound  # the same test detects the calibrated batch effect


def test_strength_zero_makes_every_batch_alike() -> None:
    d = synthetic._design(synthetic.resolve_config("tiny", batch_strength=0.0), 0)
    for name in ("batch_gain", "batch_offset", "batch_gamma", "batch_bleed", "illumination"):
        arr = getattr(d, name)
        assert np.allclose(arr, arr[:1]), name
    assert np.allclose(d.nuisance_density, 0.0) and np.allclose(d.plate_gain, 1.0)
    truth = d.truth
    assert truth["batch_strength"] == 0.0 and truth["config"]["batch_strength"] == 0.0


def test_held_out_batches_lie_outside_the_training_range() -> None:
    d = synthetic._design(synthetic.resolve_config("small", test_batches=4), 0)
    split = np.array([d.truth["batches"][b]["split"] for b in sorted(d.truth["batches"])])
    train, test = split == "train", split == "test"
    for values in (
        np.log([n.blur for n in d.nuisance]),
        [n.density for n in d.nuisance],
        [n.edge for n in d.nuisance],
        np.log(d.batch_gamma[:, 0]),
    ):
        v = np.asarray(values)
        lo, hi = v[train].min(), v[train].max()
        assert np.all((v[test] < lo) | (v[test] > hi))


def test_adding_test_batches_leaves_training_batches_identical() -> None:
    base = synthetic.design_samples("tiny", 0)
    more = synthetic.design_samples("tiny", 0, test_batches=4)
    assert more["batch"].nunique() == base["batch"].nunique() + 2
    train = base.index[base["split"] == "train"].to_numpy()
    assert (more.loc[train, "split"] == "train").all()
    pd.testing.assert_frame_equal(base.loc[train], more.loc[train])
    a = synthetic.render("tiny", 0, indices=train)
    b = synthetic.render("tiny", 0, indices=train, test_batches=4)
    assert np.array_equal(a, b)
    # the two original test batches stay the same too
    test = base.index[base["split"] == "test"].to_numpy()
    assert np.array_equal(
        synthetic.render("tiny", 0, indices=test),
        synthetic.render("tiny", 0, indices=test, test_batches=4),
    )
    t0 = synthetic._design(synthetic.resolve_config("tiny"), 0).truth["batches"]
    t1 = synthetic._design(synthetic.resolve_config("tiny", test_batches=4), 0).truth["batches"]
    assert all(t0[b] == t1[b] for b in t0)


def test_batch_strength_recorded_and_checked(tmp_path: Path) -> None:
    out = synthetic.generate(tmp_path / "ds", "tiny", 0, batch_strength=0.5)
    truth = json.loads((out / synthetic.GROUND_TRUTH_FILE).read_text())
    assert truth["batch_strength"] == 0.5
    assert open_dataset(out).info.build["overrides"] == {"batch_strength": 0.5}
    with pytest.raises(synthetic.ConfigError, match="batch_strength"):
        synthetic.resolve_config("tiny", batch_strength=-1)
    with pytest.raises(synthetic.ConfigError, match="batch_strength"):
        synthetic.resolve_config("tiny", batch_strength="strong")


def test_image_statistics_match_their_definition() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 2, 9, 9)).astype(np.float32)
    got = calibration.image_statistics(x)
    from scipy import ndimage

    i, c = 2, 1
    plane = x[i, c]
    want = [
        plane.mean(),
        plane.std(),
        np.percentile(plane, 10),
        np.percentile(plane, 90),
        np.abs(ndimage.laplace(plane)).mean(),
    ]
    assert np.allclose(got[i, c * 5 : c * 5 + 5], want, atol=1e-5)


def test_variance_shares_recover_a_known_design() -> None:
    rng = np.random.default_rng(1)
    batch = np.repeat(np.arange(4), 50)
    treat = np.tile(np.arange(10), 20)
    y = np.stack(
        [3.0 * treat + 0.0 * batch + rng.normal(size=200), 2.0 * batch + rng.normal(size=200)],
        axis=1,
    )
    r = calibration.variance_shares(y, batch, treat)
    # feature 1: all treatment; feature 2: all batch (plus noise) -> each share about a half
    assert 0.4 < r["batch_share"] < 0.5 and 0.45 < r["treatment_share"] < 0.5


@pytest.mark.skipif(
    not (SHARED_DATA / "bbbc021_week4_singlecell").is_dir(), reason="shared BBBC021 data absent"
)
def test_real_targets_are_what_the_real_data_measure() -> None:
    m = calibration.measure_real(SHARED_DATA)
    for key, value in calibration.REAL_TARGETS["bbbc021"].items():
        assert m[key] == pytest.approx(value, abs=1e-3), key


def _measure_small(seed: int, strength: float) -> dict:
    # The fitting design (docs/calibration.md): `small` with 2 validation batches, so that 6
    # batches are measured as BBBC021 week 4 has 6 plates; held-out batches are not rendered.
    over = {"val_batches": 2, "batch_strength": strength}
    cfg = synthetic.resolve_config("small", **over)
    s = synthetic.design_samples("small", seed, **over)
    keep = np.flatnonzero(s["split"].to_numpy() != "test")
    imgs = np.zeros((len(s), 5, cfg.image_size, cfg.image_size), np.uint16)
    imgs[keep] = synthetic.render("small", seed, indices=keep, **over)
    radius = synthetic.BASE["nuc_radius_px"] * cfg.image_size / 64.0
    return calibration.measure_screen(imgs, s, synthetic.CHANNELS, radius)


@pytest.mark.slow
def test_calibrated_screen_against_the_real_targets() -> None:
    # Seed 2 was not used in the fit (seeds 0 and 1 were).
    m1 = _measure_small(2, 1.0)
    assert len(m1["batches"]) == 6
    rows = calibration.compare(m1)
    assert rows["cell_batch_accuracy_normalised"]["within"], rows
    # The well-profile measures sit near floors this design sets on its own (finite controls
    # per plate; docs/calibration.md): the calibrated nuisance moves them by less than their
    # tolerance from the same screen without batch effect, and the cell-level one by more.
    m0 = _measure_small(2, 0.0)
    for key in ("batch_share", "control_kbet"):
        assert abs(m1[key] - m0[key]) <= calibration.TOLERANCE[key], (key, m0[key], m1[key])
    key = "cell_batch_accuracy_normalised"
    assert m1[key] - m0[key] > 3 * calibration.TOLERANCE[key]


def test_study_passes_screen_options_to_its_data(tmp_path: Path) -> None:
    from cdcl.errors import CdclError
    from cdcl.experiments.study import (
        Replicate,
        StudySpec,
        _demo_spec,
        check_spec,
        data_dir,
        replicate_key,
    )

    spec = StudySpec(out=tmp_path, quick=True, seeds=(0,), test_batches=4, batch_strength=0.5)
    check_spec(spec)
    rep = Replicate(0, None)
    assert _demo_spec(spec, rep).screen == {"test_batches": 4, "batch_strength": 0.5}
    assert data_dir(spec, rep).name == "tiny-seed0-bs0.5-tb4"
    assert replicate_key(spec, rep)["screen"] == {"test_batches": 4, "batch_strength": 0.5}
    plain = StudySpec(out=tmp_path, quick=True, seeds=(0,))
    assert "screen" not in replicate_key(plain, rep) and data_dir(plain, rep).name == "tiny-seed0"
    with pytest.raises(CdclError, match="batch_strength"):
        check_spec(StudySpec(out=tmp_path, quick=True, seeds=(0,), batch_strength=-1.0))
    with pytest.raises(CdclError, match="simulated screen"):
        check_spec(StudySpec(out=tmp_path, dataset="bbbc021", seeds=(0,), test_batches=3))


def test_synth_command_reports_calibration_and_strength(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    args = ["--preset", "tiny", "--out", str(out), "--no-progress", "--batch-strength", "0"]
    run = cdcl("synth", *args, "--test-batches", "3", timeout=300)
    assert run.returncode == 0, run.stderr
    assert "batch effect x 0" in run.stdout and "cell_batch_accuracy_normalised" in run.stdout
    report = json.loads((out / calibration.CALIBRATION_FILE).read_text())
    assert report["build"] == open_dataset(out).info.build
    assert report["measured"]["batches"] == ["B01", "B02"]  # held-out B03-B05 left out
    assert set(report["comparison"]) == set(calibration.TOLERANCE)
    truth = json.loads((out / synthetic.GROUND_TRUTH_FILE).read_text())
    assert [truth["batches"][b]["split"] for b in sorted(truth["batches"])] == [
        "train",
        "train",
        "test",
        "test",
        "test",
    ]
    bad = cdcl("synth", "--out", tmp_path / "x", "--batch-strength", "-2", timeout=120)
    assert bad.returncode != 0 and "batch_strength" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "x").exists()


# ------------------------------------------------------------------------ variance components


def test_otsu_nuclear_radius_of_a_disk() -> None:
    yy, xx = np.mgrid[:41, :41]
    disk = ((yy - 20) ** 2 + (xx - 20) ** 2 <= 8**2).astype(np.float32) * 100 + 5
    crops = np.stack([disk, disk])[:, None]
    r = calibration.otsu_nuclear_radius(crops)
    assert r == pytest.approx(8.0, abs=0.3)  # a digital disk of radius 8 has area ~ pi 8^2
    cut = calibration.centre_crop(crops, 17)
    assert cut.shape == (2, 1, 17, 17) and cut[0, 0, 8, 8] == disk[20, 20]
    with pytest.raises(ValueError, match="cannot cut"):
        calibration.centre_crop(crops, 42)


def test_stretch_fields_maps_each_field_and_channel_to_8_bits() -> None:
    rng = np.random.default_rng(0)
    fields = rng.gamma(2.0, 50.0, size=(3, 2, 64, 64)).astype(np.float32) * [[[[1.0]], [[9.0]]]]
    out = calibration.stretch_fields(fields)
    assert out.min(axis=(2, 3)).max() == 0 and out.max(axis=(2, 3)).min() == 255
    assert np.array_equal(out, np.round(out))
    at_top = (out == 255).mean(axis=(2, 3))
    assert np.all(at_top < 0.002)  # only the top 0.05 % (and ties) saturate


def test_share_verdicts_follow_the_written_rule() -> None:
    assert calibration.share_within(0.08, 0.04)  # within 0.05
    assert calibration.share_within(0.30, 0.16)  # within a factor of 2
    assert not calibration.share_within(0.40, 0.16)
    assert calibration.share_verdict([0.1, 0.12], 0.08) == "matches"
    assert calibration.share_verdict([0.4, 0.5], 0.1) == "does not match"
    assert calibration.share_verdict([0.4, 0.1], 0.1) == "undecided"  # seeds disagree
    assert calibration.share_verdict([0.0, 0.5], 0.25) == "undecided"  # real within the seeds


def test_simulated_lincs_layout_has_the_lincs_design() -> None:
    from cdcl.metrics.variance_components import design_table

    crops, cells = calibration.simulated_control_cells(0, calibration.LAYOUTS["lincs"])
    design = design_table({f: cells[f] for f in calibration.FACTORS})
    assert {f: (d["levels"], d["df"], d["in"]) for f, d in design.items()} == {
        "batch": (2, 1, "plate"),
        "plate": (5, 3, "plate"),
        "well": (10, 5, "well"),
    }
    per_plate = cells.groupby("batch")["plate"].nunique().to_dict()
    assert sorted(per_plate.values()) == [1, 4]
    assert cells.groupby(["plate", "well"]).size().max() == 64
    assert crops.min() >= 0 and crops.max() <= 255  # stretched to 8 bits as the LINCS PNGs


@pytest.mark.parametrize("screen", ["lincs", "bbbc021"])
def test_real_components_are_what_the_real_data_measure(screen: str) -> None:
    folder = {"lincs": "lincs_a549_cellpainting", "bbbc021": "bbbc021_week4_singlecell"}[screen]
    if not (SHARED_DATA / folder).is_dir():
        pytest.skip(f"shared {screen} data absent")
    load = {"lincs": calibration.lincs_control_cells, "bbbc021": calibration.bbbc021_control_cells}
    channels = synthetic.CHANNELS if screen == "lincs" else calibration.BBBC021_CHANNELS
    m = calibration.measure_components(
        *load[screen](SHARED_DATA), channels, calibration.JUDGED_CHANNELS[screen]
    )
    want = calibration.REAL_COMPONENTS[screen]
    assert m["design"] == want["design"] and m["n_cells"] == want["n_cells"]
    assert m["crop_px"] == want["crop_px"] and not m["not_converged"]
    for key in ("median_share_judged", "median_share"):
        assert m[key] == pytest.approx(want[key], abs=1e-3), key


@pytest.mark.slow
def test_simulated_components_see_the_batch_effect_and_the_real_designs() -> None:
    # In its own layout (4 batches x 2 plates x 8 control wells) every component is fitted;
    # the batch component of the texture statistics (sharpness: blur and focus differ by
    # batch) is there at strength 1 and gone at strength 0.
    sharp = [f"{c}_sharpness" for c in synthetic.CHANNELS]

    def batch_share(strength: float) -> float:
        cells = calibration.simulated_control_cells(0, None, strength)
        m = calibration.measure_components(*cells, synthetic.CHANNELS, tuple(synthetic.CHANNELS))
        assert all(d["fitted"] for d in m["design"].values()) and not m["not_converged"]
        return float(np.median([m["per_feature"][f]["batch"] for f in sharp]))

    assert batch_share(0.0) < 0.01 < 0.03 < batch_share(1.0)
    # in the LINCS layout the fitted design is LINCS's, and the verdicts are the written ones
    lay = calibration.LAYOUTS["lincs"]
    cells = calibration.simulated_control_cells(0, lay)
    m = calibration.measure_components(*cells, synthetic.CHANNELS, ("DNA",))
    rows = calibration.compare_components(calibration.REAL_COMPONENTS["lincs"], [m])
    assert rows["same_design"] and rows["batch"]["verdict"].startswith("not identifiable")
    assert {rows[f]["verdict"] for f in ("plate", "well")} <= {
        "matches",
        "does not match",
        "undecided",
    }
