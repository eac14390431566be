"""Embeddings of centre views, well profiles and their Parquet / AnnData export."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from cli_process import cdcl as _cdcl
from cli_process import cdcl_argv
from conftest import write_random_dataset

from cdcl.embed.baselines import IntensityFeatures, random_backbone_like, random_timm_backbone
from cdcl.embed.inference import embed_images, make_view_fn
from cdcl.profiles.table import (
    OBSM_KEY,
    image_meta,
    read_profile_table,
    split_table,
    to_anndata,
    to_parquet,
    well_profiles,
)


@pytest.fixture(scope="module")
def ds32(tmp_path_factory: pytest.TempPathFactory):
    """3 batches x 1 plate x 5 wells x 2 sites of random 5-channel 32-px images."""
    from cdcl.data.dataset_dir import open_dataset

    path = write_random_dataset(tmp_path_factory.mktemp("embed") / "ds", size=32)
    return open_dataset(path)


@pytest.fixture(scope="module")
def resnet():
    """A randomly initialised ResNet-18 for 5 channels."""
    torch.set_num_threads(1)
    return random_timm_backbone("resnet18", in_chans=5, seed=0)


def test_embed_shapes_and_batch_independence(ds32, resnet) -> None:
    n = len(ds32)
    view = make_view_fn(size=24)
    a = embed_images(resnet, ds32, None, view, batch_size=7, progress=False)
    assert a.shape == (n, 512) and a.dtype == np.float32 and np.isfinite(a).all()
    # Batching must not change features (eval mode: BatchNorm uses running stats).
    idx = np.array([5, 0, 17, 3])
    b = embed_images(resnet, ds32, idx, view, batch_size=3, progress=False)
    np.testing.assert_allclose(b, a[idx], rtol=1e-4, atol=1e-5)
    # Different images give different embeddings.
    assert not np.allclose(a[0], a[1])


def test_view_fn_crops_centre() -> None:
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    out = make_view_fn(size=4)(x)
    assert out.shape == (2, 3, 4, 4)
    assert torch.equal(out, x[..., 2:6, 2:6])
    assert make_view_fn(size=None)(x) is x


def test_view_fn_uses_trainer_center_view() -> None:
    views = pytest.importorskip("cdcl.data.views")
    cfg = views.ViewsConfig(global_size=6)
    x = torch.randn(3, 5, 10, 10)
    out = make_view_fn(cfg)(x)
    assert out.shape == (3, 5, 6, 6)
    assert torch.equal(out, x[..., 2:8, 2:8])


def test_well_profiles_are_site_means(ds32, resnet) -> None:
    feats = embed_images(resnet, ds32, None, make_view_fn(size=24), progress=False)
    meta = image_meta(ds32.samples)
    prof, wmeta = well_profiles(feats, meta)
    assert len(prof) == ds32.samples.groupby(["plate", "well"]).ngroups == len(wmeta)
    expected = pd.DataFrame(feats).groupby([meta["plate"], meta["well"]]).mean()
    for i, row in wmeta.iterrows():
        np.testing.assert_allclose(prof[i], expected.loc[(row["plate"], row["well"])], rtol=1e-5)
    assert (wmeta["n_sites"] == 2).all()
    assert {"batch", "treatment", "moa", "is_control", "compound"} <= set(wmeta.columns)
    assert "site" not in wmeta.columns


def test_parquet_export_is_pycytominer_and_copairs_ready(ds32, resnet, tmp_path: Path) -> None:
    feats = embed_images(resnet, ds32, None, make_view_fn(size=24), progress=False)
    prof, wmeta = well_profiles(feats, image_meta(ds32.samples))
    path = to_parquet(prof, wmeta, tmp_path / "wells.parquet")
    df = pd.read_parquet(path)
    meta_cols = [c for c in df.columns if c.startswith("Metadata_")]
    feat_cols = [c for c in df.columns if not c.startswith("Metadata_")]
    assert {"Metadata_Plate", "Metadata_Well", "Metadata_Batch", "Metadata_Treatment"} <= set(
        meta_cols
    )
    assert {"Metadata_MoA", "Metadata_Compound", "Metadata_Is_Control"} <= set(meta_cols)
    assert feat_cols == [f"Cells_Embedding_{i:04d}" for i in range(prof.shape[1])]
    np.testing.assert_array_equal(df[feat_cols].to_numpy(), prof)
    assert not list(tmp_path.glob(".*tmp*"))  # the atomic write left no temporary file
    # copairs reads it directly: replicate retrieval of treatments against the rest.
    from copairs.map import average_precision

    ap = average_precision(
        df[meta_cols],
        df[feat_cols].to_numpy(),
        pos_sameby=["Metadata_Treatment"],
        pos_diffby=[],
        neg_sameby=[],
        neg_diffby=["Metadata_Treatment"],
        progress_bar=False,
    )
    assert len(ap) == len(df) and ap["average_precision"].between(0, 1).all()
    # Our reader splits it back.
    x, m, names = split_table(read_profile_table(path))
    np.testing.assert_array_equal(x, prof)
    assert list(m.columns) == meta_cols and len(names) == prof.shape[1]


def test_anndata_export(ds32, resnet, tmp_path: Path) -> None:
    import anndata as ad

    feats = embed_images(resnet, ds32, None, make_view_fn(size=24), progress=False)
    meta = image_meta(ds32.samples)
    path = to_anndata(feats, meta, tmp_path / "images.h5ad")
    a = ad.read_h5ad(path)
    assert a.obsm[OBSM_KEY].shape == feats.shape
    np.testing.assert_array_equal(a.obsm[OBSM_KEY], feats)
    assert list(a.obs["Metadata_Batch"]) == list(meta["batch"])
    assert a.obs["Metadata_Is_Control"].dtype == bool
    # Readable row names (plate_well_site) and feature names in var.
    assert a.obs_names[0] == "_".join(str(meta.loc[0, c]) for c in ("plate", "well", "site"))
    assert a.obs_names.is_unique and list(a.var_names[:2]) == [
        "Cells_Embedding_0000",
        "Cells_Embedding_0001",
    ]
    x, m, _ = split_table(read_profile_table(path))
    np.testing.assert_array_equal(x, feats)
    assert "Metadata_Treatment" in m.columns


def test_intensity_features_match_numpy(ds32) -> None:
    imgs = torch.from_numpy(ds32.standardized([0, 1, 2]))
    f = IntensityFeatures()(imgs).numpy()
    assert f.shape == (3, 5 * 10)
    x = imgs.numpy().reshape(3, 5, -1)
    np.testing.assert_allclose(f[:, 0::10], x.mean(-1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(f[:, 5::10], np.median(x, -1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(f[:, 9::10], (x > 2).mean(-1), atol=1e-6)


def test_random_backbone_like_reinitialises(resnet) -> None:
    other = random_backbone_like(resnet, seed=1)
    same = random_backbone_like(resnet, seed=1)
    w0 = resnet.conv1.weight
    assert not torch.equal(other.conv1.weight, w0)
    assert torch.equal(other.conv1.weight, same.conv1.weight)  # seeded


@pytest.mark.slow
def test_cli_embed_well_and_image(tmp_path: Path) -> None:
    ds = write_random_dataset(tmp_path / "ds", size=32)
    out = tmp_path / "wells.parquet"
    r = _cdcl("embed", "random:resnet18", "--data", str(ds), "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    df = pd.read_parquet(out)
    assert len(df) == 15 and "Metadata_Batch" in df and "Cells_Embedding_0511" in df
    r = _cdcl(
        "embed",
        "intensity",
        "--data",
        str(ds),
        "--out",
        str(tmp_path / "img"),
        "--level",
        "image",
        "--format",
        "h5ad",
        "--split",
        "test",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    import anndata as ad

    a = ad.read_h5ad(tmp_path / "img.h5ad")
    assert a.obsm[OBSM_KEY].shape == (10, 50)  # one held-out batch of 10 images
    assert a.obs["Metadata_Batch"].nunique() == 1


def test_cli_embed_bad_inputs(tmp_path: Path) -> None:
    r = _cdcl("embed", str(tmp_path / "nope"), "--out", str(tmp_path / "x.parquet"))
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "nope" in r.stderr
    ds = write_random_dataset(tmp_path / "ds", size=16)
    r = _cdcl("embed", "random:not_a_model", "--data", str(ds), "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- screen scale: parts, resume, torchrun


def test_job_parts_resume_and_streaming_writers_match_in_memory(
    ds32, resnet, tmp_path: Path
) -> None:
    from cdcl.embed.job import (
        EmbedJob,
        remove_stale_work_dirs,
        write_image_profiles,
        write_well_profiles,
    )
    from cdcl.profiles.table import export_name, to_csv

    idx = np.arange(len(ds32))[::-1].copy()  # any order: rows follow it
    view = make_view_fn(size=24)
    ref = embed_images(resnet, ds32, idx, view, batch_size=5, progress=False)
    meta = image_meta(ds32.samples, idx)
    job = EmbedJob(tmp_path / ".out.parquet.embed-abc", len(idx), chunk_size=7)
    job.prepare({"test": 1})
    assert job.n_chunks == 5 and job.pending() == [0, 1, 2, 3, 4]
    # Two "ranks" take contiguous, disjoint shards; rank 1 runs first, rank 0 is "killed".
    shards = [job.shard(job.pending(), r, 2) for r in range(2)]
    assert shards == [[0, 1], [2, 3, 4]]
    job.run(shards[1], resnet, ds32, idx, view, batch_size=3, rank=1, progress=False)
    assert job.pending() == [0, 1]
    job.run(job.pending(), resnet, ds32, idx, view, batch_size=4, workers=1, progress=False)
    assert job.pending() == []
    np.testing.assert_allclose(job.gather(), ref, rtol=1e-4, atol=1e-5)
    # Streamed Parquet (appended part by part) reads back as the in-memory writer's table.
    path, rows, dim = write_image_profiles(job, meta, tmp_path / "img.parquet")
    assert (rows, dim) == (len(idx), 512)
    got = pd.read_parquet(path)
    want = pd.read_parquet(to_parquet(job.gather(), meta, tmp_path / "want.parquet"))
    pd.testing.assert_frame_equal(got, want)
    assert pq_meta_rows(path) == [7, 7, 7, 7, 2]  # one row group per part: never all in memory
    # CSV (gzip) written block by block equals the one-shot CSV.
    path, _, _ = write_image_profiles(job, meta, tmp_path / "img.csv.gz")
    want_csv = to_csv(job.gather(), meta, tmp_path / "want.csv.gz")
    pd.testing.assert_frame_equal(pd.read_csv(path), pd.read_csv(want_csv))
    # Well means from group sums streamed over the parts = well_profiles on the whole table.
    path, n_wells, _ = write_well_profiles(job, meta, tmp_path / "wells.parquet")
    prof, wmeta = well_profiles(ref, meta)
    got = pd.read_parquet(path)
    assert n_wells == len(prof) and list(got.columns[: wmeta.shape[1]]) == [
        export_name(c) for c in wmeta.columns
    ]
    np.testing.assert_allclose(got.filter(regex=r"^Cells_").to_numpy(), prof, rtol=1e-5, atol=1e-6)
    # A different command for the same output drops the old work directory.
    other = tmp_path / ".out.parquet.embed-def"
    assert remove_stale_work_dirs(tmp_path / "out.parquet", keep=other) == [job.work_dir]
    assert not job.work_dir.exists()


def pq_meta_rows(path: Path) -> list[int]:
    """Rows of each Parquet row group."""
    import pyarrow.parquet as pq

    md = pq.read_metadata(path)
    return [md.row_group(i).num_rows for i in range(md.num_row_groups)]


ENV = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _embed_cmd(ds: Path, out: Path, *extra: str, nproc: int = 1) -> list[str]:
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        if nproc > 1
        else [sys.executable]
    )
    return [
        *launcher,
        "-m",
        "cdcl",
        "embed",
        "random:resnet18",
        "--data",
        str(ds),
        "--out",
        str(out),
        "--no-progress",
        "--device",
        "cpu",
        *extra,
    ]


@pytest.fixture(scope="module")
def ds64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """240 random 5-channel 64-px images (3 batches x 5 treatments x 4 wells x 4 sites)."""
    return write_random_dataset(
        tmp_path_factory.mktemp("embed64") / "ds", wells_per_treatment=4, sites=4, size=64
    )


@pytest.mark.slow
def test_killed_embed_resumes_with_same_profiles(ds64: Path, tmp_path: Path) -> None:
    import signal
    import time

    opts = ("--level", "image", "--chunk-size", "8", "--batch-size", "4", "--workers", "1")
    out = tmp_path / "killed.parquet"
    proc = subprocess.Popen(
        _embed_cmd(ds64, out, *opts),
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # so the kill reaches the loader worker too
    )
    deadline = time.monotonic() + 240
    while not list(tmp_path.glob(".killed.parquet.embed-*/part-*.parquet")):
        assert proc.poll() is None, proc.communicate()[1].decode()
        assert time.monotonic() < deadline, "no part written in time"
        time.sleep(0.01)
    __import__("os").killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    parts = list(tmp_path.glob(".killed.parquet.embed-*/part-*.parquet"))
    assert 1 <= len(parts) < 30 and not out.exists()
    # Same command again: finishes from the parts it finds, then tidies up.
    r = subprocess.run(_embed_cmd(ds64, out, *opts), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    done = int(r.stdout.split("resuming: ")[1].split(" of ")[0])
    assert done >= len(parts) and " of 30 parts" in r.stdout
    assert not list(tmp_path.glob(".killed.parquet.embed-*")) and not list(tmp_path.glob(".*tmp*"))
    ref = tmp_path / "ref.parquet"
    r = subprocess.run(_embed_cmd(ds64, ref, *opts), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0 and "resuming" not in r.stdout, r.stderr
    pd.testing.assert_frame_equal(pd.read_parquet(out), pd.read_parquet(ref), rtol=1e-5)


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(ds64: Path, tmp_path: Path) -> None:
    from cdcl.embed.job import read_provenance

    for level in ("image", "well"):
        opts = ("--level", level, "--chunk-size", "16", "--workers", "1")
        one, two = tmp_path / f"one_{level}.parquet", tmp_path / f"two_{level}.parquet"
        r1 = subprocess.run(_embed_cmd(ds64, one, *opts), env=ENV, capture_output=True, text=True)
        assert r1.returncode == 0, r1.stderr
        r2 = subprocess.run(
            _embed_cmd(ds64, two, *opts, nproc=2), env=ENV, capture_output=True, text=True
        )
        assert r2.returncode == 0, r2.stderr
        # Rank 0 alone merged and wrote; both ranks embedded a shard.
        assert r2.stdout.count("profiles x 512 features ->") == 1
        prov = read_provenance(two)
        assert prov["world_size"] == 2 and prov["part_ranks"] == [0, 1]
        assert prov["merged_by_rank"] == 0
        a, b = pd.read_parquet(one), pd.read_parquet(two)
        assert len(a) == (240 if level == "image" else 60)
        pd.testing.assert_frame_equal(a, b, rtol=1e-5, atol=1e-6)  # same rows, same order
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{n}_{lv}.parquet" for n in ("one", "two") for lv in ("image", "well")
    )


@pytest.mark.slow
def test_killed_evaluate_resumes_embedding_with_same_results(tmp_path: Path) -> None:
    import json
    import os
    import signal
    import time

    ds = write_random_dataset(tmp_path / "ds", size=32)
    run = tmp_path / "run"
    r = _cdcl(
        "train",
        "--preset",
        "synthetic-dino",
        "--data",
        str(ds),
        "--out",
        str(run),
        "train.max_steps=2",
        "train.batch_size=8",
        "model.depth=1",
        "model.embed_dim=32",
        "model.num_heads=2",
    )
    assert r.returncode == 0, r.stderr

    def evaluate(out: Path) -> list[str]:
        return cdcl_argv(
            "evaluate", run, "--checkpoint", "last", "--no-umap", "--null-size", "100", "--out", out
        )

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        evaluate(killed), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 240
    while not list(killed.glob(".embed-dino-*/part-*.parquet")):  # the run's set is done
        assert proc.poll() is None, proc.communicate()[1].decode()
        assert time.monotonic() < deadline, "no part written in time"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "results.json").exists()
    r = subprocess.run(evaluate(killed), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "dino: resuming, 1 of 1 parts already embedded" in r.stderr
    assert not list(killed.glob(".embed-*"))  # parts removed once scored
    ref = tmp_path / "ref"
    r = subprocess.run(evaluate(ref), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0 and "resuming" not in r.stderr, r.stderr
    a = json.loads((killed / "results.json").read_text())["feature_sets"]
    b = json.loads((ref / "results.json").read_text())["feature_sets"]
    assert set(a) == {"dino", "dino+tvn", "intensity", "random"}
    assert a == b
