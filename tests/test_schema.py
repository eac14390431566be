"""cdcl.schema: one line naming the file, the field's path and what was expected."""

from __future__ import annotations

import json
import math

import pytest

from cdcl.errors import CdclError
from cdcl.schema import (
    Any,
    Bool,
    Float,
    Int,
    ListOf,
    MapOf,
    Name,
    Nullable,
    Obj,
    OneOf,
    SchemaError,
    Str,
    Version,
    check,
    get_path,
    is_safe_name,
)

DOC = Obj(
    required={
        "version": Version(known=(1, 2)),
        "name": Name(),
        "sets": ListOf(
            Obj(
                required={"label": Str(nonempty=True), "n": Int(min=1, max=10)},
                optional={"score": Nullable(Float(min=0, max=1)), "on": Bool()},
            ),
            min_len=1,
        ),
    },
    optional={
        "seeds": ListOf(Int(min=0), unique=True),
        "index": MapOf(Int(min=0)),
        "kind": Str(choices=("a", "b")),
        "extra": Any(),
        "size": OneOf(Int(min=1), Str(choices=("auto",))),
    },
)
GOOD = {
    "version": 2,
    "name": "run_1",
    "sets": [{"label": "x", "n": 3, "score": None, "on": True}],
    "seeds": [0, 1],
    "index": {"DMSO": 0, "a b": 1},
    "size": "auto",
}


def _error(doc: object, spec=DOC, hint: str = "") -> str:
    with pytest.raises(SchemaError) as e:
        check(doc, spec, "out/study.json", hint)
    text = str(e.value)
    assert isinstance(e.value, CdclError) and "\n" not in text
    return text


def test_a_good_document_passes_unchanged() -> None:
    doc = json.loads(json.dumps(GOOD))
    assert check(doc, DOC, "f.json") is doc and doc == GOOD


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"version": 3}, "`version` is 3, newer than this cdcl reads (version 1 or 2); it was "),
        ({"version": 0}, "`version` is 0 (an integer); expected version 1 or 2"),
        ({"version": True}, "`version` is true (a boolean); expected an integer version 1 or 2"),
        ({"name": "../etc"}, '`name` is "../etc" (a string); expected a name without /'),
        ({"sets": []}, "`sets` is a list of 0 items; expected a non-empty list of items"),
        (
            {"sets": [{"label": "x", "n": 11}]},
            "`sets[0].n` is 11 (an integer); expected an integer from 1 to 10",
        ),
        (
            {"sets": [{"label": "x", "n": 2.0}]},
            "`sets[0].n` is 2.0 (a number); expected an integer",
        ),
        ({"sets": [{"label": "x"}]}, "`sets[0].n` is missing; expected an integer from 1 to 10"),
        (
            {"sets": [{"label": "x", "n": 1, "score": float("nan")}]},
            "`sets[0].score` is nan (a number); expected null or a finite number from 0 to 1",
        ),
        ({"seeds": [1, 2, 1]}, "`seeds` has 1 (an integer) twice (item 2)"),
        ({"index": {"a b": -1}}, '`index["a b"]` is -1 (an integer); expected an integer >= 0'),
        ({"index": []}, "`index` is a list of 0 items; expected an object mapping"),
        ({"kind": "c"}, '`kind` is "c" (a string); expected one of "a", "b"'),
        ({"size": 0}, '`size` is 0 (an integer); expected an integer >= 1 or one of "auto"'),
    ],
)
def test_each_violation_names_the_field_and_what_was_expected(change: dict, message: str) -> None:
    text = _error({**GOOD, **change})
    assert text.startswith("out/study.json: ") and message in text, text


def test_the_hint_ends_the_line_and_a_version_error_brings_its_own() -> None:
    assert _error({**GOOD, "name": ""}, hint="rerun the study").endswith("; rerun the study")
    text = _error({**GOOD, "version": 9}, hint="rerun the study")
    assert text.endswith("upgrade cdcl to read it") and "rerun" not in text


def test_unknown_fields_are_refused_only_when_asked() -> None:
    strict = Obj(required={"a": Int()}, extra=False)
    check({"a": 1}, strict, "f")
    assert "`b` is not a known field; expected one of a" in _error({"a": 1, "b": 2}, strict)
    check({"a": 1, "b": 2}, Obj(required={"a": Int()}), "f")


def test_not_an_object_and_absurd_values_stay_short() -> None:
    assert "the document is a list of 0 items; expected an object" in _error([])
    text = _error({**GOOD, "sets": [{"label": "x", "n": 10**5000}]})
    assert "a 5001-digit integer" in text and len(text) < 300
    assert len(_error({**GOOD, "name": "x/" * 10_000})) < 300


def test_a_document_nested_thousands_deep_is_one_line() -> None:
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    nested = ListOf(Any())
    for _ in range(5000):
        nested = ListOf(nested)
    assert "nested too deeply" in _error(deep, nested)


@pytest.mark.parametrize(
    ("name", "safe"),
    [
        ("run_1", True),
        ("DMSO 0.1 uM", True),
        ("a/b", False),
        ("a\\b", False),
        ("..", False),
        ("x..y", False),
        ("", False),
        ("a\x00", False),
        ("tab\there", False),
        ("é" * 200, False),  # 400 bytes: over a file name's 255
    ],
)
def test_safe_names(name: str, safe: bool) -> None:
    assert is_safe_name(name) is safe


def test_get_path_reads_nested_values_and_numbers() -> None:
    doc = {"a": {"b": {"c": 0.5, "flag": True, "n": 3, "text": "x"}}, "top": [1]}
    assert get_path(doc, ("a", "b", "c")) == 0.5
    assert get_path(doc, ["top"]) == [1]
    assert get_path(doc, ()) is doc
    assert get_path(doc, ("a", "missing")) is None
    assert get_path(doc, ("top", "deeper")) is None  # a list is not walked into
    assert get_path(None, ("a",)) is None
    assert get_path(doc, ("a", "b", "n"), number=True) == 3.0
    assert isinstance(get_path(doc, ("a", "b", "n"), number=True), float)
    for path in (("a", "b", "flag"), ("a", "b", "text"), ("a", "nope"), ("a", "b")):
        assert math.isnan(get_path(doc, path, number=True)), path
