"""Nothing silently wrong from a damaged or crafted file, part 2: documents, tables, full disks.

results.json (compare, the study's resume, the API), a study's design.json and study.json,
profile tables (duplicate columns, semicolons, values beyond float32, a --batch-pattern without
a group), writes that really fail (a link to /dev/full, a directory in the way) and an
interrupt after the new results are written. Each is refused in one line: exit 2 through the
command line (no traceback) or a CdclError through the library.
"""

from __future__ import annotations

import copy
import json
import resource
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_process import cdcl, cdcl_env
from test_evaluate_pipeline import planted_profiles

from cdcl.atomic import DiskFullError, WriteError, temp_sibling
from cdcl.cli import main
from cdcl.errors import CdclError
from cdcl.experiments.study import (
    StudySpec,
    fix_design,
    replicate_key,
    replicates,
    run_replicate,
    study_looks,
)
from cdcl.parquet import write_parquet
from cdcl.profiles.columns import apply_batch_pattern
from cdcl.profiles.table import read_profile_table, split_table, to_csv, to_parquet
from cdcl.report.html import compare
from cdcl.report.results import read_results


def one_error(proc_or_rc: object, stderr: str = "") -> str:
    """The one error line of a refused command: exit 2, no traceback, nothing else but notes."""
    if not isinstance(proc_or_rc, int):
        proc_or_rc, stderr = proc_or_rc.returncode, proc_or_rc.stderr  # type: ignore[attr-defined]
    assert proc_or_rc == 2, stderr
    assert "Traceback" not in stderr, stderr
    lines = [
        ln
        for ln in stderr.splitlines()
        if ln.strip() and "warning:" not in ln and "note: " not in ln
    ]
    assert len(lines) == 1 and ": error: " in lines[0], stderr
    return lines[0]


def run_main(capsys: pytest.CaptureFixture, *args: object) -> str:
    """`cdcl ARGS` in this process (cdcl.cli.main): its one error line."""
    capsys.readouterr()
    rc = main([str(a) for a in args])
    return one_error(rc, capsys.readouterr().err)


# ----------------------------------------------------------------- results.json

GOOD = {
    "results_version": 1,
    "kind": "features",
    "feature_sets": {
        "model": {
            "raw": {"kbet": {"acceptance_rate": 0.5}, "moa_matching": {"nsc": 0.25}},
            "plate_normalized": {"kbet": {"acceptance_rate": 0.75}, "grit": None},
        }
    },
}


def _results_dir(tmp_path: Path, doc: object, name: str = "run", text: str | None = None) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "results.json").write_text(json.dumps(doc) if text is None else text)
    return d


def _edit(path: str, value: object) -> dict:
    doc = copy.deepcopy(GOOD)
    *keys, last = path.split(".")
    holder = doc
    for k in keys:
        holder = holder[k]
    holder[last] = value
    return doc


CRAFTED_RESULTS = [
    (_edit("feature_sets", {}), "`feature_sets` is an object with 0 fields"),
    (_edit("feature_sets", None), "`feature_sets` is null"),
    (_edit("feature_sets", [1, 2]), "`feature_sets` is a list of 2 items"),
    ({"results_version": 1}, "`feature_sets` is missing"),
    (
        _edit("feature_sets.model.raw.kbet.acceptance_rate", "high"),
        '`feature_sets.model.raw.kbet.acceptance_rate` is "high" (a string); expected null or '
        "a finite number",
    ),
    (_edit("results_version", 999), "`results_version` is 999, newer than this cdcl reads"),
    (_edit("feature_sets.model", {"n": {"profiles": 3}}), "`feature_sets.model` holds no results"),
    ([1, 2], "the document is a list of 2 items; expected an object"),
    (None, "the document is null; expected an object"),
    ("results", 'the document is "results" (a string); expected an object'),
]


def test_a_real_looking_results_json_is_read(tmp_path: Path) -> None:
    d = _results_dir(tmp_path, GOOD)
    assert read_results(d) == GOOD
    out = compare([d], tmp_path / "cmp")
    assert out.is_file()


