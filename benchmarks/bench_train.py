"""Benchmark: CPU training throughput of every method, and CDCL's overhead over its backbone.

Run: ``.venv/bin/python benchmarks/bench_train.py [--quick] [--data DIR] [--threads 2]``.
Prints figures (nothing is asserted).

1. images/s of each synthetic preset (the demo's settings on the ``small`` screen), measured by
   the real trainer (``cdcl.train.loop.train`` with ``train.max_steps``) from its own per-step
   ``images_per_s`` records; warm-up steps and the first step of each epoch (whose window holds
   the epoch-end validation and checkpoint) are left out.
2. CDCL, in the same run: (a) a full training step as the trainer runs it (data loading with
   pairing and views, teacher and student forward, loss, backward, clipping, optimiser, probe,
   EMA, centres) against (b) the bare student backbone forward + backward on the same
   pre-made view tensors (same batch, same two backbone calls, loss = a sum). The ratio a/b and
   the overhead (a/b - 1)·100 are printed against (b) and against (b) + the teacher backbone's
   forward on the two global views (inherent to DINO), with a breakdown of where the rest goes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from cdcl.config import load_config
from cdcl.data import synthetic
from cdcl.data.training_set import TrainingSet
from cdcl.methods import build_method
from cdcl.methods.base import StepState
from cdcl.train.loop import prepare_data, train
from cdcl.train.schedules import build_schedules

PRESETS = [
    "synthetic-supervised",
    "synthetic-dino",
    "synthetic-dino-cb",
    "synthetic-cdcl",
    "synthetic-byol",
    "synthetic-byol-cb",
]
DEMO_DATA = Path("/tmp/dfull/data")  # the lead's demo screen, reused when it is the same build
TARGET_OVERHEAD = 15.0


# ---------------------------------------------------------------- data


def screen(data: Path | None, tmp: Path) -> Path:
    """The ``small`` synthetic screen (seed 0): ``data`` or the demo's if valid, else generated."""
    key = synthetic.build_key("small", 0)
    for cand in [p for p in (data, DEMO_DATA) if p is not None]:
        if synthetic.reusable(cand, key):
            return cand
    if data is not None:
        print(f"{data}: not a valid `small` seed-0 screen; generating one instead")
    t = time.perf_counter()
    out = synthetic.generate(tmp / "small", "small", 0)
    print(f"generated the small screen in {time.perf_counter() - t:.1f} s")
    return out


# ---------------------------------------------------------------- 1. trainer throughput


def trainer_throughput(preset: str, data: Path, steps: int, warmup: int, tmp: Path) -> dict:
    """Steady-state images/s of ``preset`` from the trainer's own per-step records."""
    over = [
        f"data.path={data}",
        f"train.max_steps={warmup + steps}",
        "train.log_every=1",  # one record per step: each holds that step's images/s
        "train.save_every_steps=null",
        "train.val_max_images=64",
    ]
    cfg = load_config(preset, over)
    out = tmp / f"run-{preset}"
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):
        summary = train(cfg, out)
    wall = time.perf_counter() - t0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if r.get("kind") == "train"]
    spe = summary["steps_per_epoch"]
    # Step s's window starts after step s-1; if s-1 ended an epoch it holds validation too.
    kept = [r for r in recs if r["step"] > warmup and not ((r["step"] - 1) % spe == 0)]
    bs = cfg.train.batch_size
    secs = sum(bs / r["images_per_s"] for r in kept)
    return {
        "preset": preset,
        "images_per_s": len(kept) * bs / secs if kept else float("nan"),
        "steps_timed": len(kept),
        "batch_size": bs,
        "views": cfg.views.resolved(64).n_views(_view_kind(cfg.method.name)),
        "wall_s": wall,
    }


def _view_kind(name: str) -> str:
    if name == "supervised":
        return "single"
    return "byol" if name.startswith("byol") else "dino"


# ---------------------------------------------------------------- 2. CDCL overhead


