"""GPU check (issue 10, item 4): the screen-scale pipeline on one CUDA device, one table.

Run: ``python benchmarks/gpu_check.py --out DIR`` on a machine with CUDA (under 8 minutes by
default; ``--budget-s`` caps it), or ``--dry-run`` for the same pipeline on the CPU at tiny sizes
(what the test suite runs). Prints one table (stage, figure, unit, seconds, peak RSS) and writes
it with the commands, sizes and device to ``DIR/gpu_check.json``. Exit 0 when every stage ran,
1 when one failed or ran out of time, 2 without CUDA (and without ``--dry-run``).

Stages, each a ``python -m cdcl ...`` subprocess (the CLI only, so that the check keeps working
while the internals change):

1. ``cdcl synth``: the simulated screen (``--synth-px``, default 64 px, 5 channels: the simulator
   has five fixed Cell Painting channels) with its plate/treatment/batch design.
2. the ``rxrx1-cdcl`` input from it: the images read from the dataset's ``images.zarr``, a sixth
   channel added (the mean of two simulated channels, so it is not a copy of one), saved as one
   ``.npy`` and rebuilt with ``cdcl build table --npz ... --image-size 256``: 256 px, 6 channels.
3. ``cdcl train --preset rxrx1-cdcl`` for ``--steps`` steps within the first epoch (bf16 on
   CUDA): images/s from the run's ``metrics.jsonl``, the first ``--warmup-steps`` left out.
   Any per-step timing the trainer logs with "view", "wait" or "load" in its name (e.g. the share
   of a step spent building views) gets its own row; the JSON lists the keys it found.
4. ``cdcl embed`` (one process) on the held-out batches and on all images: images/s from the
   difference of the two runs, so that start-up (imports, model, dataset) cancels; then
   ``torchrun --standalone --nproc-per-node 1 -m cdcl embed`` on all images (images/s with
   start-up, next to the one-process figure with start-up in the note).
5. ``cdcl evaluate --features`` on a generated profile table (``--profiles`` x ``--dims``, 384-well
   plates, 32 DMSO wells per plate, ``--treatments`` over ``--moas`` MoAs, ``--eval-batches``
   batches): the wall time of the whole metric suite, with results.json's own timings in the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

MARKER = ".gpu_check"  # marks a work directory this script made (safe to replace)
RESULT_FILE = "gpu_check.json"
PRESET = "rxrx1-cdcl"
WELLS_PER_PLATE = 384
CONTROLS_PER_PLATE = 32

# Sizes on a CUDA machine (fit in 8 minutes) and for --dry-run (CPU, well under a minute).
GPU_SIZES: dict[str, Any] = {
    "synth_preset": "small",
    "synth_px": 64,
    "batches": 8,
    "plates": 2,
    "sites": 6,  # 8 batches x 2 plates x 56 wells x 6 sites = 5376 images, 4032 for training
    "test_batches": 2,
    "image_size": 256,
    "channels": 6,
    "steps": 40,
    "batch_size": 92,
    "log_every": 5,
    "warmup_steps": 10,
    "workers": max(1, min(os.cpu_count() or 2, 16) - 2),
    "embed_batch_size": 256,
    "profiles": 100_000,
    "dims": 384,
    "eval_batches": 20,
    "treatments": 500,
    "moas": 25,
    "budget_s": 450.0,  # + start-up and clean-up: under 8 minutes
}
DRY_SIZES: dict[str, Any] = {
    **GPU_SIZES,
    "synth_preset": "tiny",
    "synth_px": 32,
    "batches": 4,
    "plates": 1,
    "sites": 3,  # 4 x 1 x 8 x 3 = 96 images, 48 for training
    "image_size": 32,
    "steps": 4,
    "batch_size": 8,
    "log_every": 1,
    "warmup_steps": 1,
    "workers": 0,
    "embed_batch_size": 32,
    "profiles": 2000,
    "eval_batches": 4,
    "treatments": 50,
    "moas": 10,
    "budget_s": 300.0,
}
# Dry run only: a small DINO head (K = 256 instead of 4096) so that a CPU step takes < 1 s.
DRY_TRAIN_OVERRIDES = ["method.out_dim=256", "method.hidden_dim=256", "method.bottleneck_dim=64"]


@dataclass
class Row:
    """One line of the table."""

    stage: str
    figure: float | None
    unit: str
    seconds: float
    peak_rss_mib: float | None = None
    status: str = "ok"  # ok | failed | timeout | skipped
    note: str = ""
    command: list[str] | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Proc:
    """A finished subprocess."""

    rc: int | None  # None: killed at the time limit
    seconds: float
    peak_rss_mib: float
    stdout: str
    log: Path
    skipped: bool = False  # not started: the budget was spent


class Runner:
    """Runs CLI stages as subprocesses within one time budget, logging each to DIR/logs."""

    def __init__(self, logs: Path, env: dict[str, str], budget_s: float) -> None:
        self.logs = logs
        self.env = env
        self.deadline = time.monotonic() + budget_s

    def left(self) -> float:
        """Seconds left of the budget."""
        return self.deadline - time.monotonic()

    def run(self, name: str, cmd: list[str]) -> Proc:
        """Run ``cmd`` (killed with its process group when the budget runs out)."""
        log = self.logs / f"{name}.log"
        limit = self.left()
        if limit <= 0:
            log.write_text("not started: no time left of --budget-s\n")
            return Proc(None, 0.0, math.nan, "", log, skipped=True)
        print(f"[gpu_check] {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        with log.open("w") as err:
            p = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env=self.env,
                start_new_session=True,  # its own process group: a timeout kills the workers too
            )
            out, rc, rss = self._wait(p, limit)
        seconds = time.perf_counter() - t0
        with log.open("a") as f:
            f.write(f"\n--- stdout ---\n{out}")
        return Proc(rc, seconds, rss, out, log)

    @staticmethod
    def _wait(p: subprocess.Popen, limit: float) -> tuple[str, int | None, float]:
        """Reap the child with wait4 (for its own peak RSS), killing its group past ``limit``."""
        chunks: list[str] = []
        reader = threading.Thread(target=lambda: chunks.append(p.stdout.read()), daemon=True)
        reader.start()  # drain stdout so that a chatty child never blocks on a full pipe
        end = time.monotonic() + limit
        rc: int | None = None
        while True:
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                rc = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > end:
                os.killpg(p.pid, signal.SIGKILL)
                _, status, usage = os.wait4(p.pid, 0)
                break
            time.sleep(0.05)
        p.returncode = -9 if rc is None else rc  # reaped here: Popen must not wait again
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)  # stray workers of a finished command
        reader.join(timeout=30)
        # Linux: a reaped child's ru_maxrss is the largest RSS in its process tree (KiB).
        return "".join(chunks), rc, usage.ru_maxrss / 1024


# ---------------------------------------------------------------- data


def widen_channels(src: Path, n_channels: int, out_dir: Path) -> tuple[Path, Path, list[str]]:
    """The synthetic screen's images with ``n_channels`` channels as one .npy + its table.

    Channels past the simulator's own are the mean of two of them (k mod C and k+1 mod C), so
    that each is a plausible, distinct stain image rather than a copy.
    """
    import zarr

    info = json.loads((src / "dataset.json").read_text())
    names = list(info["channels"])
    samples = pd.read_parquet(src / "samples.parquet").sort_values("image")
    arr = zarr.open_array(str(src / "images.zarr"), mode="r")
    x = np.asarray(arr[samples["image"].to_numpy()])  # (N, C, H, W)
    c = x.shape[1]
    planes = [x[:, k] for k in range(min(c, n_channels))]
    for k in range(c, n_channels):
        a, b = k % c, (k + 1) % c
        mix = (x[:, a].astype(np.uint32) + x[:, b].astype(np.uint32)) // 2
        planes.append(mix.astype(x.dtype))
        names.append(f"{names[a]}_{names[b]}_mix")
    wide = np.stack(planes, axis=1)
    npy = out_dir / "images.npy"
    np.save(npy, wide)
    table = out_dir / "samples.parquet"
    samples.drop(columns=["image"]).to_parquet(table, index=False)
    return npy, table, names[:n_channels]


def make_profiles(
    n: int, dims: int, n_batches: int, n_treatments: int, n_moas: int, seed: int = 0
) -> pd.DataFrame:
    """A ``Metadata_*`` profile table of a compound screen: batch >> plate, MoA, compound effects."""
    rng = np.random.default_rng(seed)
    row = np.arange(n)
    plate = row // WELLS_PER_PLATE
    n_plates = int(plate[-1]) + 1
    n_batches = max(2, min(n_batches, n_plates))
    batch = plate * n_batches // n_plates
    well_ix = row % WELLS_PER_PLATE
    is_control = well_ix % (WELLS_PER_PLATE // CONTROLS_PER_PLATE) == 0
    treat = np.full(n, -1)
    slots = np.flatnonzero(~is_control)
    treat[slots] = rng.permutation(slots.size) % n_treatments  # every treatment in every batch
    moa_of = np.arange(n_treatments) % n_moas
    x = rng.standard_normal((n, dims), dtype=np.float32)
    x += 3.0 * rng.standard_normal((n_batches, dims), dtype=np.float32)[batch]
    x += 0.5 * rng.standard_normal((n_plates, dims), dtype=np.float32)[plate]
    effect = 1.5 * rng.standard_normal((n_moas, dims), dtype=np.float32)[moa_of]
    effect += 0.7 * rng.standard_normal((n_treatments, dims), dtype=np.float32)
    x[~is_control] += effect[treat[~is_control]]
    rows_letters = np.array(list("ABCDEFGHIJKLMNOP"))
    well = np.char.add(
        rows_letters[well_ix // 24], np.char.zfill((well_ix % 24 + 1).astype(str), 2)
    )
    compound = np.char.add("cmpd", np.char.zfill(treat.astype(str), 4))
    moa = np.char.add("moa", np.char.zfill(moa_of[np.maximum(treat, 0)].astype(str), 2))
    meta = pd.DataFrame(
        {
            "Metadata_batch": np.char.add("b", np.char.zfill(batch.astype(str), 3)),
            "Metadata_plate": np.char.add("p", np.char.zfill(plate.astype(str), 5)),
            "Metadata_well": well,
            "Metadata_compound": np.where(is_control, "DMSO", compound),
            "Metadata_moa": np.where(is_control, None, moa.astype(object)),
            "Metadata_is_control": is_control,
        }
    )
    meta.insert(3, "Metadata_treatment", meta["Metadata_compound"])
    feats = pd.DataFrame(x, columns=[f"f{j:03d}" for j in range(dims)])
    return pd.concat([meta, feats], axis=1)


# ---------------------------------------------------------------- metrics.jsonl


def train_throughput(metrics: Path, batch_size: int, warmup_steps: int) -> dict[str, Any]:
    """Steady images/s from the trainer's own windows, leaving out steps <= ``warmup_steps``."""
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = sorted(
        (r for r in records if r.get("kind", "train") == "train"), key=lambda r: r["step"]
    )
    if not train:
        raise ValueError(f"{metrics}: no training records")
    windows, prev = [], 0
    for r in train:
        steps = int(r["step"]) - prev
        prev = int(r["step"])
        ips = float(r.get("images_per_s") or 0.0)
        if steps > 0 and ips > 0:
            windows.append((int(r["step"]), steps, steps * batch_size / ips, r))
    measured = [w for w in windows if w[0] - w[1] >= warmup_steps] or windows[-1:]
    images = sum(s for _, s, _, _ in measured) * batch_size
    secs = sum(t for _, _, t, _ in measured)
    # Any timing the trainer logs about the views / the data loader (names vary across versions).
    timing_keys = sorted(
        {
            k
            for _, _, _, r in measured
            for k, v in r.items()
            if re.search(r"view|wait|load|data|time", k)
            and k != "images_per_s"
            and isinstance(v, int | float)
            and not isinstance(v, bool)
        }
    )
    timings = {
        k: float(np.mean([r[k] for _, _, _, r in measured if isinstance(r.get(k), int | float)]))
        for k in timing_keys
    }
    return {
        "images_per_s": images / secs if secs > 0 else math.nan,
        "measured_steps": sum(s for _, s, _, _ in measured),
        "first_window_images_per_s": float(train[0].get("images_per_s") or math.nan),
        "windows": [{"to_step": st, "steps": s, "seconds": round(t, 4)} for st, s, t, _ in windows],
        "record_keys": sorted({k for r in train for k in r}),
        "timings": timings,
    }


