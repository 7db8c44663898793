"""upcycle: dense Hugging Face checkpoints to sparse Mixture-of-Experts models and back.

The public names are imported on first use, so that `upcycle push`/`inspect` and `import
upcycle.errors` do not pay for importing torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "ConvertSummary": "upcycle.convert",
    "convert": "upcycle.convert",
    "MergeSummary": "upcycle.merge",
    "merge": "upcycle.merge",
    "load": "upcycle.generic.load",
    "UpcycleError": "upcycle.errors",
}

__all__ = ["ConvertSummary", "MergeSummary", "UpcycleError", "__version__", "convert", "load", "merge"]


def __getattr__(name: str) -> Any:
    """Return the public object `name`, importing its module on first use; raise AttributeError otherwise."""
    if name not in _PUBLIC:
        raise AttributeError(f"module 'upcycle' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value