@pytest.mark.parametrize(("doc", "needle"), CRAFTED_RESULTS)
def test_crafted_results_are_refused_by_compare(
    tmp_path: Path, capsys: pytest.CaptureFixture, doc: object, needle: str
) -> None:
    good = _results_dir(tmp_path, GOOD, "good")
    bad = _results_dir(tmp_path, doc, "bad")
    line = run_main(capsys, "compare", good, bad, "--out", tmp_path / "cmp")
    assert f"{bad / 'results.json'}: " in line and needle in line, line
    assert not (tmp_path / "cmp" / "compare.html").exists()


def test_deeply_nested_results_through_the_cli(tmp_path: Path) -> None:
    bad = _results_dir(tmp_path, None, "deep", text="[" * 100_000 + "]" * 100_000)
    line = one_error(cdcl("compare", bad, "--out", tmp_path / "cmp"))
    assert str(bad / "results.json") in line and "nested too deeply" in line, line


def test_results_without_results_through_the_cli(tmp_path: Path) -> None:
    """The AttributeError of old: a results.json whose feature_sets is a list."""
    bad = _results_dir(tmp_path, _edit("feature_sets", ["model"]))
    line = one_error(cdcl("compare", bad, "--out", tmp_path / "cmp"))
    assert "`feature_sets` is a list of 1 item" in line, line


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('{"results_version": 1, "feature_sets": NaN}', "holds NaN, which is not a JSON number"),
        ('{"feature_sets": {"m": {"raw": {"kbet": {"acceptance_rate": 1', "not valid JSON"),
        ('{"results_version": ' + "9" * 5000 + "}", "an integer too long to read"),
    ],
)
def test_results_that_are_not_json(tmp_path: Path, text: str, needle: str) -> None:
    d = _results_dir(tmp_path, None, text=text)
    with pytest.raises(CdclError) as e:
        read_results(d)
    assert str(e.value).startswith(f"{d / 'results.json'}: ") and needle in str(e.value)
    assert "\n" not in str(e.value)


def test_demo_table_row_with_a_string_metric(tmp_path: Path) -> None:
    doc = {**GOOD, "kind": "demo", "tables": {"raw": [{"features": "CDCL", "NSC": "high"}]}}
    with pytest.raises(CdclError, match=r'`tables.raw\[0\].NSC` is "high"'):
        read_results(_results_dir(tmp_path, doc))


def test_outcome_lists_of_different_lengths(tmp_path: Path) -> None:
    queries = {"nsc": {"compound": ["a", "b"], "hit": [True]}}
    doc = _edit("feature_sets.model.raw.moa_matching", {"nsc": 0.5, "queries": queries})
    with pytest.raises(CdclError, match="has lists of different lengths"):
        read_results(_results_dir(tmp_path, doc))


# ----------------------------------------------------------------- a study's documents


