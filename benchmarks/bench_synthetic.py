"""Benchmark: simulated-screen generation speed and random-read throughput of the store.

Run: ``.venv/bin/python benchmarks/bench_synthetic.py [--presets small medium] [--reads 512]``.
Prints figures (nothing is asserted). The read reference is measured in the same run: the same
images decoded from per-channel 16-bit PNG files (the layout of RxRx1 and most raw screens).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cdcl.data import synthetic
from cdcl.data.dataset_dir import open_dataset


def bench_generation(preset: str, root: Path) -> tuple[Path, float, int]:
    """Generate a preset from scratch; returns (path, seconds, images)."""
    t = time.perf_counter()
    out = synthetic.generate(root / preset, preset, 0)
    dt = time.perf_counter() - t
    return out, dt, synthetic.resolve_config(preset).n_images


def bench_render_only(preset: str, n_blocks: int = 8, strength: float = 1.0) -> float:
    """Images/s of rendering alone (no store writes), over the first blocks."""
    cfg = synthetic.resolve_config(preset, batch_strength=strength)
    d = synthetic._design(cfg, 0)
    n = 0
    t = time.perf_counter()
    for idx, key in synthetic.blocks(cfg, 0)[:n_blocks]:
        n += len(synthetic._render_block(d, idx, np.random.default_rng(key)))
    return n / (time.perf_counter() - t)


def bench_strengths(
    preset: str, strengths: list[float], repeats: int = 3
) -> dict[float, tuple[float, float]]:
    """Render-only (wall, CPU) milliseconds per field at each batch strength, best of
    ``repeats``; CPU time (all threads of this process) is the figure a loaded machine keeps."""
    out = {}
    for s in strengths:
        best = (math.inf, math.inf)
        for _ in range(repeats):
            cpu = time.process_time()
            wall = 1000.0 / bench_render_only(preset, strength=s)
            cfg = synthetic.resolve_config(preset, batch_strength=s)
            n = sum(len(idx) for idx, _ in synthetic.blocks(cfg, 0)[:8])
            best = min(best, (wall, 1000.0 * (time.process_time() - cpu) / n))
        out[s] = best
    return out


def write_pngs(ds_path: Path, idx: np.ndarray, root: Path) -> list[list[Path]]:
    """One 16-bit grey PNG per image and channel (the reference layout)."""
    ds = open_dataset(ds_path)
    files = []
    for i, img in zip(idx, ds.read_many(idx)):
        paths = []
        for c, plane in enumerate(img):
            p = root / f"img{i:06d}_w{c + 1}.png"
            Image.fromarray(plane.astype(np.uint16)).save(p)
            paths.append(p)
        files.append(paths)
    return files


def bench_reads(ds_path: Path, n_reads: int, root: Path) -> dict[str, float]:
    """Random-read images/s: Dataset.read_many, Dataset.read and per-channel PNG decoding."""
    ds = open_dataset(ds_path)
    rng = np.random.default_rng(0)
    idx = rng.choice(len(ds), size=min(n_reads, len(ds)), replace=False)
    png_root = root / "png"
    png_root.mkdir(parents=True, exist_ok=True)
    files = write_pngs(ds_path, idx, png_root)
    ds.read_many(idx[:8])  # open the store once outside the timing
    order = rng.permutation(len(idx))

    t = time.perf_counter()
    for start in range(0, len(order), 64):  # mini-batches as a loader would ask for them
        ds.read_many(idx[order[start : start + 64]])
    many = len(idx) / (time.perf_counter() - t)

    t = time.perf_counter()
    for j in order:
        ds.read(int(idx[j]))
    single = len(idx) / (time.perf_counter() - t)

    t = time.perf_counter()
    for j in order:
        planes = [np.asarray(Image.open(p)) for p in files[j]]
        np.stack(planes)
    png = len(idx) / (time.perf_counter() - t)

    check = np.stack([np.asarray(Image.open(p)) for p in files[order[0]]])
    assert np.array_equal(check, ds.read(int(idx[order[0]]))), "PNG reference differs from store"
    return {"read_many": many, "read": single, "png": png}


def main() -> None:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--presets", nargs="+", default=["small", "medium"])
    parser.add_argument("--reads", type=int, default=512, help="random images read per method")
    parser.add_argument(
        "--strengths",
        type=float,
        nargs="+",
        default=[0.0, 1.0],
        help="batch strengths whose render time per field is compared (first preset)",
    )
    parser.add_argument(
        "--strengths-only", action="store_true", help="only the per-strength render times"
    )
    args = parser.parse_args()
    per_field = bench_strengths(args.presets[0], args.strengths)
    print(f"render time per field ({args.presets[0]}, render only, best of 3 x 8 blocks):")
    for s, (wall, cpu) in per_field.items():
        print(f"  batch strength {s:g}: {wall:6.2f} ms/field wall, {cpu:6.2f} ms/field CPU")
    if args.strengths_only:
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print(
            f"{'preset':8} {'images':>7} {'px':>4} {'generate s':>10} {'gen img/s':>10} "
            f"{'render-only img/s':>18}"
        )
        paths = {}
        for preset in args.presets:
            render = bench_render_only(preset)
            path, dt, n = bench_generation(preset, root)
            size = synthetic.resolve_config(preset).image_size
            paths[preset] = path
            print(f"{preset:8} {n:7d} {size:4d} {dt:10.1f} {n / dt:10.0f} {render:18.0f}")
        preset = args.presets[0]
        r = bench_reads(paths[preset], args.reads, root / f"reads_{preset}")
        print(f"\nrandom reads ({preset}, {args.reads} images, one process, images/s):")
        print(
            f"  Dataset.read_many (batches of 64)  {r['read_many']:8.0f}  "
            f"({r['read_many'] / r['png']:.1f}x per-channel PNG)"
        )
        print(
            f"  Dataset.read (one at a time)       {r['read']:8.0f}  "
            f"({r['read'] / r['png']:.1f}x per-channel PNG)"
        )
        print(f"  per-channel 16-bit PNG (PIL)       {r['png']:8.0f}  (reference, 1.0x)")


if __name__ == "__main__":
    main()
