"""upcycle: dense Hugging Face checkpoints to sparse Mixture-of-Experts models and back.

The public names are imported on first use, so that `upcycle push`/`inspect` and `import
upcycle.errors` do not pay for importing torch and transformers.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "ConvertSummary": "upcycle.convert",
    "convert": "upcycle.convert",
    "MergeSummary": "upcycle.merge",
    "merge": "upcycle.merge",
    "load": "upcycle.generic.load",
    "UpcycleError": "upcycle.errors",
    "compose": "upcycle.compose",
}

__all__ = ["ConvertSummary", "MergeSummary", "UpcycleError", "__version__", "compose", "convert", "load", "merge"]


def __getattr__(name: str) -> Any:
    """Return the public object `name`, importing its module on first use; raise AttributeError otherwise."""
    if name not in _PUBLIC:
        raise AttributeError(f"module 'upcycle' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """The `upcycle` package: keeps `upcycle.convert`/`upcycle.merge` the functions once their modules load."""

    def __setattr__(self, name: str, value: Any) -> None:
        # The import system binds every loaded submodule on its package. `convert` and `merge` are
        # both a submodule and the function it defines; the function is the public name, so
        # `from upcycle import convert` must not return the module because something imported
        # `upcycle.convert` first (the module stays reachable through sys.modules).
        if isinstance(value, types.ModuleType) and _PUBLIC.get(name) == value.__name__:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
