"""MkDocs hook: fill `<!-- cli-reference -->` with the `--help` of every cdcl command, and add
the site's table stylesheet (docs/stylesheets/tables.css: wide tables fit the window).

The reference is generated from the real parser at build time, so it cannot drift from the code.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

MARKER = "<!-- cli-reference -->"
STYLESHEET = "stylesheets/tables.css"
SRC = Path(__file__).resolve().parents[2] / "src"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _sections(parser: argparse.ArgumentParser, name: str, level: int) -> list[str]:
    """One heading and help block per command, depth first."""
    out = [f"{'#' * level} `{name}`", "", "```text", parser.format_help().rstrip(), "```", ""]
    for sub, child in _subparsers(parser).items():
        out += _sections(child, f"{name} {sub}", min(level + 1, 4))
    return out


def cli_reference() -> str:
    """Markdown with the help text of `cdcl` and of each of its subcommands."""
    if str(SRC) not in sys.path:
        sys.path.insert(0, str(SRC))
    from cdcl.cli import build_parser

    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal width; fix it for the page
    return "\n".join(_sections(build_parser(), "cdcl", 2))


def on_page_markdown(markdown: str, **_: object) -> str:
    """Replace the marker on the CLI reference page."""
    return markdown.replace(MARKER, cli_reference()) if MARKER in markdown else markdown


def on_config(config: Any, **_: object) -> Any:
    """Add the table stylesheet to every page."""
    if STYLESHEET not in config.extra_css:
        config.extra_css.append(STYLESHEET)
    return config
