"""Benchmark: training views per second per CPU core, per-image path vs batched path.

Run: ``.venv/bin/python benchmarks/bench_views.py [--batch 32] [--images 64] [--rounds 3]``.
Prints a table (nothing is asserted).

Settings of the ``rxrx1-cdcl`` preset: a 256-px, 6-channel uint16 image and its cross-batch
partner -> 2 global views of 224 px + 2 x 3 local views of 112 px (crops with mirror margins for
zoom-out scales > 1, flips, 90° rotations, per-channel jitter, plate standardisation). One
thread (``torch.set_num_threads(1)``), both paths in the same process, alternated over rounds;
the median round counts. Reading the store is left out (the same for both paths).

- per-image: the trainer's former path, image by image (each image converted to [0, 1]
  floats, then crop, resize, flip, rotate, jitter and standardise view by view). It is kept
  here, frozen, as the reference (``PerImageViews``); it was checked identical to the
  package's ``make_views`` in the run recorded in the README, before that was removed.
  ``(views only)``: the same without the loader's collation of the views into a batch
  (the first row is the fair comparison: the trainer paid both).
- ``(matmul)``: the batched path with the resampler used on CUDA (two batched matrix products
  per view), run here on the CPU for reference; the CPU path uses the "slices" resampler.
- ``(draws only)``: what is left to the loader workers when the views are made on the GPU
  (per-item draws and the stacked uint16 batch).
- batched: what the trainer does now: per item ``draw_view_params`` (the loader workers),
  then ``batch_views`` on the stacked uint16 batch (the collate step, or the GPU).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch
from torch.utils.data import default_collate

from cdcl.config import load_config
from cdcl.data.views import ViewsConfig, batch_views, draw_view_params, resize

# ---------------------------------------------------------------- the former per-image path


def _uniform(gen: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def _reflect(idx: torch.Tensor, n: int) -> torch.Tensor:
    period = 2 * (n - 1)
    idx = torch.remainder(idx, period)
    return torch.where(idx >= n, period - idx, idx)


class PerImageViews:
    """The per-image view maker the trainer used before batched views (frozen reference)."""

    def __init__(self, cfg: ViewsConfig) -> None:
        self.cfg = cfg

    def crop(
        self, img: torch.Tensor, size: int, scale: tuple, gen: torch.Generator
    ) -> torch.Tensor:
        """Random resized crop, mirror-filled outside the image."""
        _, h, w = img.shape
        ratio = self.cfg.crop_ratio
        area = h * w * _uniform(gen, float(scale[0]), float(scale[1]))
        r = math.exp(_uniform(gen, math.log(ratio[0]), math.log(ratio[1])))
        cw = max(1, int(round(math.sqrt(area * r))))
        ch = max(1, int(round(math.sqrt(area / r))))
        top = int(math.floor(_uniform(gen, min(0, h - ch), max(0, h - ch) + 1 - 1e-9)))
        left = int(math.floor(_uniform(gen, min(0, w - cw), max(0, w - cw) + 1 - 1e-9)))
        rows = _reflect(torch.arange(top, top + ch), h)
        cols = _reflect(torch.arange(left, left + cw), w)
        return resize(img.index_select(1, rows).index_select(2, cols), size)

    def view(self, img, size, scale, jitter_p, gen, norm) -> torch.Tensor:
        """One view: crop, flips, rotation, jitter, standardisation."""
        cfg = self.cfg
        x = self.crop(img, size, scale, gen)
        if _uniform(gen) < cfg.flip_p:
            x = x.flip(-1)
        if _uniform(gen) < cfg.flip_p:
            x = x.flip(-2)
        if _uniform(gen) < cfg.rot90_p:
            x = torch.rot90(x, 1 + int(torch.randint(0, 3, (), generator=gen)), dims=(-2, -1))
        if _uniform(gen) < jitter_p:
            c = x.shape[0]
            a = 1.0 + cfg.jitter_gain_std * torch.randn(c, generator=gen, dtype=x.dtype)
            b = cfg.jitter_offset_std * torch.randn(c, generator=gen, dtype=x.dtype)
            if cfg.jitter_offset_unit == "plate_std":
                b = b * norm[1]
            x = x * a[:, None, None] + b[:, None, None]
        mean, std = norm
        return ((x - mean.reshape(-1, 1, 1)) / std.reshape(-1, 1, 1)).contiguous()

    def __call__(self, img_a, img_b, gen, norm_a, norm_b) -> list[torch.Tensor]:
        """DINO-family views of A and its partner B."""
        cfg = self.cfg
        if cfg.resize:
            img_a, img_b = resize(img_a, cfg.resize), resize(img_b, cfg.resize)
        gs, ls = int(cfg.global_size), int(cfg.local_size)
        g = cfg.global_scale, cfg.jitter_p_global
        lo = cfg.local_scale, cfg.jitter_p_local
        views = [self.view(img_a, gs, *g, gen, norm_a), self.view(img_b, gs, *g, gen, norm_b)]
        views += [self.view(img_a, ls, *lo, gen, norm_a) for _ in range(cfg.n_local)]
        views += [self.view(img_b, ls, *lo, gen, norm_b) for _ in range(cfg.n_local)]
        return views


# ---------------------------------------------------------------- timing


def make_pool(n: int, channels: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint16 fields (n, C, size, size) at fluorescence-like levels and plate (mean, std) (n, 2, C)."""
    rng = np.random.default_rng(seed)
    imgs = rng.gamma(2.0, 600.0, size=(n, channels, size, size)).clip(0, 65535).astype(np.uint16)
    stats = np.stack([imgs.mean(axis=(2, 3)), imgs.std(axis=(2, 3))], axis=1).astype(np.float32)
    return imgs, stats


