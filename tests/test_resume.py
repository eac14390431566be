"""A run killed with SIGKILL mid-epoch and resumed ends exactly where an uninterrupted run does."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_process import cdcl, cdcl_env

# Deliberately not TINY_MODEL: two blocks with drop-path, so the restored torch RNG matters.
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
KILL_AT = 7  # mid-epoch 0: step 7 trained and logged, its checkpoint not yet written
# `python -m cdcl` that SIGKILLs itself just before the checkpoint of step KILL_AT: the kill
# lands at the same place on any machine (a kill from outside lands wherever training is).
SELF_KILLING_CDCL = f"""
import os, signal
import cdcl.train.loop as loop
from cdcl.cli import main
save = loop.save
def save_or_die(run, names):
    if run.progress.step == {KILL_AT}:
        os.kill(os.getpid(), signal.SIGKILL)
    save(run, names)
loop.save = save_or_die
raise SystemExit(main())
"""


@pytest.fixture(scope="module")
def screen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny simulated screen with 3 training batches (CDCL pairs across them)."""
    from cdcl.data.synthetic import generate

    out = tmp_path_factory.mktemp("screen") / "ds"
    return generate(out, "tiny", seed=0, batches=5, test_batches=1, val_batches=1)


def _args(screen: Path, run: Path, *extra: str) -> list[object]:
    return ["train", "--preset", "synthetic-cdcl", "--data", screen, "--out", run, *TINY, *extra]


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
    r = cdcl(*_args(screen, ref))
    assert r.returncode == 0, r.stderr

    run = tmp_path / "killed"
    argv = [sys.executable, "-c", SELF_KILLING_CDCL, *map(str, _args(screen, run))]
    killed = subprocess.run(argv, env=cdcl_env(), capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    killed_at = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    # The last checkpoint is the step before the kill, mid-epoch; the killed step's metrics
    # line is on disk past it (the resume must drop it and train that step again).
    step = KILL_AT - 1
    assert (killed_at["step"], killed_at["epoch"], killed_at["step_in_epoch"]) == (step, 0, step)
    assert [x["step"] for x in _train_records(run)] == list(range(1, KILL_AT + 1))

    r = cdcl(*_args(screen, run, "--resume"))
    assert r.returncode == 0, r.stderr
    assert f"resuming {run} at step {step} (epoch 0, {step}/9)" in r.stderr

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
