"""Benchmark: `cdcl embed` images/s with 1 and 2 processes (torchrun, gloo) and 0/1/2 loader workers.

Run: ``nice .venv/bin/python benchmarks/bench_embed.py [--data DIR] [--rounds 2]``.
Prints one table (nothing is asserted).

Each configuration is the real command, ``cdcl embed SOURCE --data DIR --level image``, launched
as a subprocess (under ``torch.distributed.run --standalone`` for 2 processes, so gloo on the
CPU). The figure is the command's own ``embedded N images in T s`` line: T runs from the
barrier after every rank has listed its parts to the barrier after every rank has written its
shard, so interpreter start-up, model build and the final merge are left out (the end-to-end
wall time of the command is printed beside it). Every process gets ``cores // processes``
torch threads, so 1 and 2 processes use the same cores (plus one row of 1 process with 1
thread, which separates threads from processes on a loaded machine). Configurations are run in interleaved
rounds and the median is kept, which damps (but on a shared machine does not remove) noise.
Ratios are against 1 process with 0 workers, all measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# (processes, loader workers per process, torch threads per process; 0 = cores // processes)
CONFIGS = [(1, 0, 0), (1, 1, 0), (1, 2, 0), (1, 0, 1), (2, 0, 0), (2, 1, 0), (2, 2, 0)]
LINE = re.compile(r"embedded (\d+) images in ([\d.]+) s: ([\d.]+) images/s")


def screen(data: Path | None, tmp: Path, preset: str) -> Path:
    """``data`` if given, else a generated screen (``cdcl synth --preset PRESET``)."""
    if data is not None:
        return data
    out = tmp / "screen"
    cmd = [sys.executable, "-m", "cdcl", "synth", "--preset", preset, "--out", str(out)]
    subprocess.run([*cmd, "--no-progress"], check=True, capture_output=True)
    return out


def embed_once(
    data: Path, out: Path, nproc: int, workers: int, threads: int, source: str, batch: int
) -> tuple[float, float, int]:
    """One `cdcl embed` run: (images/s of the embedding phase, wall seconds, images)."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd = [
        *launcher,
        "-m",
        "cdcl",
        "embed",
        source,
        "--data",
        str(data),
        "--out",
        str(out),
        "--level",
        "image",
        "--device",
        "cpu",
        "--batch-size",
        str(batch),
        "--workers",
        str(workers),
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    m = LINE.search(r.stdout)
    if m is None:
        raise SystemExit(f"no throughput line in the output:\n{r.stdout}")
    out.unlink()
    return float(m.group(3)), wall, int(m.group(1))


def main() -> None:
    """Measure every configuration in interleaved rounds and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, help="dataset directory (default: generate one)")
    ap.add_argument("--preset", default="small", help="cdcl synth preset when generating")
    ap.add_argument("--source", default="random:resnet18", help="what to embed with")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved repeats (median kept)")
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="cores to share")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        data = screen(args.data, tmp_path, args.preset)
        rates: dict[tuple[int, int, int], list[float]] = {c: [] for c in CONFIGS}
        walls: dict[tuple[int, int, int], list[float]] = {c: [] for c in CONFIGS}
        n_images = 0
        for _ in range(args.rounds):
            for cfg in CONFIGS:
                nproc, workers, threads = cfg
                threads = threads or max(1, args.cores // nproc)
                out = tmp_path / f"p{nproc}w{workers}t{threads}.parquet"
                rate, wall, n_images = embed_once(
                    data, out, nproc, workers, threads, args.source, args.batch_size
                )
                rates[cfg].append(rate)
                walls[cfg].append(wall)
    base = statistics.median(rates[CONFIGS[0]])
    print(
        f"cdcl embed {args.source}, {n_images} images of {data.name if args.data else args.preset}"
        f", batch {args.batch_size}, CPU, {args.cores} cores shared by all processes,"
        f" median of {args.rounds} interleaved rounds"
    )
    print(
        f"{'processes':>9} {'workers':>7} {'threads':>7} {'images/s':>9} {'ratio':>6} {'wall s':>7}"
    )
    for cfg in CONFIGS:
        nproc, workers, threads = cfg
        r = statistics.median(rates[cfg])
        w = statistics.median(walls[cfg])
        threads = threads or max(1, args.cores // nproc)
        print(f"{nproc:>9} {workers:>7} {threads:>7} {r:>9.1f} {r / base:>6.2f} {w:>7.1f}")
    print("ratio: images/s over 1 process with 0 workers (same run); wall: whole command")


if __name__ == "__main__":
    main()
