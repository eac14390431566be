"""Faults that used to give wrong figures, tracebacks or lost results: real files, real commands."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from cli_process import TINY_MODEL, cdcl
from conftest import write_random_dataset
from zarr.codecs import BloscCodec

from cdcl.cli import main
from cdcl.data.dataset_dir import IMAGES_DIR, chunk_file, has_checksums

TINY_TRAIN = [*TINY_MODEL, "train.epochs=1"]


def one_error(proc: subprocess.CompletedProcess) -> str:
    """The single stderr line of a refused command (asserts rc 2 and no traceback)."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "note: " not in ln]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _drop_checksums(ds: Path) -> None:
    """Rewrite the image store as cdcl wrote it before chunk checksums (Blosc only)."""
    store = ds / IMAGES_DIR
    old = zarr.open_array(str(store), mode="r")
    pixels, chunks = old[:], old.chunks
    shutil.rmtree(store)
    new = zarr.create_array(
        store=str(store),
        shape=pixels.shape,
        chunks=chunks,
        dtype=pixels.dtype,
        compressors=BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"),
        fill_value=0,
    )
    new[:] = pixels


def test_flipped_payload_byte_is_named_by_embed_and_info(tmp_path: Path) -> None:
    ds = write_random_dataset(tmp_path / "ds", n_batches=2, sites=1, size=16)
    arr = zarr.open_array(str(ds / IMAGES_DIR), mode="r")
    assert has_checksums(arr)
    info = cdcl("info", ds)
    assert info.returncode == 0 and "checksums   crc32c per image chunk" in info.stdout
    target = chunk_file(ds / IMAGES_DIR, arr, 3)
    _flip(target, target.stat().st_size // 2)  # inside the compressed pixels

    deep = one_error(cdcl("info", "--deep", ds))
    assert "image 3" in deep and str(target) in deep and "checksum mismatch" in deep
    out = tmp_path / "profiles.parquet"
    embed = one_error(cdcl("embed", "intensity", "--data", ds, "--out", out, "--no-progress"))
    assert "image 3" in embed and str(target) in embed and "checksum mismatch" in embed
    assert not out.exists()


def test_old_store_without_checksums_is_said_and_a_broken_header_is_one_line(
    tmp_path: Path,
) -> None:
    ds = write_random_dataset(tmp_path / "ds", n_batches=2, sites=1, size=16)
    _drop_checksums(ds)
    arr = zarr.open_array(str(ds / IMAGES_DIR), mode="r")
    assert not has_checksums(arr)
    info = cdcl("info", ds)
    assert info.returncode == 0 and "checksums   none" in info.stdout
    target = chunk_file(ds / IMAGES_DIR, arr, 2)
    for offset in range(4):  # the Blosc header: version, flags, type size
        _flip(target, offset)
    out = tmp_path / "profiles.parquet"
    # In a loader worker process: torch re-raises there with the worker's traceback attached.
    embed = one_error(
        cdcl("embed", "intensity", "--data", ds, "--out", out, "--no-progress", "--workers", 1)
    )
    assert "image 2" in embed and str(target) in embed
    assert not out.exists()
    deep = one_error(cdcl("info", "--deep", ds))
    assert "image 2" in deep and str(target) in deep


def _profile_table(n_per: int = 3, seed: int = 0) -> pd.DataFrame:
    """3 batches x (2 controls + 4 treatments x n_per replicates) with a planted signal."""
    rng = np.random.default_rng(seed)
    rows = []
    for b in range(3):
        for t in ["DMSO", "DMSO", "a", "b", "c", "d"]:
            for r in range(n_per if t != "DMSO" else 1):
                rows.append((f"b{b}", f"p{b}", f"{t}{r}", t))
    meta = pd.DataFrame(rows, columns=["Metadata_batch", "Metadata_plate", "well", "treat"])
    meta["Metadata_well"] = [f"W{i:03d}" for i in range(len(meta))]
    meta["Metadata_treatment"] = meta.pop("treat")
    meta = meta.drop(columns="well")
    centre = {t: rng.normal(size=8) * 2 for t in ["DMSO", "a", "b", "c", "d"]}
    x = np.stack([centre[t] + rng.normal(size=8) for t in meta["Metadata_treatment"]])
    feats = pd.DataFrame(x, columns=[f"f{i}" for i in range(8)])
    return pd.concat([meta, feats], axis=1)


def _evaluate(table: Path, out: Path) -> subprocess.CompletedProcess:
    """`cdcl evaluate --features` through the command line's own entry point, in this process."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(
            ["evaluate", "--features", str(table), "--out", str(out), "--no-umap",
             "--null-size", "50", "--control-query", "Metadata_treatment == 'DMSO'"]
        )  # fmt: skip
    return subprocess.CompletedProcess([], rc, "", err.getvalue())


def _earlier_results(out: Path) -> dict[str, bytes]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text('{"earlier": true}\n')
    (out / "report.html").write_text("<html>earlier</html>\n")
    return _files(out)


def _files(out: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}


def test_refused_tables_leave_earlier_results_untouched(tmp_path: Path) -> None:
    out = tmp_path / "out"
    before = _earlier_results(out)
    good = _profile_table()
    one_row = tmp_path / "one_row.csv"
    good.iloc[:1].to_csv(one_row, index=False)
    constant = tmp_path / "constant.csv"
    good.assign(**{f"f{i}": 1.0 for i in range(8)}).to_csv(constant, index=False)
    # Two profiles of different treatments in one batch: rows, variance, but nothing to score.
    unscorable = tmp_path / "unscorable.csv"
    good[good["Metadata_treatment"].isin(["a", "b"])].groupby("Metadata_treatment").head(1).iloc[
        :2
    ].to_csv(unscorable, index=False)
    for table, needle in [
        (one_row, "1 profile(s)"),
        (constant, "every one of the 8 feature columns is constant"),
        (unscorable, "nothing was written"),
    ]:
        line = one_error(_evaluate(table, out))
        assert needle in line, line
        assert _files(out) == before


@pytest.mark.slow
def test_duplicated_rows_are_reported_and_dropped(tmp_path: Path) -> None:
    good = _profile_table()
    dup = pd.concat([good, good.iloc[[4, 9, 4]]], ignore_index=True)
    table = tmp_path / "dup.csv"
    dup.to_csv(table, index=False)
    proc = _evaluate(table, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    notes = [ln for ln in proc.stderr.splitlines() if "duplicated rows" in ln]
    assert len(notes) == 1 and "3 duplicated rows" in notes[0], proc.stderr
    assert f"row {len(good)} " in notes[0] and "a copy of row 4" in notes[0]
    assert f"Metadata_well={good.iloc[4]['Metadata_well']}" in notes[0]
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["source"]["n_profiles"] == len(good)
    assert res["source"]["notes"] == [notes[0].split(": note: ", 1)[1]]
    # Dropping duplicates gives exactly the scores of the table without them.
    clean = tmp_path / "clean.csv"
    good.to_csv(clean, index=False)
    assert _evaluate(clean, tmp_path / "clean").returncode == 0
    ref = json.loads((tmp_path / "clean" / "results.json").read_text())
    assert res["feature_sets"] == ref["feature_sets"]


@pytest.fixture(scope="module")
def run3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run trained (1 tiny epoch) on a 3-channel dataset."""
    root = tmp_path_factory.mktemp("run3")
    data = write_random_dataset(root / "ds3", channels=("DNA", "ER", "RNA"), size=16)
    run = root / "run"
    proc = cdcl("train", "--preset", "synthetic-cdcl", "--data", data, "--out", run, *TINY_TRAIN)
    assert proc.returncode == 0, proc.stderr
    return run


def test_embed_with_a_checkpoint_of_another_channel_count_is_one_line(
    run3: Path, tmp_path: Path
) -> None:
    ds5 = write_random_dataset(tmp_path / "ds5", n_batches=2, sites=1, size=16)
    out = tmp_path / "p.parquet"
    line = one_error(cdcl("embed", run3, "--data", ds5, "--out", out, "--no-progress"))
    assert "trained on 3 channels (DNA, ER, RNA)" in line and "has 5" in line and str(ds5) in line
    assert not out.exists()


def test_evaluate_with_another_runs_checkpoint_is_refused(run3: Path, tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    shutil.copytree(run3, mine)
    before = _earlier_results(mine)
    other = run3 / "checkpoints" / "last.pt"
    line = one_error(cdcl("evaluate", mine, "--checkpoint", other, "--no-umap"))
    assert f"--checkpoint {other} is not a checkpoint of {mine}" in line and "--out" in line
    assert _files(mine) == before