def _study_dir(tmp_path: Path, name: str, text: str) -> Path:
    out = tmp_path / "study"
    out.mkdir(exist_ok=True)
    (out / name).write_text(text)
    return out


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('{"replicates": 5, "n": "x"}', "`replicates` is 5 (an integer)"),
        ("[1, 2]", "the document is a list of 2 items"),
        ('{"replicates": ["../../../etc"], "n": 1}', '`replicates[0]` is "../../../etc"'),
        ('{"replicates": ["seed0", "seed0"], "n": 2}', '`replicates` has "seed0"'),
        ('{"replicates": ["seed0", "seed1"], "n": 3}', "`n` is 3 for 2 replicates"),
        ('{"replicates": ["seed0"], "n": 1, "format_version": 3}', "newer than this cdcl"),
        ("{", "not valid JSON"),
    ],
)
def test_crafted_design_json_is_refused(tmp_path: Path, text: str, needle: str) -> None:
    out = _study_dir(tmp_path, "design.json", text)
    with pytest.raises(CdclError) as e:
        fix_design(out, ["seed0"])
    msg = str(e.value)
    assert msg.startswith(f"{out / 'design.json'}: ") and needle in msg and "\n" not in msg, msg


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('{"replicates": [{"name": "../../../etc"}]}', '`replicates[0].name` is "../../../etc"'),
        ('{"replicates": 5, "n": "x"}', "`replicates` is 5 (an integer)"),
        ("[1, 2]", "the document is a list of 2 items"),
        (
            '{"replicates": [{"name": "seed0"}], "design": {"replicates": ["seed0"], "n": 2}}',
            "`design.n` is 2 for 1 replicates",
        ),
        (
            '{"replicates": [{"name": "s"}], "looks": [{"look": 0, "replicates": ["s"], '
            '"overall": {}}]}',
            "`looks[0].look` is 0",
        ),
        ('{"replicates": [{"name": "s"}], "headline": [{"reference": 1}]}', "headline[0]"),
    ],
)
def test_crafted_study_json_is_refused(tmp_path: Path, text: str, needle: str) -> None:
    out = _study_dir(tmp_path, "study.json", text)
    for call in (lambda: fix_design(out, ["seed0"]), lambda: study_looks(out, ["seed0"], [])):
        with pytest.raises(CdclError) as e:
            call()
        msg = str(e.value)
        assert msg.startswith(f"{out / 'study.json'}: ") and needle in msg, msg


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        (_edit("feature_sets", {}), "`feature_sets` is an object with 0 fields"),
        (_edit("feature_sets", None), "`feature_sets` is null"),
        (_edit("results_version", 999), "newer than this cdcl reads"),
        ({**GOOD, "tables": {"raw": [{"features": "CDCL", "NSC": "high"}]}}, '"high"'),
        (GOOD, "`tables` is missing or empty"),
    ],
)
def test_a_resumed_study_refuses_a_replicate_without_results(
    tmp_path: Path, doc: dict, needle: str
) -> None:
    """A finished replicate (its key matches) is reused only when its results.json has results."""
    spec = StudySpec(out=tmp_path / "study", quick=True, seeds=(0,), methods=("DINO", "CDCL"))
    rep = replicates(spec)[0]
    folder = spec.out / "replicates" / rep.name
    folder.mkdir(parents=True)
    (folder / "replicate.json").write_text(json.dumps(replicate_key(spec, rep)))
    (folder / "results.json").write_text(json.dumps(doc))
    with pytest.raises(CdclError) as e:
        run_replicate(spec, rep)
    msg = str(e.value)
    assert msg.startswith(f"{folder / 'results.json'}: ") and needle in msg, msg
    advice = "upgrade cdcl" if "newer" in needle else f"remove {folder} to run that replicate"
    assert advice in msg, msg


# ----------------------------------------------------------------- profile tables


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    """A small, valid profile table (4 batches, 2 MoAs, controls) as pycytominer names it."""
    x, meta = planted_profiles()
    t = pd.DataFrame({f"Metadata_{c.capitalize()}": meta[c] for c in meta.columns})
    return pd.concat([t, pd.DataFrame(x, columns=[f"f{j}" for j in range(x.shape[1])])], axis=1)


def _evaluate(capsys: pytest.CaptureFixture, path: Path, *extra: str) -> str:
    out = path.parent / "out"
    line = run_main(capsys, "evaluate", "--features", path, "--out", out, "--no-umap", *extra)
    assert not (out / "results.json").exists()
    return line


