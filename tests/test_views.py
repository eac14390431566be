"""Views and augmentations on tensors of any channel count."""

from __future__ import annotations

import pytest
import torch

from cdcl.data.views import (
    ViewsConfig,
    center_view,
    intensity_jitter,
    make_views,
    random_flip_rot90,
    random_resized_crop,
)


def test_resolved_sizes_scale_with_image() -> None:
    r = ViewsConfig().resolved(256)
    assert (r.global_size, r.local_size) == (224, 112)
    r = ViewsConfig().resolved(64)
    assert (r.global_size, r.local_size) == (56, 28)
    r = ViewsConfig(resize=128).resolved(64)  # the resized size is what counts
    assert (r.global_size, r.local_size) == (112, 56)
    r = ViewsConfig(global_size=40).resolved(64)  # explicit sizes are kept
    assert (r.global_size, r.local_size) == (40, 28)


@pytest.mark.parametrize("channels", [5, 3])
def test_view_shapes_and_order(channels: int) -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(channels, 64, 64)
    b = torch.rand(channels, 64, 64)
    cfg = ViewsConfig().resolved(64)
    views = make_views(a, b, cfg, "dino", gen)
    assert len(views) == 8 == cfg.n_views("dino")
    assert [tuple(v.shape) for v in views] == [(channels, 56, 56)] * 2 + [(channels, 28, 28)] * 6
    assert [tuple(v.shape) for v in make_views(a, b, cfg, "byol", gen)] == [(channels, 56, 56)] * 2
    assert len(make_views(a, None, cfg, "single", gen)) == 1
    # View order: global(A), global(B), locals(A), locals(B). A is all ones, B all zeros
    # (no jitter, no standardisation) so every view reveals its source.
    quiet = ViewsConfig(jitter_p_global=0.0, jitter_p_local=0.0).resolved(64)
    ones, zeros = torch.ones(channels, 64, 64), torch.zeros(channels, 64, 64)
    src = [float(v.mean()) for v in make_views(ones, zeros, quiet, "dino", gen)]
    assert src == pytest.approx([1, 0, 1, 1, 1, 0, 0, 0])
    with pytest.raises(ValueError):
        make_views(a, b, cfg, "simclr", gen)


def test_views_are_reproducible_from_the_generator() -> None:
    a = torch.rand(5, 32, 32)
    cfg = ViewsConfig().resolved(32)
    v1 = make_views(a, None, cfg, "dino", torch.Generator().manual_seed(7))
    v2 = make_views(a, None, cfg, "dino", torch.Generator().manual_seed(7))
    v3 = make_views(a, None, cfg, "dino", torch.Generator().manual_seed(8))
    assert all(torch.equal(x, y) for x, y in zip(v1, v2))
    assert not all(torch.equal(x, y) for x, y in zip(v1, v3))


def test_flips_and_rotations_preserve_pixel_multiset() -> None:
    img = torch.arange(3 * 8 * 8, dtype=torch.float32).reshape(3, 8, 8)
    changed = 0
    for seed in range(20):
        out = random_flip_rot90(img, 0.5, 0.5, torch.Generator().manual_seed(seed))
        assert out.shape == img.shape
        assert torch.equal(out.flatten().sort().values, img.flatten().sort().values)
        # Channels move together: each channel keeps its own values.
        for c in range(3):
            assert torch.equal(out[c].flatten().sort().values, img[c].flatten().sort().values)
        changed += not torch.equal(out, img)
    assert changed >= 15  # P(identity) = 0.5 · 0.5 · 0.5 = 1/8