def count_profiles(stdout: str, path: Path) -> int:
    """Rows written by `cdcl embed`: from its summary line, else from the Parquet footer."""
    m = re.search(r"(\d+) image profiles", stdout)
    if m:
        return int(m.group(1))
    import pyarrow.parquet as pq

    return int(pq.ParquetFile(path).metadata.num_rows)


# ---------------------------------------------------------------- the check


def device_info(env: dict[str, str]) -> dict[str, Any]:
    """torch version and the CUDA device (asked in a subprocess: no CUDA context held here)."""
    code = (
        "import json, torch; c = torch.cuda.is_available(); print(json.dumps({"
        "'torch': torch.__version__, 'cuda': c, 'cuda_version': torch.version.cuda, "
        "'name': torch.cuda.get_device_name(0) if c else None, "
        "'bf16': bool(c and torch.cuda.is_bf16_supported()), 'cpus': __import__('os').cpu_count()}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def git_commit() -> str | None:
    """The commit of the checkout this script runs from (None outside git)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def failed_row(stage: str, unit: str, p: Proc, cmd: list[str]) -> Row:
    """A row for a stage that failed or ran out of time, pointing at its log."""
    status = "skipped" if p.skipped else "timeout" if p.rc is None else "failed"
    tail = [x for x in p.log.read_text().strip().splitlines() if x.strip()]
    tail = [x for x in tail if x != "--- stdout ---"][-3:]
    note = f"{status} (rc {p.rc}); log {p.log}: " + " | ".join(tail)
    return Row(stage, None, unit, p.seconds, None, status, note[:400], cmd)


def cdcl(*args: Any) -> list[str]:
    """A ``python -m cdcl`` command line."""
    return [sys.executable, "-m", "cdcl", *map(str, args)]


class UsageError(Exception):
    """Bad flags or a foreign --out: one line, exit 2."""


def check(s: argparse.Namespace, out: Path, gpu: bool) -> tuple[list[Row], list[str]]:
    """Run every stage; returns the table's rows and notes."""
    work = out / "work"
    if work.exists():
        if not (work / MARKER).exists():
            raise UsageError(f"{work}: exists and was not made by gpu_check; choose another --out")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / MARKER).write_text("made by benchmarks/gpu_check.py\n")
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run stays on the CPU even on a GPU machine
    if s.threads:
        # On a shared, busy CPU, torch's default intra-op threads spin against each other
        # (measured here: 24 s per dry-run step with 2 threads, 2 s with 1).
        env["OMP_NUM_THREADS"] = str(s.threads)
    runner = Runner(logs, env, s.budget_s)
    rows: list[Row] = []
    notes: list[str] = []
    image_stages(s, runner, work, gpu, rows, notes)  # stops at the first failed stage
    rows.append(evaluate_stage(s, runner, work))  # independent of the image stages
    if not s.keep:
        t0 = time.perf_counter()
        shutil.rmtree(work)
        print(f"[gpu_check] removed {work} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return rows, notes


def image_stages(
    s: argparse.Namespace, runner: Runner, work: Path, gpu: bool, rows: list[Row], notes: list[str]
) -> None:
    """synth -> build table -> train -> embed, appending a row per stage (stops on a failure)."""
    # 1. the simulated screen
    synth = work / "synth"
    cmd = cdcl(
        "synth", "--out", synth, "--preset", s.synth_preset, "--image-size", s.synth_px,
        "--batches", s.batches, "--plates", s.plates, "--sites", s.sites,
        "--test-batches", s.test_batches, "--val-batches", 0, "--no-progress",
    )  # fmt: skip
    p = runner.run("synth", cmd)
    if p.rc != 0:
        rows.append(failed_row("synth", "images/s", p, cmd))
        return
    n_images = int(json.loads((synth / "dataset.json").read_text())["n_images"])
    split = pd.read_parquet(synth / "samples.parquet")["split"].astype(str)
    n_train = int((split == "train").sum())
    if s.steps * s.batch_size > n_train:
        raise UsageError(
            f"--steps {s.steps} x --batch-size {s.batch_size} > {n_train} training images: "
            "the run would cross an epoch boundary (validation, checkpoint); raise --sites or "
            "--batches, or lower --steps"
        )
    unit = f"images/s ({s.synth_px} px, 5 ch, 1 process)"
    rows.append(Row("synth", n_images / p.seconds, unit, p.seconds, p.peak_rss_mib, command=cmd))

    # 2. rxrx1-cdcl's input: 6 channels, 256 px, through `cdcl build table`
    t0 = time.perf_counter()
    npy, table, channels = widen_channels(synth, s.channels, work)
    secs = time.perf_counter() - t0
    rows.append(
        Row(
            f"{s.channels}-channel array",
            n_images / secs,
            "images/s (read zarr, add channels, save .npy; in this process)",
            secs,
        )
    )
    screen = work / "screen"
    cmd = cdcl(
        "build", "table", "--samples", table, "--npz", npy, "--channel-axis", 1,
        "--channels", ",".join(channels), "--image-size", s.image_size,
        "--batch-col", "batch", "--plate-col", "plate", "--well-col", "well",
        "--site-col", "site", "--treatment-col", "treatment", "--compound-col", "compound",
        "--moa-col", "moa", "--cell-type-col", "cell_type", "--split-col", "split",
        "--control-query", "is_control", "--out", screen,
        "--workers", max(1, s.workers), "--name", "gpu-check-screen",
    )  # fmt: skip
    p = runner.run("build", cmd)
    if p.rc != 0:
        rows.append(failed_row("build table", "images/s", p, cmd))
        return
    npy.unlink()  # the store holds them now
    unit = f"images/s ({s.image_size} px, {s.channels} ch, {max(1, s.workers)} workers)"
    rows.append(
        Row("build table", n_images / p.seconds, unit, p.seconds, p.peak_rss_mib, command=cmd)
    )

    # 3. training throughput
    run = work / "run"
    amp = "bf16" if gpu else "auto"
    cmd = cdcl(
        "train", "--preset", PRESET, "--data", screen, "--out", run,
        f"train.max_steps={s.steps}", f"train.batch_size={s.batch_size}",
        f"train.log_every={s.log_every}", f"data.num_workers={s.workers}",
        f"train.amp={amp}", f"train.device={'cuda' if gpu else 'cpu'}",
        # The preset's 256 -> 224 / 112 px views, scaled to the image size (the same at 256).
        f"views.resize={s.image_size}", f"views.global_size={round(s.image_size * 224 / 256)}",
        f"views.local_size={round(s.image_size * 112 / 256)}", "train.save_every_steps=null",
        *([] if gpu else DRY_TRAIN_OVERRIDES), *s.train_override,
    )  # fmt: skip
    p = runner.run("train", cmd)
    if p.rc != 0:
        rows.append(failed_row("train", "images/s", p, cmd))
        return
    tp = train_throughput(run / "metrics.jsonl", s.batch_size, s.warmup_steps)
    unit = (
        f"images/s ({PRESET}, {'bf16' if gpu else 'fp32 CPU'}, batch {s.batch_size}, "
        f"steps {s.warmup_steps + 1}-{s.steps})"
    )
    note = (
        f"first {s.warmup_steps} step(s) left out ({tp['first_window_images_per_s']:.0f} "
        "images/s at step 1); seconds = the whole command"
    )
    rows.append(
        Row(
            "train",
            tp["images_per_s"],
            unit,
            p.seconds,
            p.peak_rss_mib,
            note=note,
            command=cmd,
            details=tp,
        )
    )
    for key, value in tp["timings"].items():
        rows.append(Row(f"train: {key}", value, "mean over the measured steps, as logged", 0.0))
    if not tp["timings"]:
        notes.append(
            "views share of a step: not logged by this trainer (metrics.jsonl train keys: "
            + ", ".join(tp["record_keys"])
            + ")"
        )

    # 4. embedding throughput
    base = ["--data", screen, "--checkpoint", "last", "--level", "image", "--no-progress"]
    base += ["--batch-size", s.embed_batch_size]
    runs: dict[str, tuple[int, Proc, list[str]]] = {}
    for part in ("test", "all"):
        dest = work / f"embed_{part}.parquet"
        cmd = cdcl("embed", run, *base, "--split", part, "--out", dest)
        p = runner.run(f"embed_{part}", cmd)
        if p.rc != 0:
            rows.append(failed_row(f"embed ({part})", "images/s", p, cmd))
            break
        runs[part] = (count_profiles(p.stdout, dest), p, cmd)
    if len(runs) == 2:
        (n_small, p_small, _), (n_all, p_all, cmd) = runs["test"], runs["all"]
        dt = p_all.seconds - p_small.seconds
        if n_all > n_small and dt > 0.05:
            rate, how = (n_all - n_small) / dt, "start-up cancelled"
        else:
            rate, how = n_all / p_all.seconds, "with start-up (the two runs did not differ)"
        note = (
            f"({n_all} - {n_small}) images / ({p_all.seconds:.1f} - {p_small.seconds:.1f}) s; "
            f"{n_all / p_all.seconds:.0f} images/s with start-up"
        )
        rows.append(
            Row(
                "embed, 1 process",
                rate,
                f"images/s ({how}, batch {s.embed_batch_size})",
                p_all.seconds,
                p_all.peak_rss_mib,
                note=note,
                command=cmd,
            )
        )
        dest = work / "embed_torchrun.parquet"
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
            "-m", "cdcl", "embed", str(run), *map(str, base), "--split", "all", "--out", str(dest),
        ]  # fmt: skip
        p = runner.run("embed_torchrun", cmd)
        if p.rc != 0:
            rows.append(failed_row("embed, torchrun 1 process", "images/s", p, cmd))
        else:
            n = count_profiles(p.stdout, dest)
            rows.append(
                Row(
                    "embed, torchrun 1 process",
                    n / p.seconds,
                    f"images/s (with start-up, {n} images)",
                    p.seconds,
                    p.peak_rss_mib,
                    note=f"1 process without torchrun, with start-up: {n_all / p_all.seconds:.0f} images/s",
                    command=cmd,
                )
            )


