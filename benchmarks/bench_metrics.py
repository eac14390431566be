"""Benchmark: wall time and peak memory of the evaluation metric suite at 1e4-5e5 profiles.

Run: ``.venv/bin/python benchmarks/bench_metrics.py [--sizes 10000,100000,500000] [--quick]``.
Prints figures (nothing is asserted); ``--json FILE`` also writes them.

What is measured. Synthetic well profiles (float32 x ``--dims``) with the metadata of a
compound screen: ``--batches`` batches of 384-well plates, 32 DMSO control wells on every
plate, ``--treatments`` treatments (compound x 3 doses, compounds spread over 20 MoAs) laid
out at random over the other wells, so that every treatment recurs in every batch and the
number of replicates grows with n (the RxRx1 / JUMP-reference-plate shape). Features =
strong batch offset + plate offset + MoA/compound/dose effect + noise.

"The suite" is the raw-profile half of ``cdcl.metrics.score.evaluate_features`` called
metric by metric with the arguments it uses (its caps: every row a query up to 10,000 rows,
above that 2,000 seeded queries scored against all rows, 1,000 for silhouettes and mAP): logistic probe (at most 20,000
stratified training wells) and weighted kNN (k=10) trained on all batches but the last and
scored on the last one (controls excluded), and on all rows NSC/NSCB, the shared kNN graph
with kBET + iLISI, the per-treatment mixing metrics (one graph per treatment: kBET, iLISI,
batch silhouette; and the kNN graph over all rows, searched from a sample of whole treatments
above 10,000 rows, for kBET's fragmentation rule and graph connectivity), silhouettes of batch / treatment / MoA labels, GRIT
(at most 2,000 controls), replicate and MoA mAP (plain and batch-aware, null_size=2000,
queries spread over groups) and the batch classifier (its 20,000-row sample). The row
``evaluate_features`` times one whole call with both variants (raw and plate-normalised), i.e.
every metric of results.json, with its own peak RSS.

How. Each size runs in a fresh subprocess. Time = wall clock (``time.perf_counter``) of one
call. Memory = peak resident set size (``VmHWM``): reset before each metric by writing 5 to
``/proc/self/clear_refs``, so a metric's figure is its own peak, shown as the increase over
the RSS before the call (the profiles themselves are already resident); the size's total is
the largest of these peaks and the RSS after making the data (``ru_maxrss`` cannot serve:
the reset lowers it too; it is the fallback where ``clear_refs`` is unavailable). References timed in the same subprocess on
the same inputs: faiss ``IndexFlatIP`` on unit rows against our blocked kNN search (same
sampled test queries, training bank, k=10), ``sklearn.metrics.silhouette_score`` (cosine,
every row) and copairs' ``average_precision`` + ``mean_average_precision`` (replicate and MoA
recipes); references whose estimate exceeds the caps are skipped.

Budgets. A metric is skipped at a size when its time, extrapolated from the previous size
with its cost model (e.g. queries x rows for kNN), exceeds ``--metric-cap-s`` or what is left
of ``--size-budget-s``; the table then says ``skip (~N s est.)``. The smallest size has no
estimates, so a 2,000-profile calibration size is run first when the smallest is larger.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

WELLS_PER_PLATE = 384
CONTROLS_PER_PLATE = 32
DOSES = 3
N_MOAS = 20
NULL_SIZE = 2000  # evaluate_features' default
CALIBRATION_N = 2000
MARK = "@@"  # prefix of the worker's result lines on stdout

# --------------------------------------------------------------------------------------
# synthetic screen
# --------------------------------------------------------------------------------------


def make_screen(
    n: int, dims: int, n_batches: int, n_treatments: int, seed: int = 0
) -> tuple[np.ndarray, pd.DataFrame]:
    """Synthetic well profiles (float32 (n, dims)) and their plate-map metadata."""
    rng = np.random.default_rng(seed)
    n_plates = math.ceil(n / WELLS_PER_PLATE)
    n_batches = max(2, min(n_batches, n_plates))
    row = np.arange(n)
    plate = row // WELLS_PER_PLATE
    well_ix = row % WELLS_PER_PLATE
    batch = plate * n_batches // n_plates  # contiguous runs of plates per batch
    # Controls on fixed, spread-out positions of every plate (every 12th well).
    is_control = well_ix % (WELLS_PER_PLATE // CONTROLS_PER_PLATE) == 0
    # Treatment wells: a random permutation of a cycling list over all treatment wells, so
    # every treatment recurs on about n / n_treatments wells spread over plates and batches.
    treat = np.full(n, -1, dtype=np.int64)
    slots = np.flatnonzero(~is_control)
    cyc = rng.permutation(slots.size) % n_treatments
    treat[slots] = cyc
    compound = treat // DOSES
    dose = treat % DOSES
    n_compounds = math.ceil(n_treatments / DOSES)
    moa_of_compound = np.arange(n_compounds) % N_MOAS

    # Features: batch >> MoA + compound + dose effects, as in real screens.
    x = rng.standard_normal((n, dims), dtype=np.float32)
    x += 3.0 * rng.standard_normal((n_batches, dims), dtype=np.float32)[batch]
    x += 0.5 * rng.standard_normal((n_plates, dims), dtype=np.float32)[plate]
    moa_dir = 1.5 * rng.standard_normal((N_MOAS, dims), dtype=np.float32)
    comp_dir = 0.7 * rng.standard_normal((n_compounds, dims), dtype=np.float32)
    t_effect = moa_dir[moa_of_compound[np.arange(n_treatments) // DOSES]]
    t_effect = t_effect + comp_dir[np.arange(n_treatments) // DOSES]
    t_effect *= (0.5 + 0.5 * (np.arange(n_treatments) % DOSES))[:, None].astype(np.float32)
    nc = ~is_control
    x[nc] += t_effect[treat[nc]]

    letters = np.array(list("ABCDEFGHIJKLMNOP"))
    well = np.char.add(letters[well_ix // 24], np.char.zfill((well_ix % 24 + 1).astype(str), 2))
    comp_name = np.char.add("cmpd", np.char.zfill(compound.astype(str), 4))
    treat_name = np.char.add(np.char.add(comp_name, "_d"), dose.astype(str))
    moa_name = np.char.add(
        "moa", np.char.zfill(moa_of_compound[np.maximum(compound, 0)].astype(str), 2)
    )
    meta = pd.DataFrame(
        {
            "batch": np.char.add("b", np.char.zfill(batch.astype(str), 3)).astype(object),
            "plate": np.char.add("p", np.char.zfill(plate.astype(str), 5)).astype(object),
            "well": well.astype(object),
            "treatment": np.where(is_control, "DMSO", treat_name).astype(object),
            "compound": np.where(is_control, "DMSO", comp_name).astype(object),
            "moa": np.where(is_control, None, moa_name.astype(object)),
            "is_control": is_control,
        }
    )
    return x, meta


# --------------------------------------------------------------------------------------
# cost models: relative cost of a metric at n, used to extrapolate from the previous size
# --------------------------------------------------------------------------------------


def _queries(n: int) -> int:
    # evaluate_features: every row a query up to EXACT_MAX rows, else QUERY_SAMPLE.
    return n if n <= 10_000 else 2_000


def cost_models(sil_sample: int, test_frac: float) -> dict[str, Callable[[int], float]]:
    """Metric name -> relative cost as a function of n (only ratios between sizes matter)."""

    def lin(n: int) -> float:
        return float(n)

    def sq(n: int) -> float:
        return float(n) * n

    def sqlog(n: int) -> float:
        return float(n) * n * math.log(n)

    def sampled(n: int) -> float:
        return float(_queries(n)) * n

    return {
        "plate_normalize": lin,
        "logistic_probe": lambda n: float(min(n, 20000)),  # stratified training cap
        "weighted_knn": lambda n: float(_queries(int(test_frac * n))) * n,
        "knn_search_ours": lambda n: float(_queries(int(test_frac * n))) * n,
        "nsc_nscb": lin,
        "kbet_ilisi_graph": sampled,
        # The graph over all rows searched from sampled treatments (at most GRAPH_PAIRS pairs),
        # then one graph per treatment (sum of squared sizes, the treatments fixed: ~ n^2).
        "mixing_per_treatment": lambda n: min(float(n) * n, 4e9) + float(n) * n / 300,
        "silhouette_batch": sampled,
        "silhouette_treatment": sampled,
        "silhouette_moa": sampled,
        "grit": lambda n: float(n) * min(n, 2000),
        "replicate_map": sampled,
        "replicate_map_batch_aware": sampled,
        "moa_map": sampled,
        "moa_map_batch_aware": sampled,
        "batch_classifier": lambda n: float(min(n, 20000)),
        "evaluate_features": sampled,
        "ref_faiss_knn": lambda n: float(_queries(int(test_frac * n))) * n,
        "ref_sklearn_silhouette_full": sq,
        "ref_copairs_replicate_map": sq,
        "ref_copairs_moa_map": sqlog,
    }


# The raw-variant metrics of evaluate_features, called as it calls them (their sum is the
# raw half of results.json; ``evaluate_features`` times both variants in one call).
SUITE = [
    "logistic_probe",
    "weighted_knn",
    "nsc_nscb",
    "kbet_ilisi_graph",
    "mixing_per_treatment",
    "silhouette_batch",
    "silhouette_treatment",
    "silhouette_moa",
    "grit",
    "replicate_map",
    "replicate_map_batch_aware",
    "moa_map",
    "moa_map_batch_aware",
    "batch_classifier",
]
# Our function timed against each reference, for the ours/theirs ratio.
REF_PAIRS = {
    "ref_faiss_knn": "knn_search_ours",
    "ref_sklearn_silhouette_full": "silhouette_batch",
    "ref_copairs_replicate_map": "replicate_map",
    "ref_copairs_moa_map": "moa_map",
}
# Run order: the suite, then the whole evaluate_features call, then the references.
ORDER = [
    "plate_normalize",
    *SUITE,
    "evaluate_features",
    "knn_search_ours",
    "ref_faiss_knn",
    "ref_sklearn_silhouette_full",
    "ref_copairs_replicate_map",
    "ref_copairs_moa_map",
]


# --------------------------------------------------------------------------------------
# worker: one size in a fresh process
# --------------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _emit(record: dict[str, Any]) -> None:
    print(MARK + json.dumps(record), flush=True)


def _metric_fns(
    x: np.ndarray, meta: pd.DataFrame, sil_sample: int, tmp: Path
) -> dict[str, Callable[[], Any]]:
    """Metric name -> zero-argument call returning the headline value."""
    from cdcl import metrics as M
    from cdcl.metrics import score as E
    from cdcl.metrics.score import evaluate_features
    from cdcl.profiles.columns import plate_normalize

    ctrl = meta["is_control"].to_numpy(bool)
    batch = meta["batch"].astype(str).to_numpy()
    treat = meta["treatment"].astype(str).to_numpy()
    moa_ok = ~ctrl & meta["moa"].notna().to_numpy()
    moa = meta["moa"].astype(str).to_numpy()
    test_batch = np.unique(batch)[-1]
    te = (batch == test_batch) & ~ctrl
    tr = (batch != test_batch) & ~ctrl
    nc = ~ctrl

    def copairs_replicate() -> float:
        from copairs.map import average_precision, mean_average_precision
        from copairs.matching import assign_reference_index

        ref = assign_reference_index(meta, "is_control", reference_col="ref", default_value=-1)
        ap = average_precision(
            ref,
            x,
            pos_sameby=["treatment", "ref"],
            pos_diffby=[],
            neg_sameby=[],
            neg_diffby=["treatment", "ref"],
            progress_bar=False,
        )
        table = mean_average_precision(
            ap, ["treatment"], null_size=NULL_SIZE, threshold=0.05, seed=0,
            progress_bar=False, cache_dir=tmp / "copairs_rep",
        )  # fmt: skip
        return float(table["mean_average_precision"].mean())

    def copairs_moa() -> float:
        from copairs.map import average_precision, mean_average_precision

        sub = meta[~ctrl].reset_index(drop=True)
        ap = average_precision(
            sub,
            x[~ctrl],
            pos_sameby=["moa"],
            pos_diffby=["compound"],
            neg_sameby=[],
            neg_diffby=["moa"],
            progress_bar=False,
        )
        table = mean_average_precision(
            ap, ["moa"], null_size=NULL_SIZE, threshold=0.05, seed=0,
            progress_bar=False, cache_dir=tmp / "copairs_moa",
        )  # fmt: skip
        return float(table["mean_average_precision"].mean())

    def sk_sil(sample: int | None) -> float:
        from sklearn.metrics import silhouette_score

        return float(
            silhouette_score(x, batch, metric="cosine", sample_size=sample, random_state=0)
        )

    def ev_all() -> float:
        # Both variants (raw + plate-normalised), as results.json holds them.
        test = batch == test_batch
        every = np.ones(len(meta), bool)
        r = evaluate_features(x, meta, ~test, test, eval_mask=every, verbose=False)
        if r.get("errors"):
            raise RuntimeError(f"metrics failed: {sorted(r['errors'])}")
        return float(r["raw"]["kbet"]["acceptance_rate"])

    def kbet_ilisi() -> float:
        k = M.mixing.default_kbet_k(batch)
        rows = M.neighbours.sample_rows(len(x), E.QUERY_SAMPLE if len(x) > E.EXACT_MAX else None, 0)
        g = M.neighbor_graph(x, max(k - 1, M.mixing.LISI_K), query_indices=rows)
        M.ilisi(x, batch, graph=g)
        return M.kbet(x, batch, graph=g)["acceptance_rate"]

    knn_q = M.neighbours.sample_rows(int(te.sum()), E._queries(int(te.sum())), 0)
    xq = x[te][knn_q]

    def faiss_knn() -> float:
        import faiss

        bank = M.neighbours._prepare(x[tr], M.neighbours.row_norms(x[tr]), "cosine")
        qv = M.neighbours._prepare(xq, M.neighbours.row_norms(xq), "cosine")
        index = faiss.IndexFlatIP(bank.shape[1])
        index.add(np.ascontiguousarray(bank))
        sim, _ = index.search(np.ascontiguousarray(qv), 10)
        return float(sim.mean())

    def sil(mask: np.ndarray, labels: np.ndarray) -> float:
        q = E.SILHOUETTE_SAMPLE if int(mask.sum()) > E.SILHOUETTE_EXACT_MAX else None
        return M.silhouette(x[mask], labels[mask], sample_size=q, seed=0)

    map_kw: dict[str, Any] = {"null_size": NULL_SIZE}
    map_kw["max_queries"] = None if len(x) <= E.EXACT_MAX else E.MAP_QUERY_SAMPLE
    map_kw["max_null_elems"] = E.MAP_NULL_BUDGET
    every = np.ones(len(x), bool)
    return {
        "plate_normalize": lambda: float(plate_normalize(x, meta)[0, 0]),
        "logistic_probe": lambda: M.logistic_probe_accuracy(
            x[tr], treat[tr], x[te], treat[te], seed=0, max_train=E.PROBE_MAX_TRAIN
        )["accuracy"],
        "weighted_knn": lambda: M.weighted_knn_accuracy(
            x[tr], treat[tr], x[te], treat[te], k=10, max_queries=E._queries(int(te.sum()))
        )["accuracy"],
        "knn_search_ours": lambda: float(M.knn_indices(x[tr], 10, query=xq)[1].mean()),
        "nsc_nscb": lambda: M.nsc_nscb(x, meta)["nscb"],
        "kbet_ilisi_graph": kbet_ilisi,
        "mixing_per_treatment": lambda: M.mixing_per_treatment(
            x, batch, treat, min_group_size=4, seed=0
        )["kbet"],
        "silhouette_batch": lambda: sil(every, batch),
        "silhouette_treatment": lambda: sil(nc, treat),
        "silhouette_moa": lambda: sil(moa_ok, moa),
        "grit": lambda: M.grit_summary(M.grit(x, meta, max_controls=E.GRIT_MAX_CONTROLS))[
            "mean_grit"
        ],
        "replicate_map": lambda: M.replicate_map(x, meta, False, **map_kw)[0]["map"],
        "replicate_map_batch_aware": lambda: M.replicate_map(x, meta, True, **map_kw)[0]["map"],
        "moa_map": lambda: M.moa_map(x, meta, False, **map_kw)[0]["map"],
        "moa_map_batch_aware": lambda: M.moa_map(x, meta, True, **map_kw)[0]["map"],
        "batch_classifier": lambda: M.batch_classifier_accuracy(x, batch, seed=0)["accuracy"],
        "evaluate_features": ev_all,
        "ref_faiss_knn": faiss_knn,
        "ref_sklearn_silhouette_full": lambda: sk_sil(None),
        "ref_copairs_replicate_map": copairs_replicate,
        "ref_copairs_moa_map": copairs_moa,
    }


def worker(args: argparse.Namespace) -> int:
    """Generate one size, run the planned metrics in ORDER, print one result line each."""
    warnings.simplefilter("ignore")
    start = time.perf_counter()
    plan: dict[str, float | None] = json.loads(args.plan)  # name -> estimated seconds
    t0 = time.perf_counter()
    x, meta = make_screen(args.n, args.dims, args.batches, args.treatments, args.seed)
    _emit(
        {
            "kind": "data",
            "seconds": time.perf_counter() - t0,
            "rss_mib": (_status_kib("VmRSS") or 0) / 1024,
            "batches": int(meta["batch"].nunique()),
            "plates": int(meta["plate"].nunique()),
            "controls": int(meta["is_control"].sum()),
        }
    )
    peak_kib = _status_kib("VmHWM") or 0
    resets = True
    with tempfile.TemporaryDirectory() as tmp:
        fns = _metric_fns(x, meta, args.sil_sample, Path(tmp))
        measured: dict[str, float] = {}
        for name in ORDER:
            if name not in plan:
                continue
            est = plan[name]
            if name == "evaluate_features":
                parts = [measured.get(m) for m in SUITE]
                # Two variants of the suite (+ plate normalisation).
                est = None if None in parts else 2 * sum(p for p in parts if p is not None)
            left = args.size_budget_s - (time.perf_counter() - start)
            if est is not None and (est > args.metric_cap_s or est > left):
                why = "cap" if est > args.metric_cap_s else "budget"
                _emit({"kind": "metric", "name": name, "skipped": why, "estimate_s": est})
                continue
            peak_kib = max(peak_kib, _status_kib("VmHWM") or 0)
            ok = _reset_peak()
            resets &= ok
            rss0 = _status_kib("VmRSS")
            c = time.process_time()
            load = os.getloadavg()[0]
            t = time.perf_counter()
            try:
                value = fns[name]()
                err = None
            except Exception as e:  # one failing metric must not lose the others
                value, err = None, f"{type(e).__name__}: {e}"
            dt = time.perf_counter() - t
            cpu = time.process_time() - c
            hwm = _status_kib("VmHWM") if ok else None
            measured[name] = dt
            rec: dict[str, Any] = {"kind": "metric", "name": name, "seconds": dt}
            rec["cpu_s"] = cpu  # CPU time of all the process' threads: robust to a busy host
            rec["load"] = load
            rec["value"] = None if value is None else float(value)
            if hwm is not None and rss0 is not None:
                rec["peak_rss_mib"] = hwm / 1024
                rec["extra_mib"] = (hwm - rss0) / 1024
            if err:
                rec["error"] = err
            _emit(rec)
    peak_kib = max(peak_kib, _status_kib("VmHWM") or 0)
    if not resets:  # VmHWM was never reset: the kernel's own peak is exact
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _emit({"kind": "done", "peak_rss_mib": peak_kib / 1024})
    return 0


# --------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------


def run_size(n: int, plan: dict[str, float | None], args: argparse.Namespace) -> dict[str, Any]:
    """Run one size in a fresh subprocess; returns its records and the child's peak RSS."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        "--n", str(n),
        "--dims", str(args.dims),
        "--batches", str(args.batches),
        "--treatments", str(args.treatments),
        "--seed", str(args.seed),
        "--sil-sample", str(args.sil_sample),
        "--size-budget-s", str(args.size_budget_s),
        "--metric-cap-s", str(args.metric_cap_s),
        "--plan", json.dumps(plan),
    ]  # fmt: skip
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    # Hard stop well past the budget: a metric that blows its estimate must not hang the run.
    killer = threading.Timer(args.size_budget_s * 1.5 + 120, proc.kill)
    killer.start()
    out: dict[str, Any] = {"n": n, "metrics": {}, "data": None, "killed": False}
    t = time.perf_counter()
    assert proc.stdout is not None
    for line in proc.stdout:
        if not line.startswith(MARK):
            continue
        rec = json.loads(line[len(MARK) :])
        if rec["kind"] == "data":
            out["data"] = rec
        elif rec["kind"] == "metric":
            out["metrics"][rec["name"]] = rec
            _progress(n, rec)
        elif rec["kind"] == "done":
            out["peak_rss_mib"] = rec["peak_rss_mib"]
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    killer.cancel()
    out["wall_s"] = time.perf_counter() - t
    out["killed"] = proc.returncode != 0
    if "peak_rss_mib" not in out:  # killed: the largest peak it reported, else the kernel's
        peaks = [m["peak_rss_mib"] for m in out["metrics"].values() if "peak_rss_mib" in m]
        out["peak_rss_mib"] = max(peaks) if peaks else usage.ru_maxrss / 1024
    return out


