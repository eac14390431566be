"""A run killed with SIGKILL mid-epoch and resumed ends exactly where an uninterrupted run does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

TINY = [
    "model.embed_dim=32",
    "model.depth=2",  # timm spreads drop-path linearly: block 1 gets 0, block 2 gets 0.1
    "model.num_heads=2",
    "model.drop_path=0.1",  # exercises the restored torch RNG
    "method.out_dim=32",
    "method.hidden_dim=32",
    "method.bottleneck_dim=16",
    "train.batch_size=8",
    "train.log_every=1",
    "train.epochs=2",
    "train.warmup_epochs=1",
    "train.save_every_steps=1",
    "data.num_workers=0",
]
TOTAL_STEPS = 18  # 72 training images / batch 8 = 9 steps per epoch, 2 epochs


@pytest.fixture(scope="module")
def screen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny simulated screen with 3 training batches (CDCL pairs across them)."""
    from cdcl.data.synthetic import generate

    out = tmp_path_factory.mktemp("screen") / "ds"
    return generate(out, "tiny", seed=0, batches=5, test_batches=1, val_batches=1)


def _cmd(screen: Path, run: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cdcl",
        "train",
        "--preset",
        "synthetic-cdcl",
        "--data",
        str(screen),
        "--out",
        str(run),
        *TINY,
        *extra,
    ]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _train_records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line being written right now
            continue
        if rec["kind"] == "train":
            out.append(rec)
    return out


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_exact(screen: Path, tmp_path: Path) -> None:
    """Same seed: killed+resumed run == uninterrupted run (weights, optimiser, every loss)."""
    ref = tmp_path / "ref"
    r = subprocess.run(_cmd(screen, ref), env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr

    run = tmp_path / "killed"
    proc = subprocess.Popen(
        _cmd(screen, run), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            done = [rec["step"] for rec in _train_records(run)]
            if done and max(done) >= 4 and (run / "checkpoints" / "last.pt").exists():
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert 0 < killed_at["step"] < TOTAL_STEPS
    assert 0 < killed_at["step_in_epoch"] < 9 or killed_at["step"] == 9  # mid-epoch (or boundary)

    r = subprocess.run(
        _cmd(screen, run, "--resume"), env=ENV, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr
    assert f"resuming {run} at step {killed_at['step']}" in r.stderr

    a = torch.load(ref / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == TOTAL_STEPS and a["epoch"] == b["epoch"] == 2
    assert a["method"].keys() == b["method"].keys()
    for k in a["method"]:
        assert torch.equal(a["method"][k], b["method"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(
            sa["exp_avg_sq"], sb["exp_avg_sq"]
        )
    # metrics.jsonl: every step once, with the uninterrupted run's losses.
    ra, rb = _train_records(ref), _train_records(run)
    assert [x["step"] for x in rb] == list(range(1, TOTAL_STEPS + 1))
    assert [x["loss"] for x in ra] == [x["loss"] for x in rb]
