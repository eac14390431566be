"""What a run reports: metrics.jsonl (rank 0), optional TensorBoard, the progress bar, a line
per log step on a non-terminal stderr, and how long the run will take.

Logged values are reduced over processes (losses averaged, pairing fall-backs summed), and
images/s and fall-backs cover the window of steps since the previous record.

The estimate of the run's length times the steps after the first one (which also starts the
data loader): it is printed after :data:`ESTIMATE_STEPS` of them or :data:`ESTIMATE_SECONDS`,
whichever comes first, and once more after the first validation, whose time it then includes.
When the first step alone takes :data:`ESTIMATE_SECONDS` or more, a rough estimate from it comes
first. On a non-terminal stderr a progress line is also printed at least every
:data:`LOG_SECONDS`, between the records due every ``train.log_every`` steps.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from cdcl.atomic import naming_failures
from cdcl.data.dataset_dir import atomic_write_text
from cdcl.train import distributed as D

METRICS_FILE = "metrics.jsonl"
ESTIMATE_STEPS = 3  # timed steps (after the first) before the estimate
ESTIMATE_SECONDS = 20.0  # ... or this many seconds of them, whichever comes first
LOG_SECONDS = 30.0  # a progress line at least this often on a non-terminal stderr


def format_rate(per_s: float) -> str:
    """A rate with the digits that matter: ``1234``, ``56.7``, ``3.4``, ``0.64``, ``0.0031``."""
    if per_s >= 100:
        return f"{per_s:.0f}"
    if per_s >= 1:
        return f"{per_s:.1f}"
    if per_s >= 0.01:
        return f"{per_s:.2f}"
    return f"{per_s:.2g}"


def format_duration(seconds: float) -> str:
    """``0.04 s``, ``2.5 s``, ``12 s``, ``4 min 10 s``, ``5 h 32 min``, ``2 d 3 h``."""
    if seconds < 1:
        return f"{seconds:.2g} s"
    if seconds < 10:
        return f"{seconds:.1f} s"
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s" if s % 60 else f"{s // 60} min"
    m = round(seconds / 60)
    if m < 24 * 60:
        return f"{m // 60} h {m % 60} min" if m % 60 else f"{m // 60} h"
    h = round(seconds / 3600)
    return f"{h // 24} d {h % 24} h" if h % 24 else f"{h // 24} d"


def format_clock(when: datetime, now: datetime) -> str:
    """``17:42`` today, ``Tue 09:15`` within a week, else ``14 Mar 09:15``."""
    if when.date() == now.date():
        return when.strftime("%H:%M")
    if when - now < timedelta(days=6):
        return when.strftime("%a %H:%M")
    return when.strftime("%d %b %H:%M")


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


def _steps(n: int) -> str:
    """``1 step``, ``9 steps``."""
    return f"{n} step" if n == 1 else f"{n} steps"


class StepLogger:
    """Train records every ``log_every`` steps (and at steps 1 and ``stop_at``), progress lines
    by time, and the estimate of the run's length (rank 0 prints)."""

    def __init__(
        self,
        metrics: MetricsLog,
        log_every: int,
        stop_at: int,
        images_per_step: int,
        steps_per_epoch: int,
        device: torch.device,
        start_step: int = 0,
        clock: Callable[[], float] = time.perf_counter,
        now: Callable[[], datetime] = datetime.now,
    ) -> None:
        self.metrics = metrics
        self.log_every, self.stop_at = log_every, stop_at
        self.images_per_step, self.steps_per_epoch = images_per_step, steps_per_epoch
        self.device = device
        self.main, self.tty = D.is_main(), sys.stderr.isatty()
        self.clock, self.now = clock, now
        self.window_t, self.window_steps, self.window_fallbacks = clock(), 0, 0
        self.start_t, self.start_step = self.window_t, start_step
        self.timed_from: tuple[float, int] | None = None  # (time, step) when step 1 ended
        self.pause_s = 0.0  # time spent validating and saving since timed_from
        self.epoch_end_s: float | None = None  # the last validation and its checkpoint
        self.estimated = False  # the measured estimate was printed
        self.refined = False  # ... and the one after the first validation
        self.line_t = self.window_t  # when the last progress line was printed

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

    def say(self, line: str) -> None:
        """Print ``line`` on rank 0 (above the progress bar on a terminal)."""
        if self.main:
            tqdm.write(line, file=sys.stderr)

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
        """Count the step; write a record when due, a progress line or the estimate when due."""
        self.window_steps += 1
        bar.update(1)
        now = self.clock()
        if self.timed_from is None:
            self.timed_from = (now, step)
        if step % self.log_every == 0 or step == self.stop_at or step == 1:
            self._record(step, epoch, values, loss, logs, grad_norm, bar, now)
        elif not self.tty and now - self.line_t >= LOG_SECONDS and step < self.stop_at:
            rate = self.window_steps * self.images_per_step / max(now - self.window_t, 1e-9)
            self.say(
                f"step {step}/{self.stop_at} epoch {epoch:.2f} {format_rate(rate)} img/s"
                f"{self._left(step, now)}"
            )
            self.line_t = now
        self._estimate_due(step, now)

    def _estimate_due(self, step: int, now: float) -> None:
        """Print the rough estimate after a slow first step, the measured one when due."""
        if self.timed_from is None:
            return
        left = self.stop_at - step
        if step == self.timed_from[1]:
            first = now - self.start_t
            if first >= ESTIMATE_SECONDS and left > 0:
                self.say(
                    f"cdcl train: rough estimate from the first step, which includes "
                    f"start-up: {format_rate(self.images_per_step / first)} img/s; "
                    f"{self._whole_run(step, now, first)}; a measured estimate follows"
                )
            return
        timed_steps = step - self.timed_from[1]
        timed_s = now - self.timed_from[0]
        if self.estimated or left <= 0:
            return
        if timed_steps >= ESTIMATE_STEPS or timed_s >= ESTIMATE_SECONDS:
            self.estimated = True
            self.refined = self.epoch_end_s is not None
            self.say(f"cdcl train: estimate: {self._estimate(step, now)}")

    @contextmanager
    def epoch_end(self, step: int) -> Iterator[None]:
        """Time the validation and checkpoint at an epoch's end (and refine the estimate)."""
        t0 = self.clock()
        yield
        now = self.clock()
        self.epoch_end_s = now - t0
        if self.timed_from is not None:
            self.pause_s += self.epoch_end_s
        if self.estimated and not self.refined and step < self.stop_at:
            self.refined = True
            self.say(
                f"cdcl train: estimate with the validation "
                f"({format_duration(self.epoch_end_s)}): {self._estimate(step, now, ended=True)}"
            )
        self.window_t += self.epoch_end_s  # rates count training time only
        self.line_t = now

    def step_seconds(self, step: int, now: float) -> float | None:
        """Mean seconds per training step since the first one (validation left out)."""
        if self.timed_from is None or step <= self.timed_from[1]:
            return None
        t0, s0 = self.timed_from
        return max(now - t0 - self.pause_s, 1e-9) / (step - s0)

    def _epoch_ends_left(self, step: int, ended: bool) -> int:
        """Validations still to come after ``step`` (``ended``: the one of its epoch is done)."""
        spe = self.steps_per_epoch
        last = math.ceil(self.stop_at / spe)
        done = step // spe if ended else (step - 1) // spe
        return max(last - done, 0)

    def seconds_left(self, step: int, now: float, ended: bool = False) -> float | None:
        """Estimated seconds until the run ends (None: not timed yet)."""
        per_step = self.step_seconds(step, now)
        if per_step is None:
            return None
        ends = self._epoch_ends_left(step, ended) * (self.epoch_end_s or 0.0)
        return (self.stop_at - step) * per_step + ends

    def _ends_about(self, left_s: float) -> str:
        now = self.now()
        return f"ends about {format_clock(now + timedelta(seconds=left_s), now)}"

    def _whole_run(self, step: int, now: float, per_step: float) -> str:
        left_s = (self.stop_at - step) * per_step
        total = now - self.start_t + left_s
        steps = self.stop_at - self.start_step
        return (
            f"the run's {steps} steps take about {format_duration(total)} in all, "
            f"{self._ends_about(left_s)}"
        )

    def _estimate(self, step: int, now: float, ended: bool = False) -> str:
        per_step = self.step_seconds(step, now) or 0.0
        left_s = self.seconds_left(step, now, ended) or 0.0
        spe = self.steps_per_epoch
        epoch_s = spe * per_step
        if self.epoch_end_s is None:
            epoch = f"{format_duration(epoch_s)} an epoch ({_steps(spe)}) plus its validation"
        else:
            epoch_s += self.epoch_end_s
            epoch = f"{format_duration(epoch_s)} an epoch ({_steps(spe)} and its validation)"
        total = now - self.start_t + left_s
        steps = self.stop_at - self.start_step
        return (
            f"{format_rate(self.images_per_step / per_step)} img/s, "
            f"{format_duration(per_step)} a step, {epoch}; the run's {steps} steps take about "
            f"{format_duration(total)} in all, {self._ends_about(left_s)}"
        )

    def _left(self, step: int, now: float) -> str:
        left_s = self.seconds_left(step, now)
        if left_s is None or not self.estimated:
            return ""
        return f", about {format_duration(left_s)} left, {self._ends_about(left_s)}"

    def _record(
        self,
        step: int,
        epoch: float,
        values: dict[str, Any],
        loss: torch.Tensor,
        logs: dict[str, Any],
        grad_norm: float | None,
        bar: tqdm,
        now: float,
    ) -> None:
        """Reduce over processes and write the record (and its line on a non-terminal)."""
        elapsed = max(now - self.window_t, 1e-9)
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
        rate = format_rate(record["images_per_s"])
        bar.set_postfix(loss=f"{reduced['loss']:.4f}", img_s=rate)
        if not self.tty:
            self.say(
                f"step {step}/{self.stop_at} epoch {record['epoch']:.2f} "
                f"loss {reduced['loss']:.4f} lr {values['lr']:.2e} {rate} img/s"
                f"{self._left(step, now) if step < self.stop_at else ''}"
            )
            self.line_t = now
        self.window_t, self.window_steps, self.window_fallbacks = self.clock(), 0, 0

    def elapsed(self) -> float:
        """Seconds since the logger was made (the run's start in this process)."""
        return self.clock() - self.start_t
