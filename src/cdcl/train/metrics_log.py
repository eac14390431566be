"""What a run reports: metrics.jsonl (rank 0), optional TensorBoard, the progress bar and a line
per log step on a non-terminal stderr.

Logged values are reduced over processes (losses averaged, pairing fall-backs summed), and
images/s and fall-backs cover the window of steps since the previous record.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from cdcl.atomic import naming_failures
from cdcl.data.dataset_dir import atomic_write_text
from cdcl.train import distributed as D

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
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
                from torch.utils.tensorboard import SummaryWriter  # optional dependency

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
        with naming_failures(self.path), self.path.open("a") as f:  # a full disk names the file
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


class StepLogger:
    """Train records every ``log_every`` steps (and at steps 1 and ``stop_at``)."""

    def __init__(
        self,
        metrics: MetricsLog,
        log_every: int,
        stop_at: int,
        images_per_step: int,
        steps_per_epoch: int,
        device: torch.device,
    ) -> None:
        self.metrics = metrics
        self.log_every, self.stop_at = log_every, stop_at
        self.images_per_step, self.steps_per_epoch = images_per_step, steps_per_epoch
        self.device = device
        self.main, self.tty = D.is_main(), sys.stderr.isatty()
        self.window_t, self.window_steps, self.window_fallbacks = time.perf_counter(), 0, 0

    def progress_bar(self, epoch: int, epochs: int, step_in_epoch: int) -> tqdm:
        """The epoch's progress bar (rank 0 on a terminal only)."""
        return tqdm(
            total=self.steps_per_epoch,
            initial=step_in_epoch,
            desc=f"epoch {epoch + 1}/{epochs}",
            disable=not (self.main and self.tty),
            dynamic_ncols=True,
            leave=False,
        )

    def count_batch(self, batch: dict[str, Any]) -> None:
        """Count the batch's pairing fall-backs into the window (before the batch moves)."""
        fell_back = batch.get("fell_back")
        if fell_back is not None:
            self.window_fallbacks += int(torch.as_tensor(fell_back).sum())

    def after_step(
        self,
        step: int,
        epoch: float,
        values: dict[str, Any],
        loss: torch.Tensor,
        logs: dict[str, Any],
        grad_norm: float | None,
        bar: tqdm,
    ) -> None:
        """Count the step; when a record is due, reduce over processes and write it."""
        self.window_steps += 1
        bar.update(1)
        if not (step % self.log_every == 0 or step == self.stop_at or step == 1):
            return
        elapsed = max(time.perf_counter() - self.window_t, 1e-9)
        reduced = D.all_reduce_mean_dict(
            {"loss": float(loss.detach()), **{k: float(v) for k, v in logs.items()}},
            self.device,
        )
        fb = D.all_reduce_sum([self.window_fallbacks], self.device)[0]
        images = self.window_steps * self.images_per_step
        record = {
            "kind": "train",
            "step": step,
            "epoch": round(epoch, 4),
            "lr": values["lr"],
            "wd": values["wd"],
            "ema_momentum": values["ema_momentum"],
            "teacher_temp": values["teacher_temp"],
            **reduced,
            "grad_norm": grad_norm,
            "images_per_s": images / elapsed,
            "pair_fallbacks": int(fb),
            "pair_fallback_frac": fb / images,
        }
        self.metrics.write(record)
        bar.set_postfix(loss=f"{reduced['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}")
        if self.main and not self.tty:
            print(
                f"step {step}/{self.stop_at} epoch {record['epoch']:.2f} "
                f"loss {reduced['loss']:.4f} lr {values['lr']:.2e} "
                f"{record['images_per_s']:.0f} img/s",
                file=sys.stderr,
            )
        self.window_t, self.window_steps, self.window_fallbacks = time.perf_counter(), 0, 0
