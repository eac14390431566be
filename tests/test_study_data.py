"""`cdcl study --data DIR`: the study on a screen the user built, its folds as units."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cli_process import cdcl

from cdcl.data.synthetic import generate


@pytest.fixture(scope="module")
def built_screen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny screen written to disk, used as a user's built dataset."""
    return generate(tmp_path_factory.mktemp("screen") / "data", "tiny", seed=1, progress=False)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--data", "{missing}"], "not a directory"),
        (["--data", "{screen}", "--dataset", "bbbc021"], "replaces --dataset"),
        (["--data", "{screen}", "--batch-strength", "2"], "only for the simulated screen"),
        (["--data", "{screen}", "--folds", "7"], "folds 1..2"),
    ],
)
def test_bad_data_options_fail_in_one_line(
    tmp_path: Path, built_screen: Path, args: list[str], needle: str
) -> None:
    filled = [a.format(missing=tmp_path / "nope", screen=built_screen) for a in args]
    out = tmp_path / "study"
    proc = cdcl("study", "--quick", "--seeds", "0", "--out", str(out), *filled, timeout=300)
    assert proc.returncode != 0
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (out / "replicates").exists()  # nothing trained


def test_one_batch_screen_is_refused(tmp_path: Path) -> None:
    import pandas as pd

    from cdcl.errors import CdclError
    from cdcl.experiments.demo import check_custom_data

    data = generate(tmp_path / "data", "tiny", seed=0, progress=False)
    samples = pd.read_parquet(data / "samples.parquet")
    samples["batch"] = "B01"
    samples.to_parquet(data / "samples.parquet")
    with pytest.raises(CdclError, match="one batch only"):
        check_custom_data(data)


def test_a_study_trains_the_preset_sized_as_cdcl_train_sizes_it(
    tmp_path: Path, built_screen: Path
) -> None:
    from cdcl.experiments.demo import CUSTOM, DemoSpec, budget_overrides, method_config
    from cdcl.presets.sizing import warmup_epochs
    from cdcl.train.configure import train_config

    spec = DemoSpec(out=tmp_path, dataset=CUSTOM, data_dir=built_screen, epochs=20, split=1)
    for label, preset in (("DINO", "generic-dino"), ("CDCL", "generic-cdcl")):
        name, cfg = method_config(spec, label, built_screen)
        assert name == preset
        sized = train_config(built_screen, preset, overrides=budget_overrides(spec))[0]
        assert cfg.to_dict() == sized.to_dict()
        # the sizing's warm-up (a tenth of the epochs), not the preset file's fixed one
        assert cfg.train.epochs == 20 and cfg.train.warmup_epochs == warmup_epochs(20) == 2
        assert cfg.data.split == 1


@pytest.mark.slow
def test_study_on_a_built_screen_with_folds_as_units(tmp_path: Path, built_screen: Path) -> None:
    out = tmp_path / "study"
    cmd = ["study", "--data", str(built_screen), "--folds", "1,2", "--seeds", "0,1", "--quick",
           "--methods", "DINO,CDCL", "--no-progress", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "CDCL_STATE_DIR": str(tmp_path / "state")}
    proc = cdcl(*cmd, env=env, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = json.loads((out / "study.json").read_text())
    assert study["config"]["dataset"] == "custom"
    assert study["config"]["data"] == str(built_screen)
    # two seeds share each fold's held-out plates: the fold is the unit
    assert study["unit"] == "fold" and study["n_units"] == 2
    assert {(r["seed"], r["fold"]) for r in study["replicates"]} == {
        (0, 1), (0, 2), (1, 1), (1, 2)
    }  # fmt: skip
    held = {r["fold"]: tuple(r["held_out"]) for r in study["replicates"]}
    assert held[1] != held[2]
    design = json.loads((out / "design.json").read_text())
    assert design["dataset"] == "custom" and len(design["data"]) == 16  # the screen's hash
    assert study["preregistered"]["design"] == design["hash"]
    key = json.loads((out / "replicates" / "seed0_fold1" / "replicate.json").read_text())
    assert key["data"] == design["data"]
    config = (out / "replicates" / "seed0_fold1" / "runs" / "cdcl" / "config.yaml").read_text()
    assert "split: 1" in config
    again = cdcl(*cmd, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("reused replicates/") == 4
