"""The package layout of docs/design.md §1: rooms in pipeline order, imports only go backwards.

Every module under src/cdcl belongs to one room; a module may import from its own room and from
rooms earlier in ``ROOMS``, never from a later one. Imports inside functions count as much as
module-level ones (a lazy import is still a dependency), and so do imports under
``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "cdcl"

# (room, module prefixes), in pipeline order: a room may import only from itself and earlier
# rooms. Keep in step with the layout table of docs/design.md §1.
ROOMS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "base",
        (
            "cdcl.errors",
            "cdcl.atomic",
            "cdcl.locking",
            "cdcl.parquet",
            "cdcl.progress",
            "cdcl._version",
            "cdcl.hashing",
            "cdcl.schema",
        ),
    ),
    ("data", ("cdcl.data",)),
    ("models", ("cdcl.models",)),
    ("methods", ("cdcl.methods",)),
    ("config", ("cdcl.config", "cdcl.presets")),
    ("train", ("cdcl.train",)),
    ("profiles", ("cdcl.profiles",)),
    ("embed", ("cdcl.embed",)),
    ("metrics", ("cdcl.metrics",)),
    ("report", ("cdcl.report",)),
    ("evaluation", ("cdcl.evaluation",)),
    ("experiments", ("cdcl.experiments",)),
    ("api", ("cdcl.api",)),
    ("top", ("cdcl", "cdcl.__main__", "cdcl.cli", "cdcl.commands")),
)
# The root package is matched exactly (every module name starts with "cdcl").
EXACT = {"cdcl"}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def room_of(module: str) -> int | None:
    """Index in ROOMS of the room holding ``module`` (longest matching prefix), or None."""
    best: tuple[int, int] | None = None
    for i, (_, prefixes) in enumerate(ROOMS):
        for p in prefixes:
            hit = module == p if p in EXACT else module == p or module.startswith(p + ".")
            if hit and (best is None or len(p) > best[1]):
                best = (i, len(p))
    return None if best is None else best[0]


def imports_of(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, imported cdcl module) for every import in the file, at any depth."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                parent = ".".join(base + ([node.module] if node.module else []))
            else:
                parent = node.module or ""
            for a in node.names:
                # `from cdcl.data import synthetic` imports the submodule cdcl.data.synthetic.
                sub = f"{parent}.{a.name}"
                found.append((node.lineno, sub if sub in MODULES else parent))
    return [(line, name) for line, name in found if name == "cdcl" or name.startswith("cdcl.")]


def test_every_module_has_a_room() -> None:
    homeless = [m for m in MODULES if room_of(m) is None]
    assert not homeless, (
        f"modules in no room: {homeless}; add them to ROOMS in tests/test_layout.py and to the "
        "layout table of docs/design.md §1"
    )


def test_imports_only_go_to_the_same_or_an_earlier_room() -> None:
    problems = []
    for module, path in MODULES.items():
        own = room_of(module)
        if own is None:
            continue  # reported by test_every_module_has_a_room
        for line, target in imports_of(module, path):
            if target not in MODULES:
                problems.append(f"{module} (line {line}) imports {target}, which does not exist")
                continue
            other = room_of(target)
            if other is not None and other > own:
                problems.append(
                    f"{module} (room {ROOMS[own][0]}, line {line}) imports {target} "
                    f"(room {ROOMS[other][0]}, later in the pipeline)"
                )
    order = " < ".join(name for name, _ in ROOMS)
    assert not problems, f"imports against the layer order {order}:\n" + "\n".join(problems)


def test_profiles_never_import_torch() -> None:
    offenders = []
    for module, path in MODULES.items():
        if not module.startswith("cdcl.profiles"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            offenders += [
                f"{module} (line {node.lineno})" for n in names if n.split(".")[0] == "torch"
            ]
    assert not offenders, f"cdcl.profiles must not import torch: {offenders}"


def test_profile_tables_load_without_torch() -> None:
    code = (
        "import sys\n"
        "import cdcl.profiles.table, cdcl.profiles.columns, cdcl.profiles.correction\n"
        "loaded = [m for m in ('torch', 'timm') if m in sys.modules]\n"
        "assert not loaded, f'importing cdcl.profiles loaded {loaded}'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
