"""Control queries (``--control-query``): a small row-selection language, parsed, never executed.

A control definition is data, so it is tokenised and parsed here against a fixed grammar and
evaluated on the DataFrame by this module; no expression engine (``DataFrame.query`` / ``eval``,
which resolve ``@name`` to Python objects and call functions) ever sees it. The grammar::

    query      := term ( ("|" | "or") term )*
    term       := factor ( ("&" | "and") factor )*
    factor     := ("~" | "not") factor | "(" query ")" | condition
    condition  := value OP value [OP value ...]       (each pair: a column and a literal)
                | column ["not"] "in" "[" literal, ... "]"
                | column                              (a True/False column)
    OP         := "==" | "!=" | "<" | ">" | "<=" | ">="
    literal    := "string" | 'string' | number | True | False
    column     := name | `any column name`

As in pandas, comparisons bind tighter than ``&`` and ``|``: ``a == 1 & b > 2`` means
``(a == 1) & (b > 2)``. Anything else (function calls, attributes, subscripts, ``@variables``,
lambdas, f-strings, ``:=``, arithmetic) is refused with one line naming the part not allowed.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from cdcl.errors import CdclError

GRAMMAR = (
    "allowed: column comparisons with ==, !=, <, >, <=, >= against a quoted string, a number, "
    'True or False, `column in ["a", "b"]`, `column not in [...]`, joined with &, |, ~ and '
    "parentheses; column names bare or in `backticks`"
)

_COMPARE = ("==", "!=", "<=", ">=", "<", ">")
_FLIP = {"<": ">", ">": "<", "<=": ">=", ">=": "<="}
_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<name>[^\W\d]\w*)
  | (?P<backtick>`[^`]*`)
  | (?P<op>==|!=|<=|>=|<|>|&|\||~|\(|\)|\[|\]|,|-)
    """,
    re.VERBOSE,
)
# Words that are Python syntax rather than column names: named in the refusal.
_KEYWORDS = {"lambda", "if", "else", "for", "import", "is", "None", "await", "yield", "del"}
MAX_DEPTH = 64  # nested parentheses and ~/not: deeper is refused (the parser is recursive)
MAX_DIGITS = 400  # longer number literals are refused (no column holds such a number)


class QueryError(CdclError):
    """A control query outside the grammar, or naming a column the table does not have."""


@dataclass(frozen=True)
class Compare:
    """``column OP value`` (``value`` is a tuple for ``in`` / ``not in``)."""

    column: str
    op: str
    value: Any


@dataclass(frozen=True)
class Combine:
    """``&`` / ``|`` of two or more parts."""

    op: str
    parts: tuple[Node, ...]


@dataclass(frozen=True)
class Invert:
    """``~part``."""

    part: Node


@dataclass(frozen=True)
class Flag:
    """A bare column used as a condition (must be True/False)."""

    column: str


Node = Compare | Combine | Invert | Flag


@dataclass(frozen=True)
class _Tok:
    kind: str  # string, number, name, column, op, end, bad (text: what is refused)
    text: str
    pos: int


@dataclass(frozen=True)
class _Column:
    name: str


def _shown(query: str, limit: int = 200) -> str:
    """``query`` quoted for a message, shortened past ``limit`` characters."""
    text = repr(query)
    return text if len(text) <= limit else f"{text[: limit - 20]}...' ({len(query)} characters)"


