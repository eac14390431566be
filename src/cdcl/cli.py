"""The `cdcl` command line: parses arguments and hands each subcommand to its API verb.

Every subcommand lives in ``cdcl/commands/<name>.py`` with ``HELP``, ``add_arguments(parser)``
and ``run(args) -> int``; ``run`` calls one verb of :mod:`cdcl.api` (which checks the
arguments and does the work) and prints what it returns. Heavy libraries (torch, umap) load
inside the verbs, so that ``cdcl --help`` stays fast.
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
    except KeyboardInterrupt:
        return _say(args.command, f"interrupted{interrupt_note(args.command)}", 130)
    except Exception as e:
        text = error_text(e)
        if text is None:
            raise  # a bug: its traceback is what a report needs
        return _say(args.command, f"error: {text}", 2)


def _say(command: str, text: str, status: int) -> int:
    """Print the command's last line on a line of its own (after any progress bar); ``status``."""
    from cdcl.progress import end_progress_lines

    end_progress_lines()
    print(f"cdcl {command}: {text}", file=sys.stderr)
    return status


def error_text(error: Exception) -> str | None:
    """The one line for an error the user can act on; None for anything else (a bug)."""
    if isinstance(error, CdclError):
        return one_line(error)
    if isinstance(error, RecursionError):
        # Input nested thousands deep (a YAML override, a JSON file) that a parser descends
        # recursively: one line, not a traceback thousands of frames long.
        return (
            "an argument or a file it names is nested too deeply to read (RecursionError); "
            "simplify it (e.g. a `key=value` override or a YAML/JSON file with thousands of "
            "nested brackets)"
        )
    if isinstance(error, UnicodeError):
        return unicode_message(error)
    # A full disk anywhere (a log line, a plot) is one line, not a traceback.
    from cdcl.atomic import DISK_FULL_ERRNOS, disk_full_cause, disk_full_error

    cause = disk_full_cause(error)
    if cause is None:
        return None
    if cause.filename:
        return str(disk_full_error(cause.filename, cause))
    reason = DISK_FULL_ERRNOS.get(cause.errno or 0, cause.strerror or str(cause))
    return (
        f"a write failed ({reason}) in a file the writing library did not name; files "
        "written before it are intact. Free space on the output's device and rerun the same "
        "command"
    )


# Commands that write results.json: an interrupt says which results are on disk.
WRITES_RESULTS = ("evaluate", "demo", "study")


def interrupt_note(command: str) -> str:
    """After Ctrl-C: whether the results on disk are this run's new ones or the previous ones."""
    if command not in WRITES_RESULTS:
        return ""
    from cdcl.locking import locked_outputs

    outputs = locked_outputs()
    if not outputs:
        return " before any output was written"
    from cdcl.report.results import interrupt_note as note

    return f"; {note(outputs[-1])}"


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
