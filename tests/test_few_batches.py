"""Screens with few plates: two held-out batches from four, warnings naming the empty figures,
and the dataset-sized generic presets."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from cli_process import TINY_MODEL
from cli_process import cdcl as _cdcl
from conftest import write_random_dataset

from cdcl.api import train_config
from cdcl.config import load_config, preset_names
from cdcl.data.split_check import few_heldout_batches
from cdcl.data.splits import assign_split, held_out_count, rotating_batch_split
from cdcl.presets.sizing import sized_schedule, sized_values


def _samples(n_batches: int) -> pd.DataFrame:
    rows = [
        {"batch": f"b{b}", "treatment": t, "is_control": t == "DMSO"}
        for b in range(n_batches)
        for t in ("DMSO", "t0", "t1")
    ]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("n", range(2, 13))
def test_every_fold_holds_out_two_batches_from_four(n: int) -> None:
    s = _samples(n)
    n_test = held_out_count(n)
    assert n_test == (1 if n < 4 else max(2, round(n / 3)))
    for k in range(1, n // n_test + 1):
        split = rotating_batch_split(s, k)
        held = set(s.loc[split == "test", "batch"])
        train = set(s.loc[split == "train", "batch"])
        assert len(held) == n_test and train and not held & train
    with pytest.raises(Exception, match="folds 1.."):
        rotating_batch_split(s, n // n_test + 1)


def test_four_plates_give_two_folds_of_two() -> None:
    s = _samples(4)
    tests = [sorted(set(s.loc[assign_split(s, "table", k) == "test", "batch"])) for k in (1, 2)]
    assert tests == [["b0", "b1"], ["b2", "b3"]]


def test_single_held_out_batch_is_named_with_a_fix() -> None:
    s = _samples(4)
    one = pd.Series(["test" if b == "b3" else "train" for b in s["batch"]])
    msg = few_heldout_batches(s, one, "table", "the default split")
    assert msg is not None
    for figure in ("kBET", "iLISI", "batch silhouette", "batch classifier", "batch-aware mAP"):
        assert figure in msg
    assert "holds out one batch (b3)" in msg and "--split 1 (holds out b0, b1)" in msg
    assert few_heldout_batches(s, assign_split(s, "table", 1), "table") is None
    # Three batches: no numbered fold holds out two; the message says how to get there.
    s3 = _samples(3)
    msg3 = few_heldout_batches(s3, assign_split(s3, "table", 1), "table")
    assert msg3 is not None and "--split-col" in msg3


def test_info_holds_out_two_of_four_batches_without_warning(tmp_path: Path) -> None:
    data = write_random_dataset(tmp_path / "ds", n_batches=4)
    proc = _cdcl("info", data)
    assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr
    assert "held out    b0, b1" in proc.stdout


def _one_batch_held_out(out: Path) -> Path:
    """4 batches whose stored split (a user's --split-col) holds out b3 only."""
    import numpy as np

    from cdcl.data.dataset_dir import DatasetInfo, DatasetWriter

    rows = [
        {"batch": f"b{b}", "plate": f"b{b}_p1", "well": f"W{w}", "site": 0,
         "treatment": t, "is_control": t == "DMSO", "split": "test" if b == 3 else "train"}
        for b in range(4) for w, t in enumerate(("DMSO", "DMSO", "t0", "t1", "t0", "t1"))
    ]  # fmt: skip
    samples = pd.DataFrame(rows)
    samples.insert(0, "image", np.arange(len(samples)))
    info = DatasetInfo("one-out", "test", ["DNA", "ER"], "uint8", [16, 16], len(samples))
    w = DatasetWriter(out, info)
    rng = np.random.default_rng(0)
    w.write(np.arange(len(samples)), rng.integers(0, 255, (len(samples), 2, 16, 16), np.uint8))
    return w.commit(samples)


def test_info_and_train_warn_when_one_batch_is_held_out(tmp_path: Path) -> None:
    data = _one_batch_held_out(tmp_path / "ds")
    proc = _cdcl("info", data)
    warn = [ln for ln in proc.stderr.splitlines() if "warning" in ln]
    assert proc.returncode == 0 and len(warn) == 1, proc.stderr
    assert "holds out one batch (b3)" in warn[0] and "kBET, iLISI" in warn[0]
    assert "--split 1 (holds out b0, b1)" in warn[0]
    tiny = [*TINY_MODEL, "train.max_steps=1"]
    proc = _cdcl(
        "train", "--preset", "generic-dino", "--data", data, "--out", tmp_path / "run", *tiny
    )
    assert proc.returncode == 0, proc.stderr
    warn = [ln for ln in proc.stderr.splitlines() if "warning" in ln]
    assert len(warn) == 1 and warn[0].startswith("cdcl train: warning: the default split holds")
    assert "--split 1 (holds out b0, b1)" in warn[0]
    assert "generic-dino sized for 24 images of 16x16 px" in proc.stderr


def test_generic_presets_are_sized_from_the_dataset(tmp_path: Path) -> None:
    assert {"generic-dino", "generic-cdcl"} <= set(preset_names())
    small = sized_values((32, 32), 96)
    big = sized_values((1080, 1080), 200_000)
    assert small["views.resize"] is None and small["model.patch_size"] == 8
    # 96 images: batch 32 (two steps an epoch at least), 100 passes, 9,600 images seen.
    assert small["train.batch_size"] == 32 and small["train.epochs"] == 100
    assert small["model.embed_dim"] == 128
    assert big["views.resize"] == 256 and big["model.patch_size"] == 16
    assert big["model.embed_dim"] == 384 and big["train.epochs"] == 10
    mid = sized_values((520, 696), 20_000)
    assert mid["model.embed_dim"] == 192 and mid["train.epochs"] == 10
    data = write_random_dataset(tmp_path / "ds", n_batches=4, size=32)
    cfg, _, _, notes = train_config(data, "generic-cdcl", overrides={"train.epochs": 3})
    assert cfg.method.name == "cdcl" and cfg.train.epochs == 3  # the user's value wins
    assert cfg.model.patch_size == 8 and cfg.views.resize is None
    assert notes and "generic-cdcl sized for 40 images of 32x32 px" in notes[0]
    assert "3 epochs" in notes[0] and "as you set: train.epochs" in notes[0]
    dino, _, _, notes = train_config(data, "generic-dino")
    # The schedule follows the training images of the split, not every image of the screen.
    n_train = int(notes[0].split(" training images")[0].rsplit(" ", 1)[1])
    assert n_train < 40 and dino.method.name == "dino"
    assert dino.train.batch_size == sized_schedule(n_train)["train.batch_size"]
    assert dino.train.epochs == sized_schedule(n_train)["train.epochs"]
    # Without a dataset the preset is a valid config on its own.
    assert load_config("generic-dino").method.name == "dino"
