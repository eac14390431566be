"""`cdcl train` end to end in subprocesses: all seven methods, checkpoints, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from cli_process import TINY_MODEL, cdcl

from cdcl.config import load_config
from cdcl.errors import CdclError
from cdcl.train.checkpoint import load_checkpoint, load_for_eval

# A tiny network and head so that a step takes a fraction of a second on one core.
TINY = [
    *TINY_MODEL,
    "method.byol_proj_hidden=32",
    "method.byol_pred_hidden=32",
    "method.byol_proj_dim=16",
    "train.batch_size=8",
    "train.log_every=1",
]
METHODS = ["supervised", "dino", "byol", "dino-cb", "byol-cb", "cdcl", "cdcl-same-batch"]


@pytest.fixture(scope="module")
def screen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny simulated screen: 3 training batches, 1 validation batch, 1 test batch (32 px)."""
    from cdcl.data.synthetic import generate

    out = tmp_path_factory.mktemp("screen") / "ds"
    return generate(out, "tiny", seed=0, batches=5, test_batches=1, val_batches=1)


def read_metrics(run: Path) -> list[dict]:
    """The records of RUN/metrics.jsonl."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_each_synthetic_preset_trains_and_reloads(
    screen: Path, tmp_path: Path, method: str
) -> None:
    """A few steps from the CLI: finite changing loss, val line, best/last checkpoints that load."""
    run = tmp_path / "run"
    r = cdcl(
        "train",
        "--preset",
        f"synthetic-{method}",
        "--data",
        screen,
        "--out",
        run,
        "train.max_steps=3",
        *TINY,
    )
    assert r.returncode == 0, r.stderr
    records = read_metrics(run)
    train = [m for m in records if m["kind"] == "train"]
    assert [m["step"] for m in train] == [1, 2, 3]
    losses = [m["loss"] for m in train]
    assert all(math.isfinite(v) for v in losses) and len(set(losses)) > 1
    assert all(m["images_per_s"] > 0 and "lr" in m and "wd" in m for m in train)
    val = [m for m in records if m["kind"] == "val"]
    assert len(val) == 1 and 0.0 <= val[0]["probe_acc"] <= 1.0 and val[0]["n_val"] == 24
    # best.pt fires on the first validation (the reference implementation's never did).
    for name in ("last.pt", "best.pt"):
        raw = torch.load(run / "checkpoints" / name, weights_only=True)
        assert raw["step"] == 3 and raw["config"]["method"]["name"] == method.replace("-", "_")
    assert load_config(run / "config.yaml") == load_config(
        f"synthetic-{method}", [*TINY, "train.max_steps=3", f"data.path={screen.resolve()}"]
    )
    ev = load_for_eval(run)
    assert ev.path.name == "best.pt" and ev.views_cfg.global_size == 28
    assert set(ev.label_of) == {"DMSO", *(f"cmpd0{i}" for i in range(1, 7))}
    assert len(ev.batch_of) == 3
    with torch.no_grad():
        feats = ev.method.embed(torch.randn(2, 5, 28, 28))
    assert feats.shape == (2, 32) and ev.probe.out_features == len(ev.label_of)
    if method.endswith("cb") or method.startswith("cdcl"):
        # Every treatment is in every batch, with more than one image in each.
        assert all(m["pair_fallbacks"] == 0 for m in train)


@pytest.mark.slow
def test_existing_run_needs_resume_and_corrupt_checkpoint_is_one_line(
    screen: Path, tmp_path: Path
) -> None:
    """Reusing --out without --resume, or resuming a corrupted checkpoint: one line, exit 2."""
    run = tmp_path / "run"
    args = ["train", "--preset", "synthetic-dino", "--data", screen, "--out", run, *TINY]
    assert cdcl(*args, "train.max_steps=2").returncode == 0
    r = cdcl(*args, "train.max_steps=4")
    # The screen holds out one batch: a warning line says so before the error.
    errors = [ln for ln in r.stderr.strip().splitlines() if "warning:" not in ln]
    assert r.returncode == 2 and "--resume" in r.stderr and len(errors) == 1
    # A changed setting that matters is refused on resume, naming the key.
    r = cdcl(*args, "train.max_steps=4", "train.lr=1e-2", "--resume")
    assert r.returncode == 2 and "train.lr" in r.stderr
    # Resuming continues the same run: steps 3-4 follow 1-2 in metrics.jsonl.
    r = cdcl(*args, "train.max_steps=4", "--resume")
    assert r.returncode == 0, r.stderr
    steps = [m["step"] for m in read_metrics(run) if m["kind"] == "train"]
    assert steps == [1, 2, 3, 4]
    last = run / "checkpoints" / "last.pt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 3])
    r = cdcl(*args, "train.max_steps=6", "--resume")
    lines = [ln for ln in r.stderr.strip().splitlines() if "warning:" not in ln]
    assert r.returncode == 2 and len(lines) == 1 and str(last) in lines[0]
    assert "Traceback" not in r.stderr
    with pytest.raises(CdclError, match="not a readable cdcl checkpoint"):
        load_for_eval(last)
    # A non-cdcl file is refused as clearly.
    torch.save({"model": torch.zeros(1)}, last)
    r = cdcl(*args, "train.max_steps=6", "--resume")
    assert r.returncode == 2 and "not a cdcl checkpoint" in r.stderr


@pytest.mark.slow
def test_bad_user_input_is_one_line(screen: Path, tmp_path: Path) -> None:
    """Unknown keys and presets fail fast with exit 2 and no traceback."""
    r = cdcl(
        "train",
        "--preset",
        "synthetic-dino",
        "--data",
        screen,
        "--out",
        tmp_path / "r",
        "train.epoch=1",
    )
    assert r.returncode == 2 and "did you mean `epochs`" in r.stderr and "Traceback" not in r.stderr
    r = cdcl("train", "--preset", "nope", "--data", screen, "--out", tmp_path / "r")
    assert r.returncode == 2 and "synthetic-cdcl" in r.stderr
    r = cdcl("train", "--list-presets")
    assert r.returncode == 0 and "rxrx1-cdcl" in r.stdout.split()
    assert not (tmp_path / "r").exists()
    # The held-out-batch fold and subset flags reach the config and the run.
    run = tmp_path / "sub"
    r = cdcl(
        "train",
        "--preset",
        "synthetic-supervised",
        "--data",
        screen,
        "--out",
        run,
        "--subset",
        "only_controls",
        "train.max_steps=1",
        *TINY,
        "train.batch_size=4",
    )
    assert r.returncode == 0, r.stderr
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["config"]["data"]["subset"] == "only_controls" and list(ckpt["label_of"]) == [
        "DMSO"
    ]
