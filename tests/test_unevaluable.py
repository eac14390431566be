"""An evaluation that cannot evaluate says so; small data gets a batch that fits; a killed
`cdcl evaluate` reruns to the same figures. Real CLI subprocesses on tiny data."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from cli_process import TINY_MODEL, cdcl, cdcl_argv, cdcl_env

from cdcl.data.dataset_dir import DatasetInfo, DatasetWriter

TINY_TRAIN = [*TINY_MODEL, "train.epochs=1"]


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def write_dmso_first_screen(out: Path) -> Path:
    """3 batches of one plate; b0 holds only DMSO, b1 and b2 four treatments + DMSO (60 images).

    The stored split holds out b0 (nothing to score), as a hand-made `--split-col` would;
    numbered folds pair a treated batch with the DMSO-only one and can be scored.
    """
    rows = []
    for b in range(3):
        treatments = ["DMSO"] * 5 if b == 0 else ["DMSO", "t0", "t1", "t2", "t3"]
        for w, t in enumerate(treatments):
            for rep in range(2):
                for site in range(2):
                    rows.append(
                        {
                            "batch": f"b{b}",
                            "plate": f"b{b}_p1",
                            "well": f"W{w}{rep}",
                            "site": site,
                            "treatment": t,
                            "compound": t,
                            "moa": {"DMSO": "control", "t0": "m0", "t1": "m0"}.get(t, "m1"),
                            "is_control": t == "DMSO",
                            "split": "test" if b == 0 else "train",
                        }
                    )
    samples = pd.DataFrame(rows)
    samples.insert(0, "image", np.arange(len(samples)))
    info = DatasetInfo("dmso-first", "test", ["DNA", "ER", "RNA"], "uint8", [16, 16], len(samples))
    w = DatasetWriter(out, info)
    rng = np.random.default_rng(0)
    shift = samples["treatment"].map({"DMSO": 0, "t0": 40, "t1": 60, "t2": 120, "t3": 140})
    images = (
        rng.integers(0, 80, size=(len(samples), 3, 16, 16)) + shift.to_numpy()[:, None, None, None]
    )
    w.write(np.arange(len(samples)), images.astype(np.uint8))
    return w.commit(samples)


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """The screen and a run trained on its default fold (b0 held out), with the preset's batch."""
    root = tmp_path_factory.mktemp("unevaluable")
    data = write_dmso_first_screen(root / "ds")
    run = root / "run"
    proc = cdcl("train", "--preset", "synthetic-cdcl", "--data", data, "--out", run, *TINY_TRAIN)
    assert proc.returncode == 0, proc.stderr
    return data, run, proc


def test_info_warns_that_the_default_split_holds_out_only_controls(tmp_path: Path) -> None:
    data = write_dmso_first_screen(tmp_path / "ds")
    proc = cdcl("info", data)
    assert proc.returncode == 0, proc.stderr
    assert "held out    b0 (0 treatments" in proc.stdout
    warning = _lines(proc.stderr)
    assert len(warning) == 1 and warning[0].startswith("cdcl info: warning:")
    assert "b0" in warning[0] and "only controls" in warning[0]
    assert "--split 1 (holds out b0, b1)" in warning[0] and "--split-col" in warning[0]


def test_train_warns_before_training_and_fits_the_batch(trained: tuple) -> None:
    _, run, proc = trained
    lines = _lines(proc.stderr)
    start = next(i for i, ln in enumerate(lines) if ln.startswith("cdcl train: cdcl on"))
    before = lines[:start]
    assert any("warning:" in ln and "only controls" in ln and "--split 1" in ln for ln in before)
    # 40 training images, preset batch 64: a batch of 16 (2 steps per epoch) and one notice.
    notice = [ln for ln in before if "notice:" in ln]
    assert len(notice) == 1 and "train.batch_size=16" in notice[0], proc.stderr
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["train"]["batch_size"] == 16


def test_an_explicit_batch_too_large_names_the_value_to_pass(
    trained: tuple, tmp_path: Path
) -> None:
    data, _, _ = trained
    proc = cdcl(
        "train", "--preset", "synthetic-cdcl", "--data", data, "--out", tmp_path / "r",
        *TINY_TRAIN, "train.batch_size=64",
    )  # fmt: skip
    assert proc.returncode == 2
    err = _lines(proc.stderr)[-1]
    assert "train.batch_size=64" in err and "train.batch_size=16" in err
    assert not (tmp_path / "r").exists()


