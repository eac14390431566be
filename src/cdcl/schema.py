"""Declarative checks for the documents cdcl reads back (dataset.json, checkpoint metadata, ...).

A document read from disk may be damaged or crafted. Before any of its values is used, it is
checked against a schema built from the small specs below; the first violation becomes one
:class:`SchemaError` (a :class:`~cdcl.errors.CdclError`, so the CLI prints one line and exits
2) that names the file, the field's path in the document and what was expected::

    DATASET = Obj(
        required={
            "format_version": Version(known=(1,)),
            "name": Str(nonempty=True),
            "channels": ListOf(Str(nonempty=True), min_len=1, unique=True),
            "image_size": ListOf(Int(min=1), min_len=2, max_len=2),
            "n_images": Int(min=1),
        },
        optional={"build": Obj(optional={"args": MapOf(Any())})},
    )
    check(doc, DATASET, where="DIR/dataset.json", hint="rebuild the dataset")

raises, for ``{"n_images": "many", ...}``::

    DIR/dataset.json: `n_images` is "many" (a string); expected an integer >= 1; rebuild the dataset

Specs: :class:`Any`, :class:`Bool`, :class:`Int`, :class:`Float`, :class:`Str`, :class:`Name`
(a safe file-name component), :class:`Version`, :class:`ListOf`, :class:`MapOf`, :class:`Obj`
(required and optional fields; unknown fields allowed unless ``extra=False``),
:class:`Nullable` and :class:`OneOf`. Each has ``check(value, path) -> None`` and ``expected``
(the words after "expected"). Values are checked, never converted: ``True`` is not an integer,
``3.0`` is not an integer, NaN and infinities are not numbers unless ``Float(finite=False)``.
Field paths read ``build.args.seed``, ``channels[2]``, ``label_of["DMSO"]``.
:func:`read_json` reads a JSON file and checks it in one step. :func:`get_path` reads one value
out of a nested document (a results.json) without checking it, ``None`` where it is missing.

This module imports only :mod:`cdcl.errors`, so any module may use it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any as _AnyType

from cdcl.errors import CdclError

__all__ = [
    "Any",
    "Bool",
    "Float",
    "Int",
    "ListOf",
    "MapOf",
    "Name",
    "Nullable",
    "Obj",
    "OneOf",
    "SchemaError",
    "Spec",
    "Str",
    "Version",
    "check",
    "describe",
    "is_safe_name",
    "read_json",
]


class SchemaError(CdclError):
    """A document's field is missing, of the wrong type or out of range (one line)."""

    def __init__(
        self, path: str, problem: str, expected: str | None = None, hint: str = ""
    ) -> None:
        self.path, self.problem, self.expected = path, problem, expected
        self.where = ""
        self.hint = hint  # set here, it replaces the document's hint (e.g. "upgrade cdcl")
        super().__init__(self._text())

    def _text(self) -> str:
        field = f"`{self.path}`" if self.path else "the document"
        text = f"{field} {self.problem}"
        if self.expected:
            text += f"; expected {self.expected}"
        if self.where:
            text = f"{self.where}: {text}"
        if self.hint:
            text += f"; {self.hint}"
        return text

    def located(self, where: str, hint: str = "") -> SchemaError:
        """The same error naming the file (``where``) and saying what to do (``hint``)."""
        self.where, self.hint = where, self.hint or hint
        self.args = (self._text(),)
        return self


