"""Every command is its API verb: the same inputs through `cdcl ...` and `cdcl.<verb>(...)` give
the same outputs (datasets, summaries, profiles, results.json figures, comparisons, studies).

Both sides run on one thread (the subprocess through cli_process, this process through
``one_thread``), so their figures agree to the last bit, not just approximately.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from cli_process import TINY_MODEL_VALUES
from cli_process import cdcl as run_cli
from lock_holder import start_holder

import cdcl
from cdcl.errors import CdclError

# A tiny network so that an epoch of the tiny screen takes seconds on one core (as test_api).
TINY = {**TINY_MODEL_VALUES, "train.batch_size": 8, "train.epochs": 1}
# What legitimately differs between two runs of the same computation.
VOLATILE = {"timings_s", "wall_s", "images_per_s", "versions", "reused", "seconds", "created"}


@contextmanager
def one_thread() -> Iterator[None]:
    """torch and BLAS on one thread, as the command's subprocess (OMP_NUM_THREADS=1)."""
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(before)


def ok(*args: object) -> str:
    """Run `cdcl ARGS`; its stdout (the test fails with its stderr on a non-zero exit)."""
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def stable(value: Any) -> Any:
    """``value`` without the keys that change between two runs of the same computation."""
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


def results(directory: Path) -> dict[str, Any]:
    return stable(json.loads((directory / "results.json").read_text()))


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli_api")


@pytest.fixture(scope="module")
def table(root: Path) -> Path:
    """A one-row-per-image table with its images in one .npz (3 batches x 4 wells x 2 sites)."""
    rng = np.random.default_rng(0)
    rows = [
        {"Metadata_Batch": f"b{b}", "Metadata_Plate": f"p{b}", "Metadata_Well": f"A0{w}",
         "Metadata_Site": s, "Metadata_Compound": ("DMSO", "DMSO", "t1", "t2")[w]}
        for b in range(3) for w in range(4) for s in range(2)
    ]  # fmt: skip
    path = root / "table.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    np.savez(root / "images.npz", images=rng.integers(0, 255, (len(rows), 16, 16, 3), np.uint8))
    return path


@pytest.fixture(scope="module")
def run(root: Path) -> Path:
    """The tiny simulated screen and one epoch of a tiny CDCL network on it."""
    with one_thread():
        data = cdcl.synth(root / "screen", preset="tiny")
        return cdcl.train(data, root / "run", preset="synthetic-cdcl", overrides=TINY)


@pytest.fixture(scope="module")
def profiles(root: Path, run: Path) -> tuple[Path, pd.DataFrame]:
    """The run's well profiles written by `cdcl embed` and returned by `cdcl.embed`."""
    ok("embed", run, "--out", root / "cli.parquet", "--no-progress")
    with one_thread():
        return root / "cli.parquet", cdcl.embed(run)


@pytest.fixture(scope="module")
def evaluations(root: Path, run: Path, profiles: tuple[Path, pd.DataFrame]) -> dict[str, Path]:
    """The run and the profile table evaluated by the command and by the verb."""
    file, _ = profiles
    small = ("--no-umap", "--null-size", "100")
    ok("evaluate", run, "--out", root / "run_cli", *small)
    ok("evaluate", "--features", file, "--out", root / "table_cli", *small)
    with one_thread():
        cdcl.evaluate(run, root / "run_api", umap=False, null_size=100)
        cdcl.evaluate(file, root / "table_api", umap=False, null_size=100)
    return {k: root / k for k in ("run_cli", "run_api", "table_cli", "table_api")}


def test_build_table_and_info(root: Path, table: Path, capsys: pytest.CaptureFixture) -> None:
    args = ("--samples", table, "--npz", root / "images.npz", "--channels", "DNA,ER,RNA")
    ok("build", "table", *args, "--out", root / "built_cli")
    built = cdcl.build_table(
        table, root / "built_api", "DNA,ER,RNA", npz=root / "images.npz", verbose=False
    )
    a, b = cdcl.open_dataset(root / "built_cli"), cdcl.open_dataset(built)
    pd.testing.assert_frame_equal(a.samples, b.samples)
    np.testing.assert_array_equal(a.read_many(np.arange(24)), b.read_many(np.arange(24)))
    assert a.channels == b.channels == ["DNA", "ER", "RNA"]
    for name in ("plate_stats.parquet",):
        pd.testing.assert_frame_equal(
            pd.read_parquet(root / "built_cli" / name), pd.read_parquet(built / name)
        )
    capsys.readouterr()
    proc = run_cli("info", built)
    text = cdcl.info(built)
    assert proc.returncode == 0 and proc.stdout == text + "\n"
    assert proc.stderr == capsys.readouterr().err  # the same split warning, or none


@pytest.mark.slow
def test_embed(profiles: tuple[Path, pd.DataFrame]) -> None:
    file, frame = profiles
    pd.testing.assert_frame_equal(pd.read_parquet(file), frame)


@pytest.mark.slow
def test_evaluate_a_run(evaluations: dict[str, Path]) -> None:
    cli, api = results(evaluations["run_cli"]), results(evaluations["run_api"])
    assert set(cli["feature_sets"]) == {"cdcl", "cdcl+tvn", "intensity", "random"}
    assert cli == api


