"""Build and read throughput of the real-data adapters on fixtures of realistic image size.

Two fixtures are written in a temp dir, in the exact published layouts (the writers of
``tests/fixtures_layouts.py`` lay out the metadata and file names; their pixels are then
replaced by full-size ones):

- RxRx1: ``metadata.csv`` + ``images/<exp>/Plate<p>/<well>_s<site>_w<1..6>.png``, 512 x 512
  8-bit PNGs, 6 per site;
- cpg0004: per-plate ``load_data.csv`` + Phenix-named 1080 x 1080 16-bit TIFFs, 5 per field,
  on the real LINCS plate maps; LZW-compressed like the real Phenix exports in
  ``shared/data/cellpainting_fovs`` and, in a second pass, uncompressed.

Pixels are the real Phenix field of ``shared/data/cellpainting_fovs`` (ch1..ch6), rotated,
flipped, rolled and gain-jittered per field (RxRx1: a 512 px crop scaled to 8 bits), so the
files compress like real microscopy, not like constant or white-noise images.

Measured, per fixture, in one run:

1. build throughput (fields/s, a field = all its channel files) of ``build_rxrx1`` /
   ``build_cpg0004`` at the CLI's default ``image_size=256`` with ``workers=1`` and ``2``
   (probe + decode + resize + write + commit; best of ``--repeats`` builds) and the speed-up;
2. read throughput at training time, single process, on batches of 64 random indices:
   ``open_dataset(..).read_many(idx)``, ``.read(i)`` one at a time, and what a loader without
   the store does for the same samples: decode the original files and resize to 256 px
   (the build's own ``load_field``, so the pixels are identical; checked). Ratio = store /
   originals.

Files are read right after being written, so both sides read from the page cache: the ratios
are decode + resize cost only, a lower bound for network or cold-disk storage.
Usage: ``python benchmarks/bench_build.py [--quick]`` (full ~2-4 min, quick ~1 min).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fixtures_layouts import (  # noqa: E402
    BATCH1,
    MOA_TABLE,
    PHENIX_CHANNEL,
    PHENIX_FOV,
    rxrx1_png,
    write_cpg0004,
    write_rxrx1,
)

from cdcl.data.build import FileFields, load_field  # noqa: E402
from cdcl.data.cellpainting import build_cpg0004, build_samples  # noqa: E402
from cdcl.data.dataset_dir import open_dataset  # noqa: E402
from cdcl.data.rxrx1 import build_rxrx1, image_paths, read_metadata  # noqa: E402

BATCH = 64  # images per training batch
SIZE = 256  # the CLI's default --image-size for both adapters
RXRX1_PX = 512
PHENIX_PX = 1080


# --------------------------------------------------------------------------- realistic pixels


def phenix_planes() -> dict[int, np.ndarray]:
    """The six real 1080 x 1080 uint16 Phenix planes, keyed by channel number 1..6."""
    out = {}
    for ch in range(1, 7):
        with Image.open(PHENIX_FOV / f"r03c03f03p01-ch{ch}sk1fk1fl1.tiff") as im:
            out[ch] = np.asarray(im).astype(np.uint16)
    return out


@dataclass
class FieldTransform:
    """One field's geometry and gain, shared by its channels so they stay registered."""

    k: int
    flip: bool
    dy: int
    dx: int
    gain: float

    @classmethod
    def draw(cls, rng: np.random.Generator) -> FieldTransform:
        """A random rotation, flip, roll and +-20 % gain (plate-to-plate intensity drift)."""
        return cls(
            int(rng.integers(4)),
            bool(rng.integers(2)),
            int(rng.integers(PHENIX_PX)),
            int(rng.integers(PHENIX_PX)),
            float(rng.uniform(0.8, 1.2)),
        )

    def apply(self, plane: np.ndarray) -> np.ndarray:
        """The transformed plane as float32."""
        p = np.rot90(plane, self.k)
        p = p[:, ::-1] if self.flip else p
        return np.roll(p, (self.dy, self.dx), axis=(0, 1)).astype(np.float32) * self.gain


def fill_rxrx1(root: Path, meta: pd.DataFrame, planes: dict[int, np.ndarray], seed: int) -> int:
    """Overwrite every site's w1..w6 with 512 px 8-bit crops of real planes; returns bytes."""
    rng = np.random.default_rng(seed)
    # 8-bit scaling per channel: the 99.9th percentile maps to 220, as in a dim 8-bit export.
    scale = {c: 220.0 / max(1.0, float(np.percentile(p, 99.9))) for c, p in planes.items()}
    total = 0
    for _, row in meta.iterrows():
        t = FieldTransform.draw(rng)
        y, x = (int(v) for v in rng.integers(0, PHENIX_PX - RXRX1_PX, size=2))
        for c in range(1, 7):
            crop = t.apply(planes[c])[y : y + RXRX1_PX, x : x + RXRX1_PX] * scale[c]
            path = rxrx1_png(root, row, c)
            Image.fromarray(np.clip(np.rint(crop), 0, 255).astype(np.uint8)).save(path)
            total += path.stat().st_size
    return total


