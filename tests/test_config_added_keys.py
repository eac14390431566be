"""A run written before a configuration key existed is still the same run (long studies)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from cdcl.config import load_config
from cdcl.errors import CdclError
from cdcl.experiments.demo import trained_with
from cdcl.train.run_state import check_resume


def _older(d: dict) -> dict:
    """The configuration as a version without `train.probe_optimizer` wrote it."""
    old = copy.deepcopy(d)
    del old["train"]["probe_optimizer"]
    return old


def test_a_stored_config_without_a_new_key_at_its_default_is_the_same(tmp_path: Path) -> None:
    cfg = load_config("synthetic-cdcl", ["train.epochs=3"])
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    assert trained_with(path, cfg)
    path.write_text(yaml.safe_dump(_older(cfg.to_dict())))
    assert path.read_text() != cfg.to_yaml() and trained_with(path, cfg)
    # ... but not when the new key is set to something else, or another value differs
    assert not trained_with(
        path, load_config("synthetic-cdcl", ["train.epochs=3", "train.probe_optimizer=sgd"])
    )
    assert not trained_with(path, load_config("synthetic-cdcl", ["train.epochs=4"]))
    path.write_text("train: [unclosed")
    assert not trained_with(path, cfg)
    assert not trained_with(tmp_path / "absent.yaml", cfg)


def test_resume_accepts_a_checkpoint_written_before_a_key_existed() -> None:
    cfg = load_config("synthetic-cdcl", ["train.epochs=3"])
    ckpt = {"config": _older(cfg.to_dict()), "world_size": 1}
    check_resume(ckpt, cfg, Path("last.pt"), 1)  # no error: the key is at its default
    changed = load_config("synthetic-cdcl", ["train.epochs=3", "train.lr=0.1"])
    with pytest.raises(CdclError, match="cannot resume, the configuration differs"):
        check_resume(ckpt, changed, Path("last.pt"), 1)