def _literal(value: Any) -> str:
    """A literal for a message: long numbers by their digit count."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**40:
        return f"a {len(str(abs(value)))}-digit number"
    return _printable(repr(value))


def _printable(text: str, limit: int = 60) -> str:
    """``text`` as written (backslashes kept), control characters escaped, shortened."""
    out = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)
    return out if len(out) <= limit else out[: limit - 3] + "..."


def _refused(query: str, option: str, what: str) -> QueryError:
    return QueryError(f"{option} {_shown(query)}: {what} is not allowed; {GRAMMAR}")


def _snippet(query: str, start: int, stop_chars: str = " )&|=!<>,") -> str:
    """The part of ``query`` from ``start`` up to the next separator (for messages)."""
    end, depth = start, 0
    while end < len(query):
        ch = query[end]
        if ch in "([":
            depth += 1
        elif ch in ")]":
            if depth == 0:
                break
            depth -= 1
        elif depth == 0 and ch in stop_chars and end > start:
            break
        end += 1
    return query[start:end].strip() or query[start : start + 1]


def _tokenize(query: str, option: str) -> list[_Tok]:
    """Tokens of ``query``, ending at a ``bad`` token that says what is not allowed there."""
    toks: list[_Tok] = []
    pos = 0
    while pos < len(query):
        m = _TOKEN.match(query, pos)
        if m is None:
            ch = query[pos]
            if ch == "@":
                what = f"`{_snippet(query, pos)}` (a reference to a Python variable)"
            elif ch == ".":
                start = pos
                while start > 0 and (query[start - 1].isalnum() or query[start - 1] == "_"):
                    start -= 1
                what = f"attribute access `{_snippet(query, start)}`"
            elif query.startswith(":=", pos):
                what = "assignment expression `:=`"
            elif ch in "`\"'":
                what = (
                    f"the unclosed {'backtick' if ch == '`' else 'string'} at character {pos + 1}"
                )
            else:
                shown = ch if ch.isprintable() else ascii(ch)
                what = f"`{shown}` (at character {pos + 1})"
            # Refused when the parser reaches it, so that a call or keyword before it is named.
            toks.append(_Tok("bad", what, pos))
            return toks
        kind = m.lastgroup or ""
        text = m.group()
        if kind == "name" and m.end() < len(query) and query[m.end()] in "\"'":
            raise _refused(query, option, f"string prefix `{text}` (f-strings, bytes, raw strings)")
        if kind == "backtick":
            toks.append(_Tok("column", text[1:-1], pos))
        elif kind != "space":
            toks.append(_Tok(kind, text, pos))
        pos = m.end()
    toks.append(_Tok("end", "", len(query)))
    return toks


class _Parser:
    """Recursive descent over the tokens; every refusal names the offending part."""

    def __init__(self, query: str, option: str) -> None:
        self.query, self.option = query, option
        self.toks = _tokenize(query, option)
        self.i = 0
        self.depth = 0  # nesting of parentheses and ~/not at the current token

    def peek(self) -> _Tok:
        return self.toks[self.i]

    def take(self) -> _Tok:
        tok = self.toks[self.i]
        if tok.kind == "bad":
            raise self.fail(tok.text)
        self.i += 1
        return tok

    def fail(self, what: str) -> QueryError:
        return _refused(self.query, self.option, what)

    def unexpected(self, tok: _Tok) -> QueryError:
        if tok.kind == "bad":
            return self.fail(tok.text)
        if tok.kind == "end":
            return QueryError(f"{self.option} {_shown(self.query)}: ends too early; {GRAMMAR}")
        return self.fail(f"`{_snippet(self.query, tok.pos)}` (at character {tok.pos + 1})")

    def is_word(self, word: str) -> bool:
        tok = self.peek()
        return tok.kind == "name" and tok.text == word

    def parse(self) -> Node:
        node = self.query_()
        if self.peek().kind != "end":
            raise self.unexpected(self.peek())
        return node

    def query_(self) -> Node:
        parts = [self.term()]
        while self.peek().text == "|" or self.is_word("or"):
            self.take()
            parts.append(self.term())
        return parts[0] if len(parts) == 1 else Combine("|", tuple(parts))

    def term(self) -> Node:
        parts = [self.factor()]
        while self.peek().text == "&" or self.is_word("and"):
            self.take()
            parts.append(self.factor())
        return parts[0] if len(parts) == 1 else Combine("&", tuple(parts))

    def nest(self, tok: _Tok) -> None:
        """Enter one level of parentheses or ~/not; refuse beyond MAX_DEPTH levels."""
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.fail(
                f"nesting parentheses and ~/not more than {MAX_DEPTH} levels deep (at character "
                f"{tok.pos + 1})"
            )

    def factor(self) -> Node:
        tok = self.peek()
        if tok.text == "~" or self.is_word("not"):
            self.take()
            self.nest(tok)
            node: Node = Invert(self.factor())
            self.depth -= 1
            return node
        if tok.text == "(":
            self.take()
            self.nest(tok)
            node = self.query_()
            if self.take().text != ")":
                raise self.unexpected(self.toks[self.i - 1])
            self.depth -= 1
            if self.peek().text in _COMPARE:
                raise self.fail(f"comparing a condition `{self.peek().text}`")
            return node
        return self.condition()

    def value(self) -> _Column | Any:
        """A column reference or a literal."""
        tok = self.take()
        if tok.kind == "column":
            return _Column(tok.text)
        if tok.kind == "string":
            return self.string(tok)
        if tok.kind == "number":
            return self.number(tok)
        if tok.text == "-" and self.peek().kind == "number":
            return -self.number(self.take())
        if tok.kind == "name":
            if tok.text in ("True", "False"):
                return tok.text == "True"
            nxt = self.peek()
            if nxt.text == "(":
                raise self.fail(f"function call `{_snippet(self.query, tok.pos)}`")
            if nxt.text == "[":
                raise self.fail(f"subscript `{_snippet(self.query, tok.pos)}`")
            if tok.text in _KEYWORDS:
                raise self.fail(f"keyword `{tok.text}`")
            if tok.text in ("and", "or", "not", "in"):
                raise self.unexpected(tok)
            return _Column(tok.text)
        raise self.unexpected(tok)

    def string(self, tok: _Tok) -> str:
        """A quoted literal with its escapes decoded; a bad escape is refused, naming it."""
        try:
            # A lone quoted string: only escapes are decoded. NUL bytes and text that is not
            # valid UTF-8 were refused before parsing (check_text).
            value = ast.literal_eval(tok.text)
        except (SyntaxError, ValueError, UnicodeError, MemoryError) as e:
            reason = str(getattr(e, "msg", e) or type(e).__name__).splitlines()[0]
            reason = reason.split(": ", 1)[-1] if "codec can't decode" in reason else reason
            raise self.fail(
                f"the string {_printable(tok.text)} (at character {tok.pos + 1}: {reason}; "
                'use the escapes of Python strings, e.g. \\n, \\\\, \\", \\u00e9)'
            ) from None
        if not isinstance(value, str):  # pragma: no cover - the tokeniser only passes quotes
            raise self.fail(f"the literal {_printable(tok.text)}")
        return value

    def number(self, tok: _Tok) -> int | float:
        """A number literal; more than MAX_DIGITS digits is refused (no column holds one)."""
        digits = sum(c.isdigit() for c in tok.text)
        if digits > MAX_DIGITS:
            raise self.fail(
                f"a number with {digits} digits (at character {tok.pos + 1}; at most {MAX_DIGITS})"
            )
        return _number(tok.text)

    def condition(self) -> Node:
        start = self.peek()
        left = self.value()
        if self.is_word("in") or self.is_word("not"):
            negate = self.take().text == "not"
            if negate and not self.is_word("in"):
                raise self.unexpected(self.peek())
            if negate:
                self.take()
            if not isinstance(left, _Column):
                raise self.fail(f"`{left!r} in` (the left of `in` must be a column)")
            return Compare(left.name, "not in" if negate else "in", self.literal_list())
        if self.peek().text not in _COMPARE:
            if isinstance(left, _Column):
                return Flag(left.name)
            raise self.fail(f"the bare literal `{_snippet(self.query, start.pos)}`")
        parts: list[Node] = []
        while self.peek().text in _COMPARE:
            op = self.take().text
            right = self.value()
            if isinstance(left, _Column) and not isinstance(right, _Column):
                parts.append(Compare(left.name, op, right))
            elif isinstance(right, _Column) and not isinstance(left, _Column):
                parts.append(Compare(right.name, _FLIP.get(op, op), left))
            elif isinstance(left, _Column):
                raise self.fail(f"`{left.name} {op} {right.name}` (a column against a column)")
            else:
                raise self.fail(f"`{left!r} {op} {right!r}` (a literal against a literal)")
            left = right
        if self.peek().text == "-":
            raise self.fail(f"arithmetic `{_snippet(self.query, self.peek().pos)}`")
        return parts[0] if len(parts) == 1 else Combine("&", tuple(parts))

    def literal_list(self) -> tuple[Any, ...]:
        if self.take().text != "[":
            raise self.fail(
                f"`{_snippet(self.query, self.toks[self.i - 1].pos)}` after `in` (give a [list])"
            )
        values: list[Any] = []
        while self.peek().text != "]":
            v = self.value()
            if isinstance(v, _Column):
                raise self.fail(f"the column `{v.name}` inside a list (give literals)")
            values.append(v)
            if self.peek().text == ",":
                self.take()
            elif self.peek().text != "]":
                raise self.unexpected(self.peek())
        self.take()
        return tuple(values)


def _number(text: str) -> int | float:
    return float(text) if any(c in text for c in ".eE") else int(text)


def parse_query(query: str, option: str = "--control-query") -> Node:
    """The parsed query; QueryError (one line naming the refused part) outside the grammar."""
    if not isinstance(query, str) or not query.strip():
        raise QueryError(f"{option}: empty query; {GRAMMAR}")
    check_text(query, option)
    return _Parser(query, option).parse()


def check_text(query: str, option: str) -> None:
    """Refuse NUL bytes and text that is not valid UTF-8 (undecodable bytes in argv or a file)."""
    if "\x00" in query:
        raise _refused(query, option, f"a NUL byte (at character {query.index(chr(0)) + 1})")
    try:
        query.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = ascii(query[e.start])
        raise _refused(
            query,
            option,
            f"the byte {bad} that is not valid UTF-8 (at character {e.start + 1}; give the "
            "query in UTF-8)",
        ) from None


def query_columns(node: Node) -> list[str]:
    """The columns a parsed query reads, in first-use order."""
    if isinstance(node, Compare | Flag):
        return [node.column]
    parts: Iterable[Node] = node.parts if isinstance(node, Combine) else (node.part,)
    seen: dict[str, None] = {}
    for p in parts:
        seen.update(dict.fromkeys(query_columns(p)))
    return list(seen)


def _compare(s: pd.Series, c: Compare, query: str, option: str) -> np.ndarray:
    if c.op in ("in", "not in"):
        try:
            hit = s.isin(list(c.value)).fillna(False).to_numpy(bool)
        except (TypeError, OverflowError, ValueError):
            raise QueryError(
                f"{option} {_shown(query)}: column `{c.column}` ({s.dtype}) cannot be compared "
                f"with the list of {c.op}"
            ) from None
        return ~hit if c.op == "not in" else hit
    try:
        if c.op == "==":
            res = s == c.value
        elif c.op == "!=":
            res = s != c.value
        elif c.op == "<":
            res = s < c.value
        elif c.op == ">":
            res = s > c.value
        elif c.op == "<=":
            res = s <= c.value
        else:
            res = s >= c.value
    except (TypeError, OverflowError, ValueError) as e:
        why = " (out of the column's range)" if isinstance(e, OverflowError) else ""
        raise QueryError(
            f"{option} {_shown(query)}: column `{c.column}` ({s.dtype}) cannot be compared with "
            f"{_literal(c.value)} by "
            f"{c.op}{why}"
        ) from None
    # Missing values (NaN, pd.NA) never match an order comparison, as in pandas.
    return res.fillna(False).to_numpy(dtype=bool)


def _column(df: pd.DataFrame, name: str) -> pd.Series:
    """The column called ``name`` (column labels that are not strings match their text)."""
    for c in df.columns:
        if str(c) == name:
            return df[c]
    raise KeyError(name)


def _evaluate(node: Node, df: pd.DataFrame, query: str, option: str) -> np.ndarray:
    if isinstance(node, Compare):
        return _compare(_column(df, node.column), node, query, option)
    if isinstance(node, Flag):
        s = _column(df, node.column)
        if not pd.api.types.is_bool_dtype(s):
            raise QueryError(
                f"{option} {_shown(query)}: column `{node.column}` is not True/False; compare "
                f'it, e.g. {node.column} == "DMSO"'
            )
        return s.fillna(False).to_numpy(bool)  # a missing flag (pd.NA) counts as False
    if isinstance(node, Invert):
        return ~_evaluate(node.part, df, query, option)
    masks = [_evaluate(p, df, query, option) for p in node.parts]
    out = masks[0].copy()
    for m in masks[1:]:
        out = (out & m) if node.op == "&" else (out | m)
    return out


def query_mask(df: pd.DataFrame, query: str, option: str = "--control-query") -> np.ndarray:
    """Boolean mask of the rows of ``df`` a control query selects (see the module doc)."""
    node = parse_query(query, option)
    columns = [str(c) for c in df.columns]
    for col in query_columns(node):
        if col not in columns:
            have = ", ".join(columns[:12]) + (", ..." if len(columns) > 12 else "")
            raise QueryError(f"{option} {_shown(query)}: no column `{col}` (columns: {have})")
    return _evaluate(node, df, query, option)


def check_stored_query(value: Any, where: str, key: str) -> None:
    """Refuse a control query read back from a file (dataset.json, results.json) outside the grammar.

    Such files are shared; a query in them is data and must parse like ``--control-query``.
    """
    if value is None:
        return
    if not isinstance(value, str):
        raise QueryError(f"{where}: `{key}` must be a string, found {type(value).__name__}")
    parse_query(value, option=f"{where}: `{key}`")
