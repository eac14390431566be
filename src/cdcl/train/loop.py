"""The training loop (docs/design.md §6), in the shape of DINO's ``main_dino.py``.

``train`` sets a run up (:func:`set_up`: data, method, optimisers, training set, schedules,
and the checkpoint it resumes from), then calls :func:`train_one_epoch` until the last epoch,
validating and saving at every epoch's end. One step (:func:`train_step`) sets the schedules'
values for its global step, computes the method's loss, and steps the optimisers.

The loop knows a method only through its interface (``loss``, ``after_step``, ``embed``,
``param_groups``, ``student_parameters``, ``last_layer_parameters``, ``probe``). Schedules are
pure functions of the global step; the epoch's sample order is a pure function of (seed, epoch)
and views are drawn from per-item RNGs, so a run resumed from a mid-epoch checkpoint continues
exactly where the killed one stopped.
"""

from __future__ import annotations

import dataclasses
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from cdcl.config import Config
from cdcl.data.dataset_dir import atomic_write_text
from cdcl.errors import CdclError
from cdcl.methods import build_method
from cdcl.methods.base import StepState
from cdcl.train import distributed as D
from cdcl.train.checkpoint import CHECKPOINT_DIR, LAST
from cdcl.train.data import RunData, epoch_loader, prepare_data, to_device, training_set
from cdcl.train.metrics_log import METRICS_FILE, MetricsLog, StepLogger, format_duration
from cdcl.train.optim import build_optimizers
from cdcl.train.run_state import Run, open_checkpoint, restore, save
from cdcl.train.schedules import build_schedules
from cdcl.train.validate import validate

__all__ = ["CONFIG_FILE", "METRICS_FILE", "prepare_data", "train"]

CONFIG_FILE = "config.yaml"


def train(cfg: Config, out: Path, resume: bool = False) -> dict[str, Any]:
    """Train ``cfg`` into run directory ``out``; returns a summary (rank 0's view)."""
    device = D.init(cfg.train.device)
    try:
        summary = _train(cfg, Path(out), resume, device)
    except BaseException:
        D.cleanup(barrier=False)
        raise
    D.cleanup()
    return summary


def _train(cfg: Config, out: Path, resume: bool, device: torch.device) -> dict[str, Any]:
    ckpt = open_checkpoint(cfg, out, resume)
    run = set_up(cfg, out, device)
    if ckpt is not None:
        restore(run, ckpt)
    if D.is_main():
        atomic_write_text(out / CONFIG_FILE, cfg.to_yaml())
        ckpt_dir = out / CHECKPOINT_DIR
        for stale in ckpt_dir.glob(".*.tmp*") if ckpt_dir.exists() else []:
            stale.unlink()  # a temporary left by a process killed while saving
    t, p = cfg.train, run.progress
    stop_at = (
        run.sched.total_steps if t.max_steps is None else min(run.sched.total_steps, t.max_steps)
    )
    logger = StepLogger(
        run.metrics,
        t.log_every,
        stop_at,
        t.batch_size * D.world_size(),
        run.steps_per_epoch,
        device,
        start_step=p.step,
    )
    if D.is_main():
        print(f"cdcl train: {schedule_line(run, stop_at)}", file=sys.stderr)
    run.method.train()
    stopped_early = False
    # (A checkpoint taken after an epoch's last step but before its end still owes that epoch's
    # validation and boundary checkpoint, hence the second condition.)
    while p.epoch < t.epochs and (p.step < stop_at or p.step_in_epoch == run.steps_per_epoch):
        stopped_early = train_one_epoch(run, logger, stop_at)
        if stopped_early:
            break
        p.epoch += 1
        p.step_in_epoch = 0
        with logger.epoch_end(p.step):
            save(run, validate(run))  # the epoch-boundary checkpoint: nothing to skip on resume
    if stopped_early:
        with logger.epoch_end(p.step):
            save(run, validate(run))
    run.metrics.close()
    return _summary(run, logger.elapsed())


def schedule_line(run: Run, stop_at: int) -> str:
    """The run's schedule as configured (after overrides), and what is left of it."""
    t, p, spe = run.cfg.train, run.progress, run.steps_per_epoch
    images = t.batch_size * D.world_size()
    total = run.sched.total_steps
    line = (
        f"schedule: {t.epochs} epochs x {spe} steps of {images} images = {total} steps, "
        f"{total * images:,} images seen (train.epochs={t.epochs}, "
        f"train.batch_size={t.batch_size})"
    )
    if stop_at < total:
        line += f"; stopping at step {stop_at} (train.max_steps={t.max_steps})"
    if p.step:
        line += f"; {max(stop_at - p.step, 0)} steps left from step {p.step}"
    return (
        f"{line}; the time a step takes on {run.device.type} is measured over the first "
        "steps, and an estimate of the run's length follows"
    )


