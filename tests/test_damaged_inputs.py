"""Nothing silently wrong from a damaged or crafted file: each is refused in one line.

Real files throughout: a dataset whose chunk file was deleted, checkpoints edited with
torch.save, dataset.json rewritten, a TIFF with five planes, writes that really fail (/dev/full,
a directory in the way), and the real command line in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
import zarr
from cli_process import cdcl
from conftest import write_random_dataset

from cdcl.atomic import DiskFullError, WriteError, atomic_write_text, temp_sibling
from cdcl.data.dataset_dir import (
    IMAGES_DIR,
    DatasetInfo,
    DatasetWriter,
    chunk_file,
    open_dataset,
    validate,
)
from cdcl.data.query import MAX_DEPTH, QueryError, query_mask
from cdcl.errors import CdclError, DatasetError
from cdcl.schema import SchemaError
from cdcl.train.checkpoint import load_checkpoint, load_for_eval
from cdcl.train.metrics_log import MetricsLog

TINY_TRAIN = [
    "model.embed_dim=32",
    "model.depth=1",
    "model.num_heads=2",
    "method.out_dim=32",
    "method.hidden_dim=32",
    "method.bottleneck_dim=16",
    "train.batch_size=8",
    "train.max_steps=1",
]


def one_error(proc: subprocess.CompletedProcess) -> str:
    """The one error line of a refused command: exit 2, no traceback, nothing else but warnings."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [
        ln
        for ln in proc.stderr.splitlines()
        if ln.strip() and "warning:" not in ln and "note: " not in ln
    ]
    assert len(lines) == 1 and ": error: " in lines[0], proc.stderr
    return lines[0]


# ----------------------------------------------------------------- a missing chunk file


@pytest.fixture(scope="module")
def screen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small committed dataset (3 batches, 16 x 16 pixels, 5 channels)."""
    return write_random_dataset(tmp_path_factory.mktemp("screen") / "ds", size=16)


@pytest.fixture(scope="module")
def run(screen: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run trained for one step on ``screen``."""
    out = tmp_path_factory.mktemp("run") / "run"
    proc = cdcl("train", "--preset", "synthetic-cdcl", "--data", screen, "--out", out, *TINY_TRAIN)
    assert proc.returncode == 0, proc.stderr
    return out


def test_missing_chunk_is_refused_by_info_train_and_embed(screen: Path, tmp_path: Path) -> None:
    damaged = tmp_path / "damaged"
    import shutil

    shutil.copytree(screen, damaged)
    arr = zarr.open_array(str(damaged / IMAGES_DIR), mode="r")
    gone = chunk_file(damaged / IMAGES_DIR, arr, 7)
    gone.unlink()  # an interrupted copy: zarr would read image 7 as all zeros
    for proc in (
        cdcl("info", damaged),
        cdcl("train", "--preset", "synthetic-cdcl", "--data", damaged, "--out", tmp_path / "r"),
        cdcl("embed", "intensity", "--data", damaged, "--out", tmp_path / "p.parquet"),
    ):
        line = one_error(proc)
        assert "image 7 has no chunk file" in line and str(gone) in line, line
    assert not (tmp_path / "p.parquet").exists() and not (tmp_path / "r").exists()


def test_an_all_zero_image_keeps_its_chunk_file(tmp_path: Path) -> None:
    """zarr skips chunks equal to the fill value by default; the writer stores them all."""
    info = DatasetInfo("zeros", "test", ["DNA"], "uint8", [4, 4], n_images=2)
    w = DatasetWriter(tmp_path / "ds", info)
    w.write([0, 1], np.stack([np.zeros((1, 4, 4)), np.ones((1, 4, 4))]).astype(np.uint8))
    samples = pd.DataFrame(
        {
            "image": [0, 1],
            "batch": ["b"] * 2,
            "plate": ["p"] * 2,
            "well": ["A01", "A02"],
            "site": [0, 0],
            "treatment": ["DMSO", "x"],
            "is_control": [True, False],
        }
    )
    ds = w.commit(samples)
    arr = zarr.open_array(str(ds / IMAGES_DIR), mode="r")
    assert chunk_file(ds / IMAGES_DIR, arr, 0).is_file()
    assert open_dataset(ds).read(0).sum() == 0