def evaluate_stage(s: argparse.Namespace, runner: Runner, work: Path) -> Row:
    """The metric suite (`cdcl evaluate --features`) on a generated profile table."""
    t0 = time.perf_counter()
    prof = make_profiles(s.profiles, s.dims, s.eval_batches, s.treatments, s.moas)
    prof_file = work / "profiles.parquet"
    prof.to_parquet(prof_file, index=False)
    del prof
    gen_s = time.perf_counter() - t0
    ev = work / "evaluate"
    cmd = cdcl("evaluate", "--features", prof_file, "--out", ev, "--no-umap")
    p = runner.run("evaluate", cmd)
    what = f"{s.profiles} x {s.dims} profiles"
    if p.rc != 0:
        return failed_row("evaluate --features", f"s ({what})", p, cmd)
    res = json.loads((ev / "results.json").read_text())
    timings = res.get("timings_s", {})
    slowest = sorted(timings.items(), key=lambda kv: -float(kv[1]))[:3]
    note = "slowest: " + ", ".join(f"{k} {float(v):.1f} s" for k, v in slowest)
    note += f"; table generated in {gen_s:.1f} s (not counted)"
    return Row(
        "evaluate --features",
        p.seconds,
        f"s for the metric suite ({what}, {s.eval_batches} batches, no UMAP)",
        p.seconds,
        p.peak_rss_mib,
        note=note,
        command=cmd,
        details={"timings_s": timings},
    )