def fill_cpg0004(root: Path, planes: dict[int, np.ndarray], compression: str, seed: int) -> int:
    """Overwrite every file named in the load_data.csv files with a 1080 px 16-bit field."""
    rng = np.random.default_rng(seed)
    total = 0
    for csv in sorted(root.rglob("load_data.csv")):
        ld = pd.read_csv(csv)
        for _, row in ld.iterrows():
            t = FieldTransform.draw(rng)
            for stain, ch in PHENIX_CHANNEL.items():
                path = Path(row[f"PathName_Orig{stain}"]) / row[f"FileName_Orig{stain}"]
                img = np.clip(np.rint(t.apply(planes[ch])), 0, 65535).astype(np.uint16)
                # PIL writes LZW without imagecodecs (tifffile cannot), as the Phenix exports are.
                kw = {"compression": "tiff_lzw"} if compression == "lzw" else {}
                Image.fromarray(img).save(path, format="TIFF", **kw)
                total += path.stat().st_size
    return total


# --------------------------------------------------------------------------- measurements


def timed(fn: Callable[..., object], *args: object) -> float:
    """Seconds one call of fn(*args) takes."""
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def bench_builds(
    build: Callable[[Path, int], object], n: int, tmp: Path, repeats: int
) -> dict[int, float]:
    """Best fields/s of ``repeats`` fresh builds with 1 and with 2 workers (interleaved)."""
    best = {1: 0.0, 2: 0.0}
    for r in range(repeats):
        for workers in (1, 2):
            out = tmp / f"ds_w{workers}_r{r}"
            best[workers] = max(best[workers], n / timed(build, out, workers))
            shutil.rmtree(out)
    return best


@dataclass
class ReadRates:
    """Images/s of the three read paths, and whether the pixels agreed."""

    many: float
    one: float
    orig: float
    same_pixels: bool


def bench_reads(
    ds_path: Path, paths: list[list[str]], store_batches: int, orig_batches: int, seed: int
) -> ReadRates:
    """Random 64-image batches from the store (read_many, read) vs decode + resize originals."""
    ds = open_dataset(ds_path)
    n = len(ds)
    rng = np.random.default_rng(seed)
    # Distinct indices: read_many decodes a repeated index once, a file loader would not.
    batch = min(BATCH, n)
    batches = [rng.permutation(n)[:batch] for _ in range(store_batches)]
    src = FileFields(paths)
    dtype = ds.info.dtype
    size = ds.image_size

    def originals(idx: np.ndarray) -> np.ndarray:
        return np.stack([load_field(src, int(i), size, dtype) for i in idx])

    def read_each(idx: np.ndarray) -> list[np.ndarray]:
        return [ds.read(int(i)) for i in idx]

    # The same samples: a loader without the store must produce the store's pixels.
    probe = batches[0][:4]
    same = bool(np.array_equal(ds.read_many(probe), originals(probe)))  # also warms zarr
    # Interleaved per batch, so load from other processes hits the three paths alike.
    t_many = t_one = t_orig = 0.0
    for j, b in enumerate(batches):
        t_many += timed(ds.read_many, b)
        t_one += timed(read_each, b)
        if j < orig_batches:
            t_orig += timed(originals, b)
    k = batch * len(batches)
    return ReadRates(k / t_many, k / t_one, batch * min(orig_batches, len(batches)) / t_orig, same)


@dataclass
class Result:
    """One fixture's figures."""

    name: str
    files: str
    n: int
    mb_per_field: float
    build: dict[int, float]
    reads: ReadRates