def set_up(cfg: Config, out: Path, device: torch.device) -> Run:
    """Data, method (same initial weights on every process), optimisers, training set, schedules."""
    t = cfg.train
    data = prepare_data(cfg)
    views_cfg = cfg.views.resolved(data.ds.image_size[0])
    build_info = _build_info(data, views_cfg)
    method = _build_method(cfg, build_info, device)
    opt = build_optimizers(method, t)
    train_set = training_set(cfg, data, views_cfg, method, device)
    world = D.world_size()
    sampler = DistributedSampler(
        train_set, num_replicas=world, rank=D.rank(), shuffle=True, seed=t.seed, drop_last=True
    )
    steps_per_epoch = len(sampler) // t.batch_size
    if steps_per_epoch == 0:
        raise CdclError(
            f"{cfg.data.path}: {len(train_set)} training images, fewer than one batch of "
            f"{t.batch_size} x {world} process(es); lower train.batch_size"
        )
    if D.is_main():
        print(
            f"cdcl train: {cfg.method.name} on {data.ds.info.name}: {len(data.train_rows)} "
            f"training images, {len(data.label_of)} classes, {len(data.batch_of)} batches, "
            f"{len(data.val_rows)} validation images; {world} process(es) x batch "
            f"{t.batch_size} on {device.type}, {steps_per_epoch} steps/epoch",
            file=sys.stderr,
        )
        out.mkdir(parents=True, exist_ok=True)
    return Run(
        cfg=cfg,
        out=out,
        device=device,
        data=data,
        views_cfg=views_cfg,
        build_info=build_info,
        method=method,
        opt=opt,
        train_set=train_set,
        sampler=sampler,
        sched=build_schedules(t, cfg.method, steps_per_epoch),
        steps_per_epoch=steps_per_epoch,
        metrics=MetricsLog(out, enabled=D.is_main(), tensorboard=t.tensorboard),
        use_amp=t.amp == "bf16" or (t.amp == "auto" and device.type == "cuda"),
    )


def _build_info(data: RunData, views_cfg: Any) -> dict[str, Any]:
    """The arguments (besides the configs) that rebuild the method from a checkpoint."""
    return {
        "in_chans": len(data.ds.channels),
        "img_size": int(views_cfg.global_size),
        "n_classes": len(data.label_of),
        "n_batches": len(data.batch_of),
        "batch_shares": data.batch_shares,
        "n_local": int(views_cfg.n_local),
    }


def _build_method(cfg: Config, build_info: dict[str, Any], device: torch.device) -> Any:
    """The method with identical initial weights on every process, then per-process RNG streams."""
    seed, rank = cfg.train.seed, D.rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    method = build_method(cfg.method, cfg.model, **build_info).to(device)
    D.broadcast_module(method)
    # Per-process streams (drop-path etc.) from here on.
    torch.manual_seed(seed + rank)
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    return method


def train_one_epoch(run: Run, logger: StepLogger, stop_at: int) -> bool:
    """Train the rest of the current epoch; True if ``stop_at`` (train.max_steps) ended it early."""
    t, p = run.cfg.train, run.progress
    loader = epoch_loader(run.cfg, run.train_set, run.sampler, p.epoch, p.step_in_epoch, run.device)
    bar = logger.progress_bar(p.epoch, t.epochs, p.step_in_epoch)
    try:
        for batch in loader:
            values = run.sched.at(p.step)
            logger.count_batch(batch)
            loss, logs, grad_norm = train_step(run, batch, values)
            p.step += 1
            p.step_in_epoch += 1
            epoch = p.epoch + p.step_in_epoch / run.steps_per_epoch
            logger.after_step(p.step, epoch, values, loss, logs, grad_norm, bar)
            if p.step >= stop_at and p.step_in_epoch < run.steps_per_epoch:
                return True
            if t.save_every_steps and p.step % t.save_every_steps == 0:
                save(run, [LAST])
        return False
    finally:
        bar.close()


def train_step(
    run: Run, batch: dict[str, Any], values: dict[str, Any]
) -> tuple[torch.Tensor, dict[str, Any], float | None]:
    """One optimisation step at the schedules' ``values``; returns loss, logs and gradient norm."""
    p, method = run.progress, run.method
    run.opt.set_schedule(values)
    state = _step_state(
        {
            "step": p.step,
            "epoch": p.epoch + p.step_in_epoch / run.steps_per_epoch,
            "teacher_temp": values["teacher_temp"],
            "ema_momentum": values["ema_momentum"],
            "freeze_last_layer": values["freeze_last_layer"],
        }
    )
    batch = to_device(run.train_set.finish(batch, run.device), run.device)
    with torch.autocast(device_type=run.device.type, dtype=torch.bfloat16, enabled=run.use_amp):
        loss, logs = method.loss(batch, state)
    # Every process must agree to stop, or the others would wait in the next all-reduce.
    non_finite = D.all_reduce_sum([0.0 if torch.isfinite(loss) else 1.0], run.device)[0]
    if non_finite:
        raise CdclError(
            f"loss is {float(loss.detach())} at step {p.step} on {int(non_finite)} "
            f"process(es); lower train.lr or check the data ({run.last_good()})"
        )
    run.opt.zero_grad()
    loss.backward()
    grad_norm = run.opt.step(run.cfg.train.clip_grad, bool(values["freeze_last_layer"]))
    method.after_step(state)
    return loss, logs, grad_norm


def _step_state(values: dict[str, Any]) -> StepState:
    names = {f.name for f in dataclasses.fields(StepState)}
    return StepState(**{k: v for k, v in values.items() if k in names})


def _summary(run: Run, seconds: float) -> dict[str, Any]:
    """The run's summary (and rank 0's closing line)."""
    p = run.progress
    if D.is_main():
        msg = (
            f"cdcl train: done at step {p.step} (epoch {p.epoch}) in {format_duration(seconds)}; "
            f"checkpoint {run.last_path}"
        )
        if p.best is not None:
            msg += f"; best validation probe accuracy {p.best:.3f} at step {p.best_step}"
        print(msg, file=sys.stderr)
    return {
        "out": str(run.out),
        "step": p.step,
        "epoch": p.epoch,
        "steps_per_epoch": run.steps_per_epoch,
        "best_probe_acc": p.best,
        "best_step": p.best_step,
        "last": str(run.last_path),
    }