def describe(value: object, limit: int = 40) -> str:
    """A short, one-line rendering of ``value`` with its JSON type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{'true' if value else 'false'} (a boolean)"
    if isinstance(value, list | tuple):
        return f"a list of {len(value)} item{'s' if len(value) != 1 else ''}"
    if isinstance(value, Mapping):
        return f"an object with {len(value)} field{'s' if len(value) != 1 else ''}"
    if isinstance(value, int) and abs(value) >= 10**limit:
        # str() refuses integers over 4,300 digits; the logarithm does not.
        return f"a {math.floor(math.log10(abs(value))) + 1}-digit integer"
    if isinstance(value, str):
        text = value.encode("unicode_escape", "backslashreplace").decode("ascii")
        text = '"' + text.replace('"', '\\"') + '"'
        kind = "a string"
    else:
        text = repr(value)
        kind = {int: "an integer", float: "a number"}.get(type(value), type(value).__name__)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{text} ({kind})"


def _key_path(path: str, key: object) -> str:
    if isinstance(key, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        return f"{path}.{key}" if path else key
    shown = describe(key) if isinstance(key, str) else repr(key)
    shown = shown.removesuffix(" (a string)")
    return f"{path}[{shown}]"


class Spec:
    """A check on one value; subclasses set ``expected`` and implement ``_check``."""

    expected = "a value"

    def check(self, value: object, path: str = "") -> None:
        """Raise :class:`SchemaError` (naming ``path``) when ``value`` does not fit."""
        self._check(value, path)

    def _check(self, value: object, path: str) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def fail(self, value: object, path: str, expected: str | None = None) -> SchemaError:
        """The error for ``value`` at ``path``."""
        return SchemaError(path, f"is {describe(value)}", expected or self.expected)


class Any(Spec):
    """Any value at all (the field only has to be present, if required)."""

    expected = "any value"

    def _check(self, value: object, path: str) -> None:
        return None


class Bool(Spec):
    """``true`` or ``false``."""

    expected = "true or false"

    def _check(self, value: object, path: str) -> None:
        if not isinstance(value, bool):
            raise self.fail(value, path)


def _range_words(noun: str, lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f"{noun} from {lo} to {hi}"
    if lo is not None:
        return f"{noun} >= {lo}"
    if hi is not None:
        return f"{noun} <= {hi}"
    return noun


class Int(Spec):
    """An integer (not a boolean, not ``3.0``) in ``[min, max]``."""

    def __init__(self, min: int | None = None, max: int | None = None) -> None:
        self.min, self.max = min, max
        self.expected = _range_words("an integer", min, max)

    def _check(self, value: object, path: str) -> None:
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(value, path)
        if (self.min is not None and value < self.min) or (
            self.max is not None and value > self.max
        ):
            raise self.fail(value, path)


class Float(Spec):
    """A number (integer or float, not a boolean) in ``[min, max]``; finite unless told."""

    def __init__(
        self, min: float | None = None, max: float | None = None, finite: bool = True
    ) -> None:
        self.min, self.max, self.finite = min, max, finite
        noun = "a finite number" if finite else "a number"
        self.expected = _range_words(noun, min, max)

    def _check(self, value: object, path: str) -> None:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise self.fail(value, path)
        try:
            x = float(value)
        except OverflowError:
            raise self.fail(value, path) from None
        if self.finite and not math.isfinite(x):
            raise self.fail(value, path)
        if (self.min is not None and x < self.min) or (self.max is not None and x > self.max):
            raise self.fail(value, path)


class Str(Spec):
    """A string: non-empty if asked, one of ``choices``, or matching ``pattern`` in full."""

    def __init__(
        self,
        nonempty: bool = False,
        choices: Iterable[str] | None = None,
        pattern: str | None = None,
        max_len: int | None = None,
        what: str | None = None,
    ) -> None:
        self.nonempty = nonempty
        self.choices = tuple(choices) if choices is not None else None
        self.pattern = re.compile(pattern) if pattern is not None else None
        self.max_len = max_len
        if what is not None:
            self.expected = what
        elif self.choices is not None:
            self.expected = "one of " + ", ".join(f'"{c}"' for c in self.choices)
        elif self.pattern is not None:
            self.expected = f"a string matching {pattern}"
        else:
            self.expected = "a non-empty string" if nonempty else "a string"
        if max_len is not None and what is None:
            self.expected += f" of at most {max_len} characters"

    def _check(self, value: object, path: str) -> None:
        if not isinstance(value, str):
            raise self.fail(value, path)
        if (self.nonempty and not value.strip()) or (
            self.max_len is not None and len(value) > self.max_len
        ):
            raise self.fail(value, path)
        if self.choices is not None and value not in self.choices:
            raise self.fail(value, path)
        if self.pattern is not None and not self.pattern.fullmatch(value):
            raise self.fail(value, path)


_UNSAFE_CHARS = re.compile(r"[/\\\x00-\x1f\x7f]")


def is_safe_name(name: object) -> bool:
    """True for a usable file-name component: no separators, control characters, ``.``/``..``."""
    return (
        isinstance(name, str)
        and bool(name.strip())
        and name not in (".", "..")
        and ".." not in name
        and not _UNSAFE_CHARS.search(name)
        and len(name.encode("utf-8", "surrogatepass")) <= 255
    )


class Name(Spec):
    """A name safe to use as one path component (see :func:`is_safe_name`)."""

    expected = "a name without /, \\, `..` or control characters (at most 255 bytes)"

    def _check(self, value: object, path: str) -> None:
        if not is_safe_name(value):
            raise self.fail(value, path)


class Version(Spec):
    """A format version this cdcl reads: one of ``known``; newer ones say to upgrade cdcl."""

    def __init__(self, known: Iterable[int]) -> None:
        self.known = tuple(sorted(known))
        self.expected = "version " + " or ".join(str(v) for v in self.known)

    def _check(self, value: object, path: str) -> None:
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(value, path, f"an integer {self.expected}")
        if value > self.known[-1]:
            raise SchemaError(
                path,
                f"is {value}, newer than this cdcl reads ({self.expected})",
                hint="it was written by a newer cdcl: upgrade cdcl to read it",
            )
        if value not in self.known:
            raise self.fail(value, path)


class ListOf(Spec):
    """A list whose items all fit ``item``; length bounds; ``unique`` refuses repeated items."""

    def __init__(
        self,
        item: Spec,
        min_len: int = 0,
        max_len: int | None = None,
        unique: bool = False,
    ) -> None:
        self.item, self.min_len, self.max_len, self.unique = item, min_len, max_len, unique
        if max_len is not None and max_len == min_len:
            count = f"exactly {min_len} "
        elif max_len is not None:
            count = f"{min_len} to {max_len} "
        elif min_len > 1:
            count = f"at least {min_len} "
        else:
            count = ""
        lead = "a non-empty list" if min_len == 1 and max_len is None else "a list"
        distinct = "distinct " if unique else ""
        self.expected = f"{lead} of {count}{distinct}items, each {item.expected}"

    def _check(self, value: object, path: str) -> None:
        if not isinstance(value, list | tuple):
            raise self.fail(value, path)
        if len(value) < self.min_len or (self.max_len is not None and len(value) > self.max_len):
            raise self.fail(value, path)
        for i, v in enumerate(value):
            self.item.check(v, f"{path}[{i}]")
        if self.unique:
            seen: set[object] = set()
            for i, v in enumerate(value):
                try:
                    dup = v in seen
                    seen.add(v)
                except TypeError:  # unhashable items: compared one by one
                    dup = v in value[:i]
                if dup:
                    raise SchemaError(
                        path, f"has {describe(v)} twice (item {i})", f"{self.expected}"
                    )


class MapOf(Spec):
    """An object whose keys fit ``key`` (strings by default) and whose values fit ``value``."""

    def __init__(self, value: Spec, key: Spec | None = None, min_len: int = 0) -> None:
        self.value, self.key, self.min_len = value, key or Str(), min_len
        lead = "a non-empty object" if min_len else "an object"
        self.expected = f"{lead} mapping {self.key.expected} to {value.expected}"

    def _check(self, value: object, path: str) -> None:
        if not isinstance(value, Mapping) or len(value) < self.min_len:
            raise self.fail(value, path)
        for k, v in value.items():
            try:
                self.key.check(k, path)
            except SchemaError:
                raise SchemaError(
                    path, f"has the key {describe(k)}", f"keys that are {self.key.expected}"
                ) from None
            self.value.check(v, _key_path(path, k))


class Obj(Spec):
    """An object with ``required`` and ``optional`` fields; others allowed unless ``extra=False``."""

    def __init__(
        self,
        required: Mapping[str, Spec] | None = None,
        optional: Mapping[str, Spec] | None = None,
        extra: bool = True,
    ) -> None:
        self.required = dict(required or {})
        self.optional = dict(optional or {})
        self.extra = extra
        self.expected = "an object"

    def _check(self, value: object, path: str) -> None:
        if not isinstance(value, Mapping):
            raise self.fail(value, path)
        for name in self.required:
            if name not in value:
                raise SchemaError(_key_path(path, name), "is missing", self.required[name].expected)
        for name, spec in {**self.required, **self.optional}.items():
            if name in value:
                spec.check(value[name], _key_path(path, name))
        if not self.extra:
            known = set(self.required) | set(self.optional)
            for name in value:
                if name not in known:
                    raise SchemaError(
                        _key_path(path, str(name)),
                        "is not a known field",
                        "one of " + ", ".join(sorted(known)),
                    )


class Nullable(Spec):
    """``null`` or a value fitting ``spec``."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.expected = f"null or {spec.expected}"

    def _check(self, value: object, path: str) -> None:
        if value is not None:
            try:
                self.spec.check(value, path)
            except SchemaError as e:
                if e.path == path and e.expected == self.spec.expected:
                    raise self.fail(value, path) from None
                raise