def _progress(n: int, rec: dict[str, Any]) -> None:
    if "skipped" in rec:
        est = rec.get("estimate_s")
        msg = f"skipped ({rec['skipped']}" + (f", ~{est:.0f} s est.)" if est else ")")
    else:
        msg = f"{rec['seconds']:.2f} s (cpu {rec.get('cpu_s', float('nan')):.2f} s)"
        msg += f", +{rec.get('extra_mib', float('nan')):.0f} MiB, load {rec.get('load', 0):.1f}"
    print(f"  n={n:>7}  {rec['name']:<32} {msg}", file=sys.stderr, flush=True)


def plan_for(
    n: int, history: dict[str, tuple[int, float]], models: dict[str, Callable[[int], float]]
) -> dict[str, float | None]:
    """Estimated seconds per metric at n from the last size where it ran (None: unknown)."""
    plan: dict[str, float | None] = {}
    for name in ORDER:
        if name in history:
            n0, t0 = history[name]
            plan[name] = t0 * models[name](n) / models[name](n0)
        else:
            plan[name] = None
    return plan


def _fmt_time(rec: dict[str, Any] | None, est: float | None) -> str:
    if rec is None:
        return "killed" if est is None else f"skip (~{est:.0f} s est.)"
    if "skipped" in rec:
        e = rec.get("estimate_s")
        return f"skip (~{e:.0f} s est.)" if e else f"skip ({rec['skipped']})"
    if "error" in rec:
        return "error"
    return f"{rec['seconds']:.1f} (cpu {rec.get('cpu_s', float('nan')):.1f})"


