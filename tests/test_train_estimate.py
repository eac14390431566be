"""What `cdcl train` says about time: the schedule after overrides, the estimate with its end
time, progress lines by time, fractional rates, and the generic presets sized by images seen."""

from __future__ import annotations

import math
import re
from datetime import datetime
from pathlib import Path

import pytest
import torch
from cli_process import TINY_MODEL, cdcl

from cdcl.presets.sizing import MIN_STEPS, TARGET_IMAGES, sized_schedule
from cdcl.train.metrics_log import (
    LOG_SECONDS,
    MetricsLog,
    StepLogger,
    format_clock,
    format_duration,
    format_rate,
)

TINY = [*TINY_MODEL]
END_TIME = re.compile(r"ends about (\w{3} )?\d\d:\d\d")
RATE = re.compile(r"(\S+) img/s")


@pytest.fixture(scope="module")
def screen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny simulated screen: 72 training images in 3 batches (32 px)."""
    from cdcl.data.synthetic import generate

    out = tmp_path_factory.mktemp("screen") / "ds"
    return generate(out, "tiny", seed=0, batches=5, test_batches=1, val_batches=1)


def _lines(stderr: str, start: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith(start)]


def test_train_prints_schedule_and_estimate_with_end_time(screen: Path, tmp_path: Path) -> None:
    """train.epochs=2 shows in the schedule; the estimate names an end time; no '0 img/s'."""
    r = cdcl(
        "train", "--preset", "synthetic-dino", "--data", screen, "--out", tmp_path / "run",
        *TINY, "train.batch_size=8", "train.epochs=2", "train.log_every=5",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    (schedule,) = _lines(r.stderr, "cdcl train: schedule:")
    assert "2 epochs x 9 steps of 8 images = 18 steps, 144 images seen" in schedule
    assert "train.epochs=2" in schedule and "estimate" in schedule
    estimates = _lines(r.stderr, "cdcl train: estimate")
    assert estimates, r.stderr
    assert all(END_TIME.search(ln) and "img/s" in ln and "an epoch" in ln for ln in estimates)
    assert "the run's 18 steps take about" in estimates[0]
    # The estimate comes before the second progress record, i.e. within the first steps.
    lines = r.stderr.splitlines()
    assert lines.index(estimates[0]) < lines.index(next(ln for ln in lines if "step 5/" in ln))
    rates = [m.group(1) for m in RATE.finditer(r.stderr)]
    assert rates and all(float(v) > 0 for v in rates)
    assert re.search(r"done at step 18 \(epoch 2\) in \S+ (s|min)", r.stderr)


def test_generic_notice_follows_the_override(screen: Path, tmp_path: Path) -> None:
    """A generic preset with train.epochs=2: both start-up lines say 2 epochs, not the sized ones."""
    r = cdcl(
        "train", "--preset", "generic-cdcl", "--data", screen, "--out", tmp_path / "run",
        *TINY, "train.epochs=2",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    (notice,) = _lines(r.stderr, "cdcl train: notice: generic-cdcl sized for")
    assert "batch 32, 2 epochs over 72 training images = 128 images seen" in notice
    assert "as you set:" in notice and "train.epochs" in notice
    (schedule,) = _lines(r.stderr, "cdcl train: schedule:")
    assert "2 epochs x 2 steps of 32 images = 4 steps, 128 images seen" in schedule


class _Bar:
    def update(self, n: int) -> None:
        """Nothing to draw."""

    def set_postfix(self, **kw: object) -> None:
        """Nothing to draw."""


def _slow_run(
    capsys: pytest.CaptureFixture,
    tmp_path: Path,
    step_s: float,
    steps: int,
    spe: int,
    log_every: int = 10,
) -> list[str]:
    """StepLogger's lines for ``steps`` steps of ``step_s`` seconds each on a fake clock."""
    t = [0.0]
    logger = StepLogger(
        MetricsLog(tmp_path, enabled=False, tensorboard=False),
        log_every=log_every,
        stop_at=steps,
        images_per_step=64,
        steps_per_epoch=spe,
        device=torch.device("cpu"),
        clock=lambda: t[0],
        now=lambda: datetime(2024, 3, 14, 12, 0, 0),
    )
    values = {"lr": 1e-4, "wd": 0.04, "ema_momentum": 0.99, "teacher_temp": 0.04}
    for step in range(1, steps + 1):
        t[0] += step_s + (5.0 if step == 1 else 0.0)  # the first step also starts up
        logger.after_step(step, step / spe, values, torch.tensor(1.0), {}, None, _Bar())
        if step % spe == 0:
            with logger.epoch_end(step):
                t[0] += 2.0
    return capsys.readouterr().err.splitlines()


