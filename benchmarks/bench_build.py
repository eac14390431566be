"""Build throughput (images/s) of `cdcl build rxrx1` with 1 vs 2 workers, printed as a ratio.

The fixture is a few hundred RxRx1 fields in the real layout (6 8-bit PNGs each, downscaled
with anti-aliasing). Usage: ``python benchmarks/bench_build.py [--fields 300] [--size 256]``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fixtures_layouts import write_rxrx1  # noqa: E402

from cdcl.data.rxrx1 import build_rxrx1  # noqa: E402


def main() -> None:
    """Write the fixture once, build it with 1 and with 2 workers, print images/s and the ratio."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--fields", type=int, default=300, help="fields of view (~, 10 per plate)")
    ap.add_argument("--size", type=int, default=256, help="source image size in px (RxRx1: 512)")
    ap.add_argument("--out-size", type=int, default=128, help="built image size")
    ap.add_argument("--repeats", type=int, default=2, help="builds per setting (best is reported)")
    args = ap.parse_args()
    n_exp = max(1, args.fields // 10)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "rxrx1"
        exps = tuple(f"HUVEC-{i:02d}" for i in range(1, n_exp + 1))
        meta = write_rxrx1(root, experiments=exps, n_sirnas=3, size=args.size)
        n = int((meta.cell_type == "HUVEC").sum())
        rates = {}
        for workers in (1, 2):
            best = 0.0
            for r in range(args.repeats):
                out = Path(tmp) / f"ds_{workers}_{r}"
                t0 = time.perf_counter()
                build_rxrx1(root, out, image_size=args.out_size, workers=workers)
                best = max(best, n / (time.perf_counter() - t0))
                shutil.rmtree(out)
            rates[workers] = best
            print(
                f"workers={workers}: {best:7.1f} images/s ({n} fields x 6 PNGs {args.size}px -> {args.out_size}px)"
            )
        print(f"speed-up 2 vs 1 workers: {rates[2] / rates[1]:.2f}x")


if __name__ == "__main__":
    main()