def run_rxrx1(
    tmp: Path, sites: int, planes: dict[int, np.ndarray], args: argparse.Namespace
) -> Result:
    """RxRx1 fixture: 10 sites per plate (3 siRNAs + 2 controls x 2 sites), <= 4 plates per exp."""
    root = tmp / "rxrx1"
    n_plates = max(1, -(-sites // 10))
    plates = tuple(range(1, min(4, n_plates) + 1))
    exps = tuple(f"HUVEC-{i:02d}" for i in range(1, -(-n_plates // len(plates)) + 1))
    meta = write_rxrx1(root, experiments=exps, plates=plates, n_sirnas=3, sites=2, size=8)
    nbytes = fill_rxrx1(root, meta, planes, args.seed)
    n = len(meta)

    def build(out: Path, workers: int) -> object:
        return build_rxrx1(root, out, image_size=SIZE, workers=workers)

    rates = bench_builds(build, n, tmp, args.repeats)
    build(tmp / "ds_rxrx1", 1)
    paths = image_paths(root, read_metadata(root))
    reads = bench_reads(tmp / "ds_rxrx1", paths, args.store_batches, args.orig_batches, args.seed)
    shutil.rmtree(root)
    shutil.rmtree(tmp / "ds_rxrx1")
    files = f"6 x PNG {RXRX1_PX}px 8-bit"
    return Result("RxRx1", files, n, nbytes / n / 2**20, rates, reads)


def run_cpg0004(
    tmp: Path,
    maps: int,
    replicates: int,
    compression: str,
    planes: dict[int, np.ndarray],
    args: argparse.Namespace,
) -> Result:
    """cpg0004 fixture: ``maps`` real plate maps x ``replicates`` plates x 5 wells x 1 field."""
    root = tmp / f"cpg0004_{compression}"
    write_cpg0004(root, n_maps=maps, sites=1, size=16, replicates=replicates)
    nbytes = fill_cpg0004(root, planes, compression, args.seed)
    samples, paths = build_samples(root, [BATCH1], MOA_TABLE)
    n = len(samples)

    def build(out: Path, workers: int) -> object:
        return build_cpg0004(
            root, out, platemaps=[BATCH1], moa=MOA_TABLE, image_size=SIZE, workers=workers
        )

    rates = bench_builds(build, n, tmp, args.repeats)
    ds = tmp / f"ds_cpg_{compression}"
    build(ds, 1)
    reads = bench_reads(ds, paths, args.store_batches, args.orig_batches, args.seed)
    shutil.rmtree(root)
    shutil.rmtree(ds)
    files = f"5 x TIFF {PHENIX_PX}px 16-bit {compression}"
    return Result("cpg0004", files, n, nbytes / n / 2**20, rates, reads)


def print_table(results: list[Result]) -> None:
    """Build and read figures, one row per fixture."""
    print(f"\nBuild at image_size={SIZE} (fields/s; a field = all its channel files):")
    head = f"{'source':8} {'files per field':28} {'fields':>6} {'MB/field':>8}"
    print(f"{head} {'1 worker':>9} {'2 workers':>9} {'speed-up':>8}")
    for r in results:
        b = r.build
        print(
            f"{r.name:8} {r.files:28} {r.n:6d} {r.mb_per_field:8.2f} "
            f"{b[1]:9.1f} {b[2]:9.1f} {b[2] / b[1]:7.2f}x"
        )
    print(f"\nTraining-time reads, one process, random batches of {BATCH} (images/s):")
    head = f"{'source':8} {'files per field':28} {'read_many':>10} {'read(i)':>9}"
    print(f"{head} {'decode+resize':>13} {'many/orig':>9} {'one/orig':>9} {'same px':>7}")
    for r in results:
        x = r.reads
        print(
            f"{r.name:8} {r.files:28} {x.many:10.1f} {x.one:9.1f} {x.orig:13.1f} "
            f"{x.many / x.orig:8.1f}x {x.one / x.orig:8.1f}x {'yes' if x.same_pixels else 'NO':>7}"
        )


def main() -> None:
    """Write the fixtures, build each with 1 and 2 workers, time reads, print one table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller fixtures, one repeat (~1 min)")
    ap.add_argument("--rxrx1-sites", type=int, default=64, help="RxRx1 sites (rounded up)")
    ap.add_argument("--cpg-maps", type=int, default=3, help="cpg0004 plate maps (5 fields each)")
    ap.add_argument("--cpg-replicates", type=int, default=5, help="cpg0004 plates per plate map")
    ap.add_argument(
        "--tiff-compression",
        default="lzw,none",
        help="comma-separated cpg0004 TIFF encodings to run: lzw (Phenix export), none",
    )
    ap.add_argument("--repeats", type=int, default=2, help="builds per setting (best is kept)")
    ap.add_argument("--store-batches", type=int, default=20, help="random batches from the store")
    ap.add_argument("--orig-batches", type=int, default=2, help="of those, decoded from files")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tmp", type=Path, default=None, help="scratch folder (default: system tmp)")
    args = ap.parse_args()
    if args.quick:
        args.rxrx1_sites, args.cpg_maps, args.cpg_replicates = 20, 1, 2
        args.tiff_compression, args.repeats = "lzw", 1
        args.store_batches, args.orig_batches = 8, 1
    comps = [c.strip() for c in args.tiff_compression.split(",") if c.strip()]
    bad = sorted(set(comps) - {"lzw", "none"})
    if bad:
        ap.error(f"--tiff-compression {','.join(bad)}: choose lzw and/or none")

    print(f"CPUs: {os.cpu_count()}; fixtures in the page cache (decode + resize cost only)")
    planes = phenix_planes()
    t0 = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp_name:
        tmp = Path(tmp_name)
        results.append(run_rxrx1(tmp, args.rxrx1_sites, planes, args))
        print(f"  RxRx1 done ({time.perf_counter() - t0:.0f} s)", flush=True)
        for comp in comps:
            results.append(run_cpg0004(tmp, args.cpg_maps, args.cpg_replicates, comp, planes, args))
            print(f"  cpg0004 {comp} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    print_table(results)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if not all(r.reads.same_pixels for r in results):
        sys.exit("store pixels differ from decode + resize of the originals")


if __name__ == "__main__":
    main()