def test_evaluate_with_nothing_to_score_says_why_and_exits_2(
    trained: tuple, tmp_path: Path
) -> None:
    _, run, _ = trained
    proc = cdcl("evaluate", run, "--no-umap", "--no-baselines", "--out", tmp_path / "ev")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "fits failed" not in proc.stderr
    lines = [ln for ln in _lines(proc.stderr) if ln.startswith("cdcl evaluate")]
    notes = [ln for ln in lines if ": note: " in ln]
    assert len(notes) == len(set(notes)) >= 4
    assert any("kBET: needs >= 3 profiles in >= 2 batches; have" in ln for ln in notes)
    assert any("treatment accuracy" in ln for ln in notes)
    assert lines[-1].startswith("cdcl evaluate: error: no metric could be computed")
    assert "--split N" in lines[-1] and "--level image" in lines[-1]
    # Refused before writing: an earlier results.json or report.html would have been kept.
    assert "nothing was written" in lines[-1]
    assert not (tmp_path / "ev" / "results.json").exists()
    assert not (tmp_path / "ev" / "report.html").exists()


def _figures(path: Path) -> dict:
    r = json.loads(path.read_text())
    return {"feature_sets": r["feature_sets"], "split": r["split"], "level": r.get("level")}


@pytest.mark.slow
def test_evaluate_level_image_scores_every_image(trained: tuple, tmp_path: Path) -> None:
    _, run, _ = trained
    out = tmp_path / "ev"
    proc = cdcl("evaluate", run, "--split", "2", "--level", "image", "--no-umap", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    r = json.loads((out / "results.json").read_text())
    assert r["level"] == "image" and r["protocol"]["profiles"].startswith("image level")
    # b0 (train) and b2 (train) + b1 (test), 20 images each: every image is a profile.
    assert r["feature_sets"]["cdcl"]["n"]["profiles"] == 60
    assert isinstance(r["feature_sets"]["cdcl"]["raw"]["classification"]["knn"]["accuracy"], float)
    wells = cdcl(
        "evaluate", run, "--split", "2", "--no-umap", "--no-baselines", "--out", tmp_path / "w"
    )
    assert wells.returncode == 0, wells.stderr
    assert (
        json.loads((tmp_path / "w" / "results.json").read_text())["feature_sets"]["cdcl"]["n"][
            "profiles"
        ]
        == 30
    )


@pytest.mark.slow
def test_evaluate_killed_midway_reruns_to_the_same_figures(trained: tuple, tmp_path: Path) -> None:
    _, run, _ = trained
    out = tmp_path / "ev"
    args = ["evaluate", run, "--split", "2", "--no-umap", "--out", out, "--null-size", "200"]
    first = cdcl(*args)
    assert first.returncode == 0, first.stderr
    results = out / "results.json"
    reference = results.read_bytes()
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            cdcl_argv(*args),
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=cdcl_env(),
        )
        # Kill once the first embedding pass has started: later stages are still to come.
        deadline = time.monotonic() + 300
        while "img/s" not in log.read_text() and proc.poll() is None:
            assert time.monotonic() < deadline, "evaluate never started embedding"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL, "evaluate finished before the kill"
    assert results.read_bytes() == reference  # the kill lost nothing written before
    again = cdcl(*args)
    assert again.returncode == 0, again.stderr
    assert _figures(results) == _figures_from(reference)
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def _figures_from(data: bytes) -> dict:
    r = json.loads(data)
    return {"feature_sets": r["feature_sets"], "split": r["split"], "level": r.get("level")}


def test_info_on_a_single_batch_says_nothing_can_be_held_out(tmp_path: Path) -> None:
    rows = [
        {
            "batch": "b0",
            "plate": "p",
            "well": f"w{i}",
            "site": 0,
            "treatment": "DMSO" if i < 2 else "t",
        }
        for i in range(4)
    ]
    samples = pd.DataFrame(rows).assign(is_control=lambda d: d["treatment"] == "DMSO")
    samples.insert(0, "image", np.arange(4))
    w = DatasetWriter(tmp_path / "one", DatasetInfo("one", "test", ["A"], "uint8", [8, 8], 4))
    w.write(np.arange(4), np.ones((4, 1, 8, 8), np.uint8))
    w.commit(samples)
    proc = cdcl("info", tmp_path / "one")
    assert proc.returncode == 0, proc.stderr
    assert "held out    none (samples: only 1 batch" in proc.stdout
