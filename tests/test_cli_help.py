"""Every command answers --help (argparse %-formats help strings: a stray % breaks them)."""

from __future__ import annotations

import pytest
from cli_process import cdcl

from cdcl.cli import COMMANDS


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_exits_0_and_names_the_command(command: str | None) -> None:
    proc = cdcl(*([command] if command else []), "--help", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage: cdcl" in proc.stdout
    if command is None:
        for name in COMMANDS:
            assert name in proc.stdout