def per_image(pool, stats, cfg, n: int, batch: int, seed: int, collate: bool = True) -> float:
    """Seconds per image for the per-image path (float conversion and collation, as the trainer had)."""
    maker = PerImageViews(cfg)
    m = 65535.0
    items = []
    t = time.perf_counter()
    for k in range(n):
        i, j = k % len(pool), (k + 7) % len(pool)
        a = torch.from_numpy(pool[i].astype(np.float32)) / m
        b = torch.from_numpy(pool[j].astype(np.float32)) / m
        norm_a = (torch.from_numpy(stats[i, 0]) / m, torch.from_numpy(stats[i, 1]) / m)
        norm_b = (torch.from_numpy(stats[j, 0]) / m, torch.from_numpy(stats[j, 1]) / m)
        items.append(maker(a, b, torch.Generator().manual_seed(seed + k), norm_a, norm_b))
        if len(items) == batch or k == n - 1:
            if collate:
                default_collate(items)  # the trainer's loader stacked the items' views
            items = []
    return (time.perf_counter() - t) / n


def batched(
    pool, stats, cfg, n: int, batch: int, seed: int, resampler: str | None = "slices"
) -> float:
    """Seconds per image for the batched path (parameter draws and collation included).

    ``resampler=None``: only the workers' part when the views are made on the GPU (draws and
    the raw uint16 batch).
    """
    c, size = pool.shape[1], pool.shape[-1]
    t = time.perf_counter()
    for start in range(0, n, batch):
        ks = range(start, min(n, start + batch))
        params = [
            draw_view_params(cfg, "dino", (size, size), c, torch.Generator().manual_seed(seed + k))
            for k in ks
        ]
        pairs = [(k % len(pool), (k + 7) % len(pool)) for k in ks]
        images = torch.from_numpy(np.stack([pool[[i, j]] for i, j in pairs]))
        mean = torch.from_numpy(np.stack([stats[[i, j], 0] for i, j in pairs]))
        std = torch.from_numpy(np.stack([stats[[i, j], 1] for i, j in pairs]))
        stacked = {key: torch.stack([p[key] for p in params]) for key in params[0]}
        if resampler is not None:
            batch_views(images, mean, std, stacked, cfg, "dino", 65535.0, resampler)
    return (time.perf_counter() - t) / n


