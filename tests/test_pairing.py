"""Partner index (cross-batch and same-batch pairing) and the training dataset that uses it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from cdcl.data.dataset_dir import open_dataset
from cdcl.data.pairing import PartnerIndex
from cdcl.data.training_set import TrainingSet
from cdcl.data.views import ViewsConfig


def _table() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """t0 in 3 batches (10/5/15 images), DMSO in 3 batches, t3 only in b1, t4 a singleton."""
    rows = (
        [("t0", "b0")] * 10
        + [("t0", "b1")] * 5
        + [("t0", "b2")] * 15
        + [("DMSO", b) for b in ("b0", "b1", "b2") for _ in range(4)]
        + [("t3", "b1")] * 3
        + [("t4", "b2")]
    )
    t = np.array([r[0] for r in rows])
    b = np.array([r[1] for r in rows])
    # Training rows are a non-contiguous subset of image indices (e.g. after a split).
    idx = np.arange(len(rows)) * 3 + 7
    return t, b, idx


def test_partners_same_treatment_other_batch_and_fallback() -> None:
    t, b, idx = _table()
    pi = PartnerIndex(t, b, idx)
    by_image = {int(i): (tt, bb) for i, tt, bb in zip(idx, t, b)}
    rng = np.random.default_rng(0)
    for _ in range(20):
        j, fb = pi.partners(idx, rng)
        for i, jj, f in zip(idx, j, fb):
            ti, bi = by_image[int(i)]
            tj, bj = by_image[int(jj)]
            assert tj == ti  # controls pair with controls, treatments with themselves
            if ti in ("t3", "t4"):
                assert f and bj == bi
                if ti == "t3":
                    assert jj != i  # another image of the same batch when one exists
                else:
                    assert jj == i  # a singleton can only pair with itself
            else:
                assert not f and bj != bi
    assert pi.fallback_treatments == ["t3", "t4"]
    assert pi.fallback_count == 20 * 4  # 3 images of t3 + 1 of t4, per round
    assert pi.n_draws == 20 * len(idx)


def test_partner_uniform_over_images() -> None:
    t, b, idx = _table()
    pi = PartnerIndex(t, b, idx)
    a = int(idx[0])  # t0 in b0: candidates are the 5 + 15 t0 images of b1 and b2
    rng = np.random.default_rng(1)
    draws, _ = pi.partners(np.full(20000, a), rng)
    counts = Counter(draws.tolist())
    candidates = [int(i) for i, tt, bb in zip(idx, t, b) if tt == "t0" and bb != "b0"]
    assert sorted(counts) == sorted(candidates)
    obs = np.array([counts[c] for c in candidates])
    assert chisquare(obs).pvalue > 1e-3
    # Uniform over images, not batches: b2 holds 15 of the 20 candidates.
    frac_b2 = sum(counts[c] for c in candidates[5:]) / 20000
    assert frac_b2 == pytest.approx(0.75, abs=0.02)


def test_partner_scalar_matches_vectorised_and_rejects_unknown() -> None:
    t, b, idx = _table()
    pi = PartnerIndex(t, b, idx)
    i = int(idx[12])
    j1, fb1 = pi.partner(i, np.random.default_rng(5))
    j2, fb2 = pi.partners(np.array([i]), np.random.default_rng(5))
    assert (j1, fb1) == (int(j2[0]), bool(fb2[0]))
    with pytest.raises(KeyError):
        pi.partner(8, np.random.default_rng(0))  # not a training row


def test_same_batch_partners_stay_in_the_batch_and_share_the_treatment() -> None:
    """CDCL-same-batch's pairing: another image of the treatment in the image's own batch."""
    t, b, idx = _table()
    pi = PartnerIndex(t, b, idx, pairing="same_batch")
    by_image = {int(i): (tt, bb) for i, tt, bb in zip(idx, t, b)}
    rng = np.random.default_rng(0)
    for _ in range(20):
        j, fb = pi.partners(idx, rng)
        for i, jj, f in zip(idx, j, fb):
            assert by_image[int(jj)] == by_image[int(i)]  # same treatment, same batch
            alone = by_image[int(i)] == ("t4", "b2")  # the only image of t4 in b2
            assert f == alone and (jj == i) == alone  # itself only when it is alone
    # t3 lives in one batch only: that is no fallback here (its 3 images pair with each other).
    assert pi.fallback_treatments == ["t4"]
    assert pi.fallback_count == 20 and pi.n_draws == 20 * len(idx)


def test_same_batch_partner_uniform_over_the_other_images_of_the_batch() -> None:
    t, b, idx = _table()
    pi = PartnerIndex(t, b, idx, pairing="same_batch")
    a = int(idx[3])  # t0 in b0: candidates are the other 9 t0 images of b0
    draws, fell_back = pi.partners(np.full(9000, a), np.random.default_rng(2))
    counts = Counter(draws.tolist())
    candidates = [int(i) for i, tt, bb in zip(idx, t, b) if (tt, bb) == ("t0", "b0") and i != a]
    assert sorted(counts) == sorted(candidates) and not fell_back.any()
    assert chisquare([counts[c] for c in candidates]).pvalue > 1e-3


def test_unknown_pairing_is_refused() -> None:
    t, b, idx = _table()
    with pytest.raises(ValueError, match="pairing `other_plate` unknown"):
        PartnerIndex(t, b, idx, pairing="other_plate")


def _training_set(
    path: Path, kind: str, cross: bool, seed: int = 0, pairing: str = "cross_batch", **views
) -> TrainingSet:
    ds = open_dataset(path)
    s = ds.samples
    rows = np.flatnonzero(s["batch"].to_numpy() != "b2")  # train on b0 and b1
    label_of = {t: k for k, t in enumerate(sorted(s["treatment"].unique()))}
    batch_of = {"b0": 0, "b1": 1}
    return TrainingSet(
        ds, rows, label_of, batch_of, ViewsConfig(**views), kind, cross, seed, pairing=pairing
    )


@pytest.mark.parametrize("pairing", ["cross_batch", "same_batch"])
def test_training_set_partners_by_pairing(random_dataset: Path, pairing: str) -> None:
    """Over every item and several epochs: CDCL's partners always leave the image's batch,
    CDCL-same-batch's never do; both share the image's treatment and are another image."""
    ts = _training_set(random_dataset, "dino", cross=True, pairing=pairing)
    s = ts.dataset.samples
    for epoch in range(3):
        ts.set_epoch(epoch)
        for k in range(len(ts)):
            item = ts[k]
            i, j = item["index"], item["partner_index"]
            assert s.treatment[i] == s.treatment[j] and i != j and not item["fell_back"]
            same = s.batch[i] == s.batch[j]
            assert same == (pairing == "same_batch")
            assert (item["batch_id"] == item["partner_batch_id"]) == same
            assert np.array_equal(item["images"][1], ts.dataset.read(j))
    assert ts.fallback_count == 0 and ts.fallback_treatments == []


def test_training_set_items(random_dataset: Path) -> None:
    ts = _training_set(random_dataset, "dino", cross=True)
    assert len(ts) == 20
    s = ts.dataset.samples
    for k in range(len(ts)):
        item = ts[k]
        assert item["images"].shape == (2, 5, 16, 16) and item["images"].dtype == np.uint8
        assert len(item["view_params"]["box"]) == 8
        i, j = item["index"], item["partner_index"]
        assert np.array_equal(item["images"][1], ts.dataset.read(j))
        assert s.treatment[i] == s.treatment[j] and s.batch[i] != s.batch[j]
        assert item["batch_id"] != item["partner_batch_id"]
        assert not item["fell_back"]
    batch = ts.batch([0, 1, 2])
    assert all(v.dtype == torch.float32 for v in batch["views"])
    assert [tuple(v.shape) for v in batch["views"]] == [(3, 5, 14, 14)] * 2 + [(3, 5, 7, 7)] * 6
    assert "images" not in batch
    assert batch["batch_id"].dtype == torch.int64


def test_training_set_is_deterministic_per_seed_epoch_item(random_dataset: Path) -> None:
    a = _training_set(random_dataset, "byol", cross=True, seed=3)
    b = _training_set(random_dataset, "byol", cross=True, seed=3)
    for k in (0, 7, 19):
        va, vb = a.batch([k]), b.batch([k])
        assert va["partner_index"] == vb["partner_index"]
        assert all(torch.equal(x, y) for x, y in zip(va["views"], vb["views"]))
    b.set_epoch(1)
    diff = [not torch.equal(a.batch([k])["views"][0], b.batch([k])["views"][0]) for k in range(5)]
    assert all(diff)


def test_training_set_standardisation_matches_dataset(random_dataset: Path) -> None:
    # No augmentation, full-image crop: the single view equals Dataset.standardized.
    ts = _training_set(
        random_dataset,
        "single",
        cross=False,
        global_size=16,
        global_scale=(1.0, 1.0),
        crop_ratio=(1.0, 1.0),
        flip_p=0.0,
        rot90_p=0.0,
        jitter_p_global=0.0,
    )
    item = ts.batch([4])
    ref = ts.dataset.standardized([int(item["index"][0])])[0]
    assert len(item["views"]) == 1
    assert np.allclose(item["views"][0][0].numpy(), ref, atol=1e-4)
    assert item["partner_index"] == item["index"] and item["partner_batch_id"] == item["batch_id"]
