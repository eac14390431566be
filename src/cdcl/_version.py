"""The package version, and the versions of the libraries that results depend on.

A base module: it imports nothing from ``cdcl``, so any room (``data/build.py`` writing a
dataset's provenance, ``metrics/score.py`` a results.json header) can read the version without
importing the package root.
"""

from __future__ import annotations

import importlib.metadata as md
import platform

__version__ = "0.1.0"


def versions() -> dict[str, str]:
    """Versions of Python and the libraries the figures depend on."""
    out = {"python": platform.python_version()}
    for pkg in ("cdcl", "torch", "timm", "numpy", "pandas", "scikit-learn", "scipy", "umap-learn"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out
