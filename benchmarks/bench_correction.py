"""Benchmark: wall time and peak memory of sphering, Harmony and ComBat at 1e4 and 1e5 profiles.

Run: ``.venv/bin/python benchmarks/bench_correction.py [--sizes 10000,100000] [--dims 384]
[--batches 20]``. Prints one table (nothing is asserted); ``--json FILE`` also writes it.

What is measured. Synthetic profiles (float32, ``--dims`` features) in ``--batches`` batches of
equal size, 10% of them negative controls: a treatment effect (50 treatments) + an additive
and multiplicative batch effect + noise. Each correction is called as
``cdcl evaluate --correct`` calls it (:func:`cdcl.profiles.correction.apply_corrections`
with its defaults: sphering epsilon 1e-2 relative; Harmony on 50 PCs, nclust min(n/30, 100),
up to 20 rounds, harmonypy's thread default; ComBat via scanpy).

How. Every (size, correction) runs in a fresh subprocess, so imports and caches of one do
not flatter another. Time = wall clock of the one call, and the CPU seconds of all its threads
(``getrusage``; the steadier figure on a shared machine). Memory = the peak resident set size
during the call (``VmHWM``, reset to the current RSS by writing 5 to ``/proc/self/clear_refs``
just before the call), shown as the increase over the RSS before the call (the profiles,
n × d float32, are already resident), and the process's total peak.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

CORRECTIONS = ("sphering", "harmony", "combat")


def make_profiles(n: int, d: int, n_batches: int, seed: int = 0) -> tuple[Any, Any, Any]:
    """Profiles with treatment and batch effects, batch labels and a control mask."""
    rng = np.random.default_rng(seed)
    batch = np.arange(n) % n_batches
    treat = rng.integers(0, 50, n)
    ctrl = rng.random(n) < 0.1
    x = rng.standard_normal((n, d), dtype=np.float32)
    effect = 1.5 * rng.standard_normal((50, d), dtype=np.float32)
    x += np.where(ctrl[:, None], np.float32(0), effect[treat])
    x *= rng.uniform(0.7, 1.4, (n_batches, d)).astype(np.float32)[batch]
    x += rng.standard_normal((n_batches, d), dtype=np.float32)[batch]
    return x, batch.astype(str), ctrl


def _vm(field: str) -> float:
    """A /proc/self/status figure in MiB (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(correction: str, n: int, d: int, n_batches: int) -> dict[str, Any]:
    """One measurement, in this (fresh) process; returns the figures."""
    from cdcl.profiles.correction import apply_corrections

    x, batch, ctrl = make_profiles(n, d, n_batches)
    before = _vm("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # peak := current RSS
    except OSError:
        pass
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    out = apply_corrections(x, batch, ctrl, (correction,), seed=0)[correction]
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    peak = _vm("VmHWM")
    return {
        "correction": correction,
        "n": n,
        "dims_in": d,
        "dims_out": int(out.shape[1]),
        "batches": n_batches,
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "peak_increase_mib": round(peak - before, 1),
        "peak_rss_mib": round(peak, 1),
    }


def main() -> None:
    """Run every (size, correction) in a subprocess and print one table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--dims", type=int, default=384)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--corrections", default=",".join(CORRECTIONS))
    ap.add_argument("--json", type=Path)
    ap.add_argument(
        "--child", nargs=4, metavar=("CORRECTION", "N", "D", "B"), help=argparse.SUPPRESS
    )
    args = ap.parse_args()
    if args.child:
        c, n, d, b = args.child
        print(json.dumps(child(c, int(n), int(d), int(b))))
        return
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        for c in args.corrections.split(","):
            cmd = [
                sys.executable,
                __file__,
                "--child",
                c,
                str(n),
                str(args.dims),
                str(args.batches),
            ]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                print(f"{c} at n={n} failed: {r.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                continue
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(f"  done: {c} n={n} ({rows[-1]['wall_s']} s)", file=sys.stderr, flush=True)
    print(
        "| correction | profiles | dims in → out | batches | wall s | CPU s | peak Δ MiB "
        "| peak RSS MiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['correction']} | {r['n']:,} | {r['dims_in']} → {r['dims_out']} | "
            f"{r['batches']} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {r['peak_increase_mib']:.0f} | "
            f"{r['peak_rss_mib']:.0f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
