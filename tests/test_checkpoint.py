"""Checkpoints: atomic, weights-only loadable, RNG round trip, clear errors for bad files."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from cdcl.errors import CdclError
from cdcl.train.checkpoint import (
    find_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def _state() -> dict:
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    return {
        "method": net.state_dict(),
        "optimizer": opt.state_dict(),
        "config": {"train": {"epochs": 1, "global_scale": [0.9, 1.1], "max_steps": None}},
        "label_of": {"DMSO": 0, "a": 1},
        "batch_of": {"B1": 0},
        "build": {"in_chans": 5, "img_size": 28},
        "rng": rng_state(),
        "step": 3,
    }


def test_round_trip_weights_only(tmp_path: Path) -> None:
    """A saved checkpoint loads with torch.load(weights_only=True) and keeps every value."""
    state = _state()
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(path, state)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "cdcl-checkpoint" and raw["step"] == 3
    ckpt = load_checkpoint(path)
    for k, v in state["method"].items():
        assert torch.equal(ckpt["method"][k], v)
    assert ckpt["optimizer"]["state"][0]["exp_avg"].shape == (2, 3)
    assert ckpt["config"] == state["config"] and ckpt["label_of"] == state["label_of"]
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary left behind


def test_rng_state_restores_every_generator(tmp_path: Path) -> None:
    """Python, NumPy and torch draw the same numbers after a save/load/restore cycle."""
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # leaves a cached Gaussian in NumPy's state
    save_checkpoint(tmp_path / "c.pt", {**_state(), "rng": rng_state()})
    expected = (random.random(), np.random.randn(3), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    got = (random.random(), np.random.randn(3), torch.rand(3))
    assert got[0] == expected[0]
    assert np.array_equal(got[1], expected[1])
    assert torch.equal(got[2], expected[2])


def test_truncated_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    """A truncated file raises CdclError naming it (never silently skipped)."""
    path = tmp_path / "last.pt"
    save_checkpoint(path, _state())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CdclError, match=f"{path}: not a readable cdcl checkpoint"):
        load_checkpoint(path)
    path.write_bytes(b"garbage" * 10)
    with pytest.raises(CdclError, match="not a readable cdcl checkpoint"):
        load_checkpoint(path)


def test_foreign_and_unsafe_checkpoints_are_refused(tmp_path: Path) -> None:
    """Other programs' files and pickled objects are refused with the file named."""
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": torch.nn.Linear(2, 2).state_dict()}, foreign)
    with pytest.raises(CdclError, match=f"{foreign}: not a cdcl checkpoint"):
        load_checkpoint(foreign)
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"format": "cdcl-checkpoint", "obj": Path("x")}, unsafe)
    with pytest.raises(CdclError, match=f"{unsafe}: not a readable cdcl checkpoint"):
        load_checkpoint(unsafe)
    with pytest.raises(CdclError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_find_checkpoint_prefers_best(tmp_path: Path) -> None:
    """A run directory resolves to best.pt when present, else last.pt; files pass through."""
    run = tmp_path / "run"
    with pytest.raises(CdclError, match="no checkpoint"):
        (run / "checkpoints").mkdir(parents=True)
        find_checkpoint(run)
    save_checkpoint(run / "checkpoints" / "last.pt", _state())
    assert find_checkpoint(run).name == "last.pt"
    save_checkpoint(run / "checkpoints" / "best.pt", _state())
    assert find_checkpoint(run).name == "best.pt"
    assert find_checkpoint(run, "last").name == "last.pt"
    assert find_checkpoint(run / "checkpoints" / "last.pt").name == "last.pt"
