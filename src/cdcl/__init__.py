"""cdcl: batch-robust representations for high-content screening.

The verbs of the Python API (:mod:`cdcl.api`) are available at the top level::

    import cdcl

    profiles = cdcl.embed("runs/cdcl")
    results = cdcl.evaluate(profiles)

``import cdcl`` stays light: torch and the other heavy libraries load when a verb runs.
"""

import functools
import importlib
import importlib.util
import sys
import types
from typing import Any

from cdcl import api
from cdcl._version import __version__

VERBS = tuple(api.__all__)


class _Verb:
    """A verb that shares its name with a subpackage (``cdcl.train``, ``cdcl.embed``,
    ``cdcl.metrics``): calling it runs the verb; its other attributes are the subpackage's, so
    ``import cdcl.metrics.score as s`` and ``cdcl.train.loop`` keep working."""

    def __init__(self, fn: Any, module: str) -> None:
        functools.update_wrapper(self, fn)
        self._module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__wrapped__(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "_module":
            raise AttributeError(name)
        return getattr(importlib.import_module(self._module), name)

    def __repr__(self) -> str:
        return f"<cdcl verb {self.__name__}>"


class _Package(types.ModuleType):
    """The ``cdcl`` module: importing a subpackage never replaces the verb of the same name."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(self.__dict__.get(name), _Verb) and isinstance(value, types.ModuleType):
            return  # the import system binds the subpackage here; the verb stays
        super().__setattr__(name, value)


def _export(name: str) -> Any:
    """The verb ``name`` of cdcl.api, wrapped when a subpackage has the same name."""
    fn = getattr(api, name)
    spec = importlib.util.find_spec(f"{__name__}.{name}")
    return _Verb(fn, f"{__name__}.{name}") if spec is not None else fn


for _name in VERBS:
    globals()[_name] = _export(_name)
sys.modules[__name__].__class__ = _Package

__all__ = ["__version__", *VERBS]