@pytest.mark.slow
def test_evaluate_a_table(
    evaluations: dict[str, Path], profiles: tuple[Path, pd.DataFrame]
) -> None:
    cli, api = results(evaluations["table_cli"]), results(evaluations["table_api"])
    assert cli["split"]["from_column"] == "Metadata_Split" and cli["source"]["eval_on"] == "test"
    assert cli == api
    # The profiles in memory, as a notebook holds them, score as the file does.
    with one_thread():
        frame = stable(cdcl.evaluate(pd.read_parquet(profiles[0]), umap=False, null_size=100))
    assert frame["feature_sets"] == cli["feature_sets"] and frame["split"] == cli["split"]


@pytest.mark.slow
def test_compare(root: Path, evaluations: dict[str, Path]) -> None:
    runs = [evaluations["run_cli"], evaluations["table_cli"]]
    ok("compare", *runs, "--out", root / "compare_cli", "--names", "run,table")
    cdcl.compare(runs, root / "compare_api", names=["run", "table"])
    a, b = (root / d / "comparison.csv" for d in ("compare_cli", "compare_api"))
    assert a.read_text() == b.read_text()


@pytest.mark.slow
def test_study_quick(root: Path) -> None:
    """`cdcl.study` runs the quick study; `cdcl study` with the same options on the same folder
    then reuses its replicate, which it does only when the replicate's key (every option its
    figures depend on: methods, budget, data, seeds, folds) is the same, and writes the same
    study.json (whose config also holds the references and the level of the tests)."""
    out = root / "study"
    with one_thread():
        cdcl.study(out, quick=True, methods="DINO,CDCL", seeds=[0], epochs=1)
    api = stable(json.loads((out / "study.json").read_text()))
    args = ("--quick", "--methods", "DINO,CDCL", "--seeds", "0", "--epochs", "1")
    stdout = ok("study", *args, "--no-progress", "--out", out)
    assert "reused replicates/seed0/results.json" in stdout
    assert stable(json.loads((out / "study.json").read_text())) == api
    assert api["config"]["references"] == ["DINO", "DINO+harmony"]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda d: cdcl.study(d / "s", seeds=[0, 0]), "--seeds 0,0: a value is repeated"),
        (lambda d: cdcl.study(d / "s", folds="2,2"), "--folds 2,2: a value is repeated"),
        (lambda d: cdcl.study(d / "s", alpha=1.5), "--alpha 1.5: must lie between 0 and 1"),
        (lambda d: cdcl.evaluate(d / "t.csv", level="nucleus"), "--level nucleus: use well"),
        (lambda d: cdcl.evaluate(d / "t.csv", eval_on="train"), "--eval-on train: use all"),
        (lambda d: cdcl.evaluate(d / "t.csv", plot_sample=-1), "--plot-sample -1"),
        (lambda d: cdcl.evaluate(d / "t.csv", variants="raw,x"), "--variants raw,x"),
        (lambda d: cdcl.evaluate(d / "t.csv", cellprofiler=True), "--cellprofiler measures"),
        (lambda d: cdcl.evaluate(d / "t.csv", d / "t.csv"), "is the input table"),
        (lambda d: cdcl.evaluate(d / "none"), "no such run directory or profile table"),
        (lambda d: cdcl.embed(), "give a SOURCE"),
        (lambda d: cdcl.embed("intensity", d, checkpoint="first"), "--checkpoint first"),
        (lambda d: cdcl.embed(features="cellprofiler"), "needs --data DIR"),
        (lambda d: cdcl.compare([d], d / "c", names="a,b"), "--names has 2 names for 1 runs"),
        (
            lambda d: cdcl.build_table(d / "t.csv", d / "b", "DNA", npz=d / "x", workers=0),
            "--workers 0",
        ),
    ],
)
def test_the_verbs_check_their_arguments_before_any_work(
    tmp_path: Path, call: Any, message: str
) -> None:
    (tmp_path / "t.csv").write_text("Metadata_Batch,f0\na,1\nb,2\n")
    with pytest.raises(CdclError, match=message.replace("(", r"\(")):
        call(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv"]  # nothing written


def test_out_and_held_locks_are_refused_at_once(tmp_path: Path) -> None:
    """An existing file as --out (even the input table) and a held output: one line, rc 2."""
    table = tmp_path / "t.csv"
    table.write_text("Metadata_Batch,Metadata_Treatment,f0\na,DMSO,1\nb,x,2\n")
    (tmp_path / "notes.txt").write_text("")
    for out, why in ((table, "is the input table"), (tmp_path / "notes.txt", "is a file")):
        proc = run_cli("evaluate", "--features", table, "--out", out)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert f"--out {out}: {why}" in proc.stderr
    holder = start_holder(tmp_path / "out", tmp_path)
    try:
        with pytest.raises(CdclError, match="in use by test holder"):
            cdcl.evaluate(table, tmp_path / "out")
    finally:
        holder.kill()
        holder.wait()
