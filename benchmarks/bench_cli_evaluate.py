"""Benchmark: `cdcl evaluate --features` end to end, as a user runs it, at 1e5-1e6 profiles.

Run: ``python benchmarks/bench_cli_evaluate.py [--sizes 100000x384,500000x384,1000000x768]
[--work DIR] [--json FILE] [-- EXTRA CDCL OPTIONS]``. Prints figures (nothing is asserted).

What is measured. A random profile table is written once per size as float32 Parquet (in row
groups, so writing it needs little memory): N rows x D features, 20 batches, 80 plates (4 per
batch), 500 treatments + DMSO (10 % of rows), 25 MoAs (20 treatments each), compound =
treatment. Features = Gaussian noise + a batch offset + a treatment effect. Then the command
of the documentation runs in a fresh process with default options::

    cdcl evaluate --features T.parquet --out DIR --batch-col Metadata_Batch \\
      --treatment-col Metadata_Treatment --compound-col Metadata_Compound \\
      --moa-col Metadata_MoA --plate-col Metadata_Plate --well-col Metadata_Well \\
      --control-query "Metadata_Treatment == 'DMSO'"

under ``/usr/bin/time -v``: process wall time and peak resident memory (maximum RSS) of the
whole command, next to the per-stage times the command writes into ``results.json``
(``timings_s``) and the longest gap between two lines it printed (its longest silence).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

N_BATCHES = 20
N_PLATES = 80
N_TREATMENTS = 500
N_MOAS = 25
CONTROL_FRACTION = 0.10
CHUNK_ROWS = 50_000


def table_chunks(n: int, dims: int, seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """The random profile table in chunks of CHUNK_ROWS rows: codes and float32 features."""
    rng = np.random.default_rng(seed)
    batch_offset = rng.normal(0, 0.3, (N_BATCHES, dims)).astype(np.float32)
    treat_effect = rng.normal(0, 0.5, (N_TREATMENTS + 1, dims)).astype(np.float32)
    treat_effect[0] = 0  # DMSO
    for a in range(0, n, CHUNK_ROWS):
        b = min(n, a + CHUNK_ROWS)
        m = b - a
        rows = np.arange(a, b)
        plate = rows * N_PLATES // n  # contiguous plates, 4 per batch
        batch = plate * N_BATCHES // N_PLATES
        ctrl = rng.random(m) < CONTROL_FRACTION
        treat = np.where(ctrl, 0, rng.integers(1, N_TREATMENTS + 1, m))
        x = rng.standard_normal((m, dims), dtype=np.float32)
        x += batch_offset[batch] + treat_effect[treat]
        yield {"rows": rows, "plate": plate, "batch": batch, "treat": treat, "x": x}


TREAT_NAMES = np.array(["DMSO"] + [f"T{i:03d}" for i in range(N_TREATMENTS)], dtype=object)


def write_table(path: Path, n: int, dims: int, seed: int = 0) -> None:
    """Write the random profile table (float32 features, Metadata_* columns) in row groups."""
    moa_names = np.array([None] + [f"MoA{i % N_MOAS:02d}" for i in range(N_TREATMENTS)], object)
    feat_names = [f"f{j:04d}" for j in range(dims)]
    tmp = path.with_name(path.name + ".tmp")
    writer = None
    try:
        for c in table_chunks(n, dims, seed):
            rows, plate, batch, treat, x = c["rows"], c["plate"], c["batch"], c["treat"], c["x"]
            cols = {
                "Metadata_Batch": pa.array([f"B{v:02d}" for v in batch]),
                "Metadata_Plate": pa.array([f"P{v:03d}" for v in plate]),
                "Metadata_Well": pa.array([f"W{v % 384:03d}" for v in rows]),
                "Metadata_Treatment": pa.array(TREAT_NAMES[treat].tolist()),
                "Metadata_Compound": pa.array(TREAT_NAMES[treat].tolist()),
                "Metadata_MoA": pa.array(moa_names[treat].tolist(), type=pa.string()),
            }
            for j, name in enumerate(feat_names):
                cols[name] = pa.array(x[:, j])
            table = pa.table(cols)
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()
    os.replace(tmp, path)


def command(table: Path, out: Path, extra: list[str]) -> list[str]:
    """The documented `cdcl evaluate --features` command line for the benchmark table."""
    return [
        sys.executable,
        "-m",
        "cdcl",
        "evaluate",
        "--features",
        str(table),
        "--out",
        str(out),
        "--batch-col",
        "Metadata_Batch",
        "--treatment-col",
        "Metadata_Treatment",
        "--compound-col",
        "Metadata_Compound",
        "--moa-col",
        "Metadata_MoA",
        "--plate-col",
        "Metadata_Plate",
        "--well-col",
        "Metadata_Well",
        "--control-query",
        "Metadata_Treatment == 'DMSO'",
        *extra,
    ]


def _time_v(stderr: str, label: str) -> str | None:
    m = re.search(rf"^\s*{re.escape(label)}:\s*(.+)$", stderr, flags=re.M)
    return m.group(1).strip() if m else None


def _seconds(elapsed: str | None) -> float | None:
    """``h:mm:ss`` or ``m:ss.ss`` of /usr/bin/time as seconds."""
    if not elapsed:
        return None
    s = 0.0
    for part in elapsed.split(":"):
        s = s * 60 + float(part)
    return s


def run_one(n: int, dims: int, work: Path, extra: list[str]) -> dict[str, Any]:
    """Write the table (once) and time the command on it; figures of the run."""
    table = work / f"profiles_{n}x{dims}.parquet"
    if not table.is_file():
        t0 = time.perf_counter()
        write_table(table, n, dims)
        print(f"wrote {table} in {time.perf_counter() - t0:.0f} s", flush=True)
    out = work / f"out_{n}x{dims}"
    cmd = ["/usr/bin/time", "-v", *command(table, out, extra)]
    print("$ " + " ".join(cmd[2:]), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Read stderr line by line to find the longest stretch without a printed line.
    gaps, last, lines = [], time.perf_counter(), []
    assert proc.stderr is not None
    for line in proc.stderr:
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
        lines.append(line)
        print("   | " + line.rstrip(), flush=True)
    stdout = proc.stdout.read() if proc.stdout is not None else ""
    proc.wait()
    wall = time.perf_counter() - t0
    err = "".join(lines)
    results = out / "results.json"
    timings = json.loads(results.read_text()).get("timings_s", {}) if results.is_file() else {}
    plots = json.loads(results.read_text()).get("plots", {}) if results.is_file() else {}
    rss_kb = _time_v(err, "Maximum resident set size (kbytes)")
    return {
        "rows": n,
        "dims": dims,
        "returncode": proc.returncode,
        "wall_s": _seconds(_time_v(err, "Elapsed (wall clock) time (h:mm:ss or m:ss)")) or wall,
        "peak_rss_mib": round(int(rss_kb) / 1024) if rss_kb else None,
        "longest_silence_s": round(max(gaps), 1) if gaps else None,
        "stages_s": timings,
        "plots": plots,
        "load_average_1min": round(os.getloadavg()[0], 2),
        "stdout_tail": stdout[-2000:],
    }


def main() -> None:
    """Parse sizes, run each, print one summary line per size."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000x384,500000x384,1000000x768")
    ap.add_argument("--work", type=Path, default=Path("bench_cli_work"))
    ap.add_argument("--json", type=Path)
    ap.add_argument("extra", nargs="*", help="extra `cdcl evaluate` options (after --)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in args.sizes.split(","):
        n, dims = (int(v) for v in spec.lower().split("x"))
        r = run_one(n, dims, args.work, args.extra)
        rows.append(r)
        print(
            f"{n:>9,} x {dims}: rc {r['returncode']}, wall {r['wall_s']:.0f} s, "
            f"peak RSS {r['peak_rss_mib']} MiB, longest silence {r['longest_silence_s']} s, "
            f"load {r['load_average_1min']}",
            flush=True,
        )
        for stage, s in r["stages_s"].items():
            print(f"    {stage:<40} {s:8.1f} s")
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