class OneOf(Spec):
    """A value fitting any one of ``specs`` (the first that fits)."""

    def __init__(self, *specs: Spec) -> None:
        self.specs = specs
        self.expected = " or ".join(s.expected for s in specs)

    def _check(self, value: object, path: str) -> None:
        for s in self.specs:
            try:
                s.check(value, path)
                return
            except SchemaError:
                continue
        raise self.fail(value, path)


def check(doc: _AnyType, spec: Spec, where: str, hint: str = "") -> _AnyType:
    """``doc`` unchanged when it fits ``spec``; else SchemaError naming ``where`` and the field.

    ``hint`` (e.g. "rebuild the dataset") ends the message: what the user should do.
    """
    try:
        spec.check(doc, "")
    except SchemaError as e:
        raise e.located(where, hint) from None
    except RecursionError:  # a document nested thousands deep
        raise SchemaError("", "is nested too deeply", None).located(where, hint) from None
    return doc


class _NotJsonNumber(ValueError):
    """NaN, Infinity or -Infinity in a document: Python's json reads them, JSON does not."""


def _reject_constant(name: str) -> float:
    raise _NotJsonNumber(name)


def read_json(path: str | Path, spec: Spec, hint: str = "") -> _AnyType:
    """The JSON document in ``path``, checked against ``spec``; SchemaError naming the file.

    Text that is not UTF-8, not JSON (NaN and Infinity included), nested too deeply to parse
    or holding an integer too long to convert is one line, as is any field that does not fit.
    A file that cannot be read raises its OSError (the caller says what is missing).
    """
    where = str(path)
    raw = Path(path).read_bytes()
    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as e:
        problem = f"is not UTF-8 text (byte {e.start})"
        raise SchemaError("", problem, "a JSON document").located(where, hint) from None
    except json.JSONDecodeError as e:
        problem = f"is not valid JSON ({e.msg}, line {e.lineno})"
        raise SchemaError("", problem, None).located(where, hint) from None
    except RecursionError:
        raise SchemaError("", "is nested too deeply", None).located(where, hint) from None
    except _NotJsonNumber as e:
        problem = f"holds {e}, which is not a JSON number"
        raise SchemaError("", problem, "numbers, or null for a missing value").located(
            where, hint
        ) from None
    except ValueError:  # an integer over Python's digit limit (4300)
        problem = "holds an integer too long to read (over 4300 digits)"
        raise SchemaError("", problem, None).located(where, hint) from None
    return check(doc, spec, where, hint)


def get_path(doc: _AnyType, path: Iterable[str], *, number: bool = False) -> _AnyType:
    """The value at ``path`` (keys, outermost first) in nested dicts; None where it is missing.

    ``number=True``: the value as a float, NaN where it is missing or not a number (booleans
    are not numbers, as in the specs above).
    """
    for key in path:
        if not isinstance(doc, dict) or key not in doc:
            return math.nan if number else None
        doc = doc[key]
    if not number:
        return doc
    return float(doc) if isinstance(doc, int | float) and not isinstance(doc, bool) else math.nan
