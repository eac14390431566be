"""A run's state and its checkpoints: what is saved, how a resume is checked and restored.

A checkpoint holds everything an exact resume needs: weights (teacher, centres), both
optimisers, the step and the position in the epoch, every RNG state (the torch state of each
process), the best validation result and the metrics.jsonl line count, plus what evaluation
needs to rebuild the method (config, label and batch indices, dataset, views).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DistributedSampler

from cdcl.config import Config, config_diff, with_defaults
from cdcl.data.training_set import TrainingSet
from cdcl.data.views import ViewsConfig
from cdcl.errors import CdclError
from cdcl.train import distributed as D
from cdcl.train.checkpoint import (
    CHECKPOINT_DIR,
    LAST,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from cdcl.train.data import RunData
from cdcl.train.metrics_log import MetricsLog
from cdcl.train.optim import Optimizers
from cdcl.train.schedules import Schedules

# Settings that may change between a run and its resumption without breaking exactness.
RESUME_FREE_KEYS = {
    "data.path",
    "data.num_workers",
    "train.max_steps",
    "train.log_every",
    "train.save_every_steps",
    "train.tensorboard",
    "train.device",
    "train.val_max_images",
}
RESUME_WARN_KEYS = {"train.epochs"}  # allowed, but the cosine schedules bend


@dataclass
class Progress:
    """Where the run stands: the part of the state that is not weights or RNGs."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    best: float | None = None  # best validation probe accuracy so far
    best_step: int | None = None
    last_val: dict[str, Any] = field(default_factory=dict)


@dataclass
class Run:
    """Everything set up for training: built once, then advanced step by step."""

    cfg: Config
    out: Path
    device: torch.device
    data: RunData
    views_cfg: ViewsConfig
    build_info: dict[str, Any]  # what rebuilds the method from a checkpoint
    method: torch.nn.Module
    opt: Optimizers
    train_set: TrainingSet
    sampler: DistributedSampler
    sched: Schedules
    steps_per_epoch: int
    metrics: MetricsLog
    use_amp: bool
    progress: Progress = field(default_factory=Progress)

    @property
    def last_path(self) -> Path:
        """checkpoints/last.pt of the run."""
        return self.out / CHECKPOINT_DIR / LAST

    def last_good(self) -> str:
        """Names the checkpoint a user can go back to (for error messages)."""
        if self.last_path.exists():
            return f"last good checkpoint: {self.last_path}"
        return "no checkpoint was written yet"


def open_checkpoint(cfg: Config, out: Path, resume: bool) -> dict[str, Any] | None:
    """The checkpoint to resume from (None: a new run); refuses to overwrite a run's checkpoints."""
    ckpt_dir = out / CHECKPOINT_DIR
    last_path = ckpt_dir / LAST
    existing = sorted(ckpt_dir.glob("*.pt")) if ckpt_dir.exists() else []
    if existing and not resume:
        raise CdclError(
            f"{out}: already holds checkpoints ({existing[0].name}); pass --resume to continue "
            "it or choose another --out"
        )
    ckpt = load_checkpoint(last_path) if resume and last_path.exists() else None
    if resume and ckpt is None and D.is_main():
        print(f"cdcl train: no {last_path}; starting a new run", file=sys.stderr)
    if ckpt is not None:
        check_resume(ckpt, cfg, last_path, D.world_size())
    return ckpt


def check_resume(ckpt: dict[str, Any], cfg: Config, path: Path, world: int) -> None:
    """Refuse a resume whose configuration or process count would break exactness."""
    # Keys added to the configuration since the checkpoint was written count at their defaults.
    diff = config_diff(with_defaults(ckpt["config"], str(path)), cfg.to_dict())
    for key in sorted(set(diff) & RESUME_WARN_KEYS):
        if D.is_main():
            print(
                f"cdcl train: warning: {key} changed {diff[key][0]} -> {diff[key][1]} since "
                f"{path}; schedules follow the new value",
                file=sys.stderr,
            )
    bad = sorted(set(diff) - RESUME_FREE_KEYS - RESUME_WARN_KEYS)
    if bad:
        what = "; ".join(f"{k}: {diff[k][0]!r} -> {diff[k][1]!r}" for k in bad[:5])
        raise CdclError(
            f"{path}: cannot resume, the configuration differs ({what}); "
            "use the original settings or train into another --out"
        )
    if int(ckpt.get("world_size", 1)) != world:
        raise CdclError(
            f"{path}: written by {ckpt.get('world_size')} process(es), resumed with {world}; "
            f"resume with torchrun --nproc-per-node {ckpt.get('world_size')}"
        )


