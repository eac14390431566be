"""Write constraints.txt: the installed versions of cdcl's direct dependencies (runtime + dev).

Run in the environment the test suite passed in (``make constraints``); ``make`` installs with
``-c constraints.txt`` so that a fresh install gets the same versions.
"""

from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADER = """\
# Tested versions of cdcl's direct dependencies (runtime and the dev extra), as installed in the
# environment the test suite passed in. `make` installs with `-c constraints.txt`, so a fresh
# install gets these versions; pyproject.toml keeps the ranges the package accepts.
# Regenerate after an upgrade with `make constraints` (tools/write_constraints.py).
"""


def direct_dependencies(pyproject: Path) -> list[str]:
    """Distribution names of ``dependencies`` and every optional extra of pyproject.toml."""
    project = tomllib.loads(pyproject.read_text())["project"]
    specs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        specs += extra
    return sorted({re.split(r"[<>=!~\[ ;]", s, maxsplit=1)[0] for s in specs}, key=str.lower)


def main() -> int:
    """Write ROOT/constraints.txt; fail naming a dependency that is not installed."""
    lines = []
    for name in direct_dependencies(ROOT / "pyproject.toml"):
        try:
            lines.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            print(f"write_constraints: {name} is not installed; run `make` first", file=sys.stderr)
            return 1
    (ROOT / "constraints.txt").write_text(HEADER + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
