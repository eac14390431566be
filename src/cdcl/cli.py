"""The `cdcl` command line: parses arguments and hands each subcommand to the library.

Every subcommand lives in ``cdcl/commands/<name>.py`` with ``HELP``, ``add_arguments(parser)``
and ``run(args) -> int``; those modules import heavy libraries (torch, umap) inside ``run`` so
that ``cdcl --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cdcl._version import __version__
from cdcl.errors import CdclError

COMMANDS = ("synth", "build", "info", "train", "embed", "evaluate", "compare", "demo", "study")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per command."""
    parser = argparse.ArgumentParser(
        prog="cdcl",
        description="Batch-robust representation learning and evaluation for high-content screens.",
    )
    parser.add_argument("--version", action="version", version=f"cdcl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"cdcl.commands.{name}")
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors become one line on stderr and exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except CdclError as e:
        print(f"cdcl {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cdcl {args.command}: interrupted", file=sys.stderr)
        return 130
    except RecursionError:
        # Input nested thousands deep (a YAML override, a JSON file) that a parser descends
        # recursively: one line, not a traceback thousands of frames long.
        print(
            f"cdcl {args.command}: error: an argument or a file it names is nested too deeply "
            "to read (RecursionError); simplify it (e.g. a `key=value` override or a YAML/JSON "
            "file with thousands of nested brackets)",
            file=sys.stderr,
        )
        return 2
    except UnicodeError as e:
        print(f"cdcl {args.command}: error: {unicode_message(e)}", file=sys.stderr)
        return 2
    except Exception as e:
        # A full disk anywhere (a log line, a plot) is one line naming the file, not a traceback.
        from cdcl.atomic import disk_full_cause, disk_full_error

        cause = disk_full_cause(e)
        if cause is None:
            raise
        print(
            f"cdcl {args.command}: error: {disk_full_error(cause.filename or 'a file', cause)}",
            file=sys.stderr,
        )
        return 2


def unicode_message(error: UnicodeError) -> str:
    """One line for text that is not valid UTF-8 (a file's bytes or an argument's)."""
    if isinstance(error, UnicodeDecodeError | UnicodeEncodeError):
        bad = error.object[error.start : error.start + 4]
        shown = bad.hex(" ") if isinstance(bad, bytes) else ascii(bad)
        where = f"position {error.start} ({shown})"
    else:
        where = "an argument or a file"
    return (
        f"text that is not valid UTF-8 at {where}: {error.reason} ({type(error).__name__}); "
        "save the file as UTF-8 and give names and arguments in UTF-8"
    )


def one_line(error: CdclError) -> str:
    """The user-facing message of ``error``, without the traceback a DataLoader worker adds.

    torch re-raises an exception from a loader worker as the same type whose message is
    "Caught X in DataLoader worker process N." plus the worker's traceback; the original
    message is the traceback's last line, after the exception's name.
    """
    text = str(error)
    if text.startswith("Caught ") and "\n" in text:
        last = [ln for ln in text.splitlines() if ln.strip()][-1]
        name = type(error).__name__
        for prefix in (f"{type(error).__module__}.{name}: ", f"{name}: "):
            if last.startswith(prefix):
                return last[len(prefix) :]
        return last
    return text