class CdclRig:
    """The trainer's CDCL step, rebuilt piece by piece (same objects, same order) with timers."""

    def __init__(self, data: Path, overrides: tuple[str, ...] = (), in_ram: bool = False) -> None:
        cfg = load_config("synthetic-cdcl", [f"data.path={data}", *overrides])
        self.cfg = cfg
        t = cfg.train
        rd = prepare_data(cfg)
        ds = rd.ds
        if in_ram:  # what-if: the whole store read once into memory, per-item reads from RAM
            images = ds.read_many(np.arange(len(ds)))
            ds.read = lambda i: images[int(i)]  # type: ignore[method-assign]
        views_cfg = cfg.views.resolved(ds.image_size[0])
        torch.manual_seed(t.seed)
        self.method = build_method(
            cfg.method,
            cfg.model,
            in_chans=len(ds.channels),
            img_size=int(views_cfg.global_size),
            n_classes=len(rd.label_of),
            n_batches=len(rd.batch_of),
            batch_shares=rd.batch_shares,
            n_local=int(views_cfg.n_local),
        )
        m = self.method
        probe_ids = {id(p) for p in m.probe.parameters()}
        groups = []
        for g in m.param_groups(t.weight_decay):
            params = [p for p in g["params"] if id(p) not in probe_ids and p.requires_grad]
            if params:
                groups.append({**g, "params": params, "decay": g["weight_decay"] > 0})
        self.opt = torch.optim.AdamW(groups, lr=t.lr)
        self.probe_opt = torch.optim.AdamW(m.probe.parameters(), lr=t.probe_lr, weight_decay=0)
        self.student_params = [p for p in m.student_parameters() if p.requires_grad]
        self.last_layer = list(m.last_layer_parameters())
        self.train_set = TrainingSet(
            ds,
            rd.train_rows,
            rd.label_of,
            rd.batch_of,
            views_cfg,
            m.view_kind,
            bool(m.cross_batch),
            t.seed,
        )
        self.sampler = DistributedSampler(
            self.train_set, num_replicas=1, rank=0, shuffle=True, seed=t.seed, drop_last=True
        )
        self.steps_per_epoch = len(self.sampler) // t.batch_size
        self.sched = build_schedules(t, cfg.method, self.steps_per_epoch)
        self.step = 0
        self.batches = self._batches()
        m.train()

    def _batches(self) -> Iterator[dict]:
        t = self.cfg.train
        epoch = 0
        while True:
            self.sampler.set_epoch(epoch)
            self.train_set.set_epoch(epoch)
            loader = DataLoader(
                self.train_set,
                batch_size=t.batch_size,
                sampler=self.sampler,
                drop_last=True,
                num_workers=self.cfg.data.num_workers,
                collate_fn=self.train_set.collate,  # views made per batch, as the trainer does
                generator=torch.Generator().manual_seed(t.seed * 100_003 + epoch),
            )
            yield from loader
            epoch += 1

    def state(self) -> StepState:
        """Schedules at the current step applied to the optimiser; the method's StepState."""
        v = self.sched.at(self.step)
        for g in self.opt.param_groups:
            g["lr"] = v["lr"]
            g["weight_decay"] = v["wd"] if g.get("decay", True) else 0.0
        return StepState(
            step=self.step,
            epoch=self.step / self.steps_per_epoch,
            teacher_temp=v["teacher_temp"],
            ema_momentum=v["ema_momentum"],
            freeze_last_layer=bool(v["freeze_last_layer"]),
        )

    def full_step(self) -> dict[str, float]:
        """One trainer step; seconds of data, forward+loss, backward and optimiser+EMA."""
        t0 = time.perf_counter()
        batch = next(self.batches)
        t1 = time.perf_counter()
        st = self.state()
        loss, _ = self.method.loss(batch, st)
        if not torch.isfinite(loss):
            raise RuntimeError(f"loss {float(loss)} at benchmark step {self.step}")
        t2 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        self.probe_opt.zero_grad(set_to_none=True)
        loss.backward()
        t3 = time.perf_counter()
        if self.cfg.train.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.student_params, self.cfg.train.clip_grad)
        if st.freeze_last_layer:
            for p in self.last_layer:
                p.grad = None
        self.opt.step()
        self.probe_opt.step()
        self.method.after_step(st)
        t4 = time.perf_counter()
        self.step += 1
        return {
            "total": t4 - t0,
            "data": t1 - t0,
            "forward_loss": t2 - t1,
            "backward": t3 - t2,
            "optim_ema": t4 - t3,
        }

    def loss_fwd_bwd(self, batch: dict) -> float:
        """Seconds of method.loss + backward on a fixed batch (no data, no optimiser)."""
        st = self.state()
        t0 = time.perf_counter()
        loss, _ = self.method.loss(batch, st)
        self.opt.zero_grad(set_to_none=True)
        self.probe_opt.zero_grad(set_to_none=True)
        loss.backward()
        return time.perf_counter() - t0

    def bare_student(self, views: list[torch.Tensor]) -> float:
        """Seconds of the student backbone's two calls (globals, locals) forward + backward."""
        bb = self.method.student_backbone
        t0 = time.perf_counter()
        out = bb(torch.cat(views[:2])).sum() + bb(torch.cat(views[2:])).sum()
        bb.zero_grad(set_to_none=True)
        out.backward()
        return time.perf_counter() - t0

    def teacher_forward(self, views: list[torch.Tensor]) -> float:
        """Seconds of the teacher backbone's forward on the two global views (no grad)."""
        t0 = time.perf_counter()
        with torch.no_grad():
            self.method.teacher_backbone(torch.cat(views[:2]))
        return time.perf_counter() - t0


