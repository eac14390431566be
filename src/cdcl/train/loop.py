"""The training loop (DESIGN §6): one readable loop over any method.

The loop knows a method only through its interface (``loss``, ``after_step``, ``embed``,
``param_groups``, ``student_parameters``, ``last_layer_parameters``, ``probe``). Schedules are
pure functions of the global step; the epoch's sample order is a pure function of (seed, epoch)
and views are drawn from per-item RNGs, so a run resumed from a mid-epoch checkpoint continues
exactly where the killed one stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from cdcl.config import Config, config_diff
from cdcl.data.dataset_dir import Dataset, atomic_write_text, open_dataset
from cdcl.data.splits import apply_subset, assign_split
from cdcl.data.views import center_view
from cdcl.errors import CdclError
from cdcl.train import distributed as D
from cdcl.train.checkpoint import (
    BEST,
    CHECKPOINT_DIR,
    LAST,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from cdcl.train.schedules import build_schedules

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"

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


# ---------------------------------------------------------------- data


@dataclass
class RunData:
    """The dataset and the index spaces a run trains in."""

    ds: Dataset
    train_rows: np.ndarray  # image indices of the training split
    val_rows: np.ndarray  # image indices of validation images whose treatment is a known label
    label_of: dict[str, int]  # treatment -> class (controls are a class too)
    batch_of: dict[str, int]  # training batch -> index
    batch_shares: list[float]  # share of each training batch among training images


def prepare_data(cfg: Config) -> RunData:
    """Open the dataset, apply split and subset, and index labels and batches of the training part."""
    if not cfg.data.path:
        raise CdclError("no dataset given: pass --data DIR (or data.path=DIR)")
    ds = open_dataset(cfg.data.path)
    s = ds.samples
    split = assign_split(s, ds.info.source, cfg.data.split)
    split = apply_subset(s, split, cfg.data.subset, seed=cfg.train.seed)
    part = split.to_numpy()
    image = s["image"].to_numpy()
    train_rows = image[part == "train"]
    if len(train_rows) == 0:
        raise CdclError(f"{cfg.data.path}: the split leaves no training images")
    treat = s["treatment"].astype(str).to_numpy()
    batch = s["batch"].astype(str).to_numpy()
    train_mask = part == "train"
    label_of = {t: i for i, t in enumerate(sorted(set(treat[train_mask])))}
    batches = sorted(set(batch[train_mask]))
    batch_of = {b: i for i, b in enumerate(batches)}
    counts = np.array([(batch[train_mask] == b).sum() for b in batches], dtype=np.float64)
    shares = (counts / counts.sum()).tolist()
    val_mask = (part == "val") & np.isin(treat, list(label_of))
    val_rows = image[val_mask]
    if cfg.train.val_max_images is not None and len(val_rows) > cfg.train.val_max_images:
        rng = np.random.default_rng(cfg.train.seed)
        val_rows = np.sort(rng.choice(val_rows, size=cfg.train.val_max_images, replace=False))
    return RunData(ds, train_rows, val_rows, label_of, batch_of, shares)


class SkipSampler(Sampler[int]):
    """Yields a DistributedSampler's epoch order without its first ``skip`` indices (resume)."""

    def __init__(self, inner: DistributedSampler, skip: int) -> None:
        self.inner = inner
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        return iter(list(self.inner)[self.skip :])

    def __len__(self) -> int:
        return max(0, len(self.inner) - self.skip)


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(_to_device(v, device) for v in x)
    return x


def eval_images(ds: Dataset, idx: np.ndarray, views_cfg: Any) -> torch.Tensor:
    """Plate-standardised centre views (the evaluation input) of images ``idx``."""
    return center_view(torch.from_numpy(ds.standardized(idx)), views_cfg)


# ---------------------------------------------------------------- the run


def _make_step_state(values: dict[str, Any]) -> Any:
    from cdcl.methods.base import StepState

    names = {f.name for f in dataclasses.fields(StepState)}
    return StepState(**{k: v for k, v in values.items() if k in names})


