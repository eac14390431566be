"""Schedules are pure functions of the global step with the documented end points."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from cdcl.train.schedules import build_schedules, cosine, linear_warmup, warmup_cosine


def test_warmup_cosine_known_steps() -> None:
    """lr: start_lr at 0, base at the end of warm-up, halfway down mid-decay, min at the end."""
    kw = dict(total_steps=110, warmup_steps=10, base=7e-4, start=1e-5, final=1e-5)
    assert warmup_cosine(0, **kw) == pytest.approx(1e-5)
    assert warmup_cosine(5, **kw) == pytest.approx(1e-5 + (7e-4 - 1e-5) / 2)
    assert warmup_cosine(10, **kw) == pytest.approx(7e-4)
    assert warmup_cosine(60, **kw) == pytest.approx((7e-4 + 1e-5) / 2)
    assert warmup_cosine(110, **kw) == pytest.approx(1e-5)
    assert warmup_cosine(500, **kw) == pytest.approx(1e-5)


def test_cosine_and_linear_warmup() -> None:
    """wd/EMA cosine and the teacher-temperature warm-up hit start, middle and end values."""
    assert cosine(0, 100, 0.995, 0.9996) == pytest.approx(0.995)
    assert cosine(50, 100, 0.995, 0.9996) == pytest.approx((0.995 + 0.9996) / 2)
    assert cosine(100, 100, 0.995, 0.9996) == pytest.approx(0.9996)
    assert cosine(25, 100, 4e-3, 1e-2) == pytest.approx(
        1e-2 + 0.5 * (4e-3 - 1e-2) * (1 + math.cos(math.pi / 4))
    )
    assert linear_warmup(0, 30, 0.04, 0.07) == pytest.approx(0.04)
    assert linear_warmup(15, 30, 0.04, 0.07) == pytest.approx(0.055)
    assert linear_warmup(30, 30, 0.04, 0.07) == pytest.approx(0.07)
    assert linear_warmup(99, 0, 0.04, 0.07) == pytest.approx(0.07)


def test_build_schedules_resolves_epochs_to_steps() -> None:
    """Epoch-based settings become step counts; freezing ends after freeze_last_layer_epochs."""
    t = SimpleNamespace(
        epochs=20,
        lr=7e-4,
        start_lr=1e-5,
        min_lr=1e-5,
        warmup_epochs=10,
        weight_decay=4e-3,
        weight_decay_end=1e-2,
        ema_momentum=0.995,
        ema_momentum_end=0.9996,
        freeze_last_layer_epochs=1,
    )
    m = SimpleNamespace(teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=10)
    s = build_schedules(t, m, steps_per_epoch=5)
    assert (s.total_steps, s.warmup_steps, s.freeze_last_layer_steps) == (100, 50, 5)
    first, warm, last = s.at(0), s.at(50), s.at(100)
    assert first["lr"] == pytest.approx(1e-5) and warm["lr"] == pytest.approx(7e-4)
    assert last["lr"] == pytest.approx(1e-5)
    assert first["wd"] == pytest.approx(4e-3) and last["wd"] == pytest.approx(1e-2)
    assert first["ema_momentum"] == pytest.approx(0.995) and last["ema_momentum"] == pytest.approx(
        0.9996
    )
    assert first["teacher_temp"] == pytest.approx(0.04) and warm["teacher_temp"] == pytest.approx(
        0.07
    )
    assert s.at(4)["freeze_last_layer"] is True and s.at(5)["freeze_last_layer"] is False
    # Pure: the same step gives the same values whatever was asked before (in any order, of this
    # or of a fresh Schedules, as a resumed run builds), and they are the values of the curves.
    before = s.at(37)
    forward = [s.at(i) for i in range(120)]
    backward = [s.at(i) for i in reversed(range(120))][::-1]
    assert s.at(37) == before and forward == backward and forward[37] == before
    assert build_schedules(t, m, steps_per_epoch=5).at(37) == before
    assert before["lr"] == pytest.approx(1e-5 + (7e-4 - 1e-5) * 37 / 50)  # 37 of 50 warm-up
    assert before["wd"] == pytest.approx(
        1e-2 + 0.5 * (4e-3 - 1e-2) * (1 + math.cos(0.37 * math.pi))
    )