# ---------------------------------------------------------------- output


def format_table(rows: list[Row]) -> str:
    """The rows as one aligned text table."""

    def fig(r: Row) -> str:
        if r.figure is None or not math.isfinite(r.figure):
            return r.status
        return f"{r.figure:.3g}" if abs(r.figure) < 100 else f"{r.figure:,.0f}"

    def rss(r: Row) -> str:
        return (
            ""
            if r.peak_rss_mib is None or not math.isfinite(r.peak_rss_mib)
            else f"{r.peak_rss_mib:,.0f}"
        )

    head = ("stage", "figure", "unit", "seconds", "peak RSS MiB")
    body = [(r.stage, fig(r), r.unit, f"{r.seconds:.1f}", rss(r)) for r in rows]
    widths = [max(len(x[i]) for x in (head, *body)) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(head, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in body]
    return "\n".join(lines)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON atomically (temp file + rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; sizes default to the GPU or the dry-run profile."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--out", type=Path, required=True, help="output directory (gpu_check.json, logs/)"
    )
    ap.add_argument(
        "--dry-run", action="store_true", help="the same pipeline on the CPU, tiny sizes"
    )
    ap.add_argument(
        "--threads", type=int, default=None,
        help="OMP_NUM_THREADS of the stages (default: unset; 1 with --dry-run)",
    )  # fmt: skip
    ap.add_argument("--keep", action="store_true", help="keep OUT/work (datasets, run, profiles)")
    ap.add_argument(
        "--train-override", action="append", default=[], metavar="KEY=VALUE",
        help="extra `cdcl train` override (repeatable), e.g. data.num_workers=8",
    )  # fmt: skip
    for key, value in GPU_SIZES.items():
        kind = type(value) if key != "synth_preset" else str
        ap.add_argument(
            "--" + key.replace("_", "-"), type=kind, default=None,
            help=f"default {value} (dry run {DRY_SIZES[key]})",
        )  # fmt: skip
    args = ap.parse_args(argv)
    if args.threads is None and args.dry_run:
        args.threads = 1
    sizes = DRY_SIZES if args.dry_run else GPU_SIZES
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the check; 0 all stages ran, 1 a stage failed, 2 no CUDA (without --dry-run)."""
    args = parse_args(argv)
    env = {**os.environ}
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""
    dev = device_info(env)
    if not args.dry_run and not dev["cuda"]:
        print(
            "gpu_check: no CUDA device is available; use --dry-run for the CPU check at tiny sizes",
            file=sys.stderr,
        )
        return 2
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    try:
        rows, notes = check(args, out, gpu=not args.dry_run)
    except UsageError as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - t0
    ok = all(r.status == "ok" for r in rows)
    mode = "dry run (CPU)" if args.dry_run else f"GPU: {dev['name']}"
    print(f"\ngpu_check, {mode}, torch {dev['torch']}, {dev['cpus']} CPUs, commit {git_commit()}")
    print(format_table(rows))
    for r in rows:
        if r.note:
            print(f"  {r.stage}: {r.note}")
    for n in notes:
        print(f"  note: {n}")
    print(f"wall {wall:.1f} s; {out / RESULT_FILE}")
    sizes = {k: getattr(args, k) for k in GPU_SIZES}
    payload = {
        "mode": "dry-run" if args.dry_run else "gpu",
        "started": started,
        "wall_s": wall,
        "ok": ok,
        "device": dev,
        "commit": git_commit(),
        "sizes": sizes,
        "rows": [asdict(r) for r in rows],
        "notes": notes,
    }
    write_json(out / RESULT_FILE, payload)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