class _Metrics:
    """metrics.jsonl (rank 0 only), optional TensorBoard, and a line count for resume."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool) -> None:
        self.path = out / METRICS_FILE
        self.enabled = enabled
        self.lines = 0
        self.tb = None
        if enabled and self.path.exists():
            self.lines = sum(1 for _ in self.path.open())
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                warnings.warn(
                    "train.tensorboard=true but tensorboard is not installed", stacklevel=2
                )

    def truncate(self, n_lines: int) -> None:
        """Drop lines written after the checkpoint being resumed (they will be rewritten)."""
        if not self.enabled or not self.path.exists():
            return
        keep = self.path.read_text().splitlines(keepends=True)[:n_lines]
        atomic_write_text(self.path, "".join(keep))
        self.lines = len(keep)

    def write(self, record: dict[str, Any]) -> None:
        """Append one JSON line (and mirror numbers to TensorBoard)."""
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.lines += 1
        if self.tb is not None:
            kind = record.get("kind", "train")
            for k, v in record.items():
                if isinstance(v, int | float) and not isinstance(v, bool) and k != "step":
                    self.tb.add_scalar(f"{kind}/{k}", v, record["step"])

    def close(self) -> None:
        """Flush TensorBoard."""
        if self.tb is not None:
            self.tb.close()


def _check_resume(ckpt: dict[str, Any], cfg: Config, path: Path, world: int) -> None:
    diff = config_diff(ckpt["config"], cfg.to_dict())
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


def train(cfg: Config, out: Path, resume: bool = False) -> dict[str, Any]:
    """Train ``cfg`` into run directory ``out``; returns a summary (rank 0's view)."""
    device = D.init(cfg.train.device)
    try:
        return _train(cfg, Path(out), resume, device)
    finally:
        D.cleanup()


def _train(cfg: Config, out: Path, resume: bool, device: torch.device) -> dict[str, Any]:
    from cdcl.data.training_set import TrainingSet
    from cdcl.methods import build_method

    rank, world, main = D.rank(), D.world_size(), D.is_main()
    t = cfg.train
    ckpt_dir = out / CHECKPOINT_DIR
    last_path = ckpt_dir / LAST
    existing = sorted(ckpt_dir.glob("*.pt")) if ckpt_dir.exists() else []
    if existing and not resume:
        raise CdclError(
            f"{out}: already holds checkpoints ({existing[0].name}); pass --resume to continue "
            "it or choose another --out"
        )
    ckpt = load_checkpoint(last_path) if resume and last_path.exists() else None
    if resume and ckpt is None and main:
        print(f"cdcl train: no {last_path}; starting a new run", file=sys.stderr)
    if ckpt is not None:
        _check_resume(ckpt, cfg, last_path, world)

    data = prepare_data(cfg)
    ds = data.ds
    views_cfg = cfg.views.resolved(ds.image_size[0])
    in_chans = len(ds.channels)
    img_size = int(views_cfg.global_size)

    # Identical initial weights on every process; per-process streams for drop-path etc. after.
    random.seed(t.seed)
    np.random.seed(t.seed)
    torch.manual_seed(t.seed)
    method = build_method(
        cfg.method,
        cfg.model,
        in_chans=in_chans,
        img_size=img_size,
        n_classes=len(data.label_of),
        n_batches=len(data.batch_of),
        batch_shares=data.batch_shares,
        n_local=int(views_cfg.n_local),
    ).to(device)
    D.broadcast_module(method)
    torch.manual_seed(t.seed + rank)
    random.seed(t.seed + rank)
    np.random.seed(t.seed + rank)

    probe_params = list(method.probe.parameters())
    probe_ids = {id(p) for p in probe_params}
    groups = []
    for g in method.param_groups(t.weight_decay):
        params = [p for p in g["params"] if id(p) not in probe_ids and p.requires_grad]
        if params:
            decay = float(g.get("weight_decay", 0.0)) > 0
            groups.append({**g, "params": params, "decay": decay})
    optimizer = torch.optim.AdamW(groups, lr=t.lr)
    if t.probe_optimizer == "sgd":
        probe_opt: torch.optim.Optimizer = torch.optim.SGD(
            probe_params, lr=t.probe_lr, momentum=0.9
        )
    else:
        probe_opt = torch.optim.AdamW(probe_params, lr=t.probe_lr, weight_decay=0.0)
    student_params = [p for p in method.student_parameters() if p.requires_grad]
    last_layer = list(method.last_layer_parameters())
    all_params = [p for p in method.parameters() if p.requires_grad]

    train_set = TrainingSet(
        ds,
        data.train_rows,
        data.label_of,
        data.batch_of,
        views_cfg,
        method.view_kind,
        bool(method.cross_batch),
        t.seed,
        # Views in the loader workers on the CPU (they overlap with the step); on the GPU there.
        views_in_loader=device.type != "cuda",
    )
    sampler = DistributedSampler(
        train_set, num_replicas=world, rank=rank, shuffle=True, seed=t.seed, drop_last=True
    )
    steps_per_epoch = len(sampler) // t.batch_size
    if steps_per_epoch == 0:
        raise CdclError(
            f"{cfg.data.path}: {len(train_set)} training images, fewer than one batch of "
            f"{t.batch_size} x {world} process(es); lower train.batch_size"
        )
    sched = build_schedules(t, cfg.method, steps_per_epoch)
    if main:
        print(
            f"cdcl train: {cfg.method.name} on {ds.info.name}: {len(data.train_rows)} training "
            f"images, {len(data.label_of)} classes, {len(data.batch_of)} batches, "
            f"{len(data.val_rows)} validation images; {world} process(es) x batch "
            f"{t.batch_size} on {device.type}, {steps_per_epoch} steps/epoch",
            file=sys.stderr,
        )

    step, epoch, step_in_epoch = 0, 0, 0
    best: float | None = None
    best_step: int | None = None
    if main:
        out.mkdir(parents=True, exist_ok=True)
    metrics = _Metrics(out, enabled=main, tensorboard=t.tensorboard)
    if ckpt is not None:
        method.load_state_dict(ckpt["method"])
        optimizer.load_state_dict(ckpt["optimizer"])
        probe_opt.load_state_dict(ckpt["probe_optimizer"])
        step, epoch, step_in_epoch = (
            int(ckpt["step"]),
            int(ckpt["epoch"]),
            int(ckpt["step_in_epoch"]),
        )
        best, best_step = ckpt.get("best_metric"), ckpt.get("best_step")
        rng = ckpt["rng"]
        set_rng_state({**rng, "torch": rng["torch_per_rank"][rank]})
        metrics.truncate(int(ckpt.get("metrics_lines", 0)))
        if main:
            print(
                f"cdcl train: resuming {out} at step {step} (epoch {epoch}, "
                f"{step_in_epoch}/{steps_per_epoch})",
                file=sys.stderr,
            )
    if main:
        atomic_write_text(out / CONFIG_FILE, cfg.to_yaml())
        for stale in ckpt_dir.glob(".*.tmp*") if ckpt_dir.exists() else []:
            stale.unlink()  # a temporary left by a process killed while saving

    use_amp = t.amp == "bf16" or (t.amp == "auto" and device.type == "cuda")
    feature_dim = getattr(method, "feat_dim", None)
    build_info = {
        "in_chans": in_chans,
        "img_size": img_size,
        "n_classes": len(data.label_of),
        "n_batches": len(data.batch_of),
        "batch_shares": data.batch_shares,
        "n_local": int(views_cfg.n_local),
    }
    last_val: dict[str, Any] = {}

    def last_good() -> str:
        if last_path.exists():
            return f"last good checkpoint: {last_path}"
        return "no checkpoint was written yet"

    def save(names: list[str]) -> None:
        # Never overwrite a good checkpoint with weights an optimiser step has made non-finite
        # (the loss of that step was still finite). Weights are identical on every process.
        finite = all(
            bool(torch.isfinite(t).all())
            for t in method.state_dict().values()
            if torch.is_floating_point(t)
        )
        if not finite:
            raise CdclError(
                f"weights became non-finite at step {step}; lower train.lr or check the data "
                f"({last_good()})"
            )
        # Every process contributes its torch RNG state; only rank 0 writes.
        torch_states = [
            s.cpu() for s in D.gather_tensors(torch.get_rng_state().to(_gather_device(device)))
        ]
        if not main:
            return
        rng = rng_state()
        rng["torch_per_rank"] = torch_states
        state = {
            "method": method.state_dict(),
            "optimizer": optimizer.state_dict(),
            "probe_optimizer": probe_opt.state_dict(),
            "step": step,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "steps_per_epoch": steps_per_epoch,
            "world_size": world,
            "best_metric": best,
            "best_step": best_step,
            "rng": rng,
            "config": cfg.to_dict(),
            "label_of": dict(data.label_of),
            "batch_of": dict(data.batch_of),
            "build": build_info,
            "dataset": {
                "path": str(Path(cfg.data.path).resolve()),
                "name": ds.info.name,
                "source": ds.info.source,
                "channels": list(ds.channels),
                "image_size": list(ds.image_size),
            },
            "views": _plain_views(views_cfg),
            "feature_dim": None if feature_dim is None else int(feature_dim),
            "val": dict(last_val),
            "metrics_lines": metrics.lines,
        }
        for name in names:
            save_checkpoint(ckpt_dir / name, state)

    def validate() -> list[str]:
        """Probe accuracy on the val split; returns the checkpoints to write (best if improved)."""
        nonlocal best, best_step, last_val
        if len(data.val_rows) == 0:
            return [LAST]
        acc = _probe_accuracy(method, ds, data, views_cfg, t.batch_size, device, use_amp)
        last_val = {"step": step, "epoch": epoch, "probe_acc": acc, "n_val": len(data.val_rows)}
        metrics.write({"kind": "val", **last_val})
        if best is None or acc > best:
            best, best_step = acc, step
            return [LAST, BEST]
        return [LAST]

    total_steps = sched.total_steps
    stop_at = total_steps if t.max_steps is None else min(total_steps, t.max_steps)
    tty = sys.stderr.isatty()
    images_per_step = t.batch_size * world
    window_t, window_steps, window_fallbacks = time.perf_counter(), 0, 0
    from tqdm import tqdm

    method.train()
    stopped_early = False
    # (A checkpoint taken after an epoch's last step but before its end still owes that epoch's
    # validation and boundary checkpoint, hence the second condition.)
    while epoch < t.epochs and (step < stop_at or step_in_epoch == steps_per_epoch):
        sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        skip = step_in_epoch * t.batch_size
        loader = DataLoader(
            train_set,
            batch_size=t.batch_size,
            sampler=SkipSampler(sampler, skip),
            drop_last=True,
            num_workers=cfg.data.num_workers,
            pin_memory=device.type == "cuda",
            collate_fn=train_set.collate,
            # Own generator: iterator creation must not consume the global RNG (exact resume).
            generator=torch.Generator().manual_seed(t.seed * 100_003 + epoch),
        )
        bar = tqdm(
            total=steps_per_epoch,
            initial=step_in_epoch,
            desc=f"epoch {epoch + 1}/{t.epochs}",
            disable=not (main and tty),
            dynamic_ncols=True,
            leave=False,
        )
        for batch in loader:
            values = sched.at(step)
            for g in optimizer.param_groups:
                g["lr"] = values["lr"]
                g["weight_decay"] = values["wd"] if g.get("decay", True) else 0.0
            state = _make_step_state(
                {
                    "step": step,
                    "epoch": epoch + step_in_epoch / steps_per_epoch,
                    "teacher_temp": values["teacher_temp"],
                    "ema_momentum": values["ema_momentum"],
                    "freeze_last_layer": values["freeze_last_layer"],
                }
            )
            fell_back = batch.get("fell_back")
            if fell_back is not None:
                window_fallbacks += int(torch.as_tensor(fell_back).sum())
            batch = _to_device(train_set.finish(batch, device), device)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss, logs = method.loss(batch, state)
            # Every process must agree to stop, or the others would wait in the next all-reduce.
            non_finite = D.all_reduce_sum([0.0 if torch.isfinite(loss) else 1.0], device)[0]
            if non_finite:
                raise CdclError(
                    f"loss is {float(loss.detach())} at step {step} on "
                    f"{int(non_finite)} process(es); lower train.lr or check the data "
                    f"({last_good()})"
                )
            optimizer.zero_grad(set_to_none=True)
            probe_opt.zero_grad(set_to_none=True)
            loss.backward()
            D.all_reduce_mean_grads(all_params)
            grad_norm = None
            if t.clip_grad:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(student_params, t.clip_grad))
            if values["freeze_last_layer"]:
                for p in last_layer:
                    p.grad = None
            optimizer.step()
            probe_opt.step()
            method.after_step(state)
            step += 1
            step_in_epoch += 1
            window_steps += 1
            bar.update(1)

            if step % t.log_every == 0 or step == stop_at or step == 1:
                elapsed = max(time.perf_counter() - window_t, 1e-9)
                reduced = D.all_reduce_mean_dict(
                    {"loss": float(loss.detach()), **{k: float(v) for k, v in logs.items()}},
                    device,
                )
                fb = D.all_reduce_sum([window_fallbacks], device)[0]
                record = {
                    "kind": "train",
                    "step": step,
                    "epoch": round(epoch + step_in_epoch / steps_per_epoch, 4),
                    "lr": values["lr"],
                    "wd": values["wd"],
                    "ema_momentum": values["ema_momentum"],
                    "teacher_temp": values["teacher_temp"],
                    **reduced,
                    "grad_norm": grad_norm,
                    "images_per_s": window_steps * images_per_step / elapsed,
                    "pair_fallbacks": int(fb),
                    "pair_fallback_frac": fb / (window_steps * images_per_step),
                }
                metrics.write(record)
                bar.set_postfix(
                    loss=f"{reduced['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}"
                )
                if main and not tty:
                    print(
                        f"step {step}/{stop_at} epoch {record['epoch']:.2f} "
                        f"loss {reduced['loss']:.4f} lr {values['lr']:.2e} "
                        f"{record['images_per_s']:.0f} img/s",
                        file=sys.stderr,
                    )
                window_t, window_steps, window_fallbacks = time.perf_counter(), 0, 0
            if step >= stop_at and step_in_epoch < steps_per_epoch:
                stopped_early = True
                break
            if t.save_every_steps and step % t.save_every_steps == 0:
                save([LAST])
        bar.close()
        if stopped_early:
            break
        epoch += 1
        step_in_epoch = 0
        save(validate())  # the epoch-boundary checkpoint: nothing left to skip on resume

    if stopped_early:
        save(validate())
    metrics.close()
    summary = {
        "out": str(out),
        "step": step,
        "epoch": epoch,
        "steps_per_epoch": steps_per_epoch,
        "best_probe_acc": best,
        "best_step": best_step,
        "last": str(last_path),
    }
    if main:
        msg = f"cdcl train: done at step {step} (epoch {epoch}); checkpoint {last_path}"
        if best is not None:
            msg += f"; best validation probe accuracy {best:.3f} at step {best_step}"
        print(msg, file=sys.stderr)
    return summary