# ----------------------------------------------------------------- dataset.json


def _rewrite_info(ds: Path, **changes: object) -> Path:
    f = ds / "dataset.json"
    d = json.loads(f.read_text())
    for key, value in changes.items():
        target, *path = key.split("__")
        holder = d
        for p in [target, *path][:-1]:
            holder = holder[p]
        holder[[target, *path][-1]] = value
    f.write_text(json.dumps(d))
    return f


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"format_version": 99}, "`format_version` is 99, newer than this cdcl reads"),
        (
            {"channels": ["DNA", "ER", "DNA", "AGP", "Mito"]},
            '`channels` has "DNA" (a string) twice',
        ),
        ({"n_images": "many"}, '`n_images` is "many" (a string); expected an integer >= 1'),
        ({"image_size": [16, 0]}, "`image_size[1]` is 0 (an integer); expected an integer >= 1"),
        (
            {"dtype": "float64"},
            '`dtype` is "float64" (a string); expected one of "uint8", "uint16"',
        ),
        (
            {"build": {"args": {"control_query": 'treatment == "\\N{NOPE}"'}}},
            "unknown Unicode character name",
        ),
    ],
)
def test_crafted_dataset_json_is_one_line(random_dataset: Path, changes: dict, needle: str) -> None:
    f = _rewrite_info(random_dataset, **changes)
    with pytest.raises(DatasetError) as e:
        validate(random_dataset)
    text = str(e.value)
    assert text.startswith(f"{f}: ") and needle in text and "\n" not in text, text


def test_future_dataset_format_through_the_cli(random_dataset: Path) -> None:
    f = _rewrite_info(random_dataset, format_version=99)
    line = one_error(cdcl("info", random_dataset))
    assert str(f) in line and "format_version" in line and "upgrade cdcl" in line


# ----------------------------------------------------------------- checkpoints


def _craft(run: Path, tmp_path: Path, edit) -> Path:
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    edit(ckpt)
    path = tmp_path / "crafted.pt"
    torch.save(ckpt, path)
    return path


def _set(dotted: str, value: object):
    """An edit setting the field at ``dotted`` (e.g. ``build.img_size``) to ``value``."""
    keys = dotted.split(".")

    def edit(ckpt: dict) -> None:
        holder = ckpt
        for k in keys[:-1]:
            holder = holder[k]
        holder[keys[-1]] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (_set("version", "1"), '`version` is "1" (a string); expected an integer version 1'),
        (_set("version", 7), "`version` is 7, newer than this cdcl reads (version 1)"),
        (_set("dataset.image_size", "16"), '`dataset.image_size` is "16" (a string)'),
        (_set("label_of", ["DMSO"]), "`label_of` is a list of 1 item; expected an object"),
        (_set("step", "3"), '`step` is "3" (a string); expected an integer >= 0'),
        (_set("build", [1, 2]), "`build` is a list of 2 items; expected an object"),
        (
            _set("build.img_size", -5),
            "`build.img_size` is -5 (an integer); expected an integer >= 1",
        ),
        (lambda c: c["build"].pop("n_classes"), "`build.n_classes` is missing"),
    ],
)
def test_crafted_checkpoint_metadata_is_one_line(
    run: Path, tmp_path: Path, edit, needle: str
) -> None:
    path = _craft(run, tmp_path, edit)
    with pytest.raises(SchemaError) as e:
        load_for_eval(path)
    text = str(e.value)
    assert text.startswith(f"{path}: ") and needle in text and "\n" not in text, text


def test_real_checkpoint_fits_its_schema(run: Path) -> None:
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    em = load_for_eval(run, "last")
    assert em.step == ckpt["step"] == 1 and em.dataset["image_size"] == [16, 16]