def _fmt_mem(rec: dict[str, Any] | None) -> str:
    if rec is None or "extra_mib" not in rec:
        return "-"
    return f"+{rec['extra_mib']:.0f}"


def report(
    results: list[dict[str, Any]],
    plans: list[dict[str, float | None]],
    models: dict[str, Callable[[int], float]],
) -> dict[str, Any]:
    """Print the tables (per metric, totals, references, growth); returns them as a dict."""
    sizes = [r["n"] for r in results]
    head = f"{'metric':<32}" + "".join(f"{f'n={n:,}':>30}" for n in sizes)
    print("\nWall time (s) and extra peak RSS over the resident profiles (MiB), per metric")
    print(head)
    print(f"{'':<32}" + "".join(f"{'time s':>22}{'+MiB':>8}" for _ in sizes))
    summary: dict[str, Any] = {"sizes": sizes, "rows": {}}

    def cell(r: dict[str, Any], plan: dict[str, float | None], name: str) -> str:
        rec = r["metrics"].get(name)
        t = _fmt_time(rec, plan.get(name))
        return f"{t:>22}{_fmt_mem(rec):>8}"

    for name in ORDER:
        if not any(name in r["metrics"] for r in results):
            continue
        print(f"{name:<32}" + "".join(cell(r, p, name) for r, p in zip(results, plans)))
        summary["rows"][name] = [r["metrics"].get(name) for r in results]

    # Totals: measured time, plus the estimate of what was skipped.
    print("\nSuite totals per size (evaluate_features' raw variant, metric by metric)")
    for label, names in (("raw-variant metrics, summed", SUITE), ("", [])):
        if not label:
            continue
        line = f"{label:<32}"
        for r, plan in zip(results, plans):
            done = sum(
                r["metrics"][m]["seconds"]
                for m in names
                if m in r["metrics"] and "seconds" in r["metrics"][m]
            )
            est, unknown = 0.0, 0
            for m in names:
                rec = r["metrics"].get(m)
                if rec is None or "seconds" not in rec:
                    e = (rec or {}).get("estimate_s", plan.get(m))
                    if e is None:
                        unknown += 1
                    else:
                        est += e
            txt = f"{done:.1f}" + (f" (+~{est:.0f} est.)" if est else "")
            txt += f" (+{unknown} unknown)" if unknown else ""
            line += f"{txt:>30}"
        print(line)
    line = f"{'  the same, CPU seconds':<32}"
    for r in results:
        cpu = sum(r["metrics"][m].get("cpu_s", 0.0) for m in SUITE if m in r["metrics"])
        line += f"{cpu:>30.1f}"
    print(line)
    line = f"{'evaluate_features, both variants':<32}"
    for r in results:
        rec = r["metrics"].get("evaluate_features")
        line += f"{_fmt_time(rec, None) if rec else 'not run':>30}"
    print(line)
    line = f"{'  its peak RSS (MiB)':<32}"
    for r in results:
        rec = r["metrics"].get("evaluate_features") or {}
        line += f"{rec.get('peak_rss_mib', float('nan')):>30.0f}"
    print(line)
    line = f"{'peak RSS of the process (MiB)':<32}"
    line += "".join(f"{r['peak_rss_mib']:>30.0f}" for r in results)
    print(line)
    line = f"{'RSS after making the data':<32}"
    line += "".join(f"{(r['data'] or {}).get('rss_mib', float('nan')):>30.0f}" for r in results)
    print(line)

    print("\nReferences on the same inputs (ours / theirs: < 1 means ours is faster)")
    for ref, ours in REF_PAIRS.items():
        line = f"{ref + ' vs ' + ours:<60}"
        for r in results:
            a, b = r["metrics"].get(ours), r["metrics"].get(ref)
            if a and b and "seconds" in a and "seconds" in b:
                va, vb = a.get("value"), b.get("value")
                agree = "" if va is None or vb is None else f" d={abs(va - vb):.1e}"
                line += f"  n={r['n']}: {a['seconds']:.2f}/{b['seconds']:.2f}"
                line += f" = {a['seconds'] / b['seconds']:.2f}{agree}"
            else:
                line += f"  n={r['n']}: -"
        print(line)
    if len(results) > 1:
        print("\nGrowth: time ratio between consecutive sizes and exponent p in t ~ n^p")
        print(f"{'metric':<32}" + "".join(
            f"{f'{a:,}->{b:,}':>30}" for a, b in zip(sizes, sizes[1:])
        ))  # fmt: skip
        summary["growth"] = {}
        for name in ORDER:
            cells, g = [], []
            for r0, r1 in zip(results, results[1:]):
                a, b = r0["metrics"].get(name), r1["metrics"].get(name)
                if a and b and "seconds" in a and "seconds" in b and a["seconds"] > 0:
                    ratio = b["seconds"] / a["seconds"]
                    p = math.log(ratio) / math.log(r1["n"] / r0["n"])
                    model = models[name](r1["n"]) / models[name](r0["n"])
                    cells.append(f"x{ratio:.1f} (p={p:.2f}, model x{model:.0f})")
                    g.append({"ratio": ratio, "exponent": p, "model_ratio": model})
                else:
                    cells.append("-")
                    g.append(None)
            if any(c != "-" for c in cells):
                print(f"{name:<32}" + "".join(f"{c:>30}" for c in cells))
                summary["growth"][name] = g
    return summary


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (driver, or ``--worker`` for one size)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000,500000", help="comma-separated n")
    ap.add_argument("--quick", action="store_true", help="sizes 2000,10000 only")
    ap.add_argument("--dims", type=int, default=384)
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--treatments", type=int, default=300)
    ap.add_argument("--sil-sample", type=int, default=2000, help="silhouette query sample")
    ap.add_argument("--size-budget-s", type=float, default=3600.0, help="per-size time budget")
    ap.add_argument("--metric-cap-s", type=float, default=1200.0, help="skip above this est.")
    ap.add_argument("--no-refs", action="store_true", help="skip sklearn / copairs (not faiss)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--skip", default="", help="comma-separated metric rows not to run")
    ap.add_argument(
        "--no-calibration", action="store_true", help="no 2,000-profile size for estimates"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--plan", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)

    sizes = [2000, 10000] if args.quick else [int(s) for s in args.sizes.split(",") if s.strip()]
    sizes = sorted(set(sizes))
    if not sizes or sizes[0] < 100:
        ap.error("--sizes: give sizes of at least 100 profiles")
    if sizes[0] > CALIBRATION_N and not args.no_calibration:
        sizes.insert(0, CALIBRATION_N)  # estimates need a size where everything runs
        print(f"(adding n={CALIBRATION_N} to calibrate the time estimates)", file=sys.stderr)
    test_frac = 1.0 / args.batches
    models = cost_models(args.sil_sample, test_frac)
    print(
        f"profiles x {args.dims} float32; {args.batches} batches of 384-well plates, "
        f"{CONTROLS_PER_PLATE} controls/plate, {args.treatments} treatments "
        f"({N_MOAS} MoAs, {DOSES} doses); silhouette sample {args.sil_sample}; "
        f"budget {args.size_budget_s:.0f} s/size, cap {args.metric_cap_s:.0f} s/metric; "
        f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}",
        file=sys.stderr,
    )
    history: dict[str, tuple[int, float]] = {}
    results, plans = [], []
    for n in sizes:
        plan = plan_for(n, history, models)
        for name in args.skip.split(","):
            plan.pop(name.strip(), None)
        if args.no_refs:
            plan = {k: v for k, v in plan.items() if not k.startswith("ref_") or "faiss" in k}
        res = run_size(n, plan, args)
        results.append(res)
        for name, est in plan.items():
            if name not in res["metrics"]:
                # Killed before it ran: at least the budget (or its estimate) for later sizes.
                history[name] = (n, est if est is not None else args.size_budget_s)
        plans.append(plan)
        for name, rec in res["metrics"].items():
            if "seconds" in rec:
                history[name] = (n, rec["seconds"])
            elif rec.get("estimate_s") is not None:
                # Not run: carry the estimate forward so later sizes skip it too.
                history[name] = (n, rec["estimate_s"])
        print(
            f"n={n}: {res['wall_s']:.0f} s wall, peak RSS {res['peak_rss_mib']:.0f} MiB"
            + (" (worker killed / failed)" if res["killed"] else ""),
            file=sys.stderr,
        )
    summary = report(results, plans, models)
    if args.json:
        payload = {"config": vars(args) | {"json": str(args.json)}, "results": results}
        payload["summary"] = summary
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps(payload, indent=1, default=str))
        tmp.replace(args.json)  # atomic
    return 0


if __name__ == "__main__":
    sys.exit(main())