def check_same_views(pool, stats, cfg) -> float:
    """Largest difference between the two paths' views for the same draws (standardised units)."""
    m, size, c = 65535.0, pool.shape[-1], pool.shape[1]
    a, b = (torch.from_numpy(pool[i].astype(np.float32)) / m for i in (0, 1))
    ref = PerImageViews(cfg)(
        a,
        b,
        torch.Generator().manual_seed(3),
        (torch.from_numpy(stats[0, 0]) / m, torch.from_numpy(stats[0, 1]) / m),
        (torch.from_numpy(stats[1, 0]) / m, torch.from_numpy(stats[1, 1]) / m),
    )
    p = draw_view_params(cfg, "dino", (size, size), c, torch.Generator().manual_seed(3))
    out = batch_views(
        torch.from_numpy(pool[None, [0, 1]]),
        torch.from_numpy(stats[None, [0, 1], 0]),
        torch.from_numpy(stats[None, [0, 1], 1]),
        {k: v[None] for k, v in p.items()},
        cfg,
        "dino",
        m,
    )
    return max(float((o[0] - r).abs().max()) for o, r in zip(out, ref))


def package_per_image_matches(pool, stats, cfg) -> str:
    """Whether the frozen copy equals the package's per-image ``make_views`` (while it exists)."""
    try:
        from cdcl.data.views import make_views
    except ImportError:
        return "n/a (removed from the package)"
    m = 65535.0
    a, b = (torch.from_numpy(pool[i].astype(np.float32)) / m for i in (0, 1))
    na = (torch.from_numpy(stats[0, 0]) / m, torch.from_numpy(stats[0, 1]) / m)
    nb = (torch.from_numpy(stats[1, 0]) / m, torch.from_numpy(stats[1, 1]) / m)
    x = PerImageViews(cfg)(a, b, torch.Generator().manual_seed(5), na, nb)
    y = make_views(a, b, cfg, "dino", torch.Generator().manual_seed(5), norm_a=na, norm_b=nb)
    return "identical" if all(torch.equal(u, v) for u, v in zip(x, y)) else "DIFFERENT"


def main() -> None:
    """Measure both paths in one process and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="rxrx1-cdcl")
    ap.add_argument("--size", type=int, default=256, help="stored image size (px)")
    ap.add_argument("--batch", type=int, default=32, help="batch size of the batched path")
    ap.add_argument("--images", type=int, default=64, help="images per path and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-matmul", action="store_true", help="leave out the (matmul) row")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.preset).views.resolved(args.size)
    pool, stats = make_pool(16, 6, args.size)
    n_views = cfg.n_views("dino")
    print(
        f"{args.preset}: {args.size}-px 6-channel uint16 image + partner -> 2 x "
        f"{cfg.global_size} + {2 * cfg.n_local} x {cfg.local_size} views; 1 thread; "
        f"batch {args.batch}; {args.images} images x {args.rounds} rounds per path"
    )
    print(
        f"frozen per-image copy vs package make_views: {package_per_image_matches(pool, stats, cfg)}"
    )
    print(f"same draws, largest view difference: {check_same_views(pool, stats, cfg):.2e}")
    per_image(pool, stats, cfg, 4, 4, 0)  # warm-up
    batched(pool, stats, cfg, 4, 4, 0)
    times: dict[str, list[float]] = {
        "per-image": [],
        "batched": [],
        "(views only)": [],
        "(matmul)": [],
        "(draws only)": [],
    }
    for r in range(args.rounds):
        times["per-image"].append(per_image(pool, stats, cfg, args.images, args.batch, 1000 * r))
        times["(views only)"].append(
            per_image(pool, stats, cfg, args.images, args.batch, 1000 * r, collate=False)
        )
        times["(draws only)"].append(
            batched(pool, stats, cfg, args.images, args.batch, 1000 * r, None)
        )
        if not args.skip_matmul:
            times["(matmul)"].append(
                batched(pool, stats, cfg, args.images, args.batch, 1000 * r, "matmul")
            )
        times["batched"].append(batched(pool, stats, cfg, args.images, args.batch, 1000 * r))
    ref = statistics.median(times["per-image"])
    print(
        f"\n{'path':<12} {'ms/image':>9} {'images/s/core':>14} {'views/s/core':>13} "
        f"{'cores for 1000 img/s':>21} {'speed vs per-image':>19}"
    )
    for name, ts in times.items():
        if not ts:
            continue
        sec = statistics.median(ts)
        print(
            f"{name:<12} {sec * 1e3:>9.2f} {1 / sec:>14.1f} {n_views / sec:>13.0f} "
            f"{1000 * sec:>21.1f} {ref / sec:>18.2f}x"
        )


if __name__ == "__main__":
    main()