def test_two_metadata_batch_columns(
    table: pd.DataFrame, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    t = table.copy()
    t.insert(1, "Metadata_Batch_2", t["Metadata_Batch"].str.upper())
    header = ",".join(t.columns).replace("Metadata_Batch_2", "Metadata_Batch")
    csv_path = tmp_path / "dup.csv"
    csv_path.write_text(header + "\n" + t.to_csv(index=False, header=False))
    pq_path = tmp_path / "dup.parquet"
    names = [c if c != "Metadata_Batch_2" else "Metadata_Batch" for c in t.columns]
    pq.write_table(pa.Table.from_pandas(t, preserve_index=False).rename_columns(names), pq_path)
    for path in (csv_path, pq_path):
        line = _evaluate(capsys, path)
        assert f"{path}: column `Metadata_Batch` appears twice (columns 2 and " in line, line
        with pytest.raises(CdclError, match="appears twice"):
            read_profile_table(path)


def test_a_feature_column_without_metadata(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "one.csv"
    pd.DataFrame({"f0": np.arange(10.0)}).to_csv(path, index=False)
    line = _evaluate(capsys, path)
    assert f"{path}: no metadata columns: none of its 1 columns (`f0`)" in line, line
    with pytest.raises(CdclError, match="no metadata columns"):
        split_table(pd.DataFrame({"f0": [1.0, 2.0]}))


@pytest.mark.parametrize(
    ("scale", "needle"),
    [(1e300, "beyond float32"), (1e25, "its square overflows float32")],
)
def test_finite_values_too_large_for_float32(
    table: pd.DataFrame, tmp_path: Path, capsys: pytest.CaptureFixture, scale: float, needle: str
) -> None:
    t = table.copy()
    t["f3"] = t["f3"].astype(np.float64) * scale
    for path in (tmp_path / "big.csv", tmp_path / "big.parquet"):
        t.to_csv(path, index=False) if path.suffix == ".csv" else t.to_parquet(path)
        line = _evaluate(capsys, path)
        assert f"{path}: feature column `f3` holds " in line and needle in line, line
        assert "NaN or infinite" not in line
    with pytest.raises(CdclError, match="feature column `f3` holds"):
        split_table(t)


def test_semicolon_separated_csv_is_read_as_such(table: pd.DataFrame, tmp_path: Path) -> None:
    comma, semi, decimal = tmp_path / "c.csv", tmp_path / "s.csv", tmp_path / "d.csv.gz"
    table.to_csv(comma, index=False)
    table.to_csv(semi, index=False, sep=";")
    table.to_csv(decimal, index=False, sep=";", decimal=",")
    expected = read_profile_table(comma)
    for path in (semi, decimal):
        got = read_profile_table(path)
        pd.testing.assert_frame_equal(got, expected)
        x, meta, names = split_table(got)
        assert x.shape == (len(table), 16) and names[0] == "f0"


@pytest.mark.parametrize(
    ("pattern", "needle"),
    [
        ("B0", "the expression has no group; put the part of the value that names the batch"),
        ("(b)", "turns all 4 batch values (b0, b1, b2, ...) into the one batch 'b'"),
        ("^(Week\\d+)", "matches none of the batch values (e.g. 'b0')"),
        ("(b", "invalid regular expression"),
    ],
)
def test_batch_pattern_without_a_group_is_refused(
    table: pd.DataFrame,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    pattern: str,
    needle: str,
) -> None:
    path = tmp_path / "t.csv"
    table.to_csv(path, index=False)
    line = _evaluate(capsys, path, "--batch-pattern", pattern)
    assert f"--batch-pattern {pattern!r}: {needle}" in line, line


def test_batch_pattern_with_a_group_takes_it() -> None:
    plates = pd.Series(["Week1_22123", "Week1_22141", "Week2_24121", None], dtype=object)
    got = apply_batch_pattern(plates, r"^(Week\d+)")
    assert list(got) == ["Week1", "Week1", "Week2", None]


# ----------------------------------------------------------------- writes that really fail


def _size_limit(nbytes: int) -> Callable[[], None]:
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write, do not kill the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))

    return apply


def limited(*args: object, limit: int) -> subprocess.CompletedProcess:
    """`cdcl ARGS` in a subprocess under a file-size limit: a longer write fails with EFBIG."""
    return subprocess.run(
        [sys.executable, "-m", "cdcl", *map(str, args)],
        capture_output=True,
        text=True,
        env=cdcl_env(),
        timeout=600,
        preexec_fn=_size_limit(limit),
    )