def _median(fn: Callable[[], float], n: int) -> float:
    return statistics.median(fn() for _ in range(n))


def cdcl_overhead(data: Path, reps: int, warmup: int, profile: bool) -> dict[str, Any]:
    """Full CDCL step vs the bare student backbone on the same views, interleaved."""
    rig = CdclRig(data)
    for _ in range(warmup):
        rig.full_step()
    fixed = next(rig.batches)
    views = fixed["views"]
    full: list[dict[str, float]] = []
    bare, teach, lossbwd = [], [], []
    for _ in range(reps):  # interleaved so that drift in machine load hits every figure alike
        full.append(rig.full_step())
        bare.append(rig.bare_student(views))
        teach.append(rig.teacher_forward(views))
        lossbwd.append(rig.loss_fwd_bwd(fixed))
    med = {k: statistics.median(f[k] for f in full) for k in full[0]}
    b, tf, lb = statistics.median(bare), statistics.median(teach), statistics.median(lossbwd)
    res: dict[str, Any] = {
        "batch_size": rig.cfg.train.batch_size,
        "n_views": len(views),
        "view_shapes": [list(v.shape[1:]) for v in views[:1] + views[2:3]],
        "reps": reps,
        "full_step_s": med["total"],
        "full": med,
        "bare_student_fwd_bwd_s": b,
        "teacher_fwd_s": tf,
        "loss_fwd_bwd_s": lb,
        # Derived: what method.loss + backward adds beyond the two backbones.
        "head_loss_s": lb - b - tf,
    }
    res["ratio_vs_student"] = med["total"] / b
    res["overhead_vs_student_pct"] = (med["total"] / b - 1) * 100
    res["ratio_vs_student_teacher"] = med["total"] / (b + tf)
    res["overhead_vs_student_teacher_pct"] = (med["total"] / (b + tf) - 1) * 100
    if profile:
        res["profile"] = profile_step(rig)
    return res


def data_what_if(data: Path, reps: int, warmup: int) -> dict[str, dict[str, float]]:
    """Median full-step and data seconds of the trainer's CDCL step under data-path variants."""
    rigs = {
        "as the demo runs it (num_workers=0, zarr reads)": CdclRig(data),
        "images preloaded in RAM (num_workers=0)": CdclRig(data, in_ram=True),
        "data.num_workers=1 (zarr reads)": CdclRig(data, ("data.num_workers=1",)),
    }
    for rig in rigs.values():
        for _ in range(warmup):
            rig.full_step()
    base = next(iter(rigs.values()))
    views = next(base.batches)["views"]
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in rigs}
    backbones = []  # student fwd+bwd + teacher fwd, interleaved with the variants
    for _ in range(reps):
        for k, rig in rigs.items():
            runs[k].append(rig.full_step())
        backbones.append(base.bare_student(views) + base.teacher_forward(views))
    out = {
        k: {m: statistics.median(r[m] for r in v) for m in ("total", "data")}
        for k, v in runs.items()
    }
    for v in out.values():
        v["overhead_pct"] = (v["total"] / statistics.median(backbones) - 1) * 100
    return out


