"""The documentation is checked like code: commands parse, snippets run, links and words hold.

- every `cdcl ...` command in a ``bash`` block of README.md or docs/ (and every inline
  ``cdcl ...`` span without placeholders) parses with the real command-line parser, and its
  ``key=value`` training overrides are valid config keys; every ``make X`` names a target;
- every ``python`` block runs in a fresh process, unless the line before the block is
  ``<!-- not-tested: needs GPU -->``, ``<!-- not-tested: needs real data -->`` or
  ``<!-- tested-by: tests/test_x.py -->`` (a test that runs the page's snippets on data it
  builds; it must exist and name the page);
- relative links in README.md point to files that exist;
- no page uses words a reader cannot resolve (internal process terms, "the seed" for the
  reference implementation, section citations of documents outside the repository);
- ``mkdocs build --strict`` passes (broken links or anchors between pages fail it).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from conftest import SHARED_DATA

from cdcl.cli import build_parser
from cdcl.config import load_config
from cdcl.errors import CdclError

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
SHELL_LANGS = {"bash", "sh", "shell", "console"}
SKIP_MARK = re.compile(
    r"<!--\s*(?:not-tested:\s*needs (?:GPU|real data)|tested-by:\s*(tests/[\w/]+\.py))\s*-->"
)
# Pages written on other branches and linked from README.md before they are merged into docs/.
# Remove each name once its page exists; the test then checks the link like any other.
PENDING_PAGES: set[str] = set()
FORBIDDEN = [
    re.compile(r"\bthe seed\b", re.I),  # say "the reference implementation (cfredinh/CDCL)"
    re.compile(r"DESIGN §|DESIGN section"),  # cite docs/design.md instead
    re.compile(r"\b(this|the|previous|earlier|next|last) stop\b", re.I),
    re.compile(r"\bthe issue's\b|\bissue #?\d+", re.I),
    re.compile(r"\bthe prototype\b", re.I),
    re.compile(r"\b(this|previous|next) session\b|\bhelpers?\b(?! function)", re.I),
]


@dataclass
class Block:
    """One fenced code block: its page, first line number, language, text and skip reason."""

    page: Path
    line: int
    lang: str
    text: str
    skip: str | None

    @property
    def where(self) -> str:
        """``page:line`` for messages."""
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def fenced_blocks(page: Path) -> list[Block]:
    """Every fenced block of a Markdown page (fences may be indented, e.g. inside lists)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)(```+)\s*([\w+-]*)", lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.group(1), m.group(2), m.group(3).lower()
        prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        skip = SKIP_MARK.search(prev)
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
            j += 1
        blocks.append(Block(page, i + 1, lang, "\n".join(body), skip.group(0) if skip else None))
        i = j + 1
    return blocks


def text_outside_fences(page: Path) -> str:
    """The page's prose (fenced blocks removed), for inline spans and word checks."""
    return re.sub(r"^\s*```.*?^\s*```", "", page.read_text(encoding="utf-8"), flags=re.M | re.S)


def shell_commands(block: Block) -> list[list[str]]:
    """Each command of a shell block as argv, with continuations joined and $VARS expanded."""
    joined = re.sub(r"\\\n", " ", block.text)
    env: dict[str, str] = {}
    commands: list[list[str]] = []
    for line in joined.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        argv = shlex.split(line, comments=True)
        assign = re.fullmatch(r"([A-Za-z_]\w*)=(.*)", argv[0]) if len(argv) == 1 else None
        if assign:
            env[assign.group(1)] = assign.group(2)
            continue
        commands.append(
            [re.sub(r"\$(\w+)", lambda m: env.get(m.group(1), m.group(0)), a) for a in argv]
        )
    return commands


def cdcl_args(argv: list[str]) -> list[str] | None:
    """The arguments given to cdcl by a command line, or None when it does not run cdcl."""
    if argv and Path(argv[0]).name == "cdcl":
        return argv[1:]
    for k in range(len(argv) - 1):
        if argv[k] == "-m" and argv[k + 1] == "cdcl":
            return argv[k + 2 :]
    return None


def check_cdcl(args: list[str], where: str) -> None:
    """Parse with the real parser; training overrides must be valid config keys."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            ns = build_parser().parse_args(args)
        except SystemExit as e:
            assert e.code == 0, (
                f"{where}: `cdcl {shlex.join(args)}` does not parse: {err.getvalue()}"
            )
            return
    if ns.command == "train" and getattr(ns, "overrides", None) and not ns.list_presets:
        try:
            load_config(ns.preset, ns.overrides)
        except CdclError as e:
            pytest.fail(f"{where}: `cdcl {shlex.join(args)}`: {e}")


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def check_flags(args: list[str], where: str) -> None:
    """A prose mention may omit required arguments: check its (sub)commands and flags exist."""
    parser = build_parser()
    rest = list(args)
    while rest and not rest[0].startswith("-") and _subcommands(parser):
        choices = _subcommands(parser)
        assert rest[0] in choices, f"{where}: `cdcl {shlex.join(args)}`: no command {rest[0]!r}"
        parser = choices[rest.pop(0)]
    known = set(parser._option_string_actions)
    for token in rest:
        flag = token.split("=", 1)[0]
        if flag.startswith("-") and flag not in known:
            pytest.fail(f"{where}: `cdcl {shlex.join(args)}`: no option {flag}")


def all_blocks() -> list[Block]:
    """Every fenced block of every page."""
    return [b for page in PAGES for b in fenced_blocks(page)]


def test_pages_are_found() -> None:
    """The checks below see the README and the documentation pages."""
    names = {p.relative_to(ROOT).as_posix() for p in PAGES}
    assert {"README.md", "docs/index.md", "docs/design.md"} <= names


def test_shell_blocks_parse_with_the_real_cli() -> None:
    """Every cdcl command shown in a shell block parses; every make target exists."""
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
    checked = 0
    for block in all_blocks():
        if block.lang not in SHELL_LANGS:
            continue
        for argv in shell_commands(block):
            if argv[0] == "make":
                missing = [t for t in argv[1:] if t not in targets]
                assert not missing, f"{block.where}: make target(s) {missing} not in the Makefile"
                continue
            args = cdcl_args(argv)
            if args is not None:
                check_cdcl(args, block.where)
                checked += 1
    assert checked >= 20, f"only {checked} cdcl commands found in the docs"


def test_inline_cdcl_spans_parse() -> None:
    """Inline `cdcl ...` spans without placeholders ([...], a|b, ..., <x>) name real options."""
    checked = 0
    for page in PAGES:
        prose = text_outside_fences(page)
        for span in re.findall(r"`(cdcl [^`]+)`", prose, flags=re.S):
            args = shlex.split(span.replace("\n", " "))[1:]
            if re.search(r"[\[\]|<>…]|\.\.\.", span) or (args and args[0].isupper()):
                continue  # a usage pattern such as `cdcl COMMAND --help`, not a command
            check_flags(args, page.relative_to(ROOT).as_posix())
            checked += 1
    assert checked >= 10


@pytest.mark.slow
def test_python_blocks_run(tmp_path: Path) -> None:
    """Every python block runs in a fresh interpreter (or is marked as needing GPU/real data)."""
    blocks = [b for b in all_blocks() if b.lang in {"python", "py"}]
    assert blocks, "no python block in the docs"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *sys.path])}
    ran = 0
    for n, block in enumerate(blocks):
        if block.skip:
            tester = SKIP_MARK.search(block.skip).group(1)
            if tester:  # the named test must exist and be about this page
                text = (
                    (ROOT / tester).read_text(encoding="utf-8") if (ROOT / tester).exists() else ""
                )
                assert block.page.name in text, f"{block.where}: {tester} does not test this page"
            continue
        cwd = tmp_path / f"block{n}"
        cwd.mkdir()
        proc = subprocess.run(
            [sys.executable, "-c", block.text],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, f"{block.where}: python block failed:\n{proc.stderr[-3000:]}"
        ran += 1
    assert ran >= 1


def test_readme_links_resolve() -> None:
    """Relative links of README.md name existing files (pages still to be merged aside)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        if target in PENDING_PAGES and not (ROOT / target).exists():
            continue
        assert (ROOT / target).exists(), f"README.md links to missing {target}"


def test_readme_stays_short_and_keeps_the_two_commands() -> None:
    """The README is an entry point; the rest lives on the documentation site."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    assert "make demo" in text and "make test" in text


def test_no_unresolvable_words() -> None:
    """No page says "the seed", cites DESIGN sections, or mentions internal process terms."""
    for page in PAGES:
        for lineno, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            for pattern in FORBIDDEN:
                assert not pattern.search(line), (
                    f"{page.relative_to(ROOT)}:{lineno}: {pattern.pattern!r} in: {line.strip()}"
                )


def test_site_builds_strict(tmp_path: Path) -> None:
    """`mkdocs build --strict` succeeds: no broken link, anchor or page left out of the nav."""
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "design" / "index.html").exists()