def test_nan_weights_are_refused_naming_the_checkpoint(
    run: Path, screen: Path, tmp_path: Path
) -> None:
    def poison(ckpt: dict) -> None:
        name = next(k for k, t in ckpt["method"].items() if torch.is_floating_point(t))
        ckpt["method"][name].view(-1)[0] = float("nan")

    path = _craft(run, tmp_path, poison)
    with pytest.raises(CdclError, match=rf"^{path}: weight `\S+` holds 1 NaN or infinite"):
        load_for_eval(path)
    out = tmp_path / "profiles.parquet"
    line = one_error(cdcl("embed", path, "--data", screen, "--out", out, "--no-progress"))
    assert str(path) in line and "NaN" in line
    assert not out.exists()  # never an all-NaN export


# ----------------------------------------------------------------- the query parser


QUERY_FRAME = pd.DataFrame(
    {
        "treatment": ["DMSO", "a", "b"],
        "dose": [0.0, 1.0, 2.0],
        "n": [1, 2, 3],
        "flag": pd.array([True, pd.NA, False], dtype="boolean"),
    }
)


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        ('treatment == "\\N{NOPE}"', "unknown Unicode character name"),
        ('treatment == "\\x4"', "truncated \\xXX escape"),
        ('treatment == "a\x00b"', "a NUL byte (at character 16)"),
        ("(" * 330 + "flag" + ")" * 330, f"more than {MAX_DEPTH} levels deep"),
        ("~" * 1000 + "flag", f"more than {MAX_DEPTH} levels deep"),
        ("not " * 100 + "flag", f"more than {MAX_DEPTH} levels deep"),
        ("n == " + "9" * 4301, "a number with 4301 digits"),
        ("dose == " + "9" * 400, "cannot be compared with a 400-digit number"),
        ('treatment == "\udcff"', "not valid UTF-8 (at character 15"),
    ],
)
def test_hostile_query_is_one_line(query: str, needle: str) -> None:
    with pytest.raises(QueryError) as e:
        query_mask(QUERY_FRAME, query)
    text = str(e.value)
    assert needle in text and "\n" not in text and len(text) < 1000, text


def test_nesting_up_to_the_cap_still_parses() -> None:
    deep = "(" * (MAX_DEPTH - 1) + 'treatment == "DMSO"' + ")" * (MAX_DEPTH - 1)
    assert query_mask(QUERY_FRAME, deep).tolist() == [True, False, False]


def test_missing_flag_counts_as_false() -> None:
    assert query_mask(QUERY_FRAME, "flag").tolist() == [True, False, False]
    assert query_mask(QUERY_FRAME, "~flag").tolist() == [False, True, True]


def test_hostile_query_through_the_cli_is_one_line(tmp_path: Path) -> None:
    """The same inputs on the command line (`cdcl build table --control-query`)."""
    args = _tiff_table(tmp_path / "screen", tmp_path / "ds")
    for query in ("~" * 1000 + "drug", 'drug == "\\N{NOPE}"', "(" * 400 + "drug"):
        assert "--control-query" in one_error(cdcl(*args, "--control-query", query))
    assert not (tmp_path / "ds").exists()


# ----------------------------------------------------------------- the CLI's last line


def test_deeply_nested_override_is_one_line(screen: Path, tmp_path: Path) -> None:
    override = "views.global_scale=" + "[" * 3000
    line = one_error(
        cdcl(
            "train",
            "--preset",
            "synthetic-cdcl",
            "--data",
            screen,
            "--out",
            tmp_path / "r",
            override,
        )
    )
    assert "nested too deeply" in line


def test_preset_that_is_not_utf8_is_one_line(screen: Path, tmp_path: Path) -> None:
    preset = tmp_path / "bad.yaml"
    preset.write_bytes(b"train:\n  lr: 0.001  # caf\xe9\n")
    line = one_error(cdcl("train", "--preset", preset, "--data", screen, "--out", tmp_path / "r"))
    assert "not valid UTF-8" in line and "e9" in line


# ----------------------------------------------------------------- writes that fail