def restore(run: Run, ckpt: dict[str, Any]) -> None:
    """Load weights, optimisers, progress and RNG states; drop metrics written after the save."""
    run.method.load_state_dict(ckpt["method"])
    run.opt.main.load_state_dict(ckpt["optimizer"])
    run.opt.probe.load_state_dict(ckpt["probe_optimizer"])
    p = run.progress
    p.step, p.epoch, p.step_in_epoch = (
        int(ckpt["step"]),
        int(ckpt["epoch"]),
        int(ckpt["step_in_epoch"]),
    )
    p.best, p.best_step = ckpt.get("best_metric"), ckpt.get("best_step")
    rng = ckpt["rng"]
    set_rng_state({**rng, "torch": rng["torch_per_rank"][D.rank()]})
    run.metrics.truncate(int(ckpt.get("metrics_lines", 0)))
    if D.is_main():
        print(
            f"cdcl train: resuming {run.out} at step {p.step} (epoch {p.epoch}, "
            f"{p.step_in_epoch}/{run.steps_per_epoch})",
            file=sys.stderr,
        )


def save(run: Run, names: list[str]) -> None:
    """Write checkpoints ``names`` (rank 0; every process contributes its torch RNG state)."""
    # Never overwrite a good checkpoint with weights an optimiser step has made non-finite
    # (the loss of that step was still finite). Weights are identical on every process.
    finite = all(
        bool(torch.isfinite(t).all())
        for t in run.method.state_dict().values()
        if torch.is_floating_point(t)
    )
    if not finite:
        raise CdclError(
            f"weights became non-finite at step {run.progress.step}; lower train.lr or check "
            f"the data ({run.last_good()})"
        )
    torch_states = [
        s.cpu() for s in D.gather_tensors(torch.get_rng_state().to(_gather_device(run.device)))
    ]
    if not D.is_main():
        return
    rng = rng_state()
    rng["torch_per_rank"] = torch_states
    state = _state(run, rng)
    for name in names:
        save_checkpoint(run.out / CHECKPOINT_DIR / name, state)


def _state(run: Run, rng: dict[str, Any]) -> dict[str, Any]:
    p, ds, cfg = run.progress, run.data.ds, run.cfg
    feature_dim = getattr(run.method, "feat_dim", None)
    return {
        "method": run.method.state_dict(),
        "optimizer": run.opt.main.state_dict(),
        "probe_optimizer": run.opt.probe.state_dict(),
        "step": p.step,
        "epoch": p.epoch,
        "step_in_epoch": p.step_in_epoch,
        "steps_per_epoch": run.steps_per_epoch,
        "world_size": D.world_size(),
        "best_metric": p.best,
        "best_step": p.best_step,
        "rng": rng,
        "config": cfg.to_dict(),
        "label_of": dict(run.data.label_of),
        "batch_of": dict(run.data.batch_of),
        "build": run.build_info,
        "dataset": {
            "path": str(Path(cfg.data.path).resolve()),
            "name": ds.info.name,
            "source": ds.info.source,
            "channels": list(ds.channels),
            "image_size": list(ds.image_size),
        },
        "views": _plain_views(run.views_cfg),
        "feature_dim": None if feature_dim is None else int(feature_dim),
        "val": dict(p.last_val),
        "metrics_lines": run.metrics.lines,
    }


def _gather_device(device: torch.device) -> torch.device:
    # NCCL only moves CUDA tensors; gloo only CPU ones.
    return device if D.is_dist() and device.type == "cuda" else torch.device("cpu")


def _plain_views(views_cfg: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(views_cfg):
        d = dataclasses.asdict(views_cfg)
        return json.loads(json.dumps(d, default=list))
    return {}
