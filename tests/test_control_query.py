"""Control queries are parsed against a small grammar, never executed (cdcl.data.query)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cli_process import cdcl as _run

from cdcl.cli import main
from cdcl.data.query import QueryError, parse_query, query_mask
from cdcl.errors import CdclError

TABLE = pd.DataFrame(
    {
        "compound": ["DMSO", "a", "b", None, "DMSO", "c"],
        "dose": [0.0, 1.5, 2.0, np.nan, 0.0, -1.0],
        "plate id": ["p", "p", "q", "q", "r", "r"],
        "ok": [True, False, True, False, False, True],
    }
)

# (our query, the same selection in pandas' own query language)
ACCEPTED = [
    ('compound == "DMSO"', 'compound == "DMSO"'),
    ("compound != 'DMSO'", "compound != 'DMSO'"),
    ("dose > 1", "dose > 1"),
    ("1 < dose", "1 < dose"),
    ("dose <= 0 & compound == 'DMSO'", "dose <= 0 & compound == 'DMSO'"),
    ("dose >= 2 | compound == 'a'", "dose >= 2 | compound == 'a'"),
    ('`plate id` == "q" & ~(dose >= 2)', '`plate id` == "q" & ~(dose >= 2)'),
    ('compound in ["a", "b"]', 'compound in ["a", "b"]'),
    ("compound not in ['a']", "compound not in ['a']"),
    ("ok", "ok"),
    ("ok and dose < 2", "ok and dose < 2"),
    ("not ok or compound == 'a'", "not ok or compound == 'a'"),
    ("0 <= dose < 2", "0 <= dose < 2"),
    ("dose == -1", "dose == -1"),
    ("dose == 1.5e0", "dose == 1.5"),
    ("ok == True", "ok == True"),
]

INJECTIONS = [
    (
        '(compound == "DMSO") & (@pd.io.common.os.system("id > {f}") == 0)',
        "@pd.io.common.os.system",
    ),
    ('(compound == "DMSO") & (pd.io.common.os.system("id > {f}") == 0)', "attribute access"),
    ('compound == "DMSO" & __import__("os").system("id > {f}") == 0', "function call"),
    ('compound == "DMSO" | open("{f}", "w")', "function call `open("),
    ("compound.__class__.__init__ == 1", "attribute access `compound.__class__"),
    ("compound[0] == 'D'", "subscript"),
    ('(lambda: __import__("os").system("id > {f}"))() == 0', "keyword `lambda`"),
    ("compound == f\"{{__import__('os').system('id > {f}')}}\"", "string prefix `f`"),
    ("(x := 1) == 1", "assignment expression"),
    ('compound == "DM" + "SO"', "`+`"),
    ("dose == 1 - 1", "arithmetic"),
    ("compound == 'DMSO'; import os", "`;`"),
    ("compound is None", "`is`"),
]


@pytest.mark.parametrize(("ours", "theirs"), ACCEPTED)
def test_accepted_queries_select_what_pandas_selects(ours: str, theirs: str) -> None:
    expect = TABLE.eval(theirs, engine="python").fillna(False).to_numpy(bool)
    assert query_mask(TABLE, ours).tolist() == expect.tolist()


@pytest.mark.parametrize(("query", "named"), INJECTIONS)
def test_code_is_refused_naming_the_part(tmp_path: Path, query: str, named: str) -> None:
    target = tmp_path / "pwned"
    q = query.format(f=target)
    with pytest.raises(QueryError) as err:
        query_mask(TABLE, q)
    msg = str(err.value)
    assert "\n" not in msg and named in msg and "allowed:" in msg, msg
    assert not target.exists()


def test_unknown_column_and_wrong_types_are_named() -> None:
    with pytest.raises(QueryError, match=r"no column `Compound` \(columns: compound, dose"):
        query_mask(TABLE, "Compound == 'DMSO'")
    with pytest.raises(QueryError, match=r"`compound` \(object\) cannot be compared with 3 by <"):
        query_mask(TABLE, "compound < 3")
    with pytest.raises(QueryError, match="column against a column"):
        parse_query("compound == dose")
    with pytest.raises(QueryError, match="`compound` is not True/False"):
        query_mask(TABLE, "compound")
    with pytest.raises(QueryError, match="empty query"):
        parse_query("  ")
    with pytest.raises(QueryError, match="ends too early"):
        parse_query("compound ==")


def _npz_table(tmp_path: Path) -> tuple[Path, Path]:
    n = 6
    np.savez(tmp_path / "x.npz", images=np.zeros((n, 8, 8, 2), np.uint8))
    pd.DataFrame(
        {
            "batch": ["b1", "b1", "b1", "b2", "b2", "b2"],
            "plate": ["p1", "p1", "p1", "p2", "p2", "p2"],
            "well": ["A01", "A02", "A03", "A01", "A02", "A03"],
            "site": 1,
            "treatment": ["DMSO", "a", "b"] * 2,
            "compound": ["DMSO", "a", "b"] * 2,
        }
    ).to_csv(tmp_path / "m.csv", index=False)
    return tmp_path / "m.csv", tmp_path / "x.npz"


def _profiles(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    n = 24
    table = pd.DataFrame(
        {
            "Metadata_batch": [f"b{i % 3}" for i in range(n)],
            "Metadata_plate": [f"p{i % 3}" for i in range(n)],
            "Metadata_well": [f"W{i:02d}" for i in range(n)],
            "Metadata_compound": ["DMSO" if i % 4 == 0 else f"c{i % 4}" for i in range(n)],
        }
    )
    table["Metadata_treatment"] = table["Metadata_compound"]
    for k in range(4):
        table[f"f{k}"] = rng.normal(size=n)
    path = tmp_path / "profiles.csv"
    table.to_csv(path, index=False)
    return path


def test_injection_through_both_commands_runs_nothing(tmp_path: Path) -> None:
    samples, npz = _npz_table(tmp_path)
    profiles = _profiles(tmp_path)
    target = tmp_path / "pwned"
    query = f'(compound == "DMSO") & (@pd.io.common.os.system("id > {target}") == 0)'
    out = tmp_path / "ds"
    build = _run(
        "build", "table", "--samples", samples, "--npz", npz, "--channels", "DNA,Actin",
        "--control-query", query, "--out", out,
    )  # fmt: skip
    lines = [ln for ln in build.stderr.splitlines() if ln.strip()]
    assert build.returncode == 2 and len(lines) == 1, build.stderr
    assert "@pd.io.common.os.system" in lines[0] and "not allowed" in lines[0]
    assert not target.exists() and not out.exists()
    assert not (tmp_path / ".ds.partial").exists()

    res = tmp_path / "res"
    query = query.replace("compound", "Metadata_compound")
    ev = _run("evaluate", "--features", profiles, "--out", res, "--control-query", query)
    lines = [ln for ln in ev.stderr.splitlines() if ln.strip()]
    assert ev.returncode == 2 and len(lines) == 1, ev.stderr
    assert "@pd.io.common.os.system" in lines[0]
    assert not target.exists() and not (res / "results.json").exists()


@pytest.mark.parametrize(("query", "named"), INJECTIONS[1:])
def test_injection_variants_through_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], query: str, named: str
) -> None:
    samples, npz = _npz_table(tmp_path)
    profiles = _profiles(tmp_path)
    target = tmp_path / "pwned"
    q = query.format(f=target)
    rc = main(
        ["build", "table", "--samples", str(samples), "--npz", str(npz), "--channels", "DNA,Actin",
         "--control-query", q, "--out", str(tmp_path / "ds")]
    )  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and named in err, err
    rc = main(
        ["evaluate", "--features", str(profiles), "--out", str(tmp_path / "res"),
         "--control-query", q.replace("compound", "Metadata_compound")]
    )  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err, err
    assert not target.exists() and not (tmp_path / "ds").exists()
    assert not (tmp_path / "res" / "results.json").exists()


def test_good_query_builds_and_is_stored(tmp_path: Path) -> None:
    samples, npz = _npz_table(tmp_path)
    out = tmp_path / "ds"
    rc = main(
        ["build", "table", "--samples", str(samples), "--npz", str(npz), "--channels", "DNA,Actin",
         "--control-query", "compound in ['DMSO']", "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    info = json.loads((out / "dataset.json").read_text())
    assert info["build"]["args"]["control_query"] == "compound in ['DMSO']"
    s = pd.read_csv(samples)
    from cdcl.parquet import read_parquet

    built = read_parquet(out / "samples.parquet").sort_values("source_row")
    assert built["is_control"].tolist() == (s["compound"] == "DMSO").tolist()


def test_query_stored_in_dataset_json_or_results_json_is_checked(tmp_path: Path) -> None:
    from conftest import write_random_dataset

    from cdcl.data.dataset_dir import validate
    from cdcl.report.results import read_results

    ds = write_random_dataset(tmp_path / "ds", n_batches=2, sites=1, size=8)
    info = json.loads((ds / "dataset.json").read_text())
    info["build"] = {"args": {"control_query": 'compound == "DMSO" | @os.system("id") == 0'}}
    (ds / "dataset.json").write_text(json.dumps(info))
    with pytest.raises(CdclError, match=r"dataset.json: `build.args.control_query`.*@os.system"):
        validate(ds)
    res = tmp_path / "results.json"
    # the smallest document read_results accepts: one feature set with one variant's results
    valid = {"feature_sets": {"f": {"raw": {}}}}
    res.write_text(
        json.dumps({**valid, "source": {"columns": {"control_query": "x == 1 | len(x)"}}})
    )
    with pytest.raises(CdclError, match=r"results.json: `source.columns.control_query`.*call"):
        read_results(res)
    res.write_text(json.dumps({**valid, "source": {"columns": {"control_query": "x == 1"}}}))
    assert read_results(res)["source"]["columns"]["control_query"] == "x == 1"


def test_unicode_column_names_need_no_backticks() -> None:
    df = pd.DataFrame({"dose_µM": [0.5, 2.0, 3.0], "Behandlung": ["DMSO", "x", "DMSO"]})
    mask = query_mask(df, "dose_µM > 1 & Behandlung == 'DMSO'")
    assert mask.tolist() == [False, False, True]