def last_line_alone(proc: subprocess.CompletedProcess, command: str) -> str:
    """The error line: exit 2, no traceback, the last line of stderr and on a line of its own."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.rstrip("\n").split("\n")
    assert lines[-1].startswith(f"cdcl {command}: error: "), proc.stderr
    assert sum(": error: " in ln for ln in lines) == 1, proc.stderr
    return lines[-1]


@pytest.fixture(scope="module")
def screen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny simulated screen (96 images)."""
    out = tmp_path_factory.mktemp("screen") / "ds"
    assert cdcl("synth", "--preset", "tiny", "--out", out, "--no-progress").returncode == 0
    return out


@pytest.mark.slow
def test_embed_on_a_full_disk_names_the_part_after_the_progress_bar(
    screen: Path, tmp_path: Path
) -> None:
    out = tmp_path / "p.parquet"
    proc = limited("embed", "intensity", "--data", screen, "--out", out, limit=2000)
    line = last_line_alone(proc, "embed")
    assert "intensity:" in proc.stderr  # the bar was drawn, and ended before the error
    assert "part-0000000.parquet: write failed, file too large" in line, line
    assert "a file" not in line and not out.exists()


@pytest.mark.slow
def test_embed_merge_on_a_full_disk_names_the_output(screen: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.parquet"
    args = ("--out", out, "--level", "image", "--chunk-size", "16", "--no-progress")
    proc = limited("embed", "intensity", "--data", screen, *args, limit=6000)
    line = last_line_alone(proc, "embed")
    assert line.startswith(f"cdcl embed: error: {out}: write failed, file too large"), line
    assert not out.exists() and not list(tmp_path.glob(".p.parquet.tmp*"))


@pytest.mark.slow
def test_compare_on_a_full_disk_names_the_figure(tmp_path: Path) -> None:
    run = _results_dir(tmp_path, GOOD)
    rng = np.random.default_rng(0)
    umap = pd.DataFrame(
        {
            "umap_x": rng.normal(size=40),
            "umap_y": rng.normal(size=40),
            "batch": ["b0", "b1"] * 20,
            "treatment": ["DMSO", "a", "b", "c"] * 10,
            "is_control": [True, False, False, False] * 10,
        }
    )
    (run / "plots").mkdir()
    umap.to_csv(run / "plots" / "umap_model.csv", index=False)
    out = tmp_path / "cmp"
    line = last_line_alone(limited("compare", run, "--out", out, limit=8000), "compare")
    assert line.startswith(f"cdcl compare: error: {out / 'umap_grid.png'}: write failed"), line
    assert (out / "comparison.csv").is_file() and not (out / "umap_grid.png").exists()
    assert [p.name for p in out.iterdir() if ".tmp" in p.name] == []


def test_build_on_a_full_disk_names_the_image_store(tmp_path: Path) -> None:
    images = np.zeros((8, 16, 16, 2), dtype=np.uint8)
    np.savez(tmp_path / "cells.npz", images=images)
    rows = [{"plate": f"P{i // 4}", "well": f"A{i % 4:02d}", "compound": "DMSO"} for i in range(8)]
    pd.DataFrame(rows).to_csv(tmp_path / "cells.csv", index=False)
    out = tmp_path / "ds"
    build = [
        "build", "table", "--samples", tmp_path / "cells.csv", "--npz", tmp_path / "cells.npz",
        "--npz-key", "images", "--channels", "DNA,Actin", "--batch-col", "plate",
        "--treatment-col", "compound", "--out", out,
    ]  # fmt: skip
    line = last_line_alone(limited(*build, limit=100), "build")
    store = tmp_path / ".ds.partial" / "images.zarr"
    assert line.startswith(f"cdcl build: error: {store}: write failed, file too large"), line


def test_writes_into_dev_full_name_the_target(tmp_path: Path) -> None:
    """The temporary file of each writer is linked to /dev/full: the write really fails."""
    meta = pd.DataFrame({"plate": ["p", "p"], "well": ["A1", "A2"], "treatment": ["x", "y"]})
    x = np.ones((2, 3), np.float32)
    for path, write in (
        (tmp_path / "t.parquet", lambda p: to_parquet(x, meta, p)),
        (tmp_path / "t.csv", lambda p: to_csv(x, meta, p)),
        (tmp_path / "direct.parquet", lambda p: write_parquet(meta, p)),
    ):
        link = path if path.name.startswith("direct") else temp_sibling(path)
        link.symlink_to("/dev/full")
        with pytest.raises(DiskFullError) as e:
            write(path)
        assert str(e.value).startswith(f"{path}: write failed, no space left on device"), e.value
        link.unlink(missing_ok=True)  # the writer removed its temporary link
        assert not path.exists()


def test_a_figure_into_dev_full_names_the_png(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cdcl.report.html import _save

    path = tmp_path / "fig.png"
    temp_sibling(path).with_name(temp_sibling(path).name + ".png").symlink_to("/dev/full")
    with pytest.raises(DiskFullError, match=f"^{path}: write failed, no space left"):
        _save(plt.figure(), path)
    assert not path.exists()


def test_a_directory_in_the_way_names_the_target(tmp_path: Path) -> None:
    meta = pd.DataFrame({"plate": ["p"], "well": ["A1"], "treatment": ["x"]})
    path = tmp_path / "t.csv"
    path.mkdir()
    with pytest.raises(WriteError, match=f"^{path}: write failed"):
        to_csv(np.ones((1, 2), np.float32), meta, path)


# ----------------------------------------------------------------- an interrupt


# `cdcl ARGS` with SIGINT delivered to the main thread just before or just after results.json
# is written (the write itself is the library's; only the signal's moment is chosen here).
INTERRUPTED = """
import signal, sys, threading, time
import cdcl.report.results as results
from cdcl.cli import main

when, write = sys.argv[1], results.atomic_write_text
# Ctrl-C's usual handler even when this process inherited SIGINT ignored (a job started in the
# background by a script), where Python installs no KeyboardInterrupt handler of its own
signal.signal(signal.SIGINT, signal.default_int_handler)

def interrupt():
    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
    time.sleep(30)  # KeyboardInterrupt arrives here

def write_and_interrupt(path, text):
    if when == "before":
        interrupt()
    write(path, text)
    if when == "after":
        interrupt()

results.atomic_write_text = write_and_interrupt
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize(
    ("when", "previous", "says"),
    [
        ("after", True, "{results} holds the new results, written before the interrupt"),
        ("before", True, "{results} holds the previous results, unchanged"),
        ("before", False, "no results were written to {out}"),
    ],
)
def test_an_interrupt_says_which_results_are_on_disk(
    table: pd.DataFrame, tmp_path: Path, when: str, previous: bool, says: str
) -> None:
    path, out = tmp_path / "t.csv", tmp_path / "eval"
    table.to_csv(path, index=False)
    results = out / "results.json"
    if previous:
        out.mkdir()
        results.write_text(json.dumps(GOOD))
    before = results.read_bytes() if previous else None
    args = ["--features", path, "--out", out, "--no-umap", "--null-size", "50", "--no-calibrate"]
    proc = subprocess.run(
        [sys.executable, "-c", INTERRUPTED, when, "evaluate", *map(str, args)],
        capture_output=True,
        text=True,
        env=cdcl_env(),
        timeout=600,
    )
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.rstrip("\n").split("\n")[-1]
    assert last.startswith("cdcl evaluate: interrupted; "), proc.stderr
    assert says.format(results=results, out=out) in last, last
    if when == "after":
        assert results.read_bytes() != before and read_results(results)["kind"] == "features"
    elif previous:
        assert results.read_bytes() == before
    else:
        assert not results.exists()
    assert [p.name for p in out.iterdir() if ".tmp" in p.name] == []
