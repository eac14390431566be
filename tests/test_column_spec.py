"""One home for table column conventions: ColumnSpec, one control list, one control mask."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cdcl.data.columns import CONTROL_NAMES, control_mask, default_control_query
from cdcl.data.table import TableOptions, resolve_options, samples_from_table
from cdcl.errors import CdclError
from cdcl.evaluation.table_file import _load_table
from cdcl.profiles.columns import ColumnSpec

SRC = Path(__file__).resolve().parents[1] / "src" / "cdcl"


def _screen(control: str) -> pd.DataFrame:
    """Two plates of three wells, the first of each a control named ``control``, with features."""
    rows = [
        {"Metadata_Plate": f"P{p}", "Metadata_Well": w, "Metadata_Compound": c}
        for p in (1, 2)
        for w, c in (("A01", control), ("A02", "cmpA"), ("A03", "cmpB"))
    ]
    table = pd.DataFrame(rows)
    rng = np.random.default_rng(0)
    for j in range(4):
        table[f"f{j}"] = rng.normal(size=len(table)).astype(np.float32)
    return table


def _built_controls(table: pd.DataFrame) -> list[bool]:
    """The control flags `cdcl build table` gives the rows (its conventions, no flags)."""
    meta = table[[c for c in table.columns if c.startswith("Metadata_")]]
    return samples_from_table(meta, TableOptions(), "m.csv")["is_control"].tolist()


def _scored_controls(table: pd.DataFrame) -> list[bool]:
    """The control flags `cdcl evaluate --features` gives the rows (its conventions, no flags)."""
    _, meta, _, _, _ = _load_table(table, ColumnSpec())
    return meta["is_control"].tolist()


@pytest.mark.parametrize("name", ["control", "Control ", *CONTROL_NAMES])
def test_every_control_name_is_a_control_for_the_build_and_the_scoring(name: str) -> None:
    table = _screen(name)
    expected = [True, False, False, True, False, False]
    assert _built_controls(table) == expected
    assert _scored_controls(table) == expected


def test_control_wells_named_control_were_the_difference() -> None:
    # The build used to refuse this table (no negative controls found); the scoring took it.
    table = _screen("control")
    opt, _ = resolve_options(table, TableOptions(), "m.csv")
    assert opt.control_query == "`Metadata_Compound` in ['control']"


def test_one_list_and_one_mask_in_the_source() -> None:
    """No module but cdcl.data.columns defines a control list or a control mask of its own."""
    owners = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            named = (
                [t.id for t in node.targets if isinstance(t, ast.Name)]
                if isinstance(node, ast.Assign)
                else [node.name]
                if isinstance(node, ast.FunctionDef)
                else []
            )
            if {"CONTROL_NAMES", "control_mask"} & set(named):
                owners.append(str(path.relative_to(SRC)))
    assert owners == ["data/columns.py", "data/columns.py"]


def test_control_mask_conventions_in_order() -> None:
    frame = pd.DataFrame(
        {"Metadata_Compound": ["DMSO", "a"], "Metadata_control_type": ["trt", "negcon"]}
    )
    names = [frame["Metadata_Compound"]]
    assert control_mask(frame, names=names).tolist() == [False, True]  # control type first
    flags = frame.drop(columns="Metadata_control_type").assign(Metadata_is_control=["no", "Yes"])
    assert control_mask(flags, names=names).tolist() == [False, True]  # then the flag column
    plain = frame[["Metadata_Compound"]]
    assert control_mask(plain, names=names).tolist() == [True, False]  # then the names
    assert control_mask(plain, "Metadata_Compound == 'a'").tolist() == [False, True]
    assert default_control_query(plain, ["Metadata_Compound"]) == "`Metadata_Compound` in ['DMSO']"


def test_column_spec_is_frozen_and_says_where_each_field_comes_from() -> None:
    spec = ColumnSpec(treatment_col="compound,Metadata_Dose", batch_col="metadata_plate")
    with pytest.raises(AttributeError):
        spec.batch_col = "x"  # type: ignore[misc]
    found = spec.validate(["Metadata_Plate", "Metadata_Well", "Metadata_Compound", "Metadata_Dose"])
    assert found["batch"] == ["Metadata_Plate"]  # ignoring case
    assert found["treatment"] == ["Metadata_Compound", "Metadata_Dose"]  # Metadata_ optional
    assert found["plate"] == ["Metadata_Plate"] and found["moa"] is None


@pytest.mark.parametrize(
    ("spec", "columns", "message"),
    [
        (
            ColumnSpec(batch_col="Metadata_Batch"),
            ["Metadata_Plate", "Metadata_Compound"],
            "--batch-col Metadata_Batch: no such column; metadata columns are Metadata_Plate, "
            "Metadata_Compound; name one of them with --batch-col",
        ),
        (
            ColumnSpec(treatment_col="Metadata_Compound,dose"),
            ["Metadata_Compound"],
            "--treatment-col dose: no such column; metadata columns are Metadata_Compound; "
            "name one of them with --treatment-col",
        ),
        (
            ColumnSpec(treatment_col="compound", moa_col="target"),
            ["plate", "compound"],
            "--moa-col target: no such column, and the table has no Metadata_* columns to name; "
            "check that it is a profile table",
        ),
        (
            ColumnSpec(),
            ["Metadata_Plate"],
            "no treatment column found (looked for Metadata_treatment, Metadata_pert_iname, "
            "Metadata_broad_sample, Metadata_compound); name one with --treatment-col",
        ),
        (
            ColumnSpec(batch_pattern="Week"),
            ["Metadata_Compound"],
            "--batch-pattern 'Week': the expression has no group; put the part of the value that "
            "names the batch in parentheses",
        ),
    ],
)
def test_validation_names_the_column_and_what_to_do(
    spec: ColumnSpec, columns: list[str], message: str
) -> None:
    with pytest.raises(CdclError) as err:
        spec.validate(columns)
    assert str(err.value).startswith(message)
    with pytest.raises(CdclError) as again:  # resolving a table refuses it the same way
        spec.resolve(pd.DataFrame({c: ["x"] for c in columns}))
    assert str(again.value) == str(err.value)


def test_the_command_line_and_python_share_the_spec(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import cdcl
    from cdcl.cli import main

    path = tmp_path / "profiles.csv"
    _screen("DMSO").to_csv(path, index=False)
    with pytest.raises(CdclError) as err:
        cdcl.evaluate(path, tmp_path / "api", batch_col="Metadata_Batch")
    assert str(err.value).startswith("--batch-col Metadata_Batch: no such column")
    out = tmp_path / "cli"
    argv = ["evaluate", "--features", str(path), "--out", str(out), "--batch-col", "Metadata_Batch"]
    assert main(argv) != 0
    assert str(err.value) in capsys.readouterr().err
