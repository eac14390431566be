"""A non-finite loss stops `cdcl train` with one clear line and keeps the last good checkpoint.

The blow-up is real, not mocked: an absurd learning rate with no warm-up and no clipping. With
lr 1e3 the tiny DINO/CDCL runs train a few finite steps, then one optimiser step leaves the
weights non-finite although that step's loss was finite, and the next loss is NaN: the trainer
must neither save those weights nor point at them. With lr 1e6 the loss is NaN at step 1,
before any checkpoint exists.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import pytest
import torch
from cli_process import TINY_MODEL, cdcl

# A tiny network so that a step takes a fraction of a second on one core.
TINY = [*TINY_MODEL, "train.batch_size=8", "train.log_every=1"]
BLOW_UP = [
    "train.warmup_epochs=0",
    "train.clip_grad=0",
    "train.epochs=20",
]
# Lines `cdcl train` may print on stderr: its own messages and the non-tty progress lines.
OWN_LINE = re.compile(r"(cdcl train: |step \d+/\d+ )")


@pytest.fixture(scope="module")
def screen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny simulated screen (32 px)."""
    from cdcl.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("screen") / "ds", "tiny", seed=0)


def _tensors(obj: object) -> list[torch.Tensor]:
    """Every floating-point tensor inside nested dicts/lists."""
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.is_floating_point() else []
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, list | tuple):
        return [t for v in obj for t in _tensors(v)]
    return []


def _one_error_line(p: subprocess.CompletedProcess) -> str:
    """Exit status 2 and a single error line (no traceback, no warnings) naming the blow-up."""
    assert p.returncode == 2, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    stray = [x for x in lines if not OWN_LINE.match(x)]
    assert not stray, stray  # e.g. a traceback or a torch UserWarning with its source line
    errors = [x for x in lines if x.startswith("cdcl train: error: ")]
    assert errors == [lines[-1]], lines[-3:]
    assert re.search(r"\b(nan|inf|non-finite)\b", lines[-1], re.IGNORECASE), lines[-1]
    return lines[-1]


@pytest.mark.parametrize("preset", ["synthetic-dino", "synthetic-cdcl"])
def test_nan_loss_stops_and_keeps_last_good_checkpoint(
    screen: Path, tmp_path: Path, preset: str
) -> None:
    """Exit 2, one error line naming step and checkpoint; last.pt loads and is all finite."""
    run = tmp_path / "run"
    p = cdcl(
        "train",
        "--preset",
        preset,
        "--data",
        screen,
        "--out",
        run,
        *TINY,
        *BLOW_UP,
        "train.lr=1e3",
        "train.save_every_steps=1",
    )
    last = _one_error_line(p)
    m = re.search(r"\bat step (\d+)\b", last)
    assert m, last
    step = int(m[1])
    ckpt_path = run / "checkpoints" / "last.pt"
    assert str(ckpt_path) in last, last
    assert step >= 2, "the blow-up should come after some good steps"

    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    # The newest good state is kept (saves every step): the one before the failing step.
    assert 1 <= step - 1 <= ckpt["step"] <= step
    weights = _tensors(ckpt["method"])
    assert weights and all(bool(torch.isfinite(w).all()) for w in weights), [
        k
        for k, v in ckpt["method"].items()
        if v.is_floating_point() and not torch.isfinite(v).all()
    ]
    assert all(bool(torch.isfinite(w).all()) for w in _tensors(ckpt["optimizer"]))

    # Every logged step had a finite loss; nothing after the failing step was logged.
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r["step"] for r in recs if r["kind"] == "train"]
    assert logged == list(range(1, len(logged) + 1)) and ckpt["step"] <= len(logged) <= step
    assert all(math.isfinite(r["loss"]) for r in recs if r["kind"] == "train")
    assert not list((run / "checkpoints").glob(".*.tmp*"))  # no half-written temporaries


def test_nan_loss_before_any_checkpoint_says_so(screen: Path, tmp_path: Path) -> None:
    """Without a checkpoint yet, the message must not point at a file that does not exist."""
    run = tmp_path / "run"
    p = cdcl(
        "train",
        "--preset",
        "synthetic-dino",
        "--data",
        screen,
        "--out",
        run,
        *TINY,
        *BLOW_UP,
        "train.lr=1e6",
    )
    last = _one_error_line(p)
    assert re.search(r"\bat step 1\b", last), last
    ckpt_path = run / "checkpoints" / "last.pt"
    assert not ckpt_path.exists()
    assert str(ckpt_path) not in last and "no checkpoint" in last, last
