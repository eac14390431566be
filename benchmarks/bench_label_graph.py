"""Benchmark: the per-treatment mixing metrics' kNN graph over all rows, at 1e5-5e5 profiles.

Run: ``.venv/bin/python benchmarks/bench_label_graph.py [--sizes 100000,500000] [--dims 384]
[--exact-upto 100000] [--json FILE]``. Prints figures (nothing is asserted).

What is measured. The random profile table of ``bench_cli_evaluate.py`` (20 batches, 500
treatments + DMSO, treatment effect + batch offset), made in memory. In one process per size:

- ``kbet_ilisi``: the global kBET + iLISI stage as ``evaluate_features`` runs it (2,000
  sampled query rows against all rows, k = 90): the reference the other rows are divided by;
- ``label_graph``: the kNN graph over all rows (``CONNECTIVITY_K`` neighbours) searched from
  the rows of a seeded sample of whole treatments (``GRAPH_PAIRS`` query x row pairs), which
  per-treatment kBET's fragmentation rule and graph connectivity read above 10,000 rows;
- ``mixing_per_treatment``: the whole stage (that graph, then kBET, iLISI, batch silhouette
  and graph connectivity per treatment), as ``evaluate_features`` calls it;
- ``mixing_without_graph``: the same stage with no graph search (``pair_budget=0``: every
  treatment too large, so no kBET or graph connectivity), i.e. what the stage costs besides
  the graph; the ratio of the two is the cost of the graph over all rows;
- with ``--exact-upto`` (sizes up to it): the same stage with every row searched (the exact
  figures), to compare the sampled estimates with, in standard errors.

Time = wall clock of one call; memory = peak RSS (``VmHWM``, reset before each call) minus
the RSS before it. Ratios are of times measured in the same process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cli_evaluate import TREAT_NAMES, table_chunks  # noqa: E402
from bench_metrics import _reset_peak, _status_kib  # noqa: E402

from cdcl.metrics import mixing  # noqa: E402
from cdcl.metrics.neighbours import neighbor_graph, sample_rows  # noqa: E402


def make_table(n: int, dims: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, batch codes and treatment names of bench_cli_evaluate's table."""
    x = np.empty((n, dims), dtype=np.float32)
    batch = np.empty(n, dtype=np.int64)
    treat = np.empty(n, dtype=np.int64)
    for c in table_chunks(n, dims):
        x[c["rows"]], batch[c["rows"]], treat[c["rows"]] = c["x"], c["batch"], c["treat"]
    return x, batch, TREAT_NAMES[treat].astype(str)


def timed(fn: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    """Result, wall seconds and peak RSS increase (MiB) of one call."""
    before = _status_kib("VmRSS") or 0
    _reset_peak()
    t0 = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    peak = _status_kib("VmHWM") or 0
    return out, {"s": round(wall, 1), "peak_extra_mib": round((peak - before) / 1024)}


def global_kbet_ilisi(x: np.ndarray, batch: np.ndarray) -> dict[str, Any]:
    """The kBET + iLISI stage of evaluate_features above 10,000 rows."""
    k = mixing.default_kbet_k(batch)
    rows = sample_rows(len(x), 2000, 0)
    g = neighbor_graph(x, max(k - 1, mixing.LISI_K), query_indices=rows)
    return {"kbet": mixing.kbet(x, batch, graph=g), "ilisi": mixing.ilisi(x, batch, graph=g)}


def run_size(n: int, dims: int, exact: bool) -> dict[str, Any]:
    """Every timed call at one size."""
    x, batch, treat = make_table(n, dims)
    rec: dict[str, Any] = {
        "rows": n,
        "dims": dims,
        "rss_data_mib": (_status_kib("VmRSS") or 0) // 1024,
    }
    _, rec["kbet_ilisi"] = timed(lambda: global_kbet_ilisi(x, batch))
    codes = np.unique(treat, return_inverse=True)[1]
    multi = np.ones(codes.max() + 1, dtype=bool)
    lg, rec["label_graph"] = timed(lambda: mixing.label_graph(x, codes, multi))
    rec["label_graph"].update(lg.info(n))
    mix, rec["mixing_per_treatment"] = timed(lambda: mixing.mixing_per_treatment(x, batch, treat))
    keys = ("kbet", "kbet_stderr", "kbet_n", "graph_connectivity", "graph_connectivity_stderr")
    rec["sampled"] = {k: mix[k] for k in (*keys, "graph_connectivity_n", "graph")}
    rec["sampled"]["too_large_treatments"] = mix.get("too_large_treatments", [])
    bare = lambda: mixing.mixing_per_treatment(x, batch, treat, pair_budget=0)  # noqa: E731
    _, rec["mixing_without_graph"] = timed(bare)
    if exact:
        full = lambda: mixing.mixing_per_treatment(x, batch, treat, pair_budget=n * n)  # noqa: E731
        ex, rec["exact_stage"] = timed(full)
        rec["exact"] = {k: ex[k] for k in keys}
        # The sample's frame leaves out the treatments too large for it: compare on the frame.
        left = set(rec["sampled"]["too_large_treatments"])
        for key in ("kbet", "graph_connectivity"):
            v = [r[key] for t, r in ex["per_treatment"].items() if t not in left]
            rec["exact"][f"{key}_on_frame"] = float(np.nanmean(v))
    ref = rec["kbet_ilisi"]["s"]
    for name in ("label_graph", "mixing_per_treatment", "mixing_without_graph", "exact_stage"):
        if name in rec and ref > 0:
            rec[name]["ratio_to_kbet_ilisi"] = round(rec[name]["s"] / ref, 2)
    bare_s = rec["mixing_without_graph"]["s"]
    rec["mixing_per_treatment"]["ratio_to_without_graph"] = round(
        rec["mixing_per_treatment"]["s"] / bare_s, 2
    )
    rec["load_average_1min"] = round(os.getloadavg()[0], 2)
    return rec


def main() -> None:
    """Parse sizes, run each in this process (largest last), print and save the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000,500000")
    ap.add_argument("--dims", type=int, default=384)
    ap.add_argument("--exact-upto", type=int, default=0, help="also the exact stage up to N rows")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    out = []
    for n in (int(v) for v in args.sizes.split(",")):
        rec = run_size(n, args.dims, n <= args.exact_upto)
        out.append(rec)
        print(json.dumps(rec, indent=1, default=float), flush=True)
        if args.json:
            args.json.write_text(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()