def _gather_device(device: torch.device) -> torch.device:
    # NCCL only moves CUDA tensors; gloo only CPU ones.
    return device if D.is_dist() and device.type == "cuda" else torch.device("cpu")


def _plain_views(views_cfg: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(views_cfg):
        d = dataclasses.asdict(views_cfg)
        return json.loads(json.dumps(d, default=list))
    return {}


@torch.no_grad()
def _probe_accuracy(
    method: torch.nn.Module,
    ds: Dataset,
    data: RunData,
    views_cfg: Any,
    batch_size: int,
    device: torch.device,
    use_amp: bool,
) -> float:
    """Online-probe accuracy on the validation images (sharded over processes, then summed)."""
    rows = data.val_rows[D.rank() :: D.world_size()]
    treat = ds.samples["treatment"].astype(str).to_numpy()
    labels = np.array([data.label_of[t] for t in treat[rows]], dtype=np.int64)
    method.eval()
    correct = 0
    try:
        for start in range(0, len(rows), batch_size):
            idx = rows[start : start + batch_size]
            x = eval_images(ds, idx, views_cfg).to(device)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = method.probe(method.embed(x).float())
            pred = logits.argmax(1).cpu().numpy()
            correct += int((pred == labels[start : start + batch_size]).sum())
    finally:
        method.train()
    c, n = D.all_reduce_sum([correct, len(rows)], device)
    return c / n if n else math.nan
