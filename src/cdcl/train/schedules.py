"""Per-iteration schedules: pure functions of the global step (docs/design.md §6).

Every value the optimiser or the method needs at step ``s`` (learning rate, weight decay,
EMA momentum, teacher temperature) is computed from ``s`` alone, so a resumed run continues
the exact curve of an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def cosine(step: int, total_steps: int, start: float, end: float) -> float:
    """Half-cosine from ``start`` at step 0 to ``end`` at ``total_steps`` (held there after)."""
    if total_steps <= 0 or step >= total_steps:
        return float(end)
    progress = max(step, 0) / total_steps
    return float(end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress)))


def warmup_cosine(
    step: int, total_steps: int, warmup_steps: int, base: float, start: float, final: float
) -> float:
    """Linear warm-up ``start`` → ``base`` over ``warmup_steps``, then cosine ``base`` → ``final``."""
    warmup_steps = min(max(warmup_steps, 0), total_steps)
    if step < warmup_steps:
        return float(start + (base - start) * step / warmup_steps)
    return cosine(step - warmup_steps, total_steps - warmup_steps, base, final)


def linear_warmup(step: int, warmup_steps: int, start: float, end: float) -> float:
    """Linear ``start`` → ``end`` over ``warmup_steps``, then constant ``end``."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return float(end)
    return float(start + (end - start) * max(step, 0) / warmup_steps)


@dataclass(frozen=True)
class Schedules:
    """All schedules of one run, resolved to steps; call :meth:`at` for the values of a step."""

    total_steps: int
    steps_per_epoch: int
    lr: float
    start_lr: float
    min_lr: float
    warmup_steps: int
    weight_decay: float
    weight_decay_end: float
    ema_momentum: float
    ema_momentum_end: float
    teacher_temp: float
    warmup_teacher_temp: float
    teacher_temp_warmup_steps: int
    freeze_last_layer_steps: int

    def at(self, step: int) -> dict[str, float | bool]:
        """lr, wd, ema_momentum, teacher_temp and freeze_last_layer at global ``step``."""
        return {
            "lr": warmup_cosine(
                step, self.total_steps, self.warmup_steps, self.lr, self.start_lr, self.min_lr
            ),
            "wd": cosine(step, self.total_steps, self.weight_decay, self.weight_decay_end),
            "ema_momentum": cosine(
                step, self.total_steps, self.ema_momentum, self.ema_momentum_end
            ),
            "teacher_temp": linear_warmup(
                step, self.teacher_temp_warmup_steps, self.warmup_teacher_temp, self.teacher_temp
            ),
            "freeze_last_layer": step < self.freeze_last_layer_steps,
        }


def build_schedules(train_cfg: object, method_cfg: object, steps_per_epoch: int) -> Schedules:
    """Resolve the epoch-based settings of a TrainConfig and a MethodConfig to step counts."""
    t = train_cfg
    epochs = int(t.epochs)  # type: ignore[attr-defined]
    teacher_temp = float(getattr(method_cfg, "teacher_temp", 0.07))
    warm_t = float(getattr(method_cfg, "warmup_teacher_temp", teacher_temp))
    warm_t_epochs = float(getattr(method_cfg, "warmup_teacher_temp_epochs", 0))
    return Schedules(
        total_steps=epochs * steps_per_epoch,
        steps_per_epoch=steps_per_epoch,
        lr=float(t.lr),  # type: ignore[attr-defined]
        start_lr=float(t.start_lr),  # type: ignore[attr-defined]
        min_lr=float(t.min_lr),  # type: ignore[attr-defined]
        warmup_steps=int(round(float(t.warmup_epochs) * steps_per_epoch)),  # type: ignore[attr-defined]
        weight_decay=float(t.weight_decay),  # type: ignore[attr-defined]
        weight_decay_end=float(t.weight_decay_end),  # type: ignore[attr-defined]
        ema_momentum=float(t.ema_momentum),  # type: ignore[attr-defined]
        ema_momentum_end=float(t.ema_momentum_end),  # type: ignore[attr-defined]
        teacher_temp=teacher_temp,
        warmup_teacher_temp=warm_t,
        teacher_temp_warmup_steps=int(round(warm_t_epochs * steps_per_epoch)),
        freeze_last_layer_steps=int(round(float(t.freeze_last_layer_epochs) * steps_per_epoch)),  # type: ignore[attr-defined]
    )
