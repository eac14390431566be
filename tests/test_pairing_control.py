"""CDCL-same-batch, the pairing control: its partners on a real screen and where it is selectable."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cdcl.config import load_config
from cdcl.errors import CdclError
from cdcl.experiments.demo import DemoSpec, method_labels
from cdcl.experiments.study import StudySpec, check_spec
from cdcl.train.data import prepare_data, training_set


@pytest.fixture(scope="module")
def screen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny simulated screen of the CLI tests: 3 training batches (32 px)."""
    from cdcl.data.synthetic import generate

    out = tmp_path_factory.mktemp("screen") / "ds"
    return generate(out, "tiny", seed=0, batches=5, test_batches=1, val_batches=1)


@pytest.mark.parametrize("preset", ["synthetic-cdcl", "synthetic-cdcl-same-batch"])
def test_partners_of_the_training_pipeline(screen: Path, preset: str) -> None:
    """From the preset to the training set: every partner shares the image's treatment and is
    another image; CDCL's always come from another batch, the control's never do."""
    cfg = load_config(preset, [f"data.path={screen}"])
    m = cfg.method.resolved()
    method = SimpleNamespace(view_kind="dino", cross_batch=m.cross_batch, pairing=m.pairing)
    data = prepare_data(cfg)
    views = cfg.views.resolved(data.ds.image_size[0])
    ts = training_set(cfg, data, views, method, torch.device("cpu"))
    s = data.ds.samples.set_index("image")
    treatment, batch = s["treatment"].astype(str), s["batch"].astype(str)
    rows = data.train_rows
    assert len(set(batch[rows])) == 3
    partners, fell_back = ts.partner_index.partners(np.tile(rows, 50), np.random.default_rng(0))
    i = np.tile(rows, 50)
    assert (treatment[partners].to_numpy() == treatment[i].to_numpy()).all()
    assert (partners != i).all() and not fell_back.any()
    same = batch[partners].to_numpy() == batch[i].to_numpy()
    assert same.all() if m.pairing == "same_batch" else not same.any()
    # The items the loader yields carry the same kind of partner.
    for k in range(0, len(ts), 7):
        item = ts[k]
        assert (item["batch_id"] == item["partner_batch_id"]) == (m.pairing == "same_batch")


def test_selectable_by_name_but_not_trained_by_default(tmp_path: Path) -> None:
    """The demo and the study train it when named (both datasets), never by default."""
    for dataset in ("synthetic", "bbbc021"):
        default = method_labels(DemoSpec(tmp_path / "d", dataset=dataset))
        assert "CDCL-same-batch" not in default
        named = DemoSpec(tmp_path / "d", dataset=dataset, methods=("CDCL", "CDCL-same-batch"))
        assert method_labels(named) == ["CDCL", "CDCL-same-batch"]
    with pytest.raises(CdclError, match="CDCL-same-batch"):  # the choices name it
        method_labels(DemoSpec(tmp_path / "d", methods=("CDCL-other-batch",)))
    spec = StudySpec(
        out=tmp_path / "s",
        methods=("DINO", "CDCL", "CDCL-same-batch"),
        seeds=(0, 1),
        references=("CDCL-same-batch",),
        quick=True,
    )
    assert check_spec(spec) == ["DINO", "CDCL", "CDCL-same-batch"]
    assert not (tmp_path / "s").exists()