BBBC021 = SHARED_DATA / "bbbc021_week4_singlecell"


@pytest.mark.skipif(not BBBC021.exists(), reason="shared/data/bbbc021_week4_singlecell missing")
def test_bbbc021_held_out_plates_in_the_docs_match_the_code() -> None:
    """The fold table of docs/datasets.md is what `--split k` holds out; the demo pair is too."""
    from cdcl.data.splits import assign_split
    from cdcl.data.table import TableOptions, samples_from_table
    from cdcl.experiments.demo import BBBC021_TEST_PLATES

    opts = TableOptions(
        batch_col="plate",
        plate_col="plate",
        well_col="well",
        site_col="site",
        treatment_col="compound",
        dose_col="concentration_uM",
        compound_col="compound",
        moa_col="moa",
        control_query='compound == "DMSO"',
    )
    samples = samples_from_table(pd.read_csv(BBBC021 / "metadata_subset.csv"), opts, "meta")
    page = (ROOT / "docs" / "datasets.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| (\d)[^|]*\| (Week4_\d+) \+ (Week4_\d+) \|$", page, flags=re.M)
    assert [int(k) for k, _, _ in rows] == [1, 2, 3]
    for k, a, b in rows:
        split = assign_split(samples, "table", int(k))
        assert set(samples.loc[split == "test", "batch"]) == {a, b}, f"--split {k}"
    fixed = re.search(r"holds out a fixed pair,(.*?)which is", " ".join(page.split()))
    assert fixed, "docs/datasets.md no longer names the demo's held-out pair"
    assert set(re.findall(r"Week4_\d+", fixed.group(1))) == set(BBBC021_TEST_PLATES)