def test_slow_run_estimates_from_the_first_step_and_logs_by_time(
    capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    """100 s steps of 64 images, one per epoch: a rough estimate at once, lines every step."""
    lines = _slow_run(capsys, tmp_path, step_s=100.0, steps=30, spe=1)
    rough = [ln for ln in lines if "rough estimate" in ln]
    measured = [ln for ln in lines if ln.startswith("cdcl train: estimate")]
    assert len(rough) == 1 and lines.index(rough[0]) == 1  # right after step 1's record
    assert "0.61 img/s" in rough[0] and "ends about 12:50" in rough[0]
    # The measured one after step 2 (more than 20 s of timed steps), validation included.
    assert len(measured) == 1 and "0.64 img/s" in measured[0]
    assert "1 min 42 s an epoch (1 step and its validation)" in measured[0]
    assert "ends about 12:47" in measured[0]
    # Slower than LOG_SECONDS a step: a progress line for every step, never '0 img/s'.
    progress = [ln for ln in lines if ln.startswith("step ")]
    assert len(progress) == 30
    assert all(re.search(r" 0\.6\d img/s", ln) for ln in progress[1:])
    assert "about 45 min 56 s left, ends about 12:45" in progress[2]


def test_fast_run_logs_by_steps_and_time(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    """2 s steps: the estimate after 3 timed steps, a line at least every LOG_SECONDS."""
    lines = _slow_run(capsys, tmp_path, step_s=2.0, steps=100, spe=50, log_every=50)
    assert not [ln for ln in lines if "rough" in ln]
    estimate = [ln for ln in lines if ln.startswith("cdcl train: estimate:")]
    assert len(estimate) == 1 and lines[lines.index(estimate[0]) - 1].startswith("step 1/")
    assert (
        "32.0 img/s, 2.0 s a step, 1 min 40 s an epoch (50 steps) plus its validation"
        in (estimate[0])
    )
    # After the first validation, once more with its time.
    (refined,) = [ln for ln in lines if "estimate with the validation (2.0 s)" in ln]
    assert "1 min 42 s an epoch (50 steps and its validation)" in refined
    steps = [int(ln.split()[1].split("/")[0]) for ln in lines if ln.startswith("step ")]
    assert {1, 50, 100} <= set(steps)
    gaps = [(b - a) * 2.0 for a, b in zip(steps, steps[1:], strict=False)]
    assert max(gaps) <= LOG_SECONDS + 2.0  # lines by time between those by steps
    assert len(steps) > 5


def test_formats_are_fractional_and_readable() -> None:
    """Rates keep their digits; durations and clock times read as a person would write them."""
    assert [format_rate(v) for v in (3.4, 0.64, 0.004, 56.7, 1234.0)] == [
        "3.4", "0.64", "0.004", "56.7", "1234",
    ]  # fmt: skip
    assert format_duration(0.04) == "0.04 s" and format_duration(100) == "1 min 40 s"
    assert format_duration(5.5 * 3600) == "5 h 30 min" and format_duration(50 * 3600) == "2 d 2 h"
    now = datetime(2024, 3, 14, 12, 0)
    assert format_clock(datetime(2024, 3, 14, 17, 42), now) == "17:42"
    assert format_clock(datetime(2024, 3, 15, 9, 15), now) == "Fri 09:15"
    assert format_clock(datetime(2024, 4, 1, 9, 15), now) == "01 Apr 09:15"


def test_generic_sizing_counts_images_seen() -> None:
    """192,000 images seen within 10-100 passes, at least 200 steps, smaller batches when tiny."""
    tiny = sized_schedule(80)  # a screen of about 108 images
    assert tiny["train.batch_size"] == 32 and tiny["train.epochs"] == 125  # 250 steps, 8,000 seen
    assert sized_schedule(20)["train.epochs"] * (20 // 8) >= MIN_STEPS
    mid = sized_schedule(6_600)  # 3,000 steps of 64
    seen = mid["train.epochs"] * (6_600 // 64) * 64
    assert mid["train.batch_size"] == 64 and abs(seen - TARGET_IMAGES) < 103 * 64
    assert sized_schedule(81_224)["train.epochs"] == 10  # a large screen: 10 passes
    assert sized_schedule(81_224, world=4)["train.epochs"] == 10
    assert math.isclose(sized_schedule(660)["train.epochs"] * 640, 100 * 660, rel_tol=0.05)
