"""Batched views checked against their specification (docs/design.md §4) over many draws."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from cdcl.data.dataset_dir import open_dataset
from cdcl.data.training_set import TrainingSet
from cdcl.data.views import (
    ViewsConfig,
    batch_views,
    center_view,
    draw_view_params,
    view_slots,
)

RESAMPLERS = ["slices", "matmul"]
QUIET = {"flip_p": 0.0, "rot90_p": 0.0, "jitter_p_global": 0.0, "jitter_p_local": 0.0}


def _params(cfg: ViewsConfig, kind: str, hw: tuple[int, int], c: int, seeds) -> dict:
    """Draws for one item per seed, stacked as a loader batch carries them."""
    ps = [draw_view_params(cfg, kind, hw, c, torch.Generator().manual_seed(s)) for s in seeds]
    return {k: torch.stack([p[k] for p in ps]) for k in ps[0]}


def _views(
    images: torch.Tensor, cfg: ViewsConfig, kind: str, seeds, mean=None, std=None, resampler=None
):
    """batch_views of (B, 2, C, H, W) stored pixels; plate mean 0 and std 1 unless given."""
    n, _, c, h, w = images.shape
    mean = torch.zeros(n, 2, c) if mean is None else mean
    std = torch.ones(n, 2, c) if std is None else std
    hw = (int(cfg.resize), int(cfg.resize)) if cfg.resize else (h, w)
    params = _params(cfg, kind, hw, c, seeds)
    return batch_views(images, mean, std, params, cfg, kind, 65535.0, resampler), params


def _all_draws(cfg: ViewsConfig, n: int, hw=(64, 64), c: int = 3) -> dict:
    return _params(cfg, "dino", hw, c, range(n))


def test_resolved_sizes_scale_with_image() -> None:
    r = ViewsConfig().resolved(256)
    assert (r.global_size, r.local_size) == (224, 112)
    r = ViewsConfig().resolved(64)
    assert (r.global_size, r.local_size) == (56, 28)
    r = ViewsConfig(resize=128).resolved(64)  # the resized size is what counts
    assert (r.global_size, r.local_size) == (112, 56)
    r = ViewsConfig(global_size=40).resolved(64)  # explicit sizes are kept
    assert (r.global_size, r.local_size) == (40, 28)


@pytest.mark.parametrize("resampler", RESAMPLERS)
@pytest.mark.parametrize("channels", [5, 3])
def test_view_shapes_and_order(channels: int, resampler: str) -> None:
    # A is all 100, B all 200 (plate mean 0, std 1, no jitter): every view reveals its source.
    images = (
        torch.stack([torch.full((channels, 64, 64), 100), torch.full((channels, 64, 64), 200)])
        .to(torch.uint16)[None]
        .repeat(2, 1, 1, 1, 1)
    )
    cfg = ViewsConfig(jitter_p_global=0.0, jitter_p_local=0.0).resolved(64)
    views, _ = _views(images, cfg, "dino", [0, 1], resampler=resampler)
    assert len(views) == 8 == cfg.n_views("dino")
    shapes = [tuple(v.shape) for v in views]
    assert shapes == [(2, channels, 56, 56)] * 2 + [(2, channels, 28, 28)] * 6
    assert all(v.dtype == torch.float32 for v in views)
    src = [float(v.mean()) for v in views]  # docs/design.md §4: global A, global B, 3 x A, 3 x B
    assert src == pytest.approx([100, 200, 100, 100, 100, 200, 200, 200])
    byol, _ = _views(images, cfg, "byol", [0, 1], resampler=resampler)
    assert [float(v.mean()) for v in byol] == pytest.approx([100, 200])
    assert [tuple(v.shape) for v in byol] == [(2, channels, 56, 56)] * 2
    single, _ = _views(images, cfg, "single", [0, 1], resampler=resampler)
    assert len(single) == 1 and float(single[0].mean()) == pytest.approx(100)
    with pytest.raises(ValueError):
        view_slots(cfg, "simclr")


def test_crop_area_aspect_ratio_and_placement() -> None:
    cfg = ViewsConfig().resolved(64)
    p = _all_draws(cfg, 1500)
    box = p["box"].reshape(-1, 4).double()
    is_global = torch.tensor([g for _, g in view_slots(cfg, "dino")]).repeat(1500)
    top, left, h, w = box.unbind(1)
    area = h * w / 64**2
    ratio = w / h
    # Integer rounding of the window sides moves area and ratio by at most ~1/side each.
    for sel, (lo, hi) in ((is_global, cfg.global_scale), (~is_global, cfg.local_scale)):
        a = area[sel]
        assert float(a.min()) >= lo - 0.04 and float(a.max()) <= hi + 0.04
        # The draw is uniform in area: its mean sits mid-range and it reaches both ends.
        assert float(a.mean()) == pytest.approx((lo + hi) / 2, abs=0.01)
        assert float(a.min()) < lo + 0.02 and float(a.max()) > hi - 0.02
    assert float(ratio.min()) >= 3 / 4 - 0.05 and float(ratio.max()) <= 4 / 3 + 0.06
    log_r = ratio.log()  # uniform in log ratio: symmetric about 0
    assert float(log_r.mean()) == pytest.approx(0.0, abs=0.01)
    assert (
        float(log_r.min()) < math.log(3 / 4) + 0.03 and float(log_r.max()) > math.log(4 / 3) - 0.03
    )
    # A window that fits lies inside the image; a larger one (zoom-out) holds the image.
    for start, size in ((top, h), (left, w)):
        fits = size <= 64
        assert bool((start[fits] >= 0).all() and (start[fits] + size[fits] <= 64).all())
        assert bool((start[~fits] <= 0).all() and (start[~fits] + size[~fits] >= 64).all())
    assert int((~(h <= 64) | ~(w <= 64)).sum()) > 100  # scale up to 1.1 zooms out often


@pytest.mark.parametrize("resampler", RESAMPLERS)
def test_flip_and_rotation_rates_and_their_effect(resampler: str) -> None:
    cfg = ViewsConfig().resolved(64)
    p = _all_draws(cfg, 1000)
    flips = p["flip"].reshape(-1, 2).double()
    rot = p["rot90"].reshape(-1)
    n = len(rot)  # 8000 views: a rate of 0.5 has a standard error of 0.0056
    assert flips.mean(0).tolist() == pytest.approx([0.5, 0.5], abs=0.025)
    assert float((rot > 0).double().mean()) == pytest.approx(0.5, abs=0.025)
    for k in (1, 2, 3):  # 90, 180 and 270 degrees equally often
        assert float((rot == k).sum()) / n == pytest.approx(1 / 6, abs=0.02)
    assert float(torch.corrcoef(flips.T)[0, 1].abs()) < 0.05
    # Full-image crops of a pixel-unique image: each view is the image flipped horizontally,
    # then vertically, then rotated by k quarter turns, as drawn.
    full = ViewsConfig(
        global_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), global_size=8, jitter_p_global=0.0
    ).resolved(8)
    img = torch.arange(3 * 8 * 8).reshape(3, 8, 8)
    images = torch.stack([img, img])[None].repeat(40, 1, 1, 1, 1).to(torch.uint16)
    views, params = _views(images, full, "byol", range(40), resampler=resampler)
    for b in range(40):
        for v in range(2):
            ref = img.float()
            fh, fv = params["flip"][b, v].tolist()
            ref = ref.flip(-1) if fh else ref
            ref = ref.flip(-2) if fv else ref
            ref = torch.rot90(ref, int(params["rot90"][b, v]), dims=(-2, -1))
            assert torch.equal(views[v][b], ref)


def test_jitter_rates_and_statistics() -> None:
    cfg = ViewsConfig().resolved(64)
    p = _all_draws(cfg, 1000, c=4)
    jit = p["jitter"]
    assert float(jit[:, :2].double().mean()) == pytest.approx(cfg.jitter_p_global, abs=0.03)
    assert float(jit[:, 2:].double().mean()) == pytest.approx(cfg.jitter_p_local, abs=0.03)
    gain, off = p["gain"][jit], p["offset"][jit]  # (n jittered views, C)
    assert float(gain.mean()) == pytest.approx(1.0, abs=0.005)
    assert float(gain.std()) == pytest.approx(cfg.jitter_gain_std, rel=0.05)
    assert float(off.mean()) == pytest.approx(0.0, abs=0.005)
    assert float(off.std()) == pytest.approx(cfg.jitter_offset_std, rel=0.05)
    assert float(torch.corrcoef(gain.T)[0, 1].abs()) < 0.06  # independent per channel
    assert bool((p["gain"][~jit] == 1).all() and (p["offset"][~jit] == 0).all())


@pytest.mark.parametrize("resampler", RESAMPLERS)
@pytest.mark.parametrize("unit", ["plate_std", "range"])
def test_jitter_and_standardisation_are_applied_per_channel(unit: str, resampler: str) -> None:
    # A flat image r with plate (mean m, std s): x' = a·r/M + b·u, standardised with m/M, s/M:
    # (a·r + b·u·M - m) / s, u·M = s for "plate_std" offsets and M for "range" offsets.
    cfg = ViewsConfig(jitter_p_global=1.0, jitter_p_local=1.0, jitter_offset_unit=unit)
    cfg = cfg.resolved(32)
    r = torch.tensor([1000.0, 3000.0])
    images = r[None, None, :, None, None].expand(6, 2, 2, 32, 32).to(torch.uint16)
    mean = torch.tensor([800.0, 2500.0]).expand(6, 2, 2)
    std = torch.tensor([50.0, 400.0]).expand(6, 2, 2)
    views, p = _views(images, cfg, "dino", range(6), mean, std, resampler)
    unit_m = std[0, 0] if unit == "plate_std" else torch.tensor(65535.0)
    for v, view in enumerate(views):
        a, b = p["gain"][:, v], p["offset"][:, v]  # (6, C)
        expected = (a * r + b * unit_m - mean[:, 0]) / std[:, 0]
        got = view.mean((-2, -1))
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-3)
        assert float(view.std((-2, -1)).max()) < 1e-3  # a flat image stays flat


@pytest.mark.parametrize("resampler", RESAMPLERS)
def test_standardisation_with_each_images_own_plate_stats(resampler: str) -> None:
    # No augmentation, full-image crop: view A = (A - mean_A) / std_A, view B likewise.
    cfg = ViewsConfig(global_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), global_size=16, **QUIET)
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 65535, size=(3, 2, 4, 16, 16)).astype(np.uint16)
    mean = rng.uniform(100, 5000, size=(3, 2, 4)).astype(np.float32)
    std = rng.uniform(10, 900, size=(3, 2, 4)).astype(np.float32)
    views, _ = _views(
        torch.from_numpy(raw),
        cfg,
        "byol",
        range(3),
        torch.from_numpy(mean),
        torch.from_numpy(std),
        resampler,
    )
    for s in range(2):
        ref = (raw[:, s].astype(np.float32) - mean[:, s, :, None, None]) / std[:, s, :, None, None]
        assert np.allclose(views[s].numpy(), ref, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("resampler", RESAMPLERS)
@pytest.mark.parametrize(("side", "pad"), [(16, 3), (4, 4)])
def test_zoom_out_fills_margins_by_mirror_reflection(side: int, pad: int, resampler: str) -> None:
    # Window (side + 2·pad)² > image: its pixels are the image mirrored at the edges without
    # repeating them (numpy's "reflect"), wherever the window is placed; the second case has
    # margins up to twice the image (reflected more than once).
    out = side + 2 * pad
    scale = (out / side) ** 2
    cfg = ViewsConfig(global_scale=(scale, scale), crop_ratio=(1.0, 1.0), global_size=out, **QUIET)
    cfg = cfg.resolved(side)
    img = np.arange(2 * side * side).reshape(2, side, side).astype(np.uint16)
    padded = np.pad(img, ((0, 0), (pad * 2, pad * 2), (pad * 2, pad * 2)), mode="reflect")
    images = torch.from_numpy(img)[None, None].repeat(30, 2, 1, 1, 1)
    views, p = _views(images, cfg, "byol", range(30), resampler=resampler)
    placements = set()
    for b in range(30):
        top, left, h, w = p["box"][b, 0].tolist()
        assert (h, w) == (out, out) and -2 * pad <= top <= 0 and -2 * pad <= left <= 0
        placements.add((top, left))
        ref = padded[:, top + 2 * pad : top + 2 * pad + out, left + 2 * pad : left + 2 * pad + out]
        assert np.array_equal(views[0][b].numpy(), ref.astype(np.float32))
    assert len(placements) > 5


def test_both_resamplers_give_the_same_views() -> None:
    # Same draws (zoom-out to 1.5, small locals, flips, rotations, jitter), resized images:
    # crop-by-crop interpolation and the batched matrix products agree to float rounding.
    cfg = ViewsConfig(resize=48, global_scale=(0.5, 1.5), local_scale=(0.05, 0.5)).resolved(48)
    images = torch.randint(0, 60000, (12, 2, 3, 64, 64)).to(torch.uint16)
    mean, std = torch.rand(12, 2, 3) * 3000, torch.rand(12, 2, 3) * 500 + 100
    a, _ = _views(images, cfg, "dino", range(12), mean, std, "slices")
    b, _ = _views(images, cfg, "dino", range(12), mean, std, "matmul")
    for x, y in zip(a, b):
        assert x.shape == y.shape
        assert float((x - y).abs().max()) <= 1e-5 * float(x.abs().max())
    with pytest.raises(ValueError, match="resampler"):
        _views(images, cfg, "dino", [0], resampler="nearest")


def test_resize_then_crop() -> None:
    cfg = ViewsConfig(resize=32).resolved(64)
    images = torch.randint(0, 1000, (2, 2, 3, 64, 64)).to(torch.uint16)
    views, p = _views(images, cfg, "dino", [0, 1])
    assert [tuple(v.shape[-2:]) for v in views] == [(28, 28)] * 2 + [(14, 14)] * 6
    assert int(p["box"][..., :2].abs().max()) <= 32 and int(p["box"][..., 2:].max()) <= 40


@pytest.mark.parametrize("kind", ["dino", "byol"])
def test_training_views_are_the_same_for_any_worker_count(random_dataset: Path, kind: str) -> None:
    ds = open_dataset(random_dataset)
    s = ds.samples
    label_of = {t: k for k, t in enumerate(sorted(s["treatment"].unique()))}
    batch_of = {b: k for k, b in enumerate(sorted(s["batch"].unique()))}
    rows = np.arange(len(s))

    def run(workers: int, in_loader: bool = True, epoch: int = 2) -> list[dict]:
        ts = TrainingSet(ds, rows, label_of, batch_of, ViewsConfig(), kind, True, 7, in_loader)
        ts.set_epoch(epoch)
        loader = DataLoader(ts, batch_size=4, num_workers=workers, collate_fn=ts.collate)
        return [ts.finish(b, torch.device("cpu")) for b in loader]

    ref = run(0)
    assert len(ref) == 8 and len(ref[0]["views"]) == (8 if kind == "dino" else 2)
    for other in (run(1), run(2), run(2, in_loader=False)):
        for x, y in zip(ref, other):
            assert torch.equal(x["partner_index"], y["partner_index"])
            assert all(torch.equal(u, v) for u, v in zip(x["views"], y["views"]))
    moved = run(0, epoch=3)  # another epoch: other draws
    assert not torch.equal(moved[0]["views"][0], ref[0]["views"][0])


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