def test_jitter_statistics() -> None:
    gen = torch.Generator().manual_seed(0)
    ones = torch.ones(5, 2, 2)
    vals = torch.stack([intensity_jitter(ones, 1.0, 0.1, 0.1, gen)[:, 0, 0] for _ in range(4000)])
    # a_c·1 + b_c ~ N(1, 0.1² + 0.1²), independently per channel.
    assert float(vals.mean()) == pytest.approx(1.0, abs=0.01)
    assert float(vals.std()) == pytest.approx(0.1414, abs=0.01)
    assert float(torch.corrcoef(vals.T)[0, 1].abs()) < 0.1
    zeros = torch.zeros(5, 2, 2)  # on 0: only the offset b ~ N(0, 0.1²)
    offs = torch.stack([intensity_jitter(zeros, 1.0, 0.1, 0.1, gen)[:, 0, 0] for _ in range(4000)])
    assert float(offs.std()) == pytest.approx(0.1, abs=0.008)
    applied = [
        not torch.equal(intensity_jitter(ones, 0.5, 0.1, 0.1, gen), ones) for _ in range(2000)
    ]
    assert sum(applied) / 2000 == pytest.approx(0.5, abs=0.05)


def test_random_resized_crop_full_and_zoom_out() -> None:
    img = torch.rand(4, 16, 16)
    same = random_resized_crop(img, 16, (1.0, 1.0), (1.0, 1.0), torch.Generator().manual_seed(0))
    assert torch.equal(same, img)
    for seed in range(10):
        out = random_resized_crop(img, 12, (1.2, 1.4), gen=torch.Generator().manual_seed(seed))
        assert out.shape == (4, 12, 12)
        # Zoom-out fills with mirrored pixels: interpolation stays within the image's range.
        assert float(out.min()) >= float(img.min()) - 1e-6
        assert float(out.max()) <= float(img.max()) + 1e-6
    # A zoom-out window of 1.21× area (ratio 1) shows the whole image plus a mirrored margin.
    big = random_resized_crop(
        torch.arange(16.0).reshape(1, 4, 4),
        5,
        (25 / 16, 25 / 16),
        (1.0, 1.0),
        torch.Generator().manual_seed(0),
    )
    assert big.shape == (1, 5, 5)
    assert set(big.flatten().tolist()) <= set(range(16))


def test_standardisation_uses_the_given_plate_stats() -> None:
    a = torch.full((3, 32, 32), 0.4)
    b = torch.full((3, 32, 32), 0.8)
    cfg = ViewsConfig(jitter_p_global=0.0, jitter_p_local=0.0).resolved(32)
    norm_a = (torch.full((3,), 0.4), torch.full((3,), 0.1))
    norm_b = (torch.full((3,), 0.6), torch.full((3,), 0.1))
    views = make_views(a, b, cfg, "dino", torch.Generator(), norm_a=norm_a, norm_b=norm_b)
    assert torch.allclose(views[0], torch.zeros_like(views[0]), atol=1e-5)
    assert torch.allclose(views[1], torch.full_like(views[1], 2.0), atol=1e-5)


@pytest.mark.parametrize("unit", ["plate_std", "range"])
def test_jitter_offset_unit(unit: str) -> None:
    # Zero image, no gain: a standardised view is (b_c - mean_c) / std_c. With offsets in units
    # of the plate's control std (default) their spread after standardisation is offset_std;
    # with the seed's [0, 1]-range units it is offset_std / std_c (here 0.1 / 0.02 = 5).
    img = torch.zeros(2, 8, 8)
    norm = (torch.zeros(2), torch.tensor([0.02, 0.02]))
    cfg = ViewsConfig(
        jitter_p_global=1.0, jitter_gain_std=0.0, jitter_offset_unit=unit, n_local=0
    ).resolved(8)
    gen = torch.Generator().manual_seed(1)
    vals = torch.stack(
        [make_views(img, None, cfg, "byol", gen, norm_a=norm)[0][:, 0, 0] for _ in range(2000)]
    )
    expected = 0.1 if unit == "plate_std" else 5.0
    assert float(vals.std()) == pytest.approx(expected, rel=0.08)


def test_center_view() -> None:
    img = torch.arange(2 * 64 * 64, dtype=torch.float32).reshape(2, 64, 64)
    cfg = ViewsConfig()
    out = center_view(img, cfg)  # global 56 of 64: rows/cols 4..59
    assert out.shape == (2, 56, 56)
    assert torch.equal(out, img[:, 4:60, 4:60])
    batch = center_view(img[None].repeat(3, 1, 1, 1), cfg)
    assert batch.shape == (3, 2, 56, 56)
    resized = center_view(img, ViewsConfig(resize=32))
    assert resized.shape == (2, 28, 28)