def test_atomic_write_on_a_full_device_names_the_file(tmp_path: Path) -> None:
    target = tmp_path / "results.json"
    target.write_text("previous")
    # The temporary sibling is a link to /dev/full: the write really fails with ENOSPC.
    temp_sibling(target).symlink_to("/dev/full")
    with pytest.raises(DiskFullError, match=rf"^{target}: write failed, no space left"):
        atomic_write_text(target, "new" * 10_000)
    assert target.read_text() == "previous" and not temp_sibling(target).exists()


def test_atomic_write_onto_a_directory_names_the_file(tmp_path: Path) -> None:
    target = tmp_path / "results.json"
    target.mkdir()
    with pytest.raises(WriteError, match=rf"^{target}: write failed \(Is a directory\)"):
        atomic_write_text(target, "{}")
    assert target.is_dir() and not temp_sibling(target).exists()
    missing = tmp_path / "no" / "such" / "dir" / "a.json"
    with pytest.raises(WriteError, match=rf"^{missing}: write failed \(No such file"):
        atomic_write_text(missing, "{}")


def test_metrics_line_on_a_full_device_names_the_file(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path, enabled=True, tensorboard=False)
    (tmp_path / "metrics.jsonl").symlink_to("/dev/full")
    with pytest.raises(DiskFullError, match=rf"^{tmp_path / 'metrics.jsonl'}: write failed"):
        log.write({"kind": "train", "step": 1, "loss": 1.0})


# ----------------------------------------------------------------- image files


def _tiff_table(root: Path, out: Path, planes_at: tuple | None = None) -> list[object]:
    """A 2-plate screen of one 24 x 24 TIFF per channel; ``cdcl build table`` arguments for it.

    The file at ``planes_at`` = (plate, well, channel) holds 5 planes instead of one.
    """
    root.mkdir(parents=True)
    rows = []
    for p in range(2):
        for w, treat in enumerate(["DMSO", "DMSO", "taxol"]):
            well = f"B{w:02d}"
            for ch in ("DNA", "Actin"):
                shape = (5, 24, 24) if (p, w, ch) == planes_at else (24, 24)
                tifffile.imwrite(root / f"p{p}_{well}_{ch}.tif", np.ones(shape, np.uint16))
            rows.append({"run": f"b{p}", "plate_id": f"p{p}", "well": well, "drug": treat})
    pd.DataFrame(rows).to_csv(root / "samples.csv", index=False)
    return [
        "build", "table", "--samples", root / "samples.csv", "--channels", "DNA,Actin",
        "--path-template", str(root / "{plate_id}_{well}_{channel}.tif"), "--batch-col", "run",
        "--plate-col", "plate_id", "--site-col", "", "--treatment-col", "drug", "--out", out,
    ]  # fmt: skip


def test_channel_first_tiff_is_reported_with_its_shape(tmp_path: Path) -> None:
    args = _tiff_table(tmp_path / "screen", tmp_path / "ds", planes_at=(1, 2, "Actin"))
    proc = cdcl(*args, "--control-query", "drug == 'DMSO'")
    text = proc.stderr
    assert proc.returncode == 2 and "Traceback" not in text, text
    assert "holds 5 channels (shape (5, 24, 24), read as C x H x W)" in text, text
    assert "p1_B02_Actin.tif" in text and "24 channels" not in text


def test_damaged_dataset_store_is_never_read_as_zeros(screen: Path, tmp_path: Path) -> None:
    """Through the library too: open_dataset refuses; nothing reads the fill value."""
    import shutil

    damaged = tmp_path / "d"
    shutil.copytree(screen, damaged)
    arr = zarr.open_array(str(damaged / IMAGES_DIR), mode="r")
    for i in (0, 3):
        chunk_file(damaged / IMAGES_DIR, arr, i).unlink()
    with pytest.raises(DatasetError, match=r"image 0 has no chunk file .* \(2 of 30 images"):
        open_dataset(damaged)
    assert os.path.isdir(damaged / IMAGES_DIR)