def profile_step(rig: CdclRig, steps: int = 3) -> str:
    """torch.profiler table (self CPU time) of a few full steps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            rig.full_step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)


# ---------------------------------------------------------------- report


def print_overhead(r: dict[str, Any]) -> None:
    """The CDCL overhead figures and breakdown."""
    ms = 1000.0
    f = r["full"]
    bs = r["batch_size"]
    print(
        f"\nCDCL step, batch {bs}, {r['n_views']} views (global {r['view_shapes'][0]}, local "
        f"{r['view_shapes'][1]}), median of {r['reps']} interleaved repetitions:"
    )
    print(
        f"  (a) full trainer step          {f['total'] * ms:8.1f} ms  ({bs / f['total']:.0f} img/s)"
    )
    print(f"  (b) bare student fwd+bwd       {r['bare_student_fwd_bwd_s'] * ms:8.1f} ms")
    print(f"      teacher fwd (2 globals)    {r['teacher_fwd_s'] * ms:8.1f} ms")
    print(
        f"  a/b = {r['ratio_vs_student']:.2f}: overhead {r['overhead_vs_student_pct']:.0f}% vs the "
        f"bare student; a/(b+teacher) = {r['ratio_vs_student_teacher']:.2f}: overhead "
        f"{r['overhead_vs_student_teacher_pct']:.0f}% (target <= {TARGET_OVERHEAD:.0f}%)"
    )
    parts = [
        ("data (read, pairing, views, collate)", f["data"]),
        ("student backbone fwd+bwd", r["bare_student_fwd_bwd_s"]),
        ("teacher backbone fwd", r["teacher_fwd_s"]),
        ("heads + DINO/Barlow loss + centres + probe (fwd+bwd)", r["head_loss_s"]),
        ("clip + AdamW + probe opt + EMA", f["optim_ema"]),
    ]
    total = sum(p[1] for p in parts)
    print("  breakdown (share of the full step):")
    for name, s in parts:
        print(f"    {name:<52} {s * ms:8.1f} ms  {100 * s / f['total']:5.1f}%")
    label = "sum of the parts (measured separately)"
    print(f"    {label:<52} {total * ms:8.1f} ms  {100 * total / f['total']:5.1f}%")
    print(
        f"  in the full step itself: forward+loss {f['forward_loss'] * ms:.1f} ms, backward "
        f"{f['backward'] * ms:.1f} ms"
    )
    if "profile" in r:
        print("\n  torch.profiler, 3 full CDCL steps, top ops by self CPU time:")
        print(r["profile"])


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print the figures."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="few steps (under a minute)")
    p.add_argument("--data", type=Path, default=None, help="a `small` seed-0 synthetic screen")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--presets", nargs="*", default=PRESETS, help="presets to time")
    p.add_argument("--no-profile", action="store_true", help="skip the torch.profiler table")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps, warmup, reps = (4, 2, 4) if args.quick else (15, 3, 10)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_train_") as d:
        tmp = Path(d)
        data = screen(args.data, tmp)
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} threads; data {data}; "
            f"{steps} timed steps after {warmup} warm-up per preset; load average "
            + " ".join(f"{x:.1f}" for x in os.getloadavg())
            + " (other processes on these cores slow every figure below)"
        )
        print(
            f"\n{'preset':<22} {'views':>5} {'batch':>5} {'images/s':>9} {'steps':>5} {'wall s':>7}"
        )
        for preset in args.presets:
            r = trainer_throughput(preset, data, steps, warmup, tmp)
            print(
                f"{preset:<22} {r['views']:>5} {r['batch_size']:>5} {r['images_per_s']:>9.1f} "
                f"{r['steps_timed']:>5} {r['wall_s']:>7.1f}"
            )
        r = cdcl_overhead(data, reps, warmup, profile=not (args.quick or args.no_profile))
        print_overhead(r)
        if not args.quick:
            print(
                "\n  what-if on the data path (CDCL step; overhead vs student fwd+bwd + teacher "
                "fwd, timed interleaved):"
            )
            for k, v in data_what_if(data, max(4, reps // 2), warmup).items():
                print(
                    f"    {k:<50} step {v['total'] * 1000:7.1f} ms, waiting for data "
                    f"{v['data'] * 1000:6.1f} ms, overhead {v['overhead_pct']:4.0f}%"
                )
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; load average at the end {load}")


if __name__ == "__main__":
    main()
